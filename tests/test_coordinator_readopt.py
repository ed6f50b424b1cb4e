"""A client declared dead that comes back keeps its work: re-adoption of the outputs it still holds."""

from __future__ import annotations

from typing import Any

from coordinator_harness import ECHO, ChainScheduler, Harness, RandomScheduler, Sim, chain_ran_on_x, run_on
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.ops import ErrorCode, Initialized, Joined, Refused
from tasksprint.coordinator.state import ACTIVE


def _read_by_an_active_task(m: Any, tid: int) -> bool:
    tasks = m._state.tasks
    return any(tasks[d].state in ACTIVE for d in tasks[tid].dependents)


def chain_with_x_dead() -> tuple[Sim, Any, int, int]:
    """a and b ran on x, c is placed on y and needs b; then x is declared dead."""
    sim = Sim(ChainScheduler, ECHO)
    sched, x, y = chain_ran_on_x(sim)
    sim.h.tick(expired=(x,))
    assert sim.machine.task_info(sched.b)["state"] == "pending"  # recompute started
    assert sim.machine.task_info(sched.a)["state"] == "pending"
    return sim, sched, x, y


def test_a_returning_client_is_readopted_and_the_recompute_cancelled() -> None:
    sim, sched, x, y = chain_with_x_dead()
    done_before = sim.h.status["tasks"]["done"]
    joined = sim.rejoin(x, "x", [[sched.a, 1], [sched.b, 1]])
    x2 = joined.cid
    assert x2 != x and joined.adopted == (sched.a, sched.b)
    info = sim.machine.task_info(sched.b)
    assert (info["state"], info["holder"], info["clients"]) == ("done", x2, [])
    # a's only reader, b, is done and held again: a's outputs are released at once.
    info = sim.machine.task_info(sched.a)
    assert (info["state"], info["holder"], info["clients"]) == ("done", None, [])
    assert sched.a in sim.poll(x2)["released"]
    assert sim.h.status["tasks"]["done"] == done_before + 2
    assert sim.h.status["tasks"]["readopted"] == 2
    # c, placed on y meanwhile, learns where its input is now and finishes.
    view = sim.poll(y)
    assert {"tid": sched.b, "cid": x2, "addr": "x:7001"} in view["holders"]
    sim.run()
    assert sim.h.status["state"] == "finished"
    # Exactly once: task_done ran once per task, and nothing ran twice.
    assert [tid for tid, _ in sched.done] == [sched.a, sched.b, sched.c]
    assert sched.a not in sim.store[x2] or sim.store[x2][sched.a] == sim.store[x][sched.a]
    assert sim.assigned[x2] == {}


def test_readoption_races_a_recomputation_on_another_client() -> None:
    sim, sched, x, y = chain_with_x_dead()
    z = sim.join("z", slots=1, have=("x",))
    # The recompute of a completes on z; b's recompute is then placed on z.
    view = sim.poll(z)
    assert [t["tid"] for t in view["tasks"]] == [sched.a]
    sim.complete(z, sched.a)
    view = sim.poll(z)
    assert [t["tid"] for t in view["tasks"]] == [sched.b]
    b_attempt = view["tasks"][0]["attempt"]
    # x returns with both: a was recomputed elsewhere (z's copy wins), b is taken back.
    joined = sim.rejoin(x, "x", [[sched.a, 1], [sched.b, 1]])
    assert joined.adopted == (sched.b,)
    # a was recomputed on z for b; b is back, so z may drop a's outputs.
    assert sim.machine.task_info(sched.a)["holder"] is None
    assert sim.machine.task_info(sched.b)["holder"] == joined.cid
    # z is told to kill its copy of b (its late completion of that attempt does not
    # count), and to drop a's outputs.
    view = sim.poll(z)
    assert sched.b in view["kill"] and sched.a in view["released"]
    late = sim.h.op(
        {"op": "done", "cid": z, "tid": sched.b, "attempt": b_attempt, "values": {"out": "late"}, "sizes": {}}
    )
    assert not late.accepted
    sim.run()
    assert sim.h.status["state"] == "finished"
    assert [tid for tid, _ in sched.done] == [sched.a, sched.b, sched.c]
    assert sim.machine.task_info(sched.b)["values"]["out"] != "late"


def test_a_returning_client_whose_store_was_wiped_offers_nothing_and_the_recompute_runs() -> None:
    sim, sched, x, y = chain_with_x_dead()
    joined = sim.rejoin(x, "x", [])
    sim.store[joined.cid] = {}
    assert joined.adopted == ()
    sim.run()
    assert sim.h.status["state"] == "finished"
    assert sim.machine.task_info(sched.b)["holder"] == joined.cid
    assert sim.machine.task_info(sched.b)["attempt"] == 2  # recomputed
    counts = sim.h.status["tasks"]
    assert (counts["completed"], counts["recomputed"], counts["readopted"]) == (3, 2, 0)
    assert [tid for tid, _ in sched.done] == [sched.a, sched.b, sched.c]


def test_readoption_refuses_other_attempts_other_names_and_unknown_tasks() -> None:
    sim, sched, x, y = chain_with_x_dead()
    # Another client offering x's outputs, or x offering an attempt that never committed: not taken.
    other = sim.h.op({"op": "join", "client": "w", "addr": "w:1", "slots": 1, "have": ["x"], "holds": [[sched.b, 1]]})
    assert isinstance(other, Joined) and other.adopted == ()
    joined = sim.rejoin(x, "x", [[sched.b, 2], [sched.a, 0], [999, 1]])
    assert joined.adopted == ()
    assert sim.machine.task_info(sched.b)["holder"] is None


def test_readopting_a_task_cancels_the_recompute_of_inputs_nothing_needs() -> None:
    sim, sched, x, y = chain_with_x_dead()
    # Only b's output survived on x: a's recompute was for b's recompute, and is no longer needed.
    joined = sim.rejoin(x, "x", [[sched.b, 1]])
    assert joined.adopted == (sched.b,)
    info = sim.machine.task_info(sched.a)
    assert (info["state"], info["holder"], info["clients"]) == ("done", None, [])
    sim.run()
    assert sim.h.status["state"] == "finished"
    assert sim.machine.task_info(sched.a)["attempt"] == 2  # the cancelled recompute's attempt is spent


def test_a_client_dying_twice_is_readopted_twice() -> None:
    sim, sched, x, y = chain_with_x_dead()
    x2 = sim.rejoin(x, "x", [[sched.a, 1], [sched.b, 1]]).cid
    sim.h.tick(expired=(x2,))
    x3 = sim.rejoin(x2, "x", [[sched.a, 1], [sched.b, 1]])
    assert x3.adopted == (sched.a, sched.b)
    sim.run()
    assert sim.h.status["state"] == "finished"


def test_a_late_update_of_a_dead_incarnation_starts_no_new_one() -> None:
    sim, sched, x, y = chain_with_x_dead()
    # x resized its queue just before a partition; the update commits after x was declared dead.
    update = {"op": "join", "client": "x", "addr": "x:7001", "slots": 4, "have": ["x"], "queue": 3, "cid": x}
    result = sim.h.op(update)
    assert isinstance(result, Refused) and result.code == ErrorCode.UNKNOWN.value, result
    assert sim.h.status["clients"] == {"live": 1, "dead": 1}
    # So x's rejoin is a new incarnation and takes its outputs back.
    joined = sim.rejoin(x, "x", [[sched.a, 1], [sched.b, 1]])
    assert joined.adopted == (sched.a, sched.b)
    # An update of the live incarnation applies; one naming the dead one still does not.
    again = sim.h.op(dict(update, cid=joined.cid))
    assert isinstance(again, Joined) and (again.cid, again.adopted) == (joined.cid, ())
    assert isinstance(sim.h.op(update), Refused)
    assert sim.h.op({"op": "join", "client": "nobody", "addr": "n:1", "slots": 1, "cid": joined.cid}).code == (
        ErrorCode.UNKNOWN.value
    )
    sim.run()
    assert sim.h.status["state"] == "finished"


def test_an_update_offers_no_outputs() -> None:
    sim = Sim(ChainScheduler, ECHO)
    for extra in ({"cid": 0, "holds": [[1, 1]]}, {"cid": -1}, {"cid": "0"}, {"cid": True}):
        result = sim.h.op({"op": "join", "client": "x", "addr": "x:1", "slots": 1, **extra})
        assert isinstance(result, Refused) and result.code == ErrorCode.MALFORMED.value, (extra, result)
    assert sim.h.status["clients"] == {"live": 0, "dead": 0}


def test_malformed_holds_are_refused_with_the_field_named() -> None:
    sim = Sim(ChainScheduler, ECHO)
    for holds in ("nope", [[1]], [[1, "2"]], [[True, 1]], [1, 2]):
        result = sim.h.op({"op": "join", "client": "x", "addr": "x:1", "slots": 1, "holds": holds})
        assert isinstance(result, Refused) and result.code == ErrorCode.MALFORMED.value
        assert "'holds'" in result.error
    assert sim.h.status["clients"] == {"live": 0, "dead": 0}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), steps=st.lists(st.integers(0, 2**16), min_size=40, max_size=150))
def test_readoption_never_accepts_an_output_of_a_different_attempt(seed: int, steps: list[int]) -> None:
    """Random completions, deaths and returns offering right and wrong attempts: only committed ones are taken.

    The ground truth is kept outside the machine: every (client name, tid,
    attempt) whose completion the log accepted.  An adopted offer must be
    one of those, of the returning client's own name, and task_done runs once per task.
    """
    h = Harness(RandomScheduler)
    assert isinstance(h.init(seed), Initialized)
    m = h.machine
    committed: set[tuple[str, int, int]] = set()
    names = {}
    adoptions: list[int] = []
    for r in steps:
        live = [(cid, name) for cid, name, _ in m.live_clients()]
        kind = r % 4
        if kind == 0 or not live:
            name = f"n{r % 5}"
            total = m.status()["tasks"]["total"]
            offer = {1 + (r >> k) % max(total, 1): 1 + (r >> (k + 3)) % 3 for k in range(r % 6)}
            # Plus the outputs this name really made, some with the attempt shifted (never committed so).
            for n, tid, a in sorted(committed):
                if n == name and (r >> 4) % 2:
                    offer[tid] = a + ((r >> (tid % 8)) % 3 - 1 if (r >> 5) % 2 else 0)
            holds = [[tid, a] for tid, a in offer.items()]
            result = h.op({"op": "join", "client": name, "addr": f"{name}:1", "slots": 2, "have": [], "holds": holds})
            assert isinstance(result, Joined)
            names[result.cid] = name
            for tid in result.adopted:
                assert (name, tid, offer[tid]) in committed, f"adopted {tid} attempt {offer[tid]} from {name}"
                holder = m.task_info(tid)["holder"]
                # Held by the new incarnation, or released at once: no task reads it any more.
                assert holder == result.cid or holder is None and not _read_by_an_active_task(m, tid)
                adoptions.append(tid)
        elif kind == 1:
            # Declared dead, its outputs awaited for 0-2 s of log time; every few steps a second passes.
            cid, _ = live[r % len(live)]
            h.tick(advance=float((r >> 6) % 2), expired=(cid,), grace=float((r >> 8) % 3))
        else:
            work = [(cid, t) for cid, _ in live for t in m.view(cid, 0).tasks]
            if not work:
                continue
            cid, t = work[r % len(work)]
            result = h.op(
                {
                    "op": "done",
                    "cid": cid,
                    "tid": t.tid,
                    "attempt": t.attempt,
                    "values": {"out": r},
                    "sizes": {"out": 1},
                }
            )
            if result.accepted:
                committed.add((names[cid], t.tid, t.attempt))
        m.check_invariants()
    sched = m.scheduler
    assert sched is not None
    reported = [tid for tid, task in m.state.tasks.items() if task.reported]
    assert len(reported) == len(set(reported)) and sched.done == len(reported)


class ConsumedScheduler(Coordinator):
    """a -> b, both on "x"; c on "y" stays pending (it needs a tag nobody has) so the run goes on.

    When a client dies, a task reading a's output is started (a later need).
    """

    def init(self, seed: int) -> None:
        self.a = self.start_task("a", keys=["out"], require=["x"])
        self.b = self.start_task("b", pretasks=[self.a], prekeys=["out"], keys=["out"], require=["x"])
        self.c = self.start_task("c", require=["never"])
        self.late: int | None = None
        self.start_late = False

    def client_dead(self, cid: int) -> None:
        if self.start_late:
            self.late = self.start_task("d", pretasks=[self.a], prekeys=["out"], keys=["out"], require=["x"])


def test_outputs_consumed_by_finished_dependents_are_not_recomputed_when_their_holder_dies() -> None:
    sim = Sim(ConsumedScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=2, have=("x",))
    run_on(sim, x)
    assert sim.h.status["tasks"]["done"] == 2
    sim.h.tick(expired=(x,))
    # a's output was read by b, which is done; b's is read by nobody: neither runs again.
    for tid in (sched.a, sched.b):
        info = sim.machine.task_info(tid)
        assert (info["state"], info["holder"], info["attempt"]) == ("done", None, 1)
    assert sim.h.status["tasks"]["done"] == 2 and sim.h.status["tasks"]["pending"] == 1


def test_a_consumed_output_is_recomputed_when_a_later_task_needs_it() -> None:
    sim = Sim(ConsumedScheduler, ECHO)
    sched = sim.machine.scheduler
    sched.start_late = True
    x = sim.join("x", slots=2, have=("x",))
    run_on(sim, x)
    sim.h.tick(expired=(x,))
    assert sched.late is not None
    assert sim.machine.task_info(sched.a)["state"] == "pending"  # recomputed for d
    assert sim.machine.task_info(sched.b)["state"] == "done"  # nobody needs b again
    x2 = sim.join("x2", slots=2, have=("x",))
    run_on(sim, x2)
    assert sim.machine.task_info(sched.late)["state"] == "done"
    assert sim.h.status["tasks"]["recomputed"] == 1


class WaveScheduler(Coordinator):
    """t0 -> (l1, l2) -> total -> m: two waves of a chain; t0..total on "x", m on "y"."""

    def init(self, seed: int) -> None:
        self.t0 = self.start_task("a", keys=["out"], require=["x"])
        self.l1 = self.start_task("b", pretasks=[self.t0], prekeys=["out"], keys=["out"], require=["x"])
        self.l2 = self.start_task("d", pretasks=[self.t0], prekeys=["out"], keys=["out"], require=["x"])
        pre = [self.l1, self.l2]
        self.total = self.start_task("e", pretasks=pre, prekeys=["out", "out"], keys=["out"], require=["x"])
        self.m = self.start_task("f", pretasks=[self.total], prekeys=["out"], keys=["out"], require=["y"])


def test_readopting_outputs_of_two_depths_cancels_the_whole_recompute_below_them() -> None:
    """x comes back with total and l2 (l2's release never reached it): t0's recompute is cancelled too.

    total's recompute needs l1 and l2, released, and so t0, released too.  The
    re-adoption of l2 and total leaves l1's recompute without a reader, and
    then t0's: t0 is an input of both l1 and l2, reached before l1 is
    cancelled, and must be looked at again once it is.
    """
    sim = Sim(WaveScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=4, have=("x",))
    run_on(sim, x)
    assert [sim.machine.task_info(t)["holder"] for t in (sched.t0, sched.l1, sched.l2)] == [None, None, None]
    sim.h.tick(expired=(x,))  # no grace: the recompute starts at once
    chain = (sched.t0, sched.l1, sched.l2, sched.total)
    assert [sim.machine.task_info(t)["state"] for t in chain] == ["pending"] * 4
    joined = sim.rejoin(x, "x", [[sched.l2, 1], [sched.total, 1]])
    assert joined.adopted == (sched.l2, sched.total)
    for tid in chain:
        info = sim.machine.task_info(tid)
        assert (info["state"], info["clients"]) == ("done", []), (tid, info)
    y = sim.join("y", slots=1, have=("y",))
    sim.run()
    assert sim.h.status["state"] == "running"  # nothing finishes this computation; m is done
    assert sim.machine.task_info(sched.m)["state"] == "done"
    assert sim.machine.task_info(sched.m)["holder"] == y
    counts = sim.h.status["tasks"]
    assert (counts["completed"], counts["recomputed"], counts["readopted"]) == (5, 0, 2)
