"""Checking a submitted task spec: what the queue scheduler takes, normalized, or a :class:`SpecError`.

Pure functions of the standard library (every replica runs them in lockstep
as part of :mod:`tasksprint.service.scheduler`); a submission's cost is
bounded by its size, and a whole submission is checked before any of it is
recorded.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

__all__ = ["MAX_FILES", "MAX_FILES_BYTES", "SpecError", "check_spec"]
_SPEC_KEYS = frozenset(
    [
        "cmd",
        "argv",
        "require",
        "want",
        "after",
        "name",
        "job",
        "retries",
        "timeout",
        "limits",
        "cwd",
        "env",
        "files",
        "results",
        "stdout",
        "stderr",
    ]
)
_LIMIT_KEYS = frozenset(["memory_bytes", "cpus", "cpuset", "pids", "wall_time_s", "cpu_time_s", "output_bytes"])
_MAX_TAGS = 64
_MAX_TEXT = 4096
#: Most input files and result patterns one task may name.
MAX_FILES = 10_000
#: Most bytes of content a task's input files may hold (they travel in the log, as base64 text).
MAX_FILES_BYTES = 1024 * 1024
MAX_FILES_TEXT = 4 * ((MAX_FILES_BYTES + 2) // 3)


class SpecError(ValueError):
    """A submitted task spec that cannot be taken; the message names the field."""


def _tags(spec: dict[str, Any], key: str) -> list[str]:
    v = spec.get(key, [])
    if (
        not isinstance(v, list)
        or len(v) > _MAX_TAGS
        or not all(isinstance(t, str) and 0 < len(t) <= 128 and t.strip() == t for t in v)
    ):
        raise SpecError(f"{key!r} must be a list of at most {_MAX_TAGS} tag strings, got {v!r:.120}")
    return list(dict.fromkeys(v))


def _opt_text(spec: dict[str, Any], key: str) -> str | None:
    v = spec.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > _MAX_TEXT):
        raise SpecError(f"{key!r} must be a string of at most {_MAX_TEXT} characters, got {v!r:.120}")
    return v


def _file_name(name: Any, what: str) -> str:
    """``name`` if it is a relative file name without ``..`` (the runner checks it again); else SpecError."""
    if not isinstance(name, str) or not name or len(name) > _MAX_TEXT:
        raise SpecError(f"{what} must be a non-empty string of at most {_MAX_TEXT} characters, got {name!r:.120}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise SpecError(f"{what} {name!r:.120} holds a control character")
    if name.startswith("/"):
        raise SpecError(f"{what} {name!r:.120} is absolute: name it relative to the task's working directory")
    if ".." in name.split("/"):
        raise SpecError(f"{what} {name!r:.120} contains '..': a task's files stay inside its working directory")
    return name


def _files(files: Any) -> dict[str, str]:
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise SpecError(f"'files' must map at most {MAX_FILES} file names to base64 text, got {type(files).__name__}")
    text_total = content_total = 0
    for name, text in files.items():
        _file_name(name, "'files' name")
        if not isinstance(text, str):
            raise SpecError(f"'files' {name!r:.120}: the content must be base64 text, got {type(text).__name__}")
        # Each file's padding aside, the text is bounded before any of it is decoded.
        text_total += len(text)
        if text_total > MAX_FILES_TEXT + 4 * len(files):
            raise SpecError(f"'files' hold more than {MAX_FILES_BYTES} bytes of content")
        try:
            content_total += len(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise SpecError(f"'files' {name!r:.120}: the content is not base64") from None
        if content_total > MAX_FILES_BYTES:
            raise SpecError(f"'files' hold more than {MAX_FILES_BYTES} bytes of content")
    return dict(files)


def check_spec(spec: Any) -> dict[str, Any]:
    """A submitted task spec, checked and normalized; raises :class:`SpecError` naming what is wrong.

    The coordinator checks the limits again when the task starts.
    """
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise SpecError(f"a task spec must be a map with string keys, got {type(spec).__name__}")
    unknown = sorted(k for k in spec if k not in _SPEC_KEYS)
    if unknown:
        raise SpecError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_SPEC_KEYS))}")
    out: dict[str, Any] = {}
    cmd, argv = spec.get("cmd"), spec.get("argv")
    if (cmd is None) == (argv is None):
        raise SpecError("give exactly one of 'cmd' (a bash command line) and 'argv' (a program and its arguments)")
    if cmd is not None:
        if not isinstance(cmd, str) or not cmd.strip() or len(cmd) > 65536:
            raise SpecError(f"'cmd' must be a non-empty string of at most 65536 characters, got {cmd!r:.120}")
        out["cmd"] = cmd
    else:
        if (
            not isinstance(argv, list)
            or not argv
            or len(argv) > 4096
            or not all(isinstance(a, str) and len(a) <= 65536 for a in argv)
        ):
            raise SpecError(f"'argv' must be a non-empty list of strings, got {argv!r:.120}")
        out["argv"] = list(argv)
    for key in ("require", "want"):
        tags = _tags(spec, key)
        if tags:
            out[key] = tags
    after = spec.get("after", [])
    if not isinstance(after, list) or len(after) > 10_000 or not all(type(a) is int and a >= 1 for a in after):
        raise SpecError(f"'after' must be a list of task ids, got {after!r:.120}")
    if after:
        out["after"] = list(dict.fromkeys(after))
    for key in ("name", "job", "cwd"):
        v = _opt_text(spec, key)
        if v is not None:
            out[key] = v
    retries = spec.get("retries", 0)
    if type(retries) is not int or not 0 <= retries <= 100:
        raise SpecError(f"'retries' must be an int from 0 to 100, got {retries!r:.120}")
    if retries:
        out["retries"] = retries
    timeout = spec.get("timeout")
    if timeout is not None:
        if type(timeout) not in (int, float) or not (math.isfinite(timeout) and timeout > 0):
            raise SpecError(f"'timeout' must be a positive number of seconds, got {timeout!r:.120}")
        out["timeout"] = float(timeout)
    env = spec.get("env")
    if env is not None:
        if (
            not isinstance(env, dict)
            or len(env) > 1024
            or not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items())
        ):
            raise SpecError(f"'env' must map variable names to strings, got {env!r:.120}")
        out["env"] = dict(env)
    limits = spec.get("limits")
    if limits is not None:
        if not isinstance(limits, dict) or not all(k in _LIMIT_KEYS for k in limits):
            raise SpecError(
                f"'limits' must be a map with keys among {', '.join(sorted(_LIMIT_KEYS))}, got {limits!r:.120}"
            )
        bad = [k for k, v in limits.items() if v is not None and type(v) not in (int, float, str)]
        if bad:
            raise SpecError(f"'limits' {bad[0]!r} must be a number or a string, got {limits[bad[0]]!r:.120}")
        out["limits"] = dict(limits)
    if spec.get("files") is not None:
        out["files"] = _files(spec["files"])
    results = spec.get("results")
    if results is not None:
        if not isinstance(results, list) or len(results) > MAX_FILES:
            raise SpecError(f"'results' must be a list of at most {MAX_FILES} names or globs, got {results!r:.120}")
        out["results"] = [_file_name(r, "'results' entry") for r in results]
    for key in ("stdout", "stderr"):
        if spec.get(key) is not None:
            out[key] = _file_name(spec[key], repr(key))
    if ("files" in out or "results" in out) and "cwd" in out:
        raise SpecError("a task with 'files' or 'results' runs in a working directory of its own: leave 'cwd' unset")
    return out
