"""A user of the replicated log: submits commands exactly once, whatever fails.

:class:`LogClient` keeps one connection to a replica (the leader when it
knows it).  Every :meth:`LogClient.submit` (or :meth:`LogClient.submit_many`)
gets consecutive sequence numbers; a sender task puts everything submitted
since its last write into :class:`~tasksprint.api.SubmitBlock` messages and
writes them at once, so concurrent submitters share frames, log entries and
fsyncs without waiting for a timer.  A command whose answer does not come is
sent again with the same sequence number, to another replica, after a
``Retry``, a broken connection, or ``attempt_timeout`` seconds.  The replicas
apply each (client id, seq) once, so a resend can never apply a command twice.
Read-only questions go through :class:`~tasksprint.channel.ReplicaChannel`.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import attrs
import structlog
import trio

from tasksprint import codec, wire
from tasksprint.api import BlockResult, ReplicaStatus, Retry, SubmitBlock, SubmitRefused
from tasksprint.channel import ReplicaChannel
from tasksprint.machine import SessionExpired
from tasksprint.paxos.messages import CommandBlock

log = structlog.get_logger("tasksprint.log_client")

MAX_BLOCK = 1000  # commands per SubmitBlock
#: Room in a frame for what a block and a log entry wrap around the operations.
FRAME_MARGIN = 64 * 1024


class Unavailable(Exception):
    """No replica answered within the deadline."""


class CommandRefused(ValueError):
    """A command that can never be applied: it does not encode, or it is too large for a log entry."""


class SessionExpiredError(Exception):
    """The replicas collected this client's session (it was idle while many others were not).

    The commands were not applied by this answer; whether an earlier attempt
    was is unknown.  Start again with a new :class:`LogClient` (a new client id).
    """


@attrs.define(eq=False)
class _Waiter:
    """One submit call waiting for ``remaining`` commands."""

    remaining: int
    done: trio.Event = attrs.Factory(trio.Event)


@attrs.define(eq=False)
class _Submitted:
    """One submitted command, until its result arrives."""

    op: Any
    waiter: _Waiter
    sent_at: float
    result: Any = None
    #: Why the replicas refused it (SubmitRefused), if they did.
    refused: str | None = None
    slot: int = 0
    done: bool = False


@attrs.define(eq=False)
class LogClient:
    """Submit commands to a cluster given as ``[(host, port), ...]``."""

    addrs: list[tuple[str, int]]
    secret: bytes
    client_id: str = attrs.Factory(lambda: os.urandom(8).hex())
    attempt_timeout: float = 0.5
    connect_timeout: float = 1.0
    #: The replicas' frame cap: a block is kept below it, and a command
    #: whose operation alone would not fit is refused at submit.
    max_frame: int = wire.MAX_FRAME_DEFAULT
    _seq: itertools.count = attrs.Factory(lambda: itertools.count(1))
    # Commands not answered yet, in seq order (seqs are inserted increasing).
    _pending: dict[int, _Submitted] = attrs.Factory(dict)
    _unsent: set[int] = attrs.Factory(set)
    _kick: trio.Event = attrs.Factory(trio.Event)
    _resend_scheduled: bool = False
    #: Commands sent again so far (timeouts, Retry, broken connections): for diagnosis.
    resent: int = 0
    # Whether the log applied a command of ours yet (an answer came): until
    # then first_unacked stays 1, so that refused commands (never applied)
    # do not make the replicas take us for a client whose session they
    # collected (see machine.Applier).
    _applied_any: bool = False
    _target: int = 0
    _conn: wire.Connection | None = None
    _conn_lock: trio.Lock = attrs.Factory(trio.Lock)
    # The replica a background connection is being opened to (a leader hint), if any.
    _switching: int | None = None
    _nursery: trio.Nursery | None = None
    _cm: Any = None

    async def __aenter__(self) -> LogClient:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        self._nursery.start_soon(self._sender)
        self._nursery.start_soon(self._watchdog)
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
        (p,) = await self._submit([op], deadline)
        return p.result

    async def submit_with_slot(self, op: Any, *, deadline: float = 30.0) -> tuple[Any, int]:
        """Like :meth:`submit`, also returning the log slot the command was applied in."""
        (p,) = await self._submit([op], deadline)
        return p.result, p.slot

    async def submit_many(self, ops: list, *, deadline: float = 30.0) -> list:
        """Apply every op of ``ops`` exactly once, in order; return their results."""
        if not ops:
            return []
        return [p.result for p in await self._submit(list(ops), deadline)]

    async def _submit(self, ops: list, deadline: float) -> list[_Submitted]:
        if self._nursery is None:
            raise RuntimeError("use LogClient as an async context manager: async with LogClient(...) as c")
        waiter = _Waiter(len(ops))
        now = trio.current_time()
        seqs = []
        for op in ops:
            seq = next(self._seq)
            self._pending[seq] = _Submitted(op, waiter, now)
            self._unsent.add(seq)
            seqs.append(seq)
        alone = len(self._pending) == len(seqs)
        try:
            if alone and self._conn is not None and not self._conn_lock.locked():
                # Nothing else in flight (light load): write from here rather
                # than waking the sender, one scheduling hop less.  Under load
                # the sender gathers every submitter's commands into one write.
                await self._write(self._conn)
            else:
                self._kick.set()
            with trio.move_on_after(deadline):
                await waiter.done.wait()
            refused = next((self._pending[s].refused for s in seqs if self._pending[s].refused), None)
            if refused is not None:
                raise CommandRefused(f"commands {seqs[0]}..{seqs[-1]} of client {self.client_id}: {refused}")
            if any(isinstance(self._pending[s].result, SessionExpired) for s in seqs):
                raise SessionExpiredError(
                    f"commands {seqs[0]}..{seqs[-1]} of client {self.client_id}: the replicas collected this "
                    "client's session; start again under a new client id"
                )
            if waiter.remaining:
                raise Unavailable(
                    f"commands {seqs[0]}..{seqs[-1]} of client {self.client_id} not applied within {deadline}s; "
                    f"replicas tried: {', '.join(f'{h}:{pt}' for h, pt in self.addrs)}"
                )
            return [self._pending[s] for s in seqs]
        finally:
            for s in seqs:
                self._pending.pop(s, None)
                self._unsent.discard(s)

    async def status(self, addr: tuple[str, int] | None = None, *, timeout: float = 2.0) -> ReplicaStatus:
        """Ask one replica (default: the current target) for its status (see :meth:`ReplicaChannel.status`)."""
        return await ReplicaChannel(self.addrs, self.secret, self.client_id).status(
            addr or self.target, timeout=timeout
        )

    async def query(self, name: str, args: dict | None = None, *, addr=None, timeout: float = 5.0) -> Any:
        """Ask one replica's state machine a read-only question (not linearizable).

        A one-question :class:`ReplicaChannel` to ``addr`` (default: the
        current target); raises as :meth:`ReplicaChannel.ask`.
        """
        channel = ReplicaChannel((addr or self.target,), self.secret, self.client_id, connect_timeout=timeout)
        try:
            return await channel.ask(name, args, timeout=timeout)
        finally:
            await channel.aclose()

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

    def _resend_all(self) -> None:
        """Queue every command still waiting to be sent again."""
        again = [s for s, p in self._pending.items() if not p.done]
        self.resent += len(again)
        self._unsent.update(again)
        self._kick.set()

    async def _connection(self) -> wire.Connection | None:
        async with self._conn_lock:
            if self._conn is not None:
                return self._conn
            conn = await self._dial(self.target, "replica_unreachable")
            if conn is None:
                return None
            self._conn = conn
            assert self._nursery is not None
            self._nursery.start_soon(self._reader, conn)
            return conn

    async def _dial(self, addr: tuple[str, int], event: str) -> wire.Connection | None:
        """A connection to replica ``addr``, or None (logged as ``event``) if it cannot be had in time."""
        host, port = addr
        try:
            with trio.fail_after(self.connect_timeout):
                return await wire.connect(
                    host, port, wire.Endpoint(secret=self.secret, role="client", ident=self.client_id)
                )
        except wire.NETWORK_ERRORS as exc:
            log.debug(event, replica=f"{host}:{port}", error=str(exc))
            return None

    async def _sender(self) -> None:
        """Write whatever was submitted (or queued again) since the last write, as blocks."""
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            if not self._unsent:
                continue
            conn = await self._connection()
            if conn is None:
                await trio.sleep(0.05)  # the watchdog moves on to another replica
                self._kick.set()
                continue
            await self._write(conn)

    async def _write(self, conn: wire.Connection) -> None:
        """Send everything in ``_unsent`` on ``conn``; on failure queue it again for the next replica."""
        seqs = sorted(s for s in self._unsent if s in self._pending and not self._pending[s].done)
        self._unsent.clear()
        if not seqs:
            return
        first_unacked = next(iter(self._pending)) if self._applied_any else 1
        now = trio.current_time()
        blocks = []
        for run in consecutive_runs(seqs, MAX_BLOCK):
            for s in run:
                self._pending[s].sent_at = now
            blocks += self._blocks(run, first_unacked)
        try:
            # An idle connection takes the bytes at once, from this task
            # (at light load every write): no trip through trio's send.
            if not conn.send_nowait(blocks):
                await conn.send_many(blocks)
            elif conn.backlog:  # the socket took only a part: the rest now
                await conn.send_many([])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, wire.FrameTooLarge):
            if self._conn is conn:
                self._drop_conn()
                self._rotate()
            self._unsent.update(s for s in seqs if s in self._pending)
            self._kick.set()

    async def _watchdog(self) -> None:
        """Send again, to the next replica, what was not answered within ``attempt_timeout``."""
        while True:
            await trio.sleep(self.attempt_timeout / 4)
            limit = trio.current_time() - self.attempt_timeout
            stale = [s for s, p in self._pending.items() if not p.done and p.sent_at <= limit]
            if stale:
                self.resent += len(stale)
                self._rotate()
                now = trio.current_time()
                for s in stale:
                    self._pending[s].sent_at = now
                self._unsent.update(stale)
                self._kick.set()

    async def _switch_to(self, leader: int, old: wire.Connection) -> None:
        """Connect to replica ``leader`` in the background; then send through it instead of ``old``.

        If the connection fails, or the client moved on from ``old``
        meanwhile (it broke, a timeout rotated), nothing changes.
        """
        try:
            conn = await self._dial(self.addrs[leader], "leader_unreachable")
        finally:
            self._switching = None
        if conn is None:
            return
        assert self._nursery is not None
        if self._conn is not old:
            self._nursery.start_soon(conn.aclose)
            return
        self._target = leader
        self._conn = conn
        self._nursery.start_soon(self._reader, conn)
        # Answers to what was sent on the old connection still come there.
        self._nursery.start_soon(_close_later, old)

    async def _resend_soon(self, delay: float) -> None:
        await trio.sleep(delay)
        self._resend_scheduled = False
        self._resend_all()

    async def _reader(self, conn: wire.Connection) -> None:
        try:
            while True:
                msg = await conn.receive()
                match msg:
                    case BlockResult(first_seq=first, leader=leader):
                        if (
                            leader is not None
                            and 0 <= leader < len(self.addrs)
                            and leader != self._target
                            and self._conn is conn
                            and self._switching is None
                        ):
                            # Talk to the leader directly from now on (one hop
                            # less), once connected to it: until then commands
                            # keep going this way, so a failover's first
                            # commands do not wait for a connection's setup.
                            self._switching = leader
                            self._nursery.start_soon(self._switch_to, leader, conn)
                        self._applied_any = True
                        self._deliver(first, msg.results, msg.slot)
                    case SubmitRefused(seq=seq, reason=reason):
                        self._refuse(seq, reason)
                    case Retry(leader=leader):
                        # Move towards the leader and send everything again shortly.
                        if self._conn is conn:
                            self._rotate(leader)
                        if not self._resend_scheduled:
                            self._resend_scheduled = True
                            self._nursery.start_soon(self._resend_soon, 0.02)
                    case _:
                        log.warning("unexpected_reply", type=type(msg).__name__)
        except wire.NETWORK_ERRORS:
            if self._conn is conn:
                self._drop_conn()
                # Resend everything outstanding to the next replica right away.
                self._rotate()
                self._resend_all()

    def _blocks(self, run: list[int], first_unacked: int) -> list[SubmitBlock]:
        """The commands of ``run`` (consecutive seqs) as blocks under the frame cap.

        One block, encoded once, in the usual case.  A block that does not
        encode or is too large is split in halves until each part encodes
        and fits; a single operation that cannot is refused to its
        submitter (:class:`CommandRefused`) and never sent.
        """
        ops = [self._pending[s].op for s in run]
        limit = self.max_frame - FRAME_MARGIN
        try:
            block = CommandBlock.of(self.client_id, run[0], first_unacked, ops)
            problem = (
                None if len(block.ops) <= limit else f"is {len(block.ops)} bytes encoded, over the {limit}-byte limit"
            )
        except Exception as exc:  # cyclic, too deep, an unregistered class...
            problem = f"cannot be encoded: {codec.bounded(f'{type(exc).__name__}: {exc}')}"
        if problem is None:
            return [SubmitBlock(block=block)]
        if len(run) == 1:
            self._refuse(run[0], f"the operation {problem}")
            return []
        half = len(run) // 2
        return self._blocks(run[:half], first_unacked) + self._blocks(run[half:], first_unacked)

    def _refuse(self, seq: int, reason: str) -> None:
        """The replicas refused the block starting at ``seq``: fail every command of its submit call."""
        p = self._pending.get(seq)
        if p is None or p.done:
            return
        w = p.waiter
        for q in self._pending.values():
            if q.waiter is w and not q.done:
                q.refused, q.done = reason, True
        w.remaining = 0
        w.done.set()

    def _deliver(self, first_seq: int, results: tuple, slot: int) -> None:
        pending = self._pending
        for i, result in enumerate(results):
            p = pending.get(first_seq + i)
            if p is None or p.done:
                continue
            p.result, p.slot, p.done = result, slot, True
            w = p.waiter
            w.remaining -= 1
            if not w.remaining:
                w.done.set()


def consecutive_runs(seqs: list[int], most: int) -> list[list[int]]:
    """Split sorted ``seqs`` into runs of consecutive numbers, each at most ``most`` long."""
    runs: list[list[int]] = []
    for s in seqs:
        if runs and s == runs[-1][-1] + 1 and len(runs[-1]) < most:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


async def _close_later(conn: wire.Connection, delay: float = 5.0) -> None:
    """Close a connection after answers still in flight on it had time to arrive."""
    await trio.sleep(delay)
    await conn.aclose()
