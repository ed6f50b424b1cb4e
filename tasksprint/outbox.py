"""Frames waiting for one connection of a replica: bounded, split when too large, written in batches.

A replica keeps one :class:`Outbox` per peer and one per client connection.
Messages are encoded as they are queued, so an unencodable or oversized one
is dropped (logged) at once rather than failing a send later; a message over
the frame cap that carries several values is split
(:func:`split_message`); past a count or a byte bound the oldest frames are
dropped, since the protocol tolerates loss (peers resend, clients retry) and
memory must stay bounded.  :meth:`Outbox.flush` writes from the calling task
when the connection is idle, and otherwise wakes :meth:`Outbox.pump`, which
writes when it can.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
import structlog
import trio

from tasksprint import codec, wire
from tasksprint.framing import encode_frame
from tasksprint.paxos.messages import Accept, CatchupReply, Forward, Promise

__all__ = ["OUTBOX_BYTES", "OUTBOX_LIMIT", "Outbox", "split_message"]

# Its lines are the replica's: an outbox is a part of it.
log = structlog.get_logger("tasksprint.replica")

OUTBOX_LIMIT = 20_000  # frames queued for one connection before the oldest are dropped
OUTBOX_BYTES = 256 * 1024 * 1024  # bytes queued for one connection before the oldest frames are dropped


def split_message(msg: Any) -> list[Any] | None:
    """``msg`` as two messages of the same meaning, each smaller, or None if it cannot be split.

    Messages carrying several independent values (an Accept's proposals, a
    CatchupReply's entries, a Forward's commands) are split in halves, so a
    sender never makes a frame over the cap out of values that each fit.  A
    Promise is split by slots into parts whose spans tile its own (see
    :meth:`Promise.halves`); the candidate waits for all of them.
    """
    match msg:
        case Accept(ballot=ballot, proposals=proposals, commit=commit) if len(proposals) > 1:
            half = len(proposals) // 2
            return [
                Accept(ballot=ballot, proposals=proposals[:half], commit=commit),
                Accept(ballot=ballot, proposals=proposals[half:], commit=commit),
            ]
        case CatchupReply(entries=entries, commit=commit) if len(entries) > 1:
            half = len(entries) // 2
            return [
                CatchupReply(entries=entries[:half], commit=commit),
                CatchupReply(entries=entries[half:], commit=commit),
            ]
        case Promise():
            halves = msg.halves()
            return None if halves is None else list(halves)
        case Forward(items=items) if len(items) > 1:
            half = len(items) // 2
            return [Forward(items=items[:half]), Forward(items=items[half:])]
        case _:
            return None


@attrs.define(eq=False)
class Outbox:
    """Frames waiting for one connection, bounded in count and in bytes.

    :meth:`push` encodes a message at once (so its size is known and an
    unencodable or oversized one is dropped here, logged, instead of failing
    a send): a message over the frame cap that carries several values is
    split (:func:`split_message`).  When the queue is over ``limit`` frames
    or ``limit_bytes`` bytes the oldest frames are dropped: the protocol
    tolerates loss (peers resend, clients retry), memory must stay bounded.

    What is pushed leaves with the next :meth:`flush`: the driver calls it
    once it has queued what a pass over the core produced.  On an idle
    connection the bytes leave at once, from the calling task, and the pump
    task is not woken (at light load that is one task switch less per
    message).  Otherwise (a send in progress, a full socket buffer, no
    connection yet) the pump writes them, in batches, as soon as it can.
    """

    _queue: collections.deque = attrs.Factory(collections.deque)
    _event: trio.Event = attrs.Factory(trio.Event)
    _conn: wire.Connection | None = None  # while a pump runs
    limit: int = OUTBOX_LIMIT
    max_frame: int = wire.MAX_FRAME_DEFAULT
    limit_bytes: int = OUTBOX_BYTES
    #: Who the frames are for, in the log lines of dropped messages.
    name: str = ""
    _bytes: int = 0
    #: Frames dropped so far because the queue was full (for diagnosis and tests).
    dropped: int = 0

    def push(self, msg: Any) -> None:
        try:
            frames = self._frames(msg)
        except Exception as exc:  # unencodable (a bug, or a hostile value): this message only
            log.error("message_dropped", to=self.name, type=type(msg).__name__, error=codec.bounded(str(exc)))
            return
        queue = self._queue
        for frame in frames:
            queue.append(frame)
            self._bytes += len(frame)
        while len(queue) > 1 and (len(queue) > self.limit or self._bytes > self.limit_bytes):
            self._bytes -= len(queue.popleft())
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8...: logged, never flooding
                log.warning("outbox_full", to=self.name, dropped=self.dropped, limit_bytes=self.limit_bytes)

    def _frames(self, msg: Any) -> list[bytes]:
        try:
            return [encode_frame(msg, self.max_frame)]
        except wire.FrameTooLarge:
            parts = split_message(msg)
            if parts is None:
                raise
            return [frame for part in parts for frame in self._frames(part)]

    def clear(self) -> None:
        self._queue.clear()
        self._bytes = 0

    def _take(self) -> bytes:
        data = b"".join(self._queue)
        self._queue.clear()
        self._bytes = 0
        return data

    @property
    def waiting(self) -> int:
        """Messages not written yet."""
        return len(self._queue)

    def flush(self) -> None:
        """Write what is queued from the calling task, if the connection is idle; else wake the pump to."""
        if not self._queue:
            return
        conn = self._conn
        if conn is not None and conn.send_frames_nowait(b"".join(self._queue)):
            self._queue.clear()
            self._bytes = 0
            if not conn.backlog:
                return
            # What the socket did not take goes out with the pump's next send.
        self._event.set()

    async def pump(self, conn: wire.Connection) -> None:
        """Write queued messages to ``conn`` until it fails or the task is cancelled."""
        self._conn = conn
        try:
            while True:
                if not self._queue and not conn.backlog:
                    self._event = trio.Event()
                    await self._event.wait()
                await conn.send_frames(self._take())
        finally:
            self._conn = None
