"""``tasksprint task put`` / ``tasksprint result get``: kolejka task directories on the service.

The queue scheduler's new spec fields (``files``, ``results``, ``stdout``,
``stderr``) on one machine with a simulated worker; the task directory
checks without a service; and kolejka's example end to end on a real
service (three replicas) with one worker, through the commands a user types.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from test_service_e2e import Site, poll, site  # noqa: F401 (site is a fixture)
from test_service_scheduler import ask, sim, submit

from tasksprint import wire
from tasksprint.coordinator.specs import USAGE_KEYS, record_outputs
from tasksprint.exec.spec import CommandRecord, Verdict
from tasksprint.execute import KolejkaError, kolejka_result
from tasksprint.object_store import ObjectStore
from tasksprint.peer_data import serve_data
from tasksprint.service import kolejka
from tasksprint.service.kolejka import GetFailed, fetch_result_files, task_spec_for
from tasksprint.service.scheduler import SpecError, check_spec

# The example of kolejka's README (uname -s in a container, stdout collected).
KOLEJKA_TASK = {
    "image": "ubuntu:xenial",
    "args": ["uname", "-s"],
    "limits": {"memory": "64M", "cpus": "1", "pids": "16", "time": "1s"},
    "stdout": "stdout.txt",
}


def task_dir(root: Path, task: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    root.mkdir()
    (root / "kolejka_task.json").write_text(json.dumps(task))
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# ------------------------------------------------------------ the scheduler


def test_a_kolejka_result_states_the_runs_usage_and_host() -> None:
    record = record_outputs(
        CommandRecord(verdict=Verdict.TIME, signal=9, elapsed_s=2.0, user_cpu_s=1.0, peak_memory_bytes=8192, host="n1")
    )
    result = kolejka_result(record, "killed", ["out.txt"])
    assert result["stats"] == {key: record[key] for key in (*USAGE_KEYS, "host")}
    assert result["stats"]["host"] == "n1" and result["stats"]["peak_memory_bytes"] == 8192
    assert result["files"] == ["out.txt"] and result["error"] == "killed" and result["verdict"] == "time"
    # A run that never started states nothing it did not measure.
    assert kolejka_result(None, "no worker", [])["stats"] == dict.fromkeys((*USAGE_KEYS, "host"))


def test_a_spec_with_files_and_results_reaches_the_coordinator() -> None:
    s = sim()
    content = base64.b64encode(b"alpha\n").decode()
    (sid,) = submit(
        s,
        {
            "argv": ["cat", "data/in.txt"],
            "files": {"data/in.txt": content},
            "results": ["out.txt"],
            "stdout": "out.txt",
        },
    )
    tid = ask(s, q="info", id=sid)["tid"]
    command = s.machine.task_info(tid)["kwargs"]["command"]
    assert command["files"] == {"data/in.txt": content} and command["results"] == ["out.txt"]
    assert command["stdout"] == "out.txt" and command["argv"] == ["cat", "data/in.txt"]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"files": {"../x": "YQ=="}}, "contains '..'"),
        ({"files": {"/etc/x": "YQ=="}}, "is absolute"),
        ({"files": {"a": "not base64!"}}, "not base64"),
        ({"files": {"a": 7}}, "base64 text"),
        ({"files": ["a"]}, "'files' must map"),
        ({"files": {"a": "A" * (2 * 1024 * 1024)}}, "more than 1048576 bytes"),
        ({"files": {"a": "A" * (700 * 1024), "b": "A" * (700 * 1024)}}, "more than 1048576 bytes"),
        ({"results": ["ok", "a/../../b"]}, "contains '..'"),
        ({"results": "out.txt"}, "'results' must be a list"),
        ({"stdout": "../out.txt"}, "contains '..'"),
        ({"stderr": "x\ny"}, "control character"),
        ({"results": ["o"], "cwd": "/tmp"}, "leave 'cwd' unset"),
    ],
)
def test_the_scheduler_refuses_bad_file_fields(spec: dict[str, Any], says: str) -> None:
    with pytest.raises(SpecError, match=None) as caught:
        check_spec({"cmd": "true", **spec})
    assert says in str(caught.value)
    # Refused as a whole submission, before any task is recorded.
    s = sim()
    answer = s.h.op({"op": "command", "body": {"do": "submit", "tasks": [{"cmd": "true", **spec}]}})
    assert says in answer.value["error"] and ask(s, q="status")["total"] == 0


# ------------------------------------------------------- the task directory


def test_task_put_builds_one_command_task_from_the_directory(tmp_path: Path) -> None:
    task = {**KOLEJKA_TASK, "environment": {"LANG": "C"}, "stderr": "err[1].txt"}
    spec = task_spec_for(task_dir(tmp_path / "t", task, {"data/in.txt": "x"}), ignore_image=True)
    assert spec["argv"] == ["uname", "-s"] and spec["env"] == {"LANG": "C"}
    assert spec["limits"] == {"memory_bytes": 64 * 1024 * 1024, "cpus": 1.0, "pids": 16, "wall_time_s": 1.0}
    assert spec["files"] == {"data/in.txt": base64.b64encode(b"x").decode()}
    # Result names are patterns: a name with glob characters matches only itself.
    assert spec["results"] == ["stdout.txt", "err[[]1].txt"] and spec["stderr"] == "err[1].txt"
    assert check_spec(spec)["results"] == spec["results"]


@pytest.mark.parametrize(
    ("task", "says"),
    [
        ({**KOLEJKA_TASK, "stdout": "../escape.txt"}, "contains '..'"),
        ({**KOLEJKA_TASK, "files": ["../secret"]}, "contains '..'"),
        ({**KOLEJKA_TASK, "files": {"/etc/passwd": {}}}, "is absolute"),
        ({**KOLEJKA_TASK, "files": "in.txt"}, "'files' must be a list"),
        ({**KOLEJKA_TASK, "args": []}, "'args' must be a non-empty list"),
        ({**KOLEJKA_TASK, "colour": "red"}, "does not know"),
    ],
)
def test_task_put_refuses_a_bad_task_directory(tmp_path: Path, task: dict[str, Any], says: str) -> None:
    with pytest.raises(KolejkaError) as caught:
        task_spec_for(task_dir(tmp_path / "t", task), ignore_image=True)
    assert says in str(caught.value)


def test_task_put_refuses_links_big_files_and_images(tmp_path: Path) -> None:
    linked = task_dir(tmp_path / "linked", KOLEJKA_TASK)
    (linked / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(KolejkaError, match="not a regular file"):
        task_spec_for(linked, ignore_image=True)
    big = task_dir(tmp_path / "big", KOLEJKA_TASK, {"a.bin": "x" * (1024 * 1024 + 1)})
    with pytest.raises(KolejkaError, match="more than 1048576 bytes"):
        task_spec_for(big, ignore_image=True)
    with pytest.raises(KolejkaError, match="--ignore-image"):
        task_spec_for(task_dir(tmp_path / "image", KOLEJKA_TASK), ignore_image=False)


# ------------------------------------------------- what a worker sends back

SECRET = b"k" * 32


class _OneWorker:
    """What result get asks the service: the secret, and where worker ``w`` serves its data."""

    def __init__(self, addr: str) -> None:
        self.secret = SECRET
        self.addr = addr

    async def worker_addresses(self) -> dict[str, str]:
        return {"w": self.addr}


@pytest.mark.parametrize(
    ("outputs", "says"),
    [
        ({"files": {"../evil.txt": "YQ=="}}, "contains '..'"),
        ({"files": {"/etc/evil": "YQ=="}}, "is absolute"),
        ({"files": {"ok.txt": "%%%"}}, "is not base64"),
        ({"files": ["ok.txt"]}, "must be a map"),
        (None, "does not hold task 7"),
    ],
)
async def test_result_files_from_a_worker_are_hostile_input(
    tmp_path: Path, outputs: dict[str, Any] | None, says: str
) -> None:
    store = ObjectStore(1 << 20, tmp_path, 1 << 20)
    if outputs is not None:
        store.put(7, outputs)
    endpoint = wire.Endpoint(secret=SECRET, role="data", ident="w")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: wire.serve(
                lambda conn: serve_data(store, conn), "127.0.0.1", 0, endpoint, task_status=task_status
            )
        )
        worker = _OneWorker(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        with pytest.raises(GetFailed) as caught:
            await fetch_result_files(worker, {"worker": "w", "tid": 7}, 1)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert says in str(caught.value) and "worker 'w'" in str(caught.value)


async def test_good_result_files_come_back_checked(tmp_path: Path) -> None:
    store = ObjectStore(1 << 20, tmp_path, 1 << 20)
    store.put(7, {"files": {"./out//a.txt": "YQ==", "b.txt": ""}, "exit_code": 0})
    endpoint = wire.Endpoint(secret=SECRET, role="data", ident="w")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: wire.serve(
                lambda conn: serve_data(store, conn), "127.0.0.1", 0, endpoint, task_status=task_status
            )
        )
        worker = _OneWorker(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        got = await fetch_result_files(worker, {"worker": "w", "tid": 7}, 1)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert got == [("b.txt", b""), ("out/a.txt", b"a")]


async def test_a_holder_that_left_means_lost_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kolejka, "_HOLDER_LOOKUP_S", 0.5)  # how long to look: not what decides
    with pytest.raises(GetFailed, match="worker 'gone', which held task 3's result files, is gone"):
        await fetch_result_files(_OneWorker("127.0.0.1:1"), {"worker": "gone", "tid": 9}, 3)  # type: ignore[arg-type]
    with pytest.raises(GetFailed, match="does not say which worker"):
        await fetch_result_files(_OneWorker("127.0.0.1:1"), {"worker": None, "tid": 9}, 3)  # type: ignore[arg-type]


# ---------------------------------------------------------- end to end


@pytest.mark.slow
def test_put_and_get_against_a_running_service(site: Site, tmp_path: Path) -> None:  # noqa: F811
    example = task_dir(tmp_path / "example", KOLEJKA_TASK)
    refused = site.run("task", "put", str(example))
    assert refused.returncode == 2 and "--ignore-image" in refused.stderr, refused.stderr
    escaping = task_dir(tmp_path / "escaping", {**KOLEJKA_TASK, "stdout": "../escape.txt"})
    refused = site.run("task", "put", str(escaping), "--ignore-image")
    assert refused.returncode == 2 and "contains '..'" in refused.stderr, refused.stderr

    site.start_server()
    site.start_worker("w1")
    put = site.run("task", "put", str(example), "--ignore-image")
    assert put.returncode == 0, put.stderr
    key = put.stdout.strip()
    assert key.isdigit(), put.stdout
    reader = task_dir(
        tmp_path / "reader",
        {"args": ["sh", "-c", "cat data/in.txt; echo oops >&2"], "stdout": "out.txt", "stderr": "err.txt"},
        {"data/in.txt": "from the task directory\n"},
    )
    reader_key = site.run("task", "put", str(reader), "--ignore-image").stdout.strip()
    failing = task_dir(tmp_path / "failing", {"args": ["sh", "-c", "echo why; exit 3"], "stdout": "out.txt"})
    failing_key = site.run("task", "put", str(failing), "--ignore-image").stdout.strip()
    sleeper = task_dir(tmp_path / "sleeper", {"args": ["sleep", "300"]})
    sleeper_key = site.run("task", "put", str(sleeper), "--ignore-image").stdout.strip()

    result = tmp_path / "result"
    got = site.run("result", "get", key, str(result))
    assert got.returncode == 0, got.stderr
    written = json.loads((result / "kolejka_result.json").read_text())
    assert written["result"] == 0 and written["files"] == ["stdout.txt"] and written["verdict"] == "ok", written
    assert written["error"] is None and written["stats"]["elapsed_s"] >= 0, written
    assert (result / "stdout.txt").read_text() == "Linux\n"
    again = site.run("result", "get", key, str(result))
    assert again.returncode == 1 and "already holds 'stdout.txt'" in again.stderr, again.stderr

    # The task directory's files were staged on the worker; both output files come back.
    read = tmp_path / "read"
    got = site.run("result", "get", reader_key, str(read))
    assert got.returncode == 0, got.stderr
    assert json.loads((read / "kolejka_result.json").read_text())["files"] == ["err.txt", "out.txt"]
    assert (read / "out.txt").read_text() == "from the task directory\n" and (read / "err.txt").read_text() == "oops\n"

    # A task that exits non-zero: its exit code is the result, and the files it wrote come back too.
    failed = tmp_path / "failed"
    got = site.run("result", "get", failing_key, str(failed))
    assert got.returncode == 0, got.stderr
    written = json.loads((failed / "kolejka_result.json").read_text())
    assert written["result"] == 3 and written["files"] == ["out.txt"] and "failed" in written["error"], written
    assert (failed / "out.txt").read_text() == "why\n"

    # Not done yet: --no-wait says so and writes nothing.
    poll(lambda: site.state_of(int(sleeper_key)) == "running", "the sleeper to run")
    early = site.run("result", "get", sleeper_key, str(tmp_path / "early"), "--no-wait")
    assert early.returncode == 1 and "running: not done yet" in early.stderr, early.stderr
    assert not (tmp_path / "early").exists()
    # A wait bounded by --timeout gives up with a message (the sleeper sleeps for minutes).
    bounded = site.run("result", "get", sleeper_key, str(tmp_path / "early"), "--timeout", "0.5")
    assert bounded.returncode == 1 and "not done after 0.5s" in bounded.stderr, bounded.stderr
    assert not (tmp_path / "early").exists()
    assert site.run("cancel", sleeper_key).returncode == 0
    cancelled = site.run("result", "get", sleeper_key, str(tmp_path / "cancelled"))
    assert cancelled.returncode == 1 and "cancelled" in cancelled.stderr, cancelled.stderr

    # Bad keys.
    bad = site.run("result", "get", "../1", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "is not a task key" in bad.stderr, bad.stderr
    unknown = site.run("result", "get", "4242", str(tmp_path / "bad"))
    assert unknown.returncode == 2 and "no task with the key 4242" in unknown.stderr, unknown.stderr
    assert not (tmp_path / "bad").exists()
