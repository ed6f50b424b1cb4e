"""The cluster secret: reading it from its file, and the public development secret.

Every connection between replicas, clients and the command line starts with
a challenge-response on one shared secret (:mod:`tasksprint.handshake`).
Operators keep it in a file on every machine; :func:`load_secret` reads it
and says how to create one when it is missing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["DEFAULT_SECRET", "STDIN_PATH", "SecretError", "load_secret"]

#: Cluster secret for development clusters on one machine.  Anyone who has
#: read this source knows it: callers that fall back to it must warn.
DEFAULT_SECRET = b"tasksprint-development-secret-do-not-use-on-a-network"

_SECRET_HOWTO = "create one with: head -c 32 /dev/urandom | base64 > {path}"


class SecretError(Exception):
    """The cluster secret file is missing, unreadable or empty."""


#: The path that means "read the secret from standard input": a process that
#: starts worker clients passes it this way, so the secret file's path is
#: neither in their command line nor in their environment, which the nodes
#: they start can read.
STDIN_PATH = "-"

# A secret is short; more than this on standard input is no secret file.
_MAX_SECRET_BYTES = 64 * 1024


def _secret_from_stdin() -> bytes:
    data = sys.stdin.buffer.read(_MAX_SECRET_BYTES + 1) if sys.stdin is not None else b""
    if len(data) > _MAX_SECRET_BYTES:
        raise SecretError(f"the cluster secret on standard input is longer than {_MAX_SECRET_BYTES} bytes")
    secret = data.rstrip()
    if not secret:
        raise SecretError("--secret-file - reads the cluster secret from standard input, which held none")
    return secret


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster secret from a file (``-``: from standard input, up to its end).

    Takes the file's path.  Returns its bytes without trailing whitespace
    (so a final newline does not matter); those bytes, as they are, are the
    HMAC key.  Raises SecretError, naming the path and how to create a
    secret, if the file is missing, unreadable or empty.
    """
    if str(path) == STDIN_PATH:
        return _secret_from_stdin()
    howto = _SECRET_HOWTO.format(path=path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SecretError(f"cluster secret file {path} does not exist; {howto}") from None
    except PermissionError:
        raise SecretError(f"cannot read cluster secret file {path}: permission denied; fix its owner or mode") from None
    except OSError as exc:
        raise SecretError(f"cannot read cluster secret file {path}: {exc.strerror or exc}; {howto}") from None
    secret = data.rstrip()
    if not secret:
        raise SecretError(f"cluster secret file {path} is empty; {howto}")
    return secret
