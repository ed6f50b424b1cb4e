#!/usr/bin/env python3
"""``tasksprint batch`` against disBatch and ``xargs -P`` on the same task files.

Task files, run with 2 slots by each system in the same run:

``true``
    1,000 lines ``true`` (200 for disBatch, which runs about 5 a second);
``sleep``
    200 lines ``sleep 0.05``;
``start``
    one ``true``: what a run costs besides its tasks (starting and stopping
    the replicas and the client, for tasksprint batch).

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

``--baseline TREE`` runs tasksprint batch from the checkout ``TREE`` too (e.g.
``git worktree add --detach ../base main``), in turns with this code, and
gives the ratio of the median times; ``--repeat N`` does N turns.

tasksprint's bytecode is compiled first (this checkout's and the baseline's),
as installing the package does: a source checkout used with
``PYTHONDONTWRITEBYTECODE`` set would otherwise compile its modules again in
every process of every run (about 0.3 s of CPU per run for the driver, the
replicas and the client); ``--no-compile`` measures the checkout as it is.

Usage::

    python bench/batch.py            # every task file
    python bench/batch.py --scale 0.2
    python bench/batch.py --only start --no-disbatch --baseline ../base --repeat 5
    python bench/batch.py --json
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasksprint.batch.statusfile import parse_status_file

WORKLOADS = {"true": ("true", 1000, 200), "sleep": ("sleep 0.05", 200, 200), "start": ("true", 1, 1)}
#: This checkout: the one tasksprint batch runs from unless a baseline is asked for.
HERE = Path(__file__).resolve().parent.parent


def _children_cpu() -> float:
    """CPU seconds of every descendant this process has waited for (they count theirs in)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(
    cmd: list[str], cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all its processes) of running ``cmd``."""
    t0, cpu0 = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, cwd=cwd, input=stdin, text=True, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def compile_bytecode(tree: Path) -> None:
    """Compile the bytecode of the packages under ``tree``, as installing them does."""
    for package in ("tasksprint", "sdk/python/tasksprint_sdk"):
        if (tree / package).is_dir():
            compileall.compile_dir(tree / package, quiet=1)


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


def run_tasksprint(command: str, n: int, slots: int, tmp: Path, tree: Path = HERE) -> dict[str, Any]:
    """``tasksprint batch`` of ``n`` × ``command``, every process of it running the code of checkout ``tree``."""
    work = Path(tempfile.mkdtemp(prefix=f"tasksprint-{command.split()[0]}-", dir=tmp))
    (work / "Tasks").write_text("".join(f"{command}\n" for _ in range(n)))
    cmd = [sys.executable, "-m", "tasksprint.cli", "batch", "-s", f"localhost:{slots}", "-p", "run", "Tasks"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    seconds, cpu = _timed(cmd, work, env=env)
    records = parse_status_file((work / "run_status.txt").read_bytes()).records
    if len(records) != n or any(r.exit_code for r in records):
        raise RuntimeError(f"tasksprint batch wrote {len(records)} status lines for {n} tasks, or some failed")
    span = max(r.finish for r in records) - min(r.start for r in records)
    return {**_figures(n, seconds, cpu), "task_span_s": span}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time (the upper one of an even number)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the tasks to run")
    p.add_argument("--only", choices=sorted(WORKLOADS))
    p.add_argument("--no-disbatch", action="store_true", help="leave disBatch out (it is slow)")
    p.add_argument("--baseline", type=Path, metavar="TREE", help="also run tasksprint batch from this checkout")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="turns per workload (medians are shown)")
    p.add_argument("--no-compile", action="store_true", help="do not compile tasksprint's bytecode first")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    trees = {"tasksprint": HERE} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    if not args.no_compile:
        for tree in trees.values():
            compile_bytecode(tree)
    report: dict[str, Any] = {"slots": args.slots, "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="tasksprint-bench-batch-") as tmpdir:
        tmp = Path(tmpdir)
        for name, (command, count, db_count) in WORKLOADS.items():
            if args.only and name != args.only:
                continue
            n, n_db = max(1, int(count * args.scale)), max(1, int(db_count * args.scale))
            turns: dict[str, list[dict[str, Any]]] = {"xargs": [], **{system: [] for system in trees}}
            for _ in range(max(1, args.repeat)):
                turns["xargs"].append(run_xargs(command, n, args.slots, tmp))
                # The baseline first, then this code, turn after turn: the machine's load is shared alike.
                for system, tree in reversed(trees.items()):
                    turns[system].append(run_tasksprint(command, n, args.slots, tmp, tree))
            disbatch = None if args.no_disbatch else run_disbatch(command, n_db, args.slots, tmp)
            ours, xargs = _median(turns["tasksprint"]), _median(turns["xargs"])
            base = _median(turns["baseline"]) if "baseline" in turns else None
            report["workloads"][name] = {
                "command": command,
                "tasksprint": ours,
                "baseline": base,
                "xargs": xargs,
                "disbatch": disbatch,
                "turns": {system: [r["seconds"] for r in runs] for system, runs in turns.items()},
                "vs_xargs_time": ours["seconds"] / xargs["seconds"] * xargs["tasks"] / ours["tasks"],
                "vs_disbatch_rate": None if disbatch is None else ours["tasks_per_s"] / disbatch["tasks_per_s"],
                "vs_baseline_time": None if base is None else ours["seconds"] / base["seconds"],
                "vs_baseline_cpu": None if base is None else ours["cpu_ms_per_task"] / base["cpu_ms_per_task"],
            }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'workload':9} {'system':11} {'tasks':>6} {'wall s':>8} {'tasks/s':>9} {'cpu ms/task':>12}")
    for name, w in report["workloads"].items():
        for system in ("disbatch", "xargs", "baseline", "tasksprint"):
            r = w[system]
            if r is None:
                if system == "disbatch":
                    print(f"{name:9} {system:11} {'(not run)':>25}")
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
        if w["vs_baseline_time"] is not None:
            line += f"; {w['vs_baseline_time']:.2f}x the baseline's time, {w['vs_baseline_cpu']:.2f}x its CPU"
        print(line)
        if len(w["turns"]["tasksprint"]) > 1:
            for system, seconds in w["turns"].items():
                print(f"{name:9} {system:11} turns (s): " + " ".join(f"{t:.2f}" for t in seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
