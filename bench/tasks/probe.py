"""Phase timers inside TaskSprint's processes, for ``bench/tasks.py --probe``.

This module is an observer factory for TaskSprint's metrics hook
(:mod:`tasksprint.observe`).  ``bench/tasks.py --probe`` starts the replicas
and clients with::

    TASKSPRINT_OBSERVER=probe:observer
    PYTHONPATH=bench/tasks:...
    TASKSPRINT_PROBE_DIR=<the run's directory>/probe

so that each ``tasksprint replica`` / ``tasksprint client`` process calls
:func:`observer` with its role and hands the :class:`~tasksprint.observe.Recorder`
it returns to its ``Replica`` / ``Client`` / ``NodePool``.  When the process
ends (a client when the computation ends, a replica on SIGINT, which the
benchmark sends before stopping it) the figures are written as JSON to
``$TASKSPRINT_PROBE_DIR/<role>-<name>-<pid>.json``; :func:`summarize` turns
the files of one run into a few lines.

What is timed is what the runtime reports through the hook: spans such as
``storage.write``, ``paxos.step``, ``applier.apply_slot``, ``machine.apply``,
``query.view``, ``client.view_poll``, ``client.gather_inputs``,
``node.exchange``, ``store.put`` and ``client.report`` (count, mean, p50, p90,
max in milliseconds, total seconds), values such as
``applier.items_per_slot``, and counters; plus the CPU seconds and the wall
time of each process.

What-if experiments
-------------------
``bench/tasks.py --what-if`` changes one thing in the running processes, to
measure what a change would buy before anyone writes it.  Only changes the
processes accept as configuration remain:

``prefetch=K``
    each client is started with ``--queue (K-1) x slots``: the coordinator
    may assign up to K times as many tasks as the client has node processes,
    the extra ones waiting in the node pool (a fixed queue instead of the
    adaptive one).

Dropped, because they could only be made by replacing private methods of
the running processes: ``no-fsync`` (the replica command line has no option
to open its storage without fsync), ``early-views`` (answering parked view
long-polls right after a slot is applied rather than after the following
fsync is a change to the replica's driver), ``poll-leader`` (a client
long-polling the leader rather than the first address it was given is a
change to the client).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tasksprint.observe import Figures, Recorder

PROBE_DIR_ENV = "TASKSPRINT_PROBE_DIR"


def observer(role: str) -> Recorder:
    """A recorder for this ``role`` process whose figures are written when the process exits."""
    recorder = Recorder(time.perf_counter)
    started = time.perf_counter()
    # The figures are written on the way out, which SIGINT must trigger even
    # when this process was started with SIGINT ignored (from a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(_dump, role, recorder, started)
    return recorder


def _ms(f: Figures) -> dict[str, float]:
    return {
        "count": f.count,
        "mean": 1000.0 * (f.mean or 0.0),
        "p50": 1000.0 * (f.p50 or 0.0),
        "p90": 1000.0 * (f.p90 or 0.0),
        "max": 1000.0 * (f.max or 0.0),
        "total_s": f.total,
    }


def _plain(f: Figures) -> dict[str, float]:
    return {
        "count": f.count,
        "mean": f.mean or 0.0,
        "p50": f.p50 or 0.0,
        "p90": f.p90 or 0.0,
        "max": f.max or 0.0,
        "total_s": f.total,
    }


def _ident(argv: list[str]) -> str:
    for flag in ("--id", "--name"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            return argv[argv.index(flag) + 1]
    return ""


def _dump(role: str, recorder: Recorder, started: float) -> None:
    directory = os.environ.get(PROBE_DIR_ENV)
    if not directory:
        return
    ru = resource.getrusage(resource.RUSAGE_SELF)
    got = recorder.read()
    out = {
        "role": role,
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        "wall_s": time.perf_counter() - started,
        "cpu_user_s": ru.ru_utime,
        "cpu_sys_s": ru.ru_stime,
        "timers_ms": {k: _ms(f) for k, f in got.spans.items() if f.count},
        "values": {k: _plain(f) for k, f in got.values.items() if f.count},
        "counts": {k: f.total for k, f in got.counts.items()},
    }
    ident = _ident(sys.argv)
    path = Path(directory) / f"{role}{'-' + ident if ident else ''}-{os.getpid()}.json"
    path.write_text(json.dumps(out, indent=1))


def summarize(directory: Path) -> dict[str, Any]:
    """The probe files of one run: per process, and as printable lines."""
    procs = []
    for f in sorted(Path(directory).glob("*.json")):
        try:
            procs.append(json.loads(f.read_text()))
        except ValueError:
            continue
    if not procs:
        return {
            "processes": [],
            "lines": [
                f"no probe figures: no TaskSprint process loaded TASKSPRINT_OBSERVER=probe:observer "
                f"(nothing written under {directory})"
            ],
        }

    # Only the leader proposes.
    def weight(p: dict) -> float:
        return p["timers_ms"].get("paxos.propose", {}).get("count", 0)

    replicas = [p for p in procs if p["role"] == "replica"]
    leader = max(replicas, key=weight) if replicas else None
    lines = []
    for p in sorted(procs, key=lambda p: (p["role"], p["argv"])):
        name = p["role"]
        ident = _ident(p["argv"])
        if ident:
            name += " " + ident
        if p is leader:
            name += " (leader)"
        lines.append(f"{name}: CPU {p['cpu_user_s'] + p['cpu_sys_s']:.2f}s over {p['wall_s']:.1f}s alive")
        if p["role"] == "replica" and p is not leader:
            keys = ["storage.write", "applier.apply_slot", "paxos.step"]
            if "query.view" in p["timers_ms"]:  # the replica the clients poll
                keys += ["query.view"]
        else:
            keys = sorted(p["timers_ms"])
        for k in keys:
            s = p["timers_ms"].get(k)
            if s:
                lines.append(
                    f"  {k:<28} n={s['count']:<7} mean {s['mean']:8.3f} ms  p50 {s['p50']:8.3f}  "
                    f"p90 {s['p90']:8.3f}  max {s['max']:8.2f}  total {s['total_s']:7.2f}s"
                )
        if p["role"] != "replica" or p is leader:
            for k, s in sorted(p["values"].items()):
                lines.append(
                    f"  {k:<28} n={s['count']:<7} mean {s['mean']:8.2f}     p50 {s['p50']:6.0f}  max {s['max']:6.0f}"
                )
            for k, n in sorted(p.get("counts", {}).items()):
                lines.append(f"  {k:<28} {n:,.0f}")
    return {"processes": procs, "lines": lines}
