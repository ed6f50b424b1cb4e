"""A replica's durable history: the records its scheduler archived, in ``<data_dir>/history.db``.

What a long-running scheduler compacts out of the replicated state (the
service's finished tasks) is archived here, one SQLite row per key, so
memory and snapshots follow the live work while ``info`` can still read a
task that ended long ago.  Every replica keeps its own file, written as it
applies the log, so replicas that applied the same log hold the same
records (see :mod:`tasksprint.coordinator.archive` for the contract).

Records are buffered and written in one transaction per :meth:`SqliteHistory.sync`
(the machine syncs before each snapshot) or when the buffer is full; with
``fsync`` on, a sync is durable across power loss, as the replica's own
records are.  The file is read as hostile: a damaged record reads as
missing, never as an exception in the replica.
"""

from __future__ import annotations

import pathlib
import sqlite3

__all__ = ["HISTORY_DB", "SqliteHistory"]

HISTORY_DB = "history.db"
#: Records buffered before they are written without waiting for a snapshot.
MAX_BUFFERED = 20_000


class SqliteHistory:
    """A :class:`~tasksprint.coordinator.archive.History` in a SQLite file."""

    def __init__(self, path: pathlib.Path, *, fsync: bool = True) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.execute("CREATE TABLE IF NOT EXISTS archive (key INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        self._buffer: dict[int, bytes] = {}

    @classmethod
    def open(cls, data_dir: pathlib.Path, *, fsync: bool = True) -> SqliteHistory:
        return cls(pathlib.Path(data_dir) / HISTORY_DB, fsync=fsync)

    def put(self, key: int, data: bytes) -> None:
        self._buffer[key] = data
        if len(self._buffer) >= MAX_BUFFERED:
            self.sync()

    def get(self, key: int) -> bytes | None:
        data = self._buffer.get(key)
        if data is not None:
            return data
        row = self._db.execute("SELECT data FROM archive WHERE key = ?", (key,)).fetchone()
        return row[0] if row is not None and isinstance(row[0], bytes) else None

    def sync(self) -> None:
        if not self._buffer:
            return
        rows = list(self._buffer.items())
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT OR REPLACE INTO archive (key, data) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._buffer.clear()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self._db.close()
