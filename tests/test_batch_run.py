"""``tasksprint batch`` end to end: disBatch's own test scenario, the directives, resume, reattach.

Each test runs the real command (three replicas with fsync, one client per
engine) in its own directory, and reads the status file it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasksprint.batch.statusfile import RecordKind, StatusRecord, parse_status_file

# Bounds every command (the runs themselves take seconds); not a measurement.
RUN_TIMEOUT = 180.0
POLL = 0.05


def batch(cwd: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tasksprint.cli", "batch", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )


def start_batch(cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tasksprint.cli", "batch", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def status(path: Path) -> list[StatusRecord]:
    parsed = parse_status_file(path.read_bytes())
    assert parsed.rejected == ()
    return list(parsed.records)


def only_status_file(cwd: Path) -> Path:
    found = sorted(cwd.glob("*_status.txt"))
    assert len(found) == 1, found
    return found[0]


def wait_for(condition, what: str, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL)


def test_three_touch_then_resume_runs_only_the_new_task(tmp_path: Path) -> None:
    tasks = tmp_path / "Tasks"
    tasks.write_text("touch A.txt\ntouch B.txt\ntouch C.txt\n")
    r = batch(tmp_path, "-s", "localhost:2", "-p", "first", "Tasks")
    assert r.returncode == 0, r.stderr.decode()
    first = status(tmp_path / "first_status.txt")
    assert sorted(rec.task_id for rec in first) == [0, 1, 2]
    assert all(rec.kind is RecordKind.TASK and rec.exit_code == 0 for rec in first)
    assert {p.name for p in tmp_path.glob("*.txt")} >= {"A.txt", "B.txt", "C.txt"}
    for name in ("A.txt", "B.txt", "C.txt"):
        (tmp_path / name).unlink()

    tasks.write_text("touch A.txt\ntouch B.txt\ntouch C.txt\ntouch D.txt\n")
    r = batch(tmp_path, "-s", "localhost:2", "-p", "second", "-r", "first_status.txt", "Tasks")
    assert r.returncode == 0, r.stderr.decode()
    second = {rec.task_id: rec for rec in status(tmp_path / "second_status.txt")}
    assert sorted(second) == [0, 1, 2, 3]
    assert [second[i].kind for i in range(3)] == [RecordKind.SKIPPED] * 3
    assert second[3].kind is RecordKind.TASK and second[3].command == b"touch D.txt"
    assert (tmp_path / "D.txt").exists()
    assert not any((tmp_path / n).exists() for n in ("A.txt", "B.txt", "C.txt"))


def test_an_empty_task_file_runs_nothing_and_succeeds(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("")
    r = batch(tmp_path, "-s", "localhost:2", "Tasks")
    assert r.returncode == 0, r.stderr.decode()
    path = only_status_file(tmp_path)
    assert path.name.startswith("Tasks_disBatch_")
    assert path.read_bytes() == b""


def test_fail_fast_stops_without_the_third_task_and_without_waiting_for_the_sleep(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("sleep 1000\nexit 1\ntouch A.txt\n")
    # The subprocess timeout (RUN_TIMEOUT) is far below the sleep: finishing at all shows it was not awaited.
    r = batch(tmp_path, "-s", "localhost:2", "--fail-fast", "-p", "ff", "Tasks")
    assert r.returncode != 0
    assert b"exit code 1" in r.stderr
    assert not (tmp_path / "A.txt").exists()
    records = {rec.task_id: rec for rec in status(tmp_path / "ff_status.txt")}
    assert records[1].exit_code == 1 and records[1].flags.startswith("R")
    assert 2 not in records


def test_mon_draws_the_run_while_the_status_file_is_written(tmp_path: Path) -> None:
    # Long enough for the view to be redrawn after the replicas are up (it is
    # drawn every second; a terminal-less run prints the last drawing).
    (tmp_path / "Tasks").write_text("sleep 3\ntouch B.txt\n")
    r = subprocess.run(
        [sys.executable, "-m", "tasksprint.cli", "batch", "-s", "localhost:2", "--mon", "-p", "mon", "Tasks"],
        cwd=tmp_path,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, "COLUMNS": "200"},  # the view's width when not on a terminal
    )
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(rec.task_id for rec in status(tmp_path / "mon_status.txt")) == [0, 1]
    screen = r.stdout.decode()
    # tasksprint top's view: the leader among the replicas, the engine among the workers.
    assert "leader: replica" in screen and "engine0" in screen, screen[-3000:]


def test_stdin_and_the_status_fields_of_a_known_run(tmp_path: Path) -> None:
    text = b"#DISBATCH PREFIX echo \n#DISBATCH REPEAT 2 start 5 step 3 x$DISBATCH_REPEAT_INDEX\nnot-a-command 2>&1\n"
    r = batch(tmp_path, "-s", "localhost:1", "-p", "run", "--status-header", "-", stdin=text)
    assert r.returncode == 0, r.stderr.decode()
    raw = (tmp_path / "run_status.txt").read_text()
    assert raw.splitlines()[0].startswith("ROE[ PSZ]\tTaskID")
    records = {rec.task_id: rec for rec in status(tmp_path / "run_status.txt")}
    assert [records[i].repeat_index for i in (0, 1)] == [5, 8]
    assert records[0].out_snippet == "x5\n" and records[0].out_bytes == 3
    assert records[1].out_snippet == "x8\n"
    assert records[0].line == records[1].line == 2
    assert records[2].line == 3 and records[2].repeat_index == -1
    assert records[2].command == b"echo not-a-command 2>&1"
    for rec in records.values():
        assert rec.pid > 0 and rec.node and rec.finish >= rec.start > 0
        assert len(raw.splitlines()[1].split("\t")) == 15


def test_barrier_check_ends_the_run_after_a_failure(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("true\nfalse\n#DISBATCH BARRIER CHECK\ntouch after.txt\n")
    r = batch(tmp_path, "-s", "localhost:2", "-p", "bc", "Tasks")
    assert r.returncode != 0
    assert b"BARRIER CHECK on line 3" in r.stderr
    records = status(tmp_path / "bc_status.txt")
    kinds = [rec.kind for rec in records]
    assert kinds.count(RecordKind.CHECK_BARRIER) == 1
    assert not (tmp_path / "after.txt").exists()


def test_barrier_waits_and_exit_code_mode(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text(
        "sleep 0.5; touch first.txt\nfalse\n#DISBATCH BARRIER\ntest -e first.txt && touch second.txt\n"
    )
    r = batch(tmp_path, "-s", "localhost:2", "-p", "b", "-e", "Tasks")
    assert r.returncode == 1
    assert (tmp_path / "second.txt").exists()
    records = status(tmp_path / "b_status.txt")
    order = [rec.task_id for rec in records]
    assert order.index(2) > max(order.index(0), order.index(1)) and order.index(3) > order.index(2)
    r = batch(tmp_path, "-s", "localhost:2", "-p", "b2", "Tasks")
    assert r.returncode == 0, r.stderr.decode()  # without -e a failed task is no failure of the run


def test_retry_reruns_only_failed_tasks(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("echo run >> ok.log\ntest -e flag\n")
    r = batch(tmp_path, "-s", "localhost:2", "-p", "one", "Tasks")
    assert r.returncode == 0
    (tmp_path / "flag").touch()
    r = batch(tmp_path, "-s", "localhost:2", "-p", "two", "-r", "one_status.txt", "-R", "Tasks")
    assert r.returncode == 0, r.stderr.decode()
    two = {rec.task_id: rec for rec in status(tmp_path / "two_status.txt")}
    assert two[0].kind is RecordKind.SKIPPED
    assert two[1].kind is RecordKind.TASK and two[1].exit_code == 0
    assert (tmp_path / "ok.log").read_text() == "run\n"


def test_resume_refuses_a_changed_task_file_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("touch A\n")
    assert batch(tmp_path, "-s", "localhost:1", "-p", "one", "Tasks").returncode == 0
    (tmp_path / "Tasks").write_text("touch Z\n")
    r = batch(tmp_path, "-s", "localhost:1", "-p", "two", "-r", "one_status.txt", "Tasks")
    assert r.returncode == 2 and b"--force-resume" in r.stderr
    assert not (tmp_path / "two_tasksprint").exists()
    r = batch(tmp_path, "-s", "localhost:1", "-p", "three", "-r", "one_status.txt", "--force-resume", "Tasks")
    assert r.returncode == 0
    assert [rec.kind for rec in status(tmp_path / "three_status.txt")] == [RecordKind.SKIPPED]
    assert not (tmp_path / "Z").exists()


def test_misplaced_perengine_is_an_error_naming_its_line(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("true\n#DISBATCH PERENGINE START true\n")
    r = batch(tmp_path, "-s", "localhost:1", "Tasks")
    assert r.returncode == 2
    assert b"line 2" in r.stderr and b"PERENGINE" in r.stderr
    assert list(tmp_path.glob("*_tasksprint")) == []


def test_perengine_start_and_stop_run_once_per_engine(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text(
        "#DISBATCH PERENGINE START touch start.$DISBATCH_ENGINE_RANK\n"
        "#DISBATCH PERENGINE STOP touch stop.$DISBATCH_ENGINE_RANK\n"
        "true\ntrue\n"
    )
    r = batch(tmp_path, "-s", "localhost:1", "-s", "localhost:1", "-p", "pe", "Tasks")
    assert r.returncode == 0, r.stderr.decode()
    for name in ("start.0", "start.1", "stop.0", "stop.1"):
        assert (tmp_path / name).exists(), name
    records = status(tmp_path / "pe_status.txt")
    assert sum(rec.kind is RecordKind.PER_ENGINE for rec in records) == 4
    assert sum(rec.kind is RecordKind.TASK for rec in records) == 2


def _run_info(cwd: Path, prefix: str) -> dict:
    path = cwd / f"{prefix}_tasksprint" / "run.json"
    wait_for(lambda: path.exists() and json.loads(path.read_text()).get("client_pids"), "run.json")
    return json.loads(path.read_text())


def test_a_driver_killed_mid_run_is_replaced_and_every_line_is_there_once(tmp_path: Path) -> None:
    n = 40
    (tmp_path / "Tasks").write_text("".join("sleep 0.05; echo $DISBATCH_TASKID >> ran.log\n" for _ in range(n)))
    driver = start_batch(tmp_path, "-s", "localhost:2", "-p", "rt", "--status-header", "Tasks")
    try:
        _run_info(tmp_path, "rt")
        status_path = tmp_path / "rt_status.txt"
        wait_for(lambda: status_path.exists() and len(status_path.read_bytes().splitlines()) >= 5, "some lines")
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    r = batch(tmp_path, "--attach", "rt")
    assert r.returncode == 0, r.stderr.decode()
    assert status_path.read_text().startswith("ROE[ PSZ]\t")  # the first driver's --status-header holds
    records = status(status_path)
    assert sorted(rec.task_id for rec in records) == list(range(n))
    ran = (tmp_path / "ran.log").read_text().split()
    assert sorted(map(int, ran)) == list(range(n))  # nothing ran twice


def test_a_replica_killed_mid_run_loses_nothing(tmp_path: Path) -> None:
    n = 30
    (tmp_path / "Tasks").write_text("".join("sleep 0.05; echo $DISBATCH_TASKID >> ran.log\n" for _ in range(n)))
    driver = start_batch(tmp_path, "-s", "localhost:2", "-p", "rk", "Tasks")
    try:
        info = _run_info(tmp_path, "rk")
        status_path = tmp_path / "rk_status.txt"
        wait_for(lambda: status_path.exists() and len(status_path.read_bytes().splitlines()) >= 3, "some lines")
        os.kill(info["replica_pids"][0], signal.SIGKILL)
        _, err = driver.communicate(timeout=RUN_TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err.decode()
    records = status(tmp_path / "rk_status.txt")
    assert sorted(rec.task_id for rec in records) == list(range(n))
    assert sorted(map(int, (tmp_path / "ran.log").read_text().split())) == list(range(n))


def test_help_names_the_options_that_do_not_apply(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tasksprint.cli", "batch", "--help"], capture_output=True, timeout=60, check=True
    )
    out = r.stdout.decode()
    for option in ("--fail-fast", "--resume-from", "--force-resume", "--ssh-node", "--cpusPerTask", "--attach"):
        assert option in out
    assert "--kvsserver" in out and "do not apply" in out


def test_the_python_api_reads_each_task_record_as_it_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasksprint.batch_api import Batch

    monkeypatch.chdir(tmp_path)
    lines = ["echo one", "exit 4", "#DISBATCH BARRIER", "echo $DISBATCH_NAMETASKS"]
    with Batch(lines, prefix="api", options=["-s", "localhost:2"]) as run:
        first = run.sync_tasks([0, 1], timeout=RUN_TIMEOUT)
        assert first[0].out_snippet == "one\n" and first[1].exit_code == 4
        summary = run.wait(timeout=RUN_TIMEOUT)
    assert summary == {"failed": 1, "reason": None}
    assert run.records[3].out_snippet == "STREAM\n"
    assert run.records[2].kind is RecordKind.BARRIER
    assert sorted(r.task_id for r in status(tmp_path / "api_status.txt")) == [0, 1, 2, 3]


def test_logfile_gets_the_driver_lines(tmp_path: Path) -> None:
    (tmp_path / "Tasks").write_text("true\n#DISBATCH NOSUCH thing\n")
    r = batch(tmp_path, "-s", "localhost:1", "-p", "lg", "--logfile", "driver.log", "--loglevel", "DEBUG", "Tasks")
    assert r.returncode == 0, r.stderr.decode()
    log = (tmp_path / "driver.log").read_text()
    assert "line 2: unknown #DISBATCH directive" in log and "started lg" in log and "exit code 0" in log
    assert b"line 2" in r.stderr


def test_a_failed_batch_computation_is_reported_not_waited_for() -> None:
    import trio

    from tasksprint.batch_follow import _computation_failure
    from tasksprint.coordinator.replies import ClientCounts, ComputationFailure, ComputationStatus

    def status(state: str) -> ComputationStatus:
        failure = None
        if state == "failed":
            failure = ComputationFailure(
                kind="hook", hook="init", tid=None, cid=None, slot=1, error="E", message="init raised E"
            )
        return ComputationStatus(
            state=state,
            finished=False,
            result=None,
            failure=failure,
            tasks={"total": 0},
            clients=ClientCounts(live=1, dead=0),
            live_clients=(),
            now=0.0,
            seed=1,
            version=1,
            last_hook=None,
        )

    class Channel:
        def __init__(self, state: str) -> None:
            self.state = state

        async def request(self, request: object) -> ComputationStatus:
            return status(self.state)

    async def main() -> None:
        assert await _computation_failure(Channel("running")) is None  # type: ignore[arg-type]
        why = await _computation_failure(Channel("failed"))  # type: ignore[arg-type]
        assert why == "the batch scheduler failed: init raised E"

    trio.run(main)


def test_added_engines_that_never_reached_the_replicas_are_stopped_once_the_run_ended(tmp_path: Path) -> None:
    """An engine added with --add-engines whose client started after the replicas stopped would try
    them for ever, and its Slurm job with it: once the driver marks the run ended, the clients get
    the driver's grace and are then stopped."""
    import subprocess
    import threading

    from tasksprint.batch_command import _wait_for_end
    from tasksprint.batch_run import ENDED, BatchRun

    run = BatchRun(str(tmp_path / "r"))
    run.run_dir.mkdir(parents=True)
    stuck = subprocess.Popen(["sleep", "600"])
    try:
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (_wait_for_end(run, [stuck]), done.set()))
        waiter.start()
        assert not done.wait(0.5)  # the run goes on: the engines stay
        (run.run_dir / ENDED).touch()
        waiter.join(60)
        assert done.is_set() and stuck.poll() is not None
    finally:
        stuck.kill()
        stuck.wait()
