"""The replica's driver without I/O: what to do with the Paxos core's output, and in which order.

Theory of operation
-------------------
A :class:`ReplicaDriver` owns one :class:`~tasksprint.paxos.core.PaxosCore`,
the :class:`~tasksprint.machine.Applier` of the replicated state machine, the
request table (which client connection waits for which command) and the
order in which the core's Readies are written, sent and applied.  Like
etcd's ``RawNode`` it does no I/O itself: it is given

* ``storage``, which writes records in the calling thread (``write``);
* ``writer``, which writes records in the background and reports back, in
  order, through :meth:`ReplicaDriver.written` (``submit``);
* ``peers``, one :class:`Mailbox` per other replica, and for each client
  command the :class:`Mailbox` its answer goes to;
* ``wake``, which asks the caller for another :meth:`run` soon, and
  ``clock``, seconds of a monotonic clock;
* ``observer`` (:mod:`tasksprint.observe`), to which it reports what its
  steps cost: spans ``storage.write``, ``paxos.step``, ``paxos.ready``,
  ``paxos.advance``, ``paxos.propose``, ``paxos.tick`` and
  ``applier.apply_slot`` (the callables are wrapped once, at construction),
  the value ``applier.items_per_slot``, and ``replica.commit``, the
  leader-side time from a command's arrival to its answer.

The replica process (:mod:`tasksprint.replica`) gives it sqlite, a disk
writer thread, trio connections and the system clock; the simulator
(``tests/sim/``) gives it in-memory disks, a simulated network and
simulated time, so both run this same code.

One pass (:meth:`run`) keeps this order, which matters for latency; safety
rests on the core (a reply leaves only after ``advance``) and on records
reaching the disk, and Readies being advanced, in the order they were taken:

1. take every Ready, queueing its messages;
2. send the peers' messages (the replica's own bytes leave first);
3. with no write in flight, write a small synced Ready here (a vote, or a
   leader's Accept at light load: the hops to a thread and back would cost
   more than they overlap; the thread would even start late, as it only
   takes the interpreter lock when the event loop waits); anything else goes
   to the background writer, after the sends for the same reason.  What the
   inline write released (a vote) is taken and sent before anything is
   applied;
4. apply what was chosen and send the clients their answers;
5. write chosen markers alone (no fsync, see ``Ready.sync``) last.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from tasksprint import codec
from tasksprint.api import BlockResult, PeerDigest, Result
from tasksprint.app import App
from tasksprint.digests import DigestTally, Disagreement, Minority, Summary, divergence_message
from tasksprint.machine import DUPLICATE, Applier, SnapshotUnavailable
from tasksprint.observe import NULL, Observer
from tasksprint.paxos.core import PaxosCore, Role
from tasksprint.paxos.durable import Record
from tasksprint.paxos.messages import Ballot, Batch, Command, CommandBlock
from tasksprint.paxos.output import Ready

RequestKey = tuple[str, str, int]  # (kind, client id, seq): what a client waits for (``request_key``)

SMALL_WRITE = 16 * 1024  # bytes of values up to which a synced write may stay in the calling thread
COMMIT_SAMPLES = 2000  # latest leader-side commit latencies kept for ReplicaStatus
MAX_HELD = 100_000  # answers waiting for a majority to confirm their state (the oldest are dropped past it)
ARRIVALS_LIMIT = 80_000  # arrival times kept before the table is cleared (lost with a leader change)


class DivergenceError(Exception):
    """Two replicas applied the same slots and reached different states."""


class Mailbox(Protocol):
    """Where messages for one peer or one client connection go."""

    def push(self, msg: Any) -> None:
        """Queue ``msg``; it leaves at the latest with the next :meth:`flush`, or sooner."""

    def flush(self) -> None:
        """Send what is queued, if that can be done without waiting."""


class RecordWriter(Protocol):
    """Writes records in the calling thread (a :class:`~tasksprint.storage.Storage`)."""

    def write(self, records: Sequence[Record], *, sync: bool = True) -> None:
        """Make ``records`` durable (``sync``: with an fsync) before returning."""


class BackgroundWriter(Protocol):
    """Writes records elsewhere, in submission order (a :class:`~tasksprint.disk_writer.DiskWriter`).

    It reports completed submissions to :meth:`ReplicaDriver.written`, and a
    failure to :meth:`ReplicaDriver.write_failed`.
    """

    def submit(self, records: Sequence[Record], sync: bool) -> None:
        """Queue ``records`` to be written (``sync``: with an fsync)."""


@attrs.frozen(kw_only=True)
class DriverConfig:
    """How a driver writes and checks; sizes in bytes, intervals in applied slots."""

    fsync: bool = True  # False only for tests: nothing is synced
    small_write: int = SMALL_WRITE  # a synced write up to this size may stay inline; -1: never
    snapshot_every: int = 20_000  # applied slots between snapshots; 0: never
    digest_every: int = 1  # slots applied since the last digest report before a pass sends one
    #: Seconds between a follower's reports to the other follower (three replicas; see ReplicaDriver.tick).
    follower_digest_spacing: float = 0.1


def is_small(records: Iterable[Record], limit: int) -> bool:
    """Whether ``records`` carry at most ``limit`` bytes of values.

    A Batch keeps its encoding, so this costs nothing extra.
    """
    size = 0
    for r in records:
        value = getattr(r, "value", None)
        if value is not None:
            size += len(codec.encode(value))
        data = getattr(r, "data", None)  # a snapshot
        if data is not None:
            size += len(data)
        if size > limit:
            return False
    return True


@attrs.define(eq=False)
class ReplicaDriver:
    """Drives one replica's core; see the module docstring for the contract."""

    core: PaxosCore
    applier: Applier
    app: App
    storage: RecordWriter
    writer: BackgroundWriter
    peers: Mapping[int, Mailbox]
    wake: Callable[[], None]
    clock: Callable[[], float]
    config: DriverConfig = DriverConfig()
    log: Any = None
    observer: Observer = NULL
    # Readies handed to the background writer and not yet durable, oldest first.
    _unwritten: collections.deque[Ready] = attrs.Factory(collections.deque)
    _write_error: BaseException | None = None
    # The request table: who waits for which command, and the commands
    # themselves, to propose again when the leader changes (one forwarded to
    # a leader that died, or was not leader yet, is lost).
    _waiting: dict[RequestKey, list[Mailbox]] = attrs.Factory(dict)
    _commands: dict[RequestKey, Command | CommandBlock] = attrs.Factory(dict)
    _answered: list[Mailbox] = attrs.Factory(list)  # client mailboxes given answers in this pass
    # Answers about the state after a slot a majority is not yet known to
    # share: (slot, mailbox, message), in slot order (see :meth:`answer`).
    _held: collections.deque[tuple[int, Mailbox, Any]] = attrs.Factory(collections.deque)
    # When each command submitted here arrived (on the leader; on any replica
    # when observed), and how long the leader's last ones took to be answered
    # (for ReplicaStatus).
    _arrived: dict[RequestKey, float] = attrs.Factory(dict)
    _commit_times: collections.deque[float] = attrs.Factory(lambda: collections.deque(maxlen=COMMIT_SAMPLES))
    # Which applied slots a majority shares (see tasksprint.digests); built after init.
    _tally: DigestTally = attrs.field(init=False, default=None)
    _reported: dict[int, int] = attrs.Factory(dict)  # peer -> the last slot whose digest it was sent
    _followers_told_at: float = -float("inf")  # when a tick last reported to every peer (see _tick_report_to)
    #: Set once a peer was found to disagree with the majority: what differs, for people.
    divergence: str = ""
    # How long the last synced writes took, inline or in the background writer (for ReplicaStatus).
    _fsync_times: collections.deque[float] = attrs.Factory(lambda: collections.deque(maxlen=COMMIT_SAMPLES))
    _last_leader: int | None = None
    _since_snapshot: int = 0
    _last_role: tuple[Role, Ballot | None] | None = None
    # Commands were held while no leader was known (see submit).
    _holding: bool = False
    # The core's, the applier's and the storage's steps, each wrapped once for
    # the observer (the callables themselves when unobserved).
    _step: Any = attrs.field(init=False, default=None)
    _ready: Any = attrs.field(init=False, default=None)
    _advance: Any = attrs.field(init=False, default=None)
    _propose: Any = attrs.field(init=False, default=None)
    _tick: Any = attrs.field(init=False, default=None)
    _apply_slot: Any = attrs.field(init=False, default=None)
    _write: Any = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        timed, core = self.observer.timed, self.core
        self._step = timed("paxos.step", core.step)
        self._ready = timed("paxos.ready", core.ready)
        self._advance = timed("paxos.advance", core.advance)
        self._propose = timed("paxos.propose", core.propose)
        self._tick = timed("paxos.tick", core.tick)
        self._apply_slot = timed("applier.apply_slot", self.applier.apply_slot)
        self._write = timed("storage.write", self.storage.write)
        self._tally = DigestTally(self.core.rid, len(self.peers) + 1)

    # ------------------------------------------------------------------
    # Questions

    @property
    def commit_times(self) -> list[float]:
        """Leader-side seconds from arrival to answer of the latest commands submitted here, sorted."""
        return sorted(self._commit_times)

    @property
    def confirmed(self) -> int:
        """The highest applied slot a majority of the replicas (this one included) is known to agree on."""
        return self._tally.confirmed

    @property
    def fsync_times(self) -> list[float]:
        """Seconds the latest synced writes took (inline or in the background writer), sorted."""
        return sorted(self._fsync_times)

    def note_fsync(self, seconds: float) -> None:
        """A synced write took ``seconds`` (the background writer reports its own through this)."""
        self._fsync_times.append(seconds)
        self.observer.timing("storage.fsync", seconds)

    @property
    def writes_in_flight(self) -> int:
        """Readies handed to the background writer and not yet reported written."""
        return len(self._unwritten)

    # ------------------------------------------------------------------
    # Inputs

    def submit(self, cmd: Command | CommandBlock, reply_to: Mailbox) -> bool:
        """A client's command: propose it and answer ``reply_to`` once applied.

        Returns False when no leader is known (nothing is recorded: the
        client should retry).
        """
        core = self.core
        if not self._propose(cmd):
            if not core.electing:
                return False
            # An election began moments ago (the leader's connection closed,
            # or its timeout passed): hold the command and propose it once a
            # leader is known (_note_role), rather than send the client
            # around the replicas, none of which has a leader yet.  If no
            # leader comes, the client's own timeout sends it elsewhere and
            # its leaving drops the command (abandon).
            self._holding = True
        key = cmd.request_key
        observed = self.observer is not NULL
        if observed:
            # Counted where a client submitted it: proposed here, or forwarded to the leader.
            self.observer.count("paxos.proposals")
            size = len(cmd.ops) if isinstance(cmd, CommandBlock) else len(codec.encode(cmd.op))
            self.observer.count("paxos.proposal_bytes", size)
        if observed or core.role is Role.LEADER:
            if len(self._arrived) >= ARRIVALS_LIMIT:
                self._arrived.clear()  # lost with a leader change and never answered
            self._arrived.setdefault(key, self.clock())
        self._waiting.setdefault(key, []).append(reply_to)
        self._commands[key] = cmd
        return True

    def abandon(self, keys: Iterable[RequestKey], reply_to: Mailbox) -> None:
        """``reply_to`` is gone: nobody there waits for ``keys`` any more."""
        for key in keys:
            boxes = self._waiting.get(key)
            if boxes and reply_to in boxes:
                boxes.remove(reply_to)
                if not boxes:
                    del self._waiting[key]
                    self._commands.pop(key, None)

    def step(self, src: int, msg: Any) -> None:
        """A Paxos message from replica ``src`` (see ``PaxosCore.step``); the caller runs a pass after."""
        self._step(src, msg)

    def peer_closed(self, src: int) -> None:
        """Replica ``src`` closed its connection to us (see ``PaxosCore.peer_closed``)."""
        self.core.peer_closed(src)
        self.wake()

    def peer_connected(self, dst: int) -> None:
        """This replica's connection to replica ``dst`` is up (see ``PaxosCore.peer_connected``)."""
        self.core.peer_connected(dst)
        self.wake()

    def propose(self, cmd: Command) -> bool:
        """Propose a command of this replica's own (nobody waits for its answer)."""
        ok: bool = self._propose(cmd)
        self.wake()
        return ok

    def tick(self, now: float, tick_data: Any = None, wall: float | None = None) -> None:
        """Feed the core the clock (see ``PaxosCore.tick``).

        Slots applied since the last digest report are reported now, however
        few (``digest_every`` spaces the reports of a busy replica; the last
        slots before a quiet spell must be confirmed too).  A pass is asked
        for only if the tick gave the core something to do (a heartbeat, a
        TICK entry, a timeout's messages) or changed its role: most ticks of
        a follower change nothing, and a pass per tick would cost the
        replica more than the messages it handles.
        """
        core = self.core
        self._tick(now, tick_data, wall)
        if self.config.digest_every and self._unreported(self.peers, 1):
            self._report_digest(self._tick_report_to(now))
        if core.has_ready() or (core.role, core.ballot) != self._last_role:
            self.wake()

    def _tick_report_to(self, now: float) -> tuple[int, ...] | None:
        """Whom a tick reports our digest to: every peer (None), but, for a follower of three
        replicas, the other follower only every ``follower_digest_spacing`` seconds.

        With three replicas the leader's digest and ours are a majority: the
        other follower's is needed only when the leader is the one that
        differs (a non-deterministic scheduler), where a tenth of a second
        later is soon enough; per slot it cost both followers a message and a
        wake-up.  With five or more a follower's answers wait for another
        follower's digest, so it goes at every tick.
        """
        core = self.core
        leader = core.leader_hint
        if core.role is not Role.FOLLOWER or len(self.peers) != 2 or leader is None or leader not in self.peers:
            return None
        if now - self._followers_told_at >= self.config.follower_digest_spacing:
            self._followers_told_at = now
            return None
        return (leader,)

    def digest_from(self, src: int, msg: PeerDigest) -> None:
        """Replica ``src``'s digest after a slot: compare it with ours now, or once we applied that slot.

        Sends the answers this confirms.  Raises :class:`DivergenceError` if
        this shows this replica is in the minority.
        """
        self._judge(self._tally.heard(src, msg.slot, msg.digest, Summary(msg.last_call, msg.tasks)))
        if self._held and self._held[0][0] <= self._tally.confirmed:
            self._release_confirmed()
            self._flush_answered()

    def answer(self, box: Mailbox, msg: Any) -> None:
        """Send ``msg``, an answer about the state as it is now, once a majority is known to share that state.

        Until then it waits (however long: a state only this replica reached,
        from a scheduler that is not deterministic, must not be acted on; a
        replica cut off from every peer answers nothing, and its clients go
        elsewhere).  Answers leave in the order they were given.  At most
        :data:`MAX_HELD` wait; past that the oldest are dropped (their
        askers time out and ask again).
        """
        slot = self.applier.applied
        if not self._held and slot <= self._tally.confirmed:
            box.push(msg)
            box.flush()
            return
        self._held.append((slot, box, msg))
        while len(self._held) > MAX_HELD:
            self._held.popleft()

    def forget(self, box: Mailbox) -> None:
        """``box``'s connection closed: drop the answers that wait for it."""
        if self._held:
            self._held = collections.deque(h for h in self._held if h[1] is not box)

    @property
    def held(self) -> int:
        """Answers waiting for their state to be confirmed by a majority."""
        return len(self._held)

    def _release_confirmed(self) -> None:
        confirmed = self._tally.confirmed
        held = self._held
        while held and held[0][0] <= confirmed:
            _, box, msg = held.popleft()
            box.push(msg)
            self._answered.append(box)

    def _flush_answered(self) -> None:
        for box in self._answered:
            box.flush()
        self._answered.clear()

    def written(self, groups: int) -> None:
        """The background writer made the oldest ``groups`` submitted Readies durable: advance them, in order."""
        for _ in range(groups):
            self._advance(self._unwritten.popleft())
        self.wake()

    def write_failed(self, exc: BaseException) -> None:
        """The background writer failed: the next :meth:`run` raises ``exc`` (the replica stops)."""
        self._write_error = exc
        self.wake()

    def take_snapshot(self) -> None:
        """Snapshot the applied state and let the core compact its log up to it."""
        self._since_snapshot = 0
        applied = self.applier.applied
        try:
            data = self.applier.snapshot()
        except SnapshotUnavailable as exc:
            # The log keeps growing until a later snapshot succeeds; the
            # replica itself goes on (the state machine reports the cause).
            if self.log is not None:
                self.log.error("snapshot_failed", index=applied, error=str(exc))
            return
        self.core.compact(applied, data)
        if self.log is not None:
            self.log.info("snapshot_taken", index=applied)

    # ------------------------------------------------------------------
    # The pass

    def run(self) -> None:
        """Handle everything the core has for the driver, in the order of the module docstring.

        Raises what the background writer reported failing, and
        :class:`DivergenceError`.
        """
        core = self.core
        if self._write_error is not None:
            raise self._write_error
        cfg = self.config
        peers = self.peers.values()
        chosen: list[tuple[int, Batch]] = []
        lazy: list[Ready] = []
        to_disk: list[Ready] = []
        while True:
            inline: Ready | None = None
            while core.has_ready():
                rd = self._ready()
                for dst, msg in rd.messages:
                    self.peers[dst].push(msg)
                if rd.snapshot is not None:
                    self._apply_chosen(chosen)
                    self.applier.restore(rd.snapshot[1])
                    self._tally.restart_at(self.applier.applied, self.applier.digest, self._summary())
                    if self.log is not None:
                        self.log.info("snapshot_installed", index=rd.snapshot[0])
                chosen.extend(rd.committed)
                if self._unwritten or inline is not None:
                    # Behind the writes in flight (or the one this pass
                    # makes), in order: nothing may reach the disk or be
                    # advanced before an earlier Ready's records.
                    self._unwritten.append(rd)
                    to_disk.append(rd)
                elif not rd.sync:
                    lazy.append(rd)
                elif not cfg.fsync:
                    self._write_lazy(lazy)
                    self._write(rd.persist, sync=False)
                    self._advance(rd)
                elif is_small(rd.persist, cfg.small_write):
                    self._write_lazy(lazy)  # records reach the disk in order
                    inline = rd
                else:
                    self._write_lazy(lazy)
                    self._unwritten.append(rd)
                    to_disk.append(rd)
            for box in peers:
                box.flush()
            if inline is not None:
                t0 = self.clock()
                self._write(inline.persist, sync=True)
                self.note_fsync(max(0.0, self.clock() - t0))
                self._advance(inline)
            for rd in to_disk:
                self.writer.submit(rd.persist, rd.sync and cfg.fsync)
            to_disk.clear()
            if inline is not None and core.has_ready():
                continue  # what the write released (a vote) leaves before anything is applied
            if not chosen:
                break
            self._apply_chosen(chosen)  # may take a snapshot: loop for its record
        if self._held and self._held[0][0] <= self._tally.confirmed:
            self._release_confirmed()
        self._flush_answered()
        if lazy:
            self._write_lazy(lazy)
            if core.has_ready():
                self.wake()
        self._note_role()
        if core.role is Role.LEADER:
            self.app.leader_duties(self.propose)

    def _write_lazy(self, lazy: list[Ready]) -> None:
        """Write and advance the Readies that hold chosen markers only (no fsync), in order."""
        for rd in lazy:
            self._write(rd.persist, sync=False)
            self._advance(rd)
        lazy.clear()

    def _apply_chosen(self, chosen: list[tuple[int, Batch]]) -> None:
        """Apply the chosen entries gathered so far, in order, and empty the list."""
        every = self.config.snapshot_every
        for slot, batch in chosen:
            self._apply(slot, batch)
            if every and self._since_snapshot >= every:
                self.take_snapshot()
        chosen.clear()
        every = self.config.digest_every
        if not every:
            return
        # One report per pass, for its last slot (the digest covers every
        # earlier slot).  A follower tells its leader at once: the leader's
        # answers wait for it.  The other followers hear it at a later tick
        # (see _tick_report_to): while the leader is healthy its digest, sent at once
        # to the followers its Accepts go to, confirms their state; only when
        # the leader is the one that differs do followers need each other's,
        # and a tick later is soon enough for that.  A follower a thrifty
        # Accept left out (light load) hears of the slot from the heartbeat
        # at the next tick and applies it after that: the leader's digest
        # reaches it with that tick too, one message less per command.
        core = self.core
        leader = core.leader_hint
        to: tuple[int, ...] | None = None
        if core.role is Role.FOLLOWER and leader is not None and leader in self.peers:
            to = (leader,)
        elif core.role is Role.LEADER:
            to = core.accepting
        if self._unreported(self.peers if to is None else to, every):
            self._report_digest(to)

    def _unreported(self, peers: Iterable[int], every: int) -> bool:
        """Whether one of ``peers`` was last told our digest ``every`` or more slots ago."""
        applied = self.applier.applied
        return any(applied - self._reported.get(rid, 0) >= every for rid in peers)

    def _report_digest(self, to: tuple[int, ...] | None = None) -> None:
        """Tell the peers (or those in ``to``) our digest after the last applied slot (their answers wait for it)."""
        applied = self.applier.applied
        summary = self._tally.summary_of(applied)
        report = PeerDigest(slot=applied, digest=self.applier.digest, last_call=summary.last_call, tasks=summary.tasks)
        for rid, box in self.peers.items():
            if (to is None or rid in to) and self._reported.get(rid, 0) < applied:
                self._reported[rid] = applied
                box.push(report)
                box.flush()  # the peers' answers wait for it: no need to wait for the pump

    def _apply(self, slot: int, batch: Batch) -> None:
        self.observer.value("applier.items_per_slot", len(batch.items))
        for cmd, result in self._apply_slot(slot, batch):
            key = cmd.request_key
            self._commands.pop(key, None)
            arrived = self._arrived.pop(key, None)
            if arrived is not None:
                took = self.clock() - arrived
                if self.core.role is Role.LEADER:
                    self._commit_times.append(took)
                self.observer.timing("replica.commit", took)
            boxes = self._waiting.pop(key, None)
            if boxes:
                reply = self._reply(cmd, result, slot)
                for box in boxes:
                    self._held.append((slot, box, reply))  # sent once the slot is confirmed
        self._since_snapshot += 1
        self.app.on_applied(slot)
        self._judge(self._tally.applied(slot, self.applier.digest, self._summary()))

    def _summary(self) -> Summary:
        last_call, tasks = self.app.effects_summary()
        return Summary(last_call[:200], tasks)

    def _reply(self, cmd: Command | CommandBlock, result: Any, slot: int) -> Result | BlockResult:
        leader = self.core.leader_hint
        if isinstance(cmd, CommandBlock):
            forgotten = [i for i, r in enumerate(result) if r is DUPLICATE]
            if forgotten:
                result = [None if r is DUPLICATE else r for r in result]
            return BlockResult(
                client_id=cmd.client_id,
                first_seq=cmd.first_seq,
                results=result,
                slot=slot,
                leader=leader,
                forgotten=tuple(forgotten),
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

    def _judge(self, found: list[Disagreement]) -> None:
        """Act on what the digests decided: stop if this replica is in the minority, else report the peer."""
        for d in found:
            message = divergence_message(self.core.rid, d)
            if isinstance(d, Minority):
                if self.log is not None:
                    self.log.error("state_divergence", slot=d.slot, peers=[p for p, _ in d.others], detail=message)
                raise DivergenceError(
                    f"replica {self.core.rid} stops: a majority of the replicas disagrees with its state; {message}"
                )
            if self.log is not None:
                self.log.error("peer_diverged", slot=d.slot, peer=d.peer, detail=message)
            self.divergence = self.divergence or message

    def _note_role(self) -> None:
        core = self.core
        now = (core.role, core.ballot)
        # A new leader (or ballot), or a leader known again after commands
        # were held without one (perhaps the same leader: the ballot need not
        # change): propose again what our clients still wait for.  The
        # session table applies each command once.
        new_ballot = self._last_role is not None and now[1] != self._last_role[1]
        if new_ballot or (self._holding and core.leader_hint is not None):
            if core.leader_hint is not None:
                self._holding = False
            if self._commands:
                for cmd in list(self._commands.values()):
                    if not self._propose(cmd):
                        break
                self.wake()
        if now != self._last_role:
            was_leader = self._last_role is not None and self._last_role[0] is Role.LEADER
            if was_leader != (core.role is Role.LEADER):
                self.app.role_changed(core.role is Role.LEADER, self.clock())
            self._last_role = now
            if core.leader_hint is not None and core.leader_hint != self._last_leader:
                self._last_leader = core.leader_hint
                self.observer.count("paxos.leader_change")
            if self.log is not None:
                self.log.info("role_changed", role=core.role.value, ballot=str(core.ballot), commit=core.commit_index)
