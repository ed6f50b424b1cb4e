"""The node SDKs (Python and JavaScript) speak the node stdio protocol.

Nodes run as real subprocesses: the tests write JSON lines to their stdin,
close it, and check every line the node wrote to stdout. The ``@timeout``
decorator is also checked in-process, where its signal handling can be seen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tasksprint_sdk import node as node_sdk
from tasksprint_sdk.node import timeout

REPO = Path(__file__).resolve().parent.parent
MONTECARLO = REPO / "examples" / "montecarlo" / "node.py"
JS_SDK = REPO / "sdk" / "js" / "tasksprint.js"
JS_EXAMPLE = REPO / "examples" / "js" / "node.js"
NODE_JS = shutil.which("node")
needs_node_js = pytest.mark.skipif(
    NODE_JS is None, reason="Node.js (`node`) is not on PATH; the JavaScript SDK cannot run"
)

# Generous: a node answers these in well under a second.
PROCESS_LIMIT = 60
# A loop that a working @timeout interrupts long before this many seconds.
SPIN_LIMIT = 30


def task(tid: int, name: str, *, inputs=(), args=(), kwargs=None, seed: int = 0, attempt: int = 0) -> dict[str, Any]:
    return {
        "type": "task",
        "id": tid,
        "attempt": attempt,
        "name": name,
        "inputs": list(inputs),
        "args": list(args),
        "kwargs": kwargs or {},
        "seed": seed,
    }


def converse(argv: list[str], lines: list[Any], **env: str) -> tuple[list[dict[str, Any]], str, int]:
    """Feed ``lines`` (dicts are sent as JSON) to a node, close its stdin, collect what it wrote.

    Returns:
        (stdout lines parsed as JSON -- every one must be --, stderr text, exit status).
    """
    text = "".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines)
    done = subprocess.run(
        argv, input=text, capture_output=True, text=True, timeout=PROCESS_LIMIT, env={**os.environ, **env}
    )
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    return messages, done.stderr, done.returncode


def python_node(tmp_path: Path, body: str) -> list[str]:
    """A node script of class TestNode(Node) with ``body`` as its class body."""
    script = tmp_path / "test_node.py"
    script.write_text(
        "import os, random, subprocess, sys, time\n"
        "from tasksprint_sdk.node import Node, timeout\n\n"
        "class TestNode(Node):\n"
        + "".join(f"    {line}\n" for line in body.strip("\n").splitlines())
        + "\nTestNode().start()\n"
    )
    return [sys.executable, str(script)]


READY_PY = {"type": "ready", "protocol": 1, "sdk": "python"}

DRAWS = """
def draw(self, count):
    return {"global": [random.random() for _ in range(count)],
            "own": [self.random.random() for _ in range(count)]}
"""


# --- Python SDK over stdio --------------------------------------------------------------


def test_ready_first_and_exit_status_zero_at_end_of_input(tmp_path: Path) -> None:
    messages, _, status = converse(python_node(tmp_path, DRAWS), [])
    assert messages == [READY_PY]
    assert status == 0


def test_montecarlo_example_counts_and_merges() -> None:
    mc = [sys.executable, str(MONTECARLO)]
    messages, stderr, status = converse(
        mc,
        [task(1, "montecarlo", seed=1), task(2, "montecarlo", seed=2)],
        TASKSPRINT_TIMEOUT_SCALE="0.02",
    )
    assert status == 0, stderr
    assert messages[0] == READY_PY
    results = []
    for tid, answer in zip((1, 2), messages[1:], strict=True):
        assert answer["type"] == "result" and answer["id"] == tid and answer["attempt"] == 0, answer
        counts = answer["outputs"]["result"]
        assert set(counts) == {"inside", "total"}
        assert 0 <= counts["inside"] <= counts["total"] and counts["total"] > 0
        results.append(counts)

    messages, stderr, status = converse(mc, [task(3, "merge", inputs=results, seed=3)])
    inside = sum(r["inside"] for r in results)
    total = sum(r["total"] for r in results)
    assert messages[1] == {"type": "result", "id": 3, "attempt": 0, "outputs": {"result": inside / float(total) * 4}}


def test_same_seed_draws_the_same_numbers(tmp_path: Path) -> None:
    node = python_node(tmp_path, DRAWS)
    messages, _, _ = converse(
        node, [task(1, "draw", args=[4], seed=7), task(2, "draw", args=[4], seed=8), task(3, "draw", args=[4], seed=7)]
    )
    first, second, third = (m["outputs"] for m in messages[1:])
    assert first == third
    assert first["global"] != second["global"] and first["own"] != second["own"]
    # Both generators are seeded with the task's seed, so they agree.
    assert first["global"] == first["own"]
    # Another process (another machine) draws the same numbers for the same seed.
    elsewhere, _, _ = converse(node, [task(9, "draw", args=[4], seed=7)])
    assert elsewhere[1]["outputs"] == first


def test_inputs_then_args_then_kwargs(tmp_path: Path) -> None:
    node = python_node(
        tmp_path,
        """
def combine(self, *values, scale=1):
    return {"values": list(values), "scale": scale}
""",
    )
    messages, _, _ = converse(node, [task(1, "combine", inputs=[{"a": 1}, 2], args=[3], kwargs={"scale": 10})])
    assert messages[1] == {
        "type": "result",
        "id": 1,
        "attempt": 0,
        "outputs": {"values": [{"a": 1}, 2, 3], "scale": 10},
    }


def test_unknown_private_and_base_class_names_are_not_tasks(tmp_path: Path) -> None:
    node = python_node(tmp_path, DRAWS + "\nlabel = 'not callable'\n")
    names = ["nosuch", "_private", "__init__", "start", "random", "label"]
    messages, _, status = converse(node, [task(i, name) for i, name in enumerate(names)])
    assert status == 0
    assert messages[1:] == [
        {"type": "error", "id": i, "attempt": 0, "error": f"unknown task {name}", "traceback": ""}
        for i, name in enumerate(names)
    ]


def test_exception_becomes_error_answer_and_node_carries_on(tmp_path: Path) -> None:
    node = python_node(
        tmp_path,
        DRAWS
        + """
def boom(self):
    return {"x": 1 / 0}
""",
    )
    messages, _, status = converse(node, [task(1, "boom", attempt=2), task(2, "draw", args=[1])])
    error = messages[1]
    assert (error["type"], error["id"], error["attempt"]) == ("error", 1, 2)
    assert error["error"] == "ZeroDivisionError: division by zero"
    assert "in boom" in error["traceback"] and "1 / 0" in error["traceback"]
    assert messages[2]["type"] == "result"
    assert status == 0


def test_wrong_arguments_are_an_error_answer(tmp_path: Path) -> None:
    messages, _, _ = converse(python_node(tmp_path, DRAWS), [task(1, "draw", args=[1, 2, 3])])
    assert messages[1]["type"] == "error" and messages[1]["error"].startswith("TypeError:")


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("[1, 2]", "task bad must return a dict of outputs, got list"),
        ("None", "task bad must return a dict of outputs, got NoneType"),
        ("{1: 'one'}", "task bad returned output keys that are not strings: [1]"),
        ("{'x': object()}", "task bad returned outputs that are not JSON"),
        ("{'x': float('nan')}", "task bad returned outputs that are not JSON"),
    ],
)
def test_outputs_must_be_a_json_dict(tmp_path: Path, returned: str, expected: str) -> None:
    node = python_node(tmp_path, f"def bad(self):\n    return {returned}\n")
    messages, _, _ = converse(node, [task(1, "bad"), task(2, "bad")])
    for tid, answer in zip((1, 2), messages[1:], strict=True):
        assert answer["type"] == "error" and answer["id"] == tid
        assert answer["error"].startswith(expected)


def test_output_inside_a_task_goes_to_stderr(tmp_path: Path) -> None:
    node = python_node(
        tmp_path,
        """
def noisy(self):
    print("print-noise")
    sys.stdout.write("write-noise\\n")
    os.write(1, b"fd-noise\\n")
    subprocess.run([sys.executable, "-c", "print('child-noise')"], check=True)
    return {"ok": True}
""",
    )
    messages, stderr, status = converse(node, [task(1, "noisy"), task(2, "noisy")])
    # converse() parsed every stdout line as JSON: nothing else reached stdout.
    assert messages[1:] == [{"type": "result", "id": i, "attempt": 0, "outputs": {"ok": True}} for i in (1, 2)]
    for noise in ("print-noise", "write-noise", "fd-noise", "child-noise"):
        assert stderr.count(noise) == 2, stderr
    assert status == 0


def test_malformed_client_lines_are_logged_and_skipped(tmp_path: Path) -> None:
    node = python_node(tmp_path, DRAWS)
    bad_inputs = dict(task(2, "draw"), inputs={"not": "a list"})
    messages, stderr, status = converse(
        node,
        [
            "garbage",
            "[1, 2]",
            '{"type": "bogus"}',
            json.dumps(dict(task(0, "draw"), id="x")),
            "",
            bad_inputs,
            task(3, "draw", args=[1]),
        ],
    )
    assert status == 0
    assert messages[1] == {
        "type": "error",
        "id": 2,
        "attempt": 0,
        "error": "malformed task message: inputs must be a list, got dict",
        "traceback": "",
    }
    assert messages[2]["type"] == "result" and messages[2]["id"] == 3
    assert len(messages) == 3
    assert "not JSON: 'garbage'" in stderr
    assert "not a task" in stderr and "bogus" in stderr
    assert "without an integer id" in stderr


def test_exit_message_stops_the_node(tmp_path: Path) -> None:
    messages, _, status = converse(
        python_node(tmp_path, DRAWS), [task(1, "draw", args=[1]), {"type": "exit"}, task(2, "draw", args=[1])]
    )
    assert [m["type"] for m in messages] == ["ready", "result"]
    assert status == 0


# --- @timeout in-process --------------------------------------------------------------


def spin() -> str:
    deadline = time.monotonic() + SPIN_LIMIT
    while time.monotonic() < deadline:
        pass
    return "not interrupted"


def no_alarm() -> bool:
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL


def test_timeout_interrupts_a_loop_and_cleans_up() -> None:
    assert no_alarm()
    with pytest.raises(TimeoutError, match="spin ran longer than its timeout of 0.05 s"):
        timeout(0.05)(spin)()
    assert no_alarm()


def test_timeout_passes_results_and_exceptions_through() -> None:
    @timeout(30)
    def add(a: int, b: int = 0) -> int:
        return a + b

    @timeout(30)
    def fail() -> None:
        raise KeyError("inner")

    assert add(1, b=2) == 3
    assert add.__name__ == "add"
    with pytest.raises(KeyError):
        fail()
    assert no_alarm()


def test_timeout_restores_a_previous_handler() -> None:
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        with pytest.raises(TimeoutError):
            timeout(0.05)(spin)()
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
        signal.raise_signal(signal.SIGALRM)
        assert fired == [signal.SIGALRM]
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_nested_timeouts_inner_fires_and_outer_keeps_its_deadline() -> None:
    seen: dict[str, Any] = {}

    @timeout(30)
    def outer() -> str:
        try:
            timeout(0.05)(spin)()
        except TimeoutError:
            seen["inner"] = "timed out"
        seen["outer_timer"] = signal.getitimer(signal.ITIMER_REAL)[0]
        return "outer done"

    assert outer() == "outer done"
    assert seen["inner"] == "timed out"
    # The outer deadline was re-armed with what was left of its 30 s.
    assert 0 < seen["outer_timer"] <= 30
    assert no_alarm()


def test_nested_timeouts_outer_deadline_first_wins() -> None:
    @timeout(0.05)
    def outer() -> str:
        return timeout(30)(spin)()

    with pytest.raises(TimeoutError, match="outer ran longer"):
        outer()
    assert no_alarm()


def test_timeout_scale_shortens_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(node_sdk.TIMEOUT_SCALE_ENV, "0.001")
    with pytest.raises(TimeoutError, match="timeout of 0.05 s"):
        timeout(50)(spin)()


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf"])
def test_malformed_timeout_scale_is_reported(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(node_sdk.TIMEOUT_SCALE_ENV, value)
    with pytest.raises(ValueError, match="TASKSPRINT_TIMEOUT_SCALE"):
        timeout(1)(spin)()
    assert no_alarm()


@pytest.mark.parametrize("seconds", [0, -1, "5", True])
def test_timeout_needs_positive_seconds(seconds: Any) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        timeout(seconds)


def test_timeout_outside_the_main_thread_is_refused() -> None:
    errors: list[BaseException] = []

    def call() -> None:
        try:
            timeout(1)(spin)()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(PROCESS_LIMIT)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "main thread" in str(errors[0])


# --- JavaScript SDK -------------------------------------------------------------------------


def js_node(tmp_path: Path, body: str) -> list[str]:
    """A node script of class TestNode extends Node with ``body`` as its class body."""
    assert NODE_JS is not None
    script = tmp_path / "test_node.js"
    script.write_text(
        f"const {{ Node, timeout, TimeoutError }} = require({json.dumps(str(JS_SDK))});\n"
        f"class TestNode extends Node {{\n{body}\n}}\n"
        "new TestNode().start();\n"
    )
    return [NODE_JS, str(script)]


@needs_node_js
def test_js_example_node_answers() -> None:
    assert NODE_JS is not None
    messages, stderr, status = converse(
        [NODE_JS, str(JS_EXAMPLE)],
        [
            task(1, "square", inputs=[7]),
            task(2, "sum", inputs=[1, 2], args=[3, 4]),
            task(3, "sum"),
            task(4, "rand", seed=11),
            task(5, "rand", seed=12),
            task(6, "rand", seed=11),
        ],
    )
    assert status == 0, stderr
    assert messages[0] == {"type": "ready", "protocol": 1, "sdk": "js"}
    outputs = [m["outputs"]["result"] for m in messages[1:]]
    assert outputs[:3] == [49, 10, 0]
    first, second, again = outputs[3:]
    assert first == again and first != second
    assert 0 <= first < 1 and 0 <= second < 1


@needs_node_js
def test_js_kwargs_are_one_final_argument_only_when_given(tmp_path: Path) -> None:
    node = js_node(tmp_path, "collect(...all) { return { all }; }")
    messages, _, _ = converse(
        node, [task(1, "collect", inputs=[1], args=[2]), task(2, "collect", inputs=[1], args=[2], kwargs={"k": 3})]
    )
    assert [m["outputs"]["all"] for m in messages[1:]] == [[1, 2], [1, 2, {"k": 3}]]


@needs_node_js
def test_js_errors_unknown_names_and_bad_outputs(tmp_path: Path) -> None:
    node = js_node(
        tmp_path,
        """
  boom() { throw new RangeError('too far'); }
  async later() { await new Promise((r) => setTimeout(r, 1)); return { done: true }; }
  array() { return [1]; }
  nothing() { return null; }
  _hidden() { return { x: 1 }; }
""",
    )
    names = ["boom", "later", "array", "nothing", "_hidden", "start", "random", "constructor", "toString", "nosuch"]
    messages, _, status = converse(node, [task(i, name) for i, name in enumerate(names)])
    assert status == 0
    answers = dict(zip(names, messages[1:], strict=True))
    assert answers["boom"]["error"] == "RangeError: too far" and "boom" in answers["boom"]["traceback"]
    assert answers["later"]["outputs"] == {"done": True}
    assert answers["array"]["error"] == "task array must return an object of outputs, got array"
    assert answers["nothing"]["error"] == "task nothing must return an object of outputs, got null"
    for name in ["_hidden", "start", "random", "constructor", "toString", "nosuch"]:
        assert answers[name]["error"] == f"unknown task {name}"
    assert [m["id"] for m in messages[1:]] == list(range(len(names)))


@needs_node_js
def test_js_console_log_goes_to_stderr_and_bad_lines_are_skipped(tmp_path: Path) -> None:
    node = js_node(
        tmp_path, "noisy() { console.log('log-noise'); process.stdout.write('raw-noise\\n'); return { ok: 1 }; }"
    )
    messages, stderr, status = converse(node, ["garbage", '{"type": "bogus"}', task(1, "noisy")])
    assert messages[1:] == [{"type": "result", "id": 1, "attempt": 0, "outputs": {"ok": 1}}]
    assert "log-noise" in stderr and "raw-noise" in stderr and "garbage" in stderr
    assert status == 0


@needs_node_js
def test_js_exit_ends_the_process_despite_pending_timers(tmp_path: Path) -> None:
    node = js_node(tmp_path, "linger() { setInterval(() => {}, 1000); return { ok: 1 }; }")
    messages, _, status = converse(node, [task(1, "linger"), {"type": "exit"}, task(2, "linger")])
    assert [m["type"] for m in messages] == ["ready", "result"]
    assert status == 0


@needs_node_js
def test_js_timeout_helper(tmp_path: Path) -> None:
    node = js_node(
        tmp_path,
        """
  async count() {
    let total = 0;
    try {
      // do/while: the loop runs at least once even if the 5 ms budget passed before fn started
      // (a loaded machine can pause the node that long), so the outcome does not depend on speed.
      await timeout(5000, (limit) => { do { total += 1; } while (!limit.expired()); });
      return { timedOut: false };
    } catch (error) {
      return { timedOut: error instanceof TimeoutError, counted: total > 0 };
    }
  }
  async sleep() {
    try {
      await timeout(60000, () => new Promise((resolve) => setTimeout(resolve, 600000)));
      return { timedOut: false };
    } catch (error) {
      return { timedOut: error instanceof TimeoutError, message: error.message };
    }
  }
  // A limit of 60 s once scaled: only a result that comes back in time is tested here.
  async quick() { return { value: await timeout(60000000, async () => 42) }; }
""",
    )
    messages, stderr, status = converse(
        node, [task(1, "count"), task(2, "sleep"), task(3, "quick")], TASKSPRINT_TIMEOUT_SCALE="0.001"
    )
    assert status == 0, stderr
    count, sleep, quick = (m["outputs"] for m in messages[1:])
    assert count == {"timedOut": True, "counted": True}
    assert sleep["timedOut"] is True and "60 ms" in sleep["message"]
    assert quick == {"value": 42}
