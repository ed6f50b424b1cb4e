"""Lines submitted to a running batch (Python API and shell), and #DISBATCH AFTER, end to end.

Each test runs real replicas (three, fsync on) and clients in its own directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasksprint.batch.statusfile import RecordKind, parse_status_file

# Bounds every command (the runs themselves take seconds); not a measurement.
RUN_TIMEOUT = 180.0


def batch(cwd: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tasksprint.cli", "batch", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )


def test_the_python_api_submits_lines_as_the_batch_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasksprint.batch_api import Batch, BatchCommandError

    monkeypatch.chdir(tmp_path)
    with Batch("echo first\n", prefix="sub", options=["-s", "localhost:2"], open=True) as b:
        assert b.sync_tasks([0], timeout=RUN_TIMEOUT)[0].out_snippet == "first\n"
        assert b.submit("exit 3", "echo two") == [1, 2]
        assert b.submit("#DISBATCH REPEAT 2 echo r$DISBATCH_REPEAT_INDEX") == [3, 4]
        # Line 2 of the stream is 'exit 3': its dependent does not run; line 3's does.
        assert b.submit("#DISBATCH AFTER 2", "echo never", "#DISBATCH AFTER 3", "echo after-two") == [5, 6]
        with pytest.raises(BatchCommandError, match="PERENGINE") as info:
            b.submit("echo ok", "#DISBATCH PERENGINE START echo hi")
        assert info.value.accepted == [range(7, 8)]
        got = b.sync_tasks([1, 3, 4, 5, 6, 7], timeout=RUN_TIMEOUT)
        assert got[1].exit_code == 3 and got[4].out_snippet == "r1\n"
        assert got[5].kind is RecordKind.DEPENDENCY_FAILED and got[6].out_snippet == "after-two\n"
        assert not b.ended  # open: it waits for more lines
        b.done()
        with pytest.raises(BatchCommandError, match="input was closed|refused"):
            b.submit("echo late")
        summary = b.wait(timeout=RUN_TIMEOUT)
    assert summary == {"failed": 2, "reason": None}
    records = parse_status_file((tmp_path / "sub_status.txt").read_bytes()).records
    assert sorted(r.task_id for r in records) == list(range(8))
    assert all(b"late" not in r.command for r in records)


def test_the_shell_submits_to_an_open_run_and_closes_it(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("echo from-file\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "tasksprint.cli", "batch", "--open", "-s", "localhost:2", "-p", "sh", "Tasks"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        run_json = tmp_path / "sh_tasksprint" / "run.json"
        for _ in range(int(RUN_TIMEOUT / 0.05)):
            if run_json.exists() and b"client_pids" in run_json.read_bytes():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        r = batch(tmp_path, "--submit", "sh", stdin=b"echo a\n#DISBATCH REPEAT 3 true\n#DISBATCH AFTER 2\necho b\n")
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().splitlines() == ["1", "2 3 4", "", "5"]
        bad = batch(tmp_path, "--submit", "sh", stdin=b"echo c\n#DISBATCH AFTER 99\n")
        assert bad.returncode == 1 and bad.stdout == b"6\n" and b"line 2 refused" in bad.stderr
        closed = batch(tmp_path, "--close", "sh")
        assert closed.returncode == 0 and b"7 task ids" in closed.stderr
        _, err = driver.communicate(timeout=RUN_TIMEOUT)
        assert driver.returncode == 0, err.decode()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    records = parse_status_file((tmp_path / "sh_status.txt").read_bytes()).records
    assert sorted(r.task_id for r in records) == list(range(7))
    assert {r.task_id: r.out_snippet for r in records}[5] == "b\n"
    assert batch(tmp_path, "--submit", "nosuch", stdin=b"true\n").returncode == 2


def test_after_in_a_task_file_skips_the_dependents_of_a_failed_line(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("exit 3\necho ok\n#DISBATCH AFTER 1\necho never\n#DISBATCH AFTER 2\necho yes\n")
    r = batch(tmp_path, "-e", "-s", "localhost:2", "-p", "dep", "Tasks")
    assert r.returncode == 1 and b"2 task(s) failed" in r.stderr
    records = {r.task_id: r for r in parse_status_file((tmp_path / "dep_status.txt").read_bytes()).records}
    assert records[2].flags == "R  D" and records[2].exit_code == -1 and records[2].command == b"echo never"
    assert records[3].out_snippet == "yes\n"
    assert not (tmp_path / "never").exists()
    # Resume reruns the task that did not run (with -R, the failed one too), now that line 1 succeeds.
    (tmp_path / "Tasks").write_text("true\necho ok\n#DISBATCH AFTER 1\necho never\n#DISBATCH AFTER 2\necho yes\n")
    again = batch(tmp_path, "-R", "--force-resume", "-r", "dep_status.txt", "-s", "localhost:2", "-p", "dep2", "Tasks")
    assert again.returncode == 0, again.stderr.decode()
    rerun = {r.task_id: r for r in parse_status_file((tmp_path / "dep2_status.txt").read_bytes()).records}
    assert rerun[2].kind is RecordKind.TASK and rerun[2].out_snippet == "never\n"
    assert rerun[3].kind is RecordKind.SKIPPED


def test_submitted_lines_go_in_commands_bounded_in_lines_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasksprint.batch_api as api
    from tasksprint.batch.scheduler import MAX_SUBMIT_LINES
    from tasksprint.batch_run import BatchRun

    sent: list[list[bytes]] = []
    next_id = 0

    async def fake(run: BatchRun, body: dict[str, object]) -> dict[str, object]:
        nonlocal next_id
        lines = body["lines"]
        assert isinstance(lines, list)
        sent.append(lines)
        first, next_id = next_id, next_id + len(lines)
        return {"ids": [[first + i, 1] for i in range(len(lines))]}

    monkeypatch.setattr(api, "send_command", fake)
    big = "x" * (api.SUBMIT_CHUNK_BYTES // 2 + 1)
    ids = api.submit_lines(BatchRun("p"), [big, big, "caf\udce9", *["true"] * (MAX_SUBMIT_LINES + 1)])
    assert [len(c) for c in sent] == [1, MAX_SUBMIT_LINES, 3]
    assert sent[1][1] == b"caf\xe9"  # str lines travel as the bytes they stand for
    assert ids == [range(i, i + 1) for i in range(MAX_SUBMIT_LINES + 4)]


def test_an_open_run_takes_lines_without_its_driver_and_a_new_driver_finishes_it(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("echo one\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "tasksprint.cli", "batch", "--open", "-s", "localhost:1", "-p", "od", "Tasks"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status = tmp_path / "od_status.txt"
        for _ in range(int(RUN_TIMEOUT / 0.05)):
            if status.exists() and status.read_bytes().count(b"\n") == 1:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        driver.kill()  # the run goes on: its replicas and clients do not need the driver
        driver.wait()
        r = batch(tmp_path, "--submit", "od", stdin=b"echo two\n#DISBATCH AFTER 2\necho three\n")
        assert r.returncode == 0 and r.stdout == b"1\n\n2\n", r.stderr.decode()
        assert batch(tmp_path, "--close", "od").returncode == 0
        attached = batch(tmp_path, "--attach", "od")
        assert attached.returncode == 0, attached.stderr.decode()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    records = parse_status_file((tmp_path / "od_status.txt").read_bytes()).records
    assert sorted((r.task_id, r.out_snippet) for r in records) == [(0, "one\n"), (1, "two\n"), (2, "three\n")]


def test_a_command_refused_before_the_run_is_initialized_is_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run just started may not have applied its first entry yet: the refusal
    (NOT_INITIALIZED) changed nothing, and ``send_command`` sends the command again
    instead of failing (which made submitting to a fresh open run flaky)."""
    import json
    from typing import Any

    import trio

    from tasksprint import batch_api
    from tasksprint.batch_run import BatchRun
    from tasksprint.coordinator.ops import Commanded, ErrorCode, Refused

    answers: list[Any] = [
        Refused(code=ErrorCode.NOT_INITIALIZED.value, error="not initialized yet"),
        Refused(code=ErrorCode.NOT_INITIALIZED.value, error="not initialized yet"),
        Commanded(value={"first": 0}),
    ]
    sent: list[Any] = []

    class FakeLog:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        async def __aenter__(self) -> FakeLog:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def submit(self, op: Any, deadline: float) -> Any:
            sent.append(op)
            return answers.pop(0)

    monkeypatch.setattr(batch_api, "LogClient", FakeLog)
    run = BatchRun(str(tmp_path / "r"))
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "run.json").write_text(json.dumps({"peers": "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"}))
    (run.run_dir / "secret").write_bytes(b"s" * 32)
    value = trio.run(lambda: batch_api.send_command(run, {"do": "x"}, deadline=5.0))
    assert value == {"first": 0} and len(sent) == 3
    # Refused for another reason: no retry, a clear error.
    answers[:] = [Refused(code=ErrorCode.MALFORMED.value, error="bad")]
    with pytest.raises(batch_api.BatchCommandError, match="refused: bad"):
        trio.run(lambda: batch_api.send_command(run, {"do": "x"}, deadline=5.0))
