"""``tasksprint batch`` submitted with sbatch to a real Slurm that the test starts, on this machine.

The fixture starts munged (its own key and socket), slurmctld and two slurmd
(nodes ``n1`` and ``n2`` of two cores, both on 127.0.0.1 with ports of their own) from a
configuration in a temporary directory; no system Slurm or munge key is
touched.  The job spans both nodes, so the engine and the replica on ``n2``
start as job steps there with srun.  Every daemon is stopped and every file
removed at the end.  Skipped, saying why, without root or without Debian's
``slurm-wlm`` and ``munge`` (tests/setup-system.sh installs them).
``make slurm-check`` runs this file alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tasksprint.batch.statusfile import RecordKind, parse_status_file
from tasksprint.localcluster import free_ports

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "scancel")
NODES = ("n1", "n2")
# Bounds every wait (a job of these tasks takes seconds); not a measurement.
START_TIMEOUT = 60.0
JOB_TIMEOUT = 240.0
# A job's states once it has ended.
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"})


@attrs.define
class Slurm:
    """A running one-machine Slurm: its configuration file and the environment its commands need."""

    base: Path
    env: dict[str, str]

    def run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        path = self.base / "log" / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _which(name: str) -> str | None:
    """Where a program is: on PATH, or where Debian puts daemons (which a PATH may leave out)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (slurmd and munged run as root here)"
    absent = [name for name in (*DAEMONS, *CLIENTS, "munge") if _which(name) is None]
    if absent:
        return f"needs slurm-wlm and munge ({', '.join(absent)} not found; tests/setup-system.sh installs them)"
    return None


def _daemon(name: str) -> str:
    path = _which(name)
    assert path is not None, name
    return path


def _config(base: Path, ports: list[int]) -> str:
    host = socket.gethostname()
    nodes = "".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=500\n"
        for name, port in zip(NODES, ports[1:], strict=True)
    )
    return (
        "ClusterName=tscheck\nSlurmctldHost=localhost\n"
        f"SlurmctldPort={ports[0]}\nSlurmUser=root\nSlurmdUser=root\n"
        f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={base / 'munge' / 'socket'}\n"
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
        "JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
        "MpiDefault=none\nReturnToService=2\nMailProg=/bin/true\n"
        f"StateSaveLocation={base / 'state'}\nSlurmdSpoolDir={base / 'spool' / '%n'}\n"
        f"SlurmctldPidFile={base / 'slurmctld.pid'}\nSlurmdPidFile={base / 'slurmd-%n.pid'}\n"
        f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}\nSlurmdLogFile={base / 'log' / 'slurmd-%n.log'}\n"
        f"{nodes}PartitionName=check Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every daemon, newest first; SIGKILL what is still there after the grace."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _leftovers(conf: Path) -> list[int]:
    """Processes of this Slurm: every daemon, job step, replica, client and task has its SLURM_CONF."""
    mark = f"SLURM_CONF={conf}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in entry.joinpath("environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def slurm() -> Iterator[Slurm]:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    # Short: the munge socket's path must fit a sockaddr_un.
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"tsslurm-{os.getpid()}-{os.urandom(3).hex()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for d in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (base / d).mkdir(parents=True)
        (base / "munge").chmod(0o755)  # the socket's directory must be reachable
        key = base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ports = free_ports(1 + len(NODES), "127.0.0.1")
        conf = base / "slurm.conf"
        conf.write_text(_config(base, ports))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        for var in [v for v in env if v.startswith(("SLURM_", "SLURMD_", "SBATCH_", "SRUN_"))]:
            if var != "SLURM_CONF":
                del env[var]
        munge = base / "munge"
        daemons = [
            [_daemon("munged"), "-F", "-f", f"--socket={munge / 'socket'}", f"--key-file={key}"]
            + [f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}"]
            + [f"--log-file={base / 'log' / 'munged.log'}"],
            [_daemon("slurmctld"), "-D", "-i"],
            *([_daemon("slurmd"), "-D", "-N", name] for name in NODES),
        ]
        cluster = Slurm(base, env)
        for argv in daemons:
            name = Path(argv[0]).name
            name = name if name != "slurmd" else f"slurmd-{argv[-1]}"
            with open(base / "log" / f"{name}.out", "wb") as out:
                procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base))
            if name == "munged":
                deadline = time.monotonic() + START_TIMEOUT
                while not (munge / "socket").exists():
                    assert procs[-1].poll() is None, cluster.log("munged.out")
                    assert time.monotonic() < deadline, "munged did not create its socket"
                    time.sleep(0.05)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
            if states.count("idle") == len(NODES):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail(f"Slurm did not come up: sinfo {states}; {cluster.log('slurmctld.log')}")
            time.sleep(0.2)
        yield cluster
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=60)
    finally:
        _stop(procs)
        # Job steps end shortly after slurmd; anything still there after the grace is a leak.
        deadline = time.monotonic() + START_TIMEOUT
        while (left := _leftovers(base / "slurm.conf")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
    assert not left, f"processes left behind: {left}"


SEEN = "$DISBATCH_TASKID $DISBATCH_ENGINE_RANK $SLURMD_NODENAME $SLURM_JOB_ID $DISBATCH_CORES_PER_TASK"
TASKS = f"""\
#DISBATCH PREFIX echo "{SEEN}" > out.$DISBATCH_TASKID;
echo first; hostname
exit 3
#DISBATCH REPEAT 6 start 0 sleep 0.2;
"""


def _sbatch(slurm: Slurm, work: Path, *argv: str) -> tuple[str, str]:
    """Submit a job of two nodes, one task each, and wait for its end; its id and ``scontrol show job`` line.

    (Polled here: ``sbatch --wait`` backs off to half a minute between its looks.)
    """
    sub = subprocess.run(
        ["sbatch", "--parsable", "-N", str(len(NODES)), "-n", str(len(NODES)), "-o", "job.out", *argv],
        env=slurm.env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        shown = slurm.run("scontrol", "show", "job", "-o", job_id).stdout
        state = re.search(r"\bJobState=(\S+)", shown)
        if state is not None and state.group(1) in ENDED:
            return job_id, shown
        assert time.monotonic() < deadline, f"job {job_id} did not end: {shown}"
        time.sleep(0.2)


def _submit(slurm: Slurm, work: Path, command: str) -> tuple[str, str]:
    """:func:`_sbatch` of ``command``, each task with two cores."""
    return _sbatch(slurm, work, "-c", "2", "--wrap", command)


def _job_out(work: Path) -> str:
    return (work / "job.out").read_text() if (work / "job.out").exists() else ""


def _outputs(work: Path) -> dict[int, list[str]]:
    return {int(p.suffix[1:]): p.read_text().split() for p in work.glob("out.*")}


def test_an_sbatch_job_runs_the_task_file_on_both_nodes(slurm: Slurm, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "Tasks").write_text(TASKS)
    # -e: the failed task (exit 3) makes the batch, so the job, exit with 1.
    job_id, shown = _submit(slurm, work, "tasksprint batch -e -p run Tasks")
    out = _job_out(work)
    assert "JobState=FAILED" in shown and " ExitCode=1:0" in shown, f"{shown}\n{out}\n{slurm.log('slurmctld.log')}"
    assert "1 task(s) failed" in out, out
    records = parse_status_file((work / "run_status.txt").read_bytes()).records
    assert all(r.kind is RecordKind.TASK for r in records)
    by_id = {r.task_id: r for r in records}
    assert sorted(by_id) == list(range(8)), out
    assert {i: r.exit_code for i, r in by_id.items()} == {0: 0, 1: 3, **{i: 0 for i in range(2, 8)}}
    assert "first" in by_id[0].out_snippet
    # Every task ran on a node of the job, as Slurm names it, and its SLURMD_NODENAME is that node's
    # (the engine's, not the driver's); the job id is the job's.
    outputs = _outputs(work)
    assert sorted(outputs) == list(range(8))
    for task_id, (tid, rank, node, seen_job, cores) in outputs.items():
        assert (tid, seen_job, cores) == (str(task_id), job_id, "2")
        assert node == by_id[task_id].node and node in NODES
        assert node == NODES[int(rank)]  # engine rank r runs on the job's r-th node
    # The replicas were spread over both nodes: the one on n2 started there as a job step, listening on
    # n2's NodeAddr (a name Slurm knows but this machine does not resolve) and took part in the run.
    run_dir = work / "run_tasksprint"
    info = (run_dir / "run.json").read_text()
    # One task at a time per node, of two cores (sbatch -n 2 -c 2), as disBatch would run them.
    assert '"engines": [[0, "n1", 1], [1, "n2", 1]]' in info, info
    assert '"replica_hosts": ["n1", "n2", "n1"]' in info and '"peers": "127.0.0.1:' in info
    replica_log = (run_dir / "replica1.log").read_text()
    assert '"event": "computation_finished"' in replica_log, replica_log[-2000:]
    # At the end it was sent SIGTERM through Slurm (srun would have had it killed) and closed its log.
    assert '"event": "replica_stopping"' in replica_log and '"event": "storage_closed"' in replica_log


def test_the_same_task_file_under_disbatch_gives_the_same_tasks(slurm: Slurm, tmp_path: Path) -> None:
    disbatch = shutil.which("disbatch", path=str(Path(sys.executable).parent)) or shutil.which("disbatch")
    if disbatch is None:
        pytest.skip("disbatch is not installed (pip install -e '.[bench]')")
    results = {}
    for tool, command in (("tasksprint", "tasksprint batch -p run Tasks"), ("disbatch", f"{disbatch} -p run Tasks")):
        work = tmp_path / tool
        work.mkdir()
        (work / "Tasks").write_text(TASKS)
        _, shown = _submit(slurm, work, command)
        assert "JobState=COMPLETED" in shown, shown + _job_out(work)
        records = parse_status_file((work / "run_status.txt").read_bytes()).records
        results[tool] = sorted((r.task_id, r.line, r.repeat_index, r.exit_code, r.command) for r in records)
        assert {r.node for r in records} <= set(NODES), tool
        assert sorted(_outputs(work)) == list(range(8)), tool
    assert results["tasksprint"] == results["disbatch"]


RETIRE_JOB = """\
#!/bin/sh
tasksprint batch --replicas 1 --loglevel INFO --logfile batch.log -p run Tasks &
batch=$!
# Once an engine is retired (bounded: 1,200 tries), the job as Slurm shows it; then the task may end.
n=0
until grep -q "retired engines" batch.log 2>/dev/null || [ $n -ge 1200 ] || ! kill -0 $batch 2>/dev/null; do
    n=$((n + 1))
    sleep 0.1
done
scontrol show job -o "$SLURM_JOB_ID" > after.txt
touch go
wait $batch
echo "batch exit $?"
"""


def test_the_idle_node_is_released_with_scontrol_update(slurm: Slurm, tmp_path: Path) -> None:
    # One task, two engines: the other engine is idle for good at once and is retired with disBatch's
    # default command, which keeps the driver's node and the nodes still in use.
    work = tmp_path / "work"
    work.mkdir()
    (work / "Tasks").write_text("while [ ! -e go ]; do sleep 0.05; done\n")
    (work / "job.sh").write_text(RETIRE_JOB)
    _, shown = _sbatch(slurm, work, "job.sh")
    out = _job_out(work)
    assert "JobState=COMPLETED" in shown and "batch exit 0" in out, shown + out
    (record,) = parse_status_file((work / "run_status.txt").read_bytes()).records
    assert record.exit_code == 0 and record.node in NODES
    log = (work / "batch.log").read_text()
    idle = 1 - NODES.index(record.node)
    after = (work / "after.txt").read_text()
    if record.node == "n1":
        # The task on the driver's node: n2 is released with scontrol update and the job shrinks to n1.
        assert f"retiring engines [{idle}]" in log and f"retired engines [{idle}]" in log, log
        assert "NodeList=n1 " in after, after
    else:
        # The task on n2: the idle engine was on the driver's node, which the job keeps, as it keeps n2,
        # so there is nothing to release and no scontrol update.
        assert f"retired engines [{idle}]: the job keeps all its nodes" in log, log
        assert "retiring engines" not in log and "NodeList=n[1-2] " in after, after


def test_engines_join_a_run_when_its_dbutil_is_submitted_with_sbatch(slurm: Slurm, tmp_path: Path) -> None:
    # disBatch's -S: the run starts with no engines; `sbatch run_dbUtil.sh` gives it the job's nodes,
    # and that job lasts until the run has ended.
    work = tmp_path / "work"
    work.mkdir()
    (work / "Tasks").write_text("#DISBATCH REPEAT 4 start 0 echo $DISBATCH_REPEAT_INDEX\n")
    driver = subprocess.Popen(
        [sys.executable, "-m", "tasksprint.cli", "batch", "-S", "-p", "run", "Tasks"],
        cwd=work,
        env=slurm.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (work / "run_dbUtil.sh").exists():
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no run_dbUtil.sh"
            time.sleep(0.05)
        _, shown = _sbatch(slurm, work, "run_dbUtil.sh")
        _, err = driver.communicate(timeout=JOB_TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGINT)  # the driver stops its replicas then
            try:
                driver.wait(30)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
    out = _job_out(work)
    assert driver.returncode == 0, err.decode()
    assert "JobState=COMPLETED" in shown and "joined run" in out, shown + out
    records = parse_status_file((work / "run_status.txt").read_bytes()).records
    assert sorted((r.task_id, r.exit_code) for r in records) == [(i, 0) for i in range(4)]
    assert {r.node for r in records} <= set(NODES)
    assert '"engines": [[0, "n1", 1], [1, "n2", 1]]' in (work / "run_tasksprint" / "run.json").read_text()


ATTACH_JOB = """\
#!/bin/sh
tasksprint batch -p run Tasks 2> driver.err &
driver=$!
# The driver dies (SIGKILL) once a task finished (bounded: 1,200 tries); its replicas and clients go on.
n=0
until [ -s run_status.txt ] || [ $n -ge 1200 ]; do
    n=$((n + 1))
    sleep 0.1
done
kill -KILL $driver
wait $driver
tasksprint batch --attach run
echo "attach exit $?"
"""


def test_a_driver_killed_in_the_job_is_replaced_by_attach(slurm: Slurm, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "Tasks").write_text("#DISBATCH REPEAT 8 start 0 sleep 0.3; echo $DISBATCH_REPEAT_INDEX\n")
    (work / "job.sh").write_text(ATTACH_JOB)
    _, shown = _sbatch(slurm, work, "job.sh")
    out = _job_out(work)
    assert "JobState=COMPLETED" in shown and "attach exit 0" in out, shown + out
    # Rebuilt from the log: every task once, none run twice.
    records = parse_status_file((work / "run_status.txt").read_bytes()).records
    assert sorted(r.task_id for r in records) == list(range(8))
    assert all(r.exit_code == 0 and r.node in NODES for r in records)
    # The reattached driver stopped the replica on n2 in order too, through Slurm.
    replica_log = (work / "run_tasksprint" / "replica1.log").read_text()
    assert '"event": "replica_stopping"' in replica_log, replica_log[-2000:]
