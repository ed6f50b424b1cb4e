"""The node pool runs real node processes and survives every way a node can misbehave.

See tests/nodes.py for the node programs. Every pool is closed before the
test ends and the tests check that no child process is left, zombies included.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from nodes import (
    FOREVER,
    JS_EXAMPLE,
    MONTECARLO,
    NODE_JS,
    PROTOCOL_DOC,
    RAW_NODE,
    SDK_NODE,
    TEST_LIMIT,
    assert_reaped,
    failure,
    needs_node_js,
    no_stray,
    process_gone,
    request,
    wait_for_file,
    write_node,
)

from tasksprint.node_pool import NodePool
from tasksprint.node_process import NodeStartError, node_environment
from tasksprint.node_protocol import FailureKind, TaskOutcome, TaskRequest


@contextlib.asynccontextmanager
async def open_pool(command: str, slots: int = 1, **options: Any) -> AsyncIterator[NodePool]:
    """A started pool, closed (and checked to leave no process) on the way out."""
    seen: set[int] = set()
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            pool = NodePool(command, slots, **options)
            await pool.start(nursery)
            try:
                seen.update(pool.pids)
                yield pool
                seen.update(pool.pids)
            finally:
                await pool.aclose()
    assert pool.pids == ()
    assert_reaped(seen)


# --- Running tasks -------------------------------------------------------------------------


async def test_montecarlo_example_runs_and_merges() -> None:
    command = f"python {shlex.quote(str(MONTECARLO))}"
    async with open_pool(command, slots=2, env={"TASKSPRINT_TIMEOUT_SCALE": "0.02"}) as pool:
        outcomes: dict[int, TaskOutcome] = {}

        async def run(tid: int) -> None:
            outcomes[tid] = await pool.run(request(tid, "montecarlo", seed=tid))

        async with trio.open_nursery() as nursery:
            for tid in (1, 2, 3):
                nursery.start_soon(run, tid)
        results = []
        for tid in (1, 2, 3):
            outcome = outcomes[tid]
            assert outcome.ok and (outcome.tid, outcome.attempt) == (tid, 0), outcome
            counts = outcome.outputs["result"]
            assert 0 <= counts["inside"] <= counts["total"] and counts["total"] > 0
            results.append(counts)

        merged = await pool.run(request(4, "merge", inputs=tuple(results)))
        inside = sum(r["inside"] for r in results)
        total = sum(r["total"] for r in results)
        assert merged == TaskOutcome(tid=4, attempt=0, ok=True, outputs={"result": inside / float(total) * 4})


@needs_node_js
async def test_js_example_runs_on_the_pool() -> None:
    command = f"node {shlex.quote(str(JS_EXAMPLE))}"
    async with open_pool(command, slots=2) as pool:
        square = await pool.run(request(1, "square", inputs=(7,)))
        total = await pool.run(request(2, "sum", 3, 4, inputs=(1, 2)))
        draws = [await pool.run(request(3, "rand", seed=seed)) for seed in (11, 12, 11)]
    assert square.outputs == {"result": 49}
    assert total.outputs == {"result": 10}
    first, second, again = (d.outputs["result"] for d in draws)
    assert first == again and first != second


@pytest.mark.parametrize("language", ["python", "js"])
async def test_sdk_less_nodes_from_the_protocol_doc(tmp_path: Path, language: str) -> None:
    if language == "js" and NODE_JS is None:
        pytest.skip("Node.js (`node`) is not on PATH; the JavaScript node cannot run")
    fence = {"python": "python", "js": "javascript"}[language]
    pattern = rf"<!-- minimal-node: {language} -->\n```{fence}\n(.*?)```"
    match = re.search(pattern, PROTOCOL_DOC.read_text(), re.DOTALL)
    assert match, f"docs/protocol.md lost its minimal {language} node"
    script = tmp_path / f"minimal.{ {'python': 'py', 'js': 'js'}[language] }"
    script.write_text(match.group(1))
    command = f"{ {'python': 'python', 'js': 'node'}[language] } {shlex.quote(str(script))}"
    async with open_pool(command) as pool:
        square = await pool.run(request(1, "square", inputs=(9,)))
        unknown = await pool.run(request(2, "cube", inputs=(9,)))
        again = await pool.run(request(3, "square", 5))
    assert square.outputs == {"result": 81}
    assert failure(unknown, FailureKind.TASK_ERROR)
    assert again.outputs == {"result": 25}


async def test_inputs_args_and_kwargs_reach_the_node(tmp_path: Path) -> None:
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        outcome = await pool.run(request(1, "echo", 3, inputs=({"a": [1]}, "two"), kwargs={"k": None}))
    assert outcome.outputs == {"values": [{"a": [1]}, "two", 3], "options": {"k": None}}


async def test_nodes_run_the_clients_python(tmp_path: Path) -> None:
    # Nothing on PATH but what the pool puts there.
    empty = tmp_path / "empty"
    empty.mkdir()
    async with open_pool(write_node(tmp_path, SDK_NODE), env={"PATH": str(empty)}) as pool:
        outcome = await pool.run(request(1, "pid"))
    assert os.path.samefile(os.path.dirname(outcome.outputs["executable"]), os.path.dirname(sys.executable))
    assert (
        node_environment({"PATH": "/x"})["PATH"] == os.path.dirname(os.path.abspath(sys.executable)) + os.pathsep + "/x"
    )


async def test_slots_run_tasks_at_the_same_time(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    async with open_pool(write_node(tmp_path, SDK_NODE), slots=2) as pool:
        outcomes: list[TaskOutcome] = []

        async def run(task: TaskRequest) -> None:
            outcomes.append(await pool.run(task))

        # wait_for only returns once touch has run, which needs a second node.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, request(1, "wait_for", str(flag)))
            nursery.start_soon(run, request(2, "touch", str(flag)))
    assert sorted((o.tid, o.ok) for o in outcomes) == [(1, True), (2, True)]


async def test_error_answer_keeps_the_node(tmp_path: Path) -> None:
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        before = pool.pids
        outcome = await pool.run(request(1, "fail", attempt=3))
        assert pool.pids == before
        after = await pool.run(request(2, "echo", 1))
    assert (outcome.tid, outcome.attempt) == (1, 3)
    assert failure(outcome, FailureKind.TASK_ERROR) == "ValueError: no good"
    assert "in fail" in outcome.traceback
    assert after.ok


async def test_stderr_goes_to_the_given_log_file(tmp_path: Path) -> None:
    log_path = tmp_path / "nodes.log"
    with log_path.open("wb") as log_file:
        async with open_pool(write_node(tmp_path, SDK_NODE), stderr=log_file) as pool:
            assert (await pool.run(request(1, "log", "a line for the log"))).ok
    assert "a line for the log" in log_path.read_text()


async def test_unencodable_arguments_are_refused_before_the_node_sees_them(tmp_path: Path) -> None:
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        before = pool.pids
        with pytest.raises(ValueError, match=r"task 1 \(echo\) has inputs or arguments that are not JSON"):
            await pool.run(request(1, "echo", float("nan")))
        assert (await pool.run(request(2, "echo", 1))).ok
        assert pool.pids == before


# --- Misbehaving nodes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("exit_code", "node process exited with code 3 while running task 7 (exit_code)"),
        ("kill_self", "node process exited with code -9 (killed by SIGKILL) while running task 7 (kill_self)"),
    ],
)
async def test_crash_mid_task_fails_it_and_a_fresh_node_takes_over(tmp_path: Path, name: str, expected: str) -> None:
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        before = pool.pids
        outcome = await pool.run(request(7, name, 3) if name == "exit_code" else request(7, name))
        assert failure(outcome, FailureKind.CRASHED) == expected
        after = await pool.run(request(8, "pid"))
        assert after.ok and after.outputs["pid"] not in before
        assert_reaped(set(before))


async def test_children_of_a_crashed_node_are_killed(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    with no_stray(marker):
        await crash_with_child(tmp_path, marker)


async def crash_with_child(tmp_path: Path, marker: Path) -> None:
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        outcome = await pool.run(request(7, "crash_with_child", str(marker)))
        assert failure(outcome, FailureKind.CRASHED).startswith("node process exited with code 3")
        grandchild = int(marker.read_text())
        while not process_gone(grandchild):
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        (
            "garbage",
            FailureKind.PROTOCOL,
            "node wrote invalid output while running task 5 (garbage): 'garbage garbage garbage",
        ),
        ("other_type", FailureKind.PROTOCOL, "node wrote invalid output while running task 5 (other_type): '{"),
        (
            "wrong_id",
            FailureKind.PROTOCOL,
            "node answered task 6 attempt 0 while running task 5 (wrong_id) attempt 0: '{",
        ),
        (
            "wrong_attempt",
            FailureKind.PROTOCOL,
            "node answered task 5 attempt 1 while running task 5 (wrong_attempt) attempt 0: '{",
        ),
        ("bool_id", FailureKind.PROTOCOL, "node answered task True attempt 0 while running task 5 (bool_id)"),
        (
            "list_outputs",
            FailureKind.PROTOCOL,
            "node answered task 5 (list_outputs) with outputs that are not a JSON object",
        ),
        ("error_not_string", FailureKind.PROTOCOL, "node answered task 5 (error_not_string) with an error whose"),
        (
            "long_line",
            FailureKind.PROTOCOL,
            "node wrote a line longer than 1000 bytes while running task 5 (long_line): 'xxxx",
        ),
        (
            "close_stdout",
            FailureKind.CRASHED,
            "node process closed its stdout (it was killed) while running task 5 (close_stdout)",
        ),
        (
            "half_then_exit",
            FailureKind.CRASHED,
            "node process exited with code 5 while running task 5 (half_then_exit); it last wrote 'half'",
        ),
    ],
)
async def test_protocol_violations_fail_the_task_and_replace_the_node(
    tmp_path: Path, name: str, kind: FailureKind, expected: str
) -> None:
    # A node that closed its stdout but lives on is killed once the exit grace is over, however
    # long that is; every other node here exits on its own and is given all the time it needs.
    exit_grace = 0.2 if name == "close_stdout" else TEST_LIMIT
    async with open_pool(write_node(tmp_path, RAW_NODE), max_line=1000, exit_grace=exit_grace) as pool:
        before = pool.pids
        assert (await pool.run(request(4, "ok", 1))).outputs == {"args": [1]}
        outcome = await pool.run(request(5, name))
        assert failure(outcome, kind).startswith(expected)
        # Bad output is quoted, but never at unbounded length.
        assert len(outcome.error) < 400
        after = await pool.run(request(6, "ok", 2))
        assert after.outputs == {"args": [2]}
        assert set(pool.pids).isdisjoint(before)
        assert_reaped(set(before))


async def test_task_timeout_kills_the_node(tmp_path: Path) -> None:
    marker = tmp_path / "hang"
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        # The task never ends, so it times out whether or not the node got to start it.
        (node,) = pool.pids
        outcome = await pool.run(request(9, "hang", str(marker), timeout=0.5))
        error = failure(outcome, FailureKind.TIMEOUT)
        assert error == "task 9 (hang) ran longer than its timeout of 0.5 s; the node process was killed"
        assert_reaped({node})
        assert (await pool.run(request(10, "echo", 1, timeout=TEST_LIMIT))).ok


async def test_cancel_stops_a_running_task_and_its_children(tmp_path: Path) -> None:
    marker = tmp_path / "child"
    with no_stray(marker):
        await cancel_with_child(tmp_path, marker)


async def cancel_with_child(tmp_path: Path, marker: Path) -> None:
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        before = pool.pids
        outcomes: list[TaskOutcome] = []

        async def run() -> None:
            outcomes.append(await pool.run(request(11, "hang_with_child", str(marker))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            grandchild = int(await wait_for_file(marker))
            assert pool.cancel(11) is True
        assert failure(outcomes[0], FailureKind.CANCELLED) == "task 11 (hang_with_child) was cancelled"
        assert pool.cancel(11) is False
        # The node's own child was in its process group and died with it.
        while not process_gone(grandchild):
            await trio.sleep(0.01)
        assert (await pool.run(request(12, "echo", 1))).ok
        assert set(pool.pids).isdisjoint(before)


async def test_cancel_a_task_waiting_for_a_free_node(tmp_path: Path) -> None:
    marker = tmp_path / "hang"
    async with open_pool(write_node(tmp_path, SDK_NODE), slots=1) as pool:
        outcomes: dict[int, TaskOutcome] = {}

        async def run(task: TaskRequest) -> None:
            outcomes[task.tid] = await pool.run(task)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, request(1, "hang", str(marker)))
            await wait_for_file(marker)
            nursery.start_soon(run, request(2, "echo", 1))
            await trio.testing.wait_all_tasks_blocked()
            assert pool.cancel(2)
            await trio.testing.wait_all_tasks_blocked()
            assert 2 in outcomes and 1 not in outcomes
            assert pool.cancel(1)
    assert failure(outcomes[2], FailureKind.CANCELLED) == "task 2 (echo) was cancelled"
    assert failure(outcomes[1], FailureKind.CANCELLED) == "task 1 (hang) was cancelled"


async def test_caller_cancellation_kills_the_node(tmp_path: Path) -> None:
    marker = tmp_path / "hang"
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        before = pool.pids
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                await pool.run(request(1, "hang", str(marker)))

            nursery.start_soon(run)
            await wait_for_file(marker)
            nursery.cancel_scope.cancel()
        assert process_gone(int(marker.read_text()))
        assert (await pool.run(request(2, "echo", 1))).ok
        assert set(pool.pids).isdisjoint(before)


async def test_idle_node_that_died_is_replaced_before_use(tmp_path: Path) -> None:
    async with open_pool(write_node(tmp_path, SDK_NODE)) as pool:
        (victim,) = pool.pids
        os.kill(victim, signal.SIGKILL)
        while not process_gone(victim):
            await trio.sleep(0.01)
        outcome = await pool.run(request(1, "pid"))
        assert outcome.ok and outcome.outputs["pid"] != victim


# --- Starting and stopping ----------------------------------------------------------------------


async def test_pool_with_a_missing_command_is_a_start_error() -> None:
    command = "tasksprint-no-such-node-command --flag"
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            pool = NodePool(command, 2)
            with pytest.raises(NodeStartError, match="tasksprint-no-such-node-command"):
                await pool.start(nursery)
            assert pool.pids == ()
            await pool.aclose()


async def test_pool_that_cannot_start_every_node_stops_those_that_did(tmp_path: Path) -> None:
    # The first node to claim the flag file fails to start; the other three start fine.
    flag = tmp_path / "flag"
    pids = tmp_path / "pids"
    source = (
        "import os, sys\n"
        f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "try:\n"
        f"    os.close(os.open({str(flag)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))\n"
        "    sys.exit(2)\n"
        "except FileExistsError:\n"
        "    pass\n" + SDK_NODE
    )
    command = write_node(tmp_path, source)
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            pool = NodePool(command, 4)
            with pytest.raises(NodeStartError, match="exited with code 2 before it was ready"):
                await pool.start(nursery)
    assert_reaped({int(line) for line in pids.read_text().split()})


async def test_aclose_stops_running_tasks_and_leaves_no_process(tmp_path: Path) -> None:
    marker = tmp_path / "hang"
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            pool = NodePool(write_node(tmp_path, SDK_NODE), 3, exit_grace=5)
            await pool.start(nursery)
            pids = set(pool.pids)
            assert len(pids) == 3
            outcomes: list[TaskOutcome] = []

            async def run() -> None:
                outcomes.append(await pool.run(request(1, "hang", str(marker))))

            nursery.start_soon(run)
            await wait_for_file(marker)
            await pool.aclose()
            await pool.aclose()  # idempotent
            assert pool.pids == ()
    assert failure(outcomes[0], FailureKind.CLOSED) == "task 1 (hang) was stopped: the node pool is closing"
    assert_reaped(pids)
    late = await pool.run(request(2, "echo", 1))
    assert failure(late, FailureKind.CLOSED) == "task 2 (echo) was not run: the node pool is closed"


async def test_aclose_while_the_first_nodes_are_starting(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    silent = f"import os, time\nopen({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\ntime.sleep({FOREVER})\n"
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            pool = NodePool(write_node(tmp_path, silent), 2, start_timeout=FOREVER)
            nursery.start_soon(pool.start, nursery)
            while not pids.exists() or len(pids.read_text().split()) < 2:
                await trio.sleep(0.01)
            await pool.aclose()
    assert pool.pids == ()
    assert_reaped({int(line) for line in pids.read_text().split()})
    assert failure(await pool.run(request(1, "echo")), FailureKind.CLOSED)


async def test_cancelling_the_pools_nursery_closes_it(tmp_path: Path) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            pool = NodePool(write_node(tmp_path, SDK_NODE), 2)
            await pool.start(nursery)
            pids = set(pool.pids)
            nursery.cancel_scope.cancel()
        await pool.aclose()
    assert pool.pids == ()
    assert_reaped(pids)


async def test_pool_must_be_started_once(tmp_path: Path) -> None:
    pool = NodePool(write_node(tmp_path, SDK_NODE), 1)
    with pytest.raises(RuntimeError, match="start the node pool"):
        await pool.run(request(1, "echo"))
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            await pool.start(nursery)
            with pytest.raises(RuntimeError, match="can be started once"):
                await pool.start(nursery)
            await pool.aclose()
