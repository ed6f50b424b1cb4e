"""The simulated world: N replicas, their disks, the clients and the checker, with no policy of its own."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from tasksprint import codec
from tasksprint.api import BlockResult, PeerDigest, Result
from tasksprint.app import KVApp
from tasksprint.driver import DriverConfig, ReplicaDriver
from tasksprint.machine import DUPLICATE, Applier, ApplyContext, KVMachine
from tasksprint.outbox import split_message
from tasksprint.paxos.core import PaxosConfig, PaxosCore, Role
from tasksprint.paxos.durable import (
    DurableState,
    MarkInitialized,
)
from tasksprint.paxos.messages import (
    Accepted,
    Batch,
    Command,
    CommandBlock,
    Promise,
    SnapshotInstall,
)

from .adapters import CheckedApplier, Link, Node, SimDisk, SimWriter
from .checker import Checker
from .clients import Client, Outstanding
from .common import KEYS, Crashed, load, sim_config


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
        self.digest_every = 1  # slots applied between digest reports (a driver answers nobody before they agree)
        self.on_fsync_started: Callable[[int, int], None] = lambda rid, life: None
        self.clients = [Client(f"c{i}", quota, window) for i in range(clients)]
        self.steps = 0
        # Encoded size above which a peer message is split as a replica's
        # Outbox splits it (or dropped, if it cannot be); 0: no cap.
        self.frame_cap = 0
        self.oversized_dropped = 0

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
        for part in self._fit(msg):
            self.net(r, dst, part)

    def _fit(self, msg: Any) -> list[Any]:
        """``msg`` as the frames a replica's Outbox would send under ``frame_cap``.

        A snapshot is exempt: the cap here is small so that multi-value
        messages split often, and the state a snapshot carries outgrows it.
        """
        if not self.frame_cap or isinstance(msg, SnapshotInstall) or len(codec.encode(msg)) <= self.frame_cap:
            return [msg]
        parts = split_message(msg)
        if parts is None:
            self.oversized_dropped += 1
            return []
        return [frame for part in parts for frame in self._fit(part)]

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

    def peer_closed(self, src: int, dst: int) -> None:
        """Replica ``dst`` sees replica ``src`` close its connection (see ``PaxosCore.peer_closed``)."""
        node = self.nodes[dst]
        if node is None:
            return
        node.driver.peer_closed(src)
        self.drain(dst)

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
        if self.oversized_dropped:
            self.checker.fail(f"{self.oversized_dropped} messages of one value over the frame cap were dropped")
        for node in self.nodes:
            if node is None:
                continue
            for (cid, seq), result in sorted(self.checker.acked.items()):
                cmd = self.checker.submitted[(cid, seq)]
                key, value = cmd.op[1], cmd.op[2]
                lst = _kv(node.applier, key)
                if lst.count(value) != 1 or not (isinstance(result, int) and lst[result - 1] == value):
                    self.checker.fail(
                        f"acknowledged {cid}:{seq} (answer {result!r}) is not at its place in replica "
                        f"{node.rid}'s {key} = {lst} (applied up to {node.applier.applied})"
                    )
