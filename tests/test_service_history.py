"""Compacted tasks in the replicas' durable history, end to end: real replicas, a real worker.

A finished task compacted out of the replicated state is still answered by
``info``, from each replica's ``history.db``; after the whole service
restarts from snapshots that no longer hold it; and from another replica
when the one asked lacks it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from tasksprint.history import HISTORY_DB
from tasksprint.service.api import AsyncService
from tasksprint.service.server import local_cluster

DEADLINE = 60.0


async def until(check: Any, what: str) -> Any:
    with trio.fail_after(DEADLINE):
        while True:
            try:
                value = await check()
            except Exception:
                value = None
            if value:
                return value
            await trio.sleep(0.1)
    raise AssertionError(what)  # pragma: no cover


def test_info_reads_compacted_tasks_from_the_history_across_restarts(tmp_path: Path) -> None:
    # Snapshots every few slots, so the restarted replicas start from snapshots taken after compaction.
    cluster = local_cluster(tmp_path / "state", extra_args=("--snapshot-every", "4"))
    worker: subprocess.Popen[bytes] | None = None

    async def main() -> None:
        nonlocal worker
        async with AsyncService(cluster.addrs, cluster.secret) as svc:
            await until(lambda: svc.status(limit=1), "the service answers")
            await svc.configure(retention=0)
            (first,) = await svc.submit_specs([{"cmd": "echo archived-output", "job": "h"}])
            worker = subprocess.Popen(
                [sys.executable, "-m", "tasksprint.cli", "worker", "--name", "w", "--gpus", "", "--slots", "1"]
                + ["--server", ",".join(f"{h}:{p}" for h, p in cluster.addrs)]
                + ["--secret-file", str(cluster.secret_file), "--log-level", "warning"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "TASKSPRINT_STATE": str(tmp_path / "state")},
                start_new_session=True,
            )
            assert (await svc.wait([first], timeout=DEADLINE))[first] == "done"
            live = await svc.info(first)
            # More log entries: the next compacts the task, the others get snapshots taken after that.
            for _ in range(12):
                await svc.configure(retention=0)
            archived = await svc.info(first)
            assert archived == {**live, "history": "archived"}
            assert archived["stdout"]["head"] == "archived-output\n" and archived["exit_code"] == 0
            assert (await svc.status(limit=1))["counts"]["compacted"] == 1
        for i in range(cluster.replicas):
            assert (cluster.data_dir(i) / HISTORY_DB).is_file()
        assert worker is not None
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

        # The whole service restarts: every replica loads a snapshot without the task.
        cluster.stop()
        cluster.start()
        async with AsyncService(cluster.addrs, cluster.secret) as svc:
            again = await until(lambda: svc.info(first), "info after the restart")
            assert again == archived
            assert (await svc.states([first])) == {first: "done"}

        # A replica that lost its history file starts from its snapshot and lacks the record
        # (as one that caught up from another's snapshot would): asked first, the others answer.
        cluster.kill(2)
        for suffix in ("", "-wal", "-shm"):
            (cluster.data_dir(2) / (HISTORY_DB + suffix)).unlink(missing_ok=True)
        cluster.start_replica(2)
        async with AsyncService([cluster.addrs[2]], cluster.secret) as alone:
            missing = await until(lambda: alone.info(first), "the wiped replica answers")
            assert missing == {"id": first, "state": "done", "history": "missing"}
        order = [cluster.addrs[2], cluster.addrs[0], cluster.addrs[1]]
        async with AsyncService(order, cluster.secret) as svc:
            svc._leader_known = True  # ask the wiped replica first
            assert await svc.info(first) == archived

    try:
        cluster.start()
        trio.run(main)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        cluster.stop()
