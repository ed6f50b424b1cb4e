"""The seeded driver: draws a scenario from one integer, runs chaos, heals, then requires every client to finish."""

from __future__ import annotations

import heapq
import random
from typing import Any

import attrs

from tasksprint.driver import DivergenceError
from tasksprint.paxos.core import Role

from .cluster import Cluster
from .common import SimFailure, sim_config


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
    frame_cap: int = 0  # bytes: larger peer messages are split (or dropped) as a replica's Outbox does; 0 = none
    #: A crashed replica's peers see its connections close (PaxosCore.peer_closed),
    #: and now and then a live replica's connection closes too (a reset).
    closes: bool = False

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
        k.closes = rng.random() < 0.7
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
        if "frame_cap" not in knobs and cluster is None:
            # From a stream of its own, so every other draw of a seed stays as it was.  Only
            # for the clients this simulation sizes: a value alone over the cap cannot be sent.
            k.frame_cap = random.Random(seed ^ 0xF7A3E).choice((0, 0, 200, 320))
        if cluster is None:
            config = sim_config(n)
            if k.frame_cap:
                # As a replica's configuration does: a slot's value (a batch of
                # commands) stays well under the frame cap, so a message that
                # carries one value always fits; only multi-value ones split.
                config = attrs.evolve(config, max_batch_bytes=k.frame_cap // 2)
            cluster = Cluster(n, seed=seed, fresh=k.fresh, clients=k.clients, quota=k.quota, config=config)
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
        cluster.frame_cap = k.frame_cap
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
        if k.closes:
            choices.append("reset")
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
            self._closed(r)
            did = f"crash r{r}"
        elif what == "crash_in_ready" and c.alive(r):
            c.crash_in_ready[r] = self.rng.choice(("sent_not_persisted", "persisted", "applied"))
            did = f"r{r} will crash inside its next driver pass ({c.crash_in_ready[r]})"
        elif what == "wipe" and c.can_wipe(r):
            c.crash(r, wipe=True)
            self._closed(r)
            did = f"crash r{r} and wipe its disk"
        elif what == "reset" and c.alive(r):
            # A connection of a live replica closes: its peer must not depose it for that alone.
            o = self.rng.choice([x for x in range(self.n) if x != r])
            self._at(c.now + self.rng.uniform(k.delay_min, k.delay_max), ("closed", r, o))
            did = f"connection r{r}->r{o} reset"
        elif what == "restart":
            dead = [x for x in range(self.n) if not c.alive(x)]
            if dead:
                x = self.rng.choice(dead)
                c.start(x)
                did = f"restart r{x}"
        if did is not None:
            self._log(f"fault: {did}")

    def _closed(self, r: int) -> None:
        """Replica ``r``'s process died: its peers see its connections close, after a network delay."""
        k = self.knobs
        if not k.closes:
            return
        for o in range(self.n):
            if o != r:
                self._at(self.cluster.now + self.rng.uniform(k.delay_min, k.delay_max), ("closed", r, o))

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
            r = event[1] if event[0] in ("tick", "fsync") else event[2] if event[0] in ("msg", "closed") else None
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
                case ("closed", src, dst):
                    # Only a connection that was up can close: not across a partition.
                    if self._connected(src, dst):
                        self._log(f"r{dst} sees the connection of r{src} close")
                        c.peer_closed(src, dst)
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
                        f"{missing}; {self.describe()}; "
                        f"{c.oversized_dropped} messages of one value over the frame cap dropped"
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
