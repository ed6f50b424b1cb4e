"""Tasks that name an image: run under docker or podman, or refused saying what is missing.

:func:`find_runtime` looks for ``docker``, then ``podman``, on ``PATH`` and
asks each whether it can run containers (``docker info``: the daemon is
reachable; for podman, its service or rootless set-up works).  The first
that can is used; when none can, :class:`ContainerUnavailable` says which
were found and why each cannot serve (not installed, daemon not reachable),
so the caller can refuse the task with that message.

:func:`container_argv` is the command that runs a task in a container:
``RUNTIME run --rm --init --name NAME``, the task's working directory
mounted at :data:`CONTAINER_WORKDIR` and used as the working directory, the
limits handed to the runtime (``--memory``, ``--cpus``, ``--pids-limit``;
the runtime puts the container in cgroups of its own), its environment as
``--env``, no network unless asked.  The wall-clock limit stays with the
runner, which kills the runtime's client; :func:`remove_container` then
removes the container by name, whatever state it is in.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import attrs

from tasksprint.exec.spec import Limits

__all__ = [
    "CONTAINER_WORKDIR",
    "RUNTIMES",
    "ContainerRuntime",
    "ContainerUnavailable",
    "container_argv",
    "find_runtime",
    "remove_container",
]

#: The runtimes tried, in order.
RUNTIMES = ("docker", "podman")
#: Where the task's working directory appears inside the container.
CONTAINER_WORKDIR = "/work"
# How long a runtime may take to say whether it can run containers.
PROBE_TIMEOUT_S = 20.0


class ContainerUnavailable(Exception):
    """No container runtime can run the task; the message names what is missing."""


@attrs.frozen
class ContainerRuntime:
    """A runtime that answered: its name and the absolute path of its command."""

    name: str
    path: str


def _probe(path: str) -> str | None:
    """None when the runtime at ``path`` can run containers, else why not (one line)."""
    try:
        done = subprocess.run(
            [path, "info"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return f"'{os.path.basename(path)} info' did not answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"cannot run {path}: {exc.strerror or exc}"
    # docker info prints the client part and exits 0 even without a daemon, with the error on stderr.
    errors = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    if done.returncode != 0 or any("cannot connect" in line.lower() for line in errors):
        reason = next((line for line in errors if "cannot connect" in line.lower()), errors[-1] if errors else "")
        return reason[:300] or f"'{os.path.basename(path)} info' exited with code {done.returncode}"
    return None


def find_runtime(path: str | None = None) -> ContainerRuntime:
    """The first of :data:`RUNTIMES` installed on ``path`` (default ``$PATH``) that can run containers.

    Raises :class:`ContainerUnavailable` naming, for each runtime, whether
    it is installed and why it cannot serve.
    """
    reasons = []
    for name in RUNTIMES:
        found = shutil.which(name, path=path)
        if found is None:
            reasons.append(f"{name} is not installed")
            continue
        problem = _probe(found)
        if problem is None:
            return ContainerRuntime(name, found)
        reasons.append(f"{name} is installed ({found}) but cannot run containers: {problem}")
    raise ContainerUnavailable("; ".join(reasons))


def container_argv(
    runtime: ContainerRuntime,
    *,
    image: str,
    args: tuple[str, ...],
    workdir: str,
    name: str,
    limits: Limits,
    env: tuple[tuple[str, str], ...] = (),
    network: bool = False,
) -> tuple[str, ...]:
    """The command that runs ``args`` in ``image`` with ``workdir`` mounted at :data:`CONTAINER_WORKDIR`."""
    if not image or image.startswith("-") or any(c.isspace() for c in image):
        raise ValueError(f"image {image[:100]!r} is not an image name")
    argv = [runtime.path, "run", "--rm", "--init", "--name", name, "--interactive"]
    argv += ["--volume", f"{os.path.abspath(workdir)}:{CONTAINER_WORKDIR}", "--workdir", CONTAINER_WORKDIR]
    if not network:
        argv += ["--network", "none"]
    if limits.memory_bytes is not None:
        argv += ["--memory", str(limits.memory_bytes), "--memory-swap", str(limits.memory_bytes)]
    if limits.cpus is not None:
        argv += ["--cpus", f"{limits.cpus:g}"]
    if limits.cpuset is not None:
        argv += ["--cpuset-cpus", ",".join(map(str, limits.cpuset))]
    if limits.pids is not None:
        argv += ["--pids-limit", str(limits.pids)]
    for key, value in env:
        argv += ["--env", f"{key}={value}"]
    return (*argv, image, *args)


def remove_container(runtime: ContainerRuntime, name: str) -> None:
    """Remove the container ``name`` (killing it if it still runs); quiet when it is gone."""
    try:
        subprocess.run(
            [runtime.path, "rm", "--force", name],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S * 3,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass
