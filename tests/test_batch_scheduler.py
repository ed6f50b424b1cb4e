"""The batch scheduler in one coordinator machine, fed op by op: dispatch order, barriers, fail-fast, query.

Clients are simulated (:mod:`coordinator_harness`): they read their views and
report each command task's record as a worker client would.
"""

from __future__ import annotations

from typing import Any

from coordinator_harness import Harness, join, replay

from tasksprint.batch.scheduler import BatchScheduler, engine_name
from tasksprint.batch.statusfile import RecordKind, parse_status_line
from tasksprint.coordinator.app import CoordinatorApp
from tasksprint.coordinator.machine import RunState
from tasksprint.coordinator.ops import Refused, SchedulerAnswer

BASE: dict[str, Any] = {
    "name": "Tasks",
    "job_id": "job",
    "cwd": "/",
    "env_file": None,
    "engines": [0],
    "window": 100,
    "fail_fast": False,
    "skip": {},
    "driver_node": "driver",
    "driver_pid": 42,
    "cores_per_task": 1,
}


class Plain(BatchScheduler):
    CONFIG = {**BASE, "taskfile": b"echo a\nexit 3\n#DISBATCH BARRIER CHECK\necho never\n"}


class FailFast(BatchScheduler):
    CONFIG = {**BASE, "window": 2, "fail_fast": True, "taskfile": b"sleep 1000\nexit 1\ntouch A\n"}


class PerEngine(BatchScheduler):
    CONFIG = {
        **BASE,
        "engines": [0, 1],
        "taskfile": b"#DISBATCH PERENGINE START echo start\n#DISBATCH PERENGINE STOP echo stop\ntrue\n",
    }


class Resumed(BatchScheduler):
    CONFIG = {
        **BASE,
        "taskfile": b"true\ntrue\n",
        "skip": {0: "    S\t0\t1\t-1\tn\t1\t0\t0.500\t1.000\t1.500\t0\t''\t0\t''\ttrue"},
    }


def record(code: int, out: bytes = b"") -> dict[str, Any]:
    return {
        "verdict": "ok" if code == 0 else "exit",
        "exit_code": code,
        "signal": None,
        "started": 10.0,
        "finished": 11.5,
        "pid": 77,
        "host": "node1",
        "stdout": {"size_bytes": len(out), "cut": False, "head": out.decode(), "tail": ""},
        "stderr": None,
    }


def assigned(h: Harness, cid: int) -> dict[int, str]:
    return {t.tid: t.kwargs["command"]["cmd"].split("\n", 1)[1] for t in h.machine.view(cid, 0).tasks}


def report(h: Harness, cid: int, tid: int, code: int, out: bytes = b"") -> None:
    if code == 0:
        h.op({"op": "done", "cid": cid, "tid": tid, "attempt": 1, "values": record(0, out), "sizes": {}})
    else:
        h.op({"op": "failed", "cid": cid, "tid": tid, "attempt": 1, "error": "exit", "record": record(code)})


def require(h: Harness, tid: int) -> list[str]:
    return h.machine.task_info(tid)["require"]


def lines(h: Harness) -> list[str]:
    return h.machine.scheduler.query({"after": 0})["lines"]


def test_a_barrier_check_waits_for_earlier_tasks_and_ends_the_run_after_a_failure() -> None:
    h = Harness(Plain)
    h.init()
    h.tick()
    cid = join(h, engine_name(0), slots=2, have=(engine_name(0),))
    tasks = assigned(h, cid)
    assert sorted(tasks.values()) == ["echo a", "exit 3"]  # not the one after the barrier
    by_cmd = {v: k for k, v in tasks.items()}
    report(h, cid, by_cmd["echo a"], 0, b"a\n")
    assert len(lines(h)) == 1
    h.tick()
    report(h, cid, by_cmd["exit 3"], 3)
    records = [parse_status_line(line) for line in lines(h)]
    assert [r.kind for r in records] == [RecordKind.TASK, RecordKind.TASK, RecordKind.CHECK_BARRIER]
    assert records[0].out_snippet == "a\n" and records[0].node == "node1" and records[0].pid == 77
    assert records[1].exit_code == 3 and records[1].flags == "R   "
    assert records[2].node == "driver" and records[2].pid == 42
    assert h.machine.run_state is RunState.FINISHED
    answer = h.machine.scheduler.query({"after": 1})
    assert answer["ended"] and "BARRIER CHECK on line 3" in answer["reason"] and len(answer["lines"]) == 2
    assert all("never" not in c for c in assigned(h, cid).values())
    # Replaying the log gives the same state and digest: the scheduler is deterministic.
    assert replay(Plain, h.batches).digest == h.applier.digest


def test_fail_fast_kills_the_running_task_and_never_starts_the_third() -> None:
    h = Harness(FailFast)
    h.init()
    cid = join(h, engine_name(0), slots=2, have=(engine_name(0),))
    tasks = {v: k for k, v in assigned(h, cid).items()}
    assert sorted(tasks) == ["exit 1", "sleep 1000"]  # the window is the two slots
    report(h, cid, tasks["exit 1"], 1)
    assert h.machine.task_info(tasks["sleep 1000"])["state"] == "killed"
    assert h.machine.run_state is RunState.FINISHED
    assert h.machine.scheduler.query({})["reason"].startswith("task 1 (line 2) failed")
    assert h.machine.status()["tasks"]["total"] == 2  # touch A never started


def test_perengine_commands_are_pinned_to_each_engine_and_stop_ends_the_run() -> None:
    h = Harness(PerEngine)
    h.init()
    a = join(h, engine_name(0), slots=1, have=(engine_name(0),))
    b = join(h, engine_name(1), slots=1, have=(engine_name(1),))
    rank = {a: 0, b: 1}
    starts = {c: [t for t in h.machine.view(c, 0).tasks if require(h, t.tid) == [engine_name(rank[c])]] for c in (a, b)}
    assert all(len(v) == 1 and v[0].kwargs["command"]["cmd"].endswith("echo start") for v in starts.values())
    for cid in (a, b):
        report(h, cid, starts[cid][0].tid, 0)
    task = next(
        t for cid in (a, b) for t in h.machine.view(cid, 0).tasks if t.kwargs["command"]["cmd"].endswith("true")
    )
    report(h, next(c for c in (a, b) if task in h.machine.view(c, 0).tasks), task.tid, 0)
    stops = [
        t for cid in (a, b) for t in h.machine.view(cid, 0).tasks if t.kwargs["command"]["cmd"].endswith("echo stop")
    ]
    assert sorted(require(h, t.tid)[0] for t in stops) == [engine_name(0), engine_name(1)]
    for t in stops:
        report(h, a if require(h, t.tid) == [engine_name(0)] else b, t.tid, 0)
    assert h.machine.run_state is RunState.FINISHED
    kinds = [parse_status_line(line).kind for line in lines(h)]
    assert kinds.count(RecordKind.PER_ENGINE) == 4 and kinds.count(RecordKind.TASK) == 1


def test_a_skipped_task_gets_its_earlier_line_and_does_not_run() -> None:
    h = Harness(Resumed)
    h.init()
    cid = join(h, engine_name(0), slots=2, have=(engine_name(0),))
    (tid,) = assigned(h, cid)
    assert lines(h)[0].startswith("    S\t0\t")
    report(h, cid, tid, 0)
    assert h.machine.run_state is RunState.FINISHED


def test_the_scheduler_query_through_the_replica_app() -> None:
    app = CoordinatorApp.create(Plain)
    refused = app.query("scheduler", {"args": {"after": 0}})
    assert isinstance(refused, Refused) and refused.code == "not_initialized"
    h = Harness(Plain)
    app = CoordinatorApp(h.machine)
    h.init()
    answer = app.query("scheduler", {"args": {"after": 0}})
    assert isinstance(answer, SchedulerAnswer) and answer.value["lines"] == [] and answer.value["tasks"] == 4
    bad = app.query("scheduler", {"args": {"after": -1}})
    assert isinstance(bad, Refused) and "after" in bad.error


class Latin1(BatchScheduler):
    CONFIG = {**BASE, "taskfile": b"printf '%s' caf\xe9\n"}


def test_a_command_that_is_not_utf8_reaches_bash_byte_for_byte() -> None:
    import os
    import subprocess

    h = Harness(Latin1)
    h.init()
    cid = join(h, engine_name(0), slots=1, have=(engine_name(0),))
    (task,) = h.machine.view(cid, 0).tasks
    command = task.kwargs["command"]
    env = {**os.environ, **command["env"], "TASKSPRINT_CLIENT": "engine0"}
    done = subprocess.run(["bash", "-c", command["cmd"]], env=env, capture_output=True, timeout=30, check=True)
    assert done.stdout == b"caf\xe9"


def test_the_scheduler_survives_a_snapshot_with_its_status_lines() -> None:
    from tasksprint.coordinator.machine import CoordinatorMachine

    h = Harness(Plain)
    h.init()
    cid = join(h, engine_name(0), slots=2, have=(engine_name(0),))
    first = next(iter(assigned(h, cid)))
    report(h, cid, first, 0, b"a\n")
    restored = CoordinatorMachine(Plain)
    restored.restore(h.machine.snapshot())
    assert restored.scheduler.query({"after": 0}) == h.machine.scheduler.query({"after": 0})
    assert len(lines(h)) == 1


class After(BatchScheduler):
    CONFIG = {
        **BASE,
        "taskfile": b"exit 2\necho a\n#DISBATCH AFTER 1\necho dep\n#DISBATCH AFTER 2\necho ok\n"
        b"#DISBATCH AFTER 4\necho dep2\necho free\n#DISBATCH BARRIER\necho last\n",
    }


def test_after_waits_without_holding_up_later_tasks_and_a_failed_dependency_skips_the_dependent() -> None:
    h = Harness(After)
    h.init()
    h.tick()
    cid = join(h, engine_name(0), slots=8, have=(engine_name(0),))
    tasks = {v: k for k, v in assigned(h, cid).items()}
    assert sorted(tasks) == ["echo a", "echo free", "exit 2"]  # the dependents wait; 'echo free' does not
    assert h.machine.scheduler.query({})["waiting"] == 3
    report(h, cid, tasks["echo a"], 0)
    assert "echo ok" in assigned(h, cid).values()
    report(h, cid, tasks["exit 2"], 2)
    # 'echo dep' waited for the failed line 1, 'echo dep2' for 'echo dep': neither runs.
    records = [parse_status_line(line) for line in lines(h)]
    assert [(r.task_id, r.kind, r.exit_code) for r in records] == [
        (1, RecordKind.TASK, 0),
        (0, RecordKind.TASK, 2),
        (2, RecordKind.DEPENDENCY_FAILED, -1),
        (4, RecordKind.DEPENDENCY_FAILED, -1),
    ]
    assert records[2].flags == "R  D" and records[2].command == b"echo dep" and records[2].line == 4
    now = {v: k for k, v in assigned(h, cid).items()}
    assert "echo last" not in now  # the barrier waits for 'echo ok' and 'echo free'
    report(h, cid, now["echo ok"], 0)
    report(h, cid, now["echo free"], 0)
    last = {v: k for k, v in assigned(h, cid).items()}["echo last"]
    report(h, cid, last, 0)
    assert h.machine.run_state is RunState.FINISHED
    assert h.machine.scheduler.query({})["failed"] == 3
    assert replay(After, h.batches).digest == h.applier.digest


class Chain(BatchScheduler):
    # More tasks wait than the window holds: dispatch then waits too, and still ends.
    CONFIG = {
        **BASE,
        "window": 2,
        "taskfile": b"echo 0\n" + b"".join(b"#DISBATCH AFTER 1\necho %d\n" % i for i in range(1, 6)),
    }


def test_waiting_tasks_are_bounded_by_the_window_and_all_run_in_the_end() -> None:
    h = Harness(Chain)
    h.init()
    cid = join(h, engine_name(0), slots=8, have=(engine_name(0),))
    assert list(assigned(h, cid).values()) == ["echo 0"]
    assert h.machine.scheduler.query({})["waiting"] == 2
    ran = []
    while h.machine.run_state is not RunState.FINISHED:
        tid, cmd = next(iter(assigned(h, cid).items()))
        ran.append(cmd)
        report(h, cid, tid, 0)
    assert sorted(ran) == [f"echo {i}" for i in range(6)]


class Open(BatchScheduler):
    CONFIG = {**BASE, "open": True, "taskfile": b"#DISBATCH PERENGINE START echo hi\necho a\n"}


def command(h: Harness, body: Any) -> Any:
    return h.op({"op": "command", "body": body}).value


def test_an_open_batch_takes_submitted_lines_until_it_is_closed() -> None:
    from tasksprint.coordinator.machine import CoordinatorMachine

    h = Harness(Open)
    h.init()
    cid = join(h, engine_name(0), slots=4, have=(engine_name(0),))
    for tid in assigned(h, cid):
        report(h, cid, tid, 0)
    assert h.machine.run_state is not RunState.FINISHED  # open: more lines may come
    answer = command(h, {"do": "submit", "lines": ["echo b", "#DISBATCH AFTER 3", "echo c", "#DISBATCH REPEAT 2 x"]})
    assert answer == {"ids": [[1, 1], [2, 0], [2, 1], [3, 2]], "line": 6}
    refused = command(h, {"do": "submit", "lines": ["echo d", "#DISBATCH PERENGINE STOP echo bye", "echo e"]})
    assert refused["ids"] == [[5, 1]] and refused["refused"] == 1 and "line 8: #DISBATCH PERENGINE" in refused["error"]
    assert sorted(assigned(h, cid).values()) == ["echo b", "echo d", "x", "x"]  # 'echo c' waits for line 3
    restored = CoordinatorMachine(Open)
    restored.restore(h.machine.snapshot())
    assert restored.scheduler.query({"after": 0}) == h.machine.scheduler.query({"after": 0})
    for bad in ({"do": "submit", "lines": "echo"}, {"do": "submit", "lines": [7]}, {"do": "x"}, ["close"]):
        assert "error" in command(h, bad)
    assert command(h, {"do": "close"}) == {"closed": True, "tasks": 6}
    assert "input was closed" in command(h, {"do": "submit", "lines": ["echo late"]})["error"]
    assert command(h, {"do": "close"}) == {"closed": True, "tasks": 6}  # closing again is no error
    while h.machine.run_state is not RunState.FINISHED:
        tid = next(iter(assigned(h, cid)))
        report(h, cid, tid, 0)
    ids = sorted(parse_status_line(line).task_id for line in lines(h) if line[3] == " ")
    assert ids == [0, 1, 2, 3, 4, 5]
    assert isinstance(h.op({"op": "command", "body": {"do": "close"}}), Refused)  # the computation finished
    assert replay(Open, h.batches).digest == h.applier.digest


def test_a_batch_not_started_open_refuses_lines() -> None:
    h = Harness(Plain)
    h.init()
    assert "not started open" in command(h, {"do": "submit", "lines": ["echo x"]})["error"]


class TwoEngines(BatchScheduler):
    CONFIG = {**BASE, "engines": [0, 1], "taskfile": b"true\nsleep 9\n"}


class StopDue(BatchScheduler):
    CONFIG = {**BASE, "taskfile": b"#DISBATCH PERENGINE STOP echo bye\ntrue\n"}


def test_the_answer_names_busy_engines_once_no_task_will_start() -> None:
    h = Harness(TwoEngines)
    h.init()
    # Both tasks started, neither placed: no engine may go, since either may get them.
    assert h.machine.scheduler.query({})["retire"] == {"busy": [], "unplaced": 2}
    a = join(h, engine_name(0), slots=1, have=(engine_name(0),))
    b = join(h, engine_name(1), slots=1, have=(engine_name(1),))
    placed = {cid: assigned(h, cid) for cid in (a, b)}
    assert sorted(c for v in placed.values() for c in v.values()) == ["sleep 9", "true"]
    quick = next(cid for cid, v in placed.items() if "true" in v.values())
    report(h, quick, next(iter(placed[quick])), 0)
    slow_name = engine_name(1) if quick == a else engine_name(0)
    assert h.machine.scheduler.query({})["retire"] == {"busy": [slow_name], "unplaced": 0}
    # While PERENGINE STOP is due on every engine, none is retired.
    h = Harness(StopDue)
    h.init()
    assert h.machine.scheduler.query({})["retire"] is None
