"""Snapshots are data from a peer or a disk: restoring one never runs code it names, and a
scheduler whose state cannot be saved fails its computation cleanly instead of stopping replicas."""

from __future__ import annotations

import fractions
import functools
import pathlib
import pickle
import sqlite3

import pytest
from coordinator_harness import ChainScheduler, Harness
from tasksprint_sdk.coordinator import Coordinator, scheduler_code_digest

from tasksprint import codec
from tasksprint.batch.taskfile import Notice
from tasksprint.coordinator.machine import CoordinatorMachine, RunState
from tasksprint.coordinator.snapshots import BadSnapshot, SnapshotRefused
from tasksprint.machine import Applier, SnapshotUnavailable
from tasksprint.storage import Storage, StorageError


class Holder:
    """A class of the scheduler's own module: allowed in a snapshot."""

    def __init__(self, n: int) -> None:
        self.n = n


class KeepsAFile(Coordinator):
    def init(self, seed: int) -> None:
        self.log = open(__file__)  # noqa: SIM115 - the point: an open file cannot be snapshotted
        self.start_task("a")


class KeepsALambda(Coordinator):
    def init(self, seed: int) -> None:
        self.pick = lambda x: x
        self.start_task("a")


class KeepsData(Coordinator):
    def init(self, seed: int) -> None:
        self.things = {"a": [1, 2], "b": {3, 4}}
        self.holder = Holder(3)
        self.start_task("a")


class KeepsALibraryValue(Coordinator):
    """Keeps a value class of another module, which it lists in SNAPSHOT_CLASSES."""

    SNAPSHOT_CLASSES = (fractions.Fraction, Notice)

    def init(self, seed: int) -> None:
        self.notice = Notice(line=3, text=b"hello", reason="r")
        self.start_task("a")


class KeepsAnUnlistedLibraryValue(Coordinator):
    def init(self, seed: int) -> None:
        self.notice = Notice(line=3, text=b"hello", reason="r")
        self.start_task("a")


def _envelope(cls: type, blob: bytes) -> bytes:
    return codec.encode([4, scheduler_code_digest(cls), cls.__module__, blob])


def _restore(cls: type, blob: bytes) -> None:
    CoordinatorMachine(cls).restore(_envelope(cls, blob))


class _Touch:
    """Pickles as a call of ``fn(*args)`` at load time: the classic pickle exploit."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.fn, self.args


def test_a_snapshot_naming_os_system_is_refused_and_runs_nothing(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "owned"
    # GLOBAL 'os system' + REDUCE, written by hand as an attacker would.
    blob = b"cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR."
    with pytest.raises(BadSnapshot, match=r"names os\.system"):
        _restore(ChainScheduler, blob)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        _Touch(eval, "__import__('pathlib').Path({path!r}).touch()"),
        _Touch(exec, "__import__('pathlib').Path({path!r}).touch()"),
        _Touch(functools.partial(eval, "__import__('pathlib').Path({path!r}).touch()")),
        _Touch(getattr, pathlib.Path, "touch"),
    ],
    ids=["eval", "exec", "partial", "getattr"],
)
def test_a_snapshot_calling_any_callable_is_refused(tmp_path: pathlib.Path, payload: _Touch) -> None:
    marker = tmp_path / "owned"
    payload.args = tuple(a.format(path=str(marker)) if isinstance(a, str) else a for a in payload.args)
    blob = pickle.dumps(payload, protocol=5)
    with pytest.raises(BadSnapshot, match="which a snapshot may not hold"):
        _restore(ChainScheduler, blob)
    assert not marker.exists()


def test_a_scheduler_module_function_is_refused_even_though_the_module_is_allowed() -> None:
    # The scheduler's module may import os; its classes are allowed, its other names are not.
    blob = pickle.dumps(_Touch(_restore, ChainScheduler, b""), protocol=5)
    blob = blob.replace(b"test_snapshot_safety", b"coordinator_harness")
    with pytest.raises(BadSnapshot):
        _restore(ChainScheduler, blob)


@pytest.mark.parametrize("data", [b"", b"\xff\x00garbage", codec.encode([4, "x"]), codec.encode(["a", 1, {}, b""])])
def test_damaged_snapshots_are_bad_snapshot_errors(data: bytes) -> None:
    with pytest.raises(BadSnapshot):
        Applier(CoordinatorMachine(ChainScheduler)).restore(data)
    with pytest.raises(BadSnapshot):
        CoordinatorMachine(ChainScheduler).restore(data)


def test_damaged_pickle_inside_a_good_envelope_is_a_bad_snapshot() -> None:
    h = Harness(ChainScheduler)
    h.init()
    good = codec.decode(h.machine.snapshot())
    with pytest.raises(BadSnapshot, match="damaged"):
        _restore(ChainScheduler, good[3][: len(good[3]) // 2])


def test_plain_data_and_the_scheduler_modules_classes_round_trip() -> None:
    h = Harness(KeepsData)
    h.init()
    assert h.machine.run_state is RunState.RUNNING
    other = CoordinatorMachine(KeepsData)
    other.restore(h.machine.snapshot())
    sched = other.scheduler
    assert sched.things == {"a": [1, 2], "b": {3, 4}}
    assert isinstance(sched.holder, Holder) and sched.holder.n == 3


def test_a_listed_library_class_round_trips_and_an_unlisted_one_is_refused() -> None:
    h = Harness(KeepsALibraryValue)
    h.init()
    other = CoordinatorMachine(KeepsALibraryValue)
    other.restore(h.machine.snapshot())
    assert other.scheduler.notice == Notice(line=3, text=b"hello", reason="r")
    # The same value in a scheduler that does not list its class: refused when saved.
    h = Harness(KeepsAnUnlistedLibraryValue)
    h.init()
    assert h.machine.run_state is RunState.FAILED
    assert "notice" in h.machine.status()["failure"]["message"]
    # And a snapshot naming it is refused when restored by that scheduler.
    blob = pickle.dumps(Notice(line=1, text=b"x", reason="r"))
    with pytest.raises(BadSnapshot, match="Notice"):
        _restore(KeepsAnUnlistedLibraryValue, blob)


@pytest.mark.parametrize(("cls", "attr"), [(KeepsAFile, "log"), (KeepsALambda, "pick")])
def test_an_unsaveable_attribute_fails_the_computation_naming_it(cls: type[Coordinator], attr: str) -> None:
    h = Harness(cls)
    h.init()
    status = h.machine.status()
    assert status["state"] == "failed"
    failure = status["failure"]
    assert failure["kind"] == "snapshot" and failure["slot"] == 1
    assert f"attribute {attr!r} of {cls.__qualname__}" in failure["message"]
    # A failed computation's state can still be saved and restored.
    CoordinatorMachine(cls).restore(h.machine.snapshot())
    sched = h.machine.scheduler
    if hasattr(sched, "log"):
        sched.log.close()


def test_an_attribute_added_later_refuses_the_snapshot_without_stopping_the_replica() -> None:
    h = Harness(KeepsData)
    h.init()
    h.machine.scheduler.later = lambda: None
    with pytest.raises(SnapshotRefused, match="attribute 'later' of KeepsData") as info:
        h.applier.snapshot()
    assert isinstance(info.value, SnapshotUnavailable)


def test_a_damaged_snapshot_row_is_a_storage_error_naming_the_file(tmp_path: pathlib.Path) -> None:
    with Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False) as st:
        db = tmp_path / "replica.db"
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO snapshot (id, idx, data) VALUES (1, 5, ?)", (b"\x01damaged",))
    conn.commit()
    conn.close()
    with Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False) as st:
        state = st.load()
        assert state.snapshot_data == b"\x01damaged"
        with pytest.raises(BadSnapshot):
            Applier(CoordinatorMachine(ChainScheduler)).restore(state.snapshot_data)
        err = st.corrupt("its snapshot at slot 5 is damaged")
    assert isinstance(err, StorageError) and str(db) in str(err)
