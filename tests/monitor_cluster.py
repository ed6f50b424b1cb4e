"""A local cluster running a computation whose tasks wait for a gate: for the monitor tests.

The dashboard, ``/metrics`` and ``tasksprint top`` tests need a computation
that stays in progress until the test says so.  :func:`gated_run` starts
three replicas and worker clients whose ``gated`` tasks wait until the file
``gate`` exists (:func:`open_gate`); everything is stopped and reaped when
its block ends, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.coordinator.ops import StatusRequest
from tasksprint.coordinator.replies import ComputationStatus
from tasksprint.localcluster import LocalCluster
from tasksprint.run import LocalRun

# Bounds that only turn a hang into a failure; no test asserts how long anything took.
WAIT_SECONDS = 90.0
POLL_SECONDS = 0.1

NODE = """
import os, time
from tasksprint import Node

class GatedNode(Node):
    def gated(self, x, gate):
        while not os.path.exists(gate):
            time.sleep(0.02)
        return {"v": x}


GatedNode().start()
"""

SCHEDULER = """
from tasksprint import Coordinator

class Gated(Coordinator):
    def init(self, seed):
        self.left = set(self.start_task("gated", args=[i, GATE], keys=["v"]) for i in range(TASKS))
        self.total = 0

    def task_done(self, tid, values):
        self.left.discard(tid)
        self.total += values["v"]
        if not self.left:
            self.finish(values={"total": self.total})
"""


def gate_path(base: Path) -> Path:
    return base / "gate"


def open_gate(run: LocalRun) -> None:
    """Let every gated task of ``run`` finish."""
    gate_path(run.base()).touch()


@contextlib.contextmanager
def gated_run(base: Path, tasks: int, *, clients: int = 1, slots: int = 2) -> Iterator[LocalRun]:
    """A started computation of ``tasks`` gated tasks under ``base``; stopped when the block ends."""
    base.mkdir(parents=True, exist_ok=True)
    node = base / "gated_node.py"
    node.write_text(textwrap.dedent(NODE))
    sched = base / "gated_scheduler.py"
    sched.write_text(f"GATE = {str(gate_path(base))!r}\nTASKS = {tasks}\n" + textwrap.dedent(SCHEDULER))
    run = LocalRun(f"{sched}:Gated", f"{shlex.quote(sys.executable)} {shlex.quote(str(node))}", 3, clients, slots, base)
    run.progress = None
    run.cluster = LocalCluster(base, 3, scheduler=run.scheduler)
    try:
        run.cluster.start()
        trio.run(wait_initialised, run.cluster)
        for i in range(clients):
            run.start_client(i)
        yield run
    finally:
        open_gate(run)  # lets clients of a finished computation exit by themselves
        run.stop(grace=10.0)


async def wait_initialised(cluster: LocalCluster) -> None:
    """Wait until the computation's init entry is applied (clients may join then)."""
    status = await wait_status(cluster, lambda st: st.state != "waiting")
    assert status.state == "running", status


async def wait_status(cluster: LocalCluster, check: Any) -> ComputationStatus:
    """Poll the computation's status until ``check(status)`` holds; return that status."""
    channel = ReplicaChannel(cluster.addrs, cluster.secret)
    try:
        with trio.fail_after(WAIT_SECONDS):
            while True:
                try:
                    status = await channel.request(StatusRequest())
                except ASK_ERRORS:
                    await trio.sleep(POLL_SECONDS)
                    continue
                if check(status):
                    return status
                await trio.sleep(POLL_SECONDS)
    finally:
        await channel.aclose()


def http_get(url: str, *, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """``(status, body)`` of a GET (blocking: call through ``trio.to_thread.run_sync``)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(url: str, **kwargs: Any) -> tuple[int, str]:
    return await trio.to_thread.run_sync(lambda: http_get(url, **kwargs))


async def get_json(url: str) -> Any:
    code, body = await get(url)
    assert code == 200, (code, body)
    return json.loads(body)


def wait_for(check: Any, what: str) -> Any:
    """Call ``check()`` until it returns something true; return that (blocking)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(POLL_SECONDS)
