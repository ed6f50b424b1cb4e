#!/usr/bin/env python3
"""``tasksprint batch`` against disBatch and ``xargs -P`` on the same task files.

Two task files, run with 2 slots by each system in the same run:

``true``
    1,000 lines ``true`` (200 for disBatch, which runs about 5 a second);
``sleep``
    200 lines ``sleep 0.05``.

Systems: ``disbatch -s localhost:SLOTS`` (the reference), ``xargs -P SLOTS``
running each line with ``bash -c`` (the floor: no scheduling, no log, no
status file) and ``tasksprint batch -s localhost:SLOTS`` (3 replicas, fsync
on, one client).  Each is timed over its whole command, start-up and
shut-down included, and tasks/s is tasks over that time; the CPU time each
system spent per task (all its processes, start-up included) is given too,
the steadier figure on a shared machine; for tasksprint
batch the span from the first task's start to the last task's finish (read
from its status file) is given too.  Ratios: tasksprint's tasks/s over
disBatch's, and tasksprint's time over xargs'.

Usage::

    python bench/batch.py            # both task files
    python bench/batch.py --scale 0.2
    python bench/batch.py --json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasksprint.batch.statusfile import parse_status_file

WORKLOADS = {"true": ("true", 1000, 200), "sleep": ("sleep 0.05", 200, 200)}


def _children_cpu() -> float:
    """CPU seconds of every descendant this process has waited for (they count theirs in)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], cwd: Path, stdin: str | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all its processes) of running ``cmd``."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, cwd=cwd, input=stdin, text=True, check=True, capture_output=True)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def _figures(n: int, seconds: float, cpu: float) -> dict[str, Any]:
    return {"tasks": n, "seconds": seconds, "tasks_per_s": n / seconds, "cpu_ms_per_task": 1000 * cpu / n}


def run_xargs(command: str, n: int, slots: int, tmp: Path) -> dict[str, Any]:
    lines = "".join(f"{command}\n" for _ in range(n))
    return _figures(n, *_timed(["xargs", "-P", str(slots), "-d", "\\n", "-n", "1", "bash", "-c"], tmp, lines))


def run_disbatch(command: str, n: int, slots: int, tmp: Path) -> dict[str, Any] | None:
    exe = shutil.which("disbatch") or str(Path(sys.executable).parent / "disbatch")
    if not Path(exe).exists():
        return None
    work = tmp / f"disbatch-{command.split()[0]}"
    work.mkdir()
    (work / "Tasks").write_text("".join(f"{command}\n" for _ in range(n)))
    return _figures(n, *_timed([exe, "-s", f"localhost:{slots}", "Tasks"], work))


def run_tasksprint(command: str, n: int, slots: int, tmp: Path) -> dict[str, Any]:
    work = tmp / f"tasksprint-{command.split()[0]}"
    work.mkdir()
    (work / "Tasks").write_text("".join(f"{command}\n" for _ in range(n)))
    cmd = [sys.executable, "-m", "tasksprint.cli", "batch", "-s", f"localhost:{slots}", "-p", "run", "Tasks"]
    seconds, cpu = _timed(cmd, work)
    records = parse_status_file((work / "run_status.txt").read_bytes()).records
    if len(records) != n or any(r.exit_code for r in records):
        raise RuntimeError(f"tasksprint batch wrote {len(records)} status lines for {n} tasks, or some failed")
    span = max(r.finish for r in records) - min(r.start for r in records)
    return {**_figures(n, seconds, cpu), "task_span_s": span}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the tasks to run")
    p.add_argument("--only", choices=sorted(WORKLOADS))
    p.add_argument("--no-disbatch", action="store_true", help="leave disBatch out (it is slow)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"slots": args.slots, "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="tasksprint-bench-batch-") as tmpdir:
        tmp = Path(tmpdir)
        for name, (command, count, db_count) in WORKLOADS.items():
            if args.only and name != args.only:
                continue
            n, n_db = max(1, int(count * args.scale)), max(1, int(db_count * args.scale))
            xargs = run_xargs(command, n, args.slots, tmp)
            ours = run_tasksprint(command, n, args.slots, tmp)
            disbatch = None if args.no_disbatch else run_disbatch(command, n_db, args.slots, tmp)
            report["workloads"][name] = {
                "command": command,
                "tasksprint": ours,
                "xargs": xargs,
                "disbatch": disbatch,
                "vs_xargs_time": ours["seconds"] / xargs["seconds"] * xargs["tasks"] / ours["tasks"],
                "vs_disbatch_rate": None if disbatch is None else ours["tasks_per_s"] / disbatch["tasks_per_s"],
            }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'workload':9} {'system':11} {'tasks':>6} {'wall s':>8} {'tasks/s':>9} {'cpu ms/task':>12}")
    for name, w in report["workloads"].items():
        for system in ("disbatch", "xargs", "tasksprint"):
            r = w[system]
            if r is None:
                print(f"{name:9} {system:11} {'(not installed)':>25}")
                continue
            print(
                f"{name:9} {system:11} {r['tasks']:6d} {r['seconds']:8.2f} {r['tasks_per_s']:9.1f}"
                f" {r['cpu_ms_per_task']:12.2f}"
            )
        ours = w["tasksprint"]
        line = f"{name:9} tasksprint: {ours['task_span_s']:.2f} s first start to last finish; "
        line += f"time per task {w['vs_xargs_time']:.2f}x xargs'"
        if w["vs_disbatch_rate"] is not None:
            line += f", {w['vs_disbatch_rate']:.1f}x disBatch's tasks/s"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
