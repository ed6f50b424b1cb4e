"""Background observers: replica status, computation progress, CLI operations.

Both run in threads of the harness, which lives in the run's ``ctl``
namespace, so their connections go over the run's own bridge.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from typing import Any

import trio

from tasksprint.channel import ASK_ERRORS
from tasksprint.coordinator.replies import ComputationStatus
from tasksprint.log_client import LogClient

# A replica that cannot be reached, or refuses the question, is left out of a probe.
PROBE_ERRORS = ASK_ERRORS


def probe_replicas(addrs: list[tuple[str, int]], secret: bytes, timeout: float = 1.0) -> list[dict | None]:
    """Every replica's ReplicaStatus as a dict (None where it did not answer in time)."""

    async def main() -> list[dict | None]:
        out: list[dict | None] = [None] * len(addrs)
        client = LogClient(addrs, secret)

        async def one(i: int) -> None:
            try:
                st = await client.status(addrs[i], timeout=timeout)
                out[i] = {
                    "rid": st.rid,
                    "role": st.role,
                    "leader": st.leader,
                    "ballot": st.ballot,
                    "commit": st.commit,
                    "applied": st.applied,
                    "digest": st.digest,
                }
            except PROBE_ERRORS:
                pass

        async with trio.open_nursery() as n:
            for i in range(len(addrs)):
                n.start_soon(one, i)
        return out

    return trio.run(main)


def query_status(addr: tuple[str, int], secret: bytes, timeout: float = 2.0) -> ComputationStatus | None:
    """The computation's status as replica ``addr`` sees it (None if it did not answer in time)."""

    async def main() -> ComputationStatus | None:
        try:
            return await LogClient([addr], secret).query("status", addr=addr, timeout=timeout)
        except PROBE_ERRORS:
            return None

    return trio.run(main)


def current_leader(statuses: list[dict | None]) -> int | None:
    """The replica that says it leads (the highest ballot if several do)."""
    leaders = [s for s in statuses if s is not None and s["role"] == "leader"]
    if not leaders:
        return None
    return max(leaders, key=lambda s: s["ballot"])["rid"]


class Monitor(threading.Thread):
    """Polls every replica and the computation's status every ``interval`` s."""

    def __init__(self, addrs, secret, t0: float, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="monitor")
        self.addrs, self.secret, self.t0, self.interval = addrs, secret, t0, interval
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.latest: list[dict | None] = [None] * len(addrs)
        # (t, done count, state, replica that answered, completions, recomputed): the last two only grow
        # (completions = tasks done once + completions redone from lineage).
        self.progress: list[tuple[float, int, str, int, int, int]] = []
        self.computation: ComputationStatus | None = None
        self.errors = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                statuses = probe_replicas(self.addrs, self.secret)
                leader = current_leader(statuses)
                order = ([leader] if leader is not None else []) + [
                    i for i, s in enumerate(statuses) if s is not None and i != leader
                ]
                comp = None
                answered = -1
                for i in order:
                    comp = query_status(self.addrs[i], self.secret)
                    if comp is not None:
                        answered = i
                        break
                with self.lock:
                    self.latest = statuses
                    if comp is not None:
                        self.computation = comp
                        self.progress.append(
                            (
                                time.monotonic() - self.t0,
                                comp.tasks.get("done", 0),
                                comp.state,
                                answered,
                                comp.tasks.get("completed", 0) + comp.tasks.get("recomputed", 0),
                                comp.tasks.get("recomputed", 0),
                            )
                        )
            except Exception:
                self.errors += 1
            self.stop_event.wait(self.interval)

    def leader(self) -> int | None:
        with self.lock:
            return current_leader(self.latest)

    def wait_leader(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            time.sleep(0.05)
        return None

    def state(self) -> str | None:
        with self.lock:
            return None if self.computation is None else self.computation.state

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def _run_cli(ops: Any, op: str, argv: list[str]) -> tuple[dict[str, Any], str, str]:
    """Run one CLI command for ``ops`` (CliOps or CancelOps: ``t0``, ``env``, ``timeout``, ``current``).

    Returns its record (``op``, ``t``, ``latency``, and ``rc`` -- or ``ok``
    False and the error if it timed out and was killed), stdout and stderr.
    """
    start = time.monotonic()
    rec: dict[str, Any] = {"op": op, "t": round(start - ops.t0, 3)}
    out = err = ""
    try:
        ops.current = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ops.env, text=True)
        out, err = ops.current.communicate(timeout=ops.timeout)
        rec["rc"] = ops.current.returncode
    except subprocess.TimeoutExpired:
        ops.current.kill()
        ops.current.communicate()
        rec["ok"] = False
        rec["error"] = f"timed out after {ops.timeout}s"
    rec["latency"] = round(time.monotonic() - start, 3)
    return rec, out, err


def _note_interrupted(ops: Any, rec: dict[str, Any]) -> None:
    if ops.stop_event.is_set() and not rec["ok"]:
        rec["interrupted"] = True  # killed by stop(): the scenario ended, not a failure


class CliOps(threading.Thread):
    """Runs ``tasksprint status --json`` once a second; records each outcome and latency."""

    def __init__(self, command: list[str], env: dict, t0: float, every: float = 1.0, timeout: float = 15.0) -> None:
        super().__init__(daemon=True, name="cli-ops")
        self.command, self.env, self.t0, self.every, self.timeout = command, env, t0, every, timeout
        self.stop_event = threading.Event()
        self.ops: list[dict] = []
        self.current: subprocess.Popen | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            start = time.monotonic()
            op, out, err = _run_cli(self, "status --json", self.command)
            if "rc" in op:
                op["ok"] = op["rc"] == 0
                try:
                    doc = json.loads(out)
                    op["reachable"] = sum(1 for r in doc["replicas"] if r.get("reachable"))
                    comp = doc.get("computation")
                    op["state"] = None if comp is None else comp.get("state")
                except (ValueError, KeyError, TypeError):
                    op["ok"] = False
                    op["error"] = (err or out)[-300:]
            _note_interrupted(self, op)
            self.ops.append(op)
            self.stop_event.wait(max(0.0, self.every - (time.monotonic() - start)))

    def stop(self) -> None:
        self.stop_event.set()
        p = self.current
        if p is not None and p.poll() is None:
            p.kill()
        self.join(self.timeout + 5)


class CancelOps(threading.Thread):
    """Cancels running decoy tasks from the command line, as an operator would.

    Every 0.5-1.5 s (seeded) it looks at the task count the monitor last saw;
    when a new decoy has been started (``newest_decoy(count)``), it cancels it
    with probability ``chance``: ``tasksprint cancel TID --json``, then
    ``tasksprint info TID --json`` to record the state it reads back.  Each
    decoy is cancelled at most once.  A cancel is *acknowledged* when it exits
    0 with ``{"ok": true, "killed": [...]}``; one that failed or timed out may
    still take effect (it is in :attr:`attempted` either way).
    """

    def __init__(
        self,
        cli,
        env: dict,
        t0: float,
        monitor: Monitor,
        newest_decoy,
        seed: int,
        chance: float = 0.7,
        timeout: float = 20.0,
    ) -> None:
        super().__init__(daemon=True, name="cancel-ops")
        self.cli, self.env, self.t0, self.monitor = cli, env, t0, monitor
        self.newest_decoy = newest_decoy
        self.rng = random.Random(seed)
        self.chance, self.timeout = chance, timeout
        self.stop_event = threading.Event()
        self.ops: list[dict] = []
        self.attempted: set[int] = set()
        self.considered: set[int] = set()
        self.current: subprocess.Popen | None = None

    def _run(self, op: str, args: list[str]) -> tuple[dict[str, Any], Any]:
        rec, out, err = _run_cli(self, op, self.cli(*args))
        doc = None
        if "rc" in rec:
            try:
                doc = json.loads(out)
            except ValueError:
                rec["error"] = (err or out)[-300:]
            rec["ok"] = rec["rc"] == 0 and isinstance(doc, dict)
        _note_interrupted(self, rec)
        return rec, doc

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(0.5, 1.5)):
            comp = self.monitor.computation
            if comp is None or comp.state != "running":
                continue
            tid = self.newest_decoy(comp.tasks.get("total", 0))
            if tid is None or tid in self.considered:
                continue
            self.considered.add(tid)
            if self.rng.random() >= self.chance:
                continue
            self.attempted.add(tid)
            rec, result = self._run(f"cancel {tid} --json", ["cancel", str(tid), "--json"])
            rec["tid"] = tid
            if isinstance(result, dict):
                rec["ok"] = rec["ok"] and bool(result.get("ok"))
                rec["killed"] = result.get("killed")
                if result.get("reason") or result.get("error"):
                    rec["reason"] = result.get("reason") or result.get("error")
            self.ops.append(rec)
            if self.stop_event.is_set():
                return
            rec, info = self._run(f"info {tid} --json", ["info", str(tid), "--json"])
            if isinstance(info, dict):
                rec["name"], rec["state"] = info.get("name"), info.get("state")
            self.ops.append(rec)

    def stop(self) -> None:
        self.stop_event.set()
        p = self.current
        if p is not None and p.poll() is None:
            p.kill()
        self.join(self.timeout + 5)
