"""Authenticated frames over trio TCP streams: connections, clients and servers.

Theory of operation
-------------------
Every connection between replicas, clients and the command line carries
length-prefixed CBOR frames (:mod:`tasksprint.framing`), and starts with a
mutual challenge-response on the cluster's shared secret
(:mod:`tasksprint.handshake`).  Both of those are pure; this module is the
I/O around them:

- :class:`Connection` sends frames on a trio stream and feeds what it reads
  into a :class:`~tasksprint.framing.FrameBuffer`;
- :func:`handshake` runs a :class:`~tasksprint.handshake.Handshake` over a
  fresh connection with a random nonce;
- :func:`connect` opens an authenticated connection and :func:`serve` accepts
  them, both as one :class:`Endpoint` (who this end is, the secret it proves,
  its frame cap and handshake timeout).

Anything wrong in what a peer sends raises :class:`~tasksprint.codec.BadMessage`
(or a subclass) and closes that connection; :func:`serve` logs the reason
once and goes on serving everyone else.  Callers that retry elsewhere catch
:data:`NETWORK_ERRORS`.  ``docs/wire.md`` describes the format for authors
of compatible peers.

The names of the framing, handshake and secret-file modules that callers of
this module need (errors, caps, :class:`~tasksprint.handshake.Hello`,
:func:`~tasksprint.credentials.load_secret`) are importable from here too.
"""

from __future__ import annotations

import collections
import enum
import math
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import structlog
import trio

from tasksprint.codec import BadMessage, bounded
from tasksprint.credentials import DEFAULT_SECRET, SecretError, load_secret
from tasksprint.framing import (
    MAX_FRAME_DEFAULT,
    NEED_DATA,
    FrameBuffer,
    FrameTooLarge,
    check_max_frame,
    encode_frame,
    encode_frames,
)
from tasksprint.handshake import (
    HANDSHAKE_CONTEXT,
    HANDSHAKE_MAX_FRAME,
    HANDSHAKE_TIMEOUT_DEFAULT,
    NONCE_SIZE,
    AuthError,
    Handshake,
    Hello,
    Proof,
    Side,
    check_secret,
    client_credential,
    parse_frame,
    proof_mac,
    role_keys,
)

__all__ = [
    "AuthError",
    "BadMessage",
    "CloseReason",
    "Connection",
    "ConnectionClosed",
    "DEFAULT_SECRET",
    "Endpoint",
    "FrameTooLarge",
    "HANDSHAKE_CONTEXT",
    "HANDSHAKE_MAX_FRAME",
    "HANDSHAKE_TIMEOUT_DEFAULT",
    "Hello",
    "IdleTimeout",
    "Limits",
    "TLS",
    "MAX_FRAME_DEFAULT",
    "NETWORK_ERRORS",
    "NONCE_SIZE",
    "Proof",
    "SecretError",
    "Side",
    "connect",
    "handshake",
    "load_secret",
    "client_credential",
    "proof_mac",
    "role_keys",
    "serve",
    "use_tls",
]


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly, between two frames."""


class IdleTimeout(ConnectionClosed):
    """Nothing arrived on a served connection for its idle timeout: it is closed."""


@attrs.frozen(kw_only=True)
class Limits:
    """What :func:`serve` allows at once, so no peer can exhaust a process.

    Each refusal closes the new connection at once and is logged
    (``connection_refused``, with the limit reached).  Defaults suit a
    replica or a worker client; docs/security.md lists them.
    """

    #: Connections open at once on one listening port (handshake or not).
    connections: int = 1024
    #: Connections open at once from one remote address.
    per_address: int = 256
    #: Connections in their handshake at once (unauthenticated peers).
    handshakes: int = 128
    #: Connections in their handshake at once from one remote address.
    handshakes_per_address: int = 32
    #: Seconds a served connection may receive nothing before it is closed
    #: (longer than the longest long-poll a client parks, 60 s).
    idle: float = 300.0

    def __attrs_post_init__(self) -> None:
        for name in ("connections", "per_address", "handshakes", "handshakes_per_address"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.idle, bool) or not isinstance(self.idle, (int, float)) or not 0 < self.idle < math.inf:
            raise ValueError(f"Limits.idle must be a positive number of seconds, got {self.idle!r}")


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
# TLS


@attrs.frozen
class TLS:
    """Mutual TLS around every connection: this process's certificate, and the CA its peers' must chain to.

    Build it with :meth:`from_files`; :func:`use_tls` makes it the default of
    every :class:`Endpoint` made afterwards.  Both ends present a certificate
    signed by the CA; the initiator also checks that the responder's
    certificate names the host it dialed (a DNS name or an IP address in its
    subjectAltName).  The challenge-response runs inside the TLS session, so
    credentials still decide the role; TLS adds encryption and integrity.
    """

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def from_files(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]) -> TLS:
        """Contexts from PEM files; raises SecretError naming the file that cannot be used."""
        try:
            server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=os.fspath(ca))
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca))
        except (OSError, ssl.SSLError) as exc:
            raise SecretError(f"cannot use --tls-ca {ca}: {exc}") from None
        for context in (server, client):
            try:
                context.load_cert_chain(os.fspath(cert), os.fspath(key))
            except (OSError, ssl.SSLError) as exc:
                raise SecretError(f"cannot use --tls-cert {cert} with --tls-key {key}: {exc}") from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        server.verify_mode = ssl.CERT_REQUIRED  # mutual: a peer without a certificate of the CA is refused
        return cls(server, client)


_default_tls: TLS | None = None


def use_tls(tls: TLS | None) -> None:
    """Make ``tls`` the default of every :class:`Endpoint` created from now on in this process (None: plain TCP)."""
    global _default_tls
    _default_tls = tls


# --------------------------------------------------------------------------
# Endpoint


def _valid_secret(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
    check_secret(value)


def _valid_max_frame(_inst: Any, _attr: attrs.Attribute, value: Any) -> None:
    check_max_frame(value)


def _valid_seconds(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{attr.name} must be a positive number of seconds, got {value!r}")


@attrs.frozen(kw_only=True)
class Endpoint:
    """This end of the connections it opens (:func:`connect`) or accepts (:func:`serve`).

    One value for everything both take besides the address, so a process
    that does both (a replica) describes itself once.

    Raises TypeError or ValueError at construction for a secret that is not
    non-empty bytes, an invalid role or identity (see
    :class:`~tasksprint.handshake.Hello`), a frame cap out of range or a
    timeout that is not a positive number of seconds.
    """

    #: The cluster secret this end proves it knows (:func:`load_secret`).
    secret: bytes = attrs.field(validator=_valid_secret, repr=False)
    #: The kind of process this is (``"replica"``, ``"client"``, ...).
    role: str
    #: Which one of them this is.
    ident: str
    #: Largest frame body, in bytes, sent or accepted after the handshake.
    max_frame: int = attrs.field(default=MAX_FRAME_DEFAULT, validator=_valid_max_frame)
    #: Seconds to open and authenticate a connection: the TCP connect and
    #: the handshake for :func:`connect`, the handshake for :func:`serve`.
    timeout: float = attrs.field(default=HANDSHAKE_TIMEOUT_DEFAULT, validator=_valid_seconds)
    #: What :func:`serve` allows at once (connections, handshakes, idle time).
    limits: Limits = attrs.field(factory=Limits, validator=attrs.validators.instance_of(Limits))
    #: Mutual TLS around every connection, or None (default: what :func:`use_tls` set).
    tls: TLS | None = attrs.field(factory=lambda: _default_tls)

    def __attrs_post_init__(self) -> None:
        # Secret, role and identity checked now, by the handshake they will
        # open (a client credential cannot be a replica), not per connection.
        Handshake.open(
            secret=self.secret, role=self.role, ident=self.ident, side=Side.INITIATOR, nonce=bytes(NONCE_SIZE)
        )


# --------------------------------------------------------------------------
# Connection


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
    in-process pipes); :func:`connect` and :func:`serve` return connections
    whose handshake is done and whose :attr:`peer` is the peer's
    :class:`Hello`.  Any number of tasks may send at once; one task at a time
    may receive.  ``async with`` closes the connection on exit.
    """

    _stream: trio.abc.Stream
    _max_frame: int = attrs.field(default=MAX_FRAME_DEFAULT, kw_only=True)
    #: Seconds a receive may wait for the peer's next bytes before the
    #: connection counts as idle (:class:`IdleTimeout`); None: forever.
    _idle_timeout: float | None = attrs.field(default=None, kw_only=True)
    #: The peer's Hello once the handshake succeeded, else None.
    peer: Hello | None = attrs.field(default=None, init=False)
    _received: FrameBuffer = attrs.field(factory=FrameBuffer, init=False)
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _receiving: bool = attrs.field(default=False, init=False)
    _state: _ConnectionState = attrs.field(default=_ConnectionState.OPEN, init=False)
    # The rest of a write send_nowait could only hand over in part; the next
    # send writes it before anything else.
    _backlog: bytes = attrs.field(default=b"", init=False)

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

    async def _fill(self) -> None:
        """Read one chunk into the buffer; raise ConnectionClosed / BadMessage at EOF."""
        if self._idle_timeout is None:
            data = await self._stream.receive_some(self._received.read_size())
        else:
            with trio.move_on_after(self._idle_timeout) as scope:
                data = await self._stream.receive_some(self._received.read_size())
            if scope.cancelled_caught:
                raise IdleTimeout(f"nothing received for {self._idle_timeout} s")
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


# --------------------------------------------------------------------------
# Handshake


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


# --------------------------------------------------------------------------
# Client and server

#: Linux's TCP_RTO_MAX_MS socket option (kernel 6.15 and later; Python has no name for it yet).
_TCP_RTO_MAX_MS = 44
#: The cap on a connection's TCP retransmission timeout, in ms: the smallest the kernel allows.
RTO_MAX_MS = 1000


def cap_retransmission_timeout(stream: trio.abc.Stream) -> bool:
    """Cap the TCP retransmission timeout of ``stream`` at :data:`RTO_MAX_MS`, where the kernel allows it.

    A partition that drops packets leaves an established connection
    retransmitting with a timeout that doubles each time (0.2 s, 0.4 s, ...
    up to 120 s): once the partition heals, nothing moves on it until the
    next retransmission, which after a few seconds of partition is seconds
    away, and every heartbeat, vote and client answer on it waits.  Capped,
    a healed connection moves again within a second.  Returns whether the
    cap is set (False on other systems and older kernels, which keep their
    default).
    """
    if not sys.platform.startswith("linux") or not isinstance(stream, trio.SocketStream):
        return False
    try:
        stream.setsockopt(socket.IPPROTO_TCP, _TCP_RTO_MAX_MS, RTO_MAX_MS)
    except OSError:
        return False
    return True


async def connect(
    host: str, port: int, endpoint: Endpoint, *, expect: tuple[str, str | None] | None = ("replica", None)
) -> Connection:
    """Open a TCP connection to ``host:port`` and authenticate both ends.

    Takes the address, this end (its ``timeout`` covers both the TCP
    connect and the handshake) and the role and identity (None: any) the
    peer must claim, by default any replica; ``expect=None`` accepts any.  Returns the open :class:`Connection`, with
    ``peer`` set.  Raises OSError if the connection is refused or fails,
    AuthError if the two ends do not share the secret, trio.TooSlowError on
    timeout, BadMessage if the peer does not speak this protocol.
    """
    with trio.fail_after(endpoint.timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        cap_retransmission_timeout(stream)
        if endpoint.tls is not None:
            stream = trio.SSLStream(stream, endpoint.tls.client, server_hostname=host)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        conn = Connection(stream, max_frame=endpoint.max_frame)
        try:
            await handshake(
                conn,
                secret=endpoint.secret,
                role=endpoint.role,
                ident=endpoint.ident,
                side=Side.INITIATOR,
                expect=expect,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return conn


class CloseReason(enum.Enum):
    """Why :func:`serve` closed a connection (the ``reason`` in its log)."""

    HANDLER_DONE = "handler_done"
    HANDLER_ERROR = "handler_error"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    IDLE = "idle"
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
        case IdleTimeout():
            return CloseReason.IDLE
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
    endpoint: Endpoint,
    *,
    log: Any = None,
    fatal: tuple[type[BaseException], ...] = (),
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept authenticated connections on ``host:port`` until cancelled.

    Takes the per-connection handler, the address to listen on (``host``
    None means every interface; ``port`` 0 picks a free port), this end
    (its ``timeout`` bounds each handshake) and an optional structlog
    logger.  Reports the list of bound ``trio.SocketListener`` through
    ``task_status.started`` (so ``await nursery.start(serve, ...)`` returns
    it and the caller can read the port).  Each connection gets its own
    task: handshake, then ``await handler(conn)``, then close.  A connection
    that fails the handshake, times out in it, sends a bad frame or breaks is
    logged once as ``connection_closed`` with a ``reason`` and closed; other
    connections are not affected.  Any other exception from a handler is a
    bug and propagates, stopping the server.  Raises OSError if it cannot
    listen.  Never returns normally.
    """
    base_log = (log if log is not None else structlog.get_logger(__name__)).bind(
        role=endpoint.role, ident=endpoint.ident
    )

    limits = endpoint.limits
    open_from: collections.Counter[str] = collections.Counter()
    shaking_from: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()

    def admit(host: str) -> str | None:
        """Why a new connection from ``host`` is refused, or None (then it is counted)."""
        if open_from.total() >= limits.connections:
            return f"{limits.connections} connections open"
        if open_from[host] >= limits.per_address:
            return f"{limits.per_address} connections open from {host}"
        if shaking_from.total() >= limits.handshakes:
            return f"{limits.handshakes} handshakes in progress"
        if shaking_from[host] >= limits.handshakes_per_address:
            return f"{limits.handshakes_per_address} handshakes in progress from {host}"
        open_from[host] += 1
        shaking_from[host] += 1
        return None

    async def serve_one(stream: trio.SocketStream) -> None:
        address = _address(stream)
        host = address.rpartition(":")[0] or address
        conn_log = base_log.bind(peer=address)
        why = admit(host)
        if why is not None:
            await trio.aclose_forcefully(stream)
            refused[why] += 1
            if refused[why] & (refused[why] - 1) == 0:  # 1, 2, 4, 8...: every refusal counted, no log flood
                conn_log.warning("connection_refused", limit=why, refused=refused[why])
            return
        try:
            await serve_admitted(stream, host, conn_log)
        finally:
            open_from[host] -= 1
            if not open_from[host]:
                del open_from[host]

    async def serve_admitted(tcp: trio.SocketStream, host: str, conn_log: Any) -> None:
        stream: trio.abc.Stream = tcp
        cap_retransmission_timeout(tcp)
        if endpoint.tls is not None:
            stream = trio.SSLStream(tcp, endpoint.tls.server, server_side=True)
        conn = Connection(stream, max_frame=endpoint.max_frame, idle_timeout=limits.idle)
        reason = CloseReason.HANDLER_DONE
        error = None
        try:
            try:
                with trio.move_on_after(endpoint.timeout):
                    if isinstance(stream, trio.SSLStream):
                        await stream.do_handshake()
                    await handshake(
                        conn, secret=endpoint.secret, role=endpoint.role, ident=endpoint.ident, side=Side.RESPONDER
                    )
            finally:
                shaking_from[host] -= 1
                if not shaking_from[host]:
                    del shaking_from[host]
            if conn.peer is None:
                reason = CloseReason.HANDSHAKE_TIMEOUT
                error = f"no complete handshake within {endpoint.timeout} s"
            else:
                conn_log = conn_log.bind(peer_role=conn.peer.role, peer_ident=conn.peer.ident)
                conn_log.debug("connection_open")
                await handler(conn)
        except Exception as exc:
            found = _reason_for(exc)
            if found is None:
                if isinstance(exc, fatal):
                    raise
                # A bug met while handling one peer's data: that connection
                # closes, logged with its traceback; the process goes on.
                conn_log.error("connection_handler_error", exc_info=exc)
                found = CloseReason.HANDLER_ERROR
            reason, error = found, bounded(_describe(exc))
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
