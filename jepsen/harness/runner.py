"""``jepsen/run``: scenarios, each a fresh cluster, one nemesis, a workload and checkers."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import attrs

from jepsen.harness import checkers
from jepsen.harness import net as netmod
from jepsen.harness.cluster import Cluster, leftovers
from jepsen.harness.monitor import CancelOps, CliOps, Monitor
from jepsen.harness.nemesis import NEMESES, faketime_library, heal_everything, run_schedule, schedule
from jepsen.workload.scheduler import newest_decoy

JEPSEN_DIR = Path(__file__).resolve().parents[1]
WORKLOAD = JEPSEN_DIR / "workload"
SETUP_SH = JEPSEN_DIR / "setup.sh"

WARMUP = 3.0  # seconds after start before the first fault
TAIL = 6.0  # the workload keeps making tasks this long after the last fault's window
START_BOUND = 60.0  # for the computation to start running
FINISH_BOUND = 120.0  # after the last heal, for the computation to finish
CLIENT_TIMEOUT = 3.0
SLOTS = 2
WIDTH = 6


def say(msg: str) -> None:
    print(f"jepsen: {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    """Install iptables / iproute2 / libfaketime when missing (jepsen/setup.sh), saying so on stderr."""
    if all(shutil.which(t) for t in ("ip", "tc", "iptables")) and faketime_library() is not None:
        return
    say("iptables, iproute2 or libfaketime missing: installing with apt-get (jepsen/setup.sh)")
    subprocess.run(["sh", str(SETUP_SH)], check=True)


def scenario_replicas(name: str, default: int) -> int:
    """The replica count a scenario runs with: its own if it declares one, else --replicas."""
    return NEMESES[name].replicas or default


def scenario_seed(seed: int, scenario: str) -> int:
    return random.Random(f"{seed}:{scenario}").randrange(2**31)


def write_scheduler(dest: Path, seed: int, run_for: float) -> str:
    src = (WORKLOAD / "scheduler.py").read_text()
    for name, value in (("WORKLOAD_SEED", seed), ("RUN_FOR", run_for), ("WIDTH", WIDTH)):
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", src, count=1, flags=re.M)
        assert n == 1, name
    dest.write_text(src)
    return f"{dest}:JepsenWaves"


class Interrupted(BaseException):
    pass


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mark = f"tsj-{os.getpid()}-{os.urandom(4).hex()}"
        self.net = netmod.Network(f"tsj-{os.getpid()}-")
        self.cluster: Cluster | None = None
        self.base = Path(tempfile.mkdtemp(prefix="tsj-run-"))

    # ------------------------------------------------------------------

    def setup_network(self, replicas: int) -> None:
        members = [(f"r{i}", 10 + i) for i in range(replicas)]
        members += [(f"c{i}", 100 + i) for i in range(self.args.clients)]
        members += [("ctl", 250)]
        self.net.create(members)
        self.net.enter("ctl")

    def teardown(self) -> dict[str, Any]:
        if self.cluster is not None:
            heal_everything(self.net, self.cluster)
            self.cluster.stop()
        left_procs = leftovers(self.mark)
        for pid in left_procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left_ns = self.net.teardown()
        return {"leftover_processes_killed": left_procs, "namespaces_left": left_ns}

    # ------------------------------------------------------------------

    def scenario(self, name: str) -> dict[str, Any]:
        args = self.args
        sseed = scenario_seed(args.seed, name)
        rng = random.Random(sseed)
        rundir = self.base / name
        rundir.mkdir()
        run_for = WARMUP + args.time + TAIL
        spec = write_scheduler(rundir / "scheduler.py", sseed, run_for)
        replicas = scenario_replicas(name, args.replicas)
        cluster = self.cluster = Cluster(
            self.net,
            rundir,
            sys.executable,
            spec,
            WORKLOAD / "node.py",
            replicas,
            args.clients,
            SLOTS,
            CLIENT_TIMEOUT,
            self.mark,
        )
        say(f"[{name}] seed {sseed}: {replicas} replicas, {args.clients} clients, logs in {rundir}")
        t0 = time.monotonic()
        cluster.start()
        monitor = Monitor(cluster.addrs, cluster.secret, t0)
        monitor.start()
        ops = CliOps(cluster.cli("status", "--json"), cluster.env, t0)
        ops.start()
        cancel_ops = CancelOps(
            cluster.cli, cluster.env, t0, monitor, lambda n: newest_decoy(n, WIDTH), seed=scenario_seed(sseed, "cancel")
        )
        faults: list[dict] = []
        exits: list[dict] = []
        stop_supervisor = threading.Event()

        def supervise() -> None:
            # Restart a client that exited before the computation ended; note every replica exit
            # that was not a nemesis's kill -9.
            seen: set[tuple[str, int]] = set()
            while not stop_supervisor.wait(0.2):
                for p in cluster.replicas + cluster.clients:
                    rc = p.returncode()
                    if rc is None or (p.short, p.starts) in seen:
                        continue
                    seen.add((p.short, p.starts))
                    if rc == -signal.SIGKILL:
                        continue
                    exits.append({"t": round(time.monotonic() - t0, 3), "proc": p.short, "rc": rc})
                    if p in cluster.clients and monitor.state() not in ("finished", "failed"):
                        p.start()
                        exits[-1]["restarted"] = True

        sup = threading.Thread(target=supervise, daemon=True)
        sup.start()
        nemesis = NEMESES[name](self.net, cluster, monitor)
        plan = schedule(nemesis, rng, WARMUP, WARMUP + args.time)
        cancel_ops.start()
        try:
            started = self._wait(lambda: monitor.state() == "running" and monitor.leader() is not None, t0, START_BOUND)
            if not started:
                say(f"[{name}] computation not running after {START_BOUND}s; faults start anyway")
            # Times are relative to t0; a slow start shifts the plan so that warm-up is real.
            shift = max(0.0, time.monotonic() - t0 - WARMUP + 1.0)
            for step in plan:
                step["at"] = round(step["at"] + shift, 3)
            run_schedule(nemesis, plan, t0, faults, lambda: False)
            heal_everything(self.net, cluster)
            heal_times = [f["t"] for f in faults if f["event"] == "stop"]
            last_heal = heal_times[-1] if heal_times else time.monotonic() - t0
            say(f"[{name}] {len(plan)} faults done, last healed at {last_heal:.1f}s; waiting for the result")
            finished = self._wait(
                lambda: monitor.state() in ("finished", "failed"), t0, last_heal + TAIL + FINISH_BOUND
            )
            time.sleep(0.5)  # one more progress sample
            conv = checkers.converge(cluster.addrs, cluster.secret)
        finally:
            monitor.stop()
            ops.stop()
            cancel_ops.stop()
            stop_supervisor.set()
            sup.join(5)
        comp = monitor.computation
        recov = checkers.recovery(monitor.progress, heal_times)
        bounded = checkers.per_fault_recovery(monitor.progress, faults, args.max_recovery)
        replica_exits = [e for e in exits if e["proc"].startswith("r")]
        checks = {
            "exactly_once": checkers.exactly_once(comp),
            "replicas_agree": {
                **conv,
                "ok": conv["ok"] and not replica_exits,
                "unexpected_replica_exits": replica_exits,
            },
            "result_correct": checkers.result_correct(comp, sseed, WIDTH),
            "progress_after_heal": recov,
            "recovery_bounded": bounded,
            "clients_stay_up": checkers.clients_stay_up(exits),
            "cancels": checkers.cancels(comp, cancel_ops.ops, cancel_ops.attempted),
        }
        cluster.stop()
        left = leftovers(self.mark)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        checks["clean_stop"] = {"ok": not left, "leftover_pids": left}
        self.cluster = None
        all_ops = sorted(ops.ops + cancel_ops.ops, key=lambda o: o["t"])
        interrupted_ops = sum(1 for o in all_ops if o.get("interrupted"))
        ok_ops = sum(1 for o in all_ops if o.get("ok"))
        lat = sorted(o["latency"] for o in all_ops if o.get("ok"))
        by_op: dict[str, dict[str, int]] = {}
        for o in all_ops:
            kind = o["op"].split()[0]
            by_op.setdefault(kind, {"total": 0, "ok": 0})
            by_op[kind]["total"] += 1
            by_op[kind]["ok"] += bool(o.get("ok"))
        report = {
            "scenario": name,
            "seed": sseed,
            "run_seed": args.seed,
            "time": args.time,
            "replicas": replicas,
            "clients": args.clients,
            "ok": all(c["ok"] for c in checks.values()),
            "finished": finished,
            "state": comp and comp.state,
            "failure": comp and comp.failure and attrs.asdict(comp.failure),
            "plan": plan,
            "faults": faults,
            "operations": {
                "total": len(all_ops),
                "ok": ok_ops,
                "failed": len(all_ops) - ok_ops - interrupted_ops,
                "interrupted": interrupted_ops,
                "by_op": by_op,
                "latency_p50": lat[len(lat) // 2] if lat else None,
                "latency_max": lat[-1] if lat else None,
                "log": all_ops,
            },
            "checkers": checks,
            "recovery": {
                "after_last_heal": recov["after_last_heal"],
                "max": recov["max"],
                "per_fault": recov["per_fault"],
                "max_recovery": args.max_recovery,
                "max_back_to_prefault": bounded["max_back_to_prefault"],
                "max_first_completion": bounded["max_first_completion"],
                "recomputed": bounded["recomputed"],
                "faults": bounded["per_fault"],
            },
            "process_exits": exits,
            "progress": [list(p) for p in monitor.progress[:: max(1, len(monitor.progress) // 200)]],
            "logs": str(rundir),
        }
        self._summary(report)
        return report

    @staticmethod
    def _wait(cond, t0: float, until: float) -> bool:
        while time.monotonic() - t0 < until:
            if cond():
                return True
            time.sleep(0.1)
        return cond()

    @staticmethod
    def _summary(r: dict) -> None:
        verdict = "PASS" if r["ok"] else "FAIL"
        n_faults = sum(1 for f in r["faults"] if f["event"] == "start")
        ops = r["operations"]
        cancels = r["checkers"].get("cancels", {})
        say(
            f"[{r['scenario']}] {verdict}: {r['replicas']} replicas, {n_faults} faults, {ops['ok']}/{ops['total']} "
            f"CLI ops ok (p50 {ops['latency_p50']}s; {cancels.get('acknowledged_kills', 0)} tasks cancelled), "
            f"{r['checkers']['exactly_once'].get('done', 0)} completions checked, recovery after last heal "
            f"{r['recovery']['after_last_heal']}s (max {r['recovery']['max']}s), state {r['state']}"
        )
        rec = r["recovery"]
        say(
            f"[{r['scenario']}]   per fault, from heal: first completion max {rec['max_first_completion']}s, "
            f"back to the pre-fault done count max {rec['max_back_to_prefault']}s "
            f"(bound {rec['max_recovery']}s), {rec['recomputed']} tasks recomputed"
        )
        for f in rec["faults"]:
            say(
                f"[{r['scenario']}]     fault {f['fault']} {f['start']:.1f}-{f['heal']:.1f}s: first completion "
                f"{f['first_completion']}s, back to {f['prefault_done']} done {f['back_to_prefault']}s, "
                f"{f['recomputed']} recomputed{' (' + f['note'] + ')' if f.get('note') else ''}"
            )
        for cname, c in r["checkers"].items():
            if not c["ok"]:
                detail = {k: v for k, v in c.items() if k != "ok"}
                say(f"[{r['scenario']}]   {cname} FAILED: {json.dumps(detail, default=str)[:800]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jepsen/run", description="Fault injection against a real TaskSprint cluster.")
    p.add_argument("--scenario", required=True, help=f"one of: {', '.join(NEMESES)}, or all")
    p.add_argument("--time", type=float, default=30.0, help="seconds of faults per scenario (default 30)")
    p.add_argument("--seed", type=int, help="run seed (default: random, printed); same seed, same fault schedule")
    p.add_argument("--replicas", type=int, default=3, choices=[3, 5])
    p.add_argument("--clients", type=int, default=3, choices=[2, 3])
    p.add_argument("--report", type=Path, help="directory for the JSON report (default: the run directory)")
    p.add_argument("--keep", action="store_true", help="keep replica data directories after a passing run")
    p.add_argument(
        "--max-recovery",
        type=float,
        default=checkers.MAX_RECOVERY,
        metavar="SECONDS",
        help="fail a scenario if, after any heal, the done count takes longer than this to get back to its "
        f"pre-fault level (default {checkers.MAX_RECOVERY:g})",
    )
    args = p.parse_args(argv)
    if args.scenario != "all" and args.scenario not in NEMESES:
        p.error(f"unknown scenario {args.scenario!r}; known: {', '.join(NEMESES)}, all")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("must run as root (network namespaces, iptables, tc)")
        return 2
    ensure_tools()
    stale = netmod.sweep_stale()
    if stale:
        say(f"removed namespaces left by an earlier run: {', '.join(stale)}")
    names = list(NEMESES) if args.scenario == "all" else [args.scenario]
    run = Run(args)
    five = [n for n in names if scenario_replicas(n, args.replicas) != args.replicas]
    if five:
        say(f"{', '.join(five)} run with {NEMESES[five[0]].replicas} replicas whatever --replicas says")
    say(f"seed {args.seed}; scenarios {', '.join(names)}; {args.time:g}s of faults each; run dir {run.base}")

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    reports: list[dict] = []
    interrupted = None
    cleanup: dict[str, Any] = {}
    try:
        run.setup_network(max(scenario_replicas(n, args.replicas) for n in names))
        for name in names:
            try:
                reports.append(run.scenario(name))
            except Exception:
                say(f"[{name}] harness error:\n{traceback.format_exc()}")
                reports.append({"scenario": name, "ok": False, "error": traceback.format_exc(), "checkers": {}})
                if run.cluster is not None:
                    heal_everything(run.net, run.cluster)
                    run.cluster.stop()
                    run.cluster = None
    except Interrupted as exc:
        interrupted = str(exc)
        say(f"interrupted by {interrupted}; tearing down")
    finally:
        # Teardown must not itself be interrupted half way.
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        try:
            cleanup = run.teardown()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    ok = interrupted is None and len(reports) == len(names) and all(r["ok"] for r in reports)
    ok = ok and not cleanup.get("namespaces_left")
    report_dir = args.report or run.base
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"jepsen-{args.scenario}-{args.seed}.json"
    doc = {
        "ok": ok,
        "seed": args.seed,
        "scenario": args.scenario,
        "time": args.time,
        "replicas": args.replicas,
        "interrupted": interrupted,
        "cleanup": cleanup,
        "run_dir": str(run.base),
        "scenarios": reports,
    }
    path.write_text(json.dumps(doc, indent=2, default=str))
    if ok and not args.keep:
        for r in reports:
            for d in Path(r["logs"]).glob("*-data"):
                shutil.rmtree(d, ignore_errors=True)
    say(
        f"{'PASS' if ok else 'FAIL'}: {sum(r['ok'] for r in reports)}/{len(names)} scenarios passed; "
        f"report {path}; replay with: jepsen/run --scenario {args.scenario} --seed {args.seed} "
        f"--time {args.time:g} --replicas {args.replicas}"
    )
    return 0 if ok else 1
