"""``tasksprint top`` in a pseudo-terminal over a live cluster, and its pure rendering."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
from rich.console import Console

from tasksprint.coordinator.replies import ClientCounts, ComputationStatus
from tasksprint.readmodel import History, ReplicaRow, Snapshot
from tasksprint.run import progress_bar
from tasksprint.top import render
from tests.monitor_cluster import WAIT_SECONDS, gated_run, open_gate

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_render_shows_replicas_tasks_and_workers() -> None:
    snap = Snapshot(
        at=1.0,
        replicas=(
            ReplicaRow(address="h:1", up=True, rid=0, role="leader", leader=0, commit=5, applied=5),
            ReplicaRow(address="h:2", up=False),
        ),
        leader=0,
        state="running",
        tasks={"pending": 1, "running": 1, "done": 2, "failed": 0, "killed": 0, "total": 4},
    )
    history = History()
    history.add(snap)
    console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(snap, history))
    screen = console.export_text()
    assert "leader: replica 0" in screen
    assert re.search(r"h:2\s+│\s+down", screen)
    assert "tasks: 2/4 done" in screen


@pytest.mark.slow
def test_top_in_a_terminal_follows_a_computation(tmp_path: Path) -> None:
    with gated_run(tmp_path / "run", 4) as run:
        cluster = run.cluster
        assert cluster is not None
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasksprint.cli",
                "top",
                "--coordinators",
                cluster.peers_arg,
                "--secret-file",
                str(cluster.secret_file),
                "--interval",
                "0.3",
            ],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "50"},
            start_new_session=True,
        )
        os.close(slave)
        screen = ""

        def read_until(pattern: str) -> str:
            nonlocal screen
            deadline = time.monotonic() + WAIT_SECONDS
            while not re.search(pattern, ANSI.sub("", screen)):
                assert time.monotonic() < deadline, f"gave up waiting for {pattern!r}; screen:\n{ANSI.sub('', screen)}"
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    screen += os.read(master, 65536).decode(errors="replace")
            return ANSI.sub("", screen)

        try:
            text = read_until(r"tasks: 0/4 done")
            assert re.search(r"computation: running", text)
            assert re.search(r"leader: replica \d", text)
            open_gate(run)
            text = read_until(r"tasks: 4/4 done")
            assert "computation: finished" in read_until("computation: finished")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(WAIT_SECONDS) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_run_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    assert progress_bar(io.StringIO()) is None
    assert progress_bar(None) is None
    out = FakeTerminal()
    bar = progress_bar(out)
    assert bar is not None
    status = ComputationStatus(
        state="running",
        finished=False,
        result=None,
        failure=None,
        tasks={"done": 3, "running": 2, "failed": 0, "total": 8},
        clients=ClientCounts(live=1, dead=0),
        live_clients=(),
        now=1.0,
        seed=1,
        version=1,
        last_hook=None,
    )
    bar.update(status, 1)
    bar.update(attrs.evolve(status, tasks={**status.tasks, "done": 5}), 1)
    bar.close()
    screen = ANSI.sub("", out.getvalue())
    assert "5/8" in screen and "ETA" in screen and "leader: replica 1" in screen
