"""Authenticated, length-prefixed CBOR frames over trio TCP streams.

Theory of operation
-------------------
Every connection between replicas, clients and the command line carries a
sequence of *frames*.  A frame is a 4-byte big-endian unsigned length ``n``
followed by ``n`` bytes: one value encoded by :func:`tasksprint.codec.encode`
(usually a registered message class).  A receiver refuses a frame whose
declared length is over its cap before reading the body, so a peer cannot make
it buffer more than the cap.

Before any other frame, both ends run a mutual challenge-response on the
cluster's shared secret:

1. each end sends :class:`Hello` with 32 fresh random bytes (its nonce), its
   role and its identity;
2. the initiator (the end that opened the TCP connection) sends
   :class:`Proof`; the responder checks it and only then sends its own
   :class:`Proof`, which the initiator checks.

A proof is HMAC-SHA256 over a context string, the prover's side of the
connection, its role and identity, the other end's nonce and its own nonce
(:func:`proof_mac` gives the exact bytes).  The other end's fresh nonce stops
replay; the side byte and the prover's own nonce stop reflection (a proof
taken from one end cannot be sent back to it or used on a second connection
to it).  The responder speaks second so that a peer without the secret never
sees a MAC made with it.  The handshake authenticates the two ends; it does
not encrypt or protect later frames against an attacker who can rewrite
traffic, so clusters on untrusted networks need a tunnel (VPN, WireGuard).

Anything wrong in what a peer sends raises :class:`~tasksprint.codec.BadMessage`
(or a subclass) and closes that connection; :func:`serve` logs the reason
once and goes on serving everyone else.  ``docs/wire.md`` describes the format
for authors of compatible peers.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from tasksprint import codec
from tasksprint.codec import BadMessage

if sys.version_info < (3, 11):  # pragma: no cover - the backport ships with trio
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "AuthError",
    "BadMessage",
    "CloseReason",
    "Connection",
    "ConnectionClosed",
    "DEFAULT_SECRET",
    "FrameTooLarge",
    "HANDSHAKE_CONTEXT",
    "HANDSHAKE_MAX_FRAME",
    "HANDSHAKE_TIMEOUT_DEFAULT",
    "Hello",
    "MAX_FRAME_DEFAULT",
    "NONCE_SIZE",
    "Proof",
    "SecretError",
    "Side",
    "connect",
    "handshake",
    "load_secret",
    "proof_mac",
    "serve",
]

#: Largest frame body (bytes) a connection accepts unless told otherwise.
MAX_FRAME_DEFAULT = 64 * 1024 * 1024

#: Largest frame body (bytes) accepted before the peer is authenticated.  A
#: Hello or Proof is well under 2 KiB; the small cap keeps an unauthenticated
#: peer from making us buffer a large frame.
HANDSHAKE_MAX_FRAME = 4096

#: Seconds a connection may spend in the handshake before it is dropped.
HANDSHAKE_TIMEOUT_DEFAULT = 5.0

#: Length in bytes of each end's handshake nonce.
NONCE_SIZE = 32

#: First bytes of every HMAC input; the version suffix changes if the
#: handshake ever does, so proofs of two versions can never be confused.
HANDSHAKE_CONTEXT = b"tasksprint-handshake-v1"

#: Cluster secret for development clusters on one machine.  Anyone who has
#: read this source knows it: callers that fall back to it must warn.
DEFAULT_SECRET = b"tasksprint-development-secret-do-not-use-on-a-network"

_HEADER = struct.Struct(">I")
_MAX_FRAME_LIMIT = 2**32 - 1  # what a 4-byte length can declare
_MAC_SIZE = hashlib.sha256().digest_size
_ROLE_MAX_CHARS = 64
_IDENT_MAX_CHARS = 256

# receive_some sizes: one call normally returns many small frames; for a frame
# larger than the usual chunk we ask for what is missing (bounded) so a big
# snapshot does not take thousands of small reads.
_RECV_CHUNK = 64 * 1024
_RECV_CHUNK_MAX = 4 * 1024 * 1024

_SECRET_HOWTO = "create one with: head -c 32 /dev/urandom | base64 > {path}"


# --------------------------------------------------------------------------
# Errors


class FrameTooLarge(BadMessage):
    """A frame's declared (or, when sending, encoded) length is over the cap."""


class AuthError(BadMessage):
    """The handshake failed: the peer did not prove it knows the cluster secret."""


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly, between two frames."""


class SecretError(Exception):
    """The cluster secret file is missing, unreadable or empty."""


#: Everything a failed or refused connection to a peer can raise: callers
#: that retry elsewhere catch exactly these.
NETWORK_ERRORS = (
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    BadMessage,
    ConnectionClosed,
)


# --------------------------------------------------------------------------
# Handshake messages


def _bytes_of_length(size: int) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attr.name} must be bytes, got {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{attr.name} must be {size} bytes, got {len(value)}")

    return check


def _text(min_chars: int, max_chars: int) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attr.name} must be a str, got {type(value).__name__}")
        if not min_chars <= len(value) <= max_chars:
            raise ValueError(f"{attr.name} must have {min_chars} to {max_chars} characters, got {len(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate cannot be sent as CBOR text; refuse it here
            # rather than fail later inside encode().
            raise ValueError(f"{attr.name} is not valid Unicode text") from None

    return check


@codec.register
@attrs.frozen(kw_only=True)
class Hello:
    """First frame from each end: a fresh nonce and who the sender says it is.

    ``role`` names the kind of process (``"replica"``, ``"client"``, ...);
    ``ident`` names this particular one.  Both are claims until the sender's
    :class:`Proof` checks out.
    """

    nonce: bytes = attrs.field(validator=_bytes_of_length(NONCE_SIZE))
    role: str = attrs.field(validator=_text(1, _ROLE_MAX_CHARS))
    ident: str = attrs.field(validator=_text(0, _IDENT_MAX_CHARS))


@codec.register
@attrs.frozen(kw_only=True)
class Proof:
    """Second frame from each end: the HMAC computed by :func:`proof_mac`."""

    mac: bytes = attrs.field(validator=_bytes_of_length(_MAC_SIZE))


class Side(enum.Enum):
    """Which end of a connection a proof comes from; part of the HMAC input."""

    INITIATOR = 1  # opened the TCP connection
    RESPONDER = 2  # accepted it

    @property
    def other(self) -> Side:
        return Side.RESPONDER if self is Side.INITIATOR else Side.INITIATOR


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def proof_mac(secret: bytes, side: Side, role: str, ident: str, their_nonce: bytes, own_nonce: bytes) -> bytes:
    """Compute the handshake proof of the end on ``side``.

    Takes the cluster secret, the prover's side, role and identity, the other
    end's nonce and the prover's own nonce.  Returns the 32-byte
    HMAC-SHA256 of::

        HANDSHAKE_CONTEXT || side (1 byte: 1 initiator, 2 responder)
        || len(role) (2 bytes BE) || role (UTF-8)
        || len(ident) (2 bytes BE) || ident (UTF-8)
        || their_nonce (32 bytes) || own_nonce (32 bytes)

    Role and identity are length-prefixed so that no two different
    (role, ident) pairs give the same input.
    """
    data = b"".join(
        (
            HANDSHAKE_CONTEXT,
            side.value.to_bytes(1, "big"),
            _length_prefixed(role),
            _length_prefixed(ident),
            their_nonce,
            own_nonce,
        )
    )
    return hmac.new(secret, data, hashlib.sha256).digest()


def _check_secret(secret: Any) -> None:
    if not isinstance(secret, bytes):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}; read the secret file with load_secret(path)")
    if not secret:
        raise ValueError("secret is empty; read the cluster secret file with load_secret(path)")


def _check_max_frame(max_frame: Any) -> None:
    if not isinstance(max_frame, int) or isinstance(max_frame, bool) or not 1 <= max_frame <= _MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame must be an int from 1 to {_MAX_FRAME_LIMIT} (bytes), got {max_frame!r}")


# --------------------------------------------------------------------------
# Connection


class _State(enum.Enum):
    OPEN = enum.auto()
    # A send was interrupted part-way, so the peer may hold half a frame and
    # every later frame would be misread: nothing more may be sent.
    BROKEN = enum.auto()
    CLOSED = enum.auto()


@attrs.define(eq=False)
class Connection(trio.abc.AsyncResource):
    """Frames over one trio stream.

    ``Connection(stream)`` frames an already trusted stream (tests,
    in-process pipes); :func:`connect` and :func:`serve` return connections
    whose handshake is done and whose :attr:`peer` is the peer's
    :class:`Hello`.  Any number of tasks may send at once; one task at a time
    may receive.  ``async with`` closes the connection on exit.
    """

    _stream: trio.abc.Stream
    _max_frame: int = attrs.field(default=MAX_FRAME_DEFAULT, kw_only=True)
    #: The peer's Hello once the handshake succeeded, else None.
    peer: Hello | None = attrs.field(default=None, init=False)
    _buf: bytearray = attrs.field(factory=bytearray, init=False)
    # Frames before _pos have been handed out; compacted lazily before a read
    # so that decoding many frames from one chunk moves memory once.
    _pos: int = attrs.field(default=0, init=False)
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _receiving: bool = attrs.field(default=False, init=False)
    _state: _State = attrs.field(default=_State.OPEN, init=False)
    # The rest of a write send_nowait could only hand over in part; the next
    # send writes it before anything else.
    _backlog: bytes = attrs.field(default=b"", init=False)

    def __attrs_post_init__(self) -> None:
        _check_max_frame(self._max_frame)

    @property
    def backlog(self) -> bool:
        """Whether bytes of an earlier :meth:`send_nowait` wait to be written by the next send."""
        return bool(self._backlog)

    # -- sending ------------------------------------------------------------

    def _frame(self, msg: Any) -> bytes:
        payload = codec.encode(msg)
        if len(payload) > self._max_frame:
            raise FrameTooLarge(
                f"{type(msg).__name__} encodes to {len(payload)} bytes, over the "
                f"{self._max_frame}-byte frame cap; split it or raise max_frame on both ends"
            )
        return _HEADER.pack(len(payload)) + payload

    def _frames(self, msgs: Iterable[Any]) -> bytes:
        """Every message framed, back to back (nothing if one fails to encode)."""
        return b"".join([self._frame(m) for m in msgs])

    async def send(self, msg: Any) -> None:
        """Send one message as one frame.

        Raises FrameTooLarge (nothing is sent) if it encodes to more than the
        cap, TypeError if it holds an unregistered class,
        trio.BrokenResourceError if the connection broke, and
        trio.ClosedResourceError if it was closed here.  A send cancelled
        after it started writing closes the connection, since part of the
        frame may have gone out.
        """
        await self._send_bytes(self._frame(msg))

    async def send_many(self, msgs: Iterable[Any]) -> None:
        """Send several messages, one frame each, in a single write.

        Either every frame is handed to the stream or, if one is too large
        (FrameTooLarge) or unencodable (TypeError), none is.  Other errors as
        for :meth:`send`.
        """
        data = self._frames(msgs)
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
        if self._backlog or self._state is not _State.OPEN or self._send_lock.locked():
            return False
        fd = self._stream.socket.fileno() if isinstance(self._stream, trio.SocketStream) else -1
        if fd < 0:  # not a socket, or closed
            return False
        data = self._frames(msgs)
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
            if self._state is _State.CLOSED:
                raise trio.ClosedResourceError("connection was closed")
            if self._state is _State.BROKEN:
                raise trio.BrokenResourceError("an earlier send was interrupted part-way; the connection is unusable")
            if self._backlog:
                data, self._backlog = self._backlog + data, b""
            try:
                await self._stream.send_all(data)
            except BaseException:
                # Cancelled or failed mid-write: the peer may have half a
                # frame, so the byte stream is out of step for good.
                if self._state is _State.OPEN:
                    self._state = _State.BROKEN
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
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("connection was closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("an earlier send was interrupted part-way; the connection is unusable")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        self._receiving = True
        try:
            while True:
                body = self._next_frame(limit)
                if body is not None:
                    return codec.decode_untrusted(body)
                await self._fill()
        except BadMessage:
            await self._abort()
            raise
        finally:
            self._receiving = False

    def frame_ready(self) -> bool:
        """Whether a whole frame is already buffered (the next ``receive`` returns without waiting)."""
        available = len(self._buf) - self._pos
        if available < _HEADER.size:
            return False
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        return available >= _HEADER.size + length

    def _next_frame(self, limit: int) -> bytes | None:
        """Take the next complete frame body out of the buffer, or return None.

        Frames are cut one at a time, on demand, rather than all at once after
        each read: the handshake reads with a smaller cap than the frames
        after it, which may already be in the same chunk.
        """
        available = len(self._buf) - self._pos
        if available < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        if length > limit:
            raise FrameTooLarge(f"peer declared a {length}-byte frame, over the {limit}-byte cap")
        if available < _HEADER.size + length:
            return None
        start = self._pos + _HEADER.size
        self._pos = start + length
        # One copy through a view (slicing the bytearray would copy twice);
        # the view is released at once so the buffer can be compacted later.
        with memoryview(self._buf) as view:
            return bytes(view[start : start + length])

    async def _fill(self) -> None:
        """Read one chunk into the buffer; raise ConnectionClosed / BadMessage at EOF."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        want = _RECV_CHUNK
        if len(self._buf) >= _HEADER.size:
            # Only reached once _next_frame accepted this length.
            (length,) = _HEADER.unpack_from(self._buf, 0)
            missing = _HEADER.size + length - len(self._buf)
            want = max(want, min(missing, _RECV_CHUNK_MAX))
        data = await self._stream.receive_some(want)
        if not data:
            if self._buf:
                raise BadMessage(f"peer closed the connection in the middle of a frame ({len(self._buf)} bytes of it arrived)")
            raise ConnectionClosed("peer closed the connection")
        self._buf += data

    # -- closing ------------------------------------------------------------

    async def _abort(self) -> None:
        self._state = _State.CLOSED
        await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        """Close the connection; safe to call more than once."""
        self._state = _State.CLOSED
        await self._stream.aclose()


# --------------------------------------------------------------------------
# Handshake


async def handshake(conn: Connection, *, secret: bytes, role: str, ident: str, side: Side) -> Hello:
    """Run the mutual challenge-response on a fresh connection.

    Takes the connection (nothing sent or received on it yet), the cluster
    secret, this end's role and identity, and which side of the connection
    this end is.  Returns the peer's Hello, also stored as ``conn.peer``.
    Raises AuthError (and closes the connection) if the peer's proof is wrong
    or missing, BadMessage or FrameTooLarge if it sent something that is not a
    handshake frame, trio.BrokenResourceError if the connection broke.  Takes
    as long as the peer lets it: callers bound it with a timeout.
    """
    _check_secret(secret)
    own = Hello(nonce=os.urandom(NONCE_SIZE), role=role, ident=ident)
    await conn.send(own)
    try:
        peer = await conn._receive(HANDSHAKE_MAX_FRAME)
    except ConnectionClosed:
        await conn._abort()
        raise AuthError("peer closed the connection before its Hello; is it a TaskSprint process?") from None
    if not isinstance(peer, Hello):
        await conn._abort()
        raise AuthError(f"expected Hello as the first frame, got {type(peer).__name__}")
    if hmac.compare_digest(peer.nonce, own.nonce):
        # Only a peer replaying our own Hello can produce this.
        await conn._abort()
        raise AuthError("peer sent back our own nonce")
    own_mac = proof_mac(secret, side, role, ident, peer.nonce, own.nonce)
    peer_mac = proof_mac(secret, side.other, peer.role, peer.ident, own.nonce, peer.nonce)
    if side is Side.INITIATOR:
        await conn.send(Proof(mac=own_mac))
        await _check_proof(conn, peer, peer_mac, after_ours=True)
    else:
        await _check_proof(conn, peer, peer_mac, after_ours=False)
        await conn.send(Proof(mac=own_mac))
    conn.peer = peer
    return peer


async def _check_proof(conn: Connection, peer: Hello, expected: bytes, *, after_ours: bool) -> None:
    try:
        msg = await conn._receive(HANDSHAKE_MAX_FRAME)
    except ConnectionClosed:
        await conn._abort()
        if after_ours:
            raise AuthError(
                f"{peer.role} {peer.ident!r} closed the connection after our proof: it refused it, "
                "so the two ends do not share the cluster secret"
            ) from None
        raise AuthError(f"{peer.role} {peer.ident!r} closed the connection before sending its proof") from None
    if not isinstance(msg, Proof):
        await conn._abort()
        raise AuthError(f"expected Proof from {peer.role} {peer.ident!r}, got {type(msg).__name__}")
    if not hmac.compare_digest(msg.mac, expected):
        await conn._abort()
        raise AuthError(
            f"{peer.role} {peer.ident!r} sent a wrong proof: the two ends do not share the cluster secret"
        )


# --------------------------------------------------------------------------
# Client and server


async def connect(
    host: str,
    port: int,
    *,
    secret: bytes,
    role: str,
    ident: str,
    max_frame: int = MAX_FRAME_DEFAULT,
    timeout: float = HANDSHAKE_TIMEOUT_DEFAULT,
) -> Connection:
    """Open a TCP connection to ``host:port`` and authenticate both ends.

    Takes the address, the cluster secret, this end's role and identity, the
    frame cap in bytes and a timeout in seconds covering both the TCP connect
    and the handshake.  Returns the open :class:`Connection`, with ``peer``
    set.  Raises OSError if the connection is refused or fails, AuthError if
    the two ends do not share the secret, trio.TooSlowError on timeout,
    BadMessage if the peer does not speak this protocol.
    """
    _check_secret(secret)
    _check_max_frame(max_frame)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        conn = Connection(stream, max_frame=max_frame)
        try:
            await handshake(conn, secret=secret, role=role, ident=ident, side=Side.INITIATOR)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return conn


class CloseReason(enum.Enum):
    """Why :func:`serve` closed a connection (the ``reason`` in its log)."""

    HANDLER_DONE = "handler_done"
    PEER_CLOSED = "peer_closed"
    CLOSED_LOCALLY = "closed_locally"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    AUTH_FAILED = "auth_failed"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_MESSAGE = "bad_message"
    BROKEN = "broken"
    OS_ERROR = "os_error"

    @property
    def is_problem(self) -> bool:
        """True for reasons an operator may want to look into."""
        return self not in (CloseReason.HANDLER_DONE, CloseReason.PEER_CLOSED, CloseReason.CLOSED_LOCALLY)


def _describe(exc: BaseException) -> str:
    """The messages of the errors in ``exc``, looking inside exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def _reason_for(exc: BaseException) -> CloseReason | None:
    """The reason a per-connection exception closes only its connection, or None
    if it is not a connection problem (a bug that must propagate)."""
    match exc:
        case ConnectionClosed():
            return CloseReason.PEER_CLOSED
        case FrameTooLarge():
            return CloseReason.FRAME_TOO_LARGE
        case AuthError():
            return CloseReason.AUTH_FAILED
        case BadMessage():
            return CloseReason.BAD_MESSAGE
        case trio.BrokenResourceError():
            return CloseReason.BROKEN
        case trio.ClosedResourceError():
            return CloseReason.CLOSED_LOCALLY
        case OSError():
            return CloseReason.OS_ERROR
        case BaseExceptionGroup():
            # A handler with its own nursery reports errors as a group; it is
            # a connection problem only if every error in it is one.
            reasons = [_reason_for(e) for e in exc.exceptions]
            if not reasons or None in reasons:
                return None
            return next((r for r in reasons if r.is_problem), reasons[0])
        case _:
            return None


def _address(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        addr = sock.getpeername() if sock is not None else None
    except OSError:  # already disconnected
        addr = None
    match addr:
        case (str() as host, int() as port, *_):
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        case _:
            return "unknown"


async def serve(
    handler: Callable[[Connection], Awaitable[object]],
    host: str | None,
    port: int,
    *,
    secret: bytes,
    role: str,
    ident: str,
    max_frame: int = MAX_FRAME_DEFAULT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_DEFAULT,
    log: Any = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept authenticated connections on ``host:port`` until cancelled.

    Takes the per-connection handler, the address to listen on (``host``
    None means every interface; ``port`` 0 picks a free port), the cluster
    secret, this end's role and identity, the frame cap in bytes, the
    handshake timeout in seconds and an optional structlog logger.  Reports
    the list of bound ``trio.SocketListener`` through ``task_status.started``
    (so ``await nursery.start(serve, ...)`` returns it and the caller can read
    the port).  Each connection gets its own task: handshake, then
    ``await handler(conn)``, then close.  A connection that fails the
    handshake, times out in it, sends a bad frame or breaks is logged once as
    ``connection_closed`` with a ``reason`` and closed; other connections are
    not affected.  Any other exception from a handler is a bug and
    propagates, stopping the server.  Raises OSError if it cannot listen.
    Never returns normally.
    """
    _check_secret(secret)
    _check_max_frame(max_frame)
    Hello(nonce=bytes(NONCE_SIZE), role=role, ident=ident)  # validates role and ident now, not per connection
    base_log = (log if log is not None else structlog.get_logger(__name__)).bind(role=role, ident=ident)

    async def serve_one(stream: trio.SocketStream) -> None:
        conn_log = base_log.bind(peer=_address(stream))
        conn = Connection(stream, max_frame=max_frame)
        reason = CloseReason.HANDLER_DONE
        error = None
        try:
            with trio.move_on_after(handshake_timeout):
                await handshake(conn, secret=secret, role=role, ident=ident, side=Side.RESPONDER)
            if conn.peer is None:
                reason = CloseReason.HANDSHAKE_TIMEOUT
                error = f"no complete handshake within {handshake_timeout} s"
            else:
                conn_log = conn_log.bind(peer_role=conn.peer.role, peer_ident=conn.peer.ident)
                conn_log.debug("connection_open")
                await handler(conn)
        except Exception as exc:
            found = _reason_for(exc)
            if found is None:
                raise
            reason, error = found, _describe(exc)
        finally:
            await trio.aclose_forcefully(conn)
        # Logged after the finally so that each connection logs exactly once,
        # and never for a connection whose handler raised a bug.
        if reason.is_problem:
            conn_log.warning("connection_closed", reason=reason.value, error=error)
        else:
            conn_log.debug("connection_closed", reason=reason.value)

    listeners = await trio.open_tcp_listeners(port, host=host)
    await trio.serve_listeners(serve_one, listeners, task_status=task_status)


# --------------------------------------------------------------------------
# Secret file


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster secret from a file.

    Takes the file's path.  Returns its bytes without trailing whitespace
    (so a final newline does not matter); those bytes, as they are, are the
    HMAC key.  Raises SecretError, naming the path and how to create a
    secret, if the file is missing, unreadable or empty.
    """
    howto = _SECRET_HOWTO.format(path=path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SecretError(f"cluster secret file {path} does not exist; {howto}") from None
    except PermissionError:
        raise SecretError(f"cannot read cluster secret file {path}: permission denied; fix its owner or mode") from None
    except OSError as exc:
        raise SecretError(f"cannot read cluster secret file {path}: {exc.strerror or exc}; {howto}") from None
    secret = data.rstrip()
    if not secret:
        raise SecretError(f"cluster secret file {path} is empty; {howto}")
    return secret
