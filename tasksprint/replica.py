"""The replica process: runs a :class:`~tasksprint.driver.ReplicaDriver` with trio, storage and the network.

The driver (:mod:`tasksprint.driver`, no I/O) owns the Paxos core, the
state machine behind an :class:`~tasksprint.machine.Applier`, the request
table and the order of writes, sends and applies; this module gives it a
:class:`~tasksprint.storage.Storage`, a disk writer thread, connections and
the clock.  Tasks:

* a listener accepting authenticated connections from peers (role
  ``replica``) and from users (role ``client``; what a replica does with
  their commands and questions is :mod:`tasksprint.replica_clients`);
* one sender per peer, keeping an outgoing connection open and writing
  everything queued for that peer (its :class:`~tasksprint.outbox.Outbox`)
  in one batch;
* a ticker feeding the core the clock: a leader's when its core has
  something due (``PaxosCore.tick_due``: a heartbeat, a TICK entry, a commit
  notice), but at least every ``follower_tick_every``; a candidate's every
  ``tick_every``; a follower's every ``follower_tick_every``;
* the driver task, which runs a driver pass (:meth:`ReplicaDriver.run
  <tasksprint.driver.ReplicaDriver.run>`) after ticks and completed writes;
  a receiving task runs the pass itself once its connection has no further
  frame buffered.  One pass takes every Ready, sends the peers' messages
  from the calling task (:meth:`~tasksprint.outbox.Outbox.flush`), writes
  the records, applies the committed slots and sends the clients their answers (the driver's
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

import gc
import os
import random
import signal
import time
from typing import Any

import attrs
import structlog
import trio

from tasksprint import wire
from tasksprint.api import ClientsSeen, PeerDigest, ReplicaStatus
from tasksprint.app import KVApp
from tasksprint.config import ReplicaConfig
from tasksprint.disk_writer import DiskWriter
from tasksprint.driver import DivergenceError, DriverConfig, ReplicaDriver
from tasksprint.history import SqliteHistory
from tasksprint.hook_watchdog import HookWatchdog
from tasksprint.machine import Applier, BadSnapshot
from tasksprint.observe import NULL, Observer
from tasksprint.outbox import Outbox
from tasksprint.paxos.core import PaxosCore, Role
from tasksprint.paxos.messages import (
    PEER_MESSAGES,
    Accept,
    Accepted,
    Heartbeat,
    HeartbeatAck,
    Nack,
    Prepare,
    Promise,
)
from tasksprint.replica_clients import ClientRequests
from tasksprint.storage import Storage

__all__ = ["DivergenceError", "ListenError", "Replica", "tune_gc"]  # DivergenceError: for the CLI

log = structlog.get_logger("tasksprint.replica")

GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)
HANDOVER_WAIT = 0.2  # seconds a stopping leader waits for its TimeoutNow to be written


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


@attrs.define(eq=False)
class Replica(ClientRequests):
    """A replica process. ``await replica.run()`` serves until cancelled."""

    config: ReplicaConfig
    app: Any = attrs.Factory(KVApp)
    _driver: ReplicaDriver | None = None
    _storage: Storage | None = None
    _wake: trio.Event = attrs.Factory(trio.Event)
    _disk: DiskWriter | None = None
    _peer_out: dict[int, Outbox] = attrs.Factory(dict)
    # Set when replica i connects to us: it listens, so our connection to it need not wait out its backoff.
    _peer_up: dict[int, trio.Event] = attrs.Factory(dict)
    _log: Any = None
    # Long-polls waiting for a change of state: (mailbox, name, args, deadline).
    _parked: list[tuple[Outbox, str, dict, float]] = attrs.Factory(list)
    # The applied slot they were last asked at (asked again once it moves).
    _parked_at: int = -1
    # The ticker's sleep, while it sleeps (a pass may bring its end forward).
    _tick_scope: trio.CancelScope | None = None
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
        """One driver pass (see :meth:`ReplicaDriver.run`), then the long-polls it may have answered.

        Parked long-polls are asked again only if the pass applied something:
        their answer is a function of the applied state (most passes, a
        peer's message or a tick, apply nothing).
        """
        self.driver.run()
        if self._parked and self.applier.applied != self._parked_at:
            self._retry_parked(time.monotonic())
        self._tick_sooner()

    def _written(self, groups: int) -> None:
        self.driver.written(groups)

    def _fsynced(self, seconds: float) -> None:
        self.driver.note_fsync(seconds)

    def _write_failed(self, exc: BaseException) -> None:
        self.driver.write_failed(exc)

    def _tick_wait(self) -> float:
        """Seconds until the next tick: when a leader's core has something due (between
        ``tick_every`` and ``follower_tick_every``), every ``tick_every`` for a candidate,
        every ``follower_tick_every`` otherwise.  Each tick wakes the process (a timer,
        about 0.1 ms of CPU here), so a leader does not wake when nothing is due."""
        cfg = self.config
        core = self.core
        if core.role is Role.LEADER:
            return min(max(core.tick_due() - time.monotonic(), cfg.tick_every), cfg.follower_tick_every)
        return cfg.tick_every if core.role is Role.CANDIDATE else cfg.follower_tick_every

    def _tick_sooner(self) -> None:
        """After a pass: bring the next tick forward if the pass made something due sooner
        (a leader's commit notice, due a ``tick_every`` after the commit)."""
        scope = self._tick_scope
        if scope is not None and self.core.role is Role.LEADER:
            at = trio.current_time() + self._tick_wait()
            if at < scope.deadline:
                scope.deadline = at

    async def _ticker(self) -> None:
        while True:
            now = time.monotonic()
            self.driver.tick(now, self.app.tick_data(now), wall=time.time())
            if self._parked and any(p[3] <= now for p in self._parked):
                self._retry_parked(now)
            with trio.move_on_after(self._tick_wait()) as self._tick_scope:
                await trio.sleep_forever()
            self._tick_scope = None

    async def _contact_reporter(self) -> None:
        """Pass the clients we heard from to the leader, which judges liveness."""
        while True:
            await trio.sleep(0.5)
            cids = [c for c in self.app.drain_contacts() if isinstance(c, int) and 0 <= c < 2**63]
            leader = self.core.leader_hint
            if cids and leader is not None and leader != self.config.rid:
                box = self._peer_out[leader]
                box.push(ClientsSeen(cids=tuple(cids)))
                box.flush()

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
                up = self._peer_up.setdefault(peer, trio.Event())
                with trio.move_on_after(delay):
                    await up.wait()  # the peer connected to us: it listens now (at start-up, at once)
                self._peer_up[peer] = trio.Event()
                delay = min(delay * 2, 0.5)
                if delay >= 0.5:
                    log_.debug("peer_unreachable", error=str(exc))
                continue
            delay = 0.02
            log_.info("peer_connected")
            self.driver.peer_connected(peer)
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
            self._peer_up.setdefault(src, trio.Event()).set()
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
