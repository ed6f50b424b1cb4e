"""One way to ask the replicas something: :class:`ReplicaChannel`.

Theory of operation
-------------------
Read-only questions (a client's view long-poll, the computation's status,
one task's info) and a replica's own :class:`~tasksprint.api.ReplicaStatus`
are not logged: any replica answers from its applied state.  A
:class:`ReplicaChannel` knows every replica's address, keeps one
authenticated connection to the replica it currently asks, and moves to the
next replica (round robin) when that one fails or stays silent; callers that
learn who leads can :meth:`ReplicaChannel.prefer` it.  Questions are the
typed requests of :mod:`tasksprint.coordinator.ops`; every answer is checked
to be the message expected (a ``view`` a
:class:`~tasksprint.coordinator.replies.ClientView`, a ``status`` a
:class:`~tasksprint.coordinator.replies.ComputationStatus`, an ``info`` a
:class:`~tasksprint.coordinator.replies.TaskInfo` or None; anything else is a
:class:`~tasksprint.wire.BadMessage`), and a refusal of the question arrives
as :class:`QueryRefused` with its error code, never as text to match.

Commands that change the state go through the log instead
(:class:`~tasksprint.log_client.LogClient`).
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import trio

from tasksprint import wire
from tasksprint.api import Query, QueryReply, ReplicaStatus, StatusQuery
from tasksprint.coordinator.ops import Refused, Request
from tasksprint.coordinator.replies import ClientView, ComputationStatus, TaskGraph, TaskInfo

__all__ = ["ASK_ERRORS", "QueryRefused", "ReplicaChannel", "Unreachable"]


class QueryRefused(RuntimeError):
    """A replica refused the question (unknown or malformed, or no coordinator runs there).

    ``code`` is the :class:`~tasksprint.coordinator.ops.ErrorCode` value when
    the coordinator refused it, None when the replica itself did.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(Exception):
    """No replica answered."""


#: What a failed :meth:`ReplicaChannel.ask` raises: the caller may try again.
ASK_ERRORS = (*wire.NETWORK_ERRORS, QueryRefused)

#: The answer each coordinator question must get.
REPLY_TYPES: dict[str, tuple[type, ...]] = {
    "view": (ClientView,),
    "status": (ComputationStatus,),
    "info": (TaskInfo, type(None)),
    "graph": (TaskGraph,),
}


@attrs.define(eq=False)
class ReplicaChannel:
    """Asks the replicas at ``addrs``, one connection at a time, moving on when one fails."""

    addrs: tuple[tuple[str, int], ...] = attrs.field(converter=tuple)
    secret: bytes
    ident: str = attrs.Factory(lambda: f"ask-{os.urandom(4).hex()}")
    connect_timeout: float = 2.0
    _i: int = 0
    _conn: wire.Connection | None = None
    _failures: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.addrs:
            raise ValueError("a replica channel needs at least one replica address")

    @property
    def failures(self) -> int:
        """Questions that failed in a row (0 after an answer)."""
        return self._failures

    @property
    def current(self) -> tuple[str, int]:
        """The address of the replica asked next."""
        return self.addrs[self._i]

    async def prefer(self, index: int) -> None:
        """Ask replica ``index`` (e.g. the leader, the most up to date) from now on."""
        if 0 <= index < len(self.addrs) and index != self._i:
            await self._drop()
            self._i = index

    async def move_on(self) -> None:
        """Ask the next replica from now on."""
        await self._next()

    async def ask(self, name: str, args: dict[str, Any] | None = None, *, timeout: float = 5.0) -> Any:
        """Ask the current replica question ``name``; return its answer.

        Raises one of :data:`ASK_ERRORS` on failure; a network failure moves
        the channel to the next replica, so asking again asks another.
        """
        if self._conn is None:
            host, port = self.current
            try:
                with trio.fail_after(self.connect_timeout):
                    self._conn = await wire.connect(
                        host, port, wire.Endpoint(secret=self.secret, role="client", ident=self.ident)
                    )
            except BaseException:
                await self._next()
                raise
        conn = self._conn
        try:
            with trio.fail_after(timeout):
                await conn.send(Query(name=name, args=args or {}))
                reply = await conn.receive()
            if not isinstance(reply, QueryReply):
                raise wire.BadMessage(f"expected QueryReply, got {type(reply).__name__}")
        except BaseException:
            await self._next()
            raise
        host, port = self.current
        if reply.error:
            raise QueryRefused(f"query {name} failed on {host}:{port}: {reply.error}")
        if isinstance(reply.result, Refused):
            raise QueryRefused(f"query {name} refused by {host}:{port}: {reply.result.error}", reply.result.code)
        expected = REPLY_TYPES.get(name)
        if expected is not None and not isinstance(reply.result, expected):
            await self._next()
            raise wire.BadMessage(
                f"query {name}: {host}:{port} answered a {type(reply.result).__name__}, "
                f"expected {' or '.join(t.__name__ for t in expected)}"
            )
        self._failures = 0
        return reply.result

    async def request(self, request: Request, *, timeout: float = 5.0) -> Any:
        """Ask a typed question (see :meth:`ask`)."""
        return await self.ask(request.NAME, request.args(), timeout=timeout)

    async def ask_any(self, request: Request, *, timeout: float = 5.0) -> Any:
        """Ask each replica in turn until one answers; raises :class:`Unreachable` if none does."""
        errors = []
        for _ in self.addrs:
            try:
                return await self.request(request, timeout=timeout)
            except ASK_ERRORS as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if isinstance(exc, QueryRefused):
                    await self._next()
        raise Unreachable(f"no replica answered {request.NAME}: {'; '.join(errors)}")

    async def status(self, addr: tuple[str, int] | None = None, *, timeout: float = 2.0) -> ReplicaStatus:
        """Replica ``addr``'s (default: the current one's) own status, on a connection of its own."""
        host, port = addr or self.current
        with trio.fail_after(timeout):
            conn = await wire.connect(host, port, wire.Endpoint(secret=self.secret, role="client", ident=self.ident))
            try:
                await conn.send(StatusQuery())
                reply = await conn.receive()
            finally:
                await conn.aclose()
        if not isinstance(reply, ReplicaStatus):
            raise wire.BadMessage(f"expected ReplicaStatus, got {type(reply).__name__}")
        return reply

    async def aclose(self) -> None:
        """Close the open connection, if any."""
        await self._drop()

    async def _next(self) -> None:
        await self._drop()
        self._i = (self._i + 1) % len(self.addrs)
        self._failures += 1

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()
