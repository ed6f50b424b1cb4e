"""The durable store of one replica: a SQLite file that mirrors :class:`DurableState`.

Theory of operation
-------------------
The Paxos core emits :mod:`tasksprint.paxos.durable` records; the driver hands
each ready batch to :meth:`Storage.write`, which applies the whole batch in one
SQLite transaction, so one batch costs one fsync and a crash leaves either all
of it or none of it.  Only then may the driver let the core send the replies
that depend on it.  After a restart, :meth:`Storage.load` reads everything back
as a :class:`DurableState`, equal to what ``DurableState.apply`` would have
built in memory from the same records.

The file ``replica.db`` in the data directory holds three tables:

``meta``
    key/value rows: storage format version, the replica id, cluster name and
    peer list (hence cluster size) the directory belongs to, the promised
    ballot, and the initialized flag.  A replica started with another id,
    cluster or peer list is refused, with a message saying what differs:
    restarting three replicas as five would silently change the quorums.
``log``
    one row per slot: the accepted ballot (NULL when the slot was only learned
    as chosen), the value as canonical CBOR, and whether it is chosen.
``snapshot``
    at most one row (``id = 1``): the applied state after slot ``idx``.

The database runs in WAL mode with ``synchronous=FULL``: a commit returns only
after the WAL is on disk.  It is also opened with ``locking_mode=EXCLUSIVE``
and keeps its write lock until closed, because two processes voting with one
acceptor's state would break Paxos; the second one gets a :class:`StorageError`
instead.

Every problem with the data directory or the file is reported as a
:class:`StorageError` whose message names the path and says what to do; the
replica process prints it and exits non-zero.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import sqlite3
from collections.abc import Sequence
from types import TracebackType
from typing import Any, NoReturn

import attrs
import structlog

from tasksprint import codec
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
from tasksprint.paxos.messages import ZERO_BALLOT, Ballot, Batch

__all__ = ["DB_NAME", "FORMAT_VERSION", "Storage", "StorageError"]

#: The one file a replica keeps in its data directory.
DB_NAME = "replica.db"

#: Version of the table layout below; a file with any other version is refused.
FORMAT_VERSION = 1

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE log ("
    " slot INTEGER PRIMARY KEY,"
    " ballot_round INTEGER,"
    " ballot_rid INTEGER,"
    " value BLOB NOT NULL,"
    " chosen INTEGER NOT NULL)",
    "CREATE TABLE snapshot ( id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL, data BLOB NOT NULL)",
)

_META_KEYS = frozenset({"format_version", "replica_id", "cluster", "promised_round", "promised_rid", "initialized"})

# An acceptance never replaces a chosen value (the WHERE clause of the upsert).
_SQL_ACCEPTED = (
    "INSERT INTO log (slot, ballot_round, ballot_rid, value, chosen) VALUES (?, ?, ?, ?, 0)"
    " ON CONFLICT (slot) DO UPDATE SET"
    " ballot_round = excluded.ballot_round, ballot_rid = excluded.ballot_rid,"
    " value = excluded.value"
    " WHERE log.chosen = 0"
)

# Learning a slot is chosen keeps the ballot it was accepted at.  Choosing an
# already chosen slot again matches no row unless the value is the same, which
# lets write() detect a slot chosen twice by counting changed rows.  The values
# are compared as canonical CBOR, a little stricter than Batch equality.
_SQL_CHOSEN = (
    "INSERT INTO log (slot, ballot_round, ballot_rid, value, chosen) VALUES (?, NULL, NULL, ?, 1)"
    " ON CONFLICT (slot) DO UPDATE SET value = excluded.value, chosen = 1"
    " WHERE log.chosen = 0 OR log.value = excluded.value"
)

# An older snapshot never replaces a newer one; truncation happens either way.
_SQL_SNAPSHOT = (
    "INSERT INTO snapshot (id, idx, data) VALUES (1, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET idx = excluded.idx, data = excluded.data"
    " WHERE excluded.idx >= snapshot.idx"
)
_SQL_TRUNCATE = "DELETE FROM log WHERE slot <= ?"
_SQL_SET_META = "UPDATE meta SET value = ? WHERE key = ?"


class StorageError(Exception):
    """The data directory or its database cannot be used; the message says why and what to do."""


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc)


def _fsync_dir(path: pathlib.Path) -> None:
    # A newly created file is durable only once its directory entry is.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# SQLite's write-ahead log: a 32-byte header, then frames of a 24-byte header
# and one page each.
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24


def _prefill_wal(conn: sqlite3.Connection, db_path: pathlib.Path) -> None:
    """Extend the write-ahead log with zeros to the size it reaches between checkpoints.

    SQLite writes its log from the start again after each checkpoint, so a
    store that has run a while commits into blocks the file already has.  A
    new store, or one just opened (SQLite deletes the log on a clean close),
    would instead grow the file at every commit, and then each fsync also
    commits the file system's allocation of new blocks: two to three times
    the cost of a commit into existing blocks on ext4 (``bench/README.md``).
    Zeros are written rather than space reserved, since reserved but
    unwritten blocks cost the same conversion on first write.  Zeros after
    the last frame are never read as frames (a frame must carry the header's
    salt and a running checksum), which is also why SQLite may leave old
    frames there.  Only bytes past the current end are written.
    """
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    frames = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    size = _WAL_HEADER + (max(frames, 0) + 100) * (_WAL_FRAME_HEADER + page)
    wal = db_path.with_name(db_path.name + "-wal")
    fd = os.open(wal, os.O_RDWR | os.O_CREAT, os.stat(db_path).st_mode & 0o777)
    try:
        have = os.fstat(fd).st_size
        if have < size:
            os.pwrite(fd, bytes(size - have), have)
            os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define(eq=False)
class Storage:
    """One replica's durable acceptor state in ``<data_dir>/replica.db``.

    Create it with :meth:`open`; use it as a context manager or call
    :meth:`close`.  Two threads write to it, never at once: the disk writer's
    thread, and the replica's own thread, which writes only while nothing is
    in flight in the disk writer (see :mod:`tasksprint.driver`).  Nothing
    here locks: that order is the driver's to keep.
    """

    _db_path: pathlib.Path
    _conn: sqlite3.Connection | None
    _log: Any
    # The promised ballot as committed on disk, so write() can refuse a
    # decreasing promise without reading it back inside every transaction.
    _promised: Ballot
    _fsync: bool = True

    @classmethod
    def open(
        cls,
        data_dir: pathlib.Path,
        *,
        replica_id: int,
        cluster: str,
        fsync: bool = True,
        log: Any = None,
        peers: str | None = None,
    ) -> Storage:
        """Open (or create, in an empty directory) the store of one replica.

        Takes the data directory, which must exist; the replica id and cluster
        name it belongs to (recorded on creation, checked on every later open);
        ``peers``, the replicas' addresses in id order as ``host:port,...``
        (recorded on creation or on the first open that gives it, checked on
        every later one that gives it);
        ``fsync=False`` turns off syncing and is only for tests; ``log`` is a
        structlog logger (the module's logger if omitted).

        Returns an open :class:`Storage`.  Raises :class:`StorageError` if the
        directory is missing, not a directory or not writable, if the database
        is not a TaskSprint database, is corrupt, has an unknown format
        version, is in use by another process, or belongs to another replica
        or cluster.
        """
        data_dir = pathlib.Path(data_dir)
        db_path = data_dir / DB_NAME
        _check_dir(data_dir, db_path)
        log = (log if log is not None else structlog.get_logger("tasksprint.storage")).bind(
            replica=replica_id, cluster=cluster, db=str(db_path)
        )
        created = not db_path.exists()
        try:
            # Written from the disk writer's thread and from the replica's own,
            # one write at a time (see the class docstring).
            conn = sqlite3.connect(db_path, isolation_level=None, timeout=0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _corrupt(db_path, exc) from None
        try:
            promised = _prepare(conn, db_path, replica_id=replica_id, cluster=cluster, fsync=fsync, peers=peers)
        except StorageError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            if _is_busy(exc):
                raise StorageError(
                    f"{db_path} is already open in another replica process; stop the replica "
                    f"using data directory {data_dir}, or give this one its own directory"
                ) from None
            raise _corrupt(db_path, exc) from None
        if fsync:
            try:
                _prefill_wal(conn, db_path)
            except OSError as exc:
                conn.close()
                raise StorageError(f"cannot extend the write-ahead log of {db_path}: {exc}") from None
            _fsync_dir(data_dir)
        log.info("storage_opened", created=created, fsync=fsync, promised=str(promised))
        return cls(db_path, conn, log, promised, fsync)

    # ------------------------------------------------------------------
    # Reading

    def load(self) -> DurableState:
        """Read the whole stored state.

        Returns a :class:`DurableState` (``DurableState()`` for a new store).
        Raises :class:`StorageError` if the store is closed or a stored row
        cannot be decoded.
        """
        conn = self._require_open()
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            rows = conn.execute(
                "SELECT slot, ballot_round, ballot_rid, value, chosen FROM log ORDER BY slot"
            ).fetchall()
            snap = conn.execute("SELECT idx, data FROM snapshot WHERE id = 1").fetchone()
        except sqlite3.Error as exc:
            raise _corrupt(self._db_path, exc) from None
        state = DurableState()
        state.promised = _meta_ballot(meta, self._db_path)
        state.initialized = bool(meta["initialized"])
        for slot, b_round, b_rid, blob, chosen in rows:
            try:
                ballot = None if b_round is b_rid is None else Ballot(b_round, b_rid)
            except (TypeError, ValueError) as exc:
                raise _corrupt(self._db_path, f"slot {slot} has a bad ballot: {exc}") from None
            state.log[slot] = LogRow(ballot, self._decode_value(slot, blob), bool(chosen))
        if snap is not None:
            state.snapshot_index, state.snapshot_data = snap[0], bytes(snap[1])
        return state

    def corrupt(self, why: str) -> StorageError:
        """The error for stored state found damaged after :meth:`load` (a snapshot that does not restore)."""
        return _corrupt(self._db_path, why)

    def _decode_value(self, slot: int, blob: bytes) -> Batch:
        try:
            value = codec.decode(blob)
        except Exception as exc:  # cbor2 raises several types on damaged bytes
            raise _corrupt(self._db_path, f"slot {slot} holds undecodable data: {exc}") from None
        if not isinstance(value, Batch):
            what = type(value).__name__
            raise _corrupt(self._db_path, f"slot {slot} holds a {what}, not a Batch")
        return value

    # ------------------------------------------------------------------
    # Writing

    def write(self, records: Sequence[Record], *, sync: bool = True) -> None:
        """Make ``records`` durable, all or nothing, in order, with one fsync.

        With ``sync=False`` (for a Ready the core marked so: chosen markers
        only) the transaction is committed without an fsync: the records
        reach the OS at once and the disk with the next synced write, and a
        power cut may lose them (only them, never a later synced write).

        The effect equals ``DurableState.apply(records)``.  Takes a sequence of
        durable records (empty: nothing happens).  Returns once they are on
        disk.  Raises ``AssertionError`` if a record breaks an invariant (the
        promised ballot would decrease, a slot would be chosen with a second
        value) and ``TypeError`` for a non-record; in both cases nothing of the
        batch is written.  Raises :class:`StorageError` if the disk write
        fails; the store is then closed, because what reached the disk is no
        longer known.
        """
        if not records:
            return
        conn = self._require_open()
        lazy = not sync and self._fsync
        try:
            if lazy:
                conn.execute("PRAGMA synchronous = OFF")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail(exc)
        try:
            promised = self._apply(conn, records)
            conn.execute("COMMIT")
        except (sqlite3.InterfaceError, sqlite3.ProgrammingError):
            # A record with a field SQLite cannot bind: a bug in the caller, not the disk.
            conn.execute("ROLLBACK")
            raise
        except sqlite3.Error as exc:
            self._fail(exc)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            if lazy and self._conn is not None:
                conn.execute("PRAGMA synchronous = FULL")
        self._promised = promised

    def _apply(self, conn: sqlite3.Connection, records: Sequence[Record]) -> Ballot:
        """Run the statements for ``records`` in the open transaction; return the new promise."""
        promised = self._promised
        # Consecutive records of one type become one executemany.
        for kind, group in itertools.groupby(records, key=type):
            run = list(group)
            if kind is SaveAccepted:
                conn.executemany(
                    _SQL_ACCEPTED,
                    [(r.slot, r.ballot.round, r.ballot.rid, codec.encode(r.value)) for r in run],
                )
            elif kind is SaveChosen:
                params = [(r.slot, codec.encode(r.value)) for r in run]
                before = conn.total_changes
                conn.executemany(_SQL_CHOSEN, params)
                if conn.total_changes - before != len(params):
                    raise AssertionError(f"slot {self._chosen_conflict(conn, params)} chosen twice")
            elif kind is SavePromise:
                for r in run:
                    if r.ballot < promised:
                        raise AssertionError(f"promised ballot must never decrease ({promised} -> {r.ballot})")
                    promised = r.ballot
                conn.executemany(
                    _SQL_SET_META,
                    [(promised.round, "promised_round"), (promised.rid, "promised_rid")],
                )
            elif kind is SaveSnapshot:
                for r in run:
                    conn.execute(_SQL_SNAPSHOT, (r.index, r.data))
                    conn.execute(_SQL_TRUNCATE, (r.truncate_upto,))
            elif kind is MarkInitialized:
                conn.execute(_SQL_SET_META, (1, "initialized"))
            else:
                raise TypeError(f"not a durable record: {run[0]!r}")
        return promised

    @staticmethod
    def _chosen_conflict(conn: sqlite3.Connection, params: list[tuple[int, bytes]]) -> int:
        # Only reached on a broken invariant: find which slot it was, for the message.
        seen: dict[int, bytes] = {}
        for slot, blob in params:
            if slot not in seen:
                row = conn.execute("SELECT value FROM log WHERE slot = ? AND chosen = 1", (slot,)).fetchone()
                if row is not None:
                    seen[slot] = bytes(row[0])
            if slot in seen and seen[slot] != blob:
                return slot
            seen.setdefault(slot, blob)
        return params[0][0]

    def _fail(self, exc: sqlite3.Error) -> NoReturn:
        self._log.error("storage_write_failed", error=str(exc))
        self.close()
        raise StorageError(
            f"writing to {self._db_path} failed: {exc}; check free space and the disk, then restart the replica"
        ) from exc

    # ------------------------------------------------------------------
    # Lifetime

    def close(self) -> None:
        """Close the database (idempotent); later calls other than close raise StorageError."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            finally:
                self._log.info("storage_closed")

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def path(self) -> pathlib.Path:
        """The database file."""
        return self._db_path

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"storage {self._db_path} is closed; open it again to use it")
        return self._conn


# ----------------------------------------------------------------------
# Opening


def _check_dir(data_dir: pathlib.Path, db_path: pathlib.Path) -> None:
    """Raise StorageError unless ``data_dir`` is an existing, writable directory."""
    if not data_dir.exists():
        raise StorageError(
            f"data directory {data_dir} does not exist; create it with mkdir -p {data_dir} for a new replica"
        )
    if not data_dir.is_dir():
        raise StorageError(
            f"data directory {data_dir} is not a directory; pass the path of a directory "
            "(an empty one for a new replica)"
        )
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise StorageError(
            f"data directory {data_dir} is not writable; give the user running the replica write permission on it"
        )
    if db_path.exists() and not os.access(db_path, os.R_OK | os.W_OK):
        raise StorageError(
            f"{db_path} is not readable and writable; give the user running the replica read and write permission on it"
        )


def _corrupt(db_path: pathlib.Path, why: object) -> StorageError:
    return StorageError(
        f"{db_path} is not a TaskSprint database or is corrupt ({why}); restore it from a "
        "backup, or move the data directory aside and start this replica with an empty one "
        "so it rebuilds its state from the other replicas"
    )


def _prepare(
    conn: sqlite3.Connection,
    db_path: pathlib.Path,
    *,
    replica_id: int,
    cluster: str,
    fsync: bool,
    peers: str | None = None,
) -> Ballot:
    """Set up the connection, create or check the schema; return the stored promise.

    Raises StorageError for a file that is not ours, and lets sqlite3.Error
    through for the caller to classify.
    """
    # Exclusive locking before WAL: the WAL index then lives in process memory
    # (no -shm file) and the lock taken below keeps other processes out.
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageError(
            f"{db_path} cannot use write-ahead logging (journal mode is {mode}); "
            "put the data directory on a local file system"
        )
    conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'OFF'}")
    check = conn.execute("PRAGMA quick_check").fetchall()
    if check != [("ok",)]:
        raise _corrupt(db_path, "; ".join(str(r[0]) for r in check[:3]))

    # BEGIN IMMEDIATE takes the write lock, which exclusive locking mode keeps
    # until close, so a second process fails here rather than at its first write.
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("format_version", FORMAT_VERSION),
                    ("replica_id", replica_id),
                    ("cluster", cluster),
                    ("promised_round", ZERO_BALLOT.round),
                    ("promised_rid", ZERO_BALLOT.rid),
                    ("initialized", 0),
                ],
            )
        elif "meta" not in tables:
            raise _corrupt(db_path, "it has no meta table")
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        if peers is not None and "peers" not in meta:
            # Recorded on creation, or on the first open that knows them; a
            # directory that is refused anyway is left as it was.
            _check_meta(meta, db_path, replica_id=replica_id, cluster=cluster)
            conn.execute("INSERT INTO meta (key, value) VALUES ('peers', ?)", (peers,))
            meta["peers"] = peers
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    _check_meta(meta, db_path, replica_id=replica_id, cluster=cluster, peers=peers)
    return _meta_ballot(meta, db_path)


def _check_meta(
    meta: dict[str, Any], db_path: pathlib.Path, *, replica_id: int, cluster: str, peers: str | None = None
) -> None:
    version = meta.get("format_version")
    if version is None:
        raise _corrupt(db_path, "it has no format version")
    if version != FORMAT_VERSION:
        raise StorageError(
            f"{db_path} has storage format version {version!r}, but this TaskSprint reads "
            f"only version {FORMAT_VERSION}; run the TaskSprint release that wrote it"
        )
    missing = sorted(_META_KEYS - meta.keys())
    if missing:
        raise _corrupt(db_path, f"meta lacks {', '.join(missing)}")
    if meta["replica_id"] != replica_id or meta["cluster"] != cluster:
        raise StorageError(
            f"data directory {db_path.parent} belongs to replica {meta['replica_id']} of "
            f"cluster {meta['cluster']!r}, not replica {replica_id} of cluster {cluster!r}; "
            "point this replica at its own data directory, or at an empty one to start it afresh"
        )
    stored = meta.get("peers")
    if peers is not None and stored != peers:
        if not isinstance(stored, str):
            raise _corrupt(db_path, "its peer list is not text")
        was, now = stored.split(","), peers.split(",")
        differs = [f"{len(was)} replicas, now {len(now)}"] if len(was) != len(now) else []
        differs += [f"replica {i} was {a}, now {b}" for i, (a, b) in enumerate(zip(was, now, strict=False)) if a != b][
            :5
        ]
        raise StorageError(
            f"data directory {db_path.parent} belongs to a cluster of replicas {stored}, not {peers} "
            f"({'; '.join(differs)}); start every replica with the peer list it was created with, "
            "or point this replica at an empty data directory to join the new cluster afresh"
        )


def _meta_ballot(meta: dict[str, Any], db_path: pathlib.Path) -> Ballot:
    try:
        return Ballot(meta["promised_round"], meta["promised_rid"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(db_path, f"bad promised ballot: {exc}") from None
