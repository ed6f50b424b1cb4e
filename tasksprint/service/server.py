"""``tasksprint server``: the service's replicas, on this machine or one per machine.

Without ``--peers`` it runs three replica processes on this machine (the
same ports as last time, from ``server.json``, so workers and clients keep
finding it), each with its data directory and log under the state directory
and the queue scheduler (:mod:`tasksprint.service.scheduler`); fsync is on,
as for every replica.  It prints the address, writes ``server.json`` once a
replica answers, restarts a replica that dies, and on SIGTERM or SIGINT stops
them all before it exits.

With ``--peers HOST:PORT,...`` and ``--id I`` it runs replica ``I`` of a
cluster spread over machines, in this process's place (every machine needs
the same ``secret`` file in its state directory).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import trio

from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.localcluster import LocalCluster
from tasksprint.service.home import SCHEDULER, ServiceNotFound, ensure_secret, parse_addrs, read_server_file
from tasksprint.service.home import write_server_file as _write

__all__ = ["local_cluster", "serve_local", "serve_one"]


def local_cluster(state: Path, host: str = "127.0.0.1", *, extra_args: tuple[str, ...] = ()) -> LocalCluster:
    """The three local replicas of the service under ``state`` (not started), on the ports used before."""
    secret = ensure_secret(state).read_bytes().rstrip()
    cluster = LocalCluster(state, replicas=3, scheduler=SCHEDULER, secret=secret, extra_args=extra_args, host=host)
    known = read_server_file(state)
    if known is not None and known.get("mode") == "local" and len(known["replicas"]) == 3:
        before = parse_addrs(",".join(known["replicas"]), str(state / "server.json"))
        if all(h == host for h, _ in before):
            cluster.ports = [port for _, port in before]
    return cluster


async def _ready(addrs: list[tuple[str, int]], secret: bytes, timeout: float) -> bool:
    """Whether some replica answers the scheduler within ``timeout`` seconds."""
    from tasksprint.coordinator.ops import SchedulerRequest

    channel = ReplicaChannel(addrs, secret)
    try:
        with trio.move_on_after(timeout):
            while True:
                try:
                    await channel.request(SchedulerRequest(body={"q": "status", "limit": 1}), timeout=1.0)
                    return True
                except ASK_ERRORS:
                    await trio.sleep(0.1)
        return False
    finally:
        await channel.aclose()


def serve_local(
    state: Path,
    host: str = "127.0.0.1",
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    *,
    retention: float | None = None,
) -> int:
    """Run the three local replicas until SIGTERM or SIGINT; see the module docstring."""
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        cluster = local_cluster(state, host)
        with cluster:
            cluster.start()
            address = ",".join(f"{h}:{p}" for h, p in cluster.addrs)
            if not trio.run(_ready, cluster.addrs, cluster.secret, 60.0):
                print(f"tasksprint server: the replicas did not come up; see {state}/replica*.log", file=err)
                return 1
            if retention is not None:
                from tasksprint.service.api import Service

                Service(cluster.addrs, cluster.secret).configure(retention=retention)
            _write(state, [f"{h}:{p}" for h, p in cluster.addrs], mode="local")
            print(address, file=out, flush=True)
            print(f"tasksprint server: serving at {address} (state {state}); stop with Ctrl-C", file=err, flush=True)
            while not stop["signal"]:
                for i in range(cluster.replicas):
                    if not cluster.alive(i):
                        print(f"tasksprint server: replica {i} stopped; starting it again", file=err, flush=True)
                        cluster.kill(i)
                        cluster.start_replica(i)
                time.sleep(0.2)
            print("tasksprint server: stopping", file=err, flush=True)
        return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def serve_one(state: Path, peers: str, rid: int, err: TextIO = sys.stderr) -> int:
    """Run replica ``rid`` of ``peers`` here, in this process's place; returns its exit code."""
    import os

    addrs = parse_addrs(peers, "--peers")
    if not 0 <= rid < len(addrs):
        raise ServiceNotFound(f"--id {rid} is not an index into --peers (0 to {len(addrs) - 1})")
    secret_file = ensure_secret(state)
    data = state / f"replica{rid}"
    data.mkdir(parents=True, exist_ok=True)
    _write(state, [f"{h}:{p}" for h, p in addrs], mode="peers", id=rid)
    argv = [
        sys.executable,
        "-m",
        "tasksprint.cli",
        "replica",
        "--id",
        str(rid),
        "--peers",
        peers,
        "--data",
        str(data),
        "--secret-file",
        str(secret_file),
        "--scheduler",
        SCHEDULER,
    ]
    print(f"tasksprint server: replica {rid} of {peers} (state {state})", file=err, flush=True)
    os.execv(sys.executable, argv)
    return 0  # not reached
