"""A command task's own working directory: input files staged in, result files collected.

A task with input files (its own, or result files of its pretasks) or
declared results runs in a fresh directory.  :func:`stage` writes the input
files there before the run; :func:`collect` reads, after the run (a failed one too),
the regular files the result patterns select.  Names are checked with
:mod:`tasksprint.exec.files` (relative, no ``..``); symbolic links are never
followed, neither when staging (a staged file is created, never opened
through an existing name) nor when collecting (a link a task made to a file
outside its directory is not a result).  Sizes are bounded.

:func:`input_files` reads the result files a task's pretasks passed it:
each input is either a pretask's whole outputs (their ``files`` entry) or
its ``files`` output itself, a map of names to base64 text.  Those values
come from other clients, so every name and every byte is checked.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tasksprint.exec.files import BadFileName, check_file_name, match_results
from tasksprint.exec.spec import MAX_RESULT_BYTES

__all__ = ["FILES_KEY", "FilesError", "collect", "encode_files", "input_files", "stage"]

#: The output of a command task holding its result files (name -> base64 text).
FILES_KEY = "files"
# Files a directory walk looks at, at most: a task that made millions of files gets an error, not a long scan.
MAX_WALKED = 100_000


class FilesError(Exception):
    """A task's files cannot be staged or collected; the message says which and why."""


def input_files(inputs: Sequence[Any], keys: Sequence[str | None]) -> list[tuple[str, bytes]]:
    """The result files among a task's inputs (``keys[i]`` is the output input ``i`` is), as (name, content).

    Raises :class:`FilesError` for a malformed map, a bad name, bad base64,
    or a name two pretasks both give.
    """
    found: dict[str, bytes] = {}
    total = 0
    for i, (value, key) in enumerate(zip(inputs, keys)):
        if key is None and isinstance(value, dict):
            files = value.get(FILES_KEY)
        elif key == FILES_KEY:
            files = value
        else:
            continue
        if files is None:
            continue
        if not isinstance(files, dict):
            raise FilesError(f"input {i}: result files must be a map of names to base64 text")
        for name, text in files.items():
            try:
                clean = check_file_name(name)
                if not isinstance(text, str):
                    raise FilesError(f"input {i}: the content of {clean!r} is not base64 text")
                content = base64.b64decode(text, validate=True)
            except BadFileName as exc:
                raise FilesError(f"input {i}: {exc}") from None
            except (binascii.Error, ValueError):
                raise FilesError(f"input {i}: the content of {name[:100]!r} is not base64") from None
            if clean in found:
                raise FilesError(f"two pretasks give the input file {clean!r}")
            total += len(content)
            if total > MAX_RESULT_BYTES:
                raise FilesError(f"the input files hold more than {MAX_RESULT_BYTES} bytes")
            found[clean] = content
    return sorted(found.items())


def stage(workdir: Path, files: Iterable[tuple[str, bytes]]) -> None:
    """Write ``files`` into the (fresh) ``workdir``; raises :class:`FilesError` naming a file that cannot be."""
    for name, content in files:
        clean = check_file_name(name)
        target = workdir / clean
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL with O_NOFOLLOW: a file is created, never reached through a link.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise FilesError(f"cannot stage the input file {clean!r}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(content)


def collect(workdir: Path, patterns: tuple[str, ...], max_bytes: int = MAX_RESULT_BYTES) -> dict[str, bytes]:
    """The regular files under ``workdir`` that ``patterns`` select: ``{name: content}``.

    Raises :class:`FilesError` when they hold more than ``max_bytes`` or the
    directory holds too many files to look through.
    """
    present: list[str] = []
    sizes: dict[str, int] = {}
    walked = 0
    for root, dirs, names in os.walk(workdir, followlinks=False):
        walked += len(names) + len(dirs)
        if walked > MAX_WALKED:
            raise FilesError(f"the working directory holds more than {MAX_WALKED} files; results are not collected")
        for name in names:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                rel = os.path.relpath(path, workdir).replace(os.sep, "/")
                present.append(rel)
                sizes[rel] = st.st_size
    chosen = match_results(present, patterns)
    total = sum(sizes[name] for name in chosen)
    if total > max_bytes:
        raise FilesError(f"the result files hold {total} bytes, more than the {max_bytes} a task may keep")
    out = {}
    for name in chosen:
        try:
            fd = os.open(workdir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise FilesError(f"cannot read the result file {name!r}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > sizes[name]:  # grew since it was measured (a process outlived the run?)
            raise FilesError(f"the result file {name!r} changed while it was collected")
        out[name] = data
    return out


def encode_files(files: dict[str, bytes]) -> dict[str, str]:
    """Result files as an output: names to base64 text (plain JSON)."""
    return {name: base64.b64encode(content).decode("ascii") for name, content in sorted(files.items())}
