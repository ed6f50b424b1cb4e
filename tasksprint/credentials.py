"""The cluster secret: reading it from its file, and the public development secret.

Every connection between replicas, clients and the command line starts with
a challenge-response on one shared secret (:mod:`tasksprint.handshake`).
Operators keep it in a file on every machine; :func:`load_secret` reads it
and says how to create one when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_SECRET", "SecretError", "load_secret"]

#: Cluster secret for development clusters on one machine.  Anyone who has
#: read this source knows it: callers that fall back to it must warn.
DEFAULT_SECRET = b"tasksprint-development-secret-do-not-use-on-a-network"

_SECRET_HOWTO = "create one with: head -c 32 /dev/urandom | base64 > {path}"


class SecretError(Exception):
    """The cluster secret file is missing, unreadable or empty."""


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster secret from a file.

    Takes the file's path.  Returns its bytes without trailing whitespace
    (so a final newline does not matter); those bytes, as they are, are the
    HMAC key.  Raises SecretError, naming the path and how to create a
    secret, if the file is missing, unreadable or empty.
    """
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
