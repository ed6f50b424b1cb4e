#!/usr/bin/env python3
"""Benchmark TaskSprint's replicated log, side by side with PySyncObj, in one run.

TaskSprint side: three ``tasksprint replica`` processes on 127.0.0.1 (via
:class:`tasksprint.localcluster.LocalCluster`, fsync on), driven by load
generator processes that each hold one :class:`tasksprint.log_client.LogClient`
and submit small key-value commands (``["put", "k<n>", n]``).  Three figures:

1. commands/s with many commands in flight (``--procs`` processes with
   ``--concurrency`` concurrent submitters each);
2. commit latency p50/p99 at light load: one client, one command at a time,
   after a warm-up;
3. leader failover: a client submits continuously, the leader is killed with
   SIGKILL, and the time from the kill until the first command *submitted
   after the kill* commits is one sample.  The killed replica is restarted and
   caught up, and a single agreed leader is checked, before the next round.

PySyncObj side: three PySyncObj nodes (``bench/_pysyncobj_node.py``) on
127.0.0.1 replicating a dict with the same ``put(key, value)`` command,
issued asynchronously with callbacks from inside the node processes (from
the leader or from every node, whichever is faster), with its journal on disk.

Human-readable figures go to stdout (progress to stderr); ``--json`` prints
one JSON object on stdout instead.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import queue
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _procs import (
    BenchError,
    Child,
    Children,
    Cleanup,
    cpu_seconds,
    elected_after,
    exit_on_signals,
    fsync_samples_ms,
    loadavg,
    note,
    percentile,
    pysyncobj_info,
    pysyncobj_leader,
    start_pysyncobj,
    statuses,
    stop_pysyncobj,
    storage_fsync_flags,
    temp_dir,
    wait_stable,
)

DEFAULTS = dict(
    duration=10.0,
    warmup=2.0,
    procs=2,
    concurrency=25,
    batch=200,
    single_concurrency=200,
    latency_samples=2000,
    latency_warmup=200,
    failovers=5,
    pso_window=10000,
    pso_compaction=10_000_000,
)


def num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def fsync_probe(directory: Path, n: int = 200) -> dict:
    """p50/p99 of write + fsync of 100 bytes in ``directory``: the disk the replicas use, right now."""
    times = fsync_samples_ms(directory, n)
    return {"fsync_p50_ms": _r(percentile(times, 50), 3), "fsync_p99_ms": _r(percentile(times, 99), 3)}


# ----------------------------------------------------------------------


def worker_main(cfg: dict) -> int:
    import trio

    from tasksprint.launch import configure_logging

    configure_logging("warning", "json")  # stderr; stdout carries the JSON lines
    try:
        trio.run(_worker, cfg)
    except KeyboardInterrupt:
        return 130
    return 0


def _out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _worker(cfg: dict) -> None:
    import trio

    from tasksprint.log_client import LogClient, Unavailable

    addrs = [(h, p) for h, p in cfg["addrs"]]
    secret = bytes.fromhex(cfg["secret"])
    counter = itertools.count(cfg.get("first", 0))
    deadline = float(cfg.get("deadline", 30.0))

    def op() -> list:
        n = next(counter)
        return ["put", f"k{n}", n]

    async with LogClient(addrs, secret) as client:
        await client.submit(op(), deadline=deadline)  # connect, find the leader

        match cfg["mode"]:
            case "load":
                _out({"ready": True})
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    return
                go = json.loads(line)
                start, end = float(go["start"]), float(go["end"])
                stats = {"ok": 0, "ok_total": 0, "errors": {}}

                batch = int(cfg.get("batch", 1))

                async def submitter() -> None:
                    while True:
                        try:
                            if batch == 1:
                                await client.submit(op(), deadline=deadline)
                            else:
                                await client.submit_many([op() for _ in range(batch)], deadline=deadline)
                        except Unavailable:
                            stats["errors"]["unavailable"] = stats["errors"].get("unavailable", 0) + 1
                            continue
                        now = time.monotonic()
                        stats["ok_total"] += batch
                        if start <= now <= end:
                            stats["ok"] += batch

                with trio.move_on_after(max(0.0, end - time.monotonic())):
                    async with trio.open_nursery() as nursery:
                        for _ in range(int(cfg["concurrency"])):
                            nursery.start_soon(submitter)
                stats["resent"] = client.resent
                _out(stats)

            case "latency":
                for _ in range(int(cfg["warmup"])):
                    await client.submit(op(), deadline=deadline)
                lat = []
                for _ in range(int(cfg["samples"])):
                    t0 = time.perf_counter()
                    await client.submit(op(), deadline=deadline)
                    lat.append((time.perf_counter() - t0) * 1000.0)
                _out({"latencies_ms": lat})

            case "failover":
                _out({"ready": True})

                async def submitter() -> None:
                    while True:
                        s = time.monotonic()
                        try:
                            await client.submit(op(), deadline=deadline)
                        except Unavailable:
                            _out({"s": s, "err": "unavailable", "d": time.monotonic()})
                            continue
                        _out({"s": s, "d": time.monotonic()})

                async with trio.open_nursery() as nursery:
                    for _ in range(int(cfg.get("concurrency", 1))):
                        nursery.start_soon(submitter)
                    # Any line or EOF on stdin means stop.
                    await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                    nursery.cancel_scope.cancel()
                _out({"stopped": True})

            case other:
                raise SystemExit(f"unknown worker mode {other!r}")


# ----------------------------------------------------------------------
# TaskSprint side


def bench_tasksprint(args: argparse.Namespace, base: Path, stack: contextlib.ExitStack, children: Children) -> dict:
    from tasksprint.localcluster import LocalCluster

    cl = stack.enter_context(LocalCluster(base / "tasksprint", replicas=3))
    cl.start()
    note("TaskSprint: 3 replicas starting")
    try:
        return _bench_tasksprint(args, base, cl, children)
    except BenchError as exc:
        tails = "\n".join(
            f"replica {i} log ends with:\n  " + "\n  ".join(cl.logs(i).splitlines()[-8:]) for i in range(cl.replicas)
        )
        raise BenchError(f"{exc}\n{tails}") from None


def _throughput(
    args: argparse.Namespace,
    cl: Any,
    children: Children,
    base_cfg: dict,
    worker_argv: list,
    logs: Path,
    concurrency: int,
    batch: int,
    tag: str,
) -> dict:
    """One throughput phase: ``--procs`` load processes x ``concurrency`` submitters, ``batch`` commands per call."""
    how = "one command per submit()" if batch == 1 else f"{batch} commands per submit_many()"
    note(
        f"TaskSprint throughput: {args.procs} load processes x {concurrency} submitters, {how}, "
        f"{args.warmup:g}s warm-up + {args.duration:g}s"
    )
    workers = []
    for w in range(args.procs):
        cfg = dict(
            base_cfg,
            mode="load",
            concurrency=concurrency,
            batch=batch,
            first=(w + 1) * 10**9 + (10**8 if tag == "single" else 0),
        )
        workers.append(children.start(f"{tag} process {w}", worker_argv + [json.dumps(cfg)], logs / f"{tag}{w}.err"))
    for w in workers:
        if not w.recv(60).get("ready"):
            raise BenchError(f"{w.name} did not get ready")
    t0 = time.monotonic()
    start, end = t0 + args.warmup, t0 + args.warmup + args.duration
    for w in workers:
        w.send({"start": start, "end": end})
    pids = {f"replica{i}": cl.procs[i].pid for i in range(3)}
    pids.update({f"load{j}": w.proc.pid for j, w in enumerate(workers)})
    time.sleep(max(0.0, start - time.monotonic()))
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    time.sleep(max(0.0, end - time.monotonic()))
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    per_worker = [w.recv(args.warmup + args.duration + 60) for w in workers]
    for w in workers:
        children.stop(w)
    ok = sum(r["ok"] for r in per_worker)
    out = {
        "commands_per_s": ok / args.duration,
        "per_worker": per_worker,
        "cpu_percent": {
            k: round(100.0 * (cpu1[k] - cpu0[k]) / args.duration, 1)
            for k in pids
            if cpu0.get(k) is not None and cpu1.get(k) is not None
        },
        "cpu_us_per_command": {
            k: round(1e6 * (cpu1[k] - cpu0[k]) / ok, 1)
            for k in pids
            if ok and cpu0.get(k) is not None and cpu1.get(k) is not None
        },
    }
    note(f"TaskSprint throughput ({how}): {out['commands_per_s']:.0f} commands/s")
    return out


def _bench_tasksprint(args: argparse.Namespace, base: Path, cl: Any, children: Children) -> dict:
    res: dict = {}
    leader = wait_stable(cl, [0, 1, 2])
    res["fsync_flags"] = storage_fsync_flags(cl)
    base_cfg = {"addrs": [list(a) for a in cl.addrs], "secret": cl.secret.hex()}
    worker_argv = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    logs = base / "worker-logs"
    logs.mkdir(exist_ok=True)

    # 1. Light-load latency, on the fresh cluster (as PySyncObj's is measured) ---
    note(
        f"TaskSprint latency: one client, one command at a time, "
        f"{args.latency_warmup} warm-up + {args.latency_samples} samples"
    )
    cfg = dict(base_cfg, mode="latency", warmup=args.latency_warmup, samples=args.latency_samples, first=10**12)
    lw = children.start("latency client", worker_argv + [json.dumps(cfg)], logs / "latency.err")
    lat = lw.recv(120 + 0.1 * (args.latency_samples + args.latency_warmup))["latencies_ms"]
    children.stop(lw)
    res["latency_samples_ms"] = lat
    res["commit_p50_ms"] = percentile(lat, 50)
    res["commit_p99_ms"] = percentile(lat, 99)
    res["commit_mean_ms"] = statistics.fmean(lat) if lat else None
    # The same commands as the leader saw them (arrival to answer, no client
    # hop): how PySyncObj's latency is measured, on its leader.
    lead = next((st for st in statuses(cl.addrs, cl.secret) if st is not None and st.role == "leader"), None)
    res["leader_commit_p50_ms"] = lead.commit_p50_ms if lead else None
    res["leader_commit_p99_ms"] = lead.commit_p99_ms if lead else None
    note(
        f"TaskSprint latency: p50 {res['commit_p50_ms']:.2f} ms, p99 {res['commit_p99_ms']:.2f} ms "
        f"(at the leader: p50 {num(res['leader_commit_p50_ms'], '.2f')} ms, "
        f"p99 {num(res['leader_commit_p99_ms'], '.2f')} ms)"
    )

    # 2. Throughput --------------------------------------------------------
    leader = wait_stable(cl, [0, 1, 2])
    main = _throughput(args, cl, children, base_cfg, worker_argv, logs, args.concurrency, args.batch, "load")
    res["commands_per_s"] = main["commands_per_s"]
    res["throughput_per_process"] = main["per_worker"]
    res["cpu_percent_during_throughput"] = main["cpu_percent"]
    res["cpu_us_per_command"] = main["cpu_us_per_command"]
    res["leader_during_throughput"] = leader
    if args.single_concurrency > 0:
        wait_stable(cl, [0, 1, 2])
        single = _throughput(args, cl, children, base_cfg, worker_argv, logs, args.single_concurrency, 1, "single")
        res["commands_per_s_single"] = single["commands_per_s"]
        res["cpu_us_per_command_single"] = single["cpu_us_per_command"]

    res["leader_after_throughput"] = wait_stable(cl, [0, 1, 2])

    # 3. Failover -----------------------------------------------------------
    res["failover_rounds"] = rounds = []
    res["replica_crashes"] = []
    if args.failovers > 0:
        note(f"TaskSprint failover: {args.failovers} rounds of kill -9 leader")
        try:
            _failover_rounds(args, cl, children, base_cfg, worker_argv, logs, res)
        except BenchError as exc:
            # Keep what was measured; say why the rest was not.
            res["failover_error"] = str(exc)
            note(f"TaskSprint failover stopped: {exc}")
    samples = [r["failover_s"] for r in rounds]
    good = [s for s in samples if s is not None]
    res["failover_samples_s"] = samples
    # A round with no commit within 30 s counts as infinitely slow for the median.
    res["failover_s"] = statistics.median([s if s is not None else math.inf for s in samples]) if samples else None
    if res["failover_s"] == math.inf:
        res["failover_s"] = None
    res["failover_max_s"] = max(good) if good else None
    return res


def _crash_report(cl: Any, i: int) -> dict:
    """What a replica that exited on its own left behind: exit code and the last error line of its log."""
    last_error = None
    for line in cl.logs(i).splitlines():
        text = line.strip().strip("|").strip()
        if text and not line.startswith("{") and not set(text) <= set("+-"):
            last_error = text  # a traceback ends with the exception's own line
    return {"replica": i, "exit_code": cl.procs[i].returncode, "error": last_error}


def tree_env(tree: Path) -> dict:
    """The environment that runs ``tree``'s tasksprint (another checkout) instead of this one."""
    path = os.pathsep.join([str(tree), str(tree / "sdk" / "python"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path.rstrip(os.pathsep))


def failover_side(args: argparse.Namespace, base: Path, children: Children, label: str, tree: Path | None) -> dict:
    """``args.failovers`` kill -9 rounds on a fresh cluster of this code, or of the checkout ``tree``."""
    from tasksprint.localcluster import LocalCluster

    env = None if tree is None else tree_env(tree)
    script = Path(__file__).resolve() if tree is None else tree / "bench" / "log.py"
    res: dict = {"failover_rounds": [], "replica_crashes": []}
    with LocalCluster(base / f"failover-{label}", replicas=3, env=env) as cl:
        cl.start()
        note(f"failover, {label}: {args.failovers} rounds of kill -9 leader" + (f" ({tree})" if tree else ""))
        wait_stable(cl, [0, 1, 2])
        cfg = {"addrs": [list(a) for a in cl.addrs], "secret": cl.secret.hex()}
        logs = base / f"worker-logs-{label}"
        logs.mkdir(exist_ok=True)
        _failover_rounds(args, cl, children, cfg, [sys.executable, str(script), "--worker"], logs, res, env)
    samples = [r["failover_s"] for r in res["failover_rounds"]]
    good = sorted(s for s in samples if s is not None)
    elected = [r.get("new_leader_elected_after_s") for r in res["failover_rounds"]]
    answered = [r.get("first_reply_after_kill_s") for r in res["failover_rounds"]]

    def median_of(xs: list) -> float | None:
        known = [x for x in xs if x is not None]
        return _r(statistics.median(known)) if known else None

    return {
        "samples_s": [_r(s) for s in samples],
        "elected_after_s": [_r(e) for e in elected],
        "in_flight_answered_after_s": [_r(a) for a in answered],
        # Where the time goes: the kill to the new leader's election (its
        # log), to the answer of the command in flight at the kill, to the
        # commit of the next command (the sample).
        "phases_median_s": {
            "leader_elected": median_of(elected),
            "in_flight_answered": median_of(answered),
            "next_committed": median_of(samples),
        },
        "median_s": _r(statistics.median([s if s is not None else math.inf for s in samples])) if samples else None,
        "p99_s": _r(percentile(good, 99)) if good else None,
        "max_s": _r(good[-1]) if good else None,
        "missing": sum(1 for s in samples if s is None),
        "crashes": res["replica_crashes"],
        "client_errors": res.get("failover_client_errors"),
    }


def failover_compare(args: argparse.Namespace) -> int:
    """``--failover-only``: failover of this code, and of ``--baseline`` first if given, side by side."""
    children = Children()
    with Cleanup() as stack:
        base = stack.enter_context(temp_dir("tasksprint-bench-", args.keep_temp))
        stack.callback(children.stop_all)
        # Children run ``python -m tasksprint.cli``, which puts the working
        # directory first on sys.path: inside a checkout it would run that
        # checkout's code whatever PYTHONPATH says.
        os.chdir(base)
        before = failover_side(args, base, children, "baseline", args.baseline) if args.baseline else None
        after = failover_side(args, base, children, "this", None)
    res = {"failovers": args.failovers, "baseline_tree": str(args.baseline) if args.baseline else None}
    res["this"], res["baseline"] = after, before
    if before and before["median_s"] and after["median_s"] and math.isfinite(before["median_s"]):
        res["median_ratio"] = _r(after["median_s"] / before["median_s"])
    if args.json:
        print(json.dumps(res), flush=True)
        return 0
    lines = [
        f"leader failover, kill -9, {args.failovers} rounds each (seconds from the kill to the first "
        "commit of a command submitted after it)",
        f"{'':18}{'median':>10}{'p99':>10}{'max':>10}{'missing':>9}",
    ]
    for label, side in (("baseline", before), ("this code", after)):
        if side is not None:
            lines.append(
                f"{label:18}{num(side['median_s'], '.3f'):>10}{num(side['p99_s'], '.3f'):>10}"
                f"{num(side['max_s'], '.3f'):>10}{side['missing']:>9}"
            )
            lines.append(
                f"  samples: {' '.join(num(s, '.3f') if s is not None else 'none' for s in side['samples_s'])}"
            )
            ph = side["phases_median_s"]
            lines.append(
                f"  medians from the kill: new leader elected {num(ph['leader_elected'], '.3f')}, "
                f"command in flight answered {num(ph['in_flight_answered'], '.3f')}, "
                f"next command committed {num(ph['next_committed'], '.3f')}"
            )
    if "median_ratio" in res:
        lines.append(f"median ratio this/baseline: {res['median_ratio']:.2f}")
    print("\n".join(lines), flush=True)
    return 0


def _failover_rounds(
    args: argparse.Namespace,
    cl: Any,
    children: Children,
    base_cfg: dict,
    worker_argv: list,
    logs: Path,
    res: dict,
    env: dict | None = None,
) -> None:
    rounds: list = res["failover_rounds"]
    cfg = dict(base_cfg, mode="failover", concurrency=1, first=2 * 10**12)
    fw = children.start("failover client", worker_argv + [json.dumps(cfg)], logs / "failover.err", env)
    events: list[dict] = []

    def pump(timeout: float) -> None:
        """Move the client's events into ``events``, waiting up to ``timeout`` s for the first."""
        try:
            msg = fw.lines.get(timeout=timeout) if timeout > 0 else fw.lines.get_nowait()
        except queue.Empty:
            return
        while True:
            if msg is None:
                raise BenchError(f"failover client exited; {fw.stderr_tail()}")
            events.append(msg)
            try:
                msg = fw.lines.get_nowait()
            except queue.Empty:
                return

    def crashed(killed: int | None) -> list[int]:
        """Replicas that exited although the benchmark did not kill them."""
        procs = cl.procs
        return [i for i in range(cl.replicas) if i != killed and procs[i] is not None and procs[i].poll() is not None]

    def note_crashes(killed: int | None, rnd: int) -> list[int]:
        gone = crashed(killed)
        for i in gone:
            rep = dict(_crash_report(cl, i), round=rnd)
            res["replica_crashes"].append(rep)
            note(f"  replica {i} exited on its own (exit code {rep['exit_code']}): {rep['error']}; restarting it")
            cl.restart(i)
        return gone

    try:
        pump(60)
        if not events or not events[0].get("ready"):
            raise BenchError(f"failover client did not get ready; {fw.stderr_tail()}")
        events.clear()
        for r in range(1, args.failovers + 1):
            note_crashes(None, r)
            leader = wait_stable(cl, list(range(cl.replicas)))
            # Let the client commit through this leader for a moment (at least one command).
            pump(0)
            n_before = len(events)
            settle_until = time.monotonic() + 0.3
            while time.monotonic() < settle_until or len(events) == n_before:
                if time.monotonic() > settle_until + 10:
                    raise BenchError(f"the failover client commits nothing; {fw.stderr_tail()}")
                pump(0.05)
            pump(0)
            first_idx = len(events)
            t_kill_wall = time.time()
            t_kill = time.monotonic()
            cl.kill(leader)
            first_after = first_any = None
            give_up = t_kill + 30.0
            lost_majority = False
            while first_after is None and time.monotonic() < give_up:
                pump(0.1)
                for e in events[first_idx:]:
                    if "err" in e or "d" not in e or e["d"] < t_kill:
                        continue
                    if first_any is None:
                        first_any = e["d"]
                    if e["s"] >= t_kill:
                        first_after = e["d"]
                        break
                if first_after is None and len(crashed(leader)) + 1 > cl.replicas // 2:
                    lost_majority = True  # nothing can commit: do not wait 30 s for it
                    break
            rnd = {
                "killed": leader,
                "failover_s": None if first_after is None else first_after - t_kill,
                "first_reply_after_kill_s": None if first_any is None else first_any - t_kill,
            }
            gone = note_crashes(leader, r)
            if gone:
                rnd["crashed"] = gone
            else:
                live = [i for i in range(cl.replicas) if i != leader]
                with contextlib.suppress(BenchError):
                    rnd["new_leader"] = wait_stable(cl, live, timeout=10)
                    rnd["new_leader_elected_after_s"] = elected_after(cl, rnd["new_leader"], t_kill_wall)
            rounds.append(rnd)
            fo = rnd["failover_s"]
            note(
                f"  round {r}: killed replica {leader}, "
                + (
                    f"next command committed after {fo:.3f}s"
                    if fo is not None
                    else "no majority left"
                    if lost_majority
                    else "no commit within 30s"
                )
                + (
                    f" (replica {rnd['new_leader']} became leader after "
                    f"{num(rnd.get('new_leader_elected_after_s'), '.3f')}s)"
                    if "new_leader" in rnd
                    else ""
                )
            )
            cl.restart(leader)
        note_crashes(None, args.failovers)
        wait_stable(cl, list(range(cl.replicas)))
    finally:
        with contextlib.suppress(BenchError):
            fw.send({"stop": True})
        children.stop(fw)
        res["failover_client_errors"] = sum(1 for e in events if "err" in e)
        res["failover_client_commands"] = sum(1 for e in events if "d" in e and "err" not in e)


# ----------------------------------------------------------------------
# PySyncObj side


def pysyncobj_load(nodes: list[Child], issuers: list[int], window: int, warmup: float, duration: float) -> dict:
    t0 = time.monotonic()
    start, end = t0 + warmup, t0 + warmup + duration
    per = max(1, window // len(issuers))
    for i in issuers:
        nodes[i].send({"cmd": "load", "window": per, "start": start, "end": end, "prefix": f"k{i}-"})
    pids = {f"node{i}": n.proc.pid for i, n in enumerate(nodes)}
    time.sleep(max(0.0, start - time.monotonic()))
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    time.sleep(max(0.0, end - time.monotonic()))
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    replies = [nodes[i].recv(warmup + duration + 60) for i in issuers]
    ok = sum(r["ok"] for r in replies)
    return {
        "commands_per_s": ok / duration,
        "cpu_us_per_command": {
            k: round(1e6 * (cpu1[k] - cpu0[k]) / ok, 1)
            for k in pids
            if ok and cpu0.get(k) is not None and cpu1.get(k) is not None
        },
        "issuers": issuers,
        "window_per_issuer": per,
        "per_issuer": replies,
        "cpu_percent": {
            k: round(100.0 * (cpu1[k] - cpu0[k]) / duration, 1)
            for k in pids
            if cpu0.get(k) is not None and cpu1.get(k) is not None
        },
    }


def bench_pysyncobj(args: argparse.Namespace, base: Path, children: Children) -> dict:
    res: dict = {"info": pysyncobj_info()}
    # Throughput: batched AppendEntries (PySyncObj's throughput setting).
    nodes = start_pysyncobj(base, children, batch=True, tag="throughput", compaction=args.pso_compaction)
    try:
        if args.pso_issuers == "auto":
            probe = max(2.0, min(4.0, args.duration / 3))
            res["probes"] = {}
            for name in ("leader", "all"):
                leader = pysyncobj_leader(nodes)
                issuers = [leader] if name == "leader" else [0, 1, 2]
                r = pysyncobj_load(nodes, issuers, args.pso_window, 1.0, probe)
                res["probes"][name] = round(r["commands_per_s"], 1)
                note(f"PySyncObj probe, commands issued from {name}: {r['commands_per_s']:.0f} commands/s")
            chosen = max(res["probes"], key=res["probes"].get)
        else:
            chosen = args.pso_issuers
        leader = pysyncobj_leader(nodes)
        issuers = [leader] if chosen == "leader" else [0, 1, 2]
        note(
            f"PySyncObj throughput: commands issued from {chosen} ({args.pso_window} in flight in all), "
            f"{args.warmup:g}s warm-up + {args.duration:g}s"
        )
        r = pysyncobj_load(nodes, issuers, args.pso_window, args.warmup, args.duration)
        res["issuers"] = chosen
        res["commands_per_s"] = r["commands_per_s"]
        res["throughput"] = r
        note(f"PySyncObj throughput: {r['commands_per_s']:.0f} commands/s")
    finally:
        stop_pysyncobj(nodes, children)

    # Latency: AppendEntries sent per command (PySyncObj's latency setting;
    # with batching a lone command waits for the next 0.1 s append period).
    if args.latency_samples > 0:
        nodes = start_pysyncobj(base, children, batch=False, tag="latency", compaction=args.pso_compaction)
        try:
            leader = pysyncobj_leader(nodes)
            note(
                f"PySyncObj latency: one command at a time from the leader, "
                f"{args.latency_warmup} warm-up + {args.latency_samples} samples"
            )
            r = nodes[leader].ask(
                {"cmd": "latency", "warmup": args.latency_warmup, "samples": args.latency_samples, "timeout": 5.0},
                120 + 0.1 * (args.latency_samples + args.latency_warmup),
            )
            lat = r["latencies_ms"]
            res["latency_samples_ms"] = lat
            res["latency_errors"] = r["errors"]
            res["commit_p50_ms"] = percentile(lat, 50)
            res["commit_p99_ms"] = percentile(lat, 99)
            if lat:
                note(f"PySyncObj latency: p50 {res['commit_p50_ms']:.2f} ms, p99 {res['commit_p99_ms']:.2f} ms")
        finally:
            stop_pysyncobj(nodes, children)
    return res


# ----------------------------------------------------------------------
# Report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build_result(args: argparse.Namespace, ts: dict, pso: dict | None, load: tuple, disk: dict) -> dict:
    info = pso["info"] if pso else None
    pso_cps = pso.get("commands_per_s") if pso else None
    out: dict = {
        "commands_per_s": round(ts["commands_per_s"], 1),
        "commit_p50_ms": _r(ts["commit_p50_ms"]),
        "commit_p99_ms": _r(ts["commit_p99_ms"]),
        "failover_s": _r(ts["failover_s"]),
        "pysyncobj_commands_per_s": None if pso_cps is None else round(pso_cps, 1),
        "ratio_commands_per_s": _r(_ratio(ts["commands_per_s"], pso_cps)),
        "commands_per_s_single": _r(ts.get("commands_per_s_single"), 1),
        "ratio_commands_per_s_single": _r(_ratio(ts.get("commands_per_s_single"), pso_cps)),
        "pysyncobj_commit_p50_ms": _r(pso.get("commit_p50_ms")) if pso else None,
        "pysyncobj_commit_p99_ms": _r(pso.get("commit_p99_ms")) if pso else None,
        "ratio_commit_p50_ms": _r(_ratio(ts["commit_p50_ms"], pso.get("commit_p50_ms"))) if pso else None,
        "commit_mean_ms": _r(ts["commit_mean_ms"]),
        "leader_commit_p50_ms": _r(ts.get("leader_commit_p50_ms")),
        "leader_commit_p99_ms": _r(ts.get("leader_commit_p99_ms")),
        "ratio_leader_commit_p50_ms": _r(_ratio(ts.get("leader_commit_p50_ms"), pso.get("commit_p50_ms")))
        if pso
        else None,
        "failover_samples_s": [_r(s) for s in ts["failover_samples_s"]],
        "failover_election_s": [_r(r.get("new_leader_elected_after_s")) for r in ts["failover_rounds"]],
        "failover_max_s": _r(ts["failover_max_s"]),
        "replica_crashes": ts["replica_crashes"],
        "failover_error": ts.get("failover_error"),
        "goals": {
            "commands_per_s_at_least_3x_pysyncobj": None if pso_cps is None else ts["commands_per_s"] >= 3 * pso_cps,
            "commit_p50_under_2ms": ts["commit_p50_ms"] is not None and ts["commit_p50_ms"] < 2.0,
            "median_failover_under_1s": (
                None if not ts["failover_samples_s"] else ts["failover_s"] is not None and ts["failover_s"] < 1.0
            ),
        },
        "settings": {
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_1min_before": load[0],
                "loadavg_1min_after": load[1],
                "python": sys.version.split()[0],
                **disk,
            },
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "tasksprint": {
                "replicas": 3,
                "host": "127.0.0.1",
                "durability": "fsync on: SQLite WAL with synchronous=FULL; an acceptor's records are fsync'd "
                "(one transaction per batch) before it answers",
                "fsync_flag_logged_by_each_replica": ts["fsync_flags"],
                "load_processes": args.procs,
                "submitters_per_process": args.concurrency,
                "commands_per_call": args.batch,
                "single_phase_submitters_per_process": args.single_concurrency,
                "client": "one LogClient per load process; what its submitters submit between two writes "
                "goes out together as SubmitBlock messages over one connection",
                "command": '["put", "k<n>", n]',
                "latency": f"on the fresh cluster, before the throughput phases; one client process, one command "
                f"at a time, {args.latency_warmup} warm-up commands, {args.latency_samples} samples, timed around "
                "LogClient.submit (and by the leader, from arrival to answer)",
                "failover": "one client submitting one command at a time; sample = time from SIGKILL of the leader "
                "until the first command submitted after the kill commits; the killed replica is restarted and "
                "caught up before the next round",
                "failover_rounds": args.failovers,
                "replica_defaults": "election timeout 0.3 s (randomized up to 0.6 s), heartbeat 0.05 s",
            },
        },
        "raw": {
            "tasksprint_throughput_per_process": ts["throughput_per_process"],
            "tasksprint_cpu_percent_during_throughput": ts["cpu_percent_during_throughput"],
            "tasksprint_cpu_us_per_command": ts["cpu_us_per_command"],
            "tasksprint_leader_during_throughput": ts["leader_during_throughput"],
            "tasksprint_leader_after_throughput": ts["leader_after_throughput"],
            "tasksprint_latency_samples_ms": [round(x, 3) for x in ts["latency_samples_ms"]],
            "tasksprint_failover_rounds": ts["failover_rounds"],
            "tasksprint_failover_client_errors": ts.get("failover_client_errors"),
        },
    }
    if pso:
        journal = (
            "journalFile and fullDumpFile on disk; flushJournal=True"
            if info["flush_journal_option"]
            else "journalFile and fullDumpFile on disk; the journal is an mmap'd file written for every entry "
            "before it is acknowledged but never flushed (msync/fsync) by PySyncObj, and this version has no "
            "option to flush it (SyncObjConf has no flushJournal): it survives a killed process, not an OS "
            "crash or power loss"
        )
        out["settings"]["pysyncobj"] = {
            "version": info["version"],
            "nodes": 3,
            "host": "127.0.0.1",
            "durability": journal,
            "command": "@replicated put(key, value) on a dict, key 'k<i>-<n>', value n",
            "throughput": f"appendEntriesUseBatch=True, logCompactionMinEntries={args.pso_compaction}; commands "
            f"issued asynchronously with callbacks inside the node processes, each success callback issuing "
            f"the next; {args.pso_window} commands in flight; issued from: {pso.get('issuers')}",
            "issuer_probes_commands_per_s": pso.get("probes"),
            "latency": "appendEntriesUseBatch=False (a lone command is sent at once instead of waiting for the "
            "0.1 s append period); one command at a time issued on the leader itself (no client hop); "
            f"{args.latency_warmup} warm-up, {args.latency_samples} samples",
        }
        out["raw"]["pysyncobj_throughput"] = pso.get("throughput")
        out["raw"]["pysyncobj_latency_samples_ms"] = [round(x, 3) for x in pso.get("latency_samples_ms", [])]
        out["raw"]["pysyncobj_latency_errors"] = pso.get("latency_errors")
    return out


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def render(res: dict) -> str:
    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    s = res["settings"]
    ts = s["tasksprint"]
    pso = s.get("pysyncobj")
    m = s["machine"]
    lines = [
        "Replicated log benchmark: TaskSprint vs PySyncObj (3 replicas each, 127.0.0.1)",
        f"machine: {m['cpus']} CPUs, Python {m['python']}, 1-min load average "
        f"{m['loadavg_1min_before']} before / {m['loadavg_1min_after']} after, "
        f"write+fsync of 100 bytes p50/p99 {m['fsync_p50_ms']}/{m['fsync_p99_ms']} ms before, "
        f"{m.get('fsync_p50_ms_after')}/{m.get('fsync_p99_ms_after')} ms after",
        "",
        f"{'':32}{'TaskSprint':>12}{'PySyncObj':>12}{'ours/theirs':>13}   goal",
        f"{'commands/s (many in flight)':32}{num(res['commands_per_s'], ',.0f'):>12}"
        f"{num(res['pysyncobj_commands_per_s'], ',.0f'):>12}{ratio(res['ratio_commands_per_s']):>13}   >= 3x PySyncObj",
        f"{'  ... one command per submit()':32}{num(res['commands_per_s_single'], ',.0f'):>12}"
        f"{num(res['pysyncobj_commands_per_s'], ',.0f'):>12}{ratio(res['ratio_commands_per_s_single']):>13}",
        f"{'commit latency p50 (ms)':32}{num(res['commit_p50_ms'], '.2f'):>12}"
        f"{num(res['pysyncobj_commit_p50_ms'], '.2f'):>12}{ratio(res['ratio_commit_p50_ms']):>13}   < 2 ms",
        f"{'commit latency p99 (ms)':32}{num(res['commit_p99_ms'], '.2f'):>12}"
        f"{num(res['pysyncobj_commit_p99_ms'], '.2f'):>12}"
        f"{ratio(_ratio(res['commit_p99_ms'], res['pysyncobj_commit_p99_ms'])):>13}",
        f"{'  ... at the leader, p50 (ms)':32}{num(res['leader_commit_p50_ms'], '.2f'):>12}"
        f"{num(res['pysyncobj_commit_p50_ms'], '.2f'):>12}{ratio(res['ratio_leader_commit_p50_ms']):>13}",
        f"{'  ... at the leader, p99 (ms)':32}{num(res['leader_commit_p99_ms'], '.2f'):>12}"
        f"{num(res['pysyncobj_commit_p99_ms'], '.2f'):>12}"
        f"{ratio(_ratio(res['leader_commit_p99_ms'], res['pysyncobj_commit_p99_ms'])):>13}",
        f"{'leader failover, median (s)':32}{num(res['failover_s'], '.3f'):>12}{'n/a':>12}{'':>13}   < 1 s",
        "",
        "failover samples (s): "
        + (" ".join(num(x, ".3f") if x is not None else "none" for x in res["failover_samples_s"]) or "-"),
        "new leader elected after (s, from the replicas' logs): "
        + (" ".join(num(x, ".3f") for x in res["failover_election_s"]) or "-"),
        "(latency ratios: lower is better for TaskSprint; commands/s ratio: higher is better)",
    ]
    for c in res["replica_crashes"]:
        lines.append(
            f"!! replica {c['replica']} exited on its own during failover round {c['round']} "
            f"(exit code {c['exit_code']}): {c['error']}"
        )
    if res["failover_error"]:
        lines.append(f"!! failover rounds stopped early: {res['failover_error'].splitlines()[0]}")
    lines += [
        "",
        "TaskSprint settings:",
        f"  durability: {ts['durability']}; "
        f"fsync flag logged by each replica: {ts['fsync_flag_logged_by_each_replica']}",
        f"  throughput: {ts['load_processes']} load processes x {ts['submitters_per_process']} concurrent submitters, "
        f"{ts['commands_per_call']} commands per submit_many() call (second phase: "
        f"{ts['single_phase_submitters_per_process']} submitters per process, one command per submit()), "
        f"{s['warmup_s']:g}s warm-up + {s['duration_s']:g}s measured each",
        f"  CPU during throughput (% of one core): {res['raw']['tasksprint_cpu_percent_during_throughput']} "
        f"(leader: replica{res['raw']['tasksprint_leader_during_throughput']})",
        f"  CPU microseconds per committed command: {res['raw']['tasksprint_cpu_us_per_command']}",
        f"  latency: {ts['latency']}",
        f"  failover: {ts['failover']}",
    ]
    if pso:
        lines += [
            f"PySyncObj {pso['version']} settings:",
            f"  durability: {pso['durability']}",
            f"  throughput: {pso['throughput']}",
            f"  issuer probes (commands/s): {pso['issuer_probes_commands_per_s']}",
            f"  CPU during throughput (% of one core): {res['raw']['pysyncobj_throughput']['cpu_percent']}",
            f"  CPU microseconds per committed command: {res['raw']['pysyncobj_throughput']['cpu_us_per_command']}",
            f"  latency: {pso['latency']}",
        ]
    else:
        lines.append("PySyncObj: skipped (--skip-pysyncobj)")
    g = res["goals"]

    def verdict(v: bool | None) -> str:
        return "not measured" if v is None else ("met" if v else "NOT met")

    lines += [
        "",
        "goals: commands/s >= 3x PySyncObj: "
        + verdict(g["commands_per_s_at_least_3x_pysyncobj"])
        + "; commit p50 < 2 ms: "
        + verdict(g["commit_p50_under_2ms"])
        + "; median failover < 1 s: "
        + verdict(g["median_failover_under_1s"]),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        description="Benchmark TaskSprint's replicated log side by side with PySyncObj (see bench/README.md)."
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument(
        "--duration",
        type=float,
        default=d["duration"],
        help="seconds measured per throughput phase (default %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=d["warmup"],
        help="seconds of load before each throughput measurement (default %(default)s)",
    )
    p.add_argument("--failovers", type=int, default=d["failovers"], help="leader kills (default %(default)s)")
    p.add_argument("--skip-pysyncobj", action="store_true", help="measure TaskSprint only")
    p.add_argument("--procs", type=int, default=d["procs"], help="TaskSprint load processes (default %(default)s)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=d["concurrency"],
        help="concurrent submitters per load process (default %(default)s)",
    )
    p.add_argument(
        "--latency-samples",
        type=int,
        default=d["latency_samples"],
        help="latency samples per side (default %(default)s)",
    )
    p.add_argument(
        "--latency-warmup",
        type=int,
        default=d["latency_warmup"],
        help="commands before latency samples (default %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=d["batch"],
        help="commands per LogClient.submit_many() call in the main throughput phase (default %(default)s)",
    )
    p.add_argument(
        "--single-concurrency",
        type=int,
        default=d["single_concurrency"],
        help="submitters per load process in the second phase, one command per submit() "
        "(default %(default)s; 0 skips it)",
    )
    p.add_argument(
        "--pso-window", type=int, default=d["pso_window"], help="PySyncObj commands in flight (default %(default)s)"
    )
    p.add_argument(
        "--pso-issuers",
        choices=["auto", "leader", "all"],
        default="auto",
        help="PySyncObj nodes issuing commands; auto probes both and keeps the faster (default %(default)s)",
    )
    p.add_argument(
        "--pso-compaction",
        type=int,
        default=d["pso_compaction"],
        help="PySyncObj logCompactionMinEntries (default %(default)s: no compaction during the run)",
    )
    p.add_argument(
        "--keep-temp",
        action="store_true",
        help="keep the temporary directory (replica logs, data, stderr of every child) and print its path",
    )
    p.add_argument(
        "--failover-only",
        action="store_true",
        help="measure leader failover only (median, p99, max over --failovers kills), nothing else",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="TREE",
        help="with --failover-only: first the same rounds with another checkout's code (e.g. a worktree of main), "
        "then this code's, side by side with the ratio",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if args.duration <= 0 or args.warmup < 0 or args.procs < 1 or args.concurrency < 1 or args.batch < 1:
            p.error("--duration must be positive, --warmup non-negative, --procs, --concurrency and --batch at least 1")
        if args.single_concurrency < 0:
            p.error("--single-concurrency must be non-negative")
        if args.failovers < 0 or args.latency_samples < 1 or args.latency_warmup < 0 or args.pso_window < 1:
            p.error(
                "--failovers and --latency-warmup must be non-negative, --latency-samples and --pso-window positive"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker))
    if args.failover_only:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        exit_on_signals(signal.SIGTERM, signal.SIGHUP)
        try:
            return failover_compare(args)
        except BenchError as exc:
            print(f"bench/log.py: {exc}", file=sys.stderr)
            return 1
    # Ctrl-C must stop the run even if this process was started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    exit_on_signals(signal.SIGTERM, signal.SIGHUP)
    load_before = loadavg()
    children = Children()
    try:
        # Unwound in reverse: children stopped (LocalCluster's replicas first), then the directory removed.
        with Cleanup() as stack:
            base = stack.enter_context(temp_dir("tasksprint-bench-", args.keep_temp))
            stack.callback(children.stop_all)
            disk = fsync_probe(base)
            note(f"disk: write+fsync p50 {disk['fsync_p50_ms']} ms, p99 {disk['fsync_p99_ms']} ms")
            ts = bench_tasksprint(args, base, stack, children)
            pso = None if args.skip_pysyncobj else bench_pysyncobj(args, base, children)
            after = fsync_probe(base)
            disk.update({k + "_after": v for k, v in after.items()})
        res = build_result(args, ts, pso, (load_before, loadavg()), disk)
        print(json.dumps(res) if args.json else render(res), flush=True)
    except BenchError as exc:
        print(f"bench/log.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/log.py: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
