"""The core's output buffer: what the next Ready carries, and the replies that wait for a disk.

The core's handlers only append here: records to persist, messages to send
at once, and replies that must not leave before the records queued so far
are durable (``reply_durable``).  :meth:`OutputBuffer.take` turns what has
gathered into a :class:`~tasksprint.paxos.core.Ready`; the replies queued
with it are held, by Ready number, until :meth:`OutputBuffer.release` is
told that Ready (and so every earlier one) is durable.  This is where
"persist before a vote is released" is enforced: a held reply has no other
way out.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import attrs

from tasksprint.paxos.durable import Record, SaveChosen
from tasksprint.paxos.messages import Batch


@attrs.frozen
class Ready:
    """What the driver must do: persist and send (in either order: no message
    depends on the records), restore+apply, then advance once persisted."""

    persist: tuple[Record, ...]
    messages: tuple[tuple[int, Any], ...]
    snapshot: tuple[int, bytes] | None
    committed: tuple[tuple[int, Batch], ...]
    #: False when ``persist`` holds only SaveChosen records and no reply waits
    #: for it: the driver may then write without waiting for the disk (no
    #: fsync).  Such records may be lost in a power cut, never reordered: the
    #: next synced write makes them durable with it.  Losing them is safe: a
    #: chosen value is durable on a majority of acceptors, so the replica
    #: learns it again from its peers.
    sync: bool = True
    #: Readies are numbered in the order ``ready()`` hands them out.
    number: int = 0


Outgoing = tuple[int, Any]  # (destination replica, message)


@attrs.define(eq=False)
class OutputBuffer:
    """Records, messages and held replies of one core, gathered for the next Ready."""

    _records: list[Record] = attrs.Factory(list)
    _messages: list[Outgoing] = attrs.Factory(list)
    # Replies queued since the last Ready: they wait for its records.
    _after_persist: list[Outgoing] = attrs.Factory(list)
    # Replies waiting for a Ready's records, by Ready number; let go by release().
    _held: collections.deque[tuple[int, list[Outgoing]]] = attrs.Factory(collections.deque)
    _readies: int = 0  # Readies handed out so far
    #: A snapshot the state machine must be restored to, carried by the next Ready.
    snapshot: tuple[int, bytes] | None = None

    def send(self, dst: int, msg: Any) -> None:
        """Queue ``msg`` for replica ``dst``; it depends on no record and leaves with the next Ready."""
        self._messages.append((dst, msg))

    def persist(self, records: Iterable[Record]) -> None:
        """Queue records to make durable with the next Ready."""
        self._records.extend(records)

    def reply_durable(self, dst: int, msg: Any) -> None:
        """Queue a reply that must not leave before the records queued so far are durable."""
        self._after_persist.append((dst, msg))

    def has_output(self) -> bool:
        """Whether the next Ready would carry anything of this buffer's."""
        return bool(self._records or self._messages or self._after_persist or self.snapshot is not None)

    def take(self, committed: tuple[tuple[int, Batch], ...]) -> Ready:
        """Empty the buffer into the next Ready (with the chosen slots the core hands out)."""
        persist = tuple(self._records)
        sync = bool(self._after_persist) or any(type(r) is not SaveChosen for r in persist)
        self._readies += 1
        rd = Ready(persist, tuple(self._messages), self.snapshot, committed, sync, self._readies)
        self._records = []
        self._messages = []
        self.snapshot = None
        # Replies waiting for this Ready's records (and the earlier ones') wait for release().
        if self._after_persist:
            self._held.append((rd.number, self._after_persist))
            self._after_persist = []
        return rd

    def release(self, ready: Ready) -> list[Outgoing]:
        """``ready``'s records and every earlier Ready's are durable: the replies that waited for them, in order."""
        out: list[Outgoing] = []
        held = self._held
        while held and held[0][0] <= ready.number:
            out.extend(held.popleft()[1])
        return out
