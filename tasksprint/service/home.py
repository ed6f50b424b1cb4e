"""The service's state directory: where ``tasksprint server`` keeps its secret, data and address.

``~/.tasksprint/`` by default (``TASKSPRINT_STATE`` or ``--state DIR``
elsewhere).  It holds ``secret`` (generated on first start, mode 0600),
``server.json`` (the replicas' addresses, so the same ports are used again
and the other commands find the service), a data directory and a log per
replica.  The other commands find the service with :func:`locate`:
``--server ADDR,...``, else ``TASKSPRINT_SERVER``, else ``server.json``;
and the secret in ``--secret-file``, else the state directory's ``secret``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tasksprint.credentials import SecretError, load_secret

__all__ = [
    "SERVER_ENV",
    "STATE_ENV",
    "ServiceNotFound",
    "ensure_secret",
    "locate",
    "parse_addrs",
    "read_server_file",
    "state_dir",
    "write_server_file",
]

STATE_ENV = "TASKSPRINT_STATE"
SERVER_ENV = "TASKSPRINT_SERVER"
SCHEDULER = "tasksprint.service.scheduler:QueueScheduler"


class ServiceNotFound(Exception):
    """No service address or secret could be found; the message says where it looked and what to do."""


def state_dir(given: Path | str | None = None) -> Path:
    """The state directory: ``given``, else ``TASKSPRINT_STATE``, else ``~/.tasksprint``."""
    if given is not None:
        return Path(given).expanduser()
    env = os.environ.get(STATE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".tasksprint"


def ensure_secret(state: Path) -> Path:
    """The state directory's secret file, created (random, mode 0600) if there is none."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / "secret"
    if not path.exists():
        tmp = state / f".secret.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def parse_addrs(text: str, where: str) -> list[tuple[str, int]]:
    """``HOST:PORT,...`` as a list; raises :class:`ServiceNotFound` naming ``where`` it came from."""
    out = []
    for part in text.split(","):
        part = part.strip()
        host, sep, port = part.rpartition(":")
        if not part or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ServiceNotFound(f"{where}: {part!r} is not HOST:PORT (expected HOST:PORT,HOST:PORT,...)")
        out.append((host.strip("[]"), int(port)))
    return out


def read_server_file(state: Path) -> dict[str, Any] | None:
    """``server.json`` of ``state`` (None if there is none); raises :class:`ServiceNotFound` if it is damaged."""
    path = state / "server.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServiceNotFound(f"{path} cannot be read ({exc}); remove it and start the server again") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("replicas"), list)
        or not all(isinstance(a, str) for a in data["replicas"])
    ):
        raise ServiceNotFound(f"{path} does not list the replicas' addresses; remove it and start the server again")
    return data


def write_server_file(state: Path, replicas: list[str], **extra: Any) -> None:
    """Record the replicas' addresses (atomically) for the other commands and the next start."""
    tmp = state / f".server.json.{os.getpid()}"
    tmp.write_text(json.dumps({"replicas": replicas, **extra}, indent=2) + "\n")
    os.replace(tmp, state / "server.json")


def locate(
    server: str | None = None, state: Path | str | None = None, secret_file: Path | None = None
) -> tuple[list[tuple[str, int]], bytes]:
    """The service's replica addresses and the cluster secret; see the module docstring.

    Raises :class:`ServiceNotFound` (or :class:`~tasksprint.credentials.SecretError`) saying what is missing.
    """
    home = state_dir(state)
    if server:
        addrs = parse_addrs(server, "--server")
    elif os.environ.get(SERVER_ENV):
        addrs = parse_addrs(os.environ[SERVER_ENV], SERVER_ENV)
    else:
        data = read_server_file(home)
        if data is None:
            raise ServiceNotFound(
                f"no service found: {home / 'server.json'} does not exist. Start one with `tasksprint server` "
                f"on this machine, or pass --server HOST:PORT,... (or set {SERVER_ENV})"
            )
        addrs = parse_addrs(",".join(data["replicas"]), str(home / "server.json"))
    path = secret_file if secret_file is not None else home / "secret"
    try:
        secret = load_secret(path)
    except SecretError as exc:
        if secret_file is None:
            raise ServiceNotFound(
                f"{exc}. Copy the server's {path.name} file into {home} (or pass --secret-file FILE)"
            ) from None
        raise
    return addrs, secret
