"""Tests of tasksprint.node_protocol: the node stdio protocol without processes.

One test per rule of docs/protocol.md that the host enforces: the task line
it writes, the ready line it accepts, and the outcome each answer line
stands for. The node process and pool tests check the same rules against
real processes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tasksprint.node_protocol import (
    EXIT_LINE,
    PROTOCOL_VERSION,
    FailureKind,
    LineBuffer,
    LineTooLong,
    NodeProtocolError,
    TaskOutcome,
    TaskRequest,
    judge_answer,
    parse_ready,
    task_line,
)


def request(
    tid: int,
    name: str,
    *args: Any,
    attempt: int = 0,
    timeout: float | None = None,
    inputs: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> TaskRequest:
    return TaskRequest(
        tid=tid, attempt=attempt, name=name, inputs=inputs, args=args, kwargs=kwargs or {}, seed=seed, timeout=timeout
    )


def line(**message: Any) -> bytes:
    return json.dumps(message).encode()


TASK = request(5, "work", attempt=2)


# --- The task line ----------------------------------------------------------------------------


def test_task_line_is_one_compact_json_object_and_a_newline():
    task = request(3, "echo", 1, "two", inputs=({"a": [1]},), kwargs={"k": None}, seed=9, attempt=1)
    raw = task_line(task)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and b" " not in raw
    assert json.loads(raw) == {
        "type": "task",
        "id": 3,
        "attempt": 1,
        "name": "echo",
        "inputs": [{"a": [1]}],
        "args": [1, "two"],
        "kwargs": {"k": None},
        "seed": 9,
    }


def test_task_line_escapes_newlines_inside_strings():
    assert task_line(request(1, "x", "a\nb")).count(b"\n") == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object(), {1: "non-string key"}.keys()])
def test_task_line_refuses_what_is_not_json(bad):
    with pytest.raises(ValueError, match=r"task 1 \(x\) has inputs or arguments that are not JSON"):
        task_line(request(1, "x", bad))


def test_exit_line_is_the_documented_one():
    assert json.loads(EXIT_LINE) == {"type": "exit"} and EXIT_LINE.endswith(b"\n")


# --- The ready line ---------------------------------------------------------------------------


def test_ready_line_names_the_sdk():
    assert parse_ready(line(type="ready", protocol=PROTOCOL_VERSION, sdk="js")) == "js"
    assert parse_ready(line(type="ready", protocol=PROTOCOL_VERSION)) == "unknown"
    assert parse_ready(line(type="ready", protocol=PROTOCOL_VERSION, sdk=5)) == "unknown"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"hello there", "wrote 'hello there' instead of the ready line"),
        (b"[1, 2]", "instead of the ready line"),
        (line(type="result"), "instead of the ready line"),
        (line(type="ready", protocol=2), "speaks node protocol 2, but this client speaks protocol 1"),
        (line(type="ready"), "speaks node protocol None"),
        (b"x" * 10_000, "..."),
    ],
)
def test_anything_but_a_ready_line_of_this_version_is_refused(raw, expected):
    with pytest.raises(NodeProtocolError) as raised:
        parse_ready(raw)
    assert expected in str(raised.value)
    assert len(str(raised.value)) < 400  # bad output is quoted, never at unbounded length


# --- Judging an answer ------------------------------------------------------------------------


def test_a_result_for_this_task_and_attempt_is_a_success():
    outcome = judge_answer(TASK, line(type="result", id=5, attempt=2, outputs={"x": [1]}))
    assert outcome == TaskOutcome.success(TASK, {"x": [1]})


def test_an_error_answer_is_a_task_error_with_its_traceback():
    outcome = judge_answer(TASK, line(type="error", id=5, attempt=2, error="ValueError: no", traceback="tb"))
    assert (outcome.failure, outcome.error, outcome.traceback) == (FailureKind.TASK_ERROR, "ValueError: no", "tb")
    empty = judge_answer(TASK, line(type="error", id=5, attempt=2, error=""))
    assert (empty.failure, empty.error, empty.traceback) == (FailureKind.TASK_ERROR, "task 5 (work) failed", "")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"garbage " * 100, "node wrote invalid output while running task 5 (work): 'garbage garbage"),
        (b"", "node wrote invalid output while running task 5 (work): ''"),
        (b"[1]", "node wrote invalid output"),
        (line(type="progress", id=5, attempt=2), "node wrote invalid output while running task 5 (work): '{"),
        (
            line(type="result", id=6, attempt=2, outputs={}),
            "node answered task 6 attempt 2 while running task 5 (work) attempt 2: '{",
        ),
        (
            line(type="result", id=5, attempt=1, outputs={}),
            "node answered task 5 attempt 1 while running task 5 (work) attempt 2",
        ),
        (line(type="result", id=True, attempt=2, outputs={}), "node answered task True attempt 2"),
        (line(type="result", id=5, outputs={}), "node answered task 5 attempt None"),
        (
            line(type="result", id=5, attempt=2, outputs=[1, 2]),
            "node answered task 5 (work) with outputs that are not a JSON object",
        ),
        (line(type="result", id=5, attempt=2), "node answered task 5 (work) with outputs that are not a JSON object"),
        (line(type="error", id=5, attempt=2, error=5), "node answered task 5 (work) with an error whose"),
        (
            line(type="error", id=5, attempt=2, error="e", traceback=[]),
            "node answered task 5 (work) with an error whose",
        ),
    ],
)
def test_anything_but_a_valid_answer_to_this_task_is_a_protocol_failure(raw, expected):
    outcome = judge_answer(TASK, raw)
    assert outcome.failure is FailureKind.PROTOCOL, outcome
    assert outcome.error.startswith(expected), outcome.error
    assert len(outcome.error) < 400


# --- Lines ------------------------------------------------------------------------------------


def test_line_buffer_cuts_lines_as_they_arrive():
    lines = LineBuffer(max_line=100)
    assert lines.next_line() is None
    lines.feed(b"first\nsec")
    assert lines.next_line() == b"first"
    assert lines.next_line() is None and lines.pending == b"sec"
    lines.feed(b"ond\n\nthird")
    assert lines.next_line() == b"second"
    assert lines.next_line() == b""
    assert lines.next_line() is None and lines.pending == b"third"


def test_line_buffer_refuses_a_line_over_the_limit_without_a_newline():
    lines = LineBuffer(max_line=10)
    lines.feed(b"x" * 10)
    assert lines.next_line() is None
    lines.feed(b"x")
    with pytest.raises(LineTooLong):
        lines.next_line()
    assert lines.max_line == 10


def test_line_buffer_accepts_a_long_line_once_its_newline_is_there():
    # The limit bounds what is buffered while waiting for a newline, as a node's stdout arrives.
    lines = LineBuffer(max_line=10)
    lines.feed(b"y" * 30 + b"\n")
    assert lines.next_line() == b"y" * 30


# --- Values -----------------------------------------------------------------------------------


def test_task_request_and_outcome_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="timeout"):
        request(1, "x", timeout=0)
    with pytest.raises(TypeError, match="tid"):
        TaskRequest(tid="1", attempt=0, name="x", seed=0)
    with pytest.raises(TypeError, match="seed"):
        TaskRequest(tid=1, attempt=0, name="x", seed=True)
    task = request(1, "x")
    assert TaskOutcome.success(task, {"a": 1}).ok
    with pytest.raises(AssertionError):
        TaskOutcome(tid=1, attempt=0, ok=False)
    with pytest.raises(AssertionError):
        TaskOutcome(tid=1, attempt=0, ok=True, outputs={}, failure=FailureKind.CRASHED)
