#!/usr/bin/env python3
"""Task throughput: TaskSprint against Dask distributed and Ray, on this machine.

Three workloads, each run by every system with the same number ``W`` of
worker processes (``--workers``, default: the CPU count):

``independent``
    10,000 independent no-op tasks.
``mapreduce``
    1,000 map tasks (each makes a small output and a 1 KB one) and one
    reduce that takes the small output of every map.
``chain``
    500 tasks, each taking the previous one's output; reported as the
    latency of one step.

The systems:

TaskSprint
    ``tasksprint.run.LocalRun``: 3 replica processes (fsync on) and worker
    clients running ``bench/tasks/node.py``; the schedulers are in
    ``bench/tasks/scheduler.py``.  ``clients x slots = W``; both ``1 x W``
    and ``W x 1`` are run and the better is reported (both are in the JSON).
Dask distributed
    ``LocalCluster(n_workers=W, threads_per_worker=1, processes=True)``.
Ray
    ``ray.init(num_cpus=W)``: at most W tasks run at once, in W worker processes.

What is timed: the computation, never the start-up of a cluster.

* Dask and Ray: the cluster is started, waited for (all W workers) and
  warmed up with a few tasks; the clock starts just before the first task is
  submitted and stops when the last result (the reduce's, the chain's last
  link, or every task's completion for ``independent``) is in the driver.
* TaskSprint: the scheduler starts its tasks when the last expected client
  has joined (so node processes are up); the replicas log that
  ``client_joined`` entry and the ``computation_finished`` entry, each with a
  timestamp taken when the replica applied it.  The time is the difference,
  on the replica that applied ``finish`` first (the leader).  It includes the
  ``start_task`` calls, as the Dask and Ray times include submission.  The
  time from ``LocalRun.start()`` to the final status (cluster start-up
  included) is reported too, as ``startup_included_s``.

Each system and workload runs in a child process of its own with a time
limit (``--timeout``); a run that hits it is reported as failed, with the
time limit as its figure, and the benchmark goes on.  Every process a child
started is stopped and every temporary directory removed, whatever happens.

Usage::

    python bench/tasks.py                      # everything, a few minutes
    python bench/tasks.py --scale 0.1          # a quick run with 10% of the tasks
    python bench/tasks.py --repeat 3           # three rounds; each figure is the median
    python bench/tasks.py --only chain --skip-ray --json
    python bench/tasks.py --only independent --skip-dask --skip-ray --probe
                                               # where TaskSprint's time goes

``--probe`` runs the TaskSprint processes with an observer on their metrics
hook (``tasksprint/observe.py``, installed through ``TASKSPRINT_OBSERVER``;
see ``bench/tasks/probe.py``) timing each phase of a task's path, and prints
the breakdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _procs import MarkedRun, dask_cluster, fsync_samples_ms, interrupt, ray_session, watch_parent

WORKLOADS = ("independent", "mapreduce", "chain")
SYSTEMS = ("tasksprint", "dask", "ray")
BASE_TASKS = {"independent": 10_000, "mapreduce": 1_000, "chain": 500}
HELPERS = Path(__file__).resolve().parent / "tasks"
SCHEDULERS = {
    "independent": "IndependentCoordinator",
    "mapreduce": "MapReduceCoordinator",
    "chain": "ChainCoordinator",
}
RESULT_MARK = "BENCH-RESULT "
# What-if experiments that needed private methods of the processes replaced; see bench/tasks/probe.py.
DROPPED_WHAT_IFS = {
    "no-fsync": "the replica command line has no option to turn fsync off",
    "early-views": "answering parked view long-polls before the following fsync is a change to the replica",
    "poll-leader": "polling views from the leader is a change to the client",
}


# ---------------------------------------------------------------------------
# The work itself, for Dask and Ray (TaskSprint's is bench/tasks/node.py).


def noop(i):
    return None


def map_task(i):
    return {"small": i, "big": "x" * 1000}


def map_task_two(i):
    return i, "x" * 1000


def reduce_task(*smalls):
    return sum(s["small"] if isinstance(s, dict) else s for s in smalls)


def step(prev, i):
    return (prev or 0) + 1


# ---------------------------------------------------------------------------
# One system, one workload (runs in a child process).


def _dask(workload: str, n: int, workers: int, tmp: Path) -> dict[str, Any]:
    from distributed import wait

    with dask_cluster(workers, tmp) as client:
        client.gather(client.map(noop, range(workers * 4), pure=False))
        t0 = time.perf_counter()
        if workload == "independent":
            futures = client.map(noop, range(n), pure=False)
            wait(futures)
            check = sum(f.status == "finished" for f in futures)
        elif workload == "mapreduce":
            maps = client.map(map_task, range(n), pure=False)
            # Dask tasks have one output: the reduce receives each map's whole dict.
            check = client.submit(reduce_task, *maps, pure=False).result()
        else:
            fut = client.submit(step, None, 0, pure=False)
            for i in range(1, n):
                fut = client.submit(step, fut, i, pure=False)
            check = fut.result()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "check": check}


def _ray(workload: str, n: int, workers: int, tmp: Path) -> dict[str, Any]:
    with ray_session(workers, tmp) as ray:
        r_noop = ray.remote(noop)
        r_map = ray.remote(num_returns=2)(map_task_two)
        r_reduce = ray.remote(reduce_task)
        r_step = ray.remote(step)
        ray.get([r_noop.remote(i) for i in range(workers * 4)])
        t0 = time.perf_counter()
        if workload == "independent":
            refs = [r_noop.remote(i) for i in range(n)]
            ray.get(refs)
            check = len(refs)
        elif workload == "mapreduce":
            smalls = [r_map.remote(i)[0] for i in range(n)]
            check = ray.get(r_reduce.remote(*smalls))
        else:
            ref = r_step.remote(None, 0)
            for i in range(1, n):
                ref = r_step.remote(ref, i)
            check = ray.get(ref)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "check": check}


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _stamp(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _tasksprint_times(base: Path, replicas: int) -> dict[str, Any]:
    """Start (last client joined) and end (finish applied) on each replica, from its log."""
    per_replica = []
    for i in range(replicas):
        events = _log_events(base / f"replica{i}.log")
        started = [_stamp(e) for e in events if e.get("event") == "computation_started"]
        joins = [_stamp(e) for e in events if e.get("event") == "client_joined"]
        finished = [_stamp(e) for e in events if e.get("event") == "computation_finished"]
        if joins and finished:
            per_replica.append(
                {
                    "replica": i,
                    "init": started[0] if started else None,
                    "begin": max(joins),
                    "end": finished[0],
                }
            )
    if not per_replica:
        raise RuntimeError(f"no replica log under {base} records both the last join and the finish")
    first = min(per_replica, key=lambda r: r["end"])
    return {
        "seconds": first["end"] - first["begin"],
        # The first to apply finish is the leader (clients long-poll their
        # views from replica 0, the first address they are given).
        "leader_replica": first["replica"],
        "init_to_begin_s": None if first["init"] is None else first["begin"] - first["init"],
        "end_wall": first["end"],
    }


def _tasksprint(
    workload: str, n: int, clients: int, slots: int, tmp: Path, timeout: float, probe: bool, what_if: list[str]
) -> dict:
    import attrs
    import trio

    from tasksprint.run import LocalRun

    os.environ["TASKSPRINT_BENCH_N"] = str(n)
    os.environ["TASKSPRINT_BENCH_CLIENTS"] = str(clients)
    base = tmp / f"tasksprint-{workload}-{clients}x{slots}"
    node = f"{sys.executable} {HELPERS / 'node.py'}"
    if probe:
        # Every replica and client this process starts loads bench/tasks/probe.py as its observer.
        os.environ["TASKSPRINT_OBSERVER"] = "probe:observer"
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")]))
        os.environ["TASKSPRINT_PROBE_DIR"] = str(base / "probe")
        (base / "probe").mkdir(parents=True, exist_ok=True)
    run = _probed_run(dict(w.partition("=")[::2] for w in what_if)) if probe else LocalRun
    lr = run(
        scheduler=f"{HELPERS / 'scheduler.py'}:{SCHEDULERS[workload]}",
        node=node,
        replicas=3,
        clients=clients,
        slots=slots,
        data=base,
        progress=None,
        timeout=timeout,
    )
    t0 = time.time()
    try:
        lr.start()
        status = trio.run(lr.wait_status)
        seen = time.time()
    finally:
        lr.stop()
    if not status.finished or status.result is None:
        raise RuntimeError(f"the computation ended {status.state}: {status.failure}")
    out = _tasksprint_times(base, 3)
    out["startup_included_s"] = seen - t0
    out["check"] = attrs.asdict(status.result)
    out.pop("end_wall")
    if probe:
        from probe import summarize  # bench/tasks/probe.py

        out["probe"] = summarize(base / "probe")
    return out


def _probed_run(what_if: dict[str, str]):
    """LocalRun whose processes write their probe figures on the way out, with the what-if experiments."""
    from tasksprint.run import LocalRun

    class ProbedRun(LocalRun):
        def client_command(self, i: int) -> list[str]:
            cmd = super().client_command(i)
            if "prefetch" in what_if:
                # K x slots tasks assigned at most: slots running, the rest waiting in the pool.
                cmd += ["--queue", str((int(what_if["prefetch"]) - 1) * (self.slots or 1))]
            return cmd

        def stop(self) -> None:
            # SIGINT first: the probe writes its figures on the way out.
            interrupt(self.client_procs)
            if self.cluster is not None:
                interrupt(self.cluster.procs)
            super().stop()

    return ProbedRun


def _check(system: str, workload: str, n: int, check: Any) -> None:
    """Raise if a run's answer is not what the workload computes (a run that did not do the work)."""
    want = {"independent": n, "mapreduce": n * (n - 1) // 2, "chain": n}[workload]
    got = check
    if system == "tasksprint":
        if workload == "independent":
            got = check["values"]["done"]
        elif workload == "mapreduce":
            got = check["tasks"][0]["values"]["sum"]
        else:
            got = check["tasks"][0]["values"].get("v") if n > 1 else n
    if got != want:
        raise RuntimeError(f"{system} {workload}: wrong answer {got!r}, expected {want!r}")


def child_main(args: argparse.Namespace) -> int:
    tmp = Path(args.tmp)
    threading.Thread(target=watch_parent, args=(tmp,), daemon=True).start()
    try:
        if args.system == "dask":
            out = _dask(args.workload, args.n, args.workers, tmp)
        elif args.system == "ray":
            out = _ray(args.workload, args.n, args.workers, tmp)
        else:
            clients, slots = (int(x) for x in args.layout.split("x"))
            sys.path.insert(0, str(HELPERS))
            out = _tasksprint(
                args.workload, args.n, clients, slots, tmp, args.timeout, args.probe, list(args.what_if or [])
            )
        _check(args.system, args.workload, args.n, out["check"])
        out["ok"] = True
    except BaseException as exc:  # reported to the parent, which decides
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(out, default=str), flush=True)
    return 0 if out["ok"] else 1


# ---------------------------------------------------------------------------
# The parent: runs every child, collects, prints.


class _Runner:
    """Runs one system on one workload at a time, each in a child process of its own (a MarkedRun)."""

    def __init__(self, tmp: Path, workers: int, timeout: float, verbose: bool) -> None:
        self.tmp = tmp
        self.workers = workers
        self.timeout = timeout
        self.verbose = verbose
        self.children = MarkedRun()
        self.what_if: list[str] = []

    def run(
        self,
        system: str,
        workload: str,
        n: int,
        layout: str | None = None,
        probe: bool = False,
        timeout: float | None = None,
    ) -> dict:
        timeout = self.timeout if timeout is None else timeout
        tmp = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=self.tmp))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            system,
            workload,
            "--n",
            str(n),
            "--workers",
            str(self.workers),
            "--tmp",
            str(tmp),
            "--timeout",
            str(timeout),
        ]
        if layout:
            cmd += ["--layout", layout]
        if probe:
            cmd += ["--probe"]
        for w in self.what_if:
            cmd += ["--what-if", w]
        env = dict(os.environ, TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        label = f"{system}{' ' + layout if layout else ''} {workload} ({n} tasks)"
        if self.verbose:
            print(f"running {label} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            # The child gives up on its own at ``timeout``; this is the backstop.
            stdout, stderr, left = self.children.run(cmd, env, timeout + 30)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        elapsed = time.monotonic() - started
        result = None
        for line in stdout.splitlines():
            if line.startswith(RESULT_MARK):
                result = json.loads(line[len(RESULT_MARK) :])
        if result is None:
            tail = "\n".join(stderr.strip().splitlines()[-5:])
            result = {"ok": False, "error": f"no result after {elapsed:.0f}s (time limit {timeout:.0f}s): {tail}"}
        if left:
            result["leftover_processes_killed"] = left
        if not result["ok"] and (elapsed >= timeout or result["error"].startswith("TimeoutError")):
            result["timed_out"] = True
        if self.verbose:
            what = f"{result['seconds']:.3f}s" if result["ok"] else f"FAILED: {result['error']}"
            print(f"  {label}: {what}", file=sys.stderr, flush=True)
        return result

    def close(self) -> None:
        self.children.close()


def _rate(n: int, seconds: float | None) -> float | None:
    return None if not seconds else n / seconds


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fsync_ms(directory: Path, samples: int = 20) -> float:
    """Median latency of writing 100 bytes and fsyncing, in the directory the replicas use."""
    return sorted(fsync_samples_ms(directory, samples))[samples // 2]


def _one_round(runner: _Runner, args: argparse.Namespace, workload: str, n: int, layouts: list[str]) -> dict[str, Any]:
    """Every system once on ``workload``: ``{"<system>_s": seconds or None, ...}``."""
    out: dict[str, Any] = {}
    # TaskSprint: every layout, the best one counts.
    per_layout: dict[str, dict] = {}
    for layout in layouts:
        # A layout that takes twice as long as the best so far cannot win:
        # it is stopped there (and reported as such) to keep the run short.
        done = [r.get("startup_included_s") or r["seconds"] for r in per_layout.values() if r["ok"]]
        limit = min([args.timeout, *(2 * t + 30 for t in done)])
        res = runner.run("tasksprint", workload, n, layout, probe=args.probe, timeout=limit)
        if not res["ok"] and res.get("timed_out") and limit < args.timeout:
            res["error"] = f"stopped after {limit:.0f}s, twice as long as the faster layout"
        per_layout[layout] = res
    good = {k: v for k, v in per_layout.items() if v["ok"]}
    out["tasksprint_layouts"] = per_layout
    out["tasksprint_s"] = None
    if good:
        best = min(good, key=lambda k: good[k]["seconds"])
        out["tasksprint_s"] = good[best]["seconds"]
        out["tasksprint_layout"] = best
        out["tasksprint_startup_included_s"] = good[best].get("startup_included_s")
    else:
        out["tasksprint_error"] = "; ".join(f"{k}: {v['error']}" for k, v in per_layout.items())
    for system in ("dask", "ray"):
        out[f"{system}_s"] = None
        if getattr(args, f"skip_{system}"):
            continue
        res = runner.run(system, workload, n)
        if res["ok"]:
            out[f"{system}_s"] = res["seconds"]
        else:
            out[f"{system}_error"] = res["error"]
    return out


def _median_round(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round whose ``key`` is the median (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workloads = args.only or list(WORKLOADS)
    w = args.workers
    layouts = [f"1x{w}"] if w == 1 else [f"1x{w}", f"{w}x1"]
    if args.layout:
        layouts = args.layout
    report: dict[str, Any] = {
        "settings": {
            "workers": w,
            "scale": args.scale,
            "cpus": os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg()),
            "tasksprint": {"replicas": 3, "fsync": True, "layouts": layouts},
            "dask": {"n_workers": w, "threads_per_worker": 1, "processes": True},
            "ray": {"num_cpus": w},
            "timeout_s": args.timeout,
            "repeat": args.repeat,
            "what_if": list(args.what_if or []),
            "python": sys.version.split()[0],
        }
    }
    tmp = Path(tempfile.mkdtemp(prefix="tsbench-"))
    report["settings"]["fsync_ms_at_start"] = _fsync_ms(tmp)
    runner = _Runner(tmp, w, args.timeout, not args.json or args.verbose)
    runner.what_if = list(args.what_if or [])

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        for workload in WORKLOADS:
            n = max(1, round(BASE_TASKS[workload] * args.scale))
            entry: dict[str, Any] = {"tasks": n + (1 if workload == "mapreduce" else 0)}
            report[workload] = entry
            for system in SYSTEMS:
                entry[f"{system}_s"] = None
            if workload not in workloads:
                entry["skipped"] = True
                continue
            # --repeat rounds, each running every system once (interleaved, so a
            # change in the machine's load hits all of them alike); each
            # system's figure is its median over the rounds.
            rounds: list[dict[str, Any]] = []
            for _ in range(args.repeat):
                rounds.append(_one_round(runner, args, workload, n, layouts))
            entry["tasksprint_layouts"] = rounds[-1]["tasksprint_layouts"]
            best = [r for r in rounds if r.get("tasksprint_s") is not None]
            if best:
                pick = _median_round(best, "tasksprint_s")
                entry["tasksprint_s"] = pick["tasksprint_s"]
                entry["tasksprint_layout"] = pick["tasksprint_layout"]
                entry["tasksprint_layouts"] = pick["tasksprint_layouts"]
                entry["tasksprint_startup_included_s"] = pick.get("tasksprint_startup_included_s")
            else:
                entry["tasksprint_error"] = rounds[-1].get("tasksprint_error")
            for system in ("dask", "ray"):
                if getattr(args, f"skip_{system}"):
                    entry[f"{system}_skipped"] = True
                    continue
                ok = [r for r in rounds if r.get(f"{system}_s") is not None]
                if ok:
                    entry[f"{system}_s"] = _median_round(ok, f"{system}_s")[f"{system}_s"]
                else:
                    entry[f"{system}_error"] = rounds[-1].get(f"{system}_error")
            if args.repeat > 1:
                entry["rounds_s"] = {system: [r.get(f"{system}_s") for r in rounds] for system in SYSTEMS}
            tasks = entry["tasks"]
            for system in SYSTEMS:
                entry[f"{system}_tasks_per_s"] = _rate(tasks, entry[f"{system}_s"])
                s = entry[f"{system}_s"]
                entry[f"{system}_ms_per_task"] = None if s is None else 1000 * s / tasks
            # >1: TaskSprint is faster (throughput ratio; for chain, the inverse of the step-latency ratio).
            entry["throughput_ratio_tasksprint_dask"] = _ratio(
                entry["tasksprint_tasks_per_s"], entry["dask_tasks_per_s"]
            )
            entry["throughput_ratio_tasksprint_ray"] = _ratio(entry["tasksprint_tasks_per_s"], entry["ray_tasks_per_s"])
            entry["latency_ratio_tasksprint_dask"] = _ratio(entry["tasksprint_s"], entry["dask_s"])
            entry["latency_ratio_tasksprint_ray"] = _ratio(entry["tasksprint_s"], entry["ray_s"])
    finally:
        runner.close()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)
    report["settings"]["loadavg_at_end"] = list(os.getloadavg())
    return report


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(
        f"Task throughput, {s['workers']} worker processes per system, {s['cpus']} CPUs; "
        f"TaskSprint: 3 replicas, fsync on"
    )
    fsync = s.get("fsync_ms_at_start")
    print(
        f"machine: 1-minute load average {s['loadavg_at_start'][0]:.2f} before, "
        f"{s.get('loadavg_at_end', [float('nan')])[0]:.2f} after; "
        f"write+fsync of 100 bytes {'-' if fsync is None else f'{fsync:.2f} ms'} (median)"
    )
    if s.get("what_if"):
        print(f"TaskSprint what-if experiments (not TaskSprint as it is): {', '.join(s['what_if'])}")
    head = f"{'workload':<12} {'tasks':>6}  {'system':<11} {'wall s':>9} {'tasks/s':>9} {'ms/task':>9}"
    print(head)
    print("-" * len(head))
    for workload in WORKLOADS:
        e = report[workload]
        if e.get("skipped"):
            continue
        for system, label in (("tasksprint", "TaskSprint"), ("dask", "Dask"), ("ray", "Ray")):
            sec = e[f"{system}_s"]
            note = ""
            if system == "tasksprint" and e.get("tasksprint_layout"):
                note = f"  best of {'/'.join(e['tasksprint_layouts'])} clients x slots: {e['tasksprint_layout']}"
                others = [
                    f"{k} {v['seconds']:.2f}s leader r{v['leader_replica']}" if v["ok"] else f"{k} failed"
                    for k, v in e["tasksprint_layouts"].items()
                ]
                note += f" ({', '.join(others)})"
            if sec is None:
                note = "  " + (
                    "skipped" if e.get(f"{system}_skipped") else f"FAILED: {e.get(f'{system}_error', '')[:150]}"
                )
            print(
                f"{workload:<12} {e['tasks']:>6}  {label:<11} {_fmt(sec, '.3f'):>9} "
                f"{_fmt(e[f'{system}_tasks_per_s'], '.1f'):>9} {_fmt(e[f'{system}_ms_per_task'], '.2f'):>9}{note}"
            )
        what = "step latency" if workload == "chain" else "throughput"
        if workload == "chain":
            rd, rr = e["latency_ratio_tasksprint_dask"], e["latency_ratio_tasksprint_ray"]
        else:
            rd, rr = e["throughput_ratio_tasksprint_dask"], e["throughput_ratio_tasksprint_ray"]
        print(f"{'':<12} {'':>6}  {what} ratio TaskSprint/Dask {_fmt(rd, '.3f')}, TaskSprint/Ray {_fmt(rr, '.3f')}")
        if e.get("rounds_s"):
            parts = [
                f"{label} " + " ".join(_fmt(x, ".3f") for x in e["rounds_s"][system])
                for system, label in (("tasksprint", "TaskSprint"), ("dask", "Dask"), ("ray", "Ray"))
            ]
            print(f"{'':<12} {'':>6}  wall s of each round (the median counts): {'; '.join(parts)}")
        for layout, res in (e.get("tasksprint_layouts") or {}).items():
            if res.get("ok") and res.get("probe"):
                print(f"  TaskSprint {layout} probe:")
                for line in res["probe"]["lines"]:
                    print(f"    {line}")
    print("throughput ratio > 1: TaskSprint is faster; step latency ratio < 1: TaskSprint's chain step is shorter")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="worker processes per system")
    p.add_argument("--only", action="append", choices=WORKLOADS, help="run only this workload (repeatable)")
    p.add_argument("--skip-dask", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every task count (e.g. 0.1 for a quick run)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed to one system on one workload")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds of every system per workload; each figure is the median"
    )
    p.add_argument(
        "--layout", action="append", help="TaskSprint CLIENTSxSLOTS to run (repeatable; default 1xW and Wx1)"
    )
    p.add_argument("--probe", action="store_true", help="time the phases inside TaskSprint's processes")
    p.add_argument(
        "--what-if",
        action="append",
        metavar="EXPERIMENT",
        help="with --probe: prefetch=K (repeatable; see bench/tasks/probe.py)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--verbose", action="store_true", help="progress on stderr also with --json")
    # Internal: one system and workload in this process.
    p.add_argument("--child", nargs=2, metavar=("SYSTEM", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.scale <= 0:
        p.error("--scale must be positive")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.layout:
        for layout in args.layout:
            c, _, s = layout.partition("x")
            if not (c.isdigit() and s.isdigit() and int(c) * int(s) == args.workers):
                p.error(f"--layout {layout}: CLIENTSxSLOTS must multiply to --workers {args.workers}")
    if args.what_if:
        args.probe = True
        for w in args.what_if:
            name, _, value = w.partition("=")
            if name in DROPPED_WHAT_IFS:
                p.error(f"--what-if {w}: no longer available ({DROPPED_WHAT_IFS[name]}); see bench/tasks/probe.py")
            if name != "prefetch":
                p.error(f"--what-if {w}: unknown experiment")
            if not (value.isdigit() and int(value) >= 1):
                p.error(f"--what-if {w}: prefetch=K needs a whole number K >= 1")
    if args.child:
        args.system, args.workload = args.child
        if args.layout:
            args.layout = args.layout[0]
        return child_main(args)
    try:
        report = measure(args)
    except KeyboardInterrupt:
        print("interrupted: every process stopped, temporary files removed", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=None, default=str))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
