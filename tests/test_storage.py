"""Tests of tasksprint.storage: it must mirror DurableState.apply, survive
reopening and SIGKILL, and turn every bad data directory into a StorageError."""

from __future__ import annotations

import os
import pathlib
import pickle
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasksprint.paxos.durable import (
    DurableState,
    LogRow,
    MarkInitialized,
    Record,
    SaveAccepted,
    SaveChosen,
    SavePromise,
    SaveSnapshot,
)
from tasksprint.paxos.messages import ZERO_BALLOT, Ballot, Batch, Command, Tick
from tasksprint.storage import DB_NAME, FORMAT_VERSION, Storage, StorageError

CLUSTER = "test-cluster"


def _open(data_dir: pathlib.Path, replica_id: int = 0, cluster: str = CLUSTER) -> Storage:
    return Storage.open(data_dir, replica_id=replica_id, cluster=cluster, fsync=False)


def _batch(*ops: object) -> Batch:
    return Batch(items=tuple(Command(client_id="c1", seq=i, op=op) for i, op in enumerate(ops)))


def _replay(batches: list[list[Record]]) -> DurableState:
    state = DurableState()
    for batch in batches:
        state.apply(list(batch))
    return state


def _assert_same(loaded: DurableState, expected: DurableState) -> None:
    assert loaded.promised == expected.promised
    assert loaded.log == expected.log
    assert loaded.snapshot_index == expected.snapshot_index
    assert loaded.snapshot_data == expected.snapshot_data
    assert loaded.initialized == expected.initialized


# ----------------------------------------------------------------------
# Fresh directory and round trips


def test_fresh_directory_loads_empty_state(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        state = storage.load()
    assert state == DurableState()
    assert state.initialized is False
    assert state.empty
    assert (tmp_path / DB_NAME).is_file()


def test_every_record_type_survives_close_and_reopen(tmp_path: pathlib.Path) -> None:
    v1 = _batch({"task": "a"}, [1, 2])
    v2 = Batch(items=(Tick(now=12.5, data={"expired": ["c9"]}),))
    v3 = _batch(b"\x00\xff", None)
    records: list[Record] = [
        SavePromise(Ballot(3, 1)),
        SaveAccepted(5, Ballot(3, 1), v1),
        SaveAccepted(6, Ballot(3, 1), v2),
        SaveChosen(6, v2),
        SaveChosen(7, v3),
        SaveAccepted(9, Ballot(2, 0), v3),
        SaveSnapshot(index=4, data=b"state-at-4", truncate_upto=5),
        MarkInitialized(),
    ]
    with Storage.open(tmp_path, replica_id=2, cluster=CLUSTER) as storage:
        storage.write(records)
    with Storage.open(tmp_path, replica_id=2, cluster=CLUSTER) as storage:
        loaded = storage.load()
    assert loaded.promised == Ballot(3, 1)
    assert loaded.log == {
        6: LogRow(Ballot(3, 1), v2, True),
        7: LogRow(None, v3, True),
        9: LogRow(Ballot(2, 0), v3, False),
    }
    assert loaded.snapshot_index == 4
    assert loaded.snapshot_data == b"state-at-4"
    assert loaded.initialized is True
    _assert_same(loaded, _replay([records]))


def test_the_write_ahead_log_is_extended_with_zeros_once_and_keeps_its_frames(tmp_path: pathlib.Path) -> None:
    wal = tmp_path / (DB_NAME + "-wal")
    first = [SavePromise(Ballot(1, 0)), SaveAccepted(1, Ballot(1, 0), _batch("a"))]
    # A store written without syncing (no extension), copied while open: the
    # copy's log ends right after its last frame, as after a crash.
    src = tmp_path / "src"
    src.mkdir()
    storage = _open(src)
    storage.write(first)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (DB_NAME, DB_NAME + "-wal"):
        (copy / name).write_bytes((src / name).read_bytes())
    storage.close()
    frames_end = (copy / (DB_NAME + "-wal")).stat().st_size
    with Storage.open(copy, replica_id=0, cluster=CLUSTER) as storage:
        size = (copy / (DB_NAME + "-wal")).stat().st_size
        with sqlite3.connect(":memory:") as probe:
            page = probe.execute("PRAGMA page_size").fetchone()[0]
        assert size >= 32 + 1000 * (24 + page) > frames_end
        assert (copy / (DB_NAME + "-wal")).read_bytes()[frames_end:] == bytes(size - frames_end)
        assert storage.load().log[1].value == _batch("a")  # recovered from the frames before the zeros
        storage.write([SaveAccepted(2, Ballot(1, 0), _batch("b"))])
    with Storage.open(copy, replica_id=0, cluster=CLUSTER) as storage:
        loaded = storage.load()
    assert loaded.promised == Ballot(1, 0)
    assert sorted(loaded.log) == [1, 2]
    # A fresh store gets the extension too.
    with Storage.open(tmp_path, replica_id=0, cluster=CLUSTER):
        assert wal.stat().st_size == size


def test_a_full_disk_while_extending_the_log_is_a_storage_error_naming_the_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args: object) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("tasksprint.storage.os.pwrite", no_space)
        with pytest.raises(StorageError, match=r"cannot extend the write-ahead log of .*replica\.db.*No space left"):
            Storage.open(tmp_path, replica_id=0, cluster=CLUSTER)
    # Nothing was left open or half-made: the store opens once the disk has room.
    with Storage.open(tmp_path, replica_id=0, cluster=CLUSTER) as storage:
        storage.write([SavePromise(Ballot(1, 0))])
        assert storage.load().promised == Ballot(1, 0)


def test_empty_snapshot_data_is_kept_as_empty_bytes(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        storage.write([SaveSnapshot(index=0, data=b"", truncate_upto=0)])
    with _open(tmp_path) as storage:
        loaded = storage.load()
    assert loaded.snapshot_data == b""
    assert loaded.snapshot_index == 0


def test_empty_write_changes_nothing(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        storage.write([])
        assert storage.load() == DurableState()


def test_unsynced_write_is_kept_and_later_writes_sync_again(tmp_path: pathlib.Path) -> None:
    value = _batch("x")
    storage = Storage.open(tmp_path, replica_id=0, cluster=CLUSTER, fsync=True)
    with storage:
        storage.write([SaveAccepted(1, Ballot(1, 0), value)])
        storage.write([SaveChosen(1, value)], sync=False)
        conn = storage._conn
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again after the write
        storage.write([SavePromise(Ballot(2, 0))])
    # Written without an fsync is still written: a process that dies loses nothing.
    with _open(tmp_path) as storage:
        loaded = storage.load()
    assert loaded.log[1] == LogRow(Ballot(1, 0), value, True)
    assert loaded.promised == Ballot(2, 0)


# One scripted case per rule of DurableState.apply; each is checked against it.
_V_OLD, _V_NEW, _V_CHOSEN = _batch("old"), _batch("new"), _batch("chosen")

SEMANTIC_CASES = {
    "accepted replaces an older acceptance": [
        [SaveAccepted(1, Ballot(1, 0), _V_OLD)],
        [SaveAccepted(1, Ballot(2, 1), _V_NEW)],
    ],
    "accepted does not overwrite a chosen row": [
        [SaveChosen(1, _V_CHOSEN), SaveAccepted(1, Ballot(5, 0), _V_NEW)],
    ],
    "chosen keeps the accepted ballot": [
        [SaveAccepted(1, Ballot(2, 0), _V_OLD)],
        [SaveChosen(1, _V_CHOSEN)],
    ],
    "chosen twice with one value is allowed": [
        [SaveChosen(2, _V_CHOSEN), SaveChosen(2, _V_CHOSEN)],
        [SaveChosen(2, _V_CHOSEN)],
    ],
    "older snapshot is ignored but still truncates": [
        [SaveAccepted(s, Ballot(1, 0), _V_OLD) for s in range(1, 6)],
        [SaveSnapshot(index=4, data=b"four", truncate_upto=1)],
        [SaveSnapshot(index=2, data=b"two", truncate_upto=3)],
    ],
    "snapshot with the same index replaces the data": [
        [SaveSnapshot(index=4, data=b"a", truncate_upto=0)],
        [SaveSnapshot(index=4, data=b"b", truncate_upto=0)],
    ],
    "order inside one batch matters": [
        [
            SaveAccepted(3, Ballot(1, 0), _V_OLD),
            SaveSnapshot(index=3, data=b"s", truncate_upto=3),
            SaveAccepted(3, Ballot(1, 0), _V_NEW),
            SavePromise(Ballot(1, 0)),
            SavePromise(Ballot(1, 0)),
            SavePromise(Ballot(4, 2)),
        ],
    ],
}


@pytest.mark.parametrize("name", sorted(SEMANTIC_CASES))
def test_semantics_match_durable_state(tmp_path: pathlib.Path, name: str) -> None:
    batches = SEMANTIC_CASES[name]
    with _open(tmp_path) as storage:
        for batch in batches:
            storage.write(batch)
        _assert_same(storage.load(), _replay(batches))
    with _open(tmp_path) as storage:
        _assert_same(storage.load(), _replay(batches))


def test_decreasing_promise_is_refused_and_rolls_back_the_batch(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        storage.write([SavePromise(Ballot(5, 0))])
        with pytest.raises(AssertionError, match="never decrease"):
            storage.write([SaveAccepted(1, Ballot(5, 0), _V_NEW), SavePromise(Ballot(4, 2))])
        loaded = storage.load()
        assert loaded.promised == Ballot(5, 0)
        assert loaded.log == {}
        # The store stays usable after a refused batch.
        storage.write([SavePromise(Ballot(6, 0))])
        assert storage.load().promised == Ballot(6, 0)


def test_slot_chosen_with_two_values_is_refused_and_rolls_back(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        storage.write([SaveChosen(1, _V_OLD)])
        with pytest.raises(AssertionError, match="slot 2 chosen twice"):
            storage.write(
                [
                    MarkInitialized(),
                    SaveChosen(1, _V_OLD),
                    SaveChosen(2, _V_OLD),
                    SaveChosen(2, _V_NEW),
                ]
            )
        loaded = storage.load()
    assert loaded.log == {1: LogRow(None, _V_OLD, True)}
    assert loaded.initialized is False


def test_non_record_is_refused(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        with pytest.raises(TypeError, match="not a durable record"):
            storage.write([MarkInitialized(), "junk"])  # type: ignore[list-item]
        assert storage.load().initialized is False


def test_closed_storage_refuses_use(tmp_path: pathlib.Path) -> None:
    storage = _open(tmp_path)
    storage.close()
    storage.close()  # closing twice is harmless
    with pytest.raises(StorageError, match="closed"):
        storage.write([MarkInitialized()])
    with pytest.raises(StorageError, match="closed"):
        storage.load()


# ----------------------------------------------------------------------
# Randomized equivalence with DurableState.apply

_SLOTS = st.integers(min_value=1, max_value=6)
_SMALL = st.integers(min_value=0, max_value=3)
_BALLOTS = st.builds(Ballot, _SMALL, st.integers(min_value=0, max_value=2))
_OPS = (
    st.none()
    | st.integers(min_value=-3, max_value=3)
    | st.text(max_size=3)
    | st.binary(max_size=3)
    | st.lists(_SMALL, max_size=2)
    | st.dictionaries(st.sampled_from(["k", "j"]), _SMALL, max_size=2)
)
_ITEMS = st.builds(Command, client_id=st.sampled_from(["a", "b"]), seq=_SMALL, op=_OPS) | st.builds(
    Tick, now=st.sampled_from([0, 1.5, 2.0, 7]), data=_OPS
)
_VALUES = st.builds(Batch, items=st.lists(_ITEMS, max_size=3))


@st.composite
def _record_batches(draw: st.DrawFn) -> list[tuple[list[Record], bool]]:
    """Batches of records that respect the core's invariants, each with a 'reopen after it' flag."""
    # A slot is only ever chosen with one value, as in a correct cluster.
    chosen_values = draw(st.lists(_VALUES, min_size=6, max_size=6))
    record = st.one_of(
        st.builds(SavePromise, _BALLOTS),
        st.builds(SaveAccepted, _SLOTS, _BALLOTS, _VALUES),
        _SLOTS.map(lambda s: SaveChosen(s, chosen_values[s - 1])),
        st.builds(
            SaveSnapshot,
            index=st.integers(min_value=0, max_value=8),
            data=st.binary(max_size=4),
            truncate_upto=st.integers(min_value=0, max_value=7),
        ),
        st.just(MarkInitialized()),
    )
    raw = draw(st.lists(st.tuples(st.lists(record, max_size=10), st.booleans()), max_size=6))
    top = ZERO_BALLOT
    out = []
    for batch, reopen in raw:
        fixed: list[Record] = []
        for rec in batch:
            if isinstance(rec, SavePromise):
                # The promised ballot only grows.
                top = max(top, rec.ballot)
                rec = SavePromise(top)
            fixed.append(rec)
        out.append((fixed, reopen))
    return out


@settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=_record_batches())
def test_storage_matches_durable_state_apply(tmp_path: pathlib.Path, batches: list[tuple[list[Record], bool]]) -> None:
    expected = DurableState()
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        data_dir = pathlib.Path(d)
        storage = _open(data_dir)
        try:
            for batch, reopen in batches:
                storage.write(batch)
                expected.apply(batch)
                if reopen:
                    storage.close()
                    storage = _open(data_dir)
                    _assert_same(storage.load(), expected)
        finally:
            storage.close()
        with _open(data_dir) as storage:
            _assert_same(storage.load(), expected)


# ----------------------------------------------------------------------
# Errors


def test_missing_directory(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(StorageError) as info:
        _open(missing)
    assert str(info.value) == (
        f"data directory {missing} does not exist; create it with mkdir -p {missing} for a new replica"
    )
    assert not missing.exists()


def test_file_instead_of_directory(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("hello")
    with pytest.raises(StorageError, match="is not a directory") as info:
        _open(file)
    assert str(file) in str(info.value)
    assert file.read_text() == "hello"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_unwritable_directory(tmp_path: pathlib.Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="is not writable") as info:
            _open(locked)
        assert str(locked) in str(info.value)
    finally:
        locked.chmod(0o700)


def _populated(data_dir: pathlib.Path) -> None:
    """Fill a store with enough rows to span many database pages."""
    with _open(data_dir) as storage:
        storage.write(
            [SavePromise(Ballot(2, 0))] + [SaveAccepted(s, Ballot(2, 0), _batch("x" * 200, s)) for s in range(1, 300)]
        )


def test_garbage_file(tmp_path: pathlib.Path) -> None:
    _populated(tmp_path)
    db = tmp_path / DB_NAME
    db.write_bytes(random.Random(7).randbytes(db.stat().st_size))
    with pytest.raises(StorageError, match="not a TaskSprint database or is corrupt") as info:
        _open(tmp_path)
    assert str(db) in str(info.value)


def test_truncated_file(tmp_path: pathlib.Path) -> None:
    _populated(tmp_path)
    db = tmp_path / DB_NAME
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    with pytest.raises(StorageError, match="not a TaskSprint database or is corrupt") as info:
        _open(tmp_path)
    assert str(db) in str(info.value)


def test_other_sqlite_database(tmp_path: pathlib.Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="not a TaskSprint database or is corrupt"):
        _open(tmp_path)


def _poke(data_dir: pathlib.Path, sql: str, *params: object) -> None:
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_unknown_format_version(tmp_path: pathlib.Path) -> None:
    _open(tmp_path).close()
    _poke(tmp_path, "UPDATE meta SET value = ? WHERE key = 'format_version'", FORMAT_VERSION + 1)
    with pytest.raises(StorageError, match=f"format version {FORMAT_VERSION + 1}") as info:
        _open(tmp_path)
    assert str(tmp_path / DB_NAME) in str(info.value)


def test_undecodable_value_is_reported_on_load(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        storage.write([SaveChosen(4, _V_CHOSEN)])
    _poke(tmp_path, "UPDATE log SET value = ? WHERE slot = 4", b"\xff\xfe")
    with _open(tmp_path) as storage:
        with pytest.raises(StorageError, match="slot 4") as info:
            storage.load()
    assert str(tmp_path / DB_NAME) in str(info.value)


def test_other_replica_id(tmp_path: pathlib.Path) -> None:
    _open(tmp_path, replica_id=2, cluster="abc").close()
    with pytest.raises(StorageError) as info:
        _open(tmp_path, replica_id=0, cluster="abc")
    assert str(info.value).startswith(
        f"data directory {tmp_path} belongs to replica 2 of cluster 'abc', not replica 0 of cluster 'abc'"
    )
    # A refused open leaves the store intact and unlocked for its owner.
    with _open(tmp_path, replica_id=2, cluster="abc") as storage:
        assert storage.load() == DurableState()


def test_other_cluster(tmp_path: pathlib.Path) -> None:
    _open(tmp_path, replica_id=1, cluster="abc").close()
    expected = "belongs to replica 1 of cluster 'abc', not replica 1 of cluster 'xyz'"
    with pytest.raises(StorageError, match=expected):
        _open(tmp_path, replica_id=1, cluster="xyz")


def test_second_open_of_one_directory_is_refused(tmp_path: pathlib.Path) -> None:
    with _open(tmp_path) as storage:
        with pytest.raises(StorageError, match="already open") as info:
            _open(tmp_path)
        assert str(tmp_path) in str(info.value)
        # The refused opener did not disturb the owner.
        storage.write([MarkInitialized()])
        assert storage.load().initialized
    with _open(tmp_path) as storage:
        assert storage.load().initialized


# ----------------------------------------------------------------------
# Crash atomicity

_CHILD = r"""
import pathlib, pickle, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from tasksprint.storage import Storage

data_dir, batches_file = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
batches = pickle.loads(batches_file.read_bytes())
with Storage.open(data_dir, replica_id=0, cluster="crash", fsync=True) as storage:
    for i, batch in enumerate(batches, 1):
        storage.write(batch)
        print("ack", i, flush=True)
    print("all", flush=True)
    sys.stdin.read()  # hold the store open until the test kills this process
"""


def _crash_batches(count: int, seed: int) -> list[list[Record]]:
    """Batches whose i-th (1-based) one promises round i, so the promise names the prefix."""
    rng = random.Random(seed)
    batches: list[list[Record]] = []
    for i in range(1, count + 1):
        base = 1 + 3 * i  # the window of live slots moves on, so snapshots truncate real rows
        batch: list[Record] = []
        for _ in range(rng.randint(20, 120)):
            slot = base + rng.randint(0, 40)
            if rng.random() < 0.3:
                # The value chosen for a slot depends only on the slot.
                batch.append(SaveChosen(slot, _batch("chosen", slot)))
            else:
                ballot = Ballot(i, rng.randint(0, 2))
                batch.append(SaveAccepted(slot, ballot, _batch(i, rng.random())))
        if rng.random() < 0.2:
            batch.append(SaveSnapshot(index=base, data=b"snap-%d" % i, truncate_upto=base))
        if i == count // 3:
            batch.append(MarkInitialized())
        # Records on both sides of the promise: a torn batch cannot look like a whole one.
        batch.insert(rng.randint(0, len(batch)), SavePromise(Ballot(i, 0)))
        batches.append(batch)
    return batches


def _read_acks(proc: subprocess.Popen[bytes], want: int, limit_s: float) -> int:
    """Read the child's stdout until it has acknowledged ``want`` batches; return the last ack."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    last = 0
    give_up = time.monotonic() + limit_s  # only a guard against a hung child
    try:
        while last < want:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child acknowledged only {last} batches")
            if not sel.select(timeout=remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"child exited early after {last} acks (rc={proc.poll()})")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"ack "):
                    last = int(line.split()[1])
                elif line == b"all":
                    return last
    finally:
        sel.close()
    return last


@pytest.mark.parametrize("kill_after", [1, 25, 120])
def test_sigkill_leaves_an_exact_prefix_of_batches(tmp_path: pathlib.Path, kill_after: int) -> None:
    batches = _crash_batches(400, seed=kill_after)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    batches_file = tmp_path / "batches.pickle"
    batches_file.write_bytes(pickle.dumps(batches))
    with open(tmp_path / "child.stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(data_dir), str(batches_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=tmp_path,
        )
        try:
            try:
                _read_acks(proc, kill_after, limit_s=120)
            except AssertionError:
                proc.kill()
                proc.wait()
                raise AssertionError((tmp_path / "child.stderr").read_text()) from None
            proc.send_signal(signal.SIGKILL)
            assert proc.stdout is not None
            # Every ack written before the kill is still in the pipe.
            rest = proc.stdout.read()
        finally:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
    assert proc.returncode == -signal.SIGKILL
    late_acks = [int(line.split()[1]) for line in rest.splitlines() if line.startswith(b"ack ")]
    acked = max([kill_after, *late_acks])

    with Storage.open(data_dir, replica_id=0, cluster="crash", fsync=False) as storage:
        loaded = storage.load()
    done = loaded.promised.round
    assert acked <= done <= len(batches), f"acknowledged {acked} batches, disk holds {done}"
    _assert_same(loaded, _replay(batches[:done]))


def test_the_peer_list_is_recorded_and_a_different_one_refused(tmp_path: pathlib.Path) -> None:
    peers = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False, peers=peers).close()
    Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False, peers=peers).close()
    Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False).close()  # not checked when not given
    with pytest.raises(StorageError, match=r"replica 2 was 127\.0\.0\.1:7003, now 127\.0\.0\.1:7009") as info:
        Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False, peers=peers.replace("7003", "7009"))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(StorageError, match="3 replicas, now 5"):
        Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False, peers=peers + ",127.0.0.1:7004,127.0.0.1:7005")


def test_a_directory_made_before_peers_were_recorded_records_them_on_its_next_open(tmp_path: pathlib.Path) -> None:
    peers = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False).close()
    Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False, peers=peers).close()
    with pytest.raises(StorageError, match="1 replicas, now 3|3 replicas, now 1"):
        Storage.open(tmp_path, replica_id=0, cluster="c", fsync=False, peers="127.0.0.1:7001")
