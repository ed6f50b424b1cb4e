"""What a replica does with its clients' connections: commands submitted, questions answered, long-polls parked.

A client (a worker, the command line, a dashboard) sends a replica
commands (:class:`~tasksprint.api.Submit`, :class:`~tasksprint.api.SubmitBlock`)
and questions (:class:`~tasksprint.api.StatusQuery`,
:class:`~tasksprint.api.Query`).  A command must carry the client id the
connection authenticated with, and fit a log entry; it goes to the driver,
which answers it once applied.  A question is answered from the applied
state once a majority is known to share it; a long-poll with nothing new yet
is parked (bounded per connection and per replica) and asked again after the
next change or at its deadline.  Anything else a client sends closes its
connection (:class:`~tasksprint.codec.BadMessage`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio

from tasksprint import codec, wire
from tasksprint.api import (
    Query,
    QueryReply,
    ReplicaStatus,
    Retry,
    StatusQuery,
    Submit,
    SubmitBlock,
    SubmitRefused,
)
from tasksprint.app import NotYet
from tasksprint.config import ReplicaConfig
from tasksprint.driver import ReplicaDriver, RequestKey
from tasksprint.observe import Observer
from tasksprint.outbox import Outbox
from tasksprint.paxos.core import PaxosCore
from tasksprint.paxos.messages import CommandBlock

__all__ = ["ClientRequests"]

# Its lines are the replica's: this is a part of it.
log = structlog.get_logger("tasksprint.replica")

MAX_PARKED = 10_000  # long-poll queries parked at once in one replica (more are answered at once)
MAX_PARKED_PER_CONNECTION = 16  # long-polls one connection may have parked at once
MAX_QUERY_WAIT = 3600  # a longer (or NaN) wait is answered at once
SUBMIT_MARGIN = 64 * 1024  # room in a frame for what a log entry wraps around a command
RESERVED_CLIENT_PREFIX = "__"  # client ids of the replicas' own commands (the coordinator's init)
QUERY_SPAN_NAMES = 16  # distinct query names given spans of their own; the rest share "query.other"


class ClientRequests:
    """A replica's clients' connections (a part of :class:`~tasksprint.replica.Replica`)."""

    __slots__ = ()

    # The replica's fields and members these methods use (see Replica).
    config: ReplicaConfig
    app: Any
    observer: Observer
    driver: ReplicaDriver
    core: PaxosCore
    status: Callable[[], ReplicaStatus]
    _react: Callable[[wire.Connection], None]
    _log: Any
    # Long-polls waiting for a change or for their slot to be confirmed:
    # (mailbox, name, args, deadline).
    _parked: list[tuple[Outbox, str, dict, float]]
    _parked_at: int  # the applied slot the parked long-polls were last asked at
    # Span and counter names per query name (bounded: the names come from clients).
    _query_names: dict[str, tuple[str, str]]

    async def _serve_client(self, conn: wire.Connection) -> None:
        box = Outbox(max_frame=self.config.max_frame, name=f"client {conn.peer.ident[:64] if conn.peer else ''}")
        mine: list[RequestKey] = []
        ident = conn.peer.ident if conn.peer is not None else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.pump, conn)
            try:
                while True:
                    try:
                        msg = await conn.receive()
                    except wire.ConnectionClosed:
                        return
                    if self._handle_client_message(msg, box, mine, ident):
                        self._react(conn)
                    else:
                        box.flush()  # a refusal, a Retry or a status answer it queued
            finally:
                self._parked = [p for p in self._parked if p[0] is not box]
                self.driver.abandon(mine, box)
                self.driver.forget(box)
                nursery.cancel_scope.cancel()

    def _handle_client_message(self, msg: Any, box: Outbox, mine: list, ident: str | None = None) -> bool:
        """Handle one message from a client; True if it gave the core a command.

        ``ident`` is the identity the client authenticated with: its commands
        must carry it as their client id (None: not checked, for a trusted
        in-process stream).
        """
        match msg:
            case Submit(command=cmd) | SubmitBlock(block=cmd):
                if ident is not None and ident.startswith(RESERVED_CLIENT_PREFIX):
                    raise wire.BadMessage(
                        f"client ids starting with {RESERVED_CLIENT_PREFIX!r} are the replicas' own; "
                        f"{ident[:64]!r} may ask questions but not submit commands"
                    )
                if ident is not None and cmd.client_id != ident:
                    raise wire.BadMessage(
                        f"command of client {cmd.client_id[:64]!r} sent on the connection of client {ident[:64]!r}"
                    )
                seq = cmd.first_seq if isinstance(cmd, CommandBlock) else cmd.seq
                if isinstance(cmd, CommandBlock):
                    size = len(cmd.ops)
                else:
                    # The op as every follower will decode it from the log:
                    # canonical CBOR orders map keys, and the client's
                    # encoding need not have (a leader applying the client's
                    # key order would word errors differently and diverge).
                    encoded = codec.encode(cmd.op)
                    size = len(encoded)
                    cmd = attrs.evolve(cmd, op=codec.decode(encoded))
                if size > self.config.max_frame - SUBMIT_MARGIN:
                    log_ = self._log or log
                    log_.warning("submit_refused", client=cmd.client_id[:64], seq=seq, size=size)
                    box.push(
                        SubmitRefused(
                            client_id=cmd.client_id,
                            seq=seq,
                            reason=f"the command is {size} bytes encoded, over the "
                            f"{self.config.max_frame - SUBMIT_MARGIN}-byte limit of a log entry",
                        )
                    )
                    return False
                if isinstance(cmd, CommandBlock):
                    cmd.op_list()  # a block that does not decode closes the connection (BadMessage)
                if self.driver.submit(cmd, box):
                    mine.append(cmd.request_key)
                    if len(mine) > 4096:
                        del mine[:2048]  # the oldest are answered or abandoned by now
                    return True
                box.push(Retry(client_id=cmd.client_id, seq=seq, reason="no leader", leader=self.core.leader_hint))
            case StatusQuery():
                box.push(self.status())
            case Query(name=name, args=args):
                wait = args.get("wait", 0)
                # Compared before any conversion (float(2**1100) raises); a
                # NaN fails the comparison.  The machine's parser refuses
                # the same values with a clear answer.
                if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_QUERY_WAIT:
                    wait = 0
                parked = sum(1 for p in self._parked if p[0] is box)
                if parked >= MAX_PARKED_PER_CONNECTION or len(self._parked) >= MAX_PARKED:
                    wait = 0  # answered now: no more long-polls parked for this connection
                self._answer_query(box, name, args, time.monotonic() + min(float(wait), 60.0))
            case _:
                raise wire.BadMessage(f"unexpected {type(msg).__name__} from a client")
        return False

    def _answer_query(self, box: Outbox, name: str, args: dict, deadline: float) -> None:
        """Answer a question about the state; the answer leaves once a majority is known to share that state.

        Until then it waits in the driver (:meth:`ReplicaDriver.answer
        <tasksprint.driver.ReplicaDriver.answer>`), whatever its deadline: a
        state only this replica reached (a scheduler that is not
        deterministic) must not be acted on.  A replica in the minority
        stops; its clients move on.  A long-poll with nothing new yet
        (``NotYet``) is parked and asked again after the next change.
        """
        span, parked = self._query_span_names(name)
        try:
            with self.observer.span(span):
                result = self.app.query(name, args)
            self.driver.answer(box, QueryReply(name=name, result=result))
        except NotYet:
            self.observer.count(parked)
            if not self._parked:
                self._parked_at = self.driver.applier.applied
            self._parked.append((box, name, args, deadline))
        except Exception as exc:  # a bad query must not take the replica down
            self.driver.answer(box, QueryReply(name=name, error=codec.bounded(f"{type(exc).__name__}: {exc}")))

    def _query_span_names(self, name: str) -> tuple[str, str]:
        """The span and the parked counter of query ``name`` (``query.other`` past the first few names)."""
        names = self._query_names.get(name)
        if names is None:
            base = f"query.{name}" if len(self._query_names) < QUERY_SPAN_NAMES else "query.other"
            names = (base, f"{base}.parked")
            if len(self._query_names) < QUERY_SPAN_NAMES:
                self._query_names[name] = names
        return names

    def _retry_parked(self, now: float) -> None:
        """Ask every parked long-poll again (one past its deadline is answered whatever the state)."""
        parked, self._parked = self._parked, []
        self._parked_at = self.driver.applier.applied
        with self.observer.span("replica.retry_parked"):
            for box, name, args, deadline in parked:
                if deadline <= now:
                    args = {**args, "wait": 0}
                self._answer_query(box, name, args, deadline)
        self.observer.count("query.parked_answered", len(parked) - len(self._parked))
