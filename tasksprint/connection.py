"""Frames over one trio stream, and the challenge-response that opens it.

:class:`Connection` sends frames on a trio stream and feeds what it reads
into a :class:`~tasksprint.framing.FrameBuffer`; :func:`handshake` runs a
:class:`~tasksprint.handshake.Handshake` over a fresh connection with a
random nonce.  Anything wrong in what a peer sends raises
:class:`~tasksprint.codec.BadMessage` (or a subclass) and closes the
connection.  Opening and accepting authenticated connections is
:mod:`tasksprint.wire`'s, which also offers these names.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from tasksprint.codec import BadMessage
from tasksprint.framing import (
    MAX_FRAME_DEFAULT,
    NEED_DATA,
    FrameBuffer,
    check_max_frame,
    encode_frame,
    encode_frames,
)
from tasksprint.handshake import (
    HANDSHAKE_MAX_FRAME,
    NONCE_SIZE,
    AuthError,
    Handshake,
    Hello,
    Proof,
    Side,
    parse_frame,
)

__all__ = ["Connection", "ConnectionClosed", "IdleTimeout", "handshake"]


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly, between two frames."""


class IdleTimeout(ConnectionClosed):
    """Nothing arrived on a served connection for its idle timeout: it was closed (:meth:`Connection.close_idle`)."""


class _ConnectionState(enum.Enum):
    OPEN = enum.auto()
    # A send was interrupted part-way, so the peer may hold half a frame and
    # every later frame would be misread: nothing more may be sent.
    BROKEN = enum.auto()
    CLOSED = enum.auto()


@attrs.define(eq=False)
class Connection(trio.abc.AsyncResource):
    """Frames over one trio stream.

    ``Connection(stream)`` frames an already trusted stream (tests,
    in-process pipes); :func:`~tasksprint.wire.connect` and :func:`~tasksprint.wire.serve` return connections
    whose handshake is done and whose :attr:`peer` is the peer's
    :class:`Hello`.  Any number of tasks may send at once; one task at a time
    may receive.  ``async with`` closes the connection on exit.
    """

    _stream: trio.abc.Stream
    _max_frame: int = attrs.field(default=MAX_FRAME_DEFAULT, kw_only=True)
    #: The peer's Hello once the handshake succeeded, else None.
    peer: Hello | None = attrs.field(default=None, init=False)
    _received: FrameBuffer = attrs.field(factory=FrameBuffer, init=False)
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _receiving: bool = attrs.field(default=False, init=False)
    _state: _ConnectionState = attrs.field(default=_ConnectionState.OPEN, init=False)
    # The rest of a write send_nowait could only hand over in part; the next
    # send writes it before anything else.
    _backlog: bytes = attrs.field(default=b"", init=False)
    # Since when a receive waits for the peer's next bytes (None: none
    # waits), and the idle time after which close_idle closed it.
    _waiting_since: float | None = attrs.field(default=None, init=False)
    _idled: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        check_max_frame(self._max_frame)

    @property
    def backlog(self) -> bool:
        """Whether bytes of an earlier :meth:`send_nowait` wait to be written by the next send."""
        return bool(self._backlog)

    # -- sending ------------------------------------------------------------

    async def send(self, msg: Any) -> None:
        """Send one message as one frame.

        Raises FrameTooLarge (nothing is sent) if it encodes to more than the
        cap, TypeError if it holds an unregistered class,
        trio.BrokenResourceError if the connection broke, and
        trio.ClosedResourceError if it was closed here.  A send cancelled
        after it started writing closes the connection, since part of the
        frame may have gone out.
        """
        await self._send_bytes(encode_frame(msg, self._max_frame))

    async def send_many(self, msgs: Iterable[Any]) -> None:
        """Send several messages, one frame each, in a single write.

        Either every frame is handed to the stream or, if one is too large
        (FrameTooLarge) or unencodable (TypeError), none is.  Other errors as
        for :meth:`send`.
        """
        data = encode_frames(msgs, self._max_frame)
        if data or self._backlog:
            await self._send_bytes(data)

    def send_nowait(self, msgs: Iterable[Any]) -> bool:
        """Hand several messages to the kernel now, from this task, without yielding.

        For a driver that has just queued replies: the bytes leave before
        the scheduler runs the task that would otherwise send them.  Returns
        False, having sent and kept nothing, when that is not possible at
        once: another send is in progress or has bytes waiting, the stream
        is not a socket, the connection is not open, the socket buffer is
        full, or the write failed (the next :meth:`send_many` reports the
        failure).  Send them with :meth:`send_many` then.  Returns True when
        every frame was handed over, or part of them and :attr:`backlog` is
        set: the rest goes out first with the next send (``send_many([])``
        writes just that).  FrameTooLarge and TypeError as for
        :meth:`send_many`, with nothing sent.
        """
        if self._backlog or self._state is not _ConnectionState.OPEN or self._send_lock.locked():
            return False
        fd = self._stream.socket.fileno() if isinstance(self._stream, trio.SocketStream) else -1
        if fd < 0:  # not a socket, or closed
            return False
        return self._write_nowait(fd, encode_frames(msgs, self._max_frame))

    def send_frames_nowait(self, data: bytes) -> bool:
        """:meth:`send_nowait` for frames already encoded (``encode_frame``), back to back."""
        if self._backlog or self._state is not _ConnectionState.OPEN or self._send_lock.locked():
            return False
        fd = self._stream.socket.fileno() if isinstance(self._stream, trio.SocketStream) else -1
        if fd < 0:
            return False
        return self._write_nowait(fd, data)

    async def send_frames(self, data: bytes) -> None:
        """:meth:`send_many` for frames already encoded (``encode_frame``), back to back."""
        if data or self._backlog:
            await self._send_bytes(data)

    def _write_nowait(self, fd: int, data: bytes) -> bool:
        try:
            sent = os.write(fd, data)  # the socket is non-blocking (trio made it so)
        except OSError:
            return False
        if sent < len(data):
            self._backlog = data[sent:]
        return True

    async def _send_bytes(self, data: bytes) -> None:
        # trio streams refuse concurrent send_all calls; the lock queues the
        # senders so that frames from several tasks never interleave.  An
        # uncontended lock is taken without yielding, so the bytes reach the
        # kernel in this step (send_all still checkpoints once after the
        # write): a driver that yields once after queueing a message, then
        # blocks on an fsync, has its message on the wire before the fsync.
        if self._send_lock.locked():
            await self._send_lock.acquire()  # cancelled here: nothing held, nothing sent
        else:
            self._send_lock.acquire_nowait()
        try:
            if self._state is _ConnectionState.CLOSED:
                raise trio.ClosedResourceError("connection was closed")
            if self._state is _ConnectionState.BROKEN:
                raise trio.BrokenResourceError("an earlier send was interrupted part-way; the connection is unusable")
            if self._backlog:
                data, self._backlog = self._backlog + data, b""
            try:
                await self._stream.send_all(data)
            except BaseException:
                # Cancelled or failed mid-write: the peer may have half a
                # frame, so the byte stream is out of step for good.
                if self._state is _ConnectionState.OPEN:
                    self._state = _ConnectionState.BROKEN
                await trio.aclose_forcefully(self._stream)
                raise
        finally:
            self._send_lock.release()

    # -- receiving ----------------------------------------------------------

    async def receive(self) -> Any:
        """Wait for the next frame and return the value it holds.

        Raises ConnectionClosed if the peer closed the connection between
        frames; BadMessage if a frame is undecodable, of an unknown type,
        invalid, or cut short by the peer closing; FrameTooLarge if its
        declared length is over the cap (its body is not read).  After a
        BadMessage the connection is closed.  Also trio.BrokenResourceError
        if the connection broke, and trio.BusyResourceError if another task
        is receiving.
        """
        return await self._receive(self._max_frame)

    async def _receive(self, limit: int) -> Any:
        if self._state is _ConnectionState.CLOSED:
            raise trio.ClosedResourceError("connection was closed")
        if self._state is _ConnectionState.BROKEN:
            raise trio.BrokenResourceError("an earlier send was interrupted part-way; the connection is unusable")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        self._receiving = True
        try:
            while True:
                msg = self._received.next_message(limit)
                if msg is not NEED_DATA:
                    return msg
                await self._fill()
        except BadMessage:
            await self._abort()
            raise
        finally:
            self._receiving = False

    async def _receive_handshake(self) -> Hello | Proof:
        """The next handshake frame, parsed by its fixed-shape parser (never the general decoder)."""
        if self._state is not _ConnectionState.OPEN:
            raise trio.ClosedResourceError("connection was closed")
        try:
            while True:
                body = self._received.next_body(HANDSHAKE_MAX_FRAME)
                if body is not None:
                    return parse_frame(body)
                await self._fill()
        except BadMessage:
            await self._abort()
            raise

    def frame_ready(self) -> bool:
        """Whether a whole frame is already buffered (the next ``receive`` returns without waiting)."""
        return self._received.frame_ready()

    def waiting_for(self, now: float) -> float:
        """Seconds a receive has been waiting for the peer's next bytes at ``now`` (0 if none waits)."""
        since = self._waiting_since
        return 0.0 if since is None else now - since

    async def close_idle(self, idle: float) -> None:
        """Close the connection because nothing arrived for ``idle`` seconds: the waiting receive raises IdleTimeout.

        Whoever serves many connections watches them all with one timer
        (:func:`tasksprint.wire.serve`), rather than each receive arming one
        of its own: a cancel scope per frame received costs about as much
        as reading the frame.
        """
        self._idled = idle
        self._state = _ConnectionState.CLOSED
        await trio.aclose_forcefully(self._stream)

    async def _fill(self) -> None:
        """Read one chunk into the buffer; raise ConnectionClosed / BadMessage at EOF, IdleTimeout once closed idle."""
        self._waiting_since = trio.current_time()
        try:
            data = await self._stream.receive_some(self._received.read_size())
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if self._idled is not None:
                raise IdleTimeout(f"nothing received for {self._idled} s") from None
            raise
        finally:
            self._waiting_since = None
        if not data:
            self._received.check_end()
            raise ConnectionClosed("peer closed the connection")
        self._received.feed(data)

    # -- closing ------------------------------------------------------------

    async def _abort(self) -> None:
        self._state = _ConnectionState.CLOSED
        await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """Close the connection; safe to call more than once."""
        self._state = _ConnectionState.CLOSED
        await self._stream.aclose()


async def handshake(
    conn: Connection,
    *,
    secret: bytes,
    role: str,
    ident: str,
    side: Side,
    expect: tuple[str, str | None] | None = None,
) -> Hello:
    """Run the mutual challenge-response on a fresh connection.

    Takes the connection (nothing sent or received on it yet), the cluster
    secret, this end's role and identity, and which side of the connection
    this end is.  Returns the peer's Hello, also stored as ``conn.peer``.
    Raises AuthError (and closes the connection) if the peer's proof is wrong
    or missing, BadMessage or FrameTooLarge if it sent something that is not a
    handshake frame, trio.BrokenResourceError if the connection broke.  Takes
    as long as the peer lets it: callers bound it with a timeout.
    """
    state = Handshake.open(
        secret=secret, role=role, ident=ident, side=side, nonce=os.urandom(NONCE_SIZE), expect=expect
    )
    await conn.send(state.hello)
    while not state.done:
        try:
            msg = await conn._receive_handshake()
        except ConnectionClosed:
            await conn._abort()
            raise state.closed_error() from None
        try:
            replies = state.receive(msg)
        except AuthError:
            await conn._abort()
            raise
        for reply in replies:
            await conn.send(reply)
    conn.peer = state.peer
    assert conn.peer is not None
    return conn.peer
