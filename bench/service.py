"""The service at scale: N no-op command tasks submitted in bulk and run on 2 workers.

Prints, for one service (three local replicas, fsync on, the queue scheduler):

- bulk submission rate (tasks/s), the run rate on 2 workers (tasks/s);
- replica memory (RSS growth) per pending task, per finished task before and
  after compaction (RSS does not shrink when Python frees the compacted
  records; ``bench/service_state.py`` measures what the state holds);
- how long a follower killed mid-run and started again takes to catch up;
- how long ``status`` (one page) takes at that size;

and, in the same run, Ray's submission rate for N no-op ``.remote()`` calls
and Dask's for ``client.map`` of a no-op over N items, with the ratios.
Ray and Dask are bench-only dependencies (``pip install -e '.[bench]'``);
a missing one is skipped with a note.

    .venv/bin/python bench/service.py                 # 100,000 tasks
    .venv/bin/python bench/service.py --tasks 1000000 # the issue's scale
    .venv/bin/python bench/service.py --tasks 10000 --json

Progress goes to stderr, the figures (or JSON with ``--json``) to stdout.
Everything runs under one temporary directory on 127.0.0.1 and every
process started is stopped on every exit path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.service.api import AsyncService
from tasksprint.service.server import local_cluster

GOALS = {
    "submit_per_s": 50_000,
    "pending_bytes_per_task": 2048,
    "finished_bytes_per_task": 1024,
    "catch_up_s": 10.0,
    "status_ms": 100.0,
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def replica_states(addrs: list[tuple[str, int]], secret: bytes) -> list[Any]:
    channel = ReplicaChannel(addrs, secret)
    out = []
    try:
        for addr in addrs:
            try:
                out.append(await channel.status(addr, timeout=2.0))
            except ASK_ERRORS:
                out.append(None)
    finally:
        await channel.aclose()
    return out


async def measure(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    n = args.tasks
    cluster = local_cluster(base / "state")
    workers: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"tasks": n}
    try:
        cluster.start()
        async with AsyncService(cluster.addrs, cluster.secret) as svc:
            with trio.fail_after(60):
                while True:
                    try:
                        await svc.status(limit=1)
                        break
                    except Exception:
                        await trio.sleep(0.2)
            pids = [p.pid for p in cluster.procs if p is not None]
            baseline = [rss(p) for p in pids]

            log(f"submitting {n} no-op tasks in bulk")
            spec = {"argv": ["true"]}
            t0 = time.perf_counter()
            await svc.submit_specs([spec] * n, deadline=max(120.0, n / 500))
            submit_s = time.perf_counter() - t0
            result["submit_s"] = submit_s
            result["submit_per_s"] = n / submit_s
            log(f"submitted in {submit_s:.2f}s: {n / submit_s:,.0f} tasks/s")
            await trio.sleep(1.0)  # followers apply the tail
            pending = [rss(p) - b for p, b in zip(pids, baseline, strict=True)]
            result["pending_bytes_per_task"] = max(pending) / n
            result["status_ms_pending"] = await status_ms(svc)

            if args.skip_run:
                result["catch_up_s"] = await restart_follower(cluster, svc)
                return result
            log("starting 2 workers")
            env = {**os.environ, "TASKSPRINT_STATE": str(base / "state")}
            server = ",".join(f"{h}:{p}" for h, p in cluster.addrs)
            for i in range(2):
                with open(base / f"worker{i}.log", "wb") as f:
                    workers.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "tasksprint.cli", "worker", "--name", f"bench{i}", "--gpus", ""]
                            + ["--server", server, "--secret-file", str(cluster.secret_file)]
                            + (["--slots", str(args.slots)] if args.slots else [])
                            + ["--log-level", "warning"],
                            stdout=f,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,
                        )
                    )
            t0 = time.perf_counter()
            restarted = False
            catch_up = None
            while True:
                counts = (await svc.status(limit=1))["counts"]
                done = counts["done"] + counts["failed"]
                if not restarted and done >= n // 2:
                    catch_up = await restart_follower(cluster, svc)
                    restarted = True
                if done >= n:
                    break
                if time.perf_counter() - t0 > args.run_timeout:
                    log(f"gave up after {args.run_timeout}s with {done} of {n} done")
                    break
                await trio.sleep(0.5)
            run_s = time.perf_counter() - t0
            result["run_s"] = run_s
            result["run_per_s"] = done / run_s
            result["failed"] = counts["failed"]
            result["catch_up_s"] = catch_up
            log(f"ran {done} in {run_s:.1f}s: {done / run_s:,.0f} tasks/s")
            pids = [p.pid for p in cluster.procs if p is not None]
            finished = [rss(p) - b for p, b in zip(pids, baseline, strict=True)]
            result["finished_bytes_per_task_before_compaction"] = max(finished) / n
            result["status_ms_finished"] = await status_ms(svc, state="done")
            log("compacting into the history (retention 0)")
            with trio.move_on_after(max(60.0, n / 1000)):
                while (await svc.status(limit=1))["counts"]["compacted"] < done:
                    await svc.configure(retention=0)  # each event compacts a bounded number
            await trio.sleep(1.0)
            compacted = [rss(p) - b for p, b in zip(pids, baseline, strict=True)]
            result["finished_bytes_per_task"] = max(compacted) / n
            result["status_ms"] = await status_ms(svc)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        cluster.stop()
    return result


async def status_ms(svc: AsyncService, **filters: Any) -> float:
    samples = []
    for _ in range(10):
        t0 = time.perf_counter()
        await svc.status(limit=50, **filters)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


async def restart_follower(cluster: Any, svc: AsyncService) -> float | None:
    leader = None
    with trio.move_on_after(60):
        while leader is None:  # replicas busy applying a large submission may not answer at once
            states = await replica_states(cluster.addrs, cluster.secret)
            leader = next((st.leader for st in states if st is not None and st.leader is not None), None)
    if leader is None:
        log("no leader found: the follower restart is not measured")
        return None
    follower = (leader + 1) % cluster.replicas
    log(f"killing follower {follower} mid-run and starting it again")
    cluster.kill(follower)
    await trio.sleep(2.0)  # the others move on meanwhile
    target = 0
    with trio.move_on_after(60):
        while not target:
            target = max((st.commit for st in await replica_states(cluster.addrs, cluster.secret) if st), default=0)
    t0 = time.perf_counter()
    cluster.start_replica(follower)
    while time.perf_counter() - t0 < 120:
        st = (await replica_states([cluster.addrs[follower]], cluster.secret))[0]
        if st is not None and st.applied >= target:
            took = time.perf_counter() - t0
            log(f"follower caught up in {took:.2f}s (to slot {target})")
            return took
        await trio.sleep(0.05)
    log("the follower did not catch up within 120 s")
    return None


def ray_rate(n: int) -> dict[str, Any]:
    try:
        import ray
    except ImportError as exc:
        return {"skipped": f"ray is not installed ({exc})"}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:

        @ray.remote
        def noop() -> None:
            return None

        ray.get([noop.remote() for _ in range(100)])  # warm the workers
        t0 = time.perf_counter()
        refs = [noop.remote() for _ in range(n)]
        submit_s = time.perf_counter() - t0
        ray.get(refs)
        total_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"submit_per_s": n / submit_s, "run_per_s": n / total_s}


def dask_rate(n: int) -> dict[str, Any]:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        return {"skipped": f"dask.distributed is not installed ({exc})"}

    def noop(_: int) -> None:
        return None

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        client.gather(client.map(noop, range(100), pure=False))
        t0 = time.perf_counter()
        futures = client.map(noop, range(n), pure=False)
        submit_s = time.perf_counter() - t0
        client.gather(futures)
        total_s = time.perf_counter() - t0
    return {"submit_per_s": n / submit_s, "run_per_s": n / total_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000, help="no-op tasks (default %(default)s)")
    parser.add_argument("--slots", type=int, help="slots per worker (default: from cores and memory)")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="give up running after this many seconds")
    parser.add_argument("--skip-peers", action="store_true", help="measure TaskSprint only")
    parser.add_argument(
        "--skip-run",
        action="store_true",
        help="submit, measure pending memory and status, restart a follower; do not run the tasks",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory and print its path")
    args = parser.parse_args()

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # so every process started is stopped on the way out

    signal.signal(signal.SIGTERM, on_sigterm)
    base = Path(tempfile.mkdtemp(prefix="tasksprint-bench-service-"))
    try:
        ours = trio.run(measure, args, base)
    finally:
        if args.keep_temp:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    log("TaskSprint: " + json.dumps(ours))
    peers: dict[str, Any] = {}
    if not args.skip_peers:
        for name, what, fn in (
            ("ray", "no-op .remote() calls", ray_rate),
            ("dask", "items in client.map of a no-op", dask_rate),
        ):
            log(f"{name}: {args.tasks} {what}")
            try:
                peers[name] = fn(args.tasks)
            except Exception as exc:  # a peer that cannot start here is reported, not fatal
                peers[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    for peer in peers.values():
        if "submit_per_s" in peer:
            peer["tasksprint_submit_ratio"] = ours["submit_per_s"] / peer["submit_per_s"]
    report = {"tasksprint": ours, "peers": peers, "goals": GOALS}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    t = report["tasksprint"]
    g = report["goals"]

    def line(what: str, value: float | None, unit: str, goal: str) -> None:
        shown = "n/a" if value is None else f"{value:,.2f}"
        print(f"{what:<44} {shown:>14} {unit:<9} {goal}")

    print(f"TaskSprint service, {t['tasks']:,} no-op command tasks, 3 replicas (fsync on), 2 workers")
    line("bulk submission", t.get("submit_per_s"), "tasks/s", f"goal >= {g['submit_per_s']:,}")
    line("run on 2 workers", t.get("run_per_s"), "tasks/s", "")
    line(
        "replica RSS per pending task",
        t.get("pending_bytes_per_task"),
        "bytes",
        f"goal <= {g['pending_bytes_per_task']}",
    )
    line("replica RSS per finished task (full record)", t.get("finished_bytes_per_task_before_compaction"), "bytes", "")
    line(
        "replica RSS per finished task (compacted)",
        t.get("finished_bytes_per_task"),
        "bytes",
        f"goal <= {g['finished_bytes_per_task']}",
    )
    line("follower restarted mid-run catches up", t.get("catch_up_s"), "s", f"goal <= {g['catch_up_s']}")
    line("status, one page, all pending", t.get("status_ms_pending"), "ms", f"goal < {g['status_ms']}")
    line("status, one page of done tasks", t.get("status_ms_finished"), "ms", "")
    line("status, one page, after compaction", t.get("status_ms"), "ms", f"goal < {g['status_ms']}")
    for name, peer in report["peers"].items():
        if "skipped" in peer:
            print(f"{name}: skipped: {peer['skipped']}")
            continue
        line(
            f"{name}: submission",
            peer["submit_per_s"],
            "tasks/s",
            f"TaskSprint/{name} = {peer['tasksprint_submit_ratio']:.3f}",
        )
        line(f"{name}: run (2 CPUs)", peer["run_per_s"], "tasks/s", "")


if __name__ == "__main__":
    sys.exit(main())
