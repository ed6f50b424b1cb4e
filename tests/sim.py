"""A deterministic simulator for the Multi-Paxos core, driven by one integer seed.

Theory of operation
-------------------
A :class:`Cluster` is the world: N replicas, each a ``PaxosCore`` plus an
``Applier(KVMachine)`` plus a "disk" (a :class:`DurableState` that survives
crashes), a few :class:`Client` objects, and a :class:`Checker` that holds
the ground truth and raises :class:`SimFailure` as soon as an invariant
breaks.  The cluster does not decide *when* anything happens: the network is
a callback (``Cluster.net``) and every fault is a method call.  Two drivers
decide:

* :class:`Simulation` draws everything from ``random.Random(seed)``: message
  delays (hence reordering), drops, duplicates, partitions into arbitrary
  groups, crashes (also in the middle of a driver pass: after a Ready's
  messages left but before its records were durable, after they were durable
  but before ``advance``, or right after applying a slot), wiped disks, pauses (a replica stops, then resumes with its
  state and a backlog, like a stopped VM), clock skew and jumps, fsyncs that
  take time while messages keep arriving (with several Readies' writes in
  flight at once, as the replica's writer has them), and stragglers (a message held back
  for seconds, so stale answers arrive).  It then heals everything and requires every client
  to finish within a bounded simulated time.  Re-running a seed replays it
  exactly; a failure names its seed.
* ``tests/test_simulation.py`` also drives a cluster from a hypothesis
  ``RuleBasedStateMachine`` whose rules are single deliveries and faults, and
  hands the cluster to :class:`Simulation` for the final liveness phase.

Each replica is driven by the replica process's own driver,
:class:`~tasksprint.driver.ReplicaDriver`, so the order of writes, sends and
applies under test is the one that runs in production.  The simulator gives it
a disk (writes in the calling thread go to the replica's ``DurableState`` at
once), a background writer whose writes complete at scheduled simulated times,
in order (in the asynchronous mode every synced write goes there, so several
Readies' writes are in flight at once), mailboxes that hand messages to the
network, and the replica's simulated clock.  A crash keeps an in-order prefix
of the queued writes; a crash inside a pass (before or after a write, after
applying a slot) is an exception raised from the disk or the applier.

What the checker verifies after every step (see :class:`Checker`):

* agreement: every value a replica learns, persists as chosen or applies at a
  slot equals every other one, and equals the value a majority of acceptors
  durably accepted at one ballot (the oracle counts real votes on disks, so a
  wrong value is caught even before anybody applies it; votes on a wiped disk
  stop counting); one ballot never carries two values for one slot;
* validity: every applied command was submitted by a client, every TICK
  carries a clock reading and the tick data of the replica that proposed it;
* exactly-once: in every replica's KV state each appended value appears at
  most once, and each result handed to a client points at its own value;
* the applied index only grows within a life, and after a restart from an
  intact disk the replica still knows everything it had applied as chosen;
* equal digests at equal applied index;
* at the end: every acknowledged command is in the state of every live
  replica, no replica is stuck recovering, and every client got all its
  answers within the bound.
"""

from __future__ import annotations

import collections
import heapq
import random
from collections.abc import Callable
from typing import Any

import attrs

from tasksprint.api import BlockResult, PeerDigest, Result
from tasksprint.app import KVApp
from tasksprint.driver import DivergenceError, DriverConfig, ReplicaDriver
from tasksprint.log_client import MAX_BLOCK, consecutive_runs
from tasksprint.machine import DUPLICATE, Applier, ApplyContext, KVMachine
from tasksprint.paxos.core import PaxosConfig, PaxosCore, Role
from tasksprint.paxos.durable import (
    DurableState,
    MarkInitialized,
    SaveAccepted,
    SaveChosen,
)
from tasksprint.paxos.messages import (
    Accepted,
    Ballot,
    Batch,
    Command,
    CommandBlock,
    Promise,
    Tick,
)

KEYS = ("k0", "k1", "k2")


class SimFailure(AssertionError):
    """An invariant broke. The message names the seed that replays it."""


class Crashed(Exception):
    """A replica crashed inside a driver pass, where the simulator told it to (``crash_in_ready``)."""


def sim_config(n: int) -> PaxosConfig:
    """Small limits so batching, pipelining, catch-up and snapshots all happen in short runs."""
    return PaxosConfig(
        replicas=n,
        heartbeat_interval=0.05,
        election_timeout=0.3,
        tick_interval=0.1,
        max_inflight=4,
        max_batch=3,
        catchup_batch=4,
        keep_after_snapshot=3,
    )


def load(disk: DurableState) -> DurableState:
    """What a restarted replica reads back: a copy, so nothing is shared with the disk."""
    return DurableState(
        promised=disk.promised,
        log=dict(disk.log),
        snapshot_index=disk.snapshot_index,
        snapshot_data=disk.snapshot_data,
        initialized=disk.initialized,
    )


# ----------------------------------------------------------------------
# Clients


@attrs.define(eq=False)
class Outstanding:
    cmd: Command
    deadline: float
    replica: int


@attrs.define(eq=False)
class Client:
    """Submits ``append`` commands; retries an unanswered one (same seq) at another replica."""

    cid: str
    quota: int  # commands to submit in the whole run
    window: int  # at most this many unanswered at once
    next_seq: int = 1
    outstanding: dict[int, Outstanding] = attrs.Factory(dict)
    results: dict[int, Any] = attrs.Factory(dict)

    @property
    def done(self) -> bool:
        return self.next_seq > self.quota and not self.outstanding

    def can_submit(self) -> bool:
        return self.next_seq <= self.quota and len(self.outstanding) < self.window

    def new_command(self, key: str) -> Command:
        seq = self.next_seq
        self.next_seq += 1
        first = min([*self.outstanding, seq])
        return Command(client_id=self.cid, seq=seq, first_unacked=first, op=["append", key, f"{self.cid}:{seq}"])

    def blocks(self, seqs: list[int]) -> list[CommandBlock]:
        """Outstanding ``seqs`` as CommandBlocks of consecutive seqs, as LogClient sends them."""
        first_unacked = min(self.outstanding)
        runs = consecutive_runs(sorted(seqs), MAX_BLOCK)
        return [
            CommandBlock.of(self.cid, run[0], first_unacked, [self.outstanding[q].cmd.op for q in run]) for run in runs
        ]


# ----------------------------------------------------------------------
# Ground truth


@attrs.define(eq=False)
class Checker:
    """Ground truth and invariant checks, fed by the cluster as things happen."""

    n: int
    quorum: int
    # (slot, ballot) -> (value, acceptors that durably accepted it)
    votes: dict[tuple[int, Ballot], tuple[Batch, set[int]]] = attrs.Factory(dict)
    true_chosen: dict[int, Batch] = attrs.Factory(dict)  # a majority accepted it at one ballot
    learned: dict[int, Batch] = attrs.Factory(dict)  # some replica claimed it chosen
    digests: dict[int, bytes] = attrs.Factory(dict)  # applied slot -> digest after it
    submitted: dict[tuple[str, int], Command] = attrs.Factory(dict)
    acked: dict[tuple[str, int], Any] = attrs.Factory(dict)

    def fail(self, what: str) -> None:
        raise SimFailure(what)

    def _claim(self, where: str, slot: int, value: Batch) -> None:
        known = self.learned.get(slot)
        if known is not None and known != value:
            self.fail(f"agreement: {where} has {value} at slot {slot}, another replica had {known}")
        truth = self.true_chosen.get(slot)
        if truth is not None and truth != value:
            self.fail(f"agreement: {where} has {value} at slot {slot}, but a majority accepted {truth}")
        if known is None:
            self.learned[slot] = value

    def on_persist(self, rid: int, records: tuple) -> None:
        for rec in records:
            match rec:
                case SaveAccepted(slot=s, ballot=b, value=v):
                    entry = self.votes.get((s, b))
                    if entry is None:
                        entry = self.votes[(s, b)] = (v, set())
                    elif entry[0] != v:
                        self.fail(f"ballot {b} carried two values for slot {s}: {entry[0]} and {v}")
                    entry[1].add(rid)
                    if len(entry[1]) >= self.quorum:
                        truth = self.true_chosen.get(s)
                        if truth is None:
                            self._claim(f"a majority at ballot {b}", s, v)
                            self.true_chosen[s] = v
                        elif truth != v:
                            self.fail(f"agreement: two values chosen at slot {s}: {truth} then {v} (ballot {b})")
                case SaveChosen(slot=s, value=v):
                    self._claim(f"replica {rid}'s disk", s, v)
                case _:
                    pass

    def on_wiped(self, rid: int) -> None:
        """Votes on a lost disk no longer count toward a majority.

        (A value chosen while they counted stays chosen: ``true_chosen`` keeps it.)
        """
        for _, voters in self.votes.values():
            voters.discard(rid)

    def on_learned(self, rid: int, slot: int, value: Batch) -> None:
        self._claim(f"replica {rid}", slot, value)

    def on_applied(self, rid: int, slot: int, value: Batch, digest: bytes) -> None:
        self._claim(f"replica {rid}'s applied log", slot, value)
        known = self.digests.get(slot)
        if known is None:
            self.digests[slot] = digest
        elif known != digest:
            self.fail(f"replica {rid}: digest after slot {slot} differs from another replica's")
        for item in value.items:
            if isinstance(item, Command):
                sub = self.submitted.get((item.client_id, item.seq))
                if sub is None or sub != item:
                    self.fail(f"validity: replica {rid} applied {item} at slot {slot}, which no client submitted")
            elif isinstance(item, CommandBlock):
                for j, op in enumerate(item.op_list()):
                    sub = self.submitted.get((item.client_id, item.first_seq + j))
                    if sub is None or sub.op != op:
                        self.fail(
                            f"validity: replica {rid} applied {op} as {item.client_id}:{item.first_seq + j} "
                            f"at slot {slot}, which no client submitted"
                        )
            elif isinstance(item, Tick):
                if not (isinstance(item.data, tuple) and item.data[0] == "td" and item.data[2] == item.now):
                    self.fail(f"validity: replica {rid} applied {item} at slot {slot}, not a TICK a leader made")
            else:
                self.fail(f"validity: replica {rid} applied {item!r} at slot {slot}")

    def on_restored(self, rid: int, index: int, digest: bytes) -> None:
        known = self.digests.get(index)
        if known is not None and known != digest:
            self.fail(f"replica {rid}: snapshot at slot {index} has a digest no replica had there")


# ----------------------------------------------------------------------
# Replicas


@attrs.define(eq=False)
class CheckedApplier(Applier):
    """An Applier that shows the cluster every slot it applies and every snapshot it restores."""

    cluster: Any = None
    rid: int = 0

    def apply_slot(self, slot: int, value: Batch) -> list:
        if slot != self.applied + 1:
            self.cluster.checker.fail(f"replica {self.rid} applies slot {slot} after slot {self.applied}")
        results = super().apply_slot(slot, value)
        self.cluster.on_applied(self, slot, value, results)
        return results

    def restore(self, data: bytes) -> None:
        before = self.applied
        super().restore(data)
        if self.applied < before:
            self.cluster.checker.fail(
                f"replica {self.rid} was told to go back from slot {before} to snapshot {self.applied}"
            )
        self.cluster.checker.on_restored(self.rid, self.applied, self.digest)


@attrs.define(eq=False)
class Link:
    """Replica ``src``'s mailbox for ``dst`` (a replica id or a client id): what is pushed enters the network."""

    cluster: Any
    src: int
    dst: int | str

    def push(self, msg: Any) -> None:
        self.cluster.send(self.src, self.dst, msg)

    def flush(self) -> None:
        pass  # pushed messages are on their way already


@attrs.define(eq=False)
class SimDisk:
    """What replica ``rid``'s driver writes in its own thread: durable at once (or crashes, if told to)."""

    cluster: Any
    rid: int

    def write(self, records: Any, *, sync: bool = True) -> None:
        c = self.cluster
        point = c.crash_in_ready.get(self.rid)
        if records and point == "sent_not_persisted":
            del c.crash_in_ready[self.rid]
            raise Crashed(point)
        c.persist(self.rid, tuple(records), sync)
        if records and point == "persisted":
            del c.crash_in_ready[self.rid]
            raise Crashed(point)


@attrs.define(eq=False)
class SimWriter:
    """Replica ``rid``'s background writer: writes complete, in order, when the simulation says (``fsync_done``)."""

    cluster: Any
    rid: int
    life: int

    def submit(self, records: Any, sync: bool) -> None:
        node = self.cluster.nodes[self.rid]
        node.pending.append((tuple(records), sync, node.applier.applied))
        self.cluster.on_fsync_started(self.rid, self.life)


@attrs.define(eq=False)
class Node:
    """A running replica: everything here is lost in a crash (the disk is not here)."""

    rid: int
    life: int
    driver: ReplicaDriver = attrs.field(init=False)
    # Writes handed to the background writer and not yet complete, oldest
    # first: (records, sync, applied index when submitted).
    pending: collections.deque = attrs.Factory(collections.deque)
    clients: dict[str, Link] = attrs.Factory(dict)  # mailboxes for answers, by client id
    woken: bool = False  # the driver asked for another pass
    in_pass: bool = False
    pass_start_applied: int = 0  # applied index when the current pass began
    commit_seen: int = 0  # learned slots up to here were checked
    applied_seen: int = 0

    @property
    def core(self) -> PaxosCore:
        return self.driver.core

    @property
    def applier(self) -> Applier:
        return self.driver.applier

    def wake(self) -> None:
        self.woken = True


def _kv(applier: Applier, key: str) -> list:
    return applier.machine.apply(["get", key], ApplyContext(0, 0)) or []


class Cluster:
    """N replicas, their disks, the clients and the checker; no policy of its own.

    ``net(src, dst, payload)`` is called for everything that leaves a replica
    or client; ``deliver`` is called by the driver when it arrives.  A payload
    is a peer message (replica to replica), ``("request", Command)`` (client
    to replica) or ``("reply", seq, result)`` (replica to client).
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        fresh: bool = True,
        clients: int = 3,
        quota: int = 6,
        window: int = 2,
        config: PaxosConfig | None = None,
    ) -> None:
        self.n = n
        self.seed = seed
        self.config = config or sim_config(n)
        self.now = 0.0
        self.rng = random.Random(seed ^ 0x5EED)  # for choices the cluster itself makes
        self.checker = Checker(n, self.config.quorum)
        self.net: Callable[[Any, Any, Any], None] = lambda src, dst, payload: None
        self.clock_rate = [1.0] * n
        self.clock_offset = [0.0] * n
        self.disks = [DurableState() for _ in range(n)]
        if not fresh:
            for d in self.disks:
                d.apply([MarkInitialized()])
        self.nodes: list[Node | None] = [None] * n
        # Every disk was initialized at once: the cluster has started.  A new
        # cluster needs all its replicas to start (see PaxosCore), not just a majority.
        self.bootstrapped = not fresh
        self.lives = [0] * n
        self.applied_before_crash = [0] * n
        # Records of Readies marked not to sync: in the OS, not yet on the
        # disk.  A process crash keeps them, a power cut loses them.
        self.unsynced: list[list] = [[] for _ in range(n)]
        # Crash a replica inside its next driver pass at this point: "sent_not_persisted" and
        # "persisted" at its next write of records, "applied" after its next applied slot.
        self.crash_in_ready: dict[int, str] = {}
        self.async_fsync = False  # every synced write goes to the background writer
        self.digest_every = 1 << 30  # replicas exchange digests this often (never, unless a Simulation says)
        self.on_fsync_started: Callable[[int, int], None] = lambda rid, life: None
        self.clients = [Client(f"c{i}", quota, window) for i in range(clients)]
        self.steps = 0

    def boot(self) -> None:
        """Start every replica (call after ``net`` is connected)."""
        for r in range(self.n):
            self.start(r)

    # -- clocks ---------------------------------------------------------

    def clock(self, r: int) -> float:
        return self.clock_offset[r] + self.clock_rate[r] * self.now

    def jump_clock(self, r: int, dt: float) -> None:
        """Move replica ``r``'s clock forward by ``dt`` (never back: it is monotonic)."""
        assert dt >= 0
        self.clock_offset[r] += dt

    # -- life and death -------------------------------------------------

    def alive(self, r: int) -> bool:
        return self.nodes[r] is not None

    def start(self, r: int) -> None:
        assert self.nodes[r] is None
        self.lives[r] += 1
        life = self.lives[r]
        rng = random.Random((self.seed * 1_000_003 + r * 7919 + life) & 0xFFFFFFFFFFFF)
        core = PaxosCore.restore(self.config, r, load(self.disks[r]), rng=rng, now=self.clock(r))
        node = Node(r, life)
        app = KVApp(KVMachine())
        node.driver = ReplicaDriver(
            core=core,
            applier=CheckedApplier(app.machine, cluster=self, rid=r),
            app=app,
            storage=SimDisk(self, r),
            writer=SimWriter(self, r, life),
            peers={o: Link(self, r, o) for o in range(self.n) if o != r},
            wake=node.wake,
            clock=lambda: self.clock(r),
            config=DriverConfig(
                small_write=-1 if self.async_fsync else DriverConfig().small_write,
                snapshot_every=0,  # the simulation decides when (``compact``)
                digest_every=self.digest_every,
            ),
        )
        self.nodes[r] = node
        if core.commit_index < self.applied_before_crash[r]:
            self.checker.fail(
                f"replica {r} applied slot {self.applied_before_crash[r]} before it crashed, but its disk "
                f"only knows slots up to {core.commit_index} as chosen"
            )
        self.drain(r)

    def crash(self, r: int, *, wipe: bool = False, power_cut: bool | None = None) -> None:
        """Stop replica ``r``, losing all volatile state (and its disk if ``wipe``).

        A power cut also loses what was written without an fsync; a process
        crash does not (the OS has it).  ``None``: either, at random.
        """
        node = self.nodes[r]
        if node is not None:
            # Inside a pass, what it applied in this pass may not be known
            # chosen on its disk yet (markers are written at the end of the pass).
            applied = node.pass_start_applied if node.in_pass else node.applier.applied
            if node.pending:
                # The crash hits during the writes: an in-order prefix of them made it.
                made = self.rng.randint(0, len(node.pending))
                for i, (records, sync, applied_before) in enumerate(node.pending):
                    if i < made:
                        self.persist(r, records, sync)
                    else:
                        # What it applied later is not known chosen on its disk.
                        applied = min(applied, applied_before)
                        break
            self.applied_before_crash[r] = max(applied, self.applied_before_crash[r]) if not wipe else 0
            self.nodes[r] = None
        if self.unsynced[r]:
            if power_cut if power_cut is not None else self.rng.random() < 0.5:
                # A power cut: unsynced chosen markers are lost, so the replica
                # may know fewer slots as chosen than it applied, and learns
                # them again from its peers.
                self.applied_before_crash[r] = 0
            else:
                self.disks[r].apply(self.unsynced[r])  # only the process died: the OS wrote them
            self.unsynced[r] = []
        self.crash_in_ready.pop(r, None)
        if wipe:
            self.disks[r] = DurableState()
            self.applied_before_crash[r] = 0
            self.checker.on_wiped(r)

    def can_wipe(self, r: int) -> bool:
        """At most one disk lost at a time: every other disk must be intact and initialized."""
        return all(self.disks[o].initialized for o in range(self.n) if o != r)

    # -- what the driver's disk, writer, mailboxes and applier report ---

    def persist(self, r: int, records: tuple, sync: bool) -> None:
        """``records`` reach replica ``r``'s disk (``sync``), or only the OS (not ``sync``)."""
        if records:
            self.checker.on_persist(r, records)
            if not sync:
                self.unsynced[r].extend(records)
                return
            # A synced write makes everything written before it durable too (the WAL is in order).
            self.disks[r].apply(self.unsynced[r] + list(records))
            self.unsynced[r] = []
            if not self.bootstrapped and all(d.initialized for d in self.disks):
                self.bootstrapped = True

    def send(self, r: int, dst: int | str, msg: Any) -> None:
        """Replica ``r``'s driver pushed ``msg`` for ``dst``: it enters the network."""
        if isinstance(dst, str):
            match msg:
                case Result(seq=seq, result=result, duplicate=dup):
                    self.net(r, dst, ("reply", seq, DUPLICATE if dup else result))
                case BlockResult(first_seq=seq, results=results, forgotten=forgotten):
                    results = [DUPLICATE if j in forgotten else one for j, one in enumerate(results)]
                    self.net(r, dst, ("replies", seq, results))
                case _:
                    self.checker.fail(f"replica {r} sent client {dst} a {type(msg).__name__}")
            return
        if dst == r:
            # A real driver has no connection to itself: the message would be lost.
            self.checker.fail(f"replica {r} addressed a {type(msg).__name__} to itself")
        if isinstance(msg, (Promise, Accepted)):
            self._check_durable(r, msg)
        self.net(r, dst, msg)

    def _check_durable(self, r: int, msg: Promise | Accepted) -> None:
        """An acceptor's answer leaves only once what it vouches for is on its disk."""
        disk = self.disks[r]
        if disk.promised < msg.ballot:
            self.checker.fail(f"replica {r} sent {type(msg).__name__} at {msg.ballot} with {disk.promised} on disk")
        if isinstance(msg, Accepted):
            core = self.nodes[r].core
            for slot in msg.slots:
                row = disk.log.get(slot)
                if slot <= disk.snapshot_index or core.chosen_value(slot) is not None:
                    continue  # chosen: acknowledging it again cannot choose anything else
                # A vote at a higher ballot may since have replaced this one.
                if row is None or not (row.chosen or row.ballot is not None and row.ballot >= msg.ballot):
                    self.checker.fail(
                        f"replica {r} sent Accepted for slot {slot} at {msg.ballot} before its disk held that vote"
                    )

    def on_applied(self, applier: CheckedApplier, slot: int, batch: Batch, results: list) -> None:
        """Replica ``applier.rid`` applied ``slot``: check it, and crash there if told to."""
        r = applier.rid
        self.checker.on_applied(r, slot, batch, applier.digest)
        self._check_exactly_once(r, applier, slot, results)
        if self.crash_in_ready.get(r) == "applied":
            del self.crash_in_ready[r]
            raise Crashed("applied")

    def _check_exactly_once(self, r: int, applier: Applier, slot: int, results: list) -> None:
        touched: dict[str, list] = {}
        flat = []
        for cmd, result in results:
            if isinstance(cmd, CommandBlock):
                flat.extend(zip(cmd.op_list(), result))
            else:
                flat.append((cmd.op, result))
        for op, result in flat:
            key, value = op[1], op[2]
            lst = touched.get(key)
            if lst is None:
                lst = touched[key] = _kv(applier, key)
            if result is DUPLICATE:
                ok = value in lst
            else:
                ok = isinstance(result, int) and 1 <= result <= len(lst) and lst[result - 1] == value
            if not ok:
                self.checker.fail(
                    f"exactly-once: replica {r} slot {slot} answered {result!r} for {value} but {key} is {lst}"
                )
        for key, lst in touched.items():
            if len(set(lst)) != len(lst):
                self.checker.fail(f"exactly-once: replica {r} after slot {slot}: {key} = {lst}")

    # -- driving --------------------------------------------------------

    def drain(self, r: int) -> None:
        """Run driver passes on replica ``r`` until it asks for no more (its input was just given)."""
        node = self.nodes[r]
        if node is None:
            return
        node.woken = True
        passes = 0
        while node.woken:
            node.woken = False
            node.in_pass = True
            node.pass_start_applied = node.applier.applied
            try:
                node.driver.run()
            except Crashed:
                self.crash(r)
                return
            node.in_pass = False
            passes += 1
            if passes > 1000:
                self.checker.fail(f"replica {r}'s driver keeps asking for another pass")

    def fsync_done(self, r: int, life: int) -> None:
        """The oldest write in flight completed (writes complete in the order they were queued)."""
        node = self.nodes[r]
        if node is None or node.life != life or not node.pending:
            return
        records, sync, _ = node.pending.popleft()
        self.persist(r, records, sync)
        node.driver.written(1)
        self.drain(r)

    def compact(self, r: int) -> None:
        node = self.nodes[r]
        if node is not None and node.applier.applied > 0:
            node.driver.take_snapshot()
            self.drain(r)

    # -- inputs -----------------------------------------------------------

    def tick(self, r: int) -> None:
        node = self.nodes[r]
        if node is None:
            return
        now = self.clock(r)
        # Tick data names the replica and its clock, so validity can recognise real TICKs.
        node.driver.tick(now, ("td", r, now), wall=now)
        self.drain(r)

    def deliver(self, src: Any, dst: Any, payload: Any) -> None:
        """``payload`` arrives at ``dst`` (a replica id or a client id)."""
        self.steps += 1
        if isinstance(dst, str):
            self._client_receives(dst, payload)
            return
        node = self.nodes[dst]
        if node is None:
            return
        if isinstance(src, str):
            _, cmd = payload
            box = node.clients.get(src)
            if box is None:
                box = node.clients[src] = Link(self, dst, src)
            node.driver.submit(cmd, box)  # no leader known: the client tries again later
        elif isinstance(payload, PeerDigest):
            node.driver.digest_from(src, payload)
            return
        else:
            node.driver.step(src, payload)
        self.drain(dst)

    def _client_receives(self, cid: str, payload: Any) -> None:
        kind, seq, result = payload
        if kind == "replies":
            for j, one in enumerate(result):
                self._client_receives(cid, ("reply", seq + j, one))
            return
        client = self.clients[int(cid[1:])]
        if seq not in client.outstanding:
            return
        if result is DUPLICATE:
            self.checker.fail(f"client {cid} seq {seq}: told DUPLICATE although it never had an answer")
        del client.outstanding[seq]
        client.results[seq] = result
        self.checker.acked[(cid, seq)] = result

    def submit(self, client: Client, r: int) -> Command:
        """The client issues its next command, to replica ``r``."""
        cmd = client.new_command(self.rng.choice(KEYS))
        self.checker.submitted[(cmd.client_id, cmd.seq)] = cmd
        client.outstanding[cmd.seq] = Outstanding(cmd, 0.0, r)
        self.net(client.cid, r, ("request", cmd))
        return cmd

    def submit_block(self, client: Client, r: int, count: int) -> CommandBlock:
        """The client issues its next ``count`` commands in one block, to replica ``r``."""
        for _ in range(count):
            cmd = client.new_command(self.rng.choice(KEYS))
            self.checker.submitted[(cmd.client_id, cmd.seq)] = cmd
            client.outstanding[cmd.seq] = Outstanding(cmd, 0.0, r)
        (block,) = client.blocks(list(range(client.next_seq - count, client.next_seq)))
        self.net(client.cid, r, ("request", block))
        return block

    def resend(self, client: Client, seq: int, r: int) -> None:
        out = client.outstanding[seq]
        out.replica = r
        self.net(client.cid, r, ("request", out.cmd))

    def resend_blocks(self, client: Client, seqs: list[int], r: int) -> None:
        """Send ``seqs`` again, to replica ``r``, merged into blocks however they now line up."""
        for seq in seqs:
            client.outstanding[seq].replica = r
        for block in client.blocks(seqs):
            self.net(client.cid, r, ("request", block))

    # -- invariants -------------------------------------------------------

    def check_step(self) -> None:
        """Cheap checks after every step; the checker already checked every event."""
        leader_ballots = []
        for node in self.nodes:
            if node is None:
                continue
            core = node.core
            r = node.rid
            if core.role is Role.LEADER:
                b = core.ballot
                if b is None or b.rid != r or b in leader_ballots:
                    self.checker.fail(f"replica {r} leads with ballot {b}, which is not its own")
                leader_ballots.append(b)
            commit = core.commit_index
            if commit != node.commit_seen:
                if commit < node.commit_seen:
                    self.checker.fail(f"replica {r}: commit index went back from {node.commit_seen} to {commit}")
                for slot in range(max(node.commit_seen + 1, core.log_start), commit + 1):
                    value = core.chosen_value(slot)
                    if value is not None:
                        self.checker.on_learned(r, slot, value)
                node.commit_seen = commit
            applied = node.applier.applied
            if applied != node.applied_seen:
                if applied < node.applied_seen:
                    self.checker.fail(f"replica {r}: applied index went back from {node.applied_seen}")
                node.applied_seen = applied
            if applied > commit:
                self.checker.fail(f"replica {r} applied slot {applied} beyond its commit index")

    def check_final(self) -> None:
        """Every acknowledged command is in the state of every live replica, at its answered position."""
        for node in self.nodes:
            if node is None:
                continue
            if node.core.role is Role.RECOVERING:
                self.checker.fail(f"replica {node.rid} is still recovering at the end")
            for (cid, seq), result in sorted(self.checker.acked.items()):
                cmd = self.checker.submitted[(cid, seq)]
                key, value = cmd.op[1], cmd.op[2]
                lst = _kv(node.applier, key)
                if lst.count(value) != 1 or not (isinstance(result, int) and lst[result - 1] == value):
                    self.checker.fail(
                        f"acknowledged {cid}:{seq} (answer {result!r}) is not at its place in replica "
                        f"{node.rid}'s {key} = {lst} (applied up to {node.applier.applied})"
                    )


# ----------------------------------------------------------------------
# A network where every delivery is explicit (scripted tests, hypothesis)


class ManualNet:
    """Holds every message in flight; the test decides what arrives, and when.

    ``cluster.now`` is the simulated time; tests move it and call
    ``cluster.tick(r)`` themselves.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.queue: list[tuple[Any, Any, Any]] = []
        self.delivered: list[tuple[Any, Any, Any]] = []  # everything that arrived, in order
        cluster.net = self._send

    def _send(self, src: Any, dst: Any, payload: Any) -> None:
        self.queue.append((src, dst, payload))

    def find(self, kind: type | None = None, src: Any = None, dst: Any = None) -> list[int]:
        """Indexes of queued messages matching the filters."""
        return [
            i
            for i, (s, d, m) in enumerate(self.queue)
            if (kind is None or isinstance(m, kind)) and (src is None or s == src) and (dst is None or d == dst)
        ]

    def peek(self, kind: type | None = None, src: Any = None, dst: Any = None) -> list[Any]:
        return [self.queue[i][2] for i in self.find(kind, src, dst)]

    def deliver_at(self, i: int) -> tuple[Any, Any, Any]:
        src, dst, payload = self.queue.pop(i)
        self.delivered.append((src, dst, payload))
        self.cluster.deliver(src, dst, payload)
        return src, dst, payload

    def deliver(self, kind: type | None = None, src: Any = None, dst: Any = None) -> Any:
        """Deliver the oldest matching message; fail if there is none."""
        found = self.find(kind, src, dst)
        assert found, f"no {kind.__name__ if kind else 'message'} from {src} to {dst} in flight"
        return self.deliver_at(found[0])[2]

    def drop(self, kind: type | None = None, src: Any = None, dst: Any = None) -> int:
        """Lose every matching message; returns how many."""
        found = set(self.find(kind, src, dst))
        self.queue = [m for i, m in enumerate(self.queue) if i not in found]
        return len(found)

    def flush_until(self, done: Callable[[], bool], *, among: set[Any] | None = None, limit: int = 100_000) -> None:
        """Deliver in order (between ``among`` only, if given) until ``done()``; fail if the network runs dry."""
        n = 0
        while not done():
            ok = [i for i, (s, d, _) in enumerate(self.queue) if among is None or (s in among and d in among)]
            assert ok, "nothing left to deliver"
            self.deliver_at(ok[0])
            n += 1
            assert n < limit, "the condition never came true"

    def flush(self, *, among: set[Any] | None = None, limit: int = 100_000) -> int:
        """Deliver in order until nothing is in flight (between ``among`` only, if given)."""
        n = 0
        while True:
            ok = [i for i, (s, d, _) in enumerate(self.queue) if among is None or (s in among and d in among)]
            if not ok:
                return n
            self.deliver_at(ok[0])
            n += 1
            assert n < limit, "messages keep flowing: the cluster does not quiesce"


# ----------------------------------------------------------------------
# The seeded driver


@attrs.define
class Knobs:
    """One scenario; every field drawn from the seed unless given."""

    n: int = 3
    fresh: bool = True
    drop: float = 0.0
    dup: float = 0.0
    delay_min: float = 0.001
    delay_max: float = 0.01
    straggle: float = 0.0  # chance that a message is held back for up to 2 s (stale replies)
    partitions: bool = False
    crashes: bool = False
    crash_in_ready: bool = False
    wipes: bool = False
    skew: bool = False
    pauses: bool = False  # a replica stops (a long GC pause, a stopped VM) and resumes where it was
    async_fsync: bool = False
    compact_every: int = 0  # applied slots between snapshots; 0 = never
    chaos: float = 1.5  # seconds of faults before the final heal
    fault_every: float = 0.3  # mean seconds between fault events
    clients: int = 3
    quota: int = 6
    leave_one_down: bool = False  # n == 5 only: one replica stays down at the end

    @classmethod
    def draw(cls, rng: random.Random, n: int, **given: Any) -> Knobs:
        k = cls(n=n)
        k.fresh = rng.random() < 0.6
        k.drop = rng.choice((0.0, 0.0, 0.02, 0.1, 0.25))
        k.dup = rng.choice((0.0, 0.0, 0.03, 0.15))
        k.delay_min = rng.choice((0.0005, 0.002))
        k.delay_max = k.delay_min + rng.choice((0.002, 0.02, 0.08, 0.3))
        k.straggle = rng.choice((0.0, 0.0, 0.01, 0.05))
        k.partitions = rng.random() < 0.5
        k.crashes = rng.random() < 0.6
        k.crash_in_ready = k.crashes and rng.random() < 0.5
        k.wipes = k.crashes and rng.random() < 0.4
        k.skew = rng.random() < 0.5
        k.pauses = rng.random() < 0.4
        k.async_fsync = rng.random() < 0.4
        k.compact_every = rng.choice((0, 2, 5, 20))
        k.chaos = rng.uniform(0.6, 2.0)
        k.fault_every = rng.uniform(0.1, 0.5)
        k.clients = rng.randint(1, 3)
        k.quota = rng.randint(2, 6)
        k.leave_one_down = n == 5 and rng.random() < 0.3
        for name, value in given.items():
            setattr(k, name, value)
        return k


class Simulation:
    """Runs one seeded scenario: chaos, final heal, then every client must finish.

    ``Simulation(seed, n).run()`` raises :class:`SimFailure` naming the seed.
    """

    #: After the final heal, clients must be done within this much simulated time
    #: (or 0.6 s per command of the whole run, if that is more: retries over slow
    #: links fill the log with duplicates and TICKs take their share).
    PROGRESS_BOUND = 12.0
    #: ... and every live replica caught up and out of recovery within this much more.
    SETTLE_BOUND = 6.0
    RETRY_AFTER = 0.4

    def __init__(self, seed: int, n: int = 3, *, cluster: Cluster | None = None, **knobs: Any) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.knobs = Knobs.draw(self.rng, n, **knobs)
        k = self.knobs
        if cluster is None:
            cluster = Cluster(n, seed=seed, fresh=k.fresh, clients=k.clients, quota=k.quota)
        self.cluster = cluster
        self.n = cluster.n
        self._heap: list[tuple[float, int, tuple]] = []
        self._seq = 0
        self.group = [0] * self.n  # partition group of each replica
        self.paused_until = [0.0] * self.n  # a paused replica handles nothing before this time
        self.final = False
        self.down_at_end: int | None = None
        cluster.net = self._net
        cluster.async_fsync = k.async_fsync
        cluster.digest_every = 4
        cluster.on_fsync_started = self._fsync_started
        if k.skew:
            for r in range(self.n):
                cluster.clock_rate[r] = self.rng.uniform(0.8, 1.25)
                cluster.clock_offset[r] = self.rng.uniform(0.0, 1000.0)
        self.trace: list[str] | None = None
        if all(node is None for node in cluster.nodes):
            cluster.boot()

    # -- scheduling -------------------------------------------------------

    def _at(self, t: float, event: tuple) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, event))

    def _fsync_started(self, r: int, life: int) -> None:
        self._at(self.cluster.now + self.rng.choice((0.0, 0.001, 0.005, 0.02)), ("fsync", r, life))

    def _net(self, src: Any, dst: Any, payload: Any) -> None:
        k = self.knobs
        drop = min(k.drop, 0.02) if self.final else k.drop
        dup = min(k.dup, 0.02) if self.final else k.dup
        copies = 1
        if self.rng.random() < drop:
            copies = 0
        elif self.rng.random() < dup:
            copies = 2
        for _ in range(copies):
            delay = self.rng.uniform(k.delay_min, k.delay_max)
            if not self.final and self.rng.random() < k.straggle:
                delay = self.rng.uniform(0.3, 2.0)
            self._at(self.cluster.now + delay, ("msg", src, dst, payload))

    def _connected(self, src: Any, dst: Any) -> bool:
        if isinstance(src, str) or isinstance(dst, str):
            return True  # clients reach every replica (they retry elsewhere anyway)
        return self.group[src] == self.group[dst]

    # -- faults -----------------------------------------------------------

    def _fault(self) -> None:
        k = self.knobs
        c = self.cluster
        choices = ["jump"] if k.skew else []
        if k.pauses:
            choices += ["pause"]
        if k.partitions:
            choices += ["partition", "heal"]
        if k.crashes:
            choices += ["crash", "restart", "restart"]
            if k.crash_in_ready:
                choices.append("crash_in_ready")
            if k.wipes:
                choices.append("wipe")
        if not choices:
            return
        what = self.rng.choice(choices)
        r = self.rng.randrange(self.n)
        did = None
        if what == "jump":
            dt = self.rng.uniform(0.0, 1.0)
            c.jump_clock(r, dt)
            did = f"clock of r{r} jumps {dt:.3f}s"
        elif what == "pause":
            self.paused_until[r] = max(self.paused_until[r], c.now + self.rng.uniform(0.1, 1.5))
            did = f"r{r} paused until {self.paused_until[r]:.3f}"
        elif what == "partition":
            groups = self.rng.randint(2, 3)
            self.group = [self.rng.randrange(groups) for _ in range(self.n)]
            did = f"partition {self.group}"
        elif what == "heal":
            self.group = [0] * self.n
            did = "heal"
        elif what == "crash" and c.alive(r):
            c.crash(r)
            did = f"crash r{r}"
        elif what == "crash_in_ready" and c.alive(r):
            c.crash_in_ready[r] = self.rng.choice(("sent_not_persisted", "persisted", "applied"))
            did = f"r{r} will crash inside its next driver pass ({c.crash_in_ready[r]})"
        elif what == "wipe" and c.can_wipe(r):
            c.crash(r, wipe=True)
            did = f"crash r{r} and wipe its disk"
        elif what == "restart":
            dead = [x for x in range(self.n) if not c.alive(x)]
            if dead:
                x = self.rng.choice(dead)
                c.start(x)
                did = f"restart r{x}"
        if did is not None:
            self._log(f"fault: {did}")

    def _final_heal(self) -> None:
        c = self.cluster
        self.final = True
        self.group = [0] * self.n
        c.crash_in_ready.clear()
        self.paused_until = [0.0] * self.n
        if self.knobs.leave_one_down and c.bootstrapped:
            self.down_at_end = self.rng.randrange(self.n)
            if c.alive(self.down_at_end):
                c.crash(self.down_at_end)
        for r in range(self.n):
            if r != self.down_at_end and not c.alive(r):
                c.start(r)
        self._log("final heal")

    # -- clients ----------------------------------------------------------

    def _client(self, i: int) -> None:
        c = self.cluster
        client = c.clients[i]
        now = c.now
        if self.rng.random() < 0.5 and client.can_submit():
            room = min(client.window - len(client.outstanding), client.quota - client.next_seq + 1)
            if room > 1 and self.rng.random() < 0.5:
                count = self.rng.randint(2, min(room, 6))
                c.submit_block(client, self.rng.randrange(self.n), count)
            else:
                count = 1
                c.submit(client, self.rng.randrange(self.n))
            for seq in range(client.next_seq - count, client.next_seq):
                client.outstanding[seq].deadline = now + self.RETRY_AFTER
        due = [seq for seq in sorted(client.outstanding) if client.outstanding[seq].deadline <= now]
        if len(due) > 1 and self.rng.random() < 0.5:
            # Like LogClient: everything due goes again at once, regrouped into blocks.
            last = client.outstanding[due[0]].replica
            others = [r for r in range(self.n) if r != last] or [last]
            c.resend_blocks(client, due, self.rng.choice(others))
            for seq in due:
                client.outstanding[seq].deadline = now + self.RETRY_AFTER
            due = []
        for seq in due:
            out = client.outstanding[seq]
            others = [r for r in range(self.n) if r != out.replica] or [out.replica]
            c.resend(client, seq, self.rng.choice(others))
            out.deadline = now + self.RETRY_AFTER

    def _log(self, line: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.cluster.now:9.4f} {line}")

    # -- the run ------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except SimFailure as exc:
            raise SimFailure(f"seed {self.seed} (n={self.n}, {self.knobs}): {exc}") from None
        except DivergenceError as exc:
            raise SimFailure(f"seed {self.seed} (n={self.n}, {self.knobs}): {exc}") from None
        except AssertionError as exc:  # an assertion inside the core or the applier
            raise SimFailure(f"seed {self.seed} (n={self.n}, {self.knobs}): internal assertion: {exc}") from exc

    def _run(self) -> None:
        c = self.cluster
        k = self.knobs
        for r in range(self.n):
            self._at(self.rng.uniform(0, 0.02), ("tick", r))
        for i in range(len(c.clients)):
            self._at(self.rng.uniform(0, 0.1), ("client", i))
        if k.chaos > 0:
            self._at(self.rng.expovariate(1 / k.fault_every), ("fault",))
        self._at(c.now + k.chaos, ("heal",))
        deadline = None  # set at the final heal
        settle_deadline = None
        target = None
        last_compact = [0] * self.n
        while self._heap:
            t, _, event = heapq.heappop(self._heap)
            c.now = max(c.now, t)
            r = event[1] if event[0] in ("tick", "fsync") else event[2] if event[0] == "msg" else None
            if isinstance(r, int) and self.paused_until[r] > c.now:
                # Everything for a paused replica waits (in order) until it resumes.
                self._seq += 1
                heapq.heappush(self._heap, (self.paused_until[r], self._seq, event))
                continue
            match event:
                case ("tick", r):
                    c.tick(r)
                    self._at(c.now + self.rng.uniform(0.01, 0.03), ("tick", r))
                case ("msg", src, dst, payload):
                    if self._connected(src, dst):
                        if self.trace is not None:
                            self._log(f"{src}->{dst} {payload!r}"[:300])
                        c.deliver(src, dst, payload)
                case ("fsync", r, life):
                    c.fsync_done(r, life)
                case ("client", i):
                    self._client(i)
                    if not c.clients[i].done:
                        self._at(c.now + self.rng.uniform(0.02, 0.1), ("client", i))
                case ("fault",):
                    if not self.final:
                        self._fault()
                        self._at(c.now + self.rng.expovariate(1 / k.fault_every), ("fault",))
                case ("heal",):
                    self._final_heal()
                    bound = max(self.PROGRESS_BOUND, 0.6 * sum(cl.quota for cl in c.clients))
                    deadline = c.now + bound
            if k.compact_every:
                # Snapshot now and then, as a driver does after applying.
                node = c.nodes[r] if isinstance(r, int) else None
                if node is not None and node.applier.applied - last_compact[r] >= k.compact_every:
                    last_compact[r] = node.applier.applied
                    c.compact(r)
            c.check_step()
            if deadline is None:
                continue
            if target is None:
                if all(cl.done for cl in c.clients):
                    # Every slot any replica ever applied (an acknowledged command's
                    # included, even if that replica lost it since in a power cut).
                    target = max(
                        max(n.applier.applied for n in c.nodes if n is not None),
                        max(c.checker.digests, default=0),
                    )
                    settle_deadline = c.now + self.SETTLE_BOUND
                elif c.now > deadline:
                    missing = {cl.cid: sorted(cl.outstanding) for cl in c.clients if not cl.done}
                    raise SimFailure(
                        f"no progress: {bound:.1f}s after the final heal clients still wait for "
                        f"{missing}; {self.describe()}"
                    )
            else:
                live = [n for n in c.nodes if n is not None]
                if all(n.applier.applied >= target and n.core.role is not Role.RECOVERING for n in live):
                    break
                if c.now > settle_deadline:
                    raise SimFailure(
                        f"replicas did not catch up to slot {target} within {self.SETTLE_BOUND}s: {self.describe()}"
                    )
        c.check_final()

    def describe(self) -> str:
        c = self.cluster
        parts = []
        for r, node in enumerate(c.nodes):
            if node is None:
                parts.append(f"r{r}=down")
            else:
                core = node.core
                parts.append(
                    f"r{r}={core.role.value}/b{core.ballot}/p{core.promised}"
                    f"/c{core.commit_index}/a{node.applier.applied}"
                )
        return " ".join(parts)


def run_seed(seed: int, n: int = 3, **knobs: Any) -> Simulation:
    """Run one seeded scenario; raises SimFailure (naming the seed) if an invariant breaks."""
    sim = Simulation(seed, n, **knobs)
    sim.run()
    return sim


if __name__ == "__main__":  # python tests/sim.py SEED [N]: replay one seed, print its last events
    import sys

    seed_arg = int(sys.argv[1])
    n_arg = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    s = Simulation(seed_arg, n_arg)
    s.trace = []
    try:
        s.run()
        print("ok", s.knobs, s.describe())
    finally:
        print("\n".join(s.trace[-200:]))
