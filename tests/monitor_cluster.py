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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
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

    def add(self, *xs_and_gate):
        *xs, gate = xs_and_gate
        while not os.path.exists(gate):
            time.sleep(0.02)
        return {"v": sum(xs)}


GatedNode().start()
"""

SCHEDULER = """
from tasksprint import Coordinator

class Gated(Coordinator):
    def init(self, seed):
        gated = [self.start_task("gated", args=[i, GATE], keys=["v"]) for i in range(TASKS)]
        self.left = set(gated)
        self.total = 0
        if REDUCE:  # one more task, reading every gated task's output
            prekeys = ["v"] * len(gated)
            reduce = self.start_task("add", args=[GATE + ".reduce"], pretasks=gated, prekeys=prekeys, keys=["v"])
            self.left.add(reduce)
        if COMMAND:  # a command task: its run record (times, exit code, limits, output) is its values
            cmd = f"while [ ! -e {GATE} ]; do sleep 0.05; done; echo tail-marker; echo to-stderr >&2"
            self.left.add(self.start_task(cmd=cmd, limits={"wall_time_s": 60, "memory_bytes": 1 << 30}))

    def task_done(self, tid, values):
        self.left.discard(tid)
        self.total += values.get("v", 0)
        if not self.left:
            self.finish(values={"total": self.total})
"""


def gate_path(base: Path) -> Path:
    return base / "gate"


def open_gate(run: LocalRun) -> None:
    """Let every gated task of ``run`` finish (not the reduce: :func:`open_reduce_gate`)."""
    gate_path(run.base()).touch()


def open_reduce_gate(run: LocalRun) -> None:
    """Let the reduce task of ``run`` (``gated_run(reduce=True)``) finish."""
    Path(str(gate_path(run.base())) + ".reduce").touch()


@attrs.define(eq=False)
class _Cluster(LocalCluster):
    """A local cluster whose replica ``i`` gets the extra arguments ``per_replica(i)``."""

    per_replica: Callable[[int], list[str]] | None = None

    def command(self, i: int) -> list[str]:
        return super().command(i) + (self.per_replica(i) if self.per_replica else [])


@attrs.define(eq=False)
class _Run(LocalRun):
    """A local run whose client ``i`` gets the extra arguments ``per_client(i)``."""

    per_client: Callable[[int], list[str]] | None = None

    def client_command(self, i: int) -> list[str]:
        return super().client_command(i) + (self.per_client(i) if self.per_client else [])


@contextlib.contextmanager
def gated_run(
    base: Path,
    tasks: int,
    *,
    clients: int = 1,
    slots: int = 2,
    reduce: bool = False,
    command: bool = False,
    replica_args: Callable[[int], list[str]] | None = None,
    client_args: Callable[[int], list[str]] | None = None,
) -> Iterator[LocalRun]:
    """A started computation of ``tasks`` gated tasks under ``base``; stopped when the block ends.

    ``reduce`` adds one task reading every gated task's output (a DAG, and
    fetches between clients), which waits for its own gate
    (:func:`open_reduce_gate`); ``command`` adds one command task (gated
    too), whose run record the task's values carry; ``replica_args(i)`` and ``client_args(i)`` are
    extra command-line arguments of replica ``i`` and client ``i``.
    """
    base.mkdir(parents=True, exist_ok=True)
    node = base / "gated_node.py"
    node.write_text(textwrap.dedent(NODE))
    sched = base / "gated_scheduler.py"
    sched.write_text(
        f"GATE = {str(gate_path(base))!r}\nTASKS = {tasks}\nREDUCE = {reduce}\nCOMMAND = {command}\n"
        + textwrap.dedent(SCHEDULER)
    )
    run = _Run(
        f"{sched}:Gated",
        f"{shlex.quote(sys.executable)} {shlex.quote(str(node))}",
        3,
        clients,
        slots,
        base,
        per_client=client_args,
    )
    run.progress = None
    run.cluster = _Cluster(base, 3, scheduler=run.scheduler, per_replica=replica_args)
    try:
        run.cluster.start()
        trio.run(wait_initialised, run.cluster)
        for i in range(clients):
            run.start_client(i)
        yield run
    finally:
        open_gate(run)  # lets clients of a finished computation exit by themselves
        open_reduce_gate(run)
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
