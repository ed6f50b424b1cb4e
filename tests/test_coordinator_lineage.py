"""Coordinator task lifecycle: completion, kills, retries, failing hooks, dead clients, recomputation."""

from __future__ import annotations

import math

import pytest
from coordinator_harness import (
    ECHO,
    MONTECARLO,
    BuggyScheduler,
    ChainScheduler,
    FanInScheduler,
    FragileScheduler,
    KillScheduler,
    ManyScheduler,
    ReplicaScheduler,
    RetryingFanIn,
    Sim,
    TolerantScheduler,
    chain_ran_on_x,
    merge,
    montecarlo,
    names,
    run_on,
)
from tasksprint_sdk.coordinator import (
    load_scheduler,
)

from tasksprint.coordinator.ops import ErrorCode, Joined, Refused


def test_montecarlo_example_runs_to_completion(capsys: pytest.CaptureFixture[str]) -> None:
    cls = load_scheduler(MONTECARLO)
    sim = Sim(cls, {"montecarlo": montecarlo, "merge": merge})
    a = sim.join("alpha", slots=3)
    b = sim.join("beta", slots=2)
    assert (a, b) == (1, 2)
    sim.run()

    status = sim.h.status
    assert status["state"] == "finished" and status["finished"]
    assert status["tasks"]["done"] == 12 and status["tasks"]["total"] == 12
    final = sim.machine.scheduler.final
    expected = merge({}, *(sim.store[c][t]["result"] for c in sim.store for t in sim.store[c] if t != final))
    assert status["result"]["values"] == {"result": expected["result"]}
    assert status["result"]["tasks"] == [{"tid": final, "values": {"result": expected["result"]}}]
    assert math.isclose(expected["result"], math.pi, abs_tol=0.1)
    # The merge saw all eleven samples, fetched from the clients that made them.
    assert sim.machine.task_info(final)["pretasks"] == list(range(1, 12))
    out = capsys.readouterr()
    assert "Somebody joined!" not in out.out and "Task 12 is done" not in out.out
    assert "Somebody joined! 1" in out.err and "Task 12 is done" in out.err


def test_a_pretask_retried_or_replaced_keeps_the_early_placed_dependent_waiting() -> None:
    sim = Sim(RetryingFanIn, ECHO)
    sched = sim.machine.scheduler
    m1, m2 = sched.maps
    [red] = sched.reduces
    x = sim.join("x", slots=1)
    y = sim.join("y", slots=1)
    sim.poll(x), sim.poll(y)
    sim.complete(x, m1)
    assert names(sim.poll(x)["tasks"]) == [red]
    attempt = sim.machine.task_info(red)["attempt"]

    # m2 fails once: retried; the reduce stays where it is, still waiting.
    sim.fail(y, m2)
    assert sim.machine.task_info(m2)["attempt"] == 2
    info = sim.machine.task_info(red)
    assert (info["clients"], info["prefetching"], info["attempt"]) == ([x], [x], attempt)
    assert sim.poll(x)["kill"] == []
    # m2's client dies: m2 is placed again (on x, whose slot is free), the reduce still waits.
    sim.h.tick(expired=(y,))
    assert sim.machine.task_info(m2)["clients"] == [x]
    assert sim.machine.task_info(red)["prefetching"] == [x]
    view = sim.poll(x)
    assert names(view["tasks"]) == [m2] and view["kill"] == []
    assert sim.assigned[x][red]["inputs"][1]["cid"] is None
    sim.run()
    assert sim.h.status["result"]["values"] == "merged"
    assert sim.machine.task_info(red)["attempt"] == attempt


def test_a_pretask_failing_for_good_kills_the_early_placed_dependent() -> None:
    sim = Sim(FanInScheduler, ECHO)
    sched = sim.machine.scheduler
    m1, m2 = sched.maps
    [red] = sched.reduces
    x = sim.join("x", slots=1)
    y = sim.join("y", slots=1)
    sim.poll(x), sim.poll(y)
    sim.complete(x, m1)
    assert names(sim.poll(x)["tasks"]) == [red]
    sim.fail(y, m2, "no luck")
    assert sched.failures == [(m2, "no luck")]
    assert sim.machine.task_info(red)["state"] == "killed" and sim.machine.task_info(sched.merge)["state"] == "killed"
    assert sim.poll(x)["kill"] == [red]
    assert [(c["running"], c["prefetching"]) for c in sim.h.status["live_clients"]] == [(0, 0), (0, 0)]
    sim.machine.check_invariants()


def test_client_death_places_its_early_placed_tasks_again() -> None:
    sim = Sim(FanInScheduler, ECHO)
    sched = sim.machine.scheduler
    m1, m2 = sched.maps
    [red] = sched.reduces
    x = sim.join("x", slots=1)
    y = sim.join("y", slots=1)
    sim.poll(x), sim.poll(y)
    sim.complete(x, m1)
    assert sim.machine.task_info(red)["prefetching"] == [x]
    # x dies with the reduce waiting there and m1's output: m1 is recomputed,
    # the reduce waits for a new placement (no input exists now).
    sim.h.tick(expired=(x,))
    info = sim.machine.task_info(red)
    assert (info["state"], info["attempt"], info["clients"]) == ("pending", 2, [])
    assert sim.machine.task_info(m1)["state"] == "pending"
    # m2 finishes on y: the reduce goes there early, before m1 is recomputed.
    sim.complete(y, m2)
    info = sim.machine.task_info(red)
    assert (info["clients"], info["prefetching"]) == ([y], [y])
    assert sim.machine.task_info(m1)["clients"] == [y]  # y's slot was free for the recompute
    task = sim.poll(y)["tasks"]
    assert names(task) == [m1, red] and task[1]["attempt"] == 2
    late = sim.h.op({"op": "done", "cid": x, "tid": red, "attempt": 1, "values": {}, "sizes": {}})
    assert late.accepted is False
    sim.run()
    assert sim.h.status["result"]["values"] == "merged"


def test_a_placed_task_whose_input_is_lost_gives_its_slot_to_the_recompute() -> None:
    sim = Sim(FanInScheduler, ECHO)
    sched = sim.machine.scheduler
    m1, m2 = sched.maps
    [red] = sched.reduces
    x = sim.join("x", slots=1)
    y = sim.join("y", slots=1)
    sim.poll(x), sim.poll(y)
    sim.complete(x, m1)
    sim.complete(y, m2)
    assert sim.machine.task_info(red)["clients"] == [x] and sim.machine.task_info(red)["prefetching"] == []
    # y dies with m2's output; the reduce on x now misses an input again,
    # so it gives up x's only slot, and m2's recompute runs there.
    sim.h.tick(expired=(y,))
    assert sim.machine.task_info(red)["prefetching"] == [x]
    assert sim.machine.task_info(m2)["clients"] == [x]
    sim.run()
    assert sim.h.status["result"]["values"] == "merged"


def test_kill_task_kills_everything_that_depends_on_it() -> None:
    sim = Sim(KillScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=4)
    assert [t["tid"] for t in sim.poll(cid)["tasks"]] == [sched.a, sched.d]
    sim.complete(cid, sched.d)
    assert sched.killed == [sched.a, sched.b, sched.e, sched.c]
    for tid in (sched.a, sched.b, sched.c, sched.e):
        assert sim.machine.task_info(tid)["state"] == "killed"
    view = sim.poll(cid)
    assert view["kill"] == [sched.a] and view["tasks"] == []
    assert sim.h.status["tasks"]["killed"] == 4
    late = sim.h.op({"op": "done", "cid": cid, "tid": sched.a, "attempt": 1, "values": {}, "sizes": {}})
    assert late.accepted is False and "killed" in late.reason


def test_cancel_from_the_command_line_cascades() -> None:
    sim = Sim(ChainScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=1, have=("x",))
    assert sim.h.op({"op": "cancel", "tid": sched.a}).killed == (sched.a, sched.b, sched.c)
    assert sim.poll(x)["tasks"] == []
    unknown = sim.h.op({"op": "cancel", "tid": 99})
    assert isinstance(unknown, Refused) and unknown.error == "cancel: unknown task 99"
    assert unknown.code == ErrorCode.UNKNOWN.value


def test_dead_client_tasks_are_placed_again_and_its_late_report_ignored() -> None:
    sim = Sim(ChainScheduler, ECHO)
    sched = sim.machine.scheduler
    first = sim.join("first", slots=1, have=("x",))
    assert [t["tid"] for t in sim.poll(first)["tasks"]] == [sched.a]
    sim.h.tick(expired=(first,))
    assert sched.dead == [first]
    assert sim.machine.task_info(sched.a)["state"] == "pending"
    gone = sim.machine.view(first, 0)
    assert gone.alive is False and gone.tasks == ()
    second = sim.join("second", slots=1, have=("x",))
    task = sim.poll(second)["tasks"][0]
    assert (task["tid"], task["attempt"]) == (sched.a, 2)
    late = sim.h.op({"op": "done", "cid": first, "tid": sched.a, "attempt": 1, "values": {}, "sizes": {}})
    assert late.accepted is False and "dead" in late.reason
    assert sim.complete(second, sched.a).accepted
    # A client that comes back under its old name is a new client.
    assert sim.join("first", slots=1) == 3


def test_lost_outputs_are_recomputed_from_lineage() -> None:
    sim = Sim(ChainScheduler, ECHO)
    # a and b ran on x; c now runs on y and needs b's output, held only by x.
    sched, x, y = chain_ran_on_x(sim)
    before = sim.seen[y]
    sim.h.tick(expired=(x,))
    assert sched.dead == [x]
    info_b, info_a = sim.machine.task_info(sched.b), sim.machine.task_info(sched.a)
    assert (info_b["state"], info_b["attempt"]) == ("pending", 2)
    assert (info_a["state"], info_a["attempt"]) == ("pending", 2)  # b's own input was lost too
    view = sim.poll(y)
    assert view["tasks"] == [] and view["version"] > before
    assert view["holders"] == [{"tid": sched.b, "cid": None, "addr": None}]

    x2 = sim.join("x2", slots=4, have=("x",))
    sim.run()
    assert sim.h.status["state"] == "finished"
    assert sim.machine.task_info(sched.b)["holder"] == x2
    # task_done ran once per task even though a and b ran twice.
    assert [tid for tid, _ in sched.done] == [sched.a, sched.b, sched.c]


def test_a_lost_report_recomputes_the_output() -> None:
    sim = Sim(ChainScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=4, have=("x",))
    y = sim.join("y", slots=4, have=("y",))
    run_on(sim, x)
    assert [t["tid"] for t in sim.poll(y)["tasks"]] == [sched.c]
    result = sim.h.op({"op": "lost", "cid": y, "tid": sched.b, "key": "out"})
    assert result.accepted
    # b runs again, and so does a: its outputs were released once b, its only reader, had them.
    assert sim.machine.task_info(sched.a)["attempt"] == 2
    assert sim.machine.task_info(sched.a)["clients"] == [x]
    sim.run()
    assert sim.h.status["state"] == "finished"


def test_replicated_task_commits_once_and_the_other_copy_is_killed() -> None:
    sim = Sim(ReplicaScheduler, ECHO)
    sched = sim.machine.scheduler
    one = sim.join("one", slots=2)
    two = sim.join("two", slots=2)
    for cid in (one, two):
        assert [t["tid"] for t in sim.poll(cid)["tasks"]] == [sched.t]
    assert sim.machine.task_info(sched.t)["clients"] == [one, two]
    task_two = sim.assigned[two][sched.t]
    assert sim.complete(one, sched.t).accepted
    assert sim.poll(two)["kill"] == [sched.t]
    dup = sim.h.op(
        {"op": "done", "cid": two, "tid": sched.t, "attempt": task_two["attempt"], "values": {"out": 1}, "sizes": {}}
    )
    assert dup.accepted is False and "done" in dup.reason
    assert [tid for tid, _ in sched.done] == [sched.t]
    assert sim.machine.task_info(sched.t)["holder"] == one
    sim.machine.check_invariants()


def test_failures_are_retried_then_fail_the_computation_with_a_report() -> None:
    sim = Sim(FragileScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=1)
    sim.poll(cid)
    assert sim.fail(cid, sched.t, "ValueError: bad input").accepted
    task = sim.poll(cid)["tasks"][0]
    assert (task["tid"], task["attempt"]) == (sched.t, 2)
    sim.fail(cid, sched.t, "ValueError: bad input again")
    status = sim.h.status
    assert status["state"] == "failed"
    message = status["failure"]["message"]
    assert f"task {sched.t} ('f')" in message and "bad input again" in message and "task_failed" in message
    assert sim.machine.task_info(sched.dep)["state"] == "killed"
    assert sim.poll(cid)["state"] == "failed"


def test_task_failed_hook_handles_exhausted_retries() -> None:
    sim = Sim(TolerantScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=1)
    for _ in range(2):
        sim.poll(cid)
        sim.fail(cid, sched.t, "oops")
    assert sched.failures == [(sched.t, "oops")]
    assert sim.h.status["state"] == "running"
    assert sim.machine.task_info(sched.t)["state"] == "failed"
    assert sim.machine.task_info(sched.dep)["state"] == "killed"
    assert [t["tid"] for t in sim.poll(cid)["tasks"]] == [sched.fallback]


def test_a_raising_hook_fails_the_computation_with_hook_task_and_slot() -> None:
    sim = Sim(BuggyScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=2)
    sim.poll(cid)
    assert sim.complete(cid, sched.a).accepted
    sim.complete(cid, sched.b)
    slot = sim.h.applier.applied
    failure = sim.h.status["failure"]
    assert failure["hook"] == "task_done" and failure["tid"] == sched.b and failure["slot"] == slot
    assert f"BuggyScheduler.task_done(tid={sched.b})" in failure["message"]
    assert f"log slot {slot}" in failure["message"] and "ZeroDivisionError" in failure["message"]
    assert "coordinator_harness.py line" in failure["message"]
    assert sim.machine.last_hook == {"hook": "task_done", "tid": sched.b, "cid": None, "slot": slot}
    # The cluster stays up: ops are answered, status and views keep working.
    assert isinstance(sim.h.op({"op": "join", "client": "late", "addr": "late:1", "slots": 1, "have": []}), Joined)
    sim.h.tick()
    assert sim.h.status["state"] == "failed" and sim.machine.view(cid, 0).state == "failed"
    sim.machine.check_invariants()


def test_a_dead_clients_queued_tasks_are_placed_again() -> None:
    sim = Sim(ManyScheduler, ECHO)
    x = sim.join("x", slots=1)
    h = sim.h
    y = h.op({"op": "join", "client": "y", "addr": "y:7000", "slots": 1, "queue": 6, "have": []}).cid
    sim.store[y], sim.assigned[y], sim.seen[y], sim.killed[y] = {}, {}, 0, []
    on_y = names(sim.poll(y)["tasks"])
    assert len(on_y) == 7  # one running, six waiting in its node pool
    # y dies with all seven placed there (the machine cannot tell which had started).
    h.tick(expired=(y,))
    for tid in on_y:
        info = sim.machine.task_info(tid)
        assert (info["attempt"], info["state"], info["clients"]) == (2, "pending", []), info
    # They come first again, in tid order, as x frees its slot.
    [first] = names(sim.poll(x)["tasks"])
    sim.complete(x, first)
    assert names(sim.poll(x)["tasks"]) == [on_y[0]]
    assert sim.machine.task_info(on_y[0])["clients"] == [x]
    sim.run(max_rounds=500)
    assert h.status["state"] == "finished" and h.status["result"]["values"] == ManyScheduler.N
