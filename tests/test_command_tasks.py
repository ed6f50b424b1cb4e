"""Command tasks end to end: real replicas and clients, commands run by the clients' runner.

* a command task and a node task in one computation; the command sees its
  ``TASKSPRINT_*`` environment and its record reaches ``task_done`` and
  ``tasksprint info``;
* a memory hog and a sleep past its time limit fail with the verdicts
  ``memory`` and ``time``, reaching ``task_failed`` with their records;
* cancelling a running command kills its process tree, a ``setsid``
  grandchild included, and so does killing its client (its guardian does).

Clusters are started as in ``test_cluster_e2e.py`` (whose helpers and
fixtures these tests use); waits poll a condition under a generous bound.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
from test_cluster_e2e import (  # noqa: F401 (computation is a fixture)
    GUARD_SECONDS,
    PY_NODE,
    cli_json,
    computation,
    finished_values,
    node_command,
    outcome,
    pid_alive,
    query,
    wait_until,
    write_scheduler,
)

from tasksprint.exec import proctree
from tasksprint.exec.cgroup import detect_cgroups

pytestmark = pytest.mark.slow


async def test_a_command_task_and_a_node_task_in_one_computation(computation, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    spec = write_scheduler(
        tmp_path,
        "Mixed",
        """
        class Mixed(Coordinator):
            def init(self, seed):
                self.values = {}
                self.command = self.start_task(
                    cmd='echo "id=$TASKSPRINT_TASK_ID attempt=$TASKSPRINT_ATTEMPT cpus=$TASKSPRINT_CPUS $GREETING"',
                    env={"GREETING": "hello"},
                    limits={"cpus": 1, "memory_bytes": 256 * 1024 * 1024},
                )
                self.node = self.start_task("value", args=[7], keys=["v"])
                self.argv = self.start_task(argv=["true"], keys=["exit_code", "verdict"])

            def task_done(self, tid, values):
                self.values[str(tid)] = values
                if len(self.values) == 3:
                    self.finish(values={"ids": [self.command, self.node, self.argv], "values": self.values})
        """,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))
        st = await outcome(run)
        got = finished_values(st, run)
        command, node, argv = got["ids"]
        record = got["values"][str(command)]
        assert record["verdict"] == "ok" and record["exit_code"] == 0, record
        assert record["stdout"]["head"] == f"id={command} attempt=1 cpus=1 hello\n", record
        assert record["elapsed_s"] >= 0 and record["pid"] > 0 and record["enforcement"], record
        assert got["values"][str(node)] == {"v": 7}
        assert got["values"][str(argv)] == {"exit_code": 0, "verdict": "ok"}
        shown = await cli_json(run, "info", str(command))
        assert shown["name"] == "tasksprint:command" and shown["state"] == "done", shown
        assert shown["kwargs"]["command"]["cmd"].startswith("echo "), shown
        assert shown["values"]["verdict"] == "ok", shown


async def test_limit_verdicts_reach_task_failed_with_the_record(computation, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    spec = write_scheduler(
        tmp_path,
        "Limited",
        """
        class Limited(Coordinator):
            def init(self, seed):
                self.failed = {}
                self.hog = self.start_task(
                    argv=[PYTHON, "-c", "b = bytearray(512 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"],
                    limits={"memory_bytes": 64 * 1024 * 1024},
                    retries=0,
                )
                self.sleeper = self.start_task(cmd="sleep 60", limits={"wall_time_s": 0.5}, retries=1)

            def task_failed(self, tid, error, record=None):
                self.failed[str(tid)] = {"error": error, "verdict": record["verdict"], "hit": record["limits_hit"]}
                if len(self.failed) == 2:
                    self.finish(values={"hog": self.hog, "sleeper": self.sleeper, "failed": self.failed})
        """,
        PYTHON=sys.executable,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))
        got = finished_values(await outcome(run), run)
        hog, sleeper = got["failed"][str(got["hog"])], got["failed"][str(got["sleeper"])]
        assert hog["verdict"] == "memory" and "memory" in hog["hit"], hog
        assert "verdict memory" in hog["error"], hog
        assert sleeper["verdict"] == "time" and "verdict time" in sleeper["error"], sleeper
        shown = await cli_json(run, "info", str(got["sleeper"]))
        assert shown["state"] == "failed" and shown["failures"] == 2 and "verdict time" in shown["error"], shown


async def test_cancel_kills_a_running_command_and_its_setsid_grandchild(computation, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    pids = tmp_path / "pids"
    spec = write_scheduler(
        tmp_path,
        "Cancelled",
        """
        class Cancelled(Coordinator):
            def init(self, seed):
                self.start_task(cmd=f"setsid sleep 300 & echo $$ $! > {PIDS}.tmp; mv {PIDS}.tmp {PIDS}; sleep 300")
        """,
        PIDS=str(pids),
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))

        async def started() -> list[int] | None:
            return [int(p) for p in pids.read_text().split()] if pids.exists() else None

        shell, grandchild = await wait_until(started, "the command to start")
        assert pid_alive(shell) and pid_alive(grandchild)
        cancelled = await cli_json(run, "cancel", "1")
        assert cancelled["ok"] is True and cancelled["killed"] == [1], cancelled

        async def all_dead() -> bool:
            return not pid_alive(shell) and not pid_alive(grandchild)

        await wait_until(all_dead, "the cancelled command's processes to be killed")
        info = await query(run, "info", {"tid": 1})
        assert info is not None and info.state == "killed", info


async def test_a_killed_client_leaves_no_command_running(computation, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """SIGKILL of a client: its guardian kills the command's whole tree, a ``setsid`` grandchild included."""
    if os.geteuid() != 0 or detect_cgroups() is None:
        pytest.skip("a guardian needs cgroups (root with a writable hierarchy)")
    pids = tmp_path / "pids"
    spec = write_scheduler(
        tmp_path,
        "Doomed",
        """
        class Doomed(Coordinator):
            def init(self, seed):
                self.start_task(cmd=f"setsid sleep 300 & echo $$ $! > {PIDS}.tmp; mv {PIDS}.tmp {PIDS}; sleep 300")
        """,
        PIDS=str(pids),
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE), clients=1)

        async def started() -> list[int] | None:
            return [int(p) for p in pids.read_text().split()] if pids.exists() else None

        shell, grandchild = await wait_until(started, "the command to start")
        client = run.client_procs[0]
        orphans = {pid: st[1] for pid in (shell, grandchild) if (st := proctree.proc_stat(pid)) is not None}
        guardians = [pid for pid in _children_of(client.pid) if b"tasksprint.exec.guardian" in _cmdline(pid)]
        assert len(guardians) == 1 and len(orphans) == 2
        orphans.update({pid: st[1] for pid in guardians if (st := proctree.proc_stat(pid)) is not None})
        client.kill()

        async def all_gone() -> bool:
            # This process may be a subreaper (after rlimit runs): then the orphans come here.
            proctree.reap_adopted(orphans)
            return not any(pid_alive(pid) or _child_zombie(pid) for pid in orphans)

        try:
            # The dead client is reaped only then: while it is a zombie its pid exists,
            # so no other client's sweep takes its groups for stale ones; the guardian acts alone.
            await wait_until(all_gone, "the dead client's command processes and guardian to end")
        finally:
            client.wait()


def _children_of(ppid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := proctree.proc_stat(int(name))) is not None and st[0] == ppid:
            found.append(int(name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _child_zombie(pid: int) -> bool:
    st = proctree.proc_stat(pid)
    return st is not None and st[0] == os.getpid() and st[2] == "Z"


async def test_an_in_process_client_without_a_node_reports_its_spans(tmp_path: Path) -> None:
    import time

    from tasksprint.client import Client, ClientConfig
    from tasksprint.localcluster import LocalCluster
    from tasksprint.observe import Recorder

    spec = write_scheduler(
        tmp_path,
        "Two",
        """
        class Two(Coordinator):
            def init(self, seed):
                self.first = self.start_task(cmd="true")
                self.start_task(cmd="true", pretasks=[self.first], prekeys=["verdict"])

            def task_done(self, tid, values):
                if tid != self.first:
                    self.finish(values={"verdict": values["verdict"]})
        """,
    )
    cluster = LocalCluster(tmp_path / "cluster", 3, scheduler=spec)
    cluster.start()
    try:
        recorder = Recorder(time.perf_counter)
        config = ClientConfig(coordinators=tuple(cluster.addrs), node_command=None, secret=cluster.secret, slots=1)
        client = Client(config, observer=recorder)
        with trio.fail_after(GUARD_SECONDS):
            assert await client.run() == "finished"
    finally:
        cluster.stop()
    spans = recorder.read().spans
    for name in ("client.join", "client.view_poll", "client.gather_inputs", "store.put", "client.report"):
        assert spans[name].count >= 1, (name, sorted(spans))
    # The second task came in a view after the first completed.
    assert spans["client.assignment_gap"].count >= 1, sorted(spans)
    assert recorder.read().values["client.tasks_per_view"].count >= 1
