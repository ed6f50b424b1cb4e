"""A user of the replicated log: submits commands exactly once, whatever fails.

:class:`LogClient` keeps one connection to a replica (the leader when it
knows it), pipelines any number of concurrent :meth:`LogClient.submit` calls
over it, and resends a command with the same sequence number to another
replica when the answer does not come: after a ``Retry``, a broken
connection, or ``attempt_timeout`` seconds.  The replicas apply each
(client id, seq) once, so a resend can never apply a command twice.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import attrs
import structlog
import trio

from tasksprint import wire
from tasksprint.api import Query, QueryReply, ReplicaStatus, Result, Retry, StatusQuery, Submit
from tasksprint.paxos.messages import Command

log = structlog.get_logger("tasksprint.log_client")


class Unavailable(Exception):
    """No replica answered within the deadline."""


@attrs.define(eq=False)
class _Pending:
    cmd: Command
    done: trio.Event = attrs.Factory(trio.Event)
    result: Any = None
    slot: int = 0


@attrs.define(eq=False)
class LogClient:
    """Submit commands to a cluster given as ``[(host, port), ...]``."""

    addrs: list[tuple[str, int]]
    secret: bytes
    client_id: str = attrs.Factory(lambda: os.urandom(8).hex())
    attempt_timeout: float = 0.5
    connect_timeout: float = 1.0
    _seq: itertools.count = attrs.Factory(lambda: itertools.count(1))
    _pending: dict[int, _Pending] = attrs.Factory(dict)
    _target: int = 0
    _conn: wire.Connection | None = None
    _conn_lock: trio.Lock = attrs.Factory(trio.Lock)
    _nursery: trio.Nursery | None = None
    _cm: Any = None

    async def __aenter__(self) -> LogClient:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        if self._conn is not None:
            with trio.CancelScope(shield=True):
                await self._conn.aclose()
        return await self._cm.__aexit__(*exc)

    @property
    def target(self) -> tuple[str, int]:
        return self.addrs[self._target]

    async def submit(self, op: Any, *, deadline: float = 30.0) -> Any:
        """Apply ``op`` exactly once and return its result. Raises Unavailable after ``deadline`` s."""
        result, _slot = await self.submit_with_slot(op, deadline=deadline)
        return result

    async def submit_with_slot(self, op: Any, *, deadline: float = 30.0) -> tuple[Any, int]:
        seq = next(self._seq)
        first = min(self._pending, default=seq)
        p = _Pending(Command(client_id=self.client_id, seq=seq, first_unacked=min(first, seq), op=op))
        self._pending[seq] = p
        try:
            with trio.move_on_after(deadline) as scope:
                while not p.done.is_set():
                    await self._send(p)
                    with trio.move_on_after(self.attempt_timeout):
                        await p.done.wait()
                    if not p.done.is_set():
                        self._rotate()
            if scope.cancelled_caught:
                raise Unavailable(
                    f"command {seq} of client {self.client_id} not applied within {deadline}s; "
                    f"replicas tried: {', '.join(f'{h}:{pt}' for h, pt in self.addrs)}"
                )
            return p.result, p.slot
        finally:
            del self._pending[seq]

    async def status(self, addr: tuple[str, int] | None = None, *, timeout: float = 2.0) -> ReplicaStatus:
        """Ask one replica (default: the current target) for its status on a fresh connection."""
        host, port = addr or self.target
        with trio.fail_after(timeout):
            conn = await wire.connect(host, port, secret=self.secret, role="client", ident=self.client_id)
            try:
                await conn.send(StatusQuery())
                reply = await conn.receive()
            finally:
                await conn.aclose()
        if not isinstance(reply, ReplicaStatus):
            raise wire.BadMessage(f"expected ReplicaStatus, got {type(reply).__name__}")
        return reply

    async def query(self, name: str, args: dict | None = None, *, addr=None, timeout: float = 5.0) -> Any:
        """Ask a replica's state machine a read-only question (not linearizable)."""
        host, port = addr or self.target
        with trio.fail_after(timeout):
            conn = await wire.connect(host, port, secret=self.secret, role="client", ident=self.client_id)
            try:
                await conn.send(Query(name=name, args=args or {}))
                reply = await conn.receive()
            finally:
                await conn.aclose()
        if not isinstance(reply, QueryReply):
            raise wire.BadMessage(f"expected QueryReply, got {type(reply).__name__}")
        if reply.error:
            raise RuntimeError(f"query {name} failed on {host}:{port}: {reply.error}")
        return reply.result

    # ------------------------------------------------------------------

    def _rotate(self, leader: int | None = None) -> None:
        if leader is not None and 0 <= leader < len(self.addrs):
            new = leader
        else:
            new = (self._target + 1) % len(self.addrs)
        if new != self._target or leader is None:
            self._target = new
            self._drop_conn()

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._nursery is not None:
            self._nursery.start_soon(conn.aclose)

    async def _connection(self) -> wire.Connection | None:
        async with self._conn_lock:
            if self._conn is not None:
                return self._conn
            host, port = self.target
            try:
                with trio.fail_after(self.connect_timeout):
                    conn = await wire.connect(host, port, secret=self.secret, role="client", ident=self.client_id)
            except wire.NETWORK_ERRORS as exc:
                log.debug("replica_unreachable", replica=f"{host}:{port}", error=str(exc))
                return None
            self._conn = conn
            assert self._nursery is not None
            self._nursery.start_soon(self._reader, conn)
            return conn

    async def _send(self, p: _Pending) -> None:
        conn = await self._connection()
        if conn is None:
            await trio.sleep(0.05)
            return
        try:
            await conn.send(Submit(command=p.cmd))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if self._conn is conn:
                self._drop_conn()

    async def _reader(self, conn: wire.Connection) -> None:
        try:
            while True:
                msg = await conn.receive()
                match msg:
                    case Result(seq=seq, leader=leader):
                        if (
                            leader is not None
                            and 0 <= leader < len(self.addrs)
                            and leader != self._target
                            and self._conn is conn
                        ):
                            # Talk to the leader directly from now on: one hop less.
                            self._target = leader
                            self._conn = None
                            self._nursery.start_soon(_close_later, conn)
                        p = self._pending.get(seq)
                        if p is not None and not p.done.is_set():
                            p.result, p.slot = msg.result, msg.slot
                            p.done.set()
                    case Retry(seq=seq, leader=leader):
                        # Move towards the leader; the submitter resends on its next attempt.
                        if self._conn is conn:
                            self._rotate(leader)
                        await trio.sleep(0.02)
                        p = self._pending.get(seq)
                        if p is not None and not p.done.is_set():
                            self._nursery.start_soon(self._send, p)
                    case _:
                        log.warning("unexpected_reply", type=type(msg).__name__)
        except wire.NETWORK_ERRORS:
            if self._conn is conn:
                self._drop_conn()
                # Resend everything outstanding to the next replica right away.
                self._rotate()
                for p in list(self._pending.values()):
                    if not p.done.is_set():
                        self._nursery.start_soon(self._send, p)


async def _close_later(conn: wire.Connection, delay: float = 5.0) -> None:
    """Close a connection after answers still in flight on it had time to arrive."""
    await trio.sleep(delay)
    await conn.aclose()
