"""Coordinator placement: tags, locality, rolling prefetch, queues and followers."""

from __future__ import annotations

import random

import pytest
from coordinator_harness import (
    ECHO,
    ChainScheduler,
    DiamondScheduler,
    FanInScheduler,
    Harness,
    LocalityScheduler,
    LongChain,
    ManyScheduler,
    PrefetchLocalityScheduler,
    RandomDag,
    Sim,
    TagScheduler,
    WideFanIn,
    done_op,
    finish_in_random_order,
    join,
    names,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tasksprint_sdk.coordinator import (
    Coordinator,
)

from tasksprint.coordinator.ops import BatchApplied, Refused
from tasksprint.coordinator.replies import HolderChange


def test_dependents_are_placed_only_after_their_pretasks_are_done() -> None:
    sim = Sim(ChainScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=4, have=("x",))
    y = sim.join("y", slots=4, have=("y",))
    assert [t["tid"] for t in sim.poll(x)["tasks"]] == [sched.a]
    assert sim.poll(y)["tasks"] == []
    assert sim.machine.task_info(sched.b)["state"] == "pending"

    sim.complete(x, sched.a)
    view = sim.poll(x)
    assert [t["tid"] for t in view["tasks"]] == [sched.b]
    assert view["tasks"][0]["inputs"] == [{"tid": sched.a, "key": "out", "cid": x, "addr": "x:7000"}]
    assert sim.machine.task_info(sched.c)["state"] == "pending"
    sim.complete(x, sched.b)
    assert [t["tid"] for t in sim.poll(y)["tasks"]] == [sched.c]
    sim.complete(y, sched.c)
    assert sim.h.status["result"]["values"] == "chain complete"
    assert [tid for tid, _ in sched.done] == [sched.a, sched.b, sched.c]
    assert sched.done[2][1] == {"out": ["c", sched.c, [["b", sched.b, [["a", sched.a, []]]]]]}


def test_require_is_hard_and_want_is_preferred() -> None:
    sim = Sim(TagScheduler, ECHO)
    sched = sim.machine.scheduler
    plain = sim.join("plain", slots=4)
    ssd = sim.join("ssd", slots=1, have=("ssd",))
    assert [t["tid"] for t in sim.poll(ssd)["tasks"]] == [sched.ssd]
    assert sim.poll(plain)["tasks"] == []
    assert sim.machine.task_info(sched.gpu)["state"] == "pending"
    gpu = sim.join("gpu", slots=1, have=("gpu", "ssd"))
    assert [t["tid"] for t in sim.poll(gpu)["tasks"]] == [sched.gpu]
    assert sim.machine.task_info(sched.gpu)["require"] == ["gpu"]


@pytest.mark.parametrize(("small_size", "big_size", "winner"), [(10, 5000, "b"), (5000, 10, "s")])
def test_placement_prefers_the_client_holding_most_input_bytes(small_size: int, big_size: int, winner: str) -> None:
    h = Harness(LocalityScheduler)
    h.init()
    cids = {}
    for name, tags in (("s", ["s"]), ("b", ["b"]), ("free", [])):
        cids[name] = h.op({"op": "join", "client": name, "addr": f"{name}:1", "slots": 4, "have": tags}).cid
    sched = h.machine.scheduler
    for tid, cid, size in ((sched.small, cids["s"], small_size), (sched.big, cids["b"], big_size)):
        sizes = {"out": size, "log": 10**6}
        result = h.op({"op": "done", "cid": cid, "tid": tid, "attempt": 1, "values": {}, "sizes": sizes})
        assert result.accepted
    assert h.machine.task_info(sched.joined)["clients"] == [cids[winner]]


def test_a_dependent_is_placed_early_once_its_first_pretask_is_done() -> None:
    sim = Sim(FanInScheduler, ECHO)
    sched = sim.machine.scheduler
    m1, m2 = sched.maps
    [red] = sched.reduces
    x = sim.join("x", slots=1)
    y = sim.join("y", slots=1)
    assert names(sim.poll(x)["tasks"]) == [m1] and names(sim.poll(y)["tasks"]) == [m2]
    assert sim.machine.task_info(red)["state"] == "pending"  # no input is available yet

    sim.complete(x, m1)
    # m2 still runs on y; the reduce goes to x, which holds the input that exists.
    assert sim.machine.task_info(m2)["state"] == "running"
    view = sim.poll(x)
    assert names(view["tasks"]) == [red]
    assert view["tasks"][0]["inputs"] == [
        {"tid": m1, "key": "out", "cid": x, "addr": "x:7000"},
        {"tid": m2, "key": "out", "cid": None, "addr": None},
    ]
    info = sim.machine.task_info(red)
    assert (info["state"], info["clients"], info["prefetching"]) == ("running", [x], [x])
    # Early placement takes no slot: x's one slot is still free.
    assert [(c["running"], c["prefetching"]) for c in sim.h.status["live_clients"]] == [(0, 1), (1, 0)]
    assert sim.runnable(x) == []

    # The second input appearing changes x's view, so a waiting long-poll wakes.
    before = sim.seen[x]
    assert sim.machine.client_version(x) == before
    sim.complete(y, m2)
    assert sim.machine.client_version(x) > before
    delta = sim.machine.view(x, before)
    # The reduce is not listed again with all its inputs: only where m2's outputs are now.
    assert names(delta.tasks) == [] and delta.version > before
    assert delta.holders == (HolderChange(tid=m2, cid=y, addr="y:7000"),)
    # With every input in, it counts against x's slots.
    assert sim.machine.task_info(red)["prefetching"] == []
    assert [(c["running"], c["prefetching"]) for c in sim.h.status["live_clients"]] == [(1, 0), (0, 0)]
    sim.run()
    assert sim.h.status["result"]["values"] == "merged"
    assert sim.machine.task_info(red)["holder"] == x


def test_no_early_placement_while_a_pretask_waits_to_be_placed() -> None:
    sim = Sim(PrefetchLocalityScheduler, ECHO)
    sched = sim.machine.scheduler
    s_, b = sim.join("s", slots=2, have=("s",)), sim.join("b", slots=2, have=("b",))
    sim.poll(s_), sim.poll(b)
    sim.complete(s_, sched.small)
    sim.complete(b, sched.big)
    # Two of three inputs exist, but ``late`` has no client to run on.
    assert sim.machine.task_info(sched.late)["state"] == "pending"
    assert sim.machine.task_info(sched.joined)["state"] == "pending"
    assert sim.poll(s_)["tasks"] == [] and sim.poll(b)["tasks"] == []
    # The entry that places ``late`` also places ``joined``, early.
    late = sim.join("late", slots=1, have=("l",))
    assert names(sim.poll(late)["tasks"]) == [sched.late]
    assert sim.machine.task_info(sched.joined)["prefetching"] != []


@pytest.mark.parametrize(("small_size", "big_size", "winner"), [(10, 5000, "b"), (5000, 10, "s")])
def test_early_placement_prefers_the_client_holding_most_bytes_available_so_far(
    small_size: int, big_size: int, winner: str
) -> None:
    h = Harness(PrefetchLocalityScheduler)
    h.init()
    cids = {}
    for name, tags in (("s", ["s"]), ("b", ["b"]), ("free", [])):
        cids[name] = h.op({"op": "join", "client": name, "addr": f"{name}:1", "slots": 4, "have": tags}).cid
    sched = h.machine.scheduler
    for tid, cid, size in ((sched.small, cids["s"], small_size), (sched.big, cids["b"], big_size)):
        sizes = {"out": size, "log": 10**6}
        assert h.op({"op": "done", "cid": cid, "tid": tid, "attempt": 1, "values": {}, "sizes": sizes}).accepted
    assert h.machine.task_info(sched.joined)["state"] == "pending"
    h.op({"op": "join", "client": "l", "addr": "l:1", "slots": 1, "have": ["l"]})
    info = h.machine.task_info(sched.joined)
    assert info["clients"] == info["prefetching"] == [cids[winner]]
    h.machine.check_invariants()


@pytest.mark.parametrize("cls", [DiamondScheduler, FanInScheduler, WideFanIn])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_client_with_one_slot_runs_any_dag_to_the_end(cls: type[Coordinator], seed: int) -> None:
    sim = Sim(cls, ECHO, seed=seed)
    sim.join("only", slots=1)
    finish_in_random_order(sim, random.Random(seed))
    assert sim.h.status["state"] == "finished"
    assert sim.h.status["tasks"]["done"] == sim.h.status["tasks"]["total"]


def test_with_one_slot_reduces_are_placed_early_once_the_last_map_is_placed() -> None:
    sim = Sim(WideFanIn, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("only", slots=1)
    *first, last = sched.maps
    for m in first:
        assert names(sim.poll(cid)["tasks"]) == [m]
        # Later maps still wait for the slot: the reduces must not be placed yet.
        assert all(sim.machine.task_info(r)["state"] == "pending" for r in sched.reduces)
        sim.complete(cid, m)
    # The last map took the slot; the first reduce fills the prefetch allowance.
    assert names(sim.poll(cid)["tasks"]) == [last, sched.reduces[0]]
    assert sim.machine.task_info(sched.reduces[0])["prefetching"] == [cid]
    assert sim.machine.task_info(sched.reduces[1])["state"] == "pending"
    sim.complete(cid, last)
    assert sim.machine.task_info(sched.reduces[0])["prefetching"] == []
    sim.run()
    assert sim.h.status["result"]["values"] == "merged"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    slots=st.lists(st.integers(1, 2), min_size=1, max_size=3),
    fail_rate=st.sampled_from([0.0, 0.2]),
)
def test_random_dags_finish_with_few_slots(seed: int, slots: list[int], fail_rate: float) -> None:
    sim = Sim(RandomDag, ECHO, seed=seed)
    for i, n in enumerate(slots):
        sim.join(f"c{i}", slots=n)
    finish_in_random_order(sim, random.Random(seed), fail_rate=fail_rate)
    assert sim.h.status["state"] == "finished"


def test_check_invariants_catches_broken_prefetch_bookkeeping() -> None:
    sim = Sim(FanInScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=1)
    sim.poll(x)
    sim.complete(x, sched.maps[0])
    sim.machine.check_invariants()
    client = sim.machine._state.clients[x]
    red = sched.reduces[0]
    del client.prefetch[red]
    with pytest.raises(AssertionError, match=f"task {red} prefetch"):
        sim.machine.check_invariants()
    client.prefetch[red] = None
    client.prefetch[sched.merge] = None
    with pytest.raises(AssertionError):
        sim.machine.check_invariants()


def test_a_client_with_a_queue_gets_that_many_ready_tasks_beyond_its_slots() -> None:
    h = Harness(ManyScheduler)
    h.init()
    plain = join(h, "plain", slots=2)
    queued = join(h, "queued", slots=2, queue=5)
    assert [len(h.machine.view(cid).tasks) for cid in (plain, queued)] == [2, 7]
    # The tasks are placed in tid order, and status counts the queued ones as placed there.
    placed = sorted(t.tid for cid in (plain, queued) for t in h.machine.view(cid).tasks)
    assert placed == h.machine.scheduler.tids[:9]
    assert [c["running"] for c in h.status["live_clients"]] == [2, 7]
    # Each completion frees room for exactly one more.
    first = h.machine.view(queued).tasks[0].tid
    assert h.op(done_op(queued, first)).accepted
    assert len(h.machine.view(queued).tasks) == 7
    assert h.machine.task_info(h.machine.scheduler.tids[9])["clients"] == [queued]
    # A larger queue, announced by joining again under the same name, takes effect at once.
    assert join(h, "queued", slots=2, queue=10) == queued
    assert len(h.machine.view(queued).tasks) == 12
    h.machine.check_invariants()


def test_a_chain_follows_its_pretask_onto_a_client_with_a_queue() -> None:
    h = Harness(LongChain)
    h.init()
    chain = h.machine.scheduler.chain
    other = join(h, "other", slots=4, queue=4)
    assert names(h.machine.view(other).tasks) == chain[:9]  # first + 8 followers (2 x (slots + queue) in all)
    assert h.machine.task_info(chain[1])["prefetching"] == [other]
    assert h.machine.task_info(chain[9])["state"] == "pending"
    # Without a queue nothing follows: the second link waits for the first's output.
    h2 = Harness(LongChain)
    h2.init()
    plain = join(h2, "plain", slots=4)
    assert names(h2.machine.view(plain).tasks) == [chain[0]]
    # Completing links frees room for the next followers, in chain order.
    batch = {"op": "batch", "ops": [done_op(other, chain[0]), done_op(other, chain[1], early=[[chain[0], 1]])]}
    assert isinstance(h.op(batch), BatchApplied)
    # (chain[2] has its input now and takes a slot: eight wait for inputs again, the allowance.)
    assert names(h.machine.view(other).tasks) == chain[2:11]
    assert h.machine.task_info(chain[2])["prefetching"] == []
    h.machine.check_invariants()


def test_an_early_completion_counts_only_if_its_input_was_committed_from_that_client() -> None:
    h = Harness(LongChain)
    h.init()
    a, b, c = h.machine.scheduler.chain[:3]
    x = join(h, "x", slots=1, queue=2)
    # a takes the slot; b, c and the next link follow it (the allowance is slots + queue = 3).
    assert names(h.machine.view(x).tasks) == h.machine.scheduler.chain[:4]
    # b reported before a, claiming a's output: a is not committed, so b runs again.
    result = h.op(done_op(x, b, early=[[a, 1]]))
    assert (result.accepted, result.rerun) == (False, True)
    info = h.machine.task_info(b)
    assert info["attempt"] == 2 and info["state"] == "running" and info["clients"] == [x]
    assert h.machine.scheduler.done == []
    # The new attempt is in x's view; a stale report of attempt 1 is refused.
    assert [(t.tid, t.attempt) for t in h.machine.view(x).tasks if t.tid == b] == [(b, 2)]
    # a commits (from x), then b's attempt 2 with a's output used early is accepted.
    assert h.op(done_op(x, a)).accepted
    assert h.op(done_op(x, b, attempt=2, early=[[a, 1]])).accepted
    # An early claim naming the wrong attempt or another client's output is refused too.
    assert h.op(done_op(x, c, early=[[b, 1]])).rerun
    assert isinstance(h.op(done_op(x, c, early=[[99, 1]])), Refused)  # not a pretask of c: malformed
    assert h.machine.scheduler.done == [a, b]
    h.machine.check_invariants()


def test_a_replicated_pretask_committed_elsewhere_sends_the_early_dependent_back() -> None:
    class Replicated(Coordinator):
        def init(self, seed: int) -> None:
            self.a = self.start_task("a", keys=["out"], replicas=2)
            self.b = self.start_task("b", pretasks=[self.a], prekeys=["out"], keys=["out"])

    h = Harness(Replicated)
    h.init()
    x = join(h, "x", slots=1, queue=1)
    y = join(h, "y", slots=1, queue=1)
    sched = h.machine.scheduler
    assert h.machine.task_info(sched.a)["clients"] == [x, y]
    assert h.machine.task_info(sched.b)["clients"] == [x]  # follows the copy on the lowest cid
    # y's copy of a commits first; x then reports b as computed from its own copy of a.
    assert h.op(done_op(y, sched.a)).accepted
    result = h.op({"op": "batch", "ops": [done_op(x, sched.a), done_op(x, sched.b, early=[[sched.a, 1]])]})
    others = dict(result.others)
    assert not others[0].accepted and others[1].rerun
    info = h.machine.task_info(sched.b)
    assert info["attempt"] == 2 and info["state"] == "running"
    h.machine.check_invariants()
