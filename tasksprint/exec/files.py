"""Names of a task's input and result files: checked once, at the boundary.

A task names files relative to its working directory: input files staged in,
result files and globs collected after the run.  The names come from a user
(a task file, a ``kolejka_task.json``) and end up joined to directories on
clients, so they are checked before anything touches a disk: a name is a
relative path, without ``..``, without empty or control-character parts,
and bounded in length.  These functions are pure.
"""

from __future__ import annotations

import fnmatch
import posixpath

MAX_NAME_BYTES = 4096
MAX_PART_BYTES = 255
MAX_NAMES = 10_000


class BadFileName(ValueError):
    """A file name or pattern a task may not use; the message says why."""


def _check_parts(name: object, what: str) -> list[str]:
    if not isinstance(name, str):
        raise BadFileName(f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise BadFileName(f"{what} is empty")
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_NAME_BYTES:
        raise BadFileName(f"{what} {name[:60]!r}... is longer than {MAX_NAME_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadFileName(f"{what} {name!r} holds a control character")
    if name.startswith("/"):
        raise BadFileName(f"{what} {name!r} is absolute: name it relative to the task's working directory")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise BadFileName(f"{what} {name!r} names the working directory itself, not a file in it")
    for part in parts:
        if part == "..":
            raise BadFileName(f"{what} {name!r} contains '..': a task's files stay inside its working directory")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES:
            raise BadFileName(f"{what} {name!r} has a part longer than {MAX_PART_BYTES} bytes")
    return parts


def check_file_name(name: object) -> str:
    """The normalized form of a task's file name (``"./out//a.txt"`` -> ``"out/a.txt"``).

    Raises :class:`BadFileName` for an absolute name, a ``..`` part, an empty
    name, control characters, or a name too long.
    """
    return "/".join(_check_parts(name, "file name"))


def check_file_pattern(pattern: object) -> str:
    """The normalized form of a result glob (``*``, ``?``, ``[...]`` within one path part).

    The same rules as :func:`check_file_name`; a pattern cannot climb out of
    the working directory either.  Raises :class:`BadFileName`.
    """
    return "/".join(_check_parts(pattern, "file pattern"))


def check_file_names(names: object) -> tuple[str, ...]:
    """Check a list of names or patterns; refuses duplicates after normalizing."""
    if not isinstance(names, (list, tuple)):
        raise BadFileName(f"file names must be a list, got {type(names).__name__}")
    if len(names) > MAX_NAMES:
        raise BadFileName(f"{len(names)} file names; at most {MAX_NAMES} are allowed")
    out = tuple(check_file_pattern(n) for n in names)
    seen: set[str] = set()
    for name in out:
        if name in seen:
            raise BadFileName(f"file name {name!r} is listed twice")
        seen.add(name)
    return out


def match_results(present: list[str], patterns: tuple[str, ...]) -> list[str]:
    """The files among ``present`` (relative names found after a run) that the patterns select.

    A pattern matches part by part, so ``*`` never crosses a ``/``.  The
    result is sorted and holds each file once.
    """
    chosen = set()
    for name in present:
        parts = name.split("/")
        for pattern in patterns:
            pparts = pattern.split("/")
            if len(pparts) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pparts)):
                chosen.add(posixpath.normpath(name))
                break
    return sorted(chosen)
