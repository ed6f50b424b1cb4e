"""The coordinator state machine, driven directly with log entries.

Clients are simulated in memory: they join, read their views, run the task
functions below and report completions, all through the same ``Applier``
a replica uses.  Scheduler classes live at module level, as they would in
a user's scheduler file.
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
import random
import subprocess
import sys
import textwrap
import types
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tasksprint
from tasksprint import codec
from tasksprint.coordinator.machine import CoordinatorMachine, RunState, SchedulerMismatch
from tasksprint.machine import Applier
from tasksprint.paxos.messages import Batch, Command, Tick
from tasksprint_sdk.coordinator import (
    Coordinator,
    SchedulerLoadError,
    SchedulerUsageError,
    load_scheduler,
    loading_scheduler,
    scheduler_code_digest,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
MONTECARLO = f"{ROOT / 'examples' / 'montecarlo' / 'scheduler.py'}:MonteCarloCoordinator"


# ---------------------------------------------------------------- harness


class Harness:
    """One coordinator replica's machine and applier, fed one slot at a time."""

    def __init__(self, cls: type[Coordinator], **config: Any) -> None:
        self.machine = CoordinatorMachine(cls, **config)
        self.applier = Applier(self.machine)
        self.batches: list[Batch] = []
        self.seq = 0
        self.now = 0.0

    def apply(self, *items: Command | Tick) -> list[Any]:
        batch = Batch(items=items)
        self.batches.append(batch)
        return [result for _, result in self.applier.apply_slot(self.applier.applied + 1, batch)]

    def cmd(self, op: dict[str, Any]) -> Command:
        self.seq += 1
        return Command(client_id="sim", seq=self.seq, op=op)

    def op(self, op: dict[str, Any]) -> Any:
        return self.apply(self.cmd(op))[0]

    def tick(self, advance: float = 1.0, expired: tuple[int, ...] = ()) -> None:
        self.now += advance
        self.apply(Tick(now=self.now, data={"expired": list(expired)}))

    def init(self, seed: int = 11) -> Any:
        return self.op({"op": "init", "seed": seed, "code_digest": self.machine.code_digest})

    @property
    def status(self) -> dict[str, Any]:
        return self.machine.status()


NodeFn = Callable[..., dict[str, Any]]


class Sim:
    """Simulated clients: each polls its view, fetches inputs from holders and runs tasks."""

    def __init__(self, cls: type[Coordinator], nodes: dict[str, NodeFn], seed: int = 11) -> None:
        self.h = Harness(cls)
        assert self.h.init(seed)["ok"]
        self.machine = self.h.machine
        self.nodes = nodes
        self.store: dict[int, dict[int, dict[str, Any]]] = {}
        self.seen: dict[int, int] = {}
        self.assigned: dict[int, dict[int, dict[str, Any]]] = {}
        self.killed: dict[int, list[int]] = {}

    def join(self, name: str, slots: int = 2, have: tuple[str, ...] = ()) -> int:
        result = self.h.op({"op": "join", "client": name, "addr": f"{name}:7000", "slots": slots, "have": list(have)})
        cid = result["cid"]
        for d in (self.store, self.assigned):
            d.setdefault(cid, {})
        self.seen.setdefault(cid, 0)
        self.killed.setdefault(cid, [])
        return cid

    def poll(self, cid: int) -> dict[str, Any]:
        view = self.machine.view(cid, self.seen[cid])
        self.seen[cid] = view["version"]
        for task in view["tasks"]:
            self.assigned[cid][task["tid"]] = task
        for tid in view["kill"]:
            self.assigned[cid].pop(tid, None)
            self.killed[cid].append(tid)
        # Later moves of an input come as holder changes, as the real client keeps them.
        moved = {h["tid"]: h for h in view["holders"]}
        for task in self.assigned[cid].values():
            for i in task["inputs"]:
                if i["tid"] in moved:
                    i["cid"], i["addr"] = moved[i["tid"]]["cid"], moved[i["tid"]]["addr"]
        return view

    def runnable(self, cid: int) -> list[int]:
        return sorted(
            tid
            for tid, task in self.assigned[cid].items()
            if all(i["cid"] is not None and i["tid"] in self.store.get(i["cid"], {}) for i in task["inputs"])
        )

    def complete(self, cid: int, tid: int) -> Any:
        task = self.assigned[cid].pop(tid)
        inputs = []
        for i in task["inputs"]:
            out = self.store[i["cid"]][i["tid"]]
            inputs.append(out if i["key"] is None else out[i["key"]])
        out = self.nodes[task["name"]](task, *inputs, *task["args"], **task["kwargs"])
        self.store[cid][tid] = out
        return self.h.op(
            {
                "op": "done",
                "cid": cid,
                "tid": tid,
                "attempt": task["attempt"],
                "values": {k: out[k] for k in task["keys"] if k in out},
                "sizes": {k: len(codec.encode(v)) for k, v in out.items()},
            }
        )

    def fail(self, cid: int, tid: int, error: str = "boom") -> Any:
        task = self.assigned[cid].pop(tid)
        return self.h.op({"op": "failed", "cid": cid, "tid": tid, "attempt": task["attempt"], "error": error})

    def run(self, max_rounds: int = 200) -> None:
        """Poll and run everything runnable until the computation ends or nothing moves."""
        for _ in range(max_rounds):
            if self.machine.run_state is not RunState.RUNNING:
                return
            moved = False
            for cid, _name, _addr in self.machine.live_clients():
                self.poll(cid)
                for tid in self.runnable(cid):
                    self.complete(cid, tid)
                    moved = True
                    self.poll(cid)
            self.machine.check_invariants()
            if not moved:
                return
        raise AssertionError("simulation did not settle")


def montecarlo(task: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(task["seed"])
    inside = 0
    for _ in range(2000):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y < 1
    return {"result": {"inside": inside, "total": 2000}}


def merge(task: dict[str, Any], *results: dict[str, int]) -> dict[str, Any]:
    inside = sum(r["inside"] for r in results)
    total = sum(r["total"] for r in results)
    return {"result": inside / float(total) * 4}


def echo(task: dict[str, Any], *inputs: Any) -> dict[str, Any]:
    return {"out": [task["name"], task["tid"], list(inputs)], "scratch": "x" * 10}


ECHO = {name: echo for name in "abcdefgrs"}


# ------------------------------------------------------------ schedulers


class ChainScheduler(Coordinator):
    """a -> b -> c; a and b run on clients tagged "x", c on clients tagged "y"."""

    def init(self, seed: int) -> None:
        self.done: list[tuple[int, dict[str, Any]]] = []
        self.dead: list[int] = []
        self.a = self.start_task("a", keys=["out"], require=["x"])
        self.b = self.start_task("b", pretasks=[self.a], prekeys=["out"], keys=["out"], require=["x"])
        self.c = self.start_task("c", pretasks=[self.b], prekeys=["out"], keys=["out"], require=["y"])

    def client_dead(self, cid: int) -> None:
        self.dead.append(cid)

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.done.append((tid, values))
        if tid == self.c:
            self.finish(taskids=[tid], values="chain complete")


class TagScheduler(Coordinator):
    def init(self, seed: int) -> None:
        self.gpu = self.start_task("g", require={"gpu"})

    def client_joined(self, cid: int) -> None:
        if cid == 2:  # started once two clients could take it
            self.ssd = self.start_task("s", want=["ssd"])


class LocalityScheduler(Coordinator):
    """``joined`` is started once both its inputs exist (so it is never placed early)."""

    def init(self, seed: int) -> None:
        self.small = self.start_task("a", require=["s"])
        self.big = self.start_task("b", require=["b"])
        self.done: list[int] = []

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.done.append(tid)
        if len(self.done) == 2:
            self.joined = self.start_task("c", pretasks=[self.small, self.big], prekeys=["out", "out"])


class KillScheduler(Coordinator):
    def init(self, seed: int) -> None:
        self.killed: list[int] = []
        self.a = self.start_task("a")
        self.b = self.start_task("b", pretasks=[self.a])
        self.c = self.start_task("c", pretasks=[self.b])
        self.d = self.start_task("d")
        self.e = self.start_task("e", pretasks=[self.a, self.d])

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        if tid == self.d:
            self.killed = self.kill_task(self.a)


class ReplicaScheduler(Coordinator):
    def init(self, seed: int) -> None:
        self.done: list[tuple[int, dict[str, Any]]] = []
        self.t = self.start_task("r", replicas=2, keys=["out"])

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.done.append((tid, values))


class FragileScheduler(Coordinator):
    def init(self, seed: int) -> None:
        self.t = self.start_task("f", retries=1)
        self.dep = self.start_task("g", pretasks=[self.t])


class TolerantScheduler(FragileScheduler):
    def init(self, seed: int) -> None:
        self.failures: list[tuple[int, str]] = []
        super().init(seed)

    def task_failed(self, tid: int, error: str) -> None:
        self.failures.append((tid, error))
        self.fallback = self.start_task("r")


class BuggyScheduler(Coordinator):
    def init(self, seed: int) -> None:
        self.a = self.start_task("a")
        self.b = self.start_task("b")

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        if tid == self.b:
            print(1 / 0)


class CountingScheduler(Coordinator):
    """A pipeline that grows as tasks finish, using the shared random generator."""

    def init(self, seed: int) -> None:
        self.done: list[int] = []
        self.last = self.start_task("a", keys=["out"])

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.done.append(tid)
        if len(self.done) < 6:
            self.last = self.start_task(
                "b", args=[self.random.randint(0, 1000)], pretasks=[tid], prekeys=["out"], keys=["out"]
            )
        else:
            self.finish(taskids=[tid], values=len(self.done))


class SloppyScheduler(Coordinator):
    """Draws from a source that differs between replicas (here: how many came before)."""

    instances = itertools.count()

    def init(self, seed: int) -> None:
        self.me = next(self.instances)

    def client_joined(self, cid: int) -> None:
        self.start_task("a", args=[self.me])


class RandomScheduler(Coordinator):
    """Drives the machine through everything, its choices drawn from ``self.random``."""

    TAGS = ["gpu", "ssd", "big", "fast", "arm"]

    def init(self, seed: int) -> None:
        self.started: list[int] = []
        self.dead: set[int] = set()
        self.done = 0
        for _ in range(self.random.randint(2, 6)):
            self.spawn()

    def spawn(self) -> None:
        r = self.random
        alive = [t for t in self.started if t not in self.dead]
        pre = r.sample(alive, r.randint(0, min(3, len(alive))))
        spec = dict(
            args=[r.randint(0, 99)],
            prekeys=[r.choice(["out", None]) for _ in pre],
            keys=["out"],
            # Sets on purpose: their order differs between processes.
            require=set(r.sample(self.TAGS, r.choice([0, 0, 0, 1]))),
            want=set(r.sample(self.TAGS, r.randint(0, 2))),
            replicas=r.choice([1, 1, 2]),
            retries=r.randint(0, 2),
            timeout=r.choice([None, 5.0]),
        )
        try:
            tid = self.start_task(r.choice("abcdefg"), pretasks=pre, **spec)
        except ValueError:
            # A chosen pretask was killed by a cascade the scheduler did not see.
            spec["prekeys"] = []
            tid = self.start_task("r", pretasks=[], **spec)
        self.started.append(tid)

    def client_joined(self, cid: int) -> None:
        if self.random.random() < 0.5:
            self.spawn()

    def client_dead(self, cid: int) -> None:
        self.spawn()

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.done += 1
        if self.random.random() < 0.7:
            self.spawn()
        if self.random.random() < 0.1:
            self.dead.update(self.kill_task(self.random.choice(self.started)))
        if self.done >= 12:
            self.finish(values=self.done)

    def task_failed(self, tid: int, error: str) -> None:
        self.dead.add(tid)
        self.spawn()


class FanInScheduler(Coordinator):
    """Map/reduce: ``MAPS`` maps, each reduce takes one output of every map, a merge takes the reduces."""

    MAPS = 2
    REDUCES = 1
    RETRIES = 0

    def init(self, seed: int) -> None:
        self.failures: list[tuple[int, str]] = []
        self.maps = [self.start_task("a", args=[i], keys=["out"], retries=self.RETRIES) for i in range(self.MAPS)]
        self.reduces = [
            self.start_task("r", args=[r], pretasks=self.maps, prekeys=["out"] * self.MAPS, keys=["out"])
            for r in range(self.REDUCES)
        ]
        self.merge = self.start_task("g", pretasks=self.reduces, prekeys=["out"] * self.REDUCES, keys=["out"])

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        if tid == self.merge:
            self.finish(taskids=[tid], values="merged")

    def task_failed(self, tid: int, error: str) -> None:
        self.failures.append((tid, error))


class RetryingFanIn(FanInScheduler):
    RETRIES = 1


class WideFanIn(FanInScheduler):
    MAPS = 12
    REDUCES = 3


class Shuffle(FanInScheduler):
    MAPS = 3
    REDUCES = 3


class DiamondScheduler(Coordinator):
    """a -> (b, c) -> d."""

    def init(self, seed: int) -> None:
        self.a = self.start_task("a", keys=["out"])
        self.b = self.start_task("b", pretasks=[self.a], prekeys=["out"], keys=["out"])
        self.c = self.start_task("c", pretasks=[self.a], prekeys=["out"], keys=["out"])
        self.d = self.start_task("d", pretasks=[self.b, self.c], prekeys=["out", "out"], keys=["out"])

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        if tid == self.d:
            self.finish(taskids=[tid], values="diamond")


class PrefetchLocalityScheduler(Coordinator):
    """``joined`` reads ``small`` and ``big``, and ``late``, which only a client tagged "l" runs."""

    def init(self, seed: int) -> None:
        self.small = self.start_task("a", require=["s"])
        self.big = self.start_task("b", require=["b"])
        self.late = self.start_task("c", require=["l"])
        self.joined = self.start_task("d", pretasks=[self.small, self.big, self.late], prekeys=["out", "out", None])


class RandomDag(Coordinator):
    """A random DAG (up to three pretasks each, some failing once); finishes when every task is done."""

    def init(self, seed: int) -> None:
        r = self.random
        self.tids: list[int] = []
        for _ in range(r.randint(3, 14)):
            pre = r.sample(self.tids, r.randint(0, min(3, len(self.tids))))
            name = r.choice("abcdefg")
            tid = self.start_task(name, pretasks=pre, prekeys=["out"] * len(pre), keys=["out"], retries=1)
            self.tids.append(tid)
        self.left = set(self.tids)

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.left.discard(tid)
        if not self.left:
            self.finish(taskids=[self.tids[-1]], values=len(self.tids))


# ------------------------------------------------------------------ tests


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
        cids[name] = h.op({"op": "join", "client": name, "addr": f"{name}:1", "slots": 4, "have": tags})["cid"]
    sched = h.machine.scheduler
    for tid, cid, size in ((sched.small, cids["s"], small_size), (sched.big, cids["b"], big_size)):
        sizes = {"out": size, "log": 10**6}
        result = h.op({"op": "done", "cid": cid, "tid": tid, "attempt": 1, "values": {}, "sizes": sizes})
        assert result["accepted"]
    assert h.machine.task_info(sched.joined)["clients"] == [cids[winner]]


# ----------------------------------------------------------- rolling prefetch


def names(tasks: list[dict[str, Any]]) -> list[int]:
    return [t["tid"] for t in tasks]


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
    assert names(delta["tasks"]) == [] and delta["version"] > before
    assert delta["holders"] == [{"tid": m2, "cid": y, "addr": "y:7000"}]
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
        cids[name] = h.op({"op": "join", "client": name, "addr": f"{name}:1", "slots": 4, "have": tags})["cid"]
    sched = h.machine.scheduler
    for tid, cid, size in ((sched.small, cids["s"], small_size), (sched.big, cids["b"], big_size)):
        sizes = {"out": size, "log": 10**6}
        assert h.op({"op": "done", "cid": cid, "tid": tid, "attempt": 1, "values": {}, "sizes": sizes})["accepted"]
    assert h.machine.task_info(sched.joined)["state"] == "pending"
    h.op({"op": "join", "client": "l", "addr": "l:1", "slots": 1, "have": ["l"]})
    info = h.machine.task_info(sched.joined)
    assert info["clients"] == info["prefetching"] == [cids[winner]]
    h.machine.check_invariants()


def finish_in_random_order(sim: Sim, rng: random.Random, fail_rate: float = 0.0, max_steps: int = 2000) -> list[int]:
    """Complete (or fail) one runnable task at a time, chosen by ``rng``, until the computation ends.

    Checks the invariants and that no client ever has more than twice its
    slots placed (its slots plus its prefetch allowance).  Returns the tids
    in the order they were first assigned.
    """
    first_seen: dict[int, None] = {}
    for _ in range(max_steps):
        if sim.machine.run_state is not RunState.RUNNING:
            return list(first_seen)
        work = []
        for cid, _name, _addr in sim.machine.live_clients():
            sim.poll(cid)
            first_seen.update(dict.fromkeys(sorted(sim.assigned[cid])))
            slots = next(c["slots"] for c in sim.h.status["live_clients"] if c["cid"] == cid)
            assert len(sim.assigned[cid]) <= 2 * slots, (cid, sorted(sim.assigned[cid]))
            work += [(cid, tid) for tid in sim.runnable(cid)]
        assert work, f"deadlock: nothing runnable, status {sim.h.status['tasks']}"
        cid, tid = rng.choice(work)
        if rng.random() < fail_rate and sim.machine.task_info(tid)["failures"] == 0:
            sim.fail(cid, tid)
        else:
            sim.complete(cid, tid)
        sim.machine.check_invariants()
    raise AssertionError("the computation did not finish")


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
    assert late["accepted"] is False
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


def test_snapshot_carries_early_placements() -> None:
    sim = Sim(Shuffle, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=2)
    y = sim.join("y", slots=1)
    for cid in (x, y):
        sim.poll(cid)
    sim.complete(x, sched.maps[0])
    cut = len(sim.h.batches)
    snap = sim.h.applier.snapshot()
    prefetching = {t: sim.machine.task_info(t)["prefetching"] for t in sched.reduces}
    # x holds the one input there is: its allowance takes two reduces, y's the third.
    assert list(prefetching.values()) == [[x], [x], [y]]
    sim.run()
    assert sim.h.status["state"] == "finished"

    fresh = Applier(CoordinatorMachine(Shuffle))
    fresh.restore(snap)
    restored = fresh.machine
    assert isinstance(restored, CoordinatorMachine)
    restored.check_invariants()
    assert {t: restored.task_info(t)["prefetching"] for t in sched.reduces} == prefetching
    for batch in sim.h.batches[cut:]:
        fresh.apply_slot(fresh.applied + 1, batch)
        restored.check_invariants()
    assert fresh.digest == sim.h.applier.digest
    assert restored.status() == sim.machine.status()


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
    assert late["accepted"] is False and "killed" in late["reason"]


def test_cancel_from_the_command_line_cascades() -> None:
    sim = Sim(ChainScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=1, have=("x",))
    assert sim.h.op({"op": "cancel", "tid": sched.a})["killed"] == [sched.a, sched.b, sched.c]
    assert sim.poll(x)["tasks"] == []
    unknown = sim.h.op({"op": "cancel", "tid": 99})
    assert unknown["ok"] is False and unknown["error"] == "cancel: unknown task 99"


def test_dead_client_tasks_are_placed_again_and_its_late_report_ignored() -> None:
    sim = Sim(ChainScheduler, ECHO)
    sched = sim.machine.scheduler
    first = sim.join("first", slots=1, have=("x",))
    assert [t["tid"] for t in sim.poll(first)["tasks"]] == [sched.a]
    sim.h.tick(expired=(first,))
    assert sched.dead == [first]
    assert sim.machine.task_info(sched.a)["state"] == "pending"
    gone = sim.machine.view(first, 0)
    assert gone["alive"] is False and gone["tasks"] == []
    second = sim.join("second", slots=1, have=("x",))
    task = sim.poll(second)["tasks"][0]
    assert (task["tid"], task["attempt"]) == (sched.a, 2)
    late = sim.h.op({"op": "done", "cid": first, "tid": sched.a, "attempt": 1, "values": {}, "sizes": {}})
    assert late["accepted"] is False and "dead" in late["reason"]
    assert sim.complete(second, sched.a)["accepted"]
    # A client that comes back under its old name is a new client.
    assert sim.join("first", slots=1) == 3


def run_on(sim: Sim, cid: int) -> None:
    """Run everything client ``cid`` gets until it has nothing runnable."""
    while True:
        sim.poll(cid)
        ready = sim.runnable(cid)
        if not ready:
            return
        sim.complete(cid, ready[0])


def test_lost_outputs_are_recomputed_from_lineage() -> None:
    sim = Sim(ChainScheduler, ECHO)
    sched = sim.machine.scheduler
    x = sim.join("x", slots=4, have=("x",))
    y = sim.join("y", slots=4, have=("y",))
    run_on(sim, x)
    # a and b ran on x; c now runs on y and needs b's output, held only by x.
    assert [t["tid"] for t in sim.poll(y)["tasks"]] == [sched.c]
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
    assert result["accepted"]
    assert sim.machine.task_info(sched.b)["clients"] == [x]
    assert sim.machine.task_info(sched.a)["state"] == "done"  # its output is still on x
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
    assert sim.complete(one, sched.t)["accepted"]
    assert sim.poll(two)["kill"] == [sched.t]
    dup = sim.h.op(
        {"op": "done", "cid": two, "tid": sched.t, "attempt": task_two["attempt"], "values": {"out": 1}, "sizes": {}}
    )
    assert dup["accepted"] is False and "done" in dup["reason"]
    assert [tid for tid, _ in sched.done] == [sched.t]
    assert sim.machine.task_info(sched.t)["holder"] == one
    sim.machine.check_invariants()


def test_replicas_draw_the_same_seed() -> None:
    sim = Sim(ReplicaScheduler, ECHO)
    one, two = sim.join("one"), sim.join("two")
    seeds = {sim.poll(c)["tasks"][0]["seed"] for c in (one, two)}
    assert len(seeds) == 1 and 0 <= seeds.pop() < 2**53


def test_failures_are_retried_then_fail_the_computation_with_a_report() -> None:
    sim = Sim(FragileScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=1)
    sim.poll(cid)
    assert sim.fail(cid, sched.t, "ValueError: bad input")["accepted"]
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
    assert sim.complete(cid, sched.a)["accepted"]
    sim.complete(cid, sched.b)
    slot = sim.h.applier.applied
    failure = sim.h.status["failure"]
    assert failure["hook"] == "task_done" and failure["tid"] == sched.b and failure["slot"] == slot
    assert f"BuggyScheduler.task_done(tid={sched.b})" in failure["message"]
    assert f"log slot {slot}" in failure["message"] and "ZeroDivisionError" in failure["message"]
    assert "test_coordinator_machine.py line" in failure["message"]
    assert sim.machine.last_hook == {"hook": "task_done", "tid": sched.b, "cid": None, "slot": slot}
    # The cluster stays up: ops are answered, status and views keep working.
    assert sim.h.op({"op": "join", "client": "late", "addr": "late:1", "slots": 1, "have": []})["ok"]
    sim.h.tick()
    assert sim.h.status["state"] == "failed" and sim.machine.view(cid, 0)["state"] == "failed"
    sim.machine.check_invariants()


def test_actions_outside_hooks_are_refused() -> None:
    with pytest.raises(SchedulerUsageError, match="inside a hook"):
        ChainScheduler().start_task("a")
    h = Harness(ChainScheduler)
    h.init()
    with pytest.raises(SchedulerUsageError, match="only be called while a hook"):
        h.machine.scheduler.start_task("a")
    with pytest.raises(SchedulerUsageError):
        h.machine.scheduler.finish()
    assert isinstance(h.machine.scheduler.random, random.Random)


def test_view_reports_only_changes_since_a_version() -> None:
    sim = Sim(KillScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=4)
    first = sim.machine.view(cid, 0)
    assert [t["tid"] for t in first["tasks"]] == [sched.a, sched.d]
    again = sim.machine.view(cid, first["version"])
    assert again["tasks"] == [] and again["kill"] == [] and again["version"] == first["version"]
    assert sim.machine.client_version(cid) == first["version"]
    sim.h.op({"op": "cancel", "tid": sched.d})
    delta = sim.machine.view(cid, first["version"])
    assert delta["tasks"] == [] and delta["kill"] == [sched.d]
    assert [t["tid"] for t in sim.machine.view(cid, 0)["tasks"]] == [sched.a]


def test_malformed_ops_change_nothing() -> None:
    h = Harness(ChainScheduler)
    assert "not initialized" in h.op({"op": "join", "client": "c", "addr": "c:1", "slots": 1, "have": []})["error"]
    h.init()
    before = h.machine.snapshot()
    for op in (
        {"op": "bogus"},
        ["done"],
        {"op": "done", "cid": True, "tid": 1, "attempt": 1},
        {"op": "done", "cid": 1, "tid": 1, "attempt": 1},
        {"op": "join", "client": "c", "addr": "c:1", "slots": -1, "have": []},
        {"op": "join", "client": "c", "addr": "c:1", "slots": 1, "have": "gpu"},
        {"op": "failed", "cid": 1, "tid": 1, "attempt": 1, "error": 3},
    ):
        result = h.op(op)
        assert result["ok"] is False and result["error"]
    assert h.machine.snapshot() == before
    assert h.op({"op": "init", "seed": 5, "code_digest": "other"})["ignored"]
    assert h.machine.status()["seed"] == 11


def test_rejoin_under_a_live_name_keeps_the_cid() -> None:
    sim = Sim(ChainScheduler, ECHO)
    x = sim.join("x", slots=1, have=("x",))
    assert sim.join("x", slots=2, have=("x",)) == x
    assert sim.machine.live_clients() == [(x, "x", "x:7000")]


def test_expired_clients_uses_client_timeout() -> None:
    h = Harness(ChainScheduler, client_timeout=5.0)
    h.init()
    a = h.op({"op": "join", "client": "a", "addr": "a:1", "slots": 1, "have": []})["cid"]
    b = h.op({"op": "join", "client": "b", "addr": "b:1", "slots": 1, "have": []})["cid"]
    assert h.machine.expired_clients({a: 10.0, b: 3.0}, now=9.0) == [b]
    assert h.machine.expired_clients({a: 10.0}, now=100.0) == [a]
    with pytest.raises(ValueError, match="client_timeout"):
        CoordinatorMachine(ChainScheduler, client_timeout=0)
    # Clients learn it from their views, to keep their polls well inside it.
    assert h.machine.view(a)["client_timeout"] == 5.0


def replay(cls: type[Coordinator], batches: list[Batch], start: Applier | None = None) -> Applier:
    applier = start if start is not None else Applier(CoordinatorMachine(cls))
    for batch in batches:
        applier.apply_slot(applier.applied + 1, batch)
    return applier


def test_snapshot_restore_continues_identically() -> None:
    sim = Sim(CountingScheduler, ECHO)
    cid = sim.join("w", slots=1)
    for _ in range(3):
        sim.poll(cid)
        sim.complete(cid, sorted(sim.assigned[cid])[0])
    cut = len(sim.h.batches)
    snap = sim.h.applier.snapshot()
    sim.run()
    assert sim.h.status["state"] == "finished"

    fresh = Applier(CoordinatorMachine(CountingScheduler))
    fresh.restore(snap)
    restored = fresh.machine
    assert isinstance(restored, CoordinatorMachine)
    assert restored.scheduler.done == [1, 2, 3]
    results = [fresh.apply_slot(fresh.applied + 1, b) for b in sim.h.batches[cut:]]
    originals = [r for r in replay(CountingScheduler, sim.h.batches[:cut]).apply_slot(cut + 1, sim.h.batches[cut])]
    assert results[0] == originals
    assert fresh.digest == sim.h.applier.digest
    assert restored.status() == sim.machine.status()
    # The restored scheduler's actions worked: it started the later tasks itself.
    assert restored.scheduler.done == sim.machine.scheduler.done and len(restored.scheduler.done) == 6


def test_snapshot_moves_between_replicas_that_loaded_the_file_under_other_names() -> None:
    # One replica may run ``python scheduler.py`` (module __main__), another
    # load the file by path: the class differs as an object, not as code.
    first, second = load_scheduler(MONTECARLO), load_scheduler(MONTECARLO)
    assert first is not second and first.__module__ != second.__module__
    sim = Sim(first, {"montecarlo": montecarlo, "merge": merge})
    cid = sim.join("w", slots=11)
    sim.poll(cid)
    for tid in range(1, 12):
        sim.complete(cid, tid)
    other = Applier(CoordinatorMachine(second))
    other.restore(sim.h.applier.snapshot())
    assert type(other.machine.scheduler) is second
    view = other.machine.view(cid, 0)
    assert [t["tid"] for t in view["tasks"]] == [12]
    inputs = [sim.store[cid][i["tid"]][i["key"]] for i in view["tasks"][0]["inputs"]]
    done = {"op": "done", "cid": cid, "tid": 12, "attempt": 1, "values": merge({}, *inputs), "sizes": {}}
    other.apply_slot(other.applied + 1, Batch(items=(Command(client_id="w", seq=1, op=done),)))
    assert other.machine.status()["result"]["values"] == merge({}, *inputs)


def test_restoring_a_snapshot_of_other_scheduler_code_is_refused() -> None:
    h = Harness(ChainScheduler)
    h.init()
    other = CoordinatorMachine(load_scheduler(MONTECARLO))
    with pytest.raises(SchedulerMismatch, match="different scheduler code"):
        other.restore(h.machine.snapshot())


def test_init_with_a_different_code_digest_refuses_to_apply(tmp_path: pathlib.Path) -> None:
    body = (
        "from tasksprint import Coordinator\n"
        "class S(Coordinator):\n"
        "    def init(self, seed):\n"
        "        self.start_task('a')\n"
    )
    (tmp_path / "one.py").write_text(body)
    (tmp_path / "two.py").write_text(body + "        self.start_task('b')\n")
    one, two = load_scheduler(f"{tmp_path / 'one.py'}:S"), load_scheduler(f"{tmp_path / 'two.py'}:S")
    assert scheduler_code_digest(one) != scheduler_code_digest(two)
    h = Harness(two)
    with pytest.raises(SchedulerMismatch, match="different scheduler code than the one the computation started with"):
        h.op({"op": "init", "seed": 1, "code_digest": scheduler_code_digest(one)})
    assert h.machine.run_state is RunState.WAITING


def test_loading_schedulers_reports_what_is_wrong(tmp_path: pathlib.Path) -> None:
    with pytest.raises(SchedulerLoadError, match="does not exist"):
        load_scheduler(f"{tmp_path / 'missing.py'}:S")
    (tmp_path / "sched.py").write_text(
        "from tasksprint import Coordinator\n"
        "class Real(Coordinator):\n    pass\n"
        "class Plain:\n    pass\n"
        "Real().start()\n"
    )
    with pytest.raises(SchedulerLoadError, match="no class 'Nope'.*Real"):
        load_scheduler(f"{tmp_path / 'sched.py'}:Nope")
    with pytest.raises(SchedulerLoadError, match="not a Coordinator subclass"):
        load_scheduler(f"{tmp_path / 'sched.py'}:Plain")
    with pytest.raises(SchedulerLoadError, match="not a Coordinator subclass"):
        load_scheduler("tasksprint_sdk.coordinator:Coordinator")
    with pytest.raises(SchedulerLoadError, match="cannot import scheduler module"):
        load_scheduler("no_such_module_anywhere:S")
    with pytest.raises(SchedulerLoadError, match="FILE.py:CLASS"):
        load_scheduler("sched.py")
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    with pytest.raises(SchedulerLoadError, match="half written"):
        load_scheduler(f"{tmp_path / 'broken.py'}:S")
    assert load_scheduler(f"{tmp_path / 'sched.py'}:Real").__name__ == "Real"


def test_start_runs_a_replica_unless_the_file_is_being_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def main(argv: list[str], scheduler: type[Coordinator]) -> int:
        calls.append((argv, scheduler))
        return 3

    fake = types.ModuleType("tasksprint.launch")
    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tasksprint.launch", fake)
    monkeypatch.setattr(tasksprint, "launch", fake, raising=False)
    monkeypatch.setattr(sys, "argv", ["scheduler.py", "--id", "0"])
    sched = ChainScheduler()
    with loading_scheduler():
        assert sched.start() is None
    assert calls == []
    with pytest.raises(SystemExit) as exit_info:
        sched.start()
    assert exit_info.value.code == 3
    assert calls == [(["--id", "0"], ChainScheduler)]


# ----------------------------------------------------------- determinism


def drive(seed: int, steps: list[tuple[int, int]], snap_at: int | None = None) -> list[Applier]:
    """Feed the same ops (chosen from machine A's state) to two machines; return their appliers.

    With ``snap_at``, a third machine restored from A's snapshot at that
    step joins in.  Digests are compared and invariants checked after every step.
    """
    appliers = [Applier(CoordinatorMachine(RandomScheduler)) for _ in range(2)]
    lead = appliers[0].machine
    assert isinstance(lead, CoordinatorMachine)
    sent: list[Command] = []
    now = 0.0

    def cmd(op: dict[str, Any]) -> Command:
        c = Command(client_id="driver", seq=len(sent) + 1, op=op)
        sent.append(c)
        return c

    def feed(item: Command | Tick) -> None:
        results = [a.apply_slot(a.applied + 1, Batch(items=(item,))) for a in appliers]
        assert all(r == results[0] for r in results)
        assert len({a.digest for a in appliers}) == 1
        for a in appliers:
            a.machine.check_invariants()

    feed(cmd({"op": "init", "seed": seed, "code_digest": lead.code_digest}))
    for n, (kind, r) in enumerate(steps):
        if n == snap_at:
            clone = Applier(CoordinatorMachine(RandomScheduler))
            clone.restore(appliers[0].snapshot())
            appliers.append(clone)
        live = [cid for cid, _, _ in lead.live_clients()]
        work = [(cid, t) for cid in live for t in lead.view(cid, 0)["tasks"]]
        item: Command | Tick
        if kind == 0 or not live:
            tags = [t for i, t in enumerate(RandomScheduler.TAGS) if r >> i & 1]
            join = {"op": "join", "client": f"n{r % 7}", "addr": f"n{r % 7}:{r}", "slots": 1 + r % 3, "have": tags}
            item = cmd({**join, "queue": r % 4} if r % 5 else join)
        elif kind == 1:
            now += r % 5
            expired = [live[r % len(live)]] if r % 3 == 0 else []
            item = Tick(now=now, data={"expired": expired})
        elif kind in (2, 3, 4) and work:
            cid, t = work[r % len(work)]
            attempt = t["attempt"] - (1 if r % 11 == 0 else 0)
            if kind == 4:
                item = cmd({"op": "failed", "cid": cid, "tid": t["tid"], "attempt": attempt, "error": f"e{r}"})
            else:
                sizes = {k: r % 1000 for k in [*t["keys"], "extra"]}
                done = {"op": "done", "cid": cid, "tid": t["tid"], "attempt": attempt, "values": {"out": r}}
                item = cmd({**done, "sizes": sizes})
        elif kind == 5:
            item = cmd({"op": "cancel", "tid": 1 + r % (lead.status()["tasks"]["total"] + 1)})
        elif kind == 6:
            tid = 1 + r % (lead.status()["tasks"]["total"] + 1)
            item = cmd({"op": "lost", "cid": live[r % len(live)], "tid": tid, "key": "out"})
        elif kind == 8 and work:
            # Batched reports, some claiming inputs used before their commit
            # (accepted or sent back for a rerun, depending on what committed).
            ops: list[Any] = []
            for k in range(1 + r % 4):
                cid, t = work[(r + 7 * k) % len(work)]
                if (r >> k) % 5 == 0:
                    ops.append({"op": "failed", "cid": cid, "tid": t["tid"], "attempt": t["attempt"], "error": "e"})
                    continue
                done = {"op": "done", "cid": cid, "tid": t["tid"], "attempt": t["attempt"], "values": {"out": r}}
                if (r >> k) % 2:
                    pretasks = [i["tid"] for i in t["inputs"]]
                    done["early"] = [[p, lead.task_info(p)["attempt"]] for p in pretasks]
                ops.append({**done, "sizes": {"out": k}})
            if r % 9 == 0:
                ops.append({"op": "join", "client": "x"})  # not batchable: an error result, the rest applies
            item = cmd({"op": "batch", "ops": ops})
        elif sent:
            item = sent[r % len(sent)]  # a client retrying an old command
        else:
            continue
        feed(item)
    return appliers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    steps=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**16)), min_size=1, max_size=120),
    snap_at=st.none() | st.integers(0, 120),
)
def test_same_log_gives_same_digest(seed: int, steps: list[tuple[int, int]], snap_at: int | None) -> None:
    appliers = drive(seed, steps, snap_at)
    statuses = [a.machine.status() for a in appliers]
    assert all(s == statuses[0] for s in statuses)


def test_a_nondeterministic_scheduler_shows_up_as_a_digest_mismatch() -> None:
    replicas = [Harness(SloppyScheduler) for _ in range(2)]
    ops = [
        {"op": "init", "seed": 3, "code_digest": replicas[0].machine.code_digest},
        {"op": "join", "client": "c", "addr": "c:1", "slots": 1, "have": []},
    ]
    digests = []
    for op in ops:
        for h in replicas:
            h.op(op)
        digests.append({h.applier.digest for h in replicas})
    assert [len(d) for d in digests] == [1, 2]
    assert replicas[1].machine.last_hook == {"hook": "client_joined", "tid": None, "cid": 1, "slot": 2}


def scenario_digest() -> str:
    """The digest of a fixed randomized run (compared across hash seeds)."""
    rng = random.Random(2024)
    steps = [(rng.randint(0, 8), rng.randint(0, 2**16)) for _ in range(300)]
    return drive(99, steps)[0].digest.hex()


def test_digest_does_not_depend_on_the_process_hash_seed() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        import test_coordinator_machine
        print(test_coordinator_machine.scenario_digest())
        """
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
        )
        digests.add(out.stdout.strip().splitlines()[-1])
    assert digests == {scenario_digest()}


# ------------------------------------------------- queues, batches, followers


class ManyScheduler(Coordinator):
    """``N`` independent tasks, started at init."""

    N = 40

    def init(self, seed: int) -> None:
        self.done: list[int] = []
        self.tids = [self.start_task("a", args=[i], keys=["out"]) for i in range(self.N)]

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.done.append(tid)
        if len(self.done) == self.N:
            self.finish(values=len(self.done))


class LongChain(Coordinator):
    """A chain of ``N`` tasks, all started at init; ``first`` fans out to ``side`` too."""

    N = 12

    def init(self, seed: int) -> None:
        self.done: list[int] = []
        self.chain = [self.start_task("a", keys=["out"])]
        for i in range(1, self.N):
            self.chain.append(self.start_task("b", args=[i], pretasks=[self.chain[-1]], prekeys=["out"], keys=["out"]))

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self.done.append(tid)
        if tid == self.chain[-1]:
            self.finish(taskids=[tid], values="end")


def join(h: Harness, name: str, slots: int, queue: int | None = None, have: tuple[str, ...] = ()) -> int:
    op = {"op": "join", "client": name, "addr": f"{name}:1", "slots": slots, "have": list(have)}
    if queue is not None:
        op["queue"] = queue
    return h.op(op)["cid"]


def done_op(cid: int, tid: int, attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"op": "done", "cid": cid, "tid": tid, "attempt": attempt, "values": {"out": tid}, "sizes": {"out": 8}, **extra}


def test_a_client_with_a_queue_gets_that_many_ready_tasks_beyond_its_slots() -> None:
    h = Harness(ManyScheduler)
    h.init()
    plain = join(h, "plain", slots=2)
    queued = join(h, "queued", slots=2, queue=5)
    assert [len(h.machine.view(cid)["tasks"]) for cid in (plain, queued)] == [2, 7]
    # The tasks are placed in tid order, and status counts the queued ones as placed there.
    placed = sorted(t["tid"] for cid in (plain, queued) for t in h.machine.view(cid)["tasks"])
    assert placed == h.machine.scheduler.tids[:9]
    assert [c["running"] for c in h.status["live_clients"]] == [2, 7]
    # Each completion frees room for exactly one more.
    first = h.machine.view(queued)["tasks"][0]["tid"]
    assert h.op(done_op(queued, first))["accepted"]
    assert len(h.machine.view(queued)["tasks"]) == 7
    assert h.machine.task_info(h.machine.scheduler.tids[9])["clients"] == [queued]
    # A larger queue, announced by joining again under the same name, takes effect at once.
    assert join(h, "queued", slots=2, queue=10) == queued
    assert len(h.machine.view(queued)["tasks"]) == 12
    h.machine.check_invariants()


def test_a_dead_clients_queued_tasks_are_placed_again() -> None:
    sim = Sim(ManyScheduler, ECHO)
    x = sim.join("x", slots=1)
    h = sim.h
    y = h.op({"op": "join", "client": "y", "addr": "y:7000", "slots": 1, "queue": 6, "have": []})["cid"]
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


def test_a_batch_applies_each_report_in_order_as_one_log_item() -> None:
    h = Harness(ManyScheduler)
    h.init()
    cid = join(h, "c", slots=3)
    a, b, c = names(h.machine.view(cid)["tasks"])
    result = h.op(
        {
            "op": "batch",
            "ops": [
                done_op(cid, b),
                {"op": "failed", "cid": cid, "tid": c, "attempt": 1, "error": "boom"},
                {"op": "join", "client": "z", "addr": "z:1", "slots": 1},
                done_op(cid, 999),
                done_op(cid, b),
                done_op(cid, a),
            ],
        }
    )
    assert result["ok"] and result["count"] == 6
    # Only the results other than a plain acceptance come back, with their positions.
    others = dict((i, r) for i, r in result["others"])
    assert sorted(others) == [2, 3, 4]
    results = [others.get(i, {"ok": True, "accepted": True, "reason": None}) for i in range(6)]
    assert results[1]["accepted"] and not results[2]["ok"] and "only done, failed and lost" in results[2]["error"]
    assert not results[3]["ok"] and "unknown task 999" in results[3]["error"]
    assert not results[4]["accepted"] and "is done" in results[4]["reason"]
    assert results[5]["accepted"]
    # task_done ran in the batch's order; the failed one is retried (attempt 2), and placed again.
    assert h.machine.scheduler.done == [b, a]
    assert h.machine.task_info(c)["attempt"] == 2 and h.machine.task_info(c)["clients"] == [cid]
    assert h.status["clients"]["live"] == 1  # the join inside the batch did nothing
    h.machine.check_invariants()
    assert not h.op({"op": "batch", "ops": "nope"})["ok"]


def test_batched_reports_give_every_replica_the_same_state() -> None:
    replicas = [Harness(LongChain) for _ in range(3)]
    for h in replicas:
        h.init()
    lead = replicas[0]
    ops: list[dict[str, Any]] = [{"op": "join", "client": "c", "addr": "c:1", "slots": 1, "queue": 3, "have": []}]
    for op in ops:
        for h in replicas:
            h.op(op)
    while lead.machine.run_state is RunState.RUNNING:
        view = lead.machine.view(1)["tasks"]
        batch = {"op": "batch", "ops": [done_op(1, t["tid"], t["attempt"], early=[[i["tid"], 1] for i in t["inputs"]]) for t in view]}
        for h in replicas:
            h.op(batch)
        assert len({h.applier.digest for h in replicas}) == 1
        assert len({repr(h.machine.status()) for h in replicas}) == 1
    assert lead.status["result"]["values"] == "end"


def test_a_chain_follows_its_pretask_onto_a_client_with_a_queue() -> None:
    h = Harness(LongChain)
    h.init()
    chain = h.machine.scheduler.chain
    other = join(h, "other", slots=4, queue=4)
    assert names(h.machine.view(other)["tasks"]) == chain[:9]  # first + 8 followers (2 x (slots + queue) in all)
    assert h.machine.task_info(chain[1])["prefetching"] == [other]
    assert h.machine.task_info(chain[9])["state"] == "pending"
    # Without a queue nothing follows: the second link waits for the first's output.
    h2 = Harness(LongChain)
    h2.init()
    plain = join(h2, "plain", slots=4)
    assert names(h2.machine.view(plain)["tasks"]) == [chain[0]]
    # Completing links frees room for the next followers, in chain order.
    assert h.op({"op": "batch", "ops": [done_op(other, chain[0]), done_op(other, chain[1], early=[[chain[0], 1]])]})["ok"]
    # (chain[2] has its input now and takes a slot: eight wait for inputs again, the allowance.)
    assert names(h.machine.view(other)["tasks"]) == chain[2:11]
    assert h.machine.task_info(chain[2])["prefetching"] == []
    h.machine.check_invariants()


def test_an_early_completion_counts_only_if_its_input_was_committed_from_that_client() -> None:
    h = Harness(LongChain)
    h.init()
    a, b, c = h.machine.scheduler.chain[:3]
    x = join(h, "x", slots=1, queue=2)
    assert names(h.machine.view(x)["tasks"]) == [a, b, c] or names(h.machine.view(x)["tasks"])[:2] == [a, b]
    # b reported before a, claiming a's output: a is not committed, so b runs again.
    result = h.op(done_op(x, b, early=[[a, 1]]))
    assert (result["accepted"], result["rerun"]) == (False, True)
    info = h.machine.task_info(b)
    assert info["attempt"] == 2 and info["state"] == "running" and info["clients"] == [x]
    assert h.machine.scheduler.done == []
    # The new attempt is in x's view; a stale report of attempt 1 is refused.
    assert [(t["tid"], t["attempt"]) for t in h.machine.view(x)["tasks"] if t["tid"] == b] == [(b, 2)]
    # a commits (from x), then b's attempt 2 with a's output used early is accepted.
    assert h.op(done_op(x, a))["accepted"]
    assert h.op(done_op(x, b, attempt=2, early=[[a, 1]]))["accepted"]
    # An early claim naming the wrong attempt or another client's output is refused too.
    assert h.op(done_op(x, c, early=[[b, 1]]))["rerun"]
    assert not h.op(done_op(x, c, early=[[99, 1]]))["ok"]  # not a pretask of c: malformed
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
    assert h.op(done_op(y, sched.a))["accepted"]
    result = h.op({"op": "batch", "ops": [done_op(x, sched.a), done_op(x, sched.b, early=[[sched.a, 1]])]})
    others = dict((i, r) for i, r in result["others"])
    assert not others[0]["accepted"] and others[1]["rerun"]
    info = h.machine.task_info(sched.b)
    assert info["attempt"] == 2 and info["state"] == "running"
    h.machine.check_invariants()


class PlainArgs(Coordinator):
    """Starts one task per case in ``CASES``; records which start_task refused."""

    CASES: list[tuple[Any, Any]] = [
        ([1, "a", 2.5, None, True, 2**70], {"k": "v"}),  # flat scalars: the fast path
        ([[1, 2], {"x": [3]}], {"nested": {"deep": [1]}}),  # nested plain data
        ([object()], {}),
        ([1], {"k": object()}),
        ([], {"k": lambda: 0}),
        ([{1, 2}], {}),  # a set: its order may differ between replicas, and JSON has none
        ([], {"k": [frozenset()]}),
    ]

    def init(self, seed: int) -> None:
        self.refused: list[int] = []
        for i, (args, kwargs) in enumerate(self.CASES):
            try:
                self.start_task("a", args=args, kwargs=kwargs)
            except TypeError as exc:
                assert "plain data" in str(exc)
                self.refused.append(i)


def test_start_task_takes_plain_data_only() -> None:
    h = Harness(PlainArgs)
    h.init()
    assert h.machine.scheduler.refused == [2, 3, 4, 5, 6]
    assert h.status["tasks"]["total"] == 2
