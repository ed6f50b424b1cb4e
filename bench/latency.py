"""Commit latency at light load: this code against another checkout, in interleaved rounds.

``bench/log.py`` measures latency once, beside throughput and PySyncObj.
A change of a few tenths of a millisecond is lost in the noise of a shared
machine between two such runs; this script measures only that, for two
trees, round after round on fresh clusters (baseline, this, baseline,
this, ...), so both see the same machine.  Per round and tree it prints:

- the client's latency, p50 and p99 (``LogClient.submit`` of one command
  at a time, as ``bench/log.py`` does, with that tree's client);
- the leader's own figure, from the command's arrival to its answer (this
  code only: another tree may speak another handshake);
- CPU microseconds per command of each replica, most first (the leader):
  the work each does for one command, which load on the machine hardly
  changes.

    .venv/bin/python bench/latency.py --baseline ../tasksprint-old --rounds 4
    .venv/bin/python bench/latency.py --rounds 3 --json

Without ``--baseline`` it measures this code alone.  The baseline tree
needs a ``bench/log.py`` with its latency worker (any tree since the
replicated log benchmark was added).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

from _procs import (
    Children,
    Cleanup,
    cpu_seconds,
    exit_on_signals,
    loadavg,
    note,
    percentile,
    statuses,
    temp_dir,
    wait_stable,
)
from log import tree_env

HERE = Path(__file__).resolve().parent


def one_round(args: argparse.Namespace, base: Path, children: Children, label: str, tree: Path | None) -> dict:
    """A fresh three-replica cluster of ``tree`` (None: this code), and one latency client on it."""
    from tasksprint.localcluster import LocalCluster

    env = None if tree is None else tree_env(tree)
    script = HERE / "log.py" if tree is None else tree / "bench" / "log.py"
    with LocalCluster(base / label, replicas=3, env=env) as cl:
        cl.start()
        if tree is None:
            wait_stable(cl, [0, 1, 2])
        # (Another tree may speak another handshake: its client's warm-up waits for its leader.)
        cfg = {
            "addrs": [list(a) for a in cl.addrs],
            "secret": cl.secret.hex(),
            "mode": "latency",
            "warmup": args.warmup,
            "samples": args.samples,
            "first": 10**12,
        }
        pids = {i: cl.procs[i].pid for i in range(3)}
        before = {i: cpu_seconds(p) for i, p in pids.items()}
        argv = [sys.executable, str(script), "--worker", json.dumps(cfg)]
        w = children.start(f"latency client ({label})", argv, base / f"{label}.err", env)
        lat = w.recv(120 + 0.1 * (args.samples + args.warmup))["latencies_ms"]
        after = {i: cpu_seconds(p) for i, p in pids.items()}
        children.stop(w)
        lead = None
        if tree is None:
            st = statuses(cl.addrs, cl.secret)
            lead = next((x for x in st if x is not None and x.role == "leader"), None)
    commands = args.samples + args.warmup
    # The leader does the most work of the three: it comes first.
    cpu = sorted(
        (round(1e6 * (after[i] - before[i]) / commands, 1) for i in range(3) if None not in (before[i], after[i])),  # type: ignore[operator]
        reverse=True,
    )
    return {
        "p50_ms": round(percentile(lat, 50), 3),
        "p99_ms": round(percentile(lat, 99), 3),
        "leader_p50_ms": None if lead is None or lead.commit_p50_ms is None else round(lead.commit_p50_ms, 3),
        "cpu_us_per_command": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, metavar="TREE", help="another checkout to measure in the same run")
    p.add_argument("--rounds", type=int, default=3, help="rounds per tree, interleaved (default %(default)s)")
    p.add_argument("--samples", type=int, default=2000, help="timed commands per round (default %(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="commands before the timed ones (default %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    p.add_argument("--keep-temp", action="store_true", help="keep the replicas' directories and logs")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.samples < 1 or args.warmup < 0:
        p.error("--rounds and --samples must be positive, --warmup non-negative")
    if args.baseline is not None and not (args.baseline / "tasksprint").is_dir():
        p.error(f"--baseline {args.baseline}: not a checkout of tasksprint (no tasksprint/ in it)")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    exit_on_signals(signal.SIGTERM, signal.SIGHUP)
    sides: list[tuple[str, Path | None]] = [("this", None)]
    if args.baseline is not None:
        sides.insert(0, ("baseline", args.baseline.resolve()))
    load = [loadavg()]
    res: dict[str, Any] = {label: [] for label, _ in sides}
    children = Children()
    with Cleanup() as stack:
        base = stack.enter_context(temp_dir("tasksprint-latency-", args.keep_temp))
        stack.callback(children.stop_all)
        # Children run ``python -m tasksprint.cli``: from a checkout's directory
        # that checkout's code would run, whatever PYTHONPATH says.
        os.chdir(base)
        for r in range(args.rounds):
            for label, tree in sides:
                out = one_round(args, base, children, f"{label}-{r}", tree)
                note(f"round {r + 1}, {label}: {out}")
                res[label].append(out)
    load.append(loadavg())
    summary = {
        label: {
            "p50_ms_median": round(statistics.median(x["p50_ms"] for x in rounds), 3),
            "cpu_us_per_command_median": [
                round(statistics.median(x["cpu_us_per_command"][i] for x in rounds), 1)
                for i in range(min(len(x["cpu_us_per_command"]) for x in rounds))
            ],
        }
        for label, rounds in res.items()
    }
    result = {"rounds": res, "summary": summary, "load_before_after": load, "baseline": str(args.baseline)}
    if "baseline" in summary:
        result["p50_ratio_this_over_baseline"] = round(
            summary["this"]["p50_ms_median"] / summary["baseline"]["p50_ms_median"], 2
        )
    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    print(f"Commit latency at light load, one command at a time, {args.samples} samples a round")
    print(f"1-min load average {load[0]} before, {load[1]} after")
    print(f"{'round':<8}{'tree':<10}{'p50 ms':>9}{'p99 ms':>9}{'leader p50':>12}  CPU us/command (leader, followers)")
    for r in range(args.rounds):
        for label, _ in sides:
            x = res[label][r]
            lp = "-" if x["leader_p50_ms"] is None else f"{x['leader_p50_ms']:.3f}"
            print(f"{r + 1:<8}{label:<10}{x['p50_ms']:>9.3f}{x['p99_ms']:>9.3f}{lp:>12}  {x['cpu_us_per_command']}")
    for label, s in summary.items():
        print(f"median of rounds, {label}: p50 {s['p50_ms_median']:.3f} ms, CPU {s['cpu_us_per_command_median']}")
    if "p50_ratio_this_over_baseline" in result:
        print(f"p50 ratio this/baseline: {result['p50_ratio_this_over_baseline']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
