"""The shared harness of the coordinator tests: one replica's machine fed slot by slot, simulated clients, schedulers.

Clients are simulated in memory: they join, read their views, run the task
functions below and report completions, all through the same ``Applier``
a replica uses.  Scheduler classes live at module level, as they would in
a user's scheduler file.
"""

from __future__ import annotations

import itertools
import pathlib
import random
from collections.abc import Callable
from typing import Any

import attr
from tasksprint_sdk.coordinator import (
    Coordinator,
)

from tasksprint import codec
from tasksprint.coordinator.machine import CoordinatorMachine, RunState
from tasksprint.coordinator.ops import Initialized, Joined
from tasksprint.machine import Applier
from tasksprint.paxos.messages import Batch, Command, Tick

ROOT = pathlib.Path(__file__).resolve().parent.parent


MONTECARLO = f"{ROOT / 'examples' / 'montecarlo' / 'scheduler.py'}:MonteCarloCoordinator"


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

    def tick(self, advance: float = 1.0, expired: tuple[int, ...] = (), grace: Any = None) -> None:
        """A TICK ``advance`` seconds on; ``grace``: how long to wait for the expired clients' outputs."""
        self.now += advance
        data: dict[str, Any] = {"expired": list(expired)}
        if grace is not None:
            data["grace"] = grace
        self.apply(Tick(now=self.now, data=data))

    def init(self, seed: int = 11) -> Any:
        return self.op({"op": "init", "seed": seed, "code_digest": self.machine.code_digest})

    @property
    def status(self) -> dict[str, Any]:
        return self.machine.status()


NodeFn = Callable[..., dict[str, Any]]


def _plain(value: Any) -> dict[str, Any]:
    """A typed reply as the plain lists and dicts a simulated client keeps and updates."""
    return attr.asdict(value, retain_collection_types=False)


class Sim:
    """Simulated clients: each polls its view, fetches inputs from holders and runs tasks."""

    def __init__(self, cls: type[Coordinator], nodes: dict[str, NodeFn], seed: int = 11) -> None:
        self.h = Harness(cls)
        assert isinstance(self.h.init(seed), Initialized)
        self.machine = self.h.machine
        self.nodes = nodes
        self.store: dict[int, dict[int, dict[str, Any]]] = {}
        self.seen: dict[int, int] = {}
        self.assigned: dict[int, dict[int, dict[str, Any]]] = {}
        self.killed: dict[int, list[int]] = {}

    def join(self, name: str, slots: int = 2, have: tuple[str, ...] = ()) -> int:
        result = self.h.op({"op": "join", "client": name, "addr": f"{name}:7000", "slots": slots, "have": list(have)})
        cid = result.cid
        for d in (self.store, self.assigned):
            d.setdefault(cid, {})
        self.seen.setdefault(cid, 0)
        self.killed.setdefault(cid, [])
        return cid

    def rejoin(self, old: int, name: str, holds: list[list[int]], have: tuple[str, ...] = ("x",)) -> Joined:
        """Client ``name`` (incarnation ``old``, declared dead) joins again, its store as it was, offering ``holds``."""
        result = self.h.op(
            {"op": "join", "client": name, "addr": f"{name}:7001", "slots": 4, "have": list(have), "holds": holds}
        )
        assert isinstance(result, Joined), result
        cid = result.cid
        self.store[cid] = dict(self.store[old])  # the same object store
        self.assigned[cid] = {}
        self.seen[cid] = 0
        self.killed[cid] = []
        self.machine.check_invariants()
        return result

    def poll(self, cid: int) -> dict[str, Any]:
        """Client ``cid`` reads its view; returns it as the plain data the simulated client keeps."""
        view = self.machine.view(cid, self.seen[cid])
        self.seen[cid] = view.version
        for task in view.tasks:
            # The simulated client's own record of the task, as plain data it updates.
            self.assigned[cid][task.tid] = _plain(task)
        for tid in view.kill:
            self.assigned[cid].pop(tid, None)
            self.killed[cid].append(tid)
        # Released outputs leave the store, as the real client drops them: a
        # task that still needed one could not run, and the run would not settle.
        for tid in view.released:
            if tid not in self.assigned[cid]:
                self.store[cid].pop(tid, None)
        # Later moves of an input come as holder changes, as the real client keeps them.
        moved = {h.tid: _plain(h) for h in view.holders}
        for task in self.assigned[cid].values():
            for i in task["inputs"]:
                if i["tid"] in moved:
                    i["cid"], i["addr"] = moved[i["tid"]]["cid"], moved[i["tid"]]["addr"]
        return _plain(view)

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


def names(tasks: Any) -> list[int]:
    """The tids of a view's tasks (typed, or as a simulated client's plain data)."""
    return [t["tid"] if isinstance(t, dict) else t.tid for t in tasks]


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


def chain_ran_on_x(sim: Sim) -> tuple[Any, int, int]:
    """:class:`ChainScheduler`'s a and b run on client x, c is placed on client y (it needs b, held only by x).

    Returns the scheduler, x and y.
    """
    sched = sim.machine.scheduler
    x = sim.join("x", slots=4, have=("x",))
    y = sim.join("y", slots=4, have=("y",))
    run_on(sim, x)
    assert [t["tid"] for t in sim.poll(y)["tasks"]] == [sched.c]
    return sched, x, y


def run_on(sim: Sim, cid: int) -> None:
    """Run everything client ``cid`` gets until it has nothing runnable."""
    while True:
        sim.poll(cid)
        ready = sim.runnable(cid)
        if not ready:
            return
        sim.complete(cid, ready[0])


def replay(cls: type[Coordinator], batches: list[Batch], start: Applier | None = None) -> Applier:
    applier = start if start is not None else Applier(CoordinatorMachine(cls))
    for batch in batches:
        applier.apply_slot(applier.applied + 1, batch)
    return applier


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
    return h.op(op).cid


def done_op(cid: int, tid: int, attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "op": "done",
        "cid": cid,
        "tid": tid,
        "attempt": attempt,
        "values": {"out": tid},
        "sizes": {"out": 8},
        **extra,
    }


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
