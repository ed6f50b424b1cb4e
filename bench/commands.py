#!/usr/bin/env python3
"""Command tasks: TaskSprint's throughput against ``xargs -P`` running the same commands.

Two workloads, each as command tasks on a local cluster -- 3 replica
processes (fsync on) and one worker client with ``--slots`` slots (default
2) that runs command tasks only -- and, side by side in the same run, as
``xargs -P SLOTS`` running the same command lines (the floor: no
scheduling, no log, no accounting):

``true``
    2,000 tasks ``true``.
``sleep``
    500 tasks ``sleep 0.01``.

Every task is ``bash -c COMMAND`` in both systems.  TaskSprint's tasks run
with a limit (``pids``), so each gets a task group: a cgroup where the client
can make one (as root), else rlimits; the record says which.

What is timed: for TaskSprint, from the replica's ``client_joined`` entry
(the scheduler starts all tasks when the client joins) to its
``computation_finished`` entry, as stamped by the replica that applied the
finish first; for xargs, its whole run.  Beside the times, the CPU time each
system spent per task (user and system, all its processes, the tasks
included; for TaskSprint start-up and shut-down of its four processes too):
on a machine shared with other work it is the steadier figure.  It is also
split by process -- each replica, the client, and the tasks the client
reaped (read from ``/proc`` when the computation has finished: start-up
included, shut-down not) -- to show where an improvement must come from;
and once more without the start-up, counted from the moment a replica
logged the client's join (the processes' start-up is a fixed cost that a
short run spreads over few tasks).

Usage::

    python bench/commands.py                # both workloads
    python bench/commands.py --scale 0.1    # a tenth of the tasks
    python bench/commands.py --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

from tasksprint.run import LocalRun

WORKLOADS = {"true": ("true", 2000), "sleep": ("sleep 0.01", 500)}

SCHEDULER = """
from tasksprint import Coordinator


class Commands(Coordinator):
    def init(self, seed):
        self.left = None
        self.enforcement = None

    def client_joined(self, cid):
        if self.left is None:
            self.left = N
            for _ in range(N):
                self.start_task(cmd=COMMAND, limits={"pids": 64}, keys=["enforcement"])

    def task_done(self, tid, values):
        self.enforcement = values["enforcement"]
        self.left -= 1
        if self.left == 0:
            self.finish(values={"done": N, "enforcement": self.enforcement})
"""


class _CommandClients(LocalRun):
    """A local run whose client starts without a node: it runs command tasks only."""

    def client_command(self, i: int) -> list[str]:
        cmd = super().client_command(i)
        at = cmd.index("--node")
        return cmd[:at] + cmd[at + 2 :]


def _children_cpu() -> float:
    """CPU seconds of every descendant this process has waited for (they count theirs in)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a live process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime) / _CLOCK_TICKS, (cutime + cstime) / _CLOCK_TICKS


def _cpu_by_role(run: LocalRun) -> dict[str, float]:
    """CPU seconds so far of each replica, of the client, and of the tasks the client reaped.

    Read while the processes still run (after the computation finished, before
    they stop): start-up is included, shut-down is not.
    """
    roles: dict[str, float] = {}
    assert run.cluster is not None
    for i, proc in enumerate(run.cluster.procs):
        if proc is not None:
            roles[f"replica{i}"] = _proc_cpu(proc.pid)[0]
    own = tasks = 0.0
    for proc in run.client_procs:
        mine, children = _proc_cpu(proc.pid)
        own, tasks = own + mine, tasks + children
    roles["client"], roles["tasks"] = own, tasks
    return roles


def _cpu_at_join(run: LocalRun, logs: list[Path], stop: threading.Event) -> dict[str, float]:
    """CPU seconds by process (as :func:`_cpu_by_role`) when a replica first logs ``client_joined``.

    Polled every 10 ms from a thread while the run goes on; empty if no
    replica logged it before ``stop``.
    """
    while not stop.wait(0.01):
        for log in logs:
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            if '"client_joined"' in text and run.cluster is not None and run.client_procs:
                try:
                    return _cpu_by_role(run)
                except OSError:
                    return {}
    return {}


def _events(path: Path, name: str) -> list[float]:
    stamps = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                stamps.append(datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp())
    return stamps


def run_tasksprint(command: str, n: int, slots: int, tmp: Path) -> dict[str, Any]:
    base = tmp / f"tasksprint-{n}"
    base.mkdir()
    scheduler = base / "scheduler.py"
    scheduler.write_text(f"N = {n}\nCOMMAND = {command!r}\n{SCHEDULER}")
    run = _CommandClients(f"{scheduler}:Commands", "", 3, 1, slots, base / "run", None, 600)
    t0, cpu0 = time.time(), _children_cpu()
    at_join: dict[str, float] = {}
    stop = threading.Event()
    logs = [base / "run" / f"replica{i}.log" for i in range(3)]
    watcher = threading.Thread(target=lambda: at_join.update(_cpu_at_join(run, logs, stop)), daemon=True)
    try:
        run.start()
        watcher.start()
        status = trio.run(run.wait_status)
        by_role = _cpu_by_role(run)
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        run.stop()
    cpu = _children_cpu() - cpu0
    if status.state != "finished" or status.result is None or status.result.values["done"] != n:
        raise RuntimeError(f"the computation ended {status.state}: {status.failure}")
    spans = []
    for i in range(3):
        log = base / "run" / f"replica{i}.log"
        joins, ends = _events(log, "client_joined"), _events(log, "computation_finished")
        if joins and ends:
            spans.append((ends[0], ends[0] - joins[0]))
    seconds = min(spans)[1]
    return {
        "seconds": seconds,
        "tasks_per_s": n / seconds,
        "startup_included_s": time.time() - t0,
        "cpu_ms_per_task": 1000 * cpu / n,
        "cpu_ms_per_task_by_role": {role: 1000 * seconds / n for role, seconds in by_role.items()},
        # The same from the client's join on: the processes' start-up left out.
        "cpu_ms_per_task_by_role_after_join": {
            role: 1000 * (seconds - at_join[role]) / n for role, seconds in by_role.items() if role in at_join
        },
        "enforcement": status.result.values["enforcement"],
    }


def run_xargs(command: str, n: int, slots: int) -> dict[str, Any]:
    lines = "".join(f"{command}\n" for _ in range(n))
    t0, cpu0 = time.perf_counter(), _children_cpu()
    xargs = ["xargs", "-P", str(slots), "-d", "\\n", "-n", "1", "bash", "-c"]
    subprocess.run(xargs, input=lines, text=True, check=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tasks_per_s": n / seconds, "cpu_ms_per_task": 1000 * (_children_cpu() - cpu0) / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the tasks to run")
    p.add_argument("--only", choices=sorted(WORKLOADS))
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"slots": args.slots, "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="tasksprint-bench-commands-") as tmp:
        for name, (command, count) in WORKLOADS.items():
            if args.only and name != args.only:
                continue
            n = max(1, int(count * args.scale))
            xargs = run_xargs(command, n, args.slots)
            ours = run_tasksprint(command, n, args.slots, Path(tmp))
            report["workloads"][name] = {
                "command": command,
                "tasks": n,
                "tasksprint": ours,
                "xargs": xargs,
                "slowdown": ours["seconds"] / xargs["seconds"],
                "cpu_ratio": ours["cpu_ms_per_task"] / xargs["cpu_ms_per_task"],
            }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{'workload':10} {'tasks':>6} {'tasksprint/s':>13} {'xargs/s':>9} {'slowdown':>9}"
        f" {'cpu ms/task':>12} {'xargs':>6} {'ratio':>6}  enforcement"
    )
    for name, w in report["workloads"].items():
        ours, xargs = w["tasksprint"], w["xargs"]
        print(
            f"{name:10} {w['tasks']:6d} {ours['tasks_per_s']:13.1f} {xargs['tasks_per_s']:9.1f} "
            f"{w['slowdown']:8.2f}x {ours['cpu_ms_per_task']:12.2f} {xargs['cpu_ms_per_task']:6.2f} "
            f"{w['cpu_ratio']:5.2f}x  {ours['enforcement']}"
        )
        roles = ", ".join(f"{role} {ms:.2f}" for role, ms in ours["cpu_ms_per_task_by_role"].items())
        print(f"{'':10} cpu ms/task by process (start-up included): {roles}")
        after = ours["cpu_ms_per_task_by_role_after_join"]
        if after:
            replicas = sum(ms for role, ms in after.items() if role.startswith("replica"))
            roles = ", ".join(f"{role} {ms:.2f}" for role, ms in after.items())
            print(f"{'':10} cpu ms/task by process from the client's join: {roles} (replicas {replicas:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
