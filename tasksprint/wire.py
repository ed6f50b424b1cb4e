"""Authenticated frames over trio TCP streams: connections, clients and servers.

Theory of operation
-------------------
Every connection between replicas, clients and the command line carries
length-prefixed CBOR frames (:mod:`tasksprint.framing`), and starts with a
mutual challenge-response on the cluster's shared secret
(:mod:`tasksprint.handshake`).  Both of those are pure; the I/O around
them is in three modules, and this one is the place to start:

- :class:`~tasksprint.connection.Connection` (:mod:`tasksprint.connection`)
  sends frames on a trio stream and feeds what it reads into a
  :class:`~tasksprint.framing.FrameBuffer`;
  :func:`~tasksprint.connection.handshake` runs a
  :class:`~tasksprint.handshake.Handshake` over a fresh connection with a
  random nonce;
- :class:`~tasksprint.endpoint.Endpoint` (:mod:`tasksprint.endpoint`) is
  who this end is, the secret it proves, its frame cap and handshake
  timeout, its :class:`~tasksprint.endpoint.Limits` and its
  :class:`~tasksprint.endpoint.TLS`;
- here, :func:`connect` opens an authenticated connection and :func:`serve`
  accepts them, both for one endpoint.

Anything wrong in what a peer sends raises :class:`~tasksprint.codec.BadMessage`
(or a subclass) and closes that connection; :func:`serve` logs the reason
once and goes on serving everyone else.  Callers that retry elsewhere catch
:data:`NETWORK_ERRORS`.  ``docs/wire.md`` describes the format for authors
of compatible peers.

The names of the connection, endpoint, framing, handshake and secret-file
modules that callers of this module need (``Connection``, ``Endpoint``,
errors, caps, :class:`~tasksprint.handshake.Hello`,
:func:`~tasksprint.credentials.load_secret`) are importable from here too:
``from tasksprint import wire`` is the documented way in (docs/wire.md).
"""

from __future__ import annotations

import collections
import enum
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from tasksprint.codec import BadMessage, bounded
from tasksprint.connection import Connection, ConnectionClosed, IdleTimeout, handshake
from tasksprint.credentials import DEFAULT_SECRET, SecretError, load_secret
from tasksprint.endpoint import TLS, Endpoint, Limits, use_tls
from tasksprint.framing import MAX_FRAME_DEFAULT, FrameTooLarge
from tasksprint.handshake import (
    HANDSHAKE_CONTEXT,
    HANDSHAKE_MAX_FRAME,
    HANDSHAKE_TIMEOUT_DEFAULT,
    NONCE_SIZE,
    AuthError,
    Hello,
    Proof,
    Side,
    client_credential,
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
    whose receive has waited ``limits.idle`` seconds for bytes is closed
    (its receive raises IdleTimeout): one timer for the port checks them all,
    every quarter of that time.  A connection
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
    # Authenticated connections being served, watched for idleness by one timer.
    watched: set[Connection] = set()
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
        conn = Connection(stream, max_frame=endpoint.max_frame)
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
                watched.add(conn)
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
            watched.discard(conn)
            await trio.aclose_forcefully(conn)
        # Logged after the finally so that each connection logs exactly once,
        # and never for a connection whose handler raised a bug.
        if reason.is_problem:
            conn_log.warning("connection_closed", reason=reason.value, error=error)
        else:
            conn_log.debug("connection_closed", reason=reason.value)

    async def close_idle() -> None:
        """Close the connections whose receive has waited ``limits.idle`` seconds (checked every quarter of it)."""
        while True:
            await trio.sleep(limits.idle / 4)
            now = trio.current_time()
            for conn in [c for c in watched if c.waiting_for(now) >= limits.idle]:
                try:
                    await conn.close_idle(limits.idle)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    # Its receive has ended in any case; the server goes on.
                    base_log.debug("idle_close_failed", error=bounded(str(exc)))

    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_idle)
        await trio.serve_listeners(serve_one, listeners, handler_nursery=nursery, task_status=task_status)
