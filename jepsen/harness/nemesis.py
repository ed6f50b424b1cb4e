"""Nemeses: faults with a start and a stop, and the seeded schedule that drives them.

A nemesis draws everything random (how long a fault lasts, which side of a
partition a process lands on, which client is cut off) from the scenario's
``random.Random`` when the schedule is made, so one seed always gives the
same schedule.  What it cannot know in advance -- which replica leads when
the fault starts -- it looks up then and records in the event log.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jepsen.harness.cluster import ELECTION_TIMEOUT, Cluster
from jepsen.harness.monitor import Monitor
from jepsen.harness.net import NetError, Network

LEADER_WAIT = 5.0
# tc netem: delay with jitter, loss, duplication and reordering on each replica's eth0.
NETEM_SPEC = ["delay", "40ms", "20ms", "loss", "5%", "duplicate", "5%", "reorder", "10%", "50%"]
# The same impairment done in userspace through NFQUEUE (jepsen/harness/nfq.py) when the kernel
# has no netem qdisc.
NFQ_SCRIPT = Path(__file__).resolve().with_name("nfq.py")
NFQ_MARK = 0x7A  # the handler's duplicates carry it, and the NFQUEUE rule skips it
NFQ_SPEC = {"delay": 0.04, "jitter": 0.02, "loss": 0.05, "duplicate": 0.05, "reorder": 0.10}
NFQ_READY_WAIT = 5.0
FALLBACK_LOSS = 0.05
# Where Debian's libfaketime package puts the multithreaded preload library.
FAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)


class Nemesis:
    name = "?"
    replicas: int | None = None  # a scenario that needs a replica count says so (else --replicas)

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
        return dict(params)

    def stop(self):
        for x in self.active["a"] + self.active["b"]:
            self.net.heal(x)
        return {"healed": sorted(self.active["a"] + self.active["b"])}


class MajoritiesRing(Nemesis):
    """Five replicas in a seeded ring; each sees only its two neighbours.

    Every replica then sees a majority (itself and two others), and no two
    replicas see the same majority -- Jepsen's ring partition.  Clients keep
    reaching every replica.
    """

    name = "majorities-ring"
    replicas = 5

    def params(self, rng):
        ring = list(self.cluster.replica_names)
        rng.shuffle(ring)
        return {"ring": ring}

    def start(self, params):
        ring = params["ring"]
        n = len(ring)
        views = {}
        for i, r in enumerate(ring):
            sees = {ring[(i - 1) % n], ring[(i + 1) % n]}
            self.net.drop_between(r, [o for o in ring if o != r and o not in sees])
            views[r] = sorted(sees | {r})
        self.active = params
        return {"ring": ring, "sees": views}

    def stop(self):
        for r in self.active["ring"]:
            self.net.heal(r)
        return {"healed": sorted(self.active["ring"])}


class Bridge(PartitionHalves):
    """Two halves of two replicas each that cannot reach each other, and one replica that reaches both."""

    name = "bridge"
    replicas = 5

    def params(self, rng):
        reps = list(self.cluster.replica_names)
        rng.shuffle(reps)
        half = (len(reps) - 1) // 2
        return {"a": sorted(reps[:half]), "bridge": reps[half], "b": sorted(reps[half + 1 :])}


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


class KillMinority(Nemesis):
    """kill -9 a seeded random minority of the replicas (1 of 3, 2 of 5); restart them when the fault ends."""

    name = "kill-minority"

    def hold(self, rng):
        return rng.uniform(1.0, 5.0)

    def params(self, rng):
        names = self.cluster.replica_names
        return {"victims": sorted(rng.sample(names, (len(names) - 1) // 2))}

    def start(self, params):
        leader = self.monitor.leader()
        killed = []
        for short in params["victims"]:
            proc = self.cluster.replicas[self.cluster.replica_names.index(short)]
            killed.append({"replica": short, "pid": proc.pid})
            proc.kill9()
        self.active = params
        return {"killed": killed, "leader_was": None if leader is None else self.cluster.replica_names[leader]}

    def stop(self):
        restarted = []
        for short in self.active["victims"]:
            proc = self.cluster.replicas[self.cluster.replica_names.index(short)]
            if not proc.alive():
                proc.start()
                restarted.append(short)
        return {"restarted": restarted}


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


def faketime_library() -> str | None:
    """Path of libfaketime's multithreaded preload library, or None if it is not installed."""
    for pattern in FAKETIME_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def faketime_env(spec: str) -> list[str]:
    """An ``env ...`` prefix running a command under libfaketime with ``FAKETIME=spec``.

    Both ``time.time()`` and ``time.monotonic()`` are faked (libfaketime fakes
    CLOCK_MONOTONIC unless FAKETIME_DONT_FAKE_MONOTONIC=1, which we force off),
    and so are sleeps and poll/epoll timeouts, so a rate ``xR`` makes the
    process's timers run R times as fast as real time.
    """
    lib = faketime_library()
    if lib is None:
        raise NetError("libfaketime is not installed (jepsen/setup.sh installs the faketime package)")
    return ["env", f"LD_PRELOAD={lib}", f"FAKETIME={spec}", "FAKETIME_DONT_FAKE_MONOTONIC=0", "FAKETIME_DONT_RESET=1"]


def measure_skew(wrap: list[str]) -> dict[str, Any] | None:
    """Run a tiny Python under ``wrap``: where its time.time() and time.monotonic() stand.

    The child reads its clocks once, at some real instant between our two
    readings before and after it ran, so its wall-clock offset lies in
    ``wall_offset_bounds`` (widened by start-up time, never by skew).
    ``monotonic_offset`` is how far its monotonic clock is from ours (huge:
    libfaketime starts a faked monotonic clock at the faked wall time).
    """
    code = "import time,json;print(json.dumps([time.time(),time.monotonic()]))"
    before_mono, before_wall = time.monotonic(), time.time()
    try:
        out = subprocess.run([*wrap, sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
        wall, mono = json.loads(out.stdout)
    except (subprocess.TimeoutExpired, ValueError, TypeError):
        return None
    after_wall = time.time()
    return {
        "wall_offset_bounds": [round(wall - after_wall, 3), round(wall - before_wall, 3)],
        "monotonic_offset": round(mono - before_mono, 1),
    }


class ClockSkew(Nemesis):
    """Restart one replica under libfaketime with a skewed, fast or slow clock; later restart it normally.

    The offset (ahead by 1-5 s or behind by 2-30 s) and rate (0.5x-2x) are
    seeded; the replica is the leader or a seeded one.  With ``lead`` the
    nemesis then SIGSTOPs whoever leads (up to twice, 1.3 s each, longer than
    the longest election timeout) so that the skewed replica may win an
    election: the leader's clock is the one in every TICK.  Safety must not
    depend on any of this; only progress may suffer.
    """

    name = "clock-skew"

    def hold(self, rng):
        return rng.uniform(4.0, 8.0)

    def params(self, rng):
        if rng.random() < 0.4:
            offset = rng.uniform(1.0, 5.0)
        else:
            offset = -rng.uniform(2.0, 30.0)
        rate = rng.choice([0.5, 0.8, 1.0, 1.25, 2.0])
        target = "leader" if rng.random() < 0.5 else rng.choice(self.cluster.replica_names)
        return {"offset": round(offset, 1), "rate": rate, "target": target, "lead": rng.random() < 0.7}

    def start(self, params):
        if params["target"] == "leader":
            leader = self._leader()
            rid = leader if leader >= 0 else 0
        else:
            rid = self.cluster.replica_names.index(params["target"])
        proc = self.cluster.replicas[rid]
        spec = f"{params['offset']:+.1f}s x{params['rate']}"
        wrap = faketime_env(spec)
        old_pid = proc.pid
        proc.kill9()
        proc.start(wrap=wrap)
        self.active = {"rid": rid}
        out: dict[str, Any] = {
            "skewed": proc.short,
            "faketime": spec,
            "killed_pid": old_pid,
            "pid": proc.pid,
            "measured": measure_skew(wrap),
        }
        if params.get("lead"):
            out["handover"] = self._hand_over(rid)
        return out

    def _hand_over(self, rid: int) -> list[dict[str, Any]]:
        """Pause whoever leads (at most twice) so that replica ``rid`` may take over."""
        steps = []
        for _ in range(2):
            leader = self.monitor.wait_leader(3.0)
            if leader is None or leader == rid:
                break
            other = self.cluster.replicas[leader]
            other.signal(signal.SIGSTOP)
            time.sleep(max(1.3, 4 * ELECTION_TIMEOUT))
            other.signal(signal.SIGCONT)
            steps.append({"paused": other.short})
            time.sleep(0.5)
        leader = self.monitor.wait_leader(2.0)
        steps.append(
            {
                "leader_now": None if leader is None else self.cluster.replica_names[leader],
                "skewed_leads": leader == rid,
            }
        )
        return steps

    def stop(self):
        proc = self.cluster.replicas[self.active["rid"]]
        proc.kill9()
        proc.start()
        return {"unskewed": proc.short, "pid": proc.pid}


class Netem(Nemesis):
    """Delay + jitter + loss + duplication + reordering of every replica's outgoing packets.

    With ``tc qdisc ... netem`` when the kernel has it; otherwise in userspace: an iptables
    NFQUEUE rule on each replica's egress hands packets to ``nfq.py`` running in that
    namespace, which holds, drops, duplicates and releases them out of order (see its
    docstring).  Only if NFQUEUE is unavailable too does it fall back to iptables random loss.
    The start event's ``mode`` says which mechanism was applied.
    """

    name = "netem"

    def hold(self, rng):
        return rng.uniform(3.0, 6.0)

    def params(self, rng):
        return {"seed": rng.randrange(2**31)}

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
        for r in names:
            self.net.netem_clear(r)
        why = self._start_nfq(names, params.get("seed", 0))
        if why is None:
            self.active = {"mode": "nfqueue"}
            return {
                "replicas": names,
                "mode": "nfqueue",
                "nfqueue": NFQ_SPEC,
                "note": "kernel lacks the netem qdisc; userspace NFQUEUE handler on each replica's egress",
            }
        # Neither netem nor NFQUEUE: random loss with iptables (no delay, duplication or reordering).
        for r in names:
            self.net.random_loss(r, FALLBACK_LOSS)
        self.active = {"mode": "iptables-loss"}
        return {
            "replicas": names,
            "mode": "iptables-loss",
            "loss": FALLBACK_LOSS,
            "note": f"kernel lacks the netem qdisc and NFQUEUE failed ({why}); random loss only",
        }

    def _start_nfq(self, names: list[str], seed: int) -> str | None:
        """Start one handler per replica namespace and queue its egress; None, or why it failed."""
        self.handlers: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.nfq_runs = getattr(self, "nfq_runs", 0) + 1
        for i, r in enumerate(names):
            out = self.cluster.rundir / f"nfq-{r}-{self.nfq_runs}.log"
            args = [f"--{k}={v}" for k, v in NFQ_SPEC.items()]
            with open(out, "wb") as f:
                proc = subprocess.Popen(
                    self.net.exec_prefix(r)
                    + [sys.executable, str(NFQ_SCRIPT), "--mark", str(NFQ_MARK), "--seed", str(seed + i), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=self.cluster.env,
                    start_new_session=True,
                )
            self.cluster.aux.append(proc)
            self.handlers[r] = (proc, out)
        deadline = time.monotonic() + NFQ_READY_WAIT
        for r, (proc, out) in self.handlers.items():
            while '"ready"' not in _tail(out):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self._stop_nfq()
                    return f"handler in {r}: {_tail(out)[-300:].strip() or 'not ready'}"
                time.sleep(0.02)
        for r in names:
            self.net.queue_egress(r, NFQ_MARK)
        return None

    def _stop_nfq(self) -> dict[str, Any]:
        """Remove the rules, then let each handler release what it holds and exit; its counts."""
        counts = {}
        for r in self.handlers:
            self.net.heal(r)
        for r, (proc, out) in self.handlers.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc in self.cluster.aux:
                self.cluster.aux.remove(proc)
            lines = [ln for ln in _tail(out).splitlines() if ln.startswith("{")]
            try:
                counts[r] = json.loads(lines[-1])
            except (IndexError, ValueError):
                counts[r] = None
        self.handlers = {}
        return counts

    def stop(self):
        mode = self.active["mode"]
        out: dict[str, Any] = {"cleared": list(self.cluster.replica_names), "mode": mode}
        if mode == "netem":
            for r in self.cluster.replica_names:
                self.net.netem_clear(r)
        elif mode == "nfqueue":
            out["packets"] = self._stop_nfq()
        else:
            for r in self.cluster.replica_names:
                self.net.heal(r)
        return out


def _tail(path: Path, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


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


class Mixed(Nemesis):
    """Several fault kinds over one run, sometimes two at once.

    Each step of the seeded schedule is either one fault of any kind, or a
    network fault and a process fault held together (a partition while the
    leader is paused, packet impairment while a minority is down, ...).
    At most one fault of each of the two families is active at a time, so
    their iptables rules and signals never step on each other.  Faults start
    in order and stop in reverse order.
    """

    name = "mixed"

    NETWORK = ["partition-leader", "partition-halves", "isolate-client", "netem"]
    NETWORK_5 = ["majorities-ring", "bridge"]
    PROCESS = ["kill-leader", "kill-minority", "pause-leader", "clock-skew"]
    ALONE = ["kill-all"]

    def __init__(self, net, cluster, monitor):
        super().__init__(net, cluster, monitor)
        self.network = list(self.NETWORK) + (self.NETWORK_5 if len(cluster.replica_names) == 5 else [])
        self.subs = {k: NEMESES[k](net, cluster, monitor) for k in self.network + self.PROCESS + self.ALONE}
        self.running: list[str] = []

    def hold(self, rng):
        return 0.0  # drawn in params(): the longest hold of the faults combined

    def params(self, rng):
        if rng.random() < 0.5:
            kinds = [rng.choice(self.network + self.PROCESS + self.ALONE)]
        else:
            kinds = [rng.choice(self.network), rng.choice(self.PROCESS)]
        return {
            "faults": [{"kind": k, "params": self.subs[k].params(rng)} for k in kinds],
            "hold": round(max(self.subs[k].hold(rng) for k in kinds), 3),
        }

    def start(self, params):
        parts = []
        self.running = []
        for f in params["faults"]:
            parts.append({"kind": f["kind"], **self.subs[f["kind"]].start(f["params"])})
            self.running.append(f["kind"])
        return {"kinds": list(self.running), "parts": parts}

    def stop(self):
        parts = []
        for kind in reversed(self.running):
            parts.append({"kind": kind, **self.subs[kind].stop()})
        self.running = []
        return {"parts": parts}


NEMESES = {
    cls.name: cls
    for cls in (
        PartitionLeader,
        PartitionHalves,
        MajoritiesRing,
        Bridge,
        KillLeader,
        KillMinority,
        KillAll,
        PauseLeader,
        ClockSkew,
        Netem,
        IsolateClient,
        Mixed,
    )
}


def schedule(nemesis: Nemesis, rng: random.Random, start: float, end: float) -> list[dict[str, Any]]:
    """Faults at seeded times in [start, end): each {at, hold, params}; the last heals before ``end``."""
    plan = []
    t = start + rng.uniform(0.0, 1.0)
    while True:
        hold, params = _draw(nemesis, rng)
        if t + hold > end:
            break
        plan.append({"at": round(t, 3), "hold": hold, "params": params})
        t += hold + rng.uniform(1.5, 3.5)
    if not plan:  # a very short run still gets one fault
        hold, params = _draw(nemesis, rng)
        plan.append({"at": round(start, 3), "hold": round(min(hold, max(0.5, end - start)), 3), "params": params})
    return plan


def _draw(nemesis: Nemesis, rng: random.Random) -> tuple[float, dict[str, Any]]:
    hold = round(nemesis.hold(rng), 3)
    params = nemesis.params(rng)
    return params.get("hold", hold), params


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
    # Packet-queue handlers: their rules are gone, so they hold nothing new; let them release and exit.
    for a in list(cluster.aux):
        if a.poll() is None:
            a.send_signal(signal.SIGTERM)
            try:
                a.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
        cluster.aux.remove(a)


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
        log.append(
            {
                "t": now(),
                "event": "start",
                "fault": nemesis.name,
                "n": i,
                "planned": step["at"],
                **nemesis.start(step["params"]),
            }
        )
        try:
            wait_until(step["at"] + step["hold"])
        finally:
            log.append({"t": now(), "event": "stop", "fault": nemesis.name, "n": i, **nemesis.stop()})
