"""Where a scheduler's archived records go: the replica's durable history, behind a small interface.

A scheduler calls ``archive(key, record)`` in a hook (every replica does,
in lockstep) and ``archived(key)`` in a query.  The machine encodes the
record and hands it to a :class:`History`; a replica gives its machine one
kept in its data directory (:mod:`tasksprint.history`), everything else
(tests, a machine without a disk) gets :class:`MemoryHistory`.

The contract a store keeps: ``put`` may buffer, ``sync`` makes everything
put so far durable, and the machine calls ``sync`` before every snapshot,
so a record is on disk before any snapshot that no longer holds it; what
was put after the last snapshot is in the log and archived again when the
replica replays it.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["History", "MemoryHistory"]


class History(Protocol):
    """A replica's archived records: bytes by int key."""

    def put(self, key: int, data: bytes) -> None:
        """Keep ``data`` under ``key`` (replacing what was there); may only buffer it."""

    def get(self, key: int) -> bytes | None:
        """What is kept under ``key``, buffered or durable; None if nothing."""

    def sync(self) -> None:
        """Make everything put so far durable."""


class MemoryHistory:
    """A :class:`History` in memory (gone with the process)."""

    def __init__(self) -> None:
        self._records: dict[int, bytes] = {}

    def put(self, key: int, data: bytes) -> None:
        self._records[key] = data

    def get(self, key: int) -> bytes | None:
        return self._records.get(key)

    def sync(self) -> None:
        return None
