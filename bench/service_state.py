"""The service's replicated state at scale, in one process: what each replica pays per task.

``bench/service.py`` runs the real service, whose run rate is bounded by
starting one command process per task (a handful per second here), so a
million tasks cannot finish there in a working day.  This script feeds one
replica's state machine (the coordinator machine with the queue scheduler,
through the same ``Applier`` a replica uses) with the log a million-task
run produces: bulk submissions in the compact form, two simulated workers
that take tasks from their views and report each batch of completions as
one log entry, and compaction into the history (SQLite, as a replica keeps
it). It prints, per stage:

- apply time per submitted task and per completed task (every replica pays
  it; a replica applies about 1 / that many tasks per second);
- memory per task, pending, finished (full record) and compacted: the RSS
  growth of this process, and the *state memory*, the RSS growth of a fresh
  process restoring a snapshot of that state (less the snapshot's bytes):
  RSS never shrinks when Python frees objects, so after compaction only the
  second says what the state holds;
- ``status`` (one page of 50, unfiltered and with each filter while two
  workers run some of the tasks) and ``info`` times at that size;
- snapshot size and the time to take it and to restore it (what a replica
  that restarts or catches up spends before it replays the log's tail).

    .venv/bin/python bench/service_state.py --tasks 1000000
    .venv/bin/python bench/service_state.py --tasks 100000 --json

No network, no fsync: this is the state machine's share, not the service's
end-to-end rate (``bench/service.py`` measures that).  Times are CPU
seconds of the process (``time.process_time``), not wall time: on a shared
machine the wall time is the CPU time divided by the share the process got.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasksprint.coordinator.machine import CoordinatorMachine
from tasksprint.history import SqliteHistory
from tasksprint.machine import Applier
from tasksprint.paxos.messages import Batch, Command, Tick
from tasksprint.replica import tune_gc
from tasksprint.service.api import submit_body
from tasksprint.service.scheduler import MAX_BATCH, QueueScheduler

GOALS = {"pending_bytes_per_task": 2048, "finished_bytes_per_task": 1024, "status_ms": 100.0}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rss() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Replica:
    """One replica's machine, fed one log entry at a time."""

    def __init__(self, history: SqliteHistory) -> None:
        self.machine = CoordinatorMachine(QueueScheduler)
        self.machine.attach_history(history)
        self.applier = Applier(self.machine)
        self.seq = 0
        self.now = 0.0

    def op(self, op: dict[str, Any]) -> Any:
        self.seq += 1
        batch = Batch(items=(Command(client_id="bench", seq=self.seq, op=op),))
        return self.applier.apply_slot(self.applier.applied + 1, batch)[0][1]

    def tick(self, expired: list[int] | None = None) -> None:
        self.now += 1.0
        data = {"expired": expired or []}
        self.applier.apply_slot(self.applier.applied + 1, Batch(items=(Tick(now=self.now, data=data),)))

    def ask(self, **args: Any) -> Any:
        return self.machine.scheduler_query(args)


def record(now: float) -> dict[str, Any]:
    """What a worker reports for a no-op command that exited 0."""
    return {
        "verdict": "ok",
        "exit_code": 0,
        "signal": None,
        "started": now,
        "finished": now,
        "elapsed_s": 0.002,
        "user_cpu_s": 0.001,
        "system_cpu_s": 0.001,
        "peak_memory_bytes": 1_400_000,
        "limits_hit": [],
        "enforcement": "rlimit",
        "host": "bench",
        "stdout": {"bytes": 0, "head": "", "tail": ""},
        "stderr": {"bytes": 0, "head": "", "tail": ""},
    }


_RESTORE = """
import gc, sys, time
from pathlib import Path
from tasksprint.coordinator.machine import CoordinatorMachine
from tasksprint.machine import Applier
from tasksprint.replica import tune_gc
from tasksprint.service.scheduler import QueueScheduler

tune_gc()

def rss():
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

data = Path(sys.argv[1]).read_bytes()
applier = Applier(CoordinatorMachine(QueueScheduler))
before = rss()
t0 = time.process_time()
applier.restore(data)
took = time.process_time() - t0
del data
print(rss() - before, took)
"""


def restored(snap: bytes, base: Path) -> tuple[int, float]:
    """RSS growth of a fresh process restoring ``snap`` (the state's memory, without freed holes), and the time."""
    path = base / "snapshot"
    path.write_bytes(snap)
    try:
        done = subprocess.run([sys.executable, "-c", _RESTORE, str(path)], capture_output=True, text=True, check=True)
    finally:
        path.unlink()
    grown, took = done.stdout.split()
    return int(grown) - len(snap), float(took)


def timed_ms(fn: Any, repeat: int = 10) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        samples.append((time.process_time() - t0) * 1000)
    return statistics.median(samples)


FILTERS = {
    "state=pending": {"state": "pending"},
    "state=running": {"state": "running"},
    "state=waiting": {"state": "waiting"},
    "worker": {"worker": "f0"},
    "tag": {"tag": "gpu"},
}


def filtered_status(r: Replica, n: int) -> dict[str, float]:
    """``status`` with each filter, one page of 50, while ``n`` tasks wait and two workers run some.

    The workers join and take what their views offer, so the page of running
    tasks is not empty; they leave again (their tasks go back to pending).
    """
    cids = [r.op({"op": "join", "client": f"f{i}", "addr": f"f{i}:1", "slots": 2, "have": []}).cid for i in range(2)]
    for cid in cids:
        r.machine.view(cid, 0)
    out = {}
    for name, args in FILTERS.items():
        page = r.ask(q="status", limit=50, **args)
        if name in ("state=running", "worker"):
            assert page["tasks"], f"status {name}: no running task listed"
        out[f"status_ms_{name}"] = timed_ms(lambda args=args: r.ask(q="status", limit=50, **args))
    r.tick(expired=cids)
    return out


def measure(n: int, base: Path, batch: int, compact_early: bool, skip_run: bool = False) -> dict[str, Any]:
    history = SqliteHistory.open(base, fsync=False)
    r = Replica(history)
    r.op({"op": "init", "seed": 1, "code_digest": r.machine.code_digest})
    out: dict[str, Any] = {"tasks": n}
    base_rss = rss()

    log(f"submitting {n} no-op tasks, {batch} per log entry")
    body = submit_body([{"argv": ["true"]}] * batch)
    t0 = time.process_time()
    left = n
    while left:
        k = min(batch, left)
        if k != batch:
            body = submit_body([{"argv": ["true"]}] * k)
        answer = r.op({"op": "command", "body": body})
        assert "first" in answer.value, answer
        left -= k
    out["submit_apply_us_per_task"] = (time.process_time() - t0) / n * 1e6
    out["pending_bytes_per_task"] = (rss() - base_rss) / n
    out["status_ms_pending"] = timed_ms(lambda: r.ask(q="status", limit=50))
    out.update(filtered_status(r, n))
    t0 = time.process_time()
    snap = r.applier.snapshot()
    out["snapshot_pending_s"] = time.process_time() - t0
    out["snapshot_pending_bytes"] = len(snap)
    grown, out["restore_pending_s"] = restored(snap, base)
    out["pending_state_bytes_per_task"] = grown / n
    del snap

    if skip_run:
        history.close()
        return out
    if compact_early:
        r.op({"op": "command", "body": {"do": "configure", "retention": 0}})
    log("running them on 2 simulated workers (a log entry per batch of completions)")
    cids = [r.op({"op": "join", "client": f"w{i}", "addr": f"w{i}:1", "slots": 2, "have": []}).cid for i in range(2)]
    seen = dict.fromkeys(cids, 0)
    held: dict[int, list[tuple[int, int]]] = {c: [] for c in cids}
    done = 0
    t0 = time.process_time()
    while done < n:
        moved = False
        for cid in cids:
            view = r.machine.view(cid, seen[cid])
            seen[cid] = view.version
            held[cid] += [(a.tid, a.attempt) for a in view.tasks]
            if not held[cid]:
                continue
            ops = [
                {"op": "done", "cid": cid, "tid": tid, "attempt": att, "values": record(r.now), "sizes": {}}
                for tid, att in held[cid][:2000]
            ]
            del held[cid][:2000]
            r.op({"op": "batch", "ops": ops})
            done += len(ops)
            moved = True
        if not moved:
            raise RuntimeError(f"stuck with {done} of {n} done")
    out["run_apply_us_per_task"] = (time.process_time() - t0) / n * 1e6
    out["finished_bytes_per_task_before_compaction"] = None
    out["finished_state_bytes_per_task_before_compaction"] = None
    if not compact_early:
        out["finished_bytes_per_task_before_compaction"] = (rss() - base_rss) / n
        grown, _ = restored(r.applier.snapshot(), base)
        out["finished_state_bytes_per_task_before_compaction"] = grown / n
    out["status_ms_finished"] = timed_ms(lambda: r.ask(q="status", limit=50, state="done"))

    log("compacting into the history (retention 0)")
    t0 = time.process_time()
    r.tick()
    while r.ask(q="status", limit=1)["counts"]["compacted"] < n:
        r.op({"op": "command", "body": {"do": "configure", "retention": 0}})
    history.sync()
    out["compact_us_per_task"] = (time.process_time() - t0) / n * 1e6
    out["finished_bytes_per_task"] = (rss() - base_rss) / n
    out["status_ms"] = timed_ms(lambda: r.ask(q="status", limit=50))
    out["info_ms_archived"] = timed_ms(lambda: r.ask(q="info", id=n // 2))
    assert r.ask(q="info", id=n // 2)["history"] == "archived"
    t0 = time.process_time()
    snap = r.applier.snapshot()
    out["snapshot_s"] = time.process_time() - t0
    out["snapshot_bytes"] = len(snap)
    grown, out["restore_s"] = restored(snap, base)
    out["finished_state_bytes_per_task"] = grown / n
    out["history_file_bytes"] = sum(p.stat().st_size for p in base.iterdir())
    history.close()
    return out


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000, help="no-op tasks (default %(default)s)")
    parser.add_argument("--batch", type=int, default=MAX_BATCH, help="tasks per submit command (default %(default)s)")
    parser.add_argument(
        "--compact-early",
        action="store_true",
        help="retention 0 from the start, so tasks are compacted as they finish (no full-record figures); "
        "for a million tasks, whose full records would need gigabytes",
    )
    parser.add_argument("--skip-run", action="store_true", help="stop after the submission figures")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    tune_gc()  # as a replica does
    with tempfile.TemporaryDirectory(prefix="tasksprint-bench-state-") as tmp:
        out = measure(args.tasks, Path(tmp), min(args.batch, MAX_BATCH), args.compact_early, args.skip_run)
    if args.json:
        print(json.dumps({"tasksprint": out, "goals": GOALS}, indent=2))
        return 0
    g = out.get
    rows = [
        ("apply, per submitted task", g("submit_apply_us_per_task"), "us", ""),
        ("apply, per completed task", g("run_apply_us_per_task"), "us", ""),
        ("RSS growth per pending task", g("pending_bytes_per_task"), "bytes", "goal <= 2048"),
        ("RSS growth per finished task, full record", g("finished_bytes_per_task_before_compaction"), "bytes", ""),
        ("RSS growth per task after compaction", g("finished_bytes_per_task"), "bytes", "(freed, kept by Python)"),
        ("state memory per pending task", g("pending_state_bytes_per_task"), "bytes", "goal <= 2048"),
        ("state memory per finished task, full", g("finished_state_bytes_per_task_before_compaction"), "bytes", ""),
        ("state memory per finished task, compacted", g("finished_state_bytes_per_task"), "bytes", "goal <= 1024"),
        ("compaction into the history, per task", g("compact_us_per_task"), "us", ""),
        ("status, one page, all pending", g("status_ms_pending"), "ms", "goal < 100"),
        *((f"status, one page, {name}", g(f"status_ms_{name}"), "ms", "goal < 100") for name in FILTERS),
        ("status, one page of done tasks", g("status_ms_finished"), "ms", ""),
        ("status, one page, after compaction", g("status_ms"), "ms", "goal < 100"),
        ("info of a compacted task (history)", g("info_ms_archived"), "ms", ""),
        ("snapshot, all pending: MiB", _mib(g("snapshot_pending_bytes")), "MiB", ""),
        ("snapshot, all pending: take", g("snapshot_pending_s"), "s", ""),
        ("snapshot, all pending: restore", g("restore_pending_s"), "s", ""),
        ("snapshot, all compacted: MiB", _mib(g("snapshot_bytes")), "MiB", ""),
        ("snapshot, all compacted: take", g("snapshot_s"), "s", ""),
        ("snapshot, all compacted: restore", g("restore_s"), "s", ""),
        ("history file", _mib(g("history_file_bytes")), "MiB", ""),
    ]
    print(f"One replica's state machine, {args.tasks:,} no-op command tasks (in process, no network, no fsync)")
    print("times are CPU time of the process (wall time on a shared machine is longer)")
    for what, value, unit, goal in rows:
        if value is None and args.skip_run:
            continue
        shown = "n/a" if value is None else f"{value:,.2f}"
        print(f"{what:<42} {shown:>14} {unit:<6} {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
