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
import trio
from rich.console import Console

from tasksprint.coordinator.replies import ClientCounts, ComputationStatus
from tasksprint.readmodel import ClientRow, History, ReplicaRow, Snapshot
from tasksprint.run import progress_bar
from tasksprint.top import render, watch
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


class ScriptedSource:
    """A :class:`~tasksprint.top.Source` giving prepared snapshots, the last one for ever."""

    def __init__(self, snaps: list[Snapshot]) -> None:
        self.snaps = snaps
        self.polls = 0
        self.closed = False

    async def poll(self) -> Snapshot:
        snap = self.snaps[min(self.polls, len(self.snaps) - 1)]
        self.polls += 1
        return snap

    async def aclose(self) -> None:
        self.closed = True


def test_watch_redraws_any_source_until_told_to_stop() -> None:
    replica = ReplicaRow(address="h:1", up=True, rid=0, role="leader", leader=0, fsync_p50_ms=1.25, fsync_p99_ms=3.5)
    worker = ClientRow(
        cid=1,
        name="w1",
        addr="h:9",
        slots=2,
        running=1,
        prefetching=0,
        tags=("gpu",),
        heard_s=0.4,
        cpu_percent=87.0,
        rss_bytes=3 << 20,
    )

    def snap(done: int) -> Snapshot:
        tasks = {"pending": 3 - done, "running": 0, "done": done, "failed": 0, "killed": 0, "total": 3}
        return Snapshot(at=float(done), replicas=(replica,), leader=0, state="running", tasks=tasks, clients=(worker,))

    source = ScriptedSource([snap(0), snap(1), snap(2), snap(3), snap(3)])
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, record=True)
    code = trio.run(lambda: watch(source, interval=0, console=console, until=lambda s: s.tasks["done"] == 3))
    assert code == 0 and source.closed
    assert source.polls == 4  # stopped at the first snapshot saying done, not before, not after
    screen = console.export_text()
    assert "tasks: 3/3 done" in screen
    assert "1.25/3.50" in screen  # fsync p50/p99 of the replica
    assert re.search(r"w1\s+│.*│\s+gpu\s+│.*│\s+87\s+│\s+3\s+│\s+0\.4", screen)  # tags, cpu %, rss MiB, heard


@pytest.mark.slow
def test_top_in_a_terminal_follows_a_computation(tmp_path: Path) -> None:
    with gated_run(tmp_path / "run", 4) as run:
        cluster = run.cluster
        assert cluster is not None
        master, slave = pty.openpty()
        # Ctrl-C must reach top even if this test runs with SIGINT ignored
        # (as a shell's background jobs do, and their children inherit):
        # a process that starts with it ignored keeps ignoring it.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
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
        finally:
            signal.signal(signal.SIGINT, previous)
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
            # Keep reading, as a terminal does: a pty nobody reads fills up,
            # and top, redrawing, then blocks in write() and never sees Ctrl-C.
            deadline = time.monotonic() + WAIT_SECONDS
            while proc.poll() is None:
                assert time.monotonic() < deadline, "top did not exit on SIGINT"
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        os.read(master, 65536)
                    except OSError:  # the other side closed: top is gone
                        break
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
