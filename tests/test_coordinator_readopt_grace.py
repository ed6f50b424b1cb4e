"""A dead client's outputs are awaited for a grace before they are recomputed.

When every client is cut off at once, the first to come back must not start
recomputing the others' outputs (and, through released inputs, the whole
history before them) while those clients are on their way back to offer
them.  The TICK that declares clients dead carries the grace (the leader's
client timeout); until it has passed, or the client's name has joined again,
a lost output of theirs is not recomputed and its readers wait.
"""

from __future__ import annotations

from typing import Any

import pytest
from coordinator_harness import ECHO, ChainScheduler, Sim, chain_ran_on_x

from tasksprint.coordinator.machine import CoordinatorMachine
from tasksprint.machine import Applier

GRACE = 3.0


def all_cut_off(grace: Any = GRACE) -> tuple[Sim, Any, int, int, int]:
    """a and b ran on x (b held there, a released), c placed on y; then x and y are declared dead at once.

    w, a client that could run a and b, stays alive (the first to come back, say).
    """
    sim = Sim(ChainScheduler, ECHO)
    sched, x, y = chain_ran_on_x(sim)
    assert sim.machine.task_info(sched.a)["holder"] is None  # released: b, its reader, is done
    w = sim.join("w", slots=4, have=("x",))
    sim.h.tick(expired=(x, y), grace=grace)
    sim.machine.check_invariants()
    return sim, sched, x, y, w


def recomputing(sim: Sim, sched: Any) -> list[str]:
    return [sim.machine.task_info(t)["state"] for t in (sched.a, sched.b)]


def test_no_recompute_starts_while_the_dead_holder_may_come_back() -> None:
    sim, sched, x, y, w = all_cut_off()
    # b's output is lost with x, but x may bring it back: neither b nor a (its
    # released input) is run again, and the done count does not fall.
    assert recomputing(sim, sched) == ["done", "done"]
    assert sim.h.status["tasks"]["done"] == 2
    assert sim.poll(w)["tasks"] == []
    sim.h.tick(advance=1.0)
    # y comes back first (it held nothing): still nothing to recompute.
    y2 = sim.rejoin(y, "y", [], have=("y",)).cid
    assert sim.poll(w)["tasks"] == [] and recomputing(sim, sched) == ["done", "done"]
    # c, replaced when y died, waits for its input.
    assert sim.poll(y2)["tasks"] == [] and sim.machine.task_info(sched.c)["state"] == "pending"
    sim.h.tick(advance=1.0)
    # x comes back within the grace and offers b: taken back, c runs, nothing was redone.
    x2 = sim.rejoin(x, "x", [[sched.b, 1]], have=("x",))
    assert x2.adopted == (sched.b,)
    sim.run()
    assert sim.h.status["state"] == "finished"
    counts = sim.h.status["tasks"]
    assert (counts["completed"], counts["recomputed"], counts["readopted"]) == (3, 0, 1)
    assert [sim.machine.task_info(t)["attempt"] for t in (sched.a, sched.b)] == [1, 1]
    assert [tid for tid, _ in sched.done] == [sched.a, sched.b, sched.c]


def test_the_recompute_starts_when_the_grace_has_passed() -> None:
    sim, sched, x, y, w = all_cut_off()
    for _ in range(2):
        sim.h.tick(advance=1.0)
        assert recomputing(sim, sched) == ["done", "done"] and sim.poll(w)["tasks"] == []
    sim.h.tick(advance=1.0)  # GRACE seconds after the death: x is not waited for any longer
    assert recomputing(sim, sched) == ["running", "pending"]  # a runs on w, b waits for it
    assert [t["tid"] for t in sim.poll(w)["tasks"]] == [sched.a]
    y2 = sim.rejoin(y, "y", [], have=("y",)).cid
    sim.run()
    assert sim.h.status["state"] == "finished"
    assert sim.machine.task_info(sched.b)["holder"] == w
    assert sim.machine.task_info(sched.c)["holder"] == y2
    # x, back too late, offers b: the recompute that completed on w wins.
    late = sim.rejoin(x, "x", [[sched.b, 1]], have=("x",))
    assert late.adopted == ()
    counts = sim.h.status["tasks"]
    assert (counts["completed"], counts["recomputed"], counts["readopted"]) == (3, 2, 0)


def test_a_client_back_without_its_outputs_ends_the_wait_at_once() -> None:
    sim, sched, x, y, w = all_cut_off()
    # x's store was wiped (a restarted process): it offers nothing, and what it
    # held is recomputed now, not after the grace.
    sim.rejoin(x, "x", [], have=("x",))
    assert recomputing(sim, sched) == ["running", "pending"]
    sim.rejoin(y, "y", [], have=("y",))
    sim.run()
    assert sim.h.status["state"] == "finished"
    assert sim.h.status["tasks"]["recomputed"] == 2


def test_the_awaited_outputs_are_kept_until_taken_back() -> None:
    sim, sched, x, y, w = all_cut_off()
    # Only b was held (a was released before): only b is awaited, until GRACE after the death.
    assert sim.machine.state.awaiting == {sched.b: sim.h.now + GRACE}
    x2 = sim.rejoin(x, "x", [[sched.b, 1]], have=("x",)).cid
    assert sim.machine.state.awaiting == {}
    assert sim.machine.task_info(sched.b)["holder"] == x2


@pytest.mark.parametrize("grace", [0, 0.0, -1.0, float("nan"), float("inf"), 1e9, True, "3", None, [3]])
def test_no_or_a_malformed_grace_recomputes_at_once(grace: Any) -> None:
    sim, sched, x, y, w = all_cut_off(grace=grace)
    assert recomputing(sim, sched) == ["running", "pending"]
    assert [t["tid"] for t in sim.poll(w)["tasks"]] == [sched.a]
    assert sim.machine.state.awaiting == {}


def test_the_wait_survives_a_snapshot() -> None:
    sim, sched, x, y, w = all_cut_off()
    cut = len(sim.h.batches)
    snap = sim.h.applier.snapshot()
    awaiting = dict(sim.machine.state.awaiting)
    assert awaiting
    for _ in range(3):
        sim.h.tick(advance=1.0)
    sim.rejoin(y, "y", [], have=("y",))
    sim.run()
    assert sim.h.status["state"] == "finished"

    fresh = Applier(CoordinatorMachine(ChainScheduler))
    fresh.restore(snap)
    restored = fresh.machine
    assert isinstance(restored, CoordinatorMachine)
    assert restored.state.awaiting == awaiting
    for batch in sim.h.batches[cut:]:
        fresh.apply_slot(fresh.applied + 1, batch)
        restored.check_invariants()
    assert fresh.digest == sim.h.applier.digest
    assert restored.status() == sim.machine.status()
