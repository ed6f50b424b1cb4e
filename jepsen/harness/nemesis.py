"""Nemeses: faults with a start and a stop, and the seeded schedule that drives them.

A nemesis draws everything random (how long a fault lasts, which side of a
partition a process lands on, which client is cut off) from the scenario's
``random.Random`` when the schedule is made, so one seed always gives the
same schedule.  What it cannot know in advance -- which replica leads when
the fault starts -- it looks up then and records in the event log.
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

from jepsen.harness.cluster import ELECTION_TIMEOUT, Cluster
from jepsen.harness.monitor import Monitor
from jepsen.harness.net import NetError, Network

LEADER_WAIT = 5.0
# tc netem: delay with jitter, loss, duplication and reordering on each replica's eth0.
NETEM_SPEC = ["delay", "40ms", "20ms", "loss", "5%", "duplicate", "5%", "reorder", "10%", "50%"]
FALLBACK_LOSS = 0.05


class Nemesis:
    name = "?"

    def __init__(self, net: Network, cluster: Cluster, monitor: Monitor) -> None:
        self.net, self.cluster, self.monitor = net, cluster, monitor
        self.active: dict[str, Any] | None = None

    # Drawn when the schedule is made.
    def hold(self, rng: random.Random) -> float:
        return rng.uniform(2.0, 5.0)

    def params(self, rng: random.Random) -> dict[str, Any]:
        return {}

    # Run time.
    def start(self, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        raise NotImplementedError

    def _leader(self) -> int:
        leader = self.monitor.wait_leader(LEADER_WAIT)
        if leader is None:
            # No leader visible: hit replica 0 so the fault still happens (recorded as such).
            return -1
        return leader


class PartitionLeader(Nemesis):
    """Cut the current leader's namespace off the bridge (iptables DROP in and out)."""

    name = "partition-leader"

    def start(self, params):
        leader = self._leader()
        rid = leader if leader >= 0 else 0
        short = self.cluster.replica_names[rid]
        self.net.drop_all(short)
        self.active = {"isolated": short}
        return {"isolated": short, "leader_known": leader >= 0}

    def stop(self):
        short = self.active["isolated"]
        self.net.heal(short)
        return {"healed": short}


class PartitionHalves(Nemesis):
    """Split replicas (and clients) into two random sides; iptables DROP between them."""

    name = "partition-halves"

    def params(self, rng):
        reps = list(self.cluster.replica_names)
        rng.shuffle(reps)
        k = rng.randint(1, (len(reps) - 1) // 2)
        side_a, side_b = reps[:k], reps[k:]
        for c in self.cluster.client_names:
            (side_a if rng.random() < 0.5 else side_b).append(c)
        return {"a": sorted(side_a), "b": sorted(side_b)}

    def start(self, params):
        a, b = params["a"], params["b"]
        for x in a:
            self.net.drop_between(x, b)
        for y in b:
            self.net.drop_between(y, a)
        self.active = params
        return {"a": a, "b": b}

    def stop(self):
        for x in self.active["a"] + self.active["b"]:
            self.net.heal(x)
        return {"healed": sorted(self.active["a"] + self.active["b"])}


class KillLeader(Nemesis):
    """kill -9 the leader replica; restart it when the fault ends."""

    name = "kill-leader"

    def hold(self, rng):
        return rng.uniform(1.0, 4.0)

    def start(self, params):
        leader = self._leader()
        rid = leader if leader >= 0 else 0
        proc = self.cluster.replicas[rid]
        pid = proc.pid
        proc.kill9()
        self.active = {"rid": rid}
        return {"killed": proc.short, "pid": pid, "leader_known": leader >= 0}

    def stop(self):
        proc = self.cluster.replicas[self.active["rid"]]
        proc.start()
        return {"restarted": proc.short, "pid": proc.pid}


class KillAll(Nemesis):
    """kill -9 every replica at once; restart them all when the fault ends."""

    name = "kill-all"

    def hold(self, rng):
        return rng.uniform(0.5, 3.0)

    def start(self, params):
        killed = []
        for proc in self.cluster.replicas:
            killed.append({"replica": proc.short, "pid": proc.pid})
            proc.kill9()
        return {"killed": killed}

    def stop(self):
        for proc in self.cluster.replicas:
            if not proc.alive():
                proc.start()
        return {"restarted": [p.short for p in self.cluster.replicas]}


class PauseLeader(Nemesis):
    """SIGSTOP the leader for longer than the election timeout; SIGCONT it."""

    name = "pause-leader"

    def hold(self, rng):
        # At least 3x the longest randomized election timeout (2 x ELECTION_TIMEOUT).
        return rng.uniform(6 * ELECTION_TIMEOUT, 4.0)

    def start(self, params):
        leader = self._leader()
        rid = leader if leader >= 0 else 0
        proc = self.cluster.replicas[rid]
        proc.signal(signal.SIGSTOP)
        self.active = {"rid": rid}
        return {"paused": proc.short, "pid": proc.pid, "leader_known": leader >= 0}

    def stop(self):
        proc = self.cluster.replicas[self.active["rid"]]
        proc.signal(signal.SIGCONT)
        return {"resumed": proc.short}


class Netem(Nemesis):
    """tc netem delay + loss + duplicate + reorder on every replica's veth."""

    name = "netem"

    def hold(self, rng):
        return rng.uniform(3.0, 6.0)

    def start(self, params):
        names = list(self.cluster.replica_names)
        try:
            for r in names:
                self.net.netem(r, NETEM_SPEC)
            self.active = {"mode": "netem"}
            return {"replicas": names, "mode": "netem", "netem": " ".join(NETEM_SPEC)}
        except NetError as exc:
            if "unknown" not in str(exc):
                raise
        # This kernel has no sch_netem: fall back to random loss with iptables (no delay,
        # duplication or reordering), and say so in the event log.
        for r in names:
            self.net.netem_clear(r)
            self.net.random_loss(r, FALLBACK_LOSS)
        self.active = {"mode": "iptables-loss"}
        return {"replicas": names, "mode": "iptables-loss", "loss": FALLBACK_LOSS,
                "note": "kernel lacks the netem qdisc; random loss only"}

    def stop(self):
        for r in self.cluster.replica_names:
            if self.active["mode"] == "netem":
                self.net.netem_clear(r)
            else:
                self.net.heal(r)
        return {"cleared": list(self.cluster.replica_names), "mode": self.active["mode"]}


class IsolateClient(Nemesis):
    """Cut one worker client's namespace off the bridge; sometimes long enough to be declared dead."""

    name = "isolate-client"

    def hold(self, rng):
        return rng.uniform(2.0, 7.0)

    def params(self, rng):
        return {"client": rng.choice(self.cluster.client_names)}

    def start(self, params):
        self.net.drop_all(params["client"])
        self.active = params
        return {"isolated": params["client"]}

    def stop(self):
        self.net.heal(self.active["client"])
        return {"healed": self.active["client"]}


NEMESES = {cls.name: cls for cls in (PartitionLeader, PartitionHalves, KillLeader, KillAll, PauseLeader, Netem,
                                     IsolateClient)}


def schedule(nemesis: Nemesis, rng: random.Random, start: float, end: float) -> list[dict[str, Any]]:
    """Faults at seeded times in [start, end): each {at, hold, params}; the last heals before ``end``."""
    plan = []
    t = start + rng.uniform(0.0, 1.0)
    while True:
        hold = round(nemesis.hold(rng), 3)
        if t + hold > end:
            break
        plan.append({"at": round(t, 3), "hold": hold, "params": nemesis.params(rng)})
        t += hold + rng.uniform(1.5, 3.5)
    if not plan:  # a very short run still gets one fault
        hold = round(min(nemesis.hold(rng), max(0.5, end - start)), 3)
        plan.append({"at": round(start, 3), "hold": hold, "params": nemesis.params(rng)})
    return plan


def heal_everything(net: Network, cluster: Cluster) -> None:
    """Undo every kind of fault, whatever state a nemesis was left in."""
    for short in cluster.replica_names + cluster.client_names:
        try:
            net.heal(short)
            net.netem_clear(short)
        except Exception:
            pass
    for proc in cluster.replicas:
        if proc.stopped:
            proc.signal(signal.SIGCONT)


def run_schedule(nemesis: Nemesis, plan: list[dict], t0: float, log: list[dict], should_stop) -> None:
    """Apply ``plan`` (times relative to ``t0``), appending (time, fault) events to ``log``."""

    def now() -> float:
        return round(time.monotonic() - t0, 3)

    def wait_until(t: float) -> bool:
        while time.monotonic() - t0 < t:
            if should_stop():
                return False
            time.sleep(min(0.05, max(0.0, t - (time.monotonic() - t0))))
        return True

    for i, step in enumerate(plan):
        if not wait_until(step["at"]):
            return
        log.append({"t": now(), "event": "start", "fault": nemesis.name, "n": i, "planned": step["at"],
                    **nemesis.start(step["params"])})
        try:
            wait_until(step["at"] + step["hold"])
        finally:
            log.append({"t": now(), "event": "stop", "fault": nemesis.name, "n": i, **nemesis.stop()})
