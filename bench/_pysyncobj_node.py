"""One PySyncObj node for ``bench/log.py`` (the comparison side of the log benchmark).

Started by ``bench/log.py`` as a separate process, three of them on
loopback.  The node replicates a small key-value dict (``put(key, value)``,
the same command TaskSprint's benchmark submits) and takes orders as JSON
lines on stdin, answering one JSON line per order on stdout:

* ``{"cmd": "status"}`` -> ``{"leader": "host:port" | null, "is_leader": bool,
  "ready": bool, "commit": int, "applied": int}``
* ``{"cmd": "load", "window": W, "start": t1, "end": t2, "prefix": "n0-"}``
  keeps ``W`` commands in flight (each success callback issues the next
  command) until ``t2``; counts the commands whose success callback ran in
  ``[t1, t2]`` (``time.monotonic()``, the same clock in every process of the
  machine) -> ``{"ok": n, "ok_total": m, "issued": k, "errors": {...}}``
* ``{"cmd": "latency", "warmup": n, "samples": k, "timeout": s}`` issues one
  command at a time and times each one from the call to its success
  callback -> ``{"latencies_ms": [...], "errors": {...}}``
* ``{"cmd": "quit"}`` -> ``{"bye": true}``, then the process exits.

PySyncObj issues commands from inside a node: a follower forwards them to the
leader.  Callbacks run in PySyncObj's tick thread, which is where the next
command of a load loop is issued from, so the loop needs no extra thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated


class KV(SyncObj):
    """A replicated dict with one command, ``put``."""

    def __init__(self, self_addr: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, partners, conf)
        self._data: dict = {}

    @replicated
    def put(self, key, value):
        self._data[key] = value


def _reason(err: int) -> str:
    for name in dir(FAIL_REASON):
        if not name.startswith("_") and getattr(FAIL_REASON, name) == err:
            return name
    return str(err)


class Load:
    """A closed loop of ``window`` commands in flight, run from the tick thread's callbacks."""

    def __init__(self, obj: KV, window: int, start: float, end: float, prefix: str) -> None:
        self.obj, self.window, self.start, self.end, self.prefix = obj, window, start, end, prefix
        self.ok = 0
        self.ok_total = 0
        self.issued = 0
        self.errors: dict[str, int] = {}
        self.inflight = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def issue(self) -> None:
        with self.lock:
            i = self.issued
            self.issued += 1
            self.inflight += 1
        self.obj.put(f"{self.prefix}{i}", i, callback=self.callback)

    def callback(self, _result, err) -> None:
        now = time.monotonic()
        with self.lock:
            self.inflight -= 1
            if err == FAIL_REASON.SUCCESS:
                self.ok_total += 1
                if self.start <= now <= self.end:
                    self.ok += 1
            else:
                name = _reason(err)
                self.errors[name] = self.errors.get(name, 0) + 1
            more = now < self.end
            finished = not more and self.inflight == 0
        if more:
            self.issue()
        elif finished:
            self.done.set()

    def run(self) -> dict:
        for _ in range(self.window):
            self.issue()
        # Commands still in flight at the end are not counted; do not wait for
        # them forever (a lost one would never call back).
        self.done.wait(max(0.0, self.end - time.monotonic()) + 5.0)
        with self.lock:
            return {"ok": self.ok, "ok_total": self.ok_total, "issued": self.issued, "errors": dict(self.errors)}


def latency(obj: KV, warmup: int, samples: int, timeout: float) -> dict:
    out: list[float] = []
    errors: dict[str, int] = {}
    ev = threading.Event()
    state = {}

    def cb(_result, err) -> None:
        state["t"] = time.perf_counter()
        state["err"] = err
        ev.set()

    for i in range(warmup + samples):
        ev.clear()
        t0 = time.perf_counter()
        obj.put(f"lat{i}", i, callback=cb)
        if not ev.wait(timeout):
            errors["TIMEOUT"] = errors.get("TIMEOUT", 0) + 1
            continue
        if state["err"] != FAIL_REASON.SUCCESS:
            name = _reason(state["err"])
            errors[name] = errors.get(name, 0) + 1
            continue
        if i >= warmup:
            out.append((state["t"] - t0) * 1000.0)
    return {"latencies_ms": out, "errors": errors}


def status(obj: KV) -> dict:
    st = obj.getStatus()
    leader = st.get("leader")
    return {
        "leader": str(leader) if leader is not None else None,
        "is_leader": obj._isLeader(),
        "ready": obj.isReady(),
        "commit": st.get("commit_idx"),
        "applied": st.get("last_applied"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--self", dest="self_addr", required=True)
    p.add_argument("--partners", required=True, help="comma-separated host:port of the other nodes")
    p.add_argument("--dir", required=True, help="directory for the journal and the full dump")
    p.add_argument("--journal", type=int, default=1, help="1: journalFile + fullDumpFile on disk, 0: memory only")
    p.add_argument("--batch", type=int, default=1, help="appendEntriesUseBatch")
    p.add_argument("--compaction-entries", type=int, default=5000, help="logCompactionMinEntries")
    args = p.parse_args()

    kw = dict(
        appendEntriesUseBatch=bool(args.batch),
        logCompactionMinEntries=args.compaction_entries,
        dynamicMembershipChange=False,
    )
    if args.journal:
        kw["journalFile"] = os.path.join(args.dir, "journal.bin")
        kw["fullDumpFile"] = os.path.join(args.dir, "dump.bin")
        if hasattr(SyncObjConf(), "flushJournal"):  # newer PySyncObj: flush the journal on every write
            kw["flushJournal"] = True
    obj = KV(args.self_addr, [a for a in args.partners.split(",") if a], SyncObjConf(**kw))

    def reply(obj_: dict) -> None:
        sys.stdout.write(json.dumps(obj_) + "\n")
        sys.stdout.flush()

    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            order = json.loads(line)
            match order.get("cmd"):
                case "status":
                    reply(status(obj))
                case "load":
                    load = Load(obj, int(order["window"]), float(order["start"]), float(order["end"]), order["prefix"])
                    reply(load.run())
                case "latency":
                    reply(latency(obj, int(order["warmup"]), int(order["samples"]), float(order.get("timeout", 5.0))))
                case "quit":
                    reply({"bye": True})
                    break
                case other:
                    reply({"error": f"unknown order {other!r}"})
    finally:
        obj.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
