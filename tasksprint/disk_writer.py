"""The disk writer: one thread that makes a replica's records durable, in order.

The replica's driver hands it each Ready's records and goes on at once
(sending, applying, taking the next Ready); the thread writes them with
:meth:`Storage.write <tasksprint.storage.Storage.write>` and reports back to
the trio loop how many of the submitted groups are now durable.  Whatever was
submitted while one write ran goes into the next transaction, so under load
one fsync covers many Readies (group commit).

A thread of its own rather than a trio task calling a worker thread: a
submitted write starts as soon as the thread holds the interpreter lock,
without waiting for the event loop to schedule anything.  The driver still
writes a lone small Ready itself at light load (see docs/architecture.md):
the thread gets the lock only when the loop makes a system call or waits.

Order is the contract: submissions are written in the order they were made,
and ``written(n)`` always reports the oldest ``n`` not yet reported.  A
failed write is reported once through ``failed`` and the thread stops; the
store is closed by then (see :class:`~tasksprint.storage.StorageError`), so
nothing after it can reach the disk either.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from tasksprint.paxos.durable import Record
from tasksprint.storage import Storage

_STOP = object()


class DiskWriter:
    """``submit`` from the trio thread; ``written``/``failed`` are called back in it.

    ``fsynced``, if given, is called back (in the trio thread too) with the
    seconds each synced write took, before the ``written`` it belongs to.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        written: Callable[[int], None],
        failed: Callable[[BaseException], None],
        name: str = "disk-writer",
        fsynced: Callable[[float], None] | None = None,
    ) -> None:
        self._storage = storage
        self._fsynced = fsynced
        self._written = written
        self._failed = failed
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[Record], sync: bool) -> None:
        """Queue ``records`` (possibly none: a place in the order) to be written; ``sync`` means fsync."""
        self._queue.put((records, sync))

    def stop(self) -> None:
        """Finish what was submitted, then end the thread (blocks until it has)."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            group = [item]
            stop = False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                group.append(more)
            records = [r for recs, _ in group for r in recs]
            sync = any(sync for recs, sync in group if recs)
            t0 = time.perf_counter()
            try:
                self._storage.write(records, sync=sync)
            except BaseException as exc:  # reported to the replica, which stops
                self._call(self._failed, exc)
                return
            if sync and self._fsynced is not None:
                self._call(self._fsynced, time.perf_counter() - t0)
            self._call(self._written, len(group))
            if stop:
                return

    def _call(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            self._token.run_sync_soon(fn, arg)
        except trio.RunFinishedError:
            pass  # the replica is gone; nobody waits for this answer
