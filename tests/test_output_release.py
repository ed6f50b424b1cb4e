"""Outputs no task needs any more are released: the client holding them drops them (issue 11).

The simulated clients of ``coordinator_harness.Sim`` drop released outputs
from their stores as the real client does, so a task that still needed one
could not run: every computation here must still finish.
"""

from __future__ import annotations

from typing import Any

from coordinator_harness import ECHO, Sim
from tasksprint_sdk.coordinator import Coordinator

CHAIN = 5


class Chain(Coordinator):
    """t1 -> t2 -> ... -> t5, each reading the previous one's output."""

    def init(self, seed: int) -> None:
        self.tids = [self.start_task("a", keys=["out"])]
        for _ in range(CHAIN - 1):
            self.tids.append(self.start_task("b", pretasks=[self.tids[-1]], prekeys=["out"], keys=["out"]))

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        if tid == self.tids[-1]:
            self.finish(taskids=[tid], values=values)


def _step(sim: Sim, cid: int) -> int:
    """Poll and complete the one runnable task on ``cid``; returns its tid."""
    sim.poll(cid)
    (tid,) = sim.runnable(cid)
    assert sim.complete(cid, tid).accepted
    return tid


def test_in_a_chain_each_output_is_dropped_once_its_reader_is_done() -> None:
    sim = Sim(Chain, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=1)
    done = [_step(sim, x)]
    assert sim.store[x].keys() == {done[0]}
    for i in range(1, CHAIN - 1):
        done.append(_step(sim, x))
        view = sim.poll(x)
        # The previous output was read by the task just done: released, dropped; the new one is kept.
        assert view["released"] == [done[i - 1]]
        assert sim.store[x].keys() == {done[i]}
        info = sim.machine.task_info(done[i - 1])
        assert (info["state"], info["holder"]) == ("done", None)
    last = _step(sim, x)
    assert sim.h.status["state"] == "finished"
    # The last output (no task reads it: a result) is kept, held where it was made.
    assert last == sched.tids[-1] and last in sim.store[x]
    assert sim.machine.task_info(last)["holder"] == x
    assert all(tid not in sim.store[x] for tid in sched.tids[:-2])
    sim.machine.check_invariants()


class FanOut(Coordinator):
    """``src`` is read by ``left`` and ``right``; ``right`` can run only on a client tagged "r"."""

    def init(self, seed: int) -> None:
        self.src = self.start_task("a", keys=["out"])
        self.left = self.start_task("b", pretasks=[self.src], prekeys=["out"], keys=["out"])
        self.right = self.start_task("b", pretasks=[self.src], prekeys=["out"], keys=["out"], require=["r"])
        self.late: int | None = None

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        if tid == self.right:
            # Started in the very entry that finishes src's last reader: src is still needed.
            self.late = self.start_task("b", pretasks=[self.src], prekeys=["out"], keys=["out"])

    def command(self, body: Any) -> Any:
        self.finish(taskids=[self.late], values=body)


def test_an_output_a_pending_or_running_task_reads_is_never_dropped() -> None:
    sim = Sim(FanOut, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=2)
    assert _step(sim, x) == sched.src
    assert _step(sim, x) == sched.left
    # left is done but right (no client can run it yet) still reads src.
    assert sched.src not in sim.poll(x)["released"]
    assert sched.src in sim.store[x]
    r = sim.join("r", slots=1, have=("r",))
    assert _step(sim, r) == sched.right
    # right's completion started ``late``, which reads src too: kept.
    assert sched.late is not None
    assert sched.src not in sim.poll(x)["released"]
    assert sim.machine.task_info(sched.src)["holder"] == x
    assert _step(sim, x) == sched.late
    # Its last reader is done: now it goes.
    assert sched.src in sim.poll(x)["released"] and sched.src not in sim.store[x]
    assert sim.machine.task_info(sched.src)["attempt"] == 1, "never recomputed: never dropped while needed"
    sim.h.op({"op": "command", "body": "end"})
    assert sim.h.status["state"] == "finished"


class ReadLater(Coordinator):
    """``src`` is read by ``first``; later (a user command) a new task reads it again."""

    def init(self, seed: int) -> None:
        self.src = self.start_task("a", keys=["out"])
        self.first = self.start_task("b", pretasks=[self.src], prekeys=["out"], keys=["out"])
        self.again: int | None = None

    def command(self, body: Any) -> Any:
        self.again = self.start_task("b", pretasks=[self.src], prekeys=["out"], keys=["out"])
        return self.again

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        if tid == self.again:
            self.finish(taskids=[tid], values=values)


def test_a_reader_started_after_the_release_gets_the_output_recomputed_from_lineage() -> None:
    sim = Sim(ReadLater, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=1)
    assert _step(sim, x) == sched.src
    assert _step(sim, x) == sched.first
    assert sched.src in sim.poll(x)["released"] and sched.src not in sim.store[x]
    sim.h.op({"op": "command", "body": "again"})
    assert sched.again is not None
    info = sim.machine.task_info(sched.src)
    assert (info["state"], info["attempt"]) in (("pending", 2), ("running", 2))
    sim.run()
    assert sim.h.status["state"] == "finished"
