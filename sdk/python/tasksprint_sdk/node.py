"""Write a TaskSprint node in Python: subclass :class:`Node`, one method per task.

Theory of operation
-------------------
A node is a long-lived process that the TaskSprint client starts and talks to
over its standard input and output, one JSON object per line (the node stdio
protocol, version 1, documented in ``docs/protocol.md``)::

    node   -> client   {"type": "ready", "protocol": 1, "sdk": "python"}
    client -> node     {"type": "task", "id": 7, "attempt": 0, "name": "merge",
                        "inputs": [...], "args": [...], "kwargs": {...}, "seed": 42}
    node   -> client   {"type": "result", "id": 7, "attempt": 0, "outputs": {...}}
                   or  {"type": "error", "id": 7, "attempt": 0, "error": "...",
                        "traceback": "..."}
    client -> node     {"type": "exit"}

:meth:`Node.start` runs that loop. Each task is dispatched to the method of
the same name, called as ``method(*inputs, *args, **kwargs)``; the method
returns a dict of outputs. Tasks run one at a time.

Stdout belongs to the protocol, so while the loop runs, anything else the
process writes to standard output -- ``print()``, a library, even a child
process -- is sent to standard error, which is the node's log.

Replicated tasks must draw the same random numbers wherever they run, so
before every task both ``self.random`` and the global :mod:`random` module are
seeded with the task's seed.

This module uses only the standard library and can be copied on its own into
any project that needs a node.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

__all__ = ["Node", "timeout", "PROTOCOL_VERSION", "TIMEOUT_SCALE_ENV"]

#: The version of the node stdio protocol this SDK speaks.
PROTOCOL_VERSION = 1

#: Environment variable that multiplies every :func:`timeout` duration.
TIMEOUT_SCALE_ENV = "TASKSPRINT_TIMEOUT_SCALE"

# How much of a bad client line to quote in the node's log.
_QUOTE_CHARS = 200

_F = TypeVar("_F", bound=Callable[..., Any])


def _timeout_scale() -> float:
    """The factor from ``TASKSPRINT_TIMEOUT_SCALE`` (default 1).

    Raises:
        ValueError: the variable is set to something that is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        scale = float(raw)
    except ValueError:
        scale = float("nan")
    if not scale > 0 or scale == float("inf"):
        raise ValueError(
            f"{TIMEOUT_SCALE_ENV}={raw!r} is not a positive number; set it to a factor such as 0.1 or unset it"
        )
    return scale


def timeout(seconds: float) -> Callable[[_F], _F]:
    """Decorate a function so that it raises :class:`TimeoutError` after ``seconds``.

    The limit is wall-clock time, multiplied by ``TASKSPRINT_TIMEOUT_SCALE``
    (read at each call). The error is raised inside the running function, so
    an endless loop is interrupted and the caller can catch the error and use
    whatever the function computed so far.

    Nested use: when an enclosing :func:`timeout` would expire first, the
    enclosing deadline stays in force and it is the enclosing one that fires.
    The previous ``SIGALRM`` handler and timer are restored on return, minus
    the time spent.

    It works with ``SIGALRM`` and ``setitimer``, so only in the main thread
    of a POSIX process.

    Args:
        seconds: the limit, a positive number of seconds.

    Returns:
        A decorator.

    Raises:
        ValueError: ``seconds`` is not a positive number (at decoration time),
            or ``TASKSPRINT_TIMEOUT_SCALE`` is malformed (at call time).
        RuntimeError: the decorated function is called outside the main
            thread or on a platform without ``SIGALRM``.
        TimeoutError: from the decorated function, when the limit passes.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"timeout(seconds) needs a positive number of seconds, got {seconds!r}")

    def decorate(function: _F) -> _F:
        @functools.wraps(function)
        def limited(*args: Any, **kwargs: Any) -> Any:
            if not hasattr(signal, "setitimer"):
                raise RuntimeError("@timeout needs SIGALRM and setitimer, which this platform lacks")
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    f"@timeout on {function.__qualname__} works only in the main thread "
                    "(it uses SIGALRM); call the function from the main thread"
                )
            limit = seconds * _timeout_scale()
            outer_remaining, outer_interval = signal.getitimer(signal.ITIMER_REAL)
            if 0 < outer_remaining <= limit:
                # The enclosing deadline comes first; leave its timer and handler in charge.
                return function(*args, **kwargs)

            def expire(signum: int, frame: Any) -> None:
                raise TimeoutError(f"{function.__qualname__} ran longer than its timeout of {limit:g} s")

            started = time.monotonic()
            previous = signal.signal(signal.SIGALRM, expire)
            try:
                signal.setitimer(signal.ITIMER_REAL, limit)
                return function(*args, **kwargs)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                if outer_remaining > 0:
                    left = outer_remaining - (time.monotonic() - started)
                    # An enclosing deadline that passed meanwhile must still fire, right away.
                    signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), outer_interval)

        return limited  # type: ignore[return-value]

    return decorate


class _BadTask(Exception):
    """A task message from the client that cannot be run as it is."""


class Node:
    """Base class of a Python node: each public method is a task of that name.

    Subclass it, define one method per task that returns a dict of outputs,
    and call :meth:`start`. Methods are called as
    ``method(*inputs, *args, **kwargs)`` where ``inputs`` are the outputs of
    the task's pretasks, in order. Names starting with ``_`` and the names
    of this base class (``start``, ``random``) are not tasks.

    Attributes:
        random: a :class:`random.Random` seeded with the current task's seed.
            The global :mod:`random` module is seeded with the same seed.
    """

    random: random.Random

    def start(self) -> None:
        """Serve tasks on stdin/stdout until the client sends ``exit`` or closes stdin.

        Writes the ``ready`` line, then answers each task line with exactly
        one ``result`` or ``error`` line. A malformed line from the client is
        reported on stderr and skipped. While this runs, everything else
        written to standard output goes to standard error.

        Returns:
            None, when the client asked the node to exit or closed stdin;
            a script that ends after ``start()`` then exits with status 0.
        """
        stdin = sys.stdin.buffer
        channel, restore = _claim_stdout()
        try:
            self._send(channel, {"type": "ready", "protocol": PROTOCOL_VERSION, "sdk": "python"})
            while True:
                raw = stdin.readline()
                if not raw:
                    return
                line = raw.strip()
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    _log(f"ignoring a line from the client that is not JSON: {_quote(line)}")
                    continue
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "exit":
                    return
                if kind != "task":
                    _log(f"ignoring a line from the client that is not a task: {_quote(line)}")
                    continue
                answer = self._answer(message, line)
                if answer is not None:
                    channel.write(_encode_answer(answer, message.get("name")))
                    channel.flush()
        finally:
            restore()

    def _answer(self, message: dict[str, Any], line: bytes) -> dict[str, Any] | None:
        """The answer to one task message, or None when it cannot be answered."""
        tid, attempt = message.get("id"), message.get("attempt")
        if not (_is_int(tid) and _is_int(attempt)):
            # Without an id there is no way to answer; the client's task timeout covers it.
            _log(f"ignoring a task without an integer id and attempt: {_quote(line)}")
            return None
        header = {"id": tid, "attempt": attempt}
        try:
            name, inputs, args, kwargs, seed = _parse_task(message)
        except _BadTask as exc:
            return {"type": "error", **header, "error": f"malformed task message: {exc}", "traceback": ""}
        method = self._task_method(name)
        if method is None:
            return {"type": "error", **header, "error": f"unknown task {name}", "traceback": ""}

        self.random = random.Random(seed)
        random.seed(seed)
        saved_stdout = sys.stdout
        # print() in a task must not interleave with protocol lines.
        sys.stdout = sys.stderr
        try:
            outputs = method(*inputs, *args, **kwargs)
        except Exception as exc:
            return {
                "type": "error",
                **header,
                "error": _describe(exc),
                # Skip this frame: the user's code is what the traceback is for.
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)),
            }
        finally:
            sys.stdout.flush()
            sys.stdout = saved_stdout

        if not isinstance(outputs, dict):
            problem = f"task {name} must return a dict of outputs, got {type(outputs).__name__}"
            return {"type": "error", **header, "error": problem, "traceback": ""}
        bad_keys = [key for key in outputs if not isinstance(key, str)]
        if bad_keys:
            problem = f"task {name} returned output keys that are not strings: {bad_keys[:5]!r}"
            return {"type": "error", **header, "error": problem, "traceback": ""}
        return {"type": "result", **header, "outputs": outputs}

    def _task_method(self, name: str) -> Callable[..., Any] | None:
        """The bound method serving task ``name``, or None when there is none."""
        if name.startswith("_") or name in _RESERVED:
            return None
        method = getattr(self, name, None)
        return method if callable(method) else None

    @staticmethod
    def _send(channel: BinaryIO, message: dict[str, Any]) -> None:
        channel.write(_encode(message))
        channel.flush()


# Public names of the base class are its own API, never tasks.
_RESERVED = frozenset(name for name in dir(Node) if not name.startswith("_")) | {"random"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_task(message: dict[str, Any]) -> tuple[str, list[Any], list[Any], dict[str, Any], int]:
    """Check a task message's fields.

    Returns:
        (name, inputs, args, kwargs, seed).

    Raises:
        _BadTask: a field is missing or has the wrong type.
    """
    name = message.get("name")
    if not isinstance(name, str):
        raise _BadTask(f"name must be a string, got {name!r}")
    inputs = message.get("inputs", [])
    args = message.get("args", [])
    kwargs = message.get("kwargs", {})
    seed = message.get("seed", 0)
    if not isinstance(inputs, list):
        raise _BadTask(f"inputs must be a list, got {type(inputs).__name__}")
    if not isinstance(args, list):
        raise _BadTask(f"args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise _BadTask(f"kwargs must be an object, got {type(kwargs).__name__}")
    if not _is_int(seed):
        raise _BadTask(f"seed must be an integer, got {seed!r}")
    return name, inputs, args, kwargs, seed


def _encode(message: dict[str, Any]) -> bytes:
    """One protocol line. Raises TypeError/ValueError for values JSON cannot hold."""
    # allow_nan=False: NaN and Infinity are not JSON, and nodes in other languages must parse our lines.
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _encode_answer(answer: dict[str, Any], name: Any) -> bytes:
    """``answer`` as a protocol line, or an error answer when its outputs are not JSON."""
    try:
        return _encode(answer)
    except (TypeError, ValueError) as exc:
        problem = f"task {name} returned outputs that are not JSON: {exc}"
        return _encode(
            {
                "type": "error",
                "id": answer["id"],
                "attempt": answer["attempt"],
                "error": problem,
                "traceback": "",
            }
        )


def _claim_stdout() -> tuple[BinaryIO, Callable[[], None]]:
    """Keep the real standard output for protocol lines and point fd 1 at stderr.

    Moving file descriptor 1 (not just ``sys.stdout``) also catches output
    from C extensions and child processes.

    Returns:
        (binary channel for protocol lines, function that undoes the change).
    """
    sys.stdout.flush()
    try:
        stdout_fd = sys.stdout.fileno()
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        # Standard streams replaced by objects without descriptors (embedded
        # interpreters): only sys.stdout can be protected, during tasks.
        return sys.stdout.buffer, lambda: None
    kept = os.dup(stdout_fd)
    os.dup2(stderr_fd, stdout_fd)
    channel = os.fdopen(kept, "wb")

    def restore() -> None:
        sys.stdout.flush()
        channel.flush()
        os.dup2(kept, stdout_fd)
        channel.close()

    return channel, restore


def _describe(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:
        # A broken __str__ must not take the node down with it.
        detail = "(the exception's message could not be formatted)"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _quote(line: bytes) -> str:
    text = line.decode("utf-8", errors="replace")
    if len(text) > _QUOTE_CHARS:
        text = text[:_QUOTE_CHARS] + "..."
    return repr(text)


def _log(text: str) -> None:
    print(f"tasksprint node: {text}", file=sys.stderr, flush=True)
