"""Coordinator snapshots, loading scheduler files, code digests and starting a replica from a scheduler script."""

from __future__ import annotations

import pathlib
import sys
import types

import pytest
from coordinator_harness import (
    ECHO,
    MONTECARLO,
    ChainScheduler,
    CountingScheduler,
    Harness,
    Shuffle,
    Sim,
    merge,
    montecarlo,
    names,
    replay,
)
from tasksprint_sdk.coordinator import (
    Coordinator,
    SchedulerLoadError,
    load_scheduler,
    loading_scheduler,
    scheduler_code_digest,
)

import tasksprint
from tasksprint.coordinator.machine import CoordinatorMachine, RunState, SchedulerMismatch
from tasksprint.machine import Applier
from tasksprint.paxos.messages import Batch, Command


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
    assert names(view.tasks) == [12]
    inputs = [sim.store[cid][i.tid][i.key] for i in view.tasks[0].inputs]
    done = {"op": "done", "cid": cid, "tid": 12, "attempt": 1, "values": merge({}, *inputs), "sizes": {}}
    # Reported by the log session that joined the client (the harness's): only it may.
    other.apply_slot(other.applied + 1, Batch(items=(Command(client_id="sim", seq=10**6, op=done),)))
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
