"""The replica process: runs a :class:`~tasksprint.driver.ReplicaDriver` with trio, storage and the network.

The driver (:mod:`tasksprint.driver`, no I/O) owns the Paxos core, the
state machine behind an :class:`~tasksprint.machine.Applier`, the request
table and the order of writes, sends and applies; this module gives it a
:class:`~tasksprint.storage.Storage`, a disk writer thread, connections and
the clock.  Tasks:

* a listener accepting authenticated connections from peers (role
  ``replica``) and from users (role ``client``);
* one sender per peer, keeping an outgoing connection open and writing
  everything queued for that peer (its :class:`Outbox`) in one batch;
* a ticker feeding the core the clock;
* the driver task, which runs a driver pass (:meth:`ReplicaDriver.run
  <tasksprint.driver.ReplicaDriver.run>`) after ticks and completed writes;
  a receiving task runs the pass itself once its connection has no further
  frame buffered.  One pass takes every Ready, sends the peers' messages
  from the calling task (:meth:`Outbox.flush`), writes the records, applies
  the committed slots and sends the clients their answers (the driver's
  module docstring and docs/architecture.md give the order and why);
* the disk writer (:mod:`tasksprint.disk_writer`, a thread), which makes
  the Readies' records durable in the order they were taken (whatever queued
  up during one fsync goes into the next transaction, so under load one fsync
  covers many Readies); the driver then calls ``advance`` for each, in order,
  releasing the replies that waited.
  The driver does not wait for the disk, except for a small write with
  nothing else in flight, which it does itself right after the pass's sends:
  a follower's vote, or a leader's Accept, at light load.

After each driver pass that applied slots, a replica sends its peers its
running digest of what it applied (see :mod:`tasksprint.digests`).  It
answers questions about its state (views, status, task info) only once a
majority of the replicas is known to share that state; a mismatch means a
non-deterministic state machine (a scheduler hook that is not deterministic):
a replica in the minority stops with a
:class:`~tasksprint.driver.DivergenceError` naming the slots, the majority
goes on and reports the divergence in its :class:`~tasksprint.api.ReplicaStatus`.

The replica's :class:`~tasksprint.observe.Observer` (``observer``, default
:data:`~tasksprint.observe.NULL`) goes to the driver and the applier (see
their docstrings); the replica itself reports ``query.<name>`` spans (with
``query.<name>.parked`` counts for long-polls parked) and
``replica.retry_parked`` (with ``query.parked_answered`` counts).
"""

from __future__ import annotations

import collections
import gc
import os
import random
import signal
import time
from typing import Any

import attrs
import structlog
import trio

from tasksprint import codec, wire
from tasksprint.api import (
    ClientsSeen,
    PeerDigest,
    Query,
    QueryReply,
    ReplicaStatus,
    Retry,
    StatusQuery,
    Submit,
    SubmitBlock,
    SubmitRefused,
)
from tasksprint.app import KVApp, NotYet
from tasksprint.config import ReplicaConfig
from tasksprint.disk_writer import DiskWriter
from tasksprint.driver import DivergenceError, DriverConfig, ReplicaDriver, RequestKey
from tasksprint.framing import encode_frame
from tasksprint.history import SqliteHistory
from tasksprint.hook_watchdog import HookWatchdog
from tasksprint.machine import Applier, BadSnapshot
from tasksprint.observe import NULL, Observer
from tasksprint.paxos.core import PaxosCore, Role
from tasksprint.paxos.messages import (
    PEER_MESSAGES,
    Accept,
    Accepted,
    CatchupReply,
    CommandBlock,
    Forward,
    Heartbeat,
    HeartbeatAck,
    Nack,
    Prepare,
    Promise,
)
from tasksprint.storage import Storage

__all__ = ["DivergenceError", "ListenError", "Outbox", "Replica", "tune_gc"]  # DivergenceError: for the CLI

log = structlog.get_logger("tasksprint.replica")

GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)
OUTBOX_LIMIT = 20_000  # frames queued for one connection before the oldest are dropped
OUTBOX_BYTES = 256 * 1024 * 1024  # bytes queued for one connection before the oldest frames are dropped
MAX_PARKED = 10_000  # long-poll queries parked at once in one replica (more are answered at once)
MAX_PARKED_PER_CONNECTION = 16  # long-polls one connection may have parked at once
MAX_QUERY_WAIT = 3600  # a longer (or NaN) wait is answered at once
SUBMIT_MARGIN = 64 * 1024  # room in a frame for what a log entry wraps around a command
RESERVED_CLIENT_PREFIX = "__"  # client ids of the replicas' own commands (the coordinator's init)
HANDOVER_WAIT = 0.2  # seconds a stopping leader waits for its TimeoutNow to be written
QUERY_SPAN_NAMES = 16  # distinct query names given spans of their own; the rest share "query.other"


class ListenError(Exception):
    """The replica cannot listen on its own address (taken, or not on this machine)."""


def tune_gc() -> None:
    """Garbage-collect less often in a replica process (called once, before it serves).

    A replica allocates a few small objects per command (decoded operations,
    results, session entries), nearly all of them acyclic and short-lived, so
    CPython's default of a young collection every 700 allocations spends
    much of the CPU on collections that find nothing.  Objects alive at start
    (modules, the recovered state) are moved out of the collector's sight.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


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

    The driver calls :meth:`flush` once it has queued what a pass over the
    core produced: on an idle connection the bytes leave at once.  Otherwise
    (a send in progress, a full socket buffer) the pump task writes them, in
    batches, as soon as it can.
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
        self._event.set()

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
        """Write what is queued from the calling task, if the connection is idle; else leave it to the pump."""
        conn = self._conn
        if not self._queue or conn is None:
            return
        if conn.send_frames_nowait(b"".join(self._queue)):
            # What the socket did not take (conn.backlog) goes out with the
            # pump's next send: push has woken it already.
            self._queue.clear()
            self._bytes = 0

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


@attrs.define(eq=False)
class Replica:
    """A replica process. ``await replica.run()`` serves until cancelled."""

    config: ReplicaConfig
    app: Any = attrs.Factory(KVApp)
    _driver: ReplicaDriver | None = None
    _storage: Storage | None = None
    _wake: trio.Event = attrs.Factory(trio.Event)
    _disk: DiskWriter | None = None
    _peer_out: dict[int, Outbox] = attrs.Factory(dict)
    _log: Any = None
    # Long-polls waiting for a change or for their slot to be confirmed:
    # (mailbox, name, args, deadline, the applied slot the answer must be confirmed up to).
    _parked: list[tuple[Outbox, str, dict, float]] = attrs.Factory(list)
    _watchdog: HookWatchdog | None = None
    port: int | None = None
    observer: Observer = attrs.field(default=NULL, kw_only=True)
    #: On SIGTERM, a leader hands over to a follower, then the replica stops
    #: (``tasksprint replica`` sets it; in-process replicas leave signals alone).
    handover_on_sigterm: bool = attrs.field(default=False, kw_only=True)
    # Span and counter names per query name (bounded: the names come from clients).
    _query_names: dict[str, tuple[str, str]] = attrs.Factory(dict)

    # ------------------------------------------------------------------

    @property
    def core(self) -> PaxosCore:
        assert self._driver is not None, "replica not started"
        return self._driver.core

    @property
    def applier(self) -> Applier:
        assert self._driver is not None, "replica not started"
        return self._driver.applier

    @property
    def driver(self) -> ReplicaDriver:
        assert self._driver is not None, "replica not started"
        return self._driver

    def status(self) -> ReplicaStatus:
        core = self.core
        ballot = core.ballot
        times = self.driver.commit_times if core.role is Role.LEADER else []
        fsyncs = self.driver.fsync_times
        return ReplicaStatus(
            rid=self.config.rid,
            role=core.role.value,
            leader=core.leader_hint,
            ballot=str(ballot) if ballot else "",
            commit=core.commit_index,
            applied=self.applier.applied,
            peers=tuple(f"{h}:{p}" for h, p in self.config.peers),
            digest=self.applier.digest.hex(),
            commit_p50_ms=round(times[len(times) // 2] * 1000, 3) if times else None,
            commit_p99_ms=round(times[min(len(times) - 1, len(times) * 99 // 100)] * 1000, 3) if times else None,
            commit_samples=len(times),
            divergence=self.driver.divergence,
            fsync_p50_ms=_ms(fsyncs, 50),
            fsync_p99_ms=_ms(fsyncs, 99),
            fsync_samples=len(fsyncs),
            slow_hook=None if self._watchdog is None else self._watchdog.slow,
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open storage, recover, serve. Raises StorageError (bad data dir) before serving."""
        cfg = self.config
        self._log = log.bind(replica=cfg.rid)
        self._storage = Storage.open(
            cfg.data_dir,
            replica_id=cfg.rid,
            cluster=cfg.cluster,
            fsync=cfg.fsync,
            peers=",".join(f"{h}:{p}" for h, p in cfg.peers),
        )
        history = None
        try:
            attach = getattr(self.app, "attach_history", None)
            if attach is not None:
                history = SqliteHistory.open(cfg.data_dir, fsync=cfg.fsync)
                attach(history)
            state = self._storage.load()
            applier = Applier(self.app.machine, observer=self.observer, max_sessions=cfg.max_sessions)
            if state.snapshot_data is not None:
                # Restored here once to name the file if it is damaged; the
                # driver restores it again as the core's first Ready says.
                try:
                    applier.restore(state.snapshot_data)
                except BadSnapshot as exc:
                    raise self._storage.corrupt(
                        f"its snapshot at slot {state.snapshot_index} is damaged: {exc}"
                    ) from None
            core = PaxosCore.restore(
                cfg.paxos_config,
                cfg.rid,
                state,
                rng=random.Random(int.from_bytes(os.urandom(8), "big")),
                now=time.monotonic(),
            )
            self._log.info(
                "replica_starting",
                data_dir=str(cfg.data_dir),
                snapshot=state.snapshot_index,
                log_rows=len(state.log),
                initialized=state.initialized,
                recovering=core.role is Role.RECOVERING,
            )
            for peer in range(len(cfg.peers)):
                if peer != cfg.rid:
                    self._peer_out[peer] = Outbox(max_frame=cfg.max_frame, name=f"replica {peer}")
            self._disk = DiskWriter(
                self._storage,
                written=self._written,
                failed=self._write_failed,
                name=f"disk-writer-{cfg.rid}",
                fsynced=self._fsynced,
            )
            self._driver = ReplicaDriver(
                core=core,
                applier=applier,
                app=self.app,
                storage=self._storage,
                writer=self._disk,
                peers=self._peer_out,
                wake=self._poke,
                clock=time.monotonic,
                config=DriverConfig(fsync=cfg.fsync, snapshot_every=cfg.snapshot_every, digest_every=cfg.digest_every),
                log=self._log,
                observer=self.observer,
            )
            host, port = cfg.peers[cfg.rid]
            watchdog = HookWatchdog(self.app, cfg.hook_report_after, self._log)
            watchdog.start()
            self._watchdog = watchdog
            async with trio.open_nursery() as nursery:
                listeners = await self._listen(nursery, host, port)
                self.port = _port_of(listeners, port)
                for peer in self._peer_out:
                    nursery.start_soon(self._peer_sender, peer)
                nursery.start_soon(self._ticker)
                nursery.start_soon(self._contact_reporter)
                if self.handover_on_sigterm:
                    nursery.start_soon(self._stop_on_sigterm, nursery.cancel_scope)
                self._wake.set()
                task_status.started(self)
                await self._drive()
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
            if self._disk is not None:
                self._disk.stop()  # what was submitted still reaches the disk
            self._storage.close()
            if history is not None:
                history.close()

    async def _stop_on_sigterm(self, scope: trio.CancelScope) -> None:
        """SIGTERM: a leader asks a follower to take over (no election timeout to wait), then stop."""
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                target = self.core.hand_over()
                if target is not None:
                    self._log.info("leadership_handed_over", to=target)
                    self._run_pass()
                    # Bounded: the message is best effort, an election covers its loss.
                    with trio.move_on_after(HANDOVER_WAIT):
                        while self._peer_out[target].waiting:
                            await trio.sleep(0.005)
                self._log.info("replica_stopping", signal="SIGTERM")
                scope.cancel()
                return

    async def _listen(self, nursery: trio.Nursery, host: str, port: int) -> Any:
        cfg = self.config
        try:
            return await nursery.start(
                lambda task_status: wire.serve(
                    self._handle_connection,
                    host,
                    port,
                    wire.Endpoint(secret=cfg.secret, role="replica", ident=str(cfg.rid), max_frame=cfg.max_frame),
                    log=self._log,
                    # A divergence found while handling a peer's digest stops the replica.
                    fatal=(DivergenceError,),
                    task_status=task_status,
                )
            )
        except OSError as exc:
            raise ListenError(
                f"replica {cfg.rid} cannot listen on {host}:{port} (its entry in --peers): {exc.strerror or exc}"
            ) from None

    # ------------------------------------------------------------------
    # Driving the driver

    def _poke(self) -> None:
        self._wake.set()

    async def _drive(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._run_pass()

    def _react(self, conn: wire.Connection) -> None:
        """A receiving task gave the core a message from ``conn``: handle its consequences.

        Once no further frame is buffered, the receiving task runs the driver
        pass itself, so that a vote, an Accept or an answer is sent one
        scheduling pass sooner than by waking the driver task; with more
        frames buffered it only wakes the driver, so that a burst still makes
        one Ready.
        """
        if conn.frame_ready():
            self._poke()
        else:
            self._run_pass()

    def _run_pass(self) -> None:
        """One driver pass (see :meth:`ReplicaDriver.run`), then the long-polls it may have answered."""
        self.driver.run()
        if self._parked:
            self._retry_parked(time.monotonic())

    def _written(self, groups: int) -> None:
        self.driver.written(groups)

    def _fsynced(self, seconds: float) -> None:
        self.driver.note_fsync(seconds)

    def _write_failed(self, exc: BaseException) -> None:
        self.driver.write_failed(exc)

    async def _ticker(self) -> None:
        while True:
            now = time.monotonic()
            self.driver.tick(now, self.app.tick_data(now), wall=time.time())
            if self._parked and any(p[3] <= now for p in self._parked):
                self._retry_parked(now)
            await trio.sleep(self.config.tick_every)

    async def _contact_reporter(self) -> None:
        """Pass the clients we heard from to the leader, which judges liveness."""
        while True:
            await trio.sleep(0.5)
            cids = [c for c in self.app.drain_contacts() if isinstance(c, int) and 0 <= c < 2**63]
            leader = self.core.leader_hint
            if cids and leader is not None and leader != self.config.rid:
                self._peer_out[leader].push(ClientsSeen(cids=tuple(cids)))

    def _retry_parked(self, now: float) -> None:
        parked, self._parked = self._parked, []
        with self.observer.span("replica.retry_parked"):
            for box, name, args, deadline in parked:
                if deadline <= now:
                    args = {**args, "wait": 0}
                self._answer_query(box, name, args, deadline)
        self.observer.count("query.parked_answered", len(parked) - len(self._parked))

    # ------------------------------------------------------------------
    # Network

    async def _peer_sender(self, peer: int) -> None:
        host, port = self.config.peers[peer]
        box = self._peer_out[peer]
        delay = 0.02
        log_ = self._log.bind(peer=peer)
        while True:
            try:
                conn = await wire.connect(
                    host,
                    port,
                    wire.Endpoint(
                        secret=self.config.secret,
                        role="replica",
                        ident=str(self.config.rid),
                        max_frame=self.config.max_frame,
                    ),
                    expect=("replica", str(peer)),  # the peer must prove it is that replica
                )
            except wire.NETWORK_ERRORS as exc:
                box.clear()  # stale protocol messages are worthless once the peer is back
                await trio.sleep(delay)
                delay = min(delay * 2, 0.5)
                if delay >= 0.5:
                    log_.debug("peer_unreachable", error=str(exc))
                continue
            delay = 0.02
            log_.info("peer_connected")
            try:
                await box.pump(conn)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log_.info("peer_disconnected", error=str(exc))
            finally:
                with trio.CancelScope(shield=True):
                    await conn.aclose()

    async def _handle_connection(self, conn: wire.Connection) -> None:
        hello = conn.peer
        if hello.role == "replica":
            # The handshake proved the replica key (a client's key cannot
            # claim this role); the ident names which replica it is.
            ident = hello.ident
            if not (ident.isascii() and ident.isdigit() and len(ident) <= 3):
                raise wire.BadMessage(f"replica ident {ident[:20]!r} is not a replica number")
            src = int(ident)
            if not 0 <= src < len(self.config.peers) or src == self.config.rid:
                raise wire.BadMessage(f"replica ident {src} is not a peer of replica {self.config.rid}")
            await self._serve_peer(src, conn)
        else:
            await self._serve_client(conn)

    def _check_sender(self, src: int, msg: Any) -> None:
        """Raise BadMessage unless every replica id ``msg`` claims is ``src`` (or, for ballots it answers, a peer).

        A Prepare, an Accept or a Heartbeat speaks for the ballot's replica:
        only that replica may send it.  Any other ballot must name a replica
        of this cluster (a forged id would reach the core's per-peer tables).
        """
        n = len(self.config.peers)
        match msg:
            case Prepare(ballot=b) | Accept(ballot=b) | Heartbeat(ballot=b):
                if b.rid != src:
                    raise wire.BadMessage(
                        f"{type(msg).__name__} for ballot {b} of replica {b.rid} sent by replica {src}"
                    )
            case Promise(ballot=b) | Accepted(ballot=b) | HeartbeatAck(ballot=b):
                if not 0 <= b.rid < n:
                    raise wire.BadMessage(f"{type(msg).__name__} names ballot {b}: no such replica")
            case Nack(ballot=b, promised=p):
                if not 0 <= b.rid < n or not -1 <= p.rid < n:
                    raise wire.BadMessage(f"Nack names ballot {b} or {p}: no such replica")
            case _:
                pass

    async def _serve_peer(self, src: int, conn: wire.Connection) -> None:
        driver = self.driver
        while True:
            try:
                msg = await conn.receive()
            except wire.IdleTimeout:
                return
            except (wire.ConnectionClosed, trio.BrokenResourceError):
                # The peer's process closed (or reset) its end: if it was our
                # leader it has exited, and the election need not wait for a
                # timeout (a partition or a stall closes nothing).
                driver.peer_closed(src)
                return
            if isinstance(msg, PEER_MESSAGES):
                self._check_sender(src, msg)
                driver.step(src, msg)
                self._react(conn)
            elif isinstance(msg, ClientsSeen):
                self.app.merge_contacts(list(msg.cids), time.monotonic())
            elif isinstance(msg, PeerDigest):
                # Sends the answers this confirms.  Parked long-polls wait for a
                # change of state, which a digest is not: they are asked again
                # after the next pass that applies something.
                driver.digest_from(src, msg)
            else:
                raise wire.BadMessage(f"unexpected {type(msg).__name__} from replica {src}")

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


def _port_of(listeners: Any, default: int) -> int:
    try:
        return listeners[0].socket.getsockname()[1]
    except (TypeError, IndexError, AttributeError):
        return default


def _ms(sorted_seconds: list[float], percent: int) -> float | None:
    """The ``percent`` percentile of ``sorted_seconds`` in milliseconds (None if empty)."""
    if not sorted_seconds:
        return None
    return round(sorted_seconds[min(len(sorted_seconds) - 1, len(sorted_seconds) * percent // 100)] * 1000, 3)
