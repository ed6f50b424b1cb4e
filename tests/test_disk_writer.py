"""Tests of tasksprint.disk_writer: writes land in submission order, are
reported oldest first, share transactions when they queue up, and a failed
write is reported once and stops the writer."""

from __future__ import annotations

import threading

import pytest
import trio

from tasksprint.disk_writer import DiskWriter
from tasksprint.paxos.durable import SaveChosen
from tasksprint.paxos.messages import Batch, Tick
from tasksprint.storage import Storage, StorageError


class SlowStore:
    """Records each write (records, sync); the first write waits until released."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.writes: list[tuple[list, bool]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def write(self, records, *, sync: bool = True) -> None:
        self.entered.set()
        if not self.writes:
            self.release.wait(5)
        if self.fail_on is not None and len(self.writes) == self.fail_on:
            raise StorageError("disk full (test)")
        self.writes.append((list(records), sync))


def chosen(slot: int) -> SaveChosen:
    return SaveChosen(slot, Batch(items=(Tick(now=float(slot)),)))


async def test_writes_are_reported_in_order_and_grouped_while_one_runs():
    store = SlowStore()
    reported: list[int] = []
    done = trio.Event()

    def written(n: int) -> None:
        reported.append(n)
        if sum(reported) == 5:
            done.set()

    writer = DiskWriter(store, written=written, failed=pytest.fail)
    try:
        writer.submit([chosen(1)], True)
        with trio.fail_after(5):
            while not store.entered.is_set():  # the thread is inside the first write
                await trio.sleep(0.001)
        writer.submit([chosen(2)], False)
        writer.submit([], False)  # a Ready with nothing to write keeps its place
        writer.submit([chosen(3)], True)
        writer.submit([chosen(4)], False)
        store.release.set()
        with trio.fail_after(5):
            await done.wait()
    finally:
        writer.stop()
    assert reported == [1, 4]
    assert store.writes == [([chosen(1)], True), ([chosen(2), chosen(3), chosen(4)], True)]


async def test_a_group_without_synced_records_is_written_without_fsync():
    store = SlowStore()
    store.release.set()
    done = trio.Event()
    writer = DiskWriter(store, written=lambda n: done.set(), failed=pytest.fail)
    try:
        writer.submit([chosen(1)], False)
        with trio.fail_after(5):
            await done.wait()
    finally:
        writer.stop()
    assert store.writes == [([chosen(1)], False)]


async def test_a_failed_write_is_reported_once_and_nothing_after_it_is_written():
    store = SlowStore(fail_on=1)
    store.release.set()
    reported: list[int] = []
    errors: list[BaseException] = []
    failed = trio.Event()

    def on_failed(exc: BaseException) -> None:
        errors.append(exc)
        failed.set()

    first_written = trio.Event()

    def on_written(groups: int) -> None:
        reported.append(groups)
        first_written.set()

    writer = DiskWriter(store, written=on_written, failed=on_failed)
    writer.submit([chosen(1)], True)
    with trio.fail_after(5):
        await first_written.wait()
    writer.submit([chosen(2)], True)
    with trio.fail_after(5):
        await failed.wait()
    writer.submit([chosen(3)], True)  # the thread is gone: this is never written
    writer.stop()  # joins the thread: every report it made is scheduled by now
    # Reports reach this thread through the trio token, in order: once a callback
    # scheduled now has run, every report the writer made has been delivered.
    delivered = trio.Event()
    trio.lowlevel.current_trio_token().run_sync_soon(delivered.set)
    await delivered.wait()
    assert reported == [1]
    assert len(errors) == 1 and isinstance(errors[0], StorageError)
    assert store.writes == [([chosen(1)], True)]


async def test_stop_finishes_what_was_submitted(tmp_path):
    storage = Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False)
    try:
        writer = DiskWriter(storage, written=lambda n: None, failed=pytest.fail)
        for slot in range(1, 51):
            writer.submit([chosen(slot)], False)
        writer.stop()
        state = storage.load()
    finally:
        storage.close()
    assert sorted(state.log) == list(range(1, 51))


# --------------------------------------------------------------------------
# A replica whose disk fails


@pytest.mark.parametrize("size", [10, 40_000], ids=["small-write-in-the-loop", "large-write-in-the-writer-thread"])
async def test_a_replica_whose_disk_fails_stops_with_the_storage_error(tmp_path, monkeypatch, size):
    import sqlite3

    from tasksprint.config import ReplicaConfig
    from tasksprint.log_client import LogClient, Unavailable
    from tasksprint.replica import Replica

    writes = 0
    real_write = Storage.write

    def failing_write(self, records, *, sync=True):
        nonlocal writes
        writes += 1
        if writes > 6 and any(getattr(r, "value", None) is not None for r in records):
            self._fail(sqlite3.OperationalError("database or disk is full"))
        return real_write(self, records, sync=sync)

    monkeypatch.setattr(Storage, "write", failing_write)
    config = ReplicaConfig(rid=0, peers=(("127.0.0.1", 0),), data_dir=tmp_path, secret=b"s" * 24)
    replica = Replica(config)
    with trio.fail_after(20):
        with pytest.raises(BaseException) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(replica.run)
                async with LogClient([("127.0.0.1", replica.port)], config.secret) as client:
                    for i in range(50):
                        try:
                            await client.submit(["put", f"k{i}", "x" * size], deadline=5)
                        except Unavailable:
                            break
                await trio.sleep_forever()  # the replica must stop on its own

    errors = [info.value]
    while errors and isinstance(errors[0], BaseExceptionGroup):
        errors = [e for g in errors for e in (g.exceptions if isinstance(g, BaseExceptionGroup) else [g])]
    assert any(isinstance(e, StorageError) and "disk is full" in str(e) for e in errors), info.value
