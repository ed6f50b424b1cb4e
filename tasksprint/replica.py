"""The replica process: drives the Paxos core with trio, storage and the network.

One replica = one :class:`~tasksprint.paxos.core.PaxosCore` + one
:class:`~tasksprint.storage.Storage` + one state machine behind an
:class:`~tasksprint.machine.Applier`.  Tasks:

* a listener accepting authenticated connections from peers (role
  ``replica``) and from users (role ``client``);
* one sender per peer, keeping an outgoing connection open and writing
  everything queued for that peer in one batch;
* a ticker feeding the core the clock;
* the driver code (:meth:`Replica._run_core`), the only place the core's
  output is handled, run by the driver task after ticks and completed writes
  and by a receiving task once its connection has no further frame buffered.
  One pass takes every Ready, sends the peers' messages from the calling task
  (:meth:`Outbox.flush`), writes the records, applies the committed slots and
  sends the clients their answers (docs/architecture.md gives the order and
  why);
* the disk writer (:mod:`tasksprint.disk_writer`, a thread), which makes
  the Readies' records durable in the order they were taken (whatever queued
  up during one fsync goes into the next transaction, so under load one fsync
  covers many Readies); the driver then calls ``advance`` for each, in order,
  releasing the replies that waited.
  The driver does not wait for the disk, except for a small write with
  nothing else in flight, which it does itself right after the pass's sends:
  a follower's vote, or a leader's Accept, at light load.

Replicas compare a running digest of what they applied every
``digest_every`` slots; a mismatch means a nondeterministic state machine (a
scheduler hook that is not deterministic) and stops the replica with an error
naming the slot.
"""

from __future__ import annotations

import collections
import gc
import os
import random
import time
from typing import Any

import attrs
import structlog
import trio

from tasksprint import codec, wire
from tasksprint.api import (
    BlockResult,
    ClientsSeen,
    PeerDigest,
    Query,
    QueryReply,
    ReplicaStatus,
    Result,
    Retry,
    StatusQuery,
    Submit,
    SubmitBlock,
)
from tasksprint.app import KVApp, NotYet
from tasksprint.config import ReplicaConfig
from tasksprint.machine import DUPLICATE, Applier
from tasksprint.paxos.core import PaxosCore, Ready, Role
from tasksprint.paxos.messages import PEER_MESSAGES, Command, CommandBlock
from tasksprint.disk_writer import DiskWriter
from tasksprint.storage import Storage

log = structlog.get_logger("tasksprint.replica")

GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)
COMMIT_SAMPLES = 2000  # latest leader-side commit latencies kept for ReplicaStatus
OUTBOX_LIMIT = 20_000  # messages queued for one peer before the oldest are dropped

Key = tuple[str, str, int]  # (kind, client id, seq): what a client waits for (``request_key``)


class DivergenceError(Exception):
    """Two replicas applied the same slots and reached different states."""


class ListenError(Exception):
    """The replica cannot listen on its own address (taken, or not on this machine)."""


SMALL_WRITE = 16 * 1024  # bytes of values up to which a synced write may stay in the loop


def _small(records) -> bool:
    """Whether ``records`` carry little data (a Batch keeps its encoding, so this costs nothing extra)."""
    size = 0
    for r in records:
        value = getattr(r, "value", None)
        if value is not None:
            size += len(codec.encode(value))
        data = getattr(r, "data", None)  # a snapshot
        if data is not None:
            size += len(data)
        if size > SMALL_WRITE:
            return False
    return True


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
class Outbox:
    """Messages waiting for one connection.

    The driver calls :meth:`flush` once it has queued what a pass over the
    core produced: on an idle connection the bytes leave at once.  Otherwise
    (a send in progress, a full socket buffer) the pump task writes them, in
    batches, as soon as it can.
    """

    _queue: collections.deque = attrs.Factory(collections.deque)
    _event: trio.Event = attrs.Factory(trio.Event)
    _conn: wire.Connection | None = None  # while a pump runs
    limit: int = OUTBOX_LIMIT

    def push(self, msg: Any) -> None:
        if len(self._queue) >= self.limit:
            self._queue.popleft()  # the protocol tolerates loss; memory must stay bounded
        self._queue.append(msg)
        self._event.set()

    def clear(self) -> None:
        self._queue.clear()

    def flush(self) -> None:
        """Write what is queued from the calling task, if the connection is idle; else leave it to the pump."""
        conn = self._conn
        if not self._queue or conn is None:
            return
        try:
            sent = conn.send_nowait(self._queue)
        except (wire.FrameTooLarge, TypeError):
            return  # the pump meets the same error and reports it where sends fail
        if sent:
            # What the socket did not take (conn.backlog) goes out with the
            # pump's next send: push has woken it already.
            self._queue.clear()

    async def pump(self, conn: wire.Connection) -> None:
        """Write queued messages to ``conn`` until it fails or the task is cancelled."""
        self._conn = conn
        try:
            while True:
                if not self._queue and not conn.backlog:
                    self._event = trio.Event()
                    await self._event.wait()
                batch = list(self._queue)
                self._queue.clear()
                await conn.send_many(batch)
        finally:
            self._conn = None


@attrs.define(eq=False)
class Replica:
    """A replica process. ``await replica.run()`` serves until cancelled."""

    config: ReplicaConfig
    app: Any = attrs.Factory(KVApp)
    _core: PaxosCore | None = None
    _applier: Applier | None = None
    _storage: Storage | None = None
    _wake: trio.Event = attrs.Factory(trio.Event)
    # Readies handed to the disk writer and not yet durable, oldest first.
    _unwritten: collections.deque = attrs.Factory(collections.deque)
    _disk: DiskWriter | None = None
    _write_error: BaseException | None = None
    _peer_out: dict[int, Outbox] = attrs.Factory(dict)
    _waiting: dict[Key, list[Outbox]] = attrs.Factory(dict)
    # The commands behind _waiting, to propose again when the leader changes:
    # one forwarded to a leader that died (or was not leader yet) is lost.
    _commands: dict[Key, Command | CommandBlock] = attrs.Factory(dict)
    _digests: collections.OrderedDict = attrs.Factory(collections.OrderedDict)
    _peer_digests: collections.OrderedDict = attrs.Factory(collections.OrderedDict)
    _since_snapshot: int = 0
    _log: Any = None
    _last_role: tuple | None = None
    _parked: list[tuple[Outbox, str, dict, float]] = attrs.Factory(list)
    _answered: list[Outbox] = attrs.Factory(list)  # client boxes given answers in this pass
    # Leader only: when each command submitted here arrived, and how long the
    # last ones took to be answered (for ReplicaStatus).
    _arrived: dict[Key, float] = attrs.Factory(dict)
    _commit_times: collections.deque = attrs.Factory(lambda: collections.deque(maxlen=COMMIT_SAMPLES))
    port: int | None = None

    # ------------------------------------------------------------------

    @property
    def core(self) -> PaxosCore:
        assert self._core is not None, "replica not started"
        return self._core

    @property
    def applier(self) -> Applier:
        assert self._applier is not None, "replica not started"
        return self._applier

    def status(self) -> ReplicaStatus:
        core = self.core
        ballot = core.ballot
        times = sorted(self._commit_times) if core.role is Role.LEADER else []
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
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open storage, recover, serve. Raises StorageError (bad data dir) before serving."""
        cfg = self.config
        self._log = log.bind(replica=cfg.rid)
        self._storage = Storage.open(cfg.data_dir, replica_id=cfg.rid, cluster=cfg.cluster, fsync=cfg.fsync)
        try:
            state = self._storage.load()
            self._applier = Applier(self.app.machine)
            self._core = PaxosCore.restore(
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
                recovering=self._core.role is Role.RECOVERING,
            )
            self._disk = DiskWriter(
                self._storage, written=self._written, failed=self._write_failed, name=f"disk-writer-{cfg.rid}"
            )
            host, port = cfg.peers[cfg.rid]
            async with trio.open_nursery() as nursery:
                listeners = await self._listen(nursery, host, port)
                self.port = _port_of(listeners, port)
                for peer in range(len(cfg.peers)):
                    if peer != cfg.rid:
                        self._peer_out[peer] = Outbox()
                        nursery.start_soon(self._peer_sender, peer)
                nursery.start_soon(self._ticker)
                nursery.start_soon(self._contact_reporter)
                self._wake.set()
                task_status.started(self)
                await self._drive()
        finally:
            if self._disk is not None:
                self._disk.stop()  # what was submitted still reaches the disk
            self._storage.close()

    async def _listen(self, nursery: trio.Nursery, host: str, port: int) -> Any:
        cfg = self.config
        try:
            return await nursery.start(
                lambda task_status: wire.serve(
                    self._handle_connection,
                    host,
                    port,
                    wire.Endpoint(secret=cfg.secret, role="replica", ident=str(cfg.rid), max_frame=cfg.max_frame),
                    task_status=task_status,
                )
            )
        except OSError as exc:
            raise ListenError(
                f"replica {cfg.rid} cannot listen on {host}:{port} (its entry in --peers): {exc.strerror or exc}"
            ) from None

    # ------------------------------------------------------------------
    # Driver

    def _poke(self) -> None:
        self._wake.set()

    async def _drive(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._run_core()

    def _react(self, conn: wire.Connection) -> None:
        """A receiving task gave the core a message from ``conn``: handle its consequences.

        Once no further frame is buffered, the receiving task runs the driver
        code itself, so that a vote, an Accept or an answer is sent one
        scheduling pass sooner than by waking the driver task; with more
        frames buffered it only wakes the driver, so that a burst still makes
        one Ready.
        """
        if conn.frame_ready():
            self._poke()
        else:
            self._run_core()

    def _run_core(self) -> None:
        """Handle what the core has for the driver: the driver loop's body (see also _react)."""
        core = self.core
        if self._write_error is not None:
            raise self._write_error
        # The order of one pass matters for latency, not for safety:
        # 1. take every Ready, queueing its messages;
        # 2. send the peers' messages (the replica's own bytes leave first);
        # 3. with no write in flight, write a small synced Ready here (a
        #    vote, or a leader's Accept at light load: the hops to a thread
        #    and back would cost more than they overlap; the thread would
        #    even start late, as it only takes the interpreter lock when
        #    this loop waits); anything else goes to the disk writer, after
        #    the sends for the same reason;
        # 4. apply what was chosen and send the clients their answers;
        # 5. write chosen markers alone (no fsync, see Ready.sync) last.
        chosen: list = []
        lazy: list[Ready] = []
        to_disk: list[Ready] = []
        while True:
            inline: Ready | None = None
            while core.has_ready():
                rd = core.ready()
                for dst, msg in rd.messages:
                    self._peer_out[dst].push(msg)
                if rd.snapshot is not None:
                    self._apply_chosen(chosen)
                    self.applier.restore(rd.snapshot[1])
                    self._log.info("snapshot_installed", index=rd.snapshot[0])
                chosen.extend(rd.committed)
                if self._unwritten or inline is not None:
                    # Behind the writes in flight (or the one this pass
                    # makes), in order: nothing may reach the disk or be
                    # advanced before an earlier Ready's records.
                    self._unwritten.append(rd)
                    to_disk.append(rd)
                elif not rd.sync:
                    lazy.append(rd)
                elif not self.config.fsync:
                    self._write_lazy(lazy)
                    self._storage.write(rd.persist, sync=False)
                    core.advance(rd)
                elif _small(rd.persist):
                    self._write_lazy(lazy)  # records reach the disk in order
                    inline = rd
                else:
                    self._write_lazy(lazy)
                    self._unwritten.append(rd)
                    to_disk.append(rd)
            for box in self._peer_out.values():
                box.flush()
            if inline is not None:
                self._storage.write(inline.persist, sync=True)
                core.advance(inline)
            for rd in to_disk:
                self._disk.submit(rd.persist, rd.sync and self.config.fsync)
            to_disk.clear()
            if inline is not None and core.has_ready():
                continue  # what the write released (a vote) leaves before anything is applied
            if not chosen:
                break
            self._apply_chosen(chosen)  # may take a snapshot: loop for its record
        for box in self._answered:
            box.flush()
        self._answered.clear()
        if lazy:
            self._write_lazy(lazy)
            if core.has_ready():
                self._poke()
        self._note_role()
        if self._parked:
            self._retry_parked(time.monotonic())
        if core.role is Role.LEADER:
            self.app.leader_duties(self._propose_local)

    def _written(self, groups: int) -> None:
        """The disk writer made the oldest ``groups`` submitted Readies durable: advance them, in order."""
        for _ in range(groups):
            self.core.advance(self._unwritten.popleft())
        self._poke()

    def _write_failed(self, exc: BaseException) -> None:
        self._write_error = exc  # raised by the driver: the replica stops
        self._poke()

    def _write_lazy(self, lazy: list[Ready]) -> None:
        """Write and advance the Readies that hold chosen markers only (no fsync), in order."""
        for rd in lazy:
            self._storage.write(rd.persist, sync=False)
            self.core.advance(rd)
        lazy.clear()

    def _apply_chosen(self, chosen: list) -> None:
        """Apply the chosen entries gathered so far, in order, and empty the list."""
        for slot, batch in chosen:
            self._apply(slot, batch)
            self._maybe_snapshot()
        chosen.clear()

    def _apply(self, slot: int, batch) -> None:
        for cmd, result in self.applier.apply_slot(slot, batch):
            key = cmd.request_key
            self._commands.pop(key, None)
            arrived = self._arrived.pop(key, None)
            if arrived is not None:
                self._commit_times.append(time.perf_counter() - arrived)
            boxes = self._waiting.pop(key, None)
            if boxes:
                reply = self._reply(cmd, result, slot)
                for box in boxes:
                    box.push(reply)
                    self._answered.append(box)
        self._since_snapshot += 1
        self.app.on_applied(slot)
        if slot % self.config.digest_every == 0:
            digest = self.applier.digest
            self._digests[slot] = digest
            while len(self._digests) > 1024:
                self._digests.popitem(last=False)
            for box in self._peer_out.values():
                box.push(PeerDigest(slot=slot, digest=digest))
            theirs = self._peer_digests.pop(slot, None)
            if theirs is not None:
                self._compare_digest(theirs[0], slot, theirs[1])

    def _reply(self, cmd: Command | CommandBlock, result: Any, slot: int) -> Result | BlockResult:
        leader = self.core.leader_hint
        if isinstance(cmd, CommandBlock):
            forgotten = [i for i, r in enumerate(result) if r is DUPLICATE]
            if forgotten:
                result = [None if r is DUPLICATE else r for r in result]
            return BlockResult(
                client_id=cmd.client_id, first_seq=cmd.first_seq, results=result, slot=slot, leader=leader,
                forgotten=forgotten,
            )
        dup = result is DUPLICATE
        return Result(
            client_id=cmd.client_id,
            seq=cmd.seq,
            result=None if dup else result,
            slot=slot,
            leader=leader,
            duplicate=dup,
        )

    def _compare_digest(self, src: int, slot: int, theirs: bytes) -> None:
        mine = self._digests.get(slot)
        if mine is None or mine == theirs:
            return
        what = self.app.describe_slot(slot)
        self._log.error("state_divergence", slot=slot, peer=src, detail=what)
        raise DivergenceError(
            f"replica {self.config.rid} and replica {src} applied the same log up to slot {slot} "
            f"but reached different states ({what}). The state machine is not deterministic; "
            "see docs/tutorial.md for the rules scheduler hooks must follow."
        )

    def _maybe_snapshot(self) -> None:
        if self._since_snapshot < self.config.snapshot_every:
            return
        self._since_snapshot = 0
        applied = self.applier.applied
        self.core.compact(applied, self.applier.snapshot())
        self._log.info("snapshot_taken", index=applied)

    def _note_role(self) -> None:
        core = self.core
        now = (core.role, core.ballot)
        if now != self._last_role:
            if self._last_role is not None and now[1] != self._last_role[1] and self._commands:
                # A new leader (or ballot): propose again what our clients still
                # wait for. The session table applies each command once.
                for cmd in list(self._commands.values()):
                    if not core.propose(cmd):
                        break
                self._poke()
            was_leader = self._last_role is not None and self._last_role[0] is Role.LEADER
            if was_leader != (core.role is Role.LEADER):
                self.app.role_changed(core.role is Role.LEADER, time.monotonic())
            self._last_role = now
            self._log.info("role_changed", role=core.role.value, ballot=str(core.ballot), commit=core.commit_index)

    def _propose_local(self, cmd: Command) -> bool:
        ok = self.core.propose(cmd)
        self._poke()
        return ok

    async def _ticker(self) -> None:
        while True:
            now = time.monotonic()
            self.core.tick(now, self.app.tick_data(now), wall=time.time())
            self._poke()
            if self._parked and any(p[3] <= now for p in self._parked):
                self._retry_parked(now)
            await trio.sleep(self.config.tick_every)

    async def _contact_reporter(self) -> None:
        """Pass the clients we heard from to the leader, which judges liveness."""
        while True:
            await trio.sleep(0.5)
            cids = self.app.drain_contacts()
            leader = self.core.leader_hint
            if cids and leader is not None and leader != self.config.rid:
                self._peer_out[leader].push(ClientsSeen(cids=tuple(cids)))

    def _retry_parked(self, now: float) -> None:
        parked, self._parked = self._parked, []
        for box, name, args, deadline in parked:
            if deadline <= now:
                args = {**args, "wait": 0}
            self._answer_query(box, name, args, deadline)

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
            try:
                src = int(hello.ident)
            except ValueError:
                raise wire.BadMessage(f"replica ident {hello.ident!r} is not a number") from None
            if not 0 <= src < len(self.config.peers) or src == self.config.rid:
                raise wire.BadMessage(f"replica ident {src} is not a peer of replica {self.config.rid}")
            await self._serve_peer(src, conn)
        else:
            await self._serve_client(conn)

    async def _serve_peer(self, src: int, conn: wire.Connection) -> None:
        core = self.core
        while True:
            try:
                msg = await conn.receive()
            except wire.ConnectionClosed:
                return
            if isinstance(msg, PEER_MESSAGES):
                core.step(src, msg)
                self._react(conn)
            elif isinstance(msg, ClientsSeen):
                self.app.merge_contacts(list(msg.cids), time.monotonic())
            elif isinstance(msg, PeerDigest):
                if msg.slot in self._digests:
                    self._compare_digest(src, msg.slot, msg.digest)
                elif msg.slot > self.applier.applied:
                    self._peer_digests[msg.slot] = (src, msg.digest)
                    while len(self._peer_digests) > 1024:
                        self._peer_digests.popitem(last=False)
            else:
                raise wire.BadMessage(f"unexpected {type(msg).__name__} from replica {src}")

    async def _serve_client(self, conn: wire.Connection) -> None:
        box = Outbox()
        mine: list[Key] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.pump, conn)
            try:
                while True:
                    try:
                        msg = await conn.receive()
                    except wire.ConnectionClosed:
                        return
                    if self._handle_client_message(msg, box, mine):
                        self._react(conn)
            finally:
                self._parked = [p for p in self._parked if p[0] is not box]
                for key in mine:
                    boxes = self._waiting.get(key)
                    if boxes and box in boxes:
                        boxes.remove(box)
                        if not boxes:
                            del self._waiting[key]
                            self._commands.pop(key, None)
                nursery.cancel_scope.cancel()

    def _handle_client_message(self, msg: Any, box: Outbox, mine: list) -> bool:
        """Handle one message from a client; True if it gave the core a command."""
        match msg:
            case Submit(command=cmd) | SubmitBlock(block=cmd):
                if isinstance(cmd, CommandBlock):
                    cmd.op_list()  # a block that does not decode closes the connection (BadMessage)
                core = self.core
                if core.propose(cmd):
                    key = cmd.request_key
                    if core.role is Role.LEADER:
                        if len(self._arrived) >= 4 * OUTBOX_LIMIT:
                            self._arrived.clear()  # lost with a leader change and never answered
                        self._arrived.setdefault(key, time.perf_counter())
                    self._waiting.setdefault(key, []).append(box)
                    self._commands[key] = cmd
                    mine.append(key)
                    if len(mine) > 4096:
                        del mine[:2048]  # the oldest are answered or abandoned by now
                    return True
                seq = cmd.first_seq if isinstance(cmd, CommandBlock) else cmd.seq
                box.push(Retry(client_id=cmd.client_id, seq=seq, reason="no leader", leader=core.leader_hint))
            case StatusQuery():
                box.push(self.status())
            case Query(name=name, args=args):
                wait = args.get("wait", 0)
                wait = min(float(wait), 60.0) if isinstance(wait, (int, float)) else 0.0
                self._answer_query(box, name, args, time.monotonic() + wait)
            case _:
                raise wire.BadMessage(f"unexpected {type(msg).__name__} from a client")
        return False

    def _answer_query(self, box: Outbox, name: str, args: dict, deadline: float) -> None:
        try:
            box.push(QueryReply(name=name, result=self.app.query(name, args)))
        except NotYet:
            self._parked.append((box, name, args, deadline))
        except Exception as exc:  # a bad query must not take the replica down
            box.push(QueryReply(name=name, error=f"{type(exc).__name__}: {exc}"))


def _port_of(listeners: Any, default: int) -> int:
    try:
        return listeners[0].socket.getsockname()[1]
    except (TypeError, IndexError, AttributeError):
        return default
