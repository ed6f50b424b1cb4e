"""Background observers: replica status, computation progress, CLI operations.

Both run in threads of the harness, which lives in the run's ``ctl``
namespace, so their connections go over the run's own bridge.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import trio

from tasksprint import wire
from tasksprint.log_client import LogClient

PROBE_ERRORS = (OSError, RuntimeError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError, wire.BadMessage, wire.ConnectionClosed)


def probe_replicas(addrs: list[tuple[str, int]], secret: bytes, timeout: float = 1.0) -> list[dict | None]:
    """Every replica's ReplicaStatus as a dict (None where it did not answer in time)."""

    async def main() -> list[dict | None]:
        out: list[dict | None] = [None] * len(addrs)
        client = LogClient(addrs, secret)

        async def one(i: int) -> None:
            try:
                st = await client.status(addrs[i], timeout=timeout)
                out[i] = {"rid": st.rid, "role": st.role, "leader": st.leader, "ballot": st.ballot,
                          "commit": st.commit, "applied": st.applied, "digest": st.digest}
            except PROBE_ERRORS:
                pass

        async with trio.open_nursery() as n:
            for i in range(len(addrs)):
                n.start_soon(one, i)
        return out

    return trio.run(main)


def query_status(addr: tuple[str, int], secret: bytes, timeout: float = 2.0) -> dict | None:
    async def main() -> Any:
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
        self.progress: list[tuple[float, int, str]] = []  # (t, done count, state)
        self.computation: dict | None = None
        self.errors = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                statuses = probe_replicas(self.addrs, self.secret)
                leader = current_leader(statuses)
                order = ([leader] if leader is not None else []) + [
                    i for i, s in enumerate(statuses) if s is not None and i != leader]
                comp = None
                for i in order:
                    comp = query_status(self.addrs[i], self.secret)
                    if comp is not None:
                        break
                with self.lock:
                    self.latest = statuses
                    if comp is not None:
                        self.computation = comp
                        self.progress.append((time.monotonic() - self.t0, int(comp["tasks"].get("done", 0)),
                                              comp["state"]))
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
            return None if self.computation is None else self.computation["state"]

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


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
            op: dict[str, Any] = {"op": "status --json", "t": round(start - self.t0, 3)}
            try:
                self.current = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                env=self.env, text=True)
                out, err = self.current.communicate(timeout=self.timeout)
                op["rc"] = self.current.returncode
                op["ok"] = self.current.returncode == 0
                try:
                    doc = json.loads(out)
                    op["reachable"] = sum(1 for r in doc["replicas"] if r.get("reachable"))
                    comp = doc.get("computation")
                    op["state"] = None if comp is None else comp.get("state")
                except (ValueError, KeyError, TypeError):
                    op["ok"] = False
                    op["error"] = (err or out)[-300:]
            except subprocess.TimeoutExpired:
                self.current.kill()
                self.current.communicate()
                op["ok"] = False
                op["error"] = f"timed out after {self.timeout}s"
            op["latency"] = round(time.monotonic() - start, 3)
            self.ops.append(op)
            self.stop_event.wait(max(0.0, self.every - (time.monotonic() - start)))

    def stop(self) -> None:
        self.stop_event.set()
        p = self.current
        if p is not None and p.poll() is None:
            p.kill()
        self.join(self.timeout + 5)
