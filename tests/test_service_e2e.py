"""The service end to end: ``tasksprint server`` with no flags, workers, and the commands of Kickoff's README.

Real processes on loopback: a server (three replicas), workers, and the
``tasksprint`` commands as a user types them.  Every wait polls for its
condition with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import tasksprint
from tasksprint.channel import ReplicaChannel
from tasksprint.service.api import Service, TaskFailed

DEADLINE = 240.0  # a bound, not a measure: a loaded machine runs a no-op command in seconds


def tasksprint_command() -> list[str]:
    script = Path(sys.executable).parent / "tasksprint"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tasksprint.cli"]


def poll(check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class Site:
    """A machine's view: a HOME with the service's state directory, and the processes started there."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"}
        for name in ("TASKSPRINT_STATE", "TASKSPRINT_SERVER"):
            self.env.pop(name, None)
        self.procs: list[subprocess.Popen[str]] = []
        self.server: subprocess.Popen[str] | None = None

    @property
    def state(self) -> Path:
        return self.home / ".tasksprint"

    def start_server(self) -> str:
        err = open(self.home / "server.err", "w")  # noqa: SIM115 (closed with the process)
        self.server = subprocess.Popen(
            [*tasksprint_command(), "server", "--log-level", "warning"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=self.env,
            text=True,
        )
        err.close()
        self.procs.append(self.server)
        assert self.server.stdout is not None
        line = self.server.stdout.readline().strip()  # the address, once a replica answers
        assert line.count(":") == 3, f"server printed {line!r}; stderr: {(self.home / 'server.err').read_text()}"
        return line

    def start_worker(self, name: str, *have: str, slots: int = 2) -> subprocess.Popen[str]:
        log = open(self.home / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                *tasksprint_command(),
                "worker",
                "--name",
                name,
                "--slots",
                str(slots),
                "--gpus",
                "",
                "--log-level",
                "warning",
            ]
            + (["--have", *have] if have else []),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            text=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*tasksprint_command(), *args, "--log-level", "warning"]
            if args[0] != "new"
            else [*tasksprint_command(), "new", "--log-level", "warning", *args[1:]],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def new(self, *args: str) -> int:
        done = self.run("new", *args)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    def info(self, tid: int) -> dict[str, Any]:
        done = self.run("info", str(tid), "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def state_of(self, tid: int) -> str:
        return str(self.info(tid)["state"])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_kickoff_readme_scenario(site: Site, tmp_path: Path) -> None:
    address = site.start_server()
    assert json.loads((site.state / "server.json").read_text())["replicas"] == address.split(",")
    assert (site.state / "secret").stat().st_mode & 0o777 == 0o600
    site.start_worker("cpu-box", "cpu")
    site.start_worker("gpu-box", "cpu", "gpu")

    on_gpu = site.new("--require", "gpu", "--", "echo on-gpu")
    wanted = site.new("--want", "gpu", "--job", "demo", "echo", "wanted")
    pidfile = tmp_path / "sleeper.pid"
    sleeper = site.new("--require", "cpu", "--name", "sleeper", f"echo $$ > {pidfile}; exec sleep 300")
    child = site.new("--after", str(sleeper), "echo never")
    grandchild = site.new("--after", str(child), "echo never either")

    assert site.run("wait", str(on_gpu), str(wanted)).returncode == 0
    assert site.info(on_gpu)["worker"] == "gpu-box" and site.info(on_gpu)["exit_code"] == 0
    assert site.info(wanted)["worker"] == "gpu-box" and site.info(wanted)["job"] == "demo"
    logs = site.run("logs", str(on_gpu))
    assert logs.returncode == 0 and logs.stdout == "on-gpu\n"

    pid = int(poll(lambda: pidfile.exists() and pidfile.read_text().strip(), "the sleeper to start"))
    poll(lambda: site.state_of(sleeper) == "running", "the sleeper to show as running")
    info = site.info(sleeper)
    assert info["worker"] in ("cpu-box", "gpu-box") and info["require"] == ["cpu"] and info["start"] is None
    assert site.info(child)["state"] == "waiting" and site.info(grandchild)["after"] == [child]
    status = site.run("status")
    assert status.returncode == 0
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[2:]}
    assert "running" in lines[str(sleeper)] and info["worker"] in lines[str(sleeper)]
    assert "waiting" in lines[str(child)] and "echo never" in lines[str(child)]
    page = json.loads(site.run("status", "--json", "--in-state", "waiting").stdout)
    assert [row["id"] for row in page["tasks"]] == [child, grandchild]

    cancel = site.run("cancel", str(sleeper))
    assert cancel.returncode == 0 and cancel.stdout.strip() == f"cancelled: {sleeper}, {child}, {grandchild}"
    poll(lambda: not pid_alive(pid), "the cancelled command to be killed")
    assert [site.state_of(t) for t in (sleeper, child, grandchild)] == ["cancelled"] * 3
    waited = site.run("wait", str(on_gpu), str(sleeper))
    assert waited.returncode == 1 and f"{sleeper} cancelled" in waited.stdout

    # A task requiring a tag no worker has waits; it runs once a worker gains the tag.
    fpga = site.new("--require", "fpga", "echo fpga")
    later = site.new("echo later")
    assert site.run("wait", str(later)).returncode == 0
    assert site.state_of(fpga) == "pending"
    tagged = site.run("tags", "cpu-box", "+fpga", "-cpu")
    assert tagged.returncode == 0 and tagged.stdout.split() == ["fpga"]
    assert site.run("wait", str(fpga)).returncode == 0 and site.info(fpga)["worker"] == "cpu-box"

    # Drain: the drained worker takes nothing more, the other one still does.
    assert site.run("drain", "cpu-box").returncode == 0
    stuck = site.new("--require", "fpga", "echo stuck")
    other = site.new("--require", "gpu", "echo other")
    assert site.run("wait", str(other)).returncode == 0
    assert site.state_of(stuck) == "pending"
    assert site.run("cancel", "--job", "demo").stdout.strip() == "cancelled: nothing (already finished)"

    # Errors name what is wrong.
    bad = site.run("new", "--after", "9999", "echo x")
    assert bad.returncode == 1 and "unknown task id" in bad.stderr
    assert site.run("tags", "ghost", "+x").returncode == 1
    assert "no task 4242" in site.run("info", "4242").stderr


def test_python_client_and_bulk_submission(site: Site, tmp_path: Path) -> None:
    site.start_server()
    site.start_worker("w", slots=4)
    svc = tasksprint.connect(state=site.state)
    assert isinstance(svc, Service)
    first = svc.submit("echo first", job="py")
    squares = svc.map("echo $(( {} * {} ))", [(i, i) for i in range(5)], after=[first], job="py")
    assert svc.wait(squares, timeout=DEADLINE)
    assert [t.result()["stdout"]["head"] for t in squares] == [f"{i * i}\n" for i in range(5)]
    failing = svc.submit(argv=["sh", "-c", "exit 4"])
    with pytest.raises(TaskFailed) as failed:
        failing.result(timeout=DEADLINE)
    assert failed.value.info["exit_code"] == 4
    spec_file = tmp_path / "tasks.txt"
    spec_file.write_text("# a comment\n" + "".join(f"--job file echo {i}\n" for i in range(100)))
    done = site.run("new", "--from-file", str(spec_file))
    assert done.returncode == 0, done.stderr
    ids = [int(x) for x in done.stdout.split()]
    assert len(ids) == 100 and site.run("wait", "--job", "file").returncode == 0
    bad_file = tmp_path / "bad.txt"
    bad_file.write_text("echo fine\n--retries x echo bad\n")
    bad = site.run("new", "--from-file", str(bad_file))
    assert bad.returncode == 2 and "line 2" in bad.stderr


def test_every_acknowledged_new_runs_once_when_the_leader_dies(site: Site, tmp_path: Path) -> None:
    site.start_server()
    site.start_worker("w", slots=4)
    out = tmp_path / "ran.txt"
    svc = tasksprint.connect(state=site.state)

    def replica_pid(rid: int) -> int | None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"replica" in cmd and str(site.state / f"replica{rid}").encode() in cmd:
                return int(entry.name)
        return None

    def leader() -> int | None:
        async def ask() -> int | None:
            channel = ReplicaChannel(svc.addrs, svc.secret)
            try:
                for addr in svc.addrs:
                    try:
                        st = await channel.status(addr, timeout=1.0)
                    except Exception:
                        continue
                    if st.leader is not None:
                        return int(st.leader)
                return None
            finally:
                await channel.aclose()

        return trio.run(ask)

    acked: list[tuple[int, str]] = []
    for i in range(30):
        if i == 10:
            # A tuple: replica 0 is a leader too, and poll takes a falsy value for "not yet".
            (rid,) = poll(lambda: (lambda r: None if r is None else (r,))(leader()), "a leader")
            pid = poll(lambda: replica_pid(rid), "the leader's process")  # noqa: B023
            os.kill(pid, signal.SIGKILL)
        token = f"token-{i}"
        try:
            (tid,) = svc.submit_specs([{"cmd": f"echo {token} >> {out}"}])
        except Exception:
            continue  # not acknowledged: it may or may not run, but at most once
        acked.append((tid, token))
    assert len(acked) >= 20
    assert svc.wait([tid for tid, _ in acked], timeout=DEADLINE)
    lines = out.read_text().split()
    for _, token in acked:
        assert lines.count(token) == 1, f"{token} ran {lines.count(token)} times"
    assert all(lines.count(t) <= 1 for t in set(lines))
