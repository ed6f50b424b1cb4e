"""Command tasks with files, end to end: a result file made on one client is an input on another.

Two clients offer the tags ``c0`` and ``c1``; the producer requires ``c0``
and the consumer ``c1``, so the file crosses between clients over the data
port.  The consumer's own result file reaches the scheduler through
``keys=["files"]``.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import trio
from test_cluster_e2e import (  # noqa: F401 (computation is a fixture)
    GUARD_SECONDS,
    PY_NODE,
    computation,
    finished_values,
    node_command,
    outcome,
    write_scheduler,
)

from tasksprint.run import LocalRun

pytestmark = pytest.mark.slow


async def test_a_file_made_on_one_client_is_consumed_by_a_dependent_on_another(
    computation,  # noqa: F811 (the fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = LocalRun.client_command
    monkeypatch.setattr(LocalRun, "client_command", lambda self, i: [*plain(self, i), "--have", f"c{i}"])
    spec = write_scheduler(
        tmp_path,
        "Files",
        """
        class Files(Coordinator):
            def init(self, seed):
                self.make = self.start_task(
                    cmd='mkdir made && tr a-z A-Z < in.txt > made/out.txt && echo "$TASKSPRINT_CLIENT" > made/who.txt',
                    files={"in.txt": "hello\\n"},
                    results=["made/*.txt"],
                    require=["c0"],
                    keys=["exit_code"],
                )
                self.use = self.start_task(
                    cmd='cat made/out.txt made/who.txt > seen.txt && echo "$TASKSPRINT_CLIENT" >> seen.txt',
                    pretasks=[self.make],
                    results=["seen.txt", "nothing-*"],
                    require=["c1"],
                    keys=["files"],
                )

            def task_done(self, tid, values):
                if tid == self.use:
                    self.finish(values=values["files"])
        """,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE), clients=2, slots=1)
        files = finished_values(await outcome(run), run)
    assert sorted(files) == ["seen.txt"]
    assert base64.b64decode(files["seen.txt"]) == b"HELLO\nclient0\nclient1\n"


async def test_a_failed_task_keeps_its_result_files_on_the_client_that_ran_it(
    computation,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """The failure names the files (not their bytes: the log is replicated) and the coordinator says where they are."""
    spec = write_scheduler(
        tmp_path,
        "Failing",
        """
        class Failing(Coordinator):
            def init(self, seed):
                self.start_task(
                    cmd='echo "it went wrong" > log.txt; echo partial > out.dat; exit 4',
                    results=["*.txt", "*.dat", "nothing-*"],
                )

            def task_failed(self, tid, error, record=None):
                self.finish(values={"error": error, "record": record})
        """,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE), clients=1, slots=1)
        got = finished_values(await outcome(run), run)
    record = got["record"]
    assert "exit code 4" in got["error"], got
    assert record["result_files"] == ["log.txt", "out.dat"] and record["worker"] == "client0", record
    assert "files" not in record, record
