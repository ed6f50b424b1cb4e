"""The node stdio protocol, as values and pure functions: no process, no I/O.

Theory of operation
-------------------
A node is a process started from the user's node command. It speaks the
node stdio protocol (version 1, ``docs/protocol.md``): JSON objects, one per
line, on its stdin and stdout; its stderr is its log. The node first writes
``{"type": "ready", "protocol": 1, ...}``; after that the host writes one
``task`` line at a time and reads exactly one ``result`` or ``error`` line
back, and finally writes ``{"type":"exit"}``.

This module holds what that exchange means, so that it can be tested
without processes: :class:`TaskRequest` and :class:`TaskOutcome`,
:func:`task_line` (the line sent for a task), :func:`parse_ready` (what a
ready line says), :func:`judge_answer` (the outcome an answer line stands
for) and :class:`LineBuffer` (bytes in, bounded lines out).
:mod:`tasksprint.node_process` drives one process with them and
:mod:`tasksprint.node_pool` keeps several.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "DEFAULT_MAX_LINE",
    "EXIT_LINE",
    "PROTOCOL_VERSION",
    "READY_LINE",
    "FailureKind",
    "LineBuffer",
    "LineTooLong",
    "MAX_OUTPUT_DEPTH",
    "NodeProtocolError",
    "TaskOutcome",
    "TaskRequest",
    "check_int",
    "check_seconds",
    "is_int",
    "judge_answer",
    "parse_json",
    "parse_ready",
    "plain_json_problem",
    "quote",
    "task_line",
]

#: The version of the node stdio protocol this host speaks.
PROTOCOL_VERSION = 1

#: Longest line (bytes) accepted from a node; one task's outputs travel as one line.
#: Well below the frame cap (64 MiB), so outputs a node may write can always
#: be fetched by a peer (the client also checks their encoded size).
DEFAULT_MAX_LINE = 32 * 1024 * 1024

#: Deepest nesting of lists and objects in a node's outputs.  Outputs travel
#: inside messages whose decoder follows 64 levels at most.
MAX_OUTPUT_DEPTH = 32

#: Integers a node's outputs may hold: what every peer and node decodes as a plain number.
MIN_OUTPUT_INT = -(2**63)
MAX_OUTPUT_INT = 2**64 - 1

#: The line that asks an idle node to exit.
EXIT_LINE = b'{"type":"exit"}\n'

#: The ready line, as error messages name it.
READY_LINE = f'the ready line {{"type": "ready", "protocol": {PROTOCOL_VERSION}}}'

# How much of a node's bad output an error message quotes.
_QUOTE_CHARS = 200


class FailureKind(enum.Enum):
    """Why a task did not produce outputs."""

    #: The node ran the task and reported an error (the task's code raised).
    TASK_ERROR = "task_error"
    #: The node process exited or closed its stdout while running the task.
    CRASHED = "crashed"
    #: The node wrote something that is not a valid answer to the task.
    PROTOCOL = "protocol"
    #: The task ran past its timeout.
    TIMEOUT = "timeout"
    #: The task was cancelled (:meth:`NodePool.cancel`).
    CANCELLED = "cancelled"
    #: No node process could be started to run the task.
    START_FAILED = "start_failed"
    #: The pool was closing or closed.
    CLOSED = "closed"


class NodeProtocolError(Exception):
    """A node's ready line is not one this host can work with; the message says why."""


class LineTooLong(Exception):
    """More bytes than the line limit arrived without a newline."""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool (JSON true is not a task id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``value`` is an int and not a bool."""
    if not is_int(value):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")


def check_seconds(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: ``value`` is a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _check_timeout(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        check_seconds(instance, attribute, value)


@attrs.frozen(kw_only=True)
class TaskRequest:
    """One task for a node, with its inputs already selected by the task's prekeys."""

    tid: int = attrs.field(validator=check_int)
    attempt: int = attrs.field(validator=check_int)
    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: Dependency values in pretask order.
    inputs: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    args: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    kwargs: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    seed: int = attrs.field(validator=check_int)
    #: Seconds the task may run before its node is killed; None for no limit.
    timeout: float | None = attrs.field(default=None, validator=_check_timeout)

    def describe(self) -> str:
        """``task TID (NAME)``, for messages."""
        return f"task {self.tid} ({self.name})"


@attrs.frozen(kw_only=True)
class TaskOutcome:
    """How a task ended: ``outputs`` when ``ok``, else ``failure`` and ``error``."""

    tid: int = attrs.field(validator=check_int)
    attempt: int = attrs.field(validator=check_int)
    ok: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    outputs: dict[str, Any] | None = None
    failure: FailureKind | None = None
    error: str = ""
    #: The node's traceback for a TASK_ERROR, when it sent one.
    traceback: str = ""
    #: Seconds from writing the task to the node to its answer (0 if no node ran it).
    seconds: float = attrs.field(default=0.0, eq=False)

    def __attrs_post_init__(self) -> None:
        # Invariant: exactly one of (outputs) and (failure, error) describes the outcome.
        if self.ok:
            assert isinstance(self.outputs, dict) and self.failure is None, self
        else:
            assert self.outputs is None and isinstance(self.failure, FailureKind) and self.error, self

    @classmethod
    def success(cls, task: TaskRequest, outputs: dict[str, Any]) -> TaskOutcome:
        """The outcome of ``task`` that produced ``outputs``."""
        return cls(tid=task.tid, attempt=task.attempt, ok=True, outputs=outputs)

    @classmethod
    def failed(cls, task: TaskRequest, failure: FailureKind, error: str, traceback: str = "") -> TaskOutcome:
        """The outcome of ``task`` that failed for ``failure``, explained by ``error``."""
        return cls(tid=task.tid, attempt=task.attempt, ok=False, failure=failure, error=error, traceback=traceback)


def quote(raw: bytes | bytearray) -> str:
    """A node's output for an error message: decoded, cut to a bounded length, quoted."""
    text = bytes(raw).decode("utf-8", errors="replace")
    if len(text) > _QUOTE_CHARS:
        text = text[:_QUOTE_CHARS] + "..."
    return repr(text)


def task_line(task: TaskRequest) -> bytes:
    """The task message as one protocol line.

    Raises:
        ValueError: an input or argument cannot be written as JSON.
    """
    message = {
        "type": "task",
        "id": task.tid,
        "attempt": task.attempt,
        "name": task.name,
        "inputs": list(task.inputs),
        "args": list(task.args),
        "kwargs": dict(task.kwargs),
        "seed": task.seed,
    }
    try:
        # allow_nan=False: NaN is not JSON, and nodes in other languages could not read it.
        text = json.dumps(message, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{task.describe()} has inputs or arguments that are not JSON: {exc}") from exc
    return text.encode("utf-8") + b"\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(line: bytes) -> Any:
    """A line of strict JSON (no NaN or Infinity), however hostile.

    Raises:
        ValueError: the line is not JSON, holds NaN or Infinity, or nests
            too deeply for the parser; the message says which.
    """
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("it is nested too deeply to parse") from None


def plain_json_problem(value: Any, what: str = "value", max_depth: int = MAX_OUTPUT_DEPTH) -> str | None:
    """Why ``value`` is not plain JSON data a task may exchange, or None when it is.

    Plain data is None, bool, str, a finite float, an int in 64 bits, and
    lists and string-keyed objects of them, nested at most ``max_depth``
    deep.  Walks the value without recursion, so any input is safe to check.
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, what)]
    while stack:
        item, depth, where = stack.pop()
        if item is None or isinstance(item, (bool, str)):
            continue
        if isinstance(item, int):
            if not MIN_OUTPUT_INT <= item <= MAX_OUTPUT_INT:
                return f"{where} holds an integer outside 64 bits"
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{where} holds {item!r}, which JSON cannot carry"
            continue
        if isinstance(item, (list, tuple, dict)):
            if depth >= max_depth:
                return f"{where} is nested more than {max_depth} levels deep"
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        return f"{where} has a key that is not a string ({type(key).__name__})"
                    stack.append((sub, depth + 1, f"{where}[{key[:40]!r}]"))
            else:
                stack.extend((sub, depth + 1, f"{where}[{i}]") for i, sub in enumerate(item))
            continue
        return f"{where} holds a {type(item).__name__}, which is not JSON"
    return None


def _json_object(line: bytes) -> dict[str, Any] | None:
    try:
        message = parse_json(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def parse_ready(line: bytes) -> str:
    """What the node's first line says it was written with (``python``, ``js``, ``unknown``).

    Raises:
        NodeProtocolError: the line is not a ready line, or announces
            another protocol version. The message reads on from the node
            command's name (``wrote ... instead of the ready line``).
    """
    message = _json_object(line)
    if message is None or message.get("type") != "ready":
        raise NodeProtocolError(f"wrote {quote(line)} instead of {READY_LINE}")
    if message.get("protocol") != PROTOCOL_VERSION:
        raise NodeProtocolError(
            f"speaks node protocol {message.get('protocol')!r}, but this client speaks "
            f"protocol {PROTOCOL_VERSION}; use a node SDK for protocol {PROTOCOL_VERSION}"
        )
    sdk = message.get("sdk")
    return sdk if isinstance(sdk, str) else "unknown"


def judge_answer(task: TaskRequest, line: bytes) -> TaskOutcome:
    """The outcome the node's answer ``line`` to ``task`` stands for.

    Returns:
        Success with the node's outputs; TASK_ERROR with the node's error
        and traceback; or PROTOCOL when the line is not a valid answer to
        this task (the node can no longer be trusted, and its driver kills it).
    """
    try:
        parsed = parse_json(line)
    except ValueError as exc:
        return _violation(
            task,
            f"node wrote invalid output while running {task.describe()}: {quote(line)} (not JSON: {_short(exc)})",
        )
    message = parsed if isinstance(parsed, dict) else None
    kind = message.get("type") if message is not None else None
    if message is None or kind not in ("result", "error"):
        return _violation(task, f"node wrote invalid output while running {task.describe()}: {quote(line)}")
    tid, attempt = message.get("id"), message.get("attempt")
    if not (is_int(tid) and is_int(attempt)) or (tid, attempt) != (task.tid, task.attempt):
        return _violation(
            task,
            f"node answered task {tid!r} attempt {attempt!r} while running {task.describe()} "
            f"attempt {task.attempt}: {quote(line)}",
        )
    if kind == "result":
        outputs = message.get("outputs")
        if not isinstance(outputs, dict):
            return _violation(
                task, f"node answered {task.describe()} with outputs that are not a JSON object: {quote(line)}"
            )
        problem = plain_json_problem(outputs, "outputs")
        if problem is not None:
            return _violation(task, f"node answered {task.describe()} with outputs that are not plain JSON: {problem}")
        return TaskOutcome.success(task, outputs)
    error, trace = message.get("error"), message.get("traceback", "")
    if not isinstance(error, str) or not isinstance(trace, str):
        return _violation(
            task,
            f"node answered {task.describe()} with an error whose error or traceback is not a string: {quote(line)}",
        )
    return TaskOutcome.failed(task, FailureKind.TASK_ERROR, error or f"{task.describe()} failed", trace)


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."


def _violation(task: TaskRequest, error: str) -> TaskOutcome:
    return TaskOutcome.failed(task, FailureKind.PROTOCOL, error)


class LineBuffer:
    """Bytes from a node's stdout, cut into lines no longer than ``max_line``.

    Feed it with :meth:`feed`; take lines with :meth:`next_line`.
    """

    __slots__ = ("_buffer", "_max_line", "_scanned")

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        # Bytes of _buffer already searched for a newline.
        self._scanned = 0

    @property
    def max_line(self) -> int:
        """The longest line accepted, in bytes."""
        return self._max_line

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete line."""
        return bytes(self._buffer)

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes the node wrote."""
        self._buffer += data

    def next_line(self) -> bytes | None:
        """Take the next complete line, without its newline; None if it has not all arrived.

        Raises:
            LineTooLong: more than ``max_line`` bytes arrived without a newline.
        """
        end = self._buffer.find(b"\n", self._scanned)
        if end >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            return line
        self._scanned = len(self._buffer)
        if self._scanned > self._max_line:
            raise LineTooLong
        return None
