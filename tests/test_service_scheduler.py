"""The service's queue scheduler on one replica's machine, with simulated workers.

Also the SDK hooks it uses (``command``, ``query``, ``task_killed``) and the
``worker`` op (tags, drain), which any scheduler gets.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import pytest
from coordinator_harness import Harness, Sim
from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.machine import CoordinatorMachine, RunState
from tasksprint.coordinator.ops import BadOp, Cancelled, Commanded, Refused, WorkerChanged
from tasksprint.coordinator.specs import COMMAND_KEYS, COMMAND_TASK, USAGE_KEYS, record_outputs
from tasksprint.exec.spec import CommandRecord, Verdict
from tasksprint.service.records import pack, unpack
from tasksprint.service.scheduler import MAX_BATCH, QueueScheduler, check_spec


def fake_command(task: dict[str, Any], *inputs: Any, **kwargs: Any) -> dict[str, Any]:
    """What a worker reports for a command that exited 0 (the record's fields the scheduler reads)."""
    return {"verdict": "ok", "exit_code": 0, "started": 1.0, "finished": 2.0, "host": "h", "stdout": None}


def sim() -> Sim:
    return Sim(QueueScheduler, {COMMAND_TASK: fake_command})


def submit(s: Sim, *specs: dict[str, Any]) -> list[int]:
    answer = s.h.op({"op": "command", "body": {"do": "submit", "tasks": list(specs)}})
    assert isinstance(answer, Commanded), answer
    assert "first" in answer.value, answer.value
    first, count = answer.value["first"], answer.value["count"]
    assert count == len(specs)
    return list(range(first, first + count))


def ask(s: Sim, **args: Any) -> Any:
    return s.machine.scheduler_query(args)


def state(s: Sim, sid: int) -> str:
    return ask(s, q="info", id=sid)["state"]


def test_after_dependencies_hold_a_task_until_they_are_done() -> None:
    s = sim()
    a, b = submit(s, {"cmd": "echo a", "job": "j"}, {"argv": ["echo", "b"], "after": [1], "name": "second"})
    assert (a, b) == (1, 2)
    assert state(s, a) == "pending" and state(s, b) == "waiting"
    info = ask(s, q="info", id=b)
    assert info["after"] == [1] and info["tid"] is None and info["command"] == "echo b" and info["name"] == "second"
    cid = s.join("w1", slots=2)
    s.poll(cid)
    assert state(s, a) == "running" and ask(s, q="info", id=a)["workers"] == ["w1"]
    s.run()
    assert state(s, a) == "done" and state(s, b) == "done"
    info = ask(s, q="info", id=a)
    assert info["exit_code"] == 0 and info["start"] == 1.0 and info["finish"] == 2.0 and info["job"] == "j"
    # A task submitted after done tasks starts at once (the worker has room).
    (c,) = submit(s, {"cmd": "true", "after": [a, b]})
    assert state(s, c) == "running"
    s.machine.check_invariants()


def test_info_shows_the_usage_figures_of_the_commands_record() -> None:
    # The record as a worker reports it: every field of a real run's record, as plain data.
    run = CommandRecord(
        verdict=Verdict.MEMORY,
        signal=9,
        elapsed_s=1.5,
        user_cpu_s=0.25,
        system_cpu_s=0.125,
        peak_memory_bytes=4096,
        limits_hit=(Verdict.MEMORY,),
        host="h",
    )
    record = record_outputs(run)
    assert set(USAGE_KEYS) <= set(COMMAND_KEYS) <= set(record)
    s = Sim(QueueScheduler, {COMMAND_TASK: lambda task, *inputs, **kwargs: record})
    (a,) = submit(s, {"cmd": "true"})
    s.poll(s.join("w1", slots=1))
    s.run()
    usage = ask(s, q="info", id=a)["usage"]
    assert usage == {key: record[key] for key in USAGE_KEYS}
    assert usage["peak_memory_bytes"] == 4096 and usage["limits_hit"] == ["memory"] and usage["signal"] == 9


def test_require_waits_for_a_worker_with_the_tag_and_want_prefers_one() -> None:
    s = sim()
    cpu = s.join("cpu-box", have=("cpu",))
    gpu, pref = submit(s, {"cmd": "train", "require": ["gpu"]}, {"cmd": "x", "want": ["fast"]})
    s.run()
    assert state(s, gpu) == "pending" and state(s, pref) == "done"
    rows = ask(s, q="status", tag="gpu")["tasks"]
    assert [r["id"] for r in rows] == [gpu] and rows[0]["require"] == ["gpu"]
    changed = s.h.op({"op": "worker", "client": "cpu-box", "add": ["gpu"], "remove": ["cpu"]})
    assert changed == WorkerChanged(cid=cpu, tags=("gpu",), drained=False, effects=changed.effects)
    s.poll(cpu)
    assert state(s, gpu) == "running"
    # A later join under the same name keeps the operator's change.
    s.h.op({"op": "join", "client": "cpu-box", "addr": "cpu-box:7000", "slots": 2, "have": ["cpu"]})
    assert s.machine.state.clients[cpu].tags == frozenset({"gpu"})
    s.run()
    assert state(s, gpu) == "done"


def test_drain_lets_running_tasks_finish_and_takes_nothing_more() -> None:
    s = sim()
    cid = s.join("w", slots=1)
    first, second = submit(s, {"cmd": "a"}, {"cmd": "b"})
    s.poll(cid)
    assert state(s, first) == "running" and state(s, second) == "pending"
    assert s.h.op({"op": "worker", "client": "w", "drain": True}).drained
    s.complete(cid, s.runnable(cid)[0])
    s.run()
    assert state(s, first) == "done" and state(s, second) == "pending"
    other = s.join("v", slots=1)
    s.poll(other)
    assert state(s, second) == "running"


def test_cancel_cascades_to_dependents_and_kills_the_running_command() -> None:
    s = sim()
    cid = s.join("w", slots=2)
    a, b, c, d = submit(s, {"cmd": "sleep 100"}, {"cmd": "b", "after": [1]}, {"cmd": "c", "after": [2]}, {"cmd": "d"})
    s.poll(cid)
    tid_a = ask(s, q="info", id=a)["tid"]
    answer = s.h.op({"op": "command", "body": {"do": "cancel", "ids": [a]}})
    assert answer.value == {"cancelled": [a, b, c]}
    s.poll(cid)
    assert tid_a in s.killed[cid]
    assert [state(s, x) for x in (a, b, c)] == ["cancelled"] * 3
    assert "was cancelled" in ask(s, q="info", id=c)["error"]
    s.run()
    assert state(s, d) == "done"
    # A task submitted after a cancelled one is cancelled with it at once.
    (e,) = submit(s, {"cmd": "e", "after": [b]})
    assert state(s, e) == "cancelled"
    assert s.machine.run_state is RunState.RUNNING


def test_cancel_by_job_and_a_failure_cancels_dependents() -> None:
    s = sim()
    cid = s.join("w", slots=4)
    ids = submit(s, {"cmd": "x", "job": "nightly"}, {"cmd": "y", "job": "nightly"}, {"cmd": "z"})
    assert ask(s, q="job", job="nightly") == ids[:2]
    answer = s.h.op({"op": "command", "body": {"do": "cancel", "job": "nightly"}})
    assert answer.value == {"cancelled": ids[:2]}
    f, g = submit(s, {"cmd": "false"}, {"cmd": "after-false", "after": [ids[-1] + 1]})
    s.poll(cid)
    s.fail(cid, ask(s, q="info", id=f)["tid"], "command failed: verdict exit_code; exit code 1")
    assert state(s, f) == "failed" and state(s, g) == "cancelled"
    assert "failed" in ask(s, q="info", id=g)["error"]


def test_a_cancel_op_from_outside_reaches_task_killed() -> None:
    s = sim()
    a, b = submit(s, {"cmd": "a"}, {"cmd": "b", "after": [1]})
    tid = ask(s, q="info", id=a)["tid"]
    answer = s.h.op({"op": "cancel", "tid": tid})
    assert isinstance(answer, Cancelled) and answer.killed == (tid,)
    assert state(s, a) == "cancelled" and state(s, b) == "cancelled"
    assert s.machine.run_state is RunState.RUNNING


class Planned(Coordinator):
    """A computation with a final task and no task_killed hook."""

    def init(self, seed: int) -> None:
        self.last = self.start_task(cmd="sleep 100")

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.finish([tid])


class Forgiving(Planned):
    def task_killed(self, tid: int) -> None:
        self.finish(values={"cancelled": tid})


def test_cancelling_a_computations_final_task_ends_it() -> None:
    h = Harness(Planned)
    h.init()
    answer = h.op({"op": "cancel", "tid": 1})
    assert isinstance(answer, Cancelled) and answer.killed == (1,)
    assert h.machine.run_state is RunState.FAILED
    failure = h.status["failure"]
    assert failure["kind"] == "cancel" and failure["tid"] == 1 and "task_killed" in failure["message"]

    h = Harness(Forgiving)
    h.init()
    h.op({"op": "cancel", "tid": 1})
    assert h.machine.run_state is RunState.FINISHED and h.status["result"]["values"] == {"cancelled": 1}


def test_hostile_commands_and_questions_are_refused_without_harm() -> None:
    s = sim()
    bad = [
        "not a map",
        {"do": "explode"},
        {"do": "submit", "tasks": []},
        {"do": "submit", "tasks": [{"cmd": "a", "argv": ["b"]}]},
        {"do": "submit", "tasks": [{"cmd": ""}]},
        {"do": "submit", "tasks": [{"cmd": "a", "after": [99]}]},
        {"do": "submit", "tasks": [{"cmd": "a", "retries": -1}]},
        {"do": "submit", "tasks": [{"cmd": "a", "timeout": float("nan")}]},
        {"do": "submit", "tasks": [{"cmd": "a", "env": {"A=B": "c"}}]},
        {"do": "submit", "tasks": [{"cmd": "a", "limits": {"rockets": 1}}]},
        {"do": "submit", "tasks": [{"cmd": "a", "require": "gpu"}]},
        {"do": "submit", "tasks": [{"cmd": "a", "colour": "red"}]},
        {"do": "submit", "tasks": [{"cmd": "ok"}, {"cmd": 3}]},
        {"do": "submit", "tasks": [{"cmd": "a"}] * (MAX_BATCH + 1)},
        {"do": "cancel", "ids": [12345]},
        {"do": "cancel", "job": "nope"},
    ]
    for body in bad:
        answer = s.h.op({"op": "command", "body": body})
        assert isinstance(answer, Commanded) and "error" in answer.value, (body, answer)
    assert ask(s, q="status")["total"] == 0 and s.machine.run_state is RunState.RUNNING
    assert "task 2 of 2" in s.h.op({"op": "command", "body": bad[12]}).value["error"]
    for args in ({"q": "status", "limit": 10**9}, {"q": "what"}, {"q": "states", "ids": "x"}):
        with pytest.raises(BadOp):
            s.machine.scheduler_query(args)
    assert ask(s, q="info", id=77) is None
    answer = s.h.op({"op": "worker", "client": "ghost", "add": ["gpu"]})
    assert isinstance(answer, Refused) and answer.code == "unknown"
    answer = s.h.op({"op": "worker", "client": "w", "add": "gpu"})
    assert isinstance(answer, Refused) and answer.code == "malformed"


def test_a_scheduler_without_command_or_query_hooks_refuses_them() -> None:
    h = Harness(Planned)
    h.init()
    answer = h.op({"op": "command", "body": {"do": "submit"}})
    assert isinstance(answer, Refused) and answer.code == "unknown" and "takes no commands" in answer.error
    with pytest.raises(BadOp, match="answers no queries"):
        h.machine.scheduler_query({})


def test_status_pages_and_filters() -> None:
    s = sim()
    submit(s, *({"cmd": f"t{i}", "job": "even" if i % 2 == 0 else "odd"} for i in range(25)))
    page = ask(s, q="status", offset=10, limit=5)
    assert page["total"] == 25 and [r["id"] for r in page["tasks"]] == [11, 12, 13, 14, 15]
    assert ask(s, q="status", job="odd", limit=100)["total"] == 12
    assert ask(s, q="status", state="running")["total"] == 0
    cid = s.join("w", slots=3)
    s.poll(cid)
    running = ask(s, q="status", state="running")
    assert running["total"] == 3 and all(r["workers"] == ["w"] for r in running["tasks"])
    assert ask(s, q="status", worker="w")["total"] == 3
    assert ask(s, q="states", ids=[1, 4, 999]) == {"1": "running", "4": "pending", "999": None}


def test_snapshot_keeps_the_queue() -> None:
    s = sim()
    cid = s.join("w", slots=1)
    submit(s, {"cmd": "a", "job": "j"}, {"cmd": "b", "after": [1]})
    s.poll(cid)
    copy = CoordinatorMachine(QueueScheduler)
    copy.restore(s.machine.snapshot())
    assert copy.scheduler_query({"q": "info", "id": 2}) == s.machine.scheduler_query({"q": "info", "id": 2})
    assert copy.scheduler_query({"q": "status"}) == s.machine.scheduler_query({"q": "status"})


def test_check_spec_normalizes() -> None:
    assert check_spec({"cmd": "x", "require": ["a", "a"], "retries": 0, "timeout": 2}) == {
        "cmd": "x",
        "require": ["a"],
        "timeout": 2.0,
    }


def test_retention_compacts_finished_tasks_out_of_the_coordinator() -> None:
    s = sim()
    answer = s.h.op({"op": "command", "body": {"do": "configure", "retention": 10}})
    assert answer.value == {"retention": 10.0, "window": 4096}
    assert "error" in s.h.op({"op": "command", "body": {"do": "configure", "retention": -1}}).value
    cid = s.join("w", slots=4)
    a, b, c = submit(s, {"cmd": "echo a", "job": "j"}, {"cmd": "b"}, {"cmd": "sleep", "after": [1]})
    s.poll(cid)
    s.complete(cid, ask(s, q="info", id=a)["tid"])
    s.h.tick(5.0)
    s.poll(cid)
    s.complete(cid, ask(s, q="info", id=b)["tid"])
    before = ask(s, q="info", id=a)
    tid_a = before["tid"]
    assert s.machine.task_info(tid_a) is not None and len(s.machine.state.tasks) == 3
    # Time passes; the next hook compacts what ended more than 10 s ago, and only that.
    s.h.tick(8.0)
    submit(s, {"cmd": "later"})
    assert s.machine.task_info(tid_a) is None and s.machine.state.forgotten == 1
    assert s.machine.task_info(ask(s, q="info", id=b)["tid"]) is not None
    # Its record left the state for the history, where info reads the answer it gave before.
    assert a not in s.machine.scheduler.recs  # type: ignore[union-attr]
    after = ask(s, q="info", id=a)
    assert after == {**before, "history": "archived"}
    assert ask(s, q="status", state="done")["counts"]["compacted"] == 1
    assert ask(s, q="states", ids=[a, b]) == {str(a): "done", str(b): "done"}
    assert ask(s, q="job", job="j") == [a] and ask(s, q="status", job="j")["total"] == 0
    s.machine.check_invariants()
    # A replica restored from a snapshot without the history says so; with it, it answers in full.
    copy = CoordinatorMachine(QueueScheduler)
    copy.restore(s.machine.snapshot())
    assert copy.scheduler_query({"q": "info", "id": a}) == {"id": a, "state": "done", "history": "missing"}
    copy.attach_history(s.machine._history)
    assert copy.scheduler_query({"q": "info", "id": a}) == after
    s.run()
    assert state(s, c) == "done"


def test_forget_task_refuses_active_and_read_tasks() -> None:
    class Forgetful(Coordinator):
        def init(self, seed: int) -> None:
            self.first = self.start_task(cmd="a")
            self.second = self.start_task(cmd="b", pretasks=[self.first])
            for tid in (self.first, 99):
                try:
                    self.forget_task(tid)
                except ValueError as exc:
                    self.errors = [*getattr(self, "errors", []), str(exc)]

    h = Harness(Forgetful)
    h.init()
    errors = h.machine.scheduler.errors  # type: ignore[union-attr]
    assert "pending" in errors[0] and "no task" in errors[1]


def submit_compact(s: Sim, specs: list[dict[str, Any]], each: list[int]) -> Any:
    return s.h.op({"op": "command", "body": {"do": "submit", "specs": specs, "each": each}}).value


def test_compact_submission_checks_each_distinct_spec_once_and_shares_it() -> None:
    s = sim()
    answer = submit_compact(s, [{"argv": ["true"]}, {"cmd": "echo b", "job": "j"}], [0, 1, 0, 0, 1])
    assert answer == {"first": 1, "count": 5}
    recs = s.machine.scheduler.recs  # type: ignore[union-attr]
    assert recs[1].spec is recs[3].spec is recs[4].spec and recs[2].spec is recs[5].spec
    assert ask(s, q="job", job="j") == [2, 5]
    assert ask(s, q="info", id=4)["command"] == "true" and ask(s, q="info", id=5)["command"] == "echo b"
    s.join("w", slots=8)
    s.run()
    assert [state(s, i) for i in range(1, 6)] == ["done"] * 5 and ask(s, q="info", id=5)["worker"] == "w"
    # 'after' is checked against the first task that uses the spec.
    later = submit_compact(s, [{"cmd": "x"}, {"cmd": "y", "after": [7]}], [0, 0, 1])
    assert later == {"first": 6, "count": 3}
    refused = submit_compact(s, [{"cmd": "y", "after": [10]}, {"cmd": "x"}], [1, 0])
    assert "task 2 of 2" in refused["error"] and "unknown task id" in refused["error"]
    bad: list[Any] = [
        ([{"cmd": "x"}], []),
        ([{"cmd": "x"}], [1]),
        ([{"cmd": "x"}], [-1]),
        ([{"cmd": "x"}], [True]),
        ([{"cmd": "x"}], "0"),
        ([{"cmd": "x"}, {"cmd": "y"}], [0]),
        ([], [0]),
        ({"cmd": "x"}, [0]),
        ([{"cmd": "x"}], [0] * (MAX_BATCH + 1)),
        ([{"cmd": "x"}, {"cmd": ""}], [0, 1]),
    ]
    for specs, each in bad:
        assert "error" in submit_compact(s, specs, each), (specs, each)
    assert ask(s, q="status", state="all")["total"] == 8
    s.machine.check_invariants()


def test_admission_window_keeps_waiting_tasks_out_of_the_coordinator() -> None:
    s = sim()
    assert s.h.op({"op": "command", "body": {"do": "configure", "window": 2}}).value["window"] == 2
    for bad in (0, -1, 1.5, "2", 10**7):
        assert "error" in s.h.op({"op": "command", "body": {"do": "configure", "window": bad}}).value
    ids = submit(s, *({"cmd": f"t{i}"} for i in range(5)))
    # Two are coordinator tasks; the other three wait here, shown as pending all the same.
    assert len(s.machine.state.tasks) == 2
    assert [state(s, i) for i in ids] == ["pending"] * 5
    assert ask(s, q="status", state="pending")["total"] == 5
    assert ask(s, q="status")["counts"]["queued"] == 5
    assert [ask(s, q="info", id=i)["tid"] is None for i in ids] == [False, False, True, True, True]
    # Cancelling a task that never reached the coordinator leaves the others' order alone.
    assert s.h.op({"op": "command", "body": {"do": "cancel", "ids": [ids[2]]}}).value == {"cancelled": [ids[2]]}
    cid = s.join("w", slots=1)
    s.poll(cid)
    order = []
    while s.runnable(cid):
        tid = s.runnable(cid)[0]
        order.append(next(i for i in ids if ask(s, q="info", id=i)["tid"] == tid))
        s.complete(cid, tid)
        assert len([t for t in s.machine.state.tasks.values() if not t.reported]) <= 2
        s.poll(cid)
    assert order == [ids[0], ids[1], ids[3], ids[4]]
    assert [state(s, i) for i in ids] == ["done", "done", "cancelled", "done", "done"]
    assert s.h.op({"op": "command", "body": {"do": "cancel", "ids": [ids[2]]}}).value == {"cancelled": []}
    s.machine.check_invariants()


def test_tasks_no_worker_can_take_do_not_hold_up_others() -> None:
    s = sim()
    s.h.op({"op": "command", "body": {"do": "configure", "window": 1}})
    s.join("cpu", have=("cpu",), slots=1)
    gpu = submit(s, *({"cmd": "train", "require": ["gpu"]} for _ in range(3)))
    plain = submit(s, {"cmd": "a"}, {"cmd": "b", "require": ["cpu"]}, {"cmd": "c"})
    s.run()
    assert [state(s, i) for i in plain] == ["done"] * 3
    assert [state(s, i) for i in gpu] == ["pending"] * 3
    # Raising the window admits more of a waiting class at once.
    s.h.op({"op": "command", "body": {"do": "configure", "window": 3}})
    assert all(ask(s, q="info", id=i)["tid"] is not None for i in gpu)
    s.h.op({"op": "worker", "client": "cpu", "add": ["gpu"]})
    s.run()
    assert [state(s, i) for i in gpu] == ["done"] * 3 and ask(s, q="info", id=gpu[0])["worker"] == "cpu"
    # The admission queues survive a snapshot: a copy carries on where the original stands.
    submit(s, *({"cmd": "again", "require": ["gpu"]} for _ in range(4)))
    copy = CoordinatorMachine(QueueScheduler)
    copy.restore(s.machine.snapshot())
    assert copy.scheduler_query({"q": "status"}) == s.machine.scheduler_query({"q": "status"})
    assert copy.scheduler.ready == s.machine.scheduler.ready  # type: ignore[union-attr]


def test_the_clients_compact_body_lists_each_distinct_spec_once() -> None:
    from tasksprint.service.api import submit_body

    one = {"argv": ["true"]}
    body = submit_body([one, {"argv": ["true"]}, {"cmd": "b"}, one, {"cmd": "b", "job": "j"}])
    assert body == {
        "do": "submit",
        "specs": [{"argv": ["true"]}, {"cmd": "b"}, {"cmd": "b", "job": "j"}],
        "each": [0, 0, 1, 0, 2],
    }
    s = sim()
    answer = s.h.op({"op": "command", "body": body}).value
    assert answer == {"first": 1, "count": 5}
    assert [ask(s, q="info", id=i)["command"] for i in range(1, 6)] == ["true", "true", "b", "true", "b"]
    assert ask(s, q="info", id=5)["job"] == "j"


def test_compacted_tasks_that_failed_still_cancel_their_late_dependents() -> None:
    s = sim()
    s.h.op({"op": "command", "body": {"do": "configure", "retention": 0}})
    cid = s.join("w", slots=2)
    bad, good = submit(s, {"cmd": "false", "job": "j"}, {"cmd": "true", "job": "j"})
    s.poll(cid)
    s.fail(cid, ask(s, q="info", id=bad)["tid"], "command failed: verdict exit_code; exit code 1")
    s.complete(cid, ask(s, q="info", id=good)["tid"])
    submit(s, {"cmd": "nudge"})  # the next command compacts what ended
    recs = s.machine.scheduler.recs  # type: ignore[union-attr]
    assert bad not in recs and good not in recs
    assert ask(s, q="states", ids=[bad, good, 99]) == {str(bad): "failed", str(good): "done", "99": None}
    late_bad, late_good = submit(s, {"cmd": "x", "after": [bad]}, {"cmd": "y", "after": [good]})
    assert state(s, late_bad) == "cancelled" and state(s, late_good) in ("pending", "running")
    assert s.h.op({"op": "command", "body": {"do": "cancel", "ids": [bad]}}).value == {"cancelled": []}
    assert s.h.op({"op": "command", "body": {"do": "cancel", "job": "j"}}).value == {"cancelled": []}
    assert ask(s, q="info", id=bad)["error"].startswith("command failed")
    assert ask(s, q="info", id=10**6) is None
    s.machine.check_invariants()


def test_archived_is_for_questions_only_and_a_damaged_record_reads_as_missing() -> None:
    from tasksprint_sdk.coordinator import SchedulerUsageError

    class Archiver(Coordinator):
        def init(self, seed: int) -> None:
            self.archive(1, {"a": [1, 2]})
            for bad in ((-1, {}), (2, {1, 2})):
                try:
                    self.archive(*bad)
                except (TypeError, ValueError) as exc:
                    self.errors = [*getattr(self, "errors", []), type(exc).__name__]
            try:
                self.archived(1)
            except SchedulerUsageError:
                self.errors.append("usage")

        def query(self, args: Any) -> Any:
            return self.archived(args)

    h = Harness(Archiver)
    h.init()
    assert h.machine.scheduler.errors == ["ValueError", "TypeError", "usage"]  # type: ignore[union-attr]
    assert h.machine.scheduler_query(1) == {"a": [1, 2]}
    assert h.machine.scheduler_query(2) is None and h.machine.scheduler_query("x") is None
    with pytest.raises(SchedulerUsageError):
        h.machine.scheduler.archive(3, {})  # type: ignore[union-attr]
    h.machine._history.put(1, b"\xff\x00garbage")
    assert h.machine.scheduler_query(1) is None


def test_sqlite_history_is_durable_at_each_snapshot(tmp_path: Any) -> None:
    from tasksprint.history import SqliteHistory

    s = sim()
    store = SqliteHistory.open(tmp_path, fsync=False)
    s.machine.attach_history(store)
    s.h.op({"op": "command", "body": {"do": "configure", "retention": 0}})
    cid = s.join("w", slots=2)
    (a,) = submit(s, {"cmd": "echo a"})
    s.run()
    before = ask(s, q="info", id=a)
    submit(s, {"cmd": "nudge"})
    assert ask(s, q="info", id=a) == {**before, "history": "archived"}
    other = SqliteHistory.open(tmp_path, fsync=False)
    assert other.get(a) is None  # buffered: the log still holds what archived it
    snap = s.machine.snapshot()
    assert other.get(a) is not None  # written before any snapshot that lacks the task
    copy = CoordinatorMachine(QueueScheduler)
    copy.restore(snap)
    copy.attach_history(other)
    assert copy.scheduler_query({"q": "info", "id": a}) == {**before, "history": "archived"}
    store.close()
    other.close()
    assert cid


def test_a_compaction_backlog_goes_a_bounded_number_per_event() -> None:
    from tasksprint.service import scheduler

    s = sim()
    cid = s.join("w", slots=4)
    ids = submit(s, *({"cmd": f"t{i}"} for i in range(7)))
    s.run()
    assert [state(s, i) for i in ids] == ["done"] * 7
    old = scheduler.MAX_COMPACT
    scheduler.MAX_COMPACT = 3
    try:
        s.h.op({"op": "command", "body": {"do": "configure", "retention": 0}})
        assert ask(s, q="status")["counts"]["compacted"] == 3
        s.h.op({"op": "command", "body": {"do": "configure", "retention": 0}})
        s.h.op({"op": "command", "body": {"do": "configure", "retention": 0}})
    finally:
        scheduler.MAX_COMPACT = old
    assert ask(s, q="status")["counts"]["compacted"] == 7 and not s.machine.scheduler.recs  # type: ignore[union-attr]
    assert all(ask(s, q="info", id=i)["history"] == "archived" for i in ids) and cid


def test_a_snapshot_keeps_every_record_and_shares_specs_as_before() -> None:
    s = sim()
    s.h.op({"op": "command", "body": {"do": "configure", "window": 2}})
    cid = s.join("w", slots=1)
    spec = {"argv": ["true"], "job": "j", "name": "n", "require": [], "limits": {"cpus": 1.5}}
    submit_compact(s, [spec, {"cmd": "false"}, {"cmd": "x", "after": [2]}], [0, 1, 2, 0, 0])
    s.poll(cid)
    s.fail(cid, s.runnable(cid)[0], "boom")
    s.poll(cid)
    copy = CoordinatorMachine(QueueScheduler)
    copy.restore(s.machine.snapshot())
    mine, theirs = s.machine.scheduler, copy.scheduler
    assert isinstance(mine, QueueScheduler) and isinstance(theirs, QueueScheduler)
    for sid, rec in mine.recs.items():
        assert rec.__getstate__() == theirs.recs[sid].__getstate__(), sid
    assert theirs.recs[4].spec is theirs.recs[5].spec
    for attr in ("open", "ready", "jobs", "ended", "by_tid", "dependents", "gone", "started", "tally", "next_id"):
        assert getattr(mine, attr) == getattr(theirs, attr), attr
    assert type(theirs.recs[1].after) is tuple and type(theirs.ready[()]) is collections.deque


def test_a_task_the_coordinator_refuses_does_not_use_up_its_window() -> None:
    s = sim()
    s.h.op({"op": "command", "body": {"do": "configure", "window": 1}})
    refused, fine = submit(s, {"cmd": "a", "limits": {"cpus": -5}}, {"cmd": "b"})
    info = ask(s, q="info", id=refused)
    assert info["state"] == "failed" and "cannot start" in info["error"]
    assert ask(s, q="info", id=fine)["tid"] is not None
    # Limit values that are not numbers or strings are refused at submission.
    answer = s.h.op({"op": "command", "body": {"do": "submit", "tasks": [{"cmd": "c", "limits": {"pids": b"x"}}]}})
    assert "'limits' 'pids'" in answer.value["error"]


def _status_by_scan(sched: QueueScheduler, **filters: Any) -> list[int]:
    """Every unfinished id ``status`` must list for ``filters``, found by looking at each task."""
    out = []
    for sid in sched.open:
        row = sched._row(sid)
        want = filters.get("state")
        if want is not None and row["state"] != want:
            continue
        if "tag" in filters and filters["tag"] not in row["require"] + row["want"]:
            continue
        if "worker" in filters and filters["worker"] not in row["workers"]:
            continue
        out.append(sid)
    return out


def test_filtered_status_reads_its_indexes_and_agrees_with_a_scan_of_every_task() -> None:
    """The indexes ``status`` reads (the coordinator's tasks, the blocked ones, tasks by
    tag) give what a scan of every task gives, in the same order, as tasks are submitted,
    admitted, run, fail, cancelled, and after a snapshot rebuilt them."""
    s = sim()
    s.h.op({"op": "command", "body": {"do": "configure", "window": 3}})
    specs: list[dict[str, Any]] = []
    for i in range(40):
        spec: dict[str, Any] = {"cmd": f"t{i}"}
        if i % 3 == 0:
            spec["want"] = ["fast"]
        if i % 5 == 0:
            spec["require"] = ["gpu"]
        if i % 4 == 1 and i > 4:
            spec["after"] = [i - 3]
        specs.append(spec)
    ids = submit(s, *specs)
    w1, w2 = s.join("w1", slots=2), s.join("w2", slots=2, have=("gpu",))
    s.poll(w1)
    s.poll(w2)
    filters = [{"state": st} for st in ("pending", "running", "waiting")] + [
        {"tag": "gpu"},
        {"tag": "fast"},
        {"tag": "none"},
        {"worker": "w1"},
        {"worker": "w2"},
    ]
    filters += [{"state": "pending", "tag": "fast"}, {"state": "running", "worker": "w2"}]

    def check(machine: CoordinatorMachine) -> None:
        sched = machine.scheduler
        assert isinstance(sched, QueueScheduler)
        for f in filters:
            want = _status_by_scan(sched, **f)
            for limit in (1, 4, 1000):
                for offset in (0, 2, len(want)):
                    page = machine.scheduler_query({"q": "status", "offset": offset, "limit": limit, **f})
                    assert page["total"] == len(want), (f, offset, limit)
                    assert [r["id"] for r in page["tasks"]] == want[offset : offset + limit], (f, offset, limit)

    check(s.machine)
    for step in range(6):
        for cid in (w1, w2):
            runnable = s.runnable(cid)
            if runnable and step % 2 == 0:
                s.complete(cid, runnable[0])
            elif runnable:
                s.fail(cid, runnable[0], "boom")
            s.poll(cid)
        s.h.op({"op": "command", "body": {"do": "cancel", "ids": [ids[10 + step]]}})
        check(s.machine)
    copy = CoordinatorMachine(QueueScheduler)
    copy.restore(s.machine.snapshot())
    check(copy)
    mine, theirs = s.machine.scheduler, copy.scheduler
    assert isinstance(mine, QueueScheduler) and isinstance(theirs, QueueScheduler)
    assert mine.blocked and mine.admitted and mine.tagged  # the run above exercised each index
    for attr in ("admitted", "blocked", "tagged"):
        assert getattr(mine, attr) == getattr(theirs, attr), attr
    # A snapshot taken before the indexes were saved has them rebuilt from the records.
    state = pack(dict(mine.__dict__))
    packed = json.loads(state["packed"])
    for attr in ("admitted", "blocked", "tagged"):
        del packed[attr]
    state["packed"] = json.dumps(packed)
    rebuilt = unpack(state)
    for attr in ("admitted", "blocked", "tagged"):
        assert rebuilt[attr] == getattr(mine, attr), attr
