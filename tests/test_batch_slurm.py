"""Under Slurm: the allocation as engines, where the replicas go, which idle engines retire (no Slurm needed).

The decisions are pure (tasksprint.batch.slurm); the retire command itself is
run end to end with ``--retire-cmd`` on this machine, as Slurm would run
disBatch's ``scontrol update``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasksprint.batch.slurm import (
    DEFAULT_RETIRE_COMMAND,
    engines_to_retire,
    node_addresses,
    replica_hosts,
    retire_environment,
    slurm_counts,
    slurm_nodes,
    slurm_slots,
)

# Bounds every wait (the run itself takes seconds); not a measurement.
RUN_TIMEOUT = 180.0


def test_slurm_allocations_become_engines() -> None:
    assert slurm_counts("16(x2),8") == [16, 16, 8]
    assert slurm_counts("4") == [4]
    env = {"SLURM_JOB_CPUS_PER_NODE": "16(x2),8"}
    assert slurm_nodes(env, ["a", "b", "c"]) == [("a", 16), ("b", 16), ("c", 8)]
    assert slurm_nodes({"SLURM_JOB_CPUS_PER_NODE": "4"}, ["a", "b"]) == [("a", 4), ("b", 4)]
    for bad in ("16(x", "x", "1" * 50, "-3"):
        with pytest.raises(ValueError, match="not a Slurm count"):
            slurm_counts(bad)
    with pytest.raises(ValueError, match="disagree|gives 3 nodes"):
        slurm_nodes(env, ["a"])


def test_slots_per_node_follow_the_jobs_tasks_as_disbatchs_do() -> None:
    # sbatch -n 20 -c 4 given two 80-core nodes: 10 tasks at once on each (as the job asked), not 80 // 4.
    job = {"SLURM_TASKS_PER_NODE": "10(x2)", "SLURM_CPUS_PER_TASK": "4"}
    assert slurm_slots(job, [80, 80], cpus_per_task=None, tasks_per_node=None) == [10, 10]
    # At most cores // cores per task: -c (ours) first, else the job's -c, else 1.
    assert slurm_slots(job, [40, 24], cpus_per_task=None, tasks_per_node=None) == [10, 6]
    assert slurm_slots(job, [40, 40], cpus_per_task=8, tasks_per_node=None) == [5, 5]
    assert slurm_slots({"SLURM_TASKS_PER_NODE": "3,1"}, [2, 2], cpus_per_task=None, tasks_per_node=None) == [2, 1]
    assert slurm_slots({"SLURM_TASKS_PER_NODE": "2"}, [4, 4], cpus_per_task=0.5, tasks_per_node=None) == [2, 2]
    # -t, else the job's --ntasks-per-node, wins.
    assert slurm_slots(job, [40, 40], cpus_per_task=None, tasks_per_node=3) == [3, 3]
    assert slurm_slots({**job, "SLURM_NTASKS_PER_NODE": "7"}, [40, 40], cpus_per_task=None, tasks_per_node=None) == [
        7,
        7,
    ]
    # Without the job's tasks per node: cores // cores per task.
    assert slurm_slots({}, [16, 8], cpus_per_task=None, tasks_per_node=None) == [16, 8]
    for bad in ({"SLURM_TASKS_PER_NODE": "2(x"}, {"SLURM_CPUS_PER_TASK": "four"}, {"SLURM_TASKS_PER_NODE": "1(x3)"}):
        with pytest.raises(ValueError):
            slurm_slots(bad, [4, 4], cpus_per_task=None, tasks_per_node=None)


def test_node_addresses_come_from_scontrol_show_node() -> None:
    shown = (
        "NodeName=n1 Arch=x86_64 CoresPerSocket=1  NodeAddr=10.1.0.7 NodeHostName=c7 OS=Linux 6.1 #1 SMP  State=IDLE\n"
        "NodeName=n2 Arch=x86_64 NodeAddr=n2 NodeHostName=n2\n"
        "NodeName=n3 Arch=x86_64\n"  # no address: left out (the caller uses the name)
        f"NodeName=n4 NodeAddr=10.1.0.9 {'x' * 20000}\n"  # not scontrol's: left out
        "garbage\n"
    )
    assert node_addresses(shown) == {"n1": "10.1.0.7", "n2": "n2"}
    assert node_addresses("") == {}


def test_under_slurm_a_task_gets_its_engines_node_not_the_drivers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasksprint.batch_run import env_file

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    env_file(tmp_path / "env.sh", {0: "n1", 1: "n2"})
    text = (tmp_path / "env.sh").read_text()
    assert "SLURM_JOB_ID=7" in text and "SLURM_NODEID" not in text and "SLURM_STEP_ID" not in text
    for client, node in (("engine1", "n2"), ("engine0", "n1"), ("other", "")):
        shown = subprocess.run(
            ["bash", "-c", f'. {tmp_path / "env.sh"}; printf %s "$SLURMD_NODENAME"'],
            env={"PATH": os.environ["PATH"], "TASKSPRINT_CLIENT": client},
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout == node
    # Not under Slurm: the environment is passed on as it is.
    env_file(tmp_path / "plain.sh")
    assert "export SLURMD_NODENAME=n1" in (tmp_path / "plain.sh").read_text()


def test_replicas_spread_over_up_to_three_nodes_the_drivers_first() -> None:
    assert replica_hosts(["n1", "n2", "n3", "n4"], 3, "n2.cluster.org") == ["n2", "n1", "n3"]
    assert replica_hosts(["n1", "n2"], 3, "n1") == ["n1", "n2", "n1"]
    assert replica_hosts(["n1"], 3, "n1") == ["n1", "n1", "n1"]
    # Five replicas on three nodes: no node holds more than two (a majority survives losing any one).
    five = replica_hosts(["n1", "n2", "n3", "n4"], 5, "elsewhere")
    assert five == ["n1", "n2", "n3", "n1", "n2"] and max(five.count(n) for n in set(five)) == 2
    with pytest.raises(ValueError):
        replica_hosts([], 3, "n1")


def test_only_engines_idle_for_good_retire() -> None:
    drained = {"busy": ["engine1", "engine2"], "unplaced": 0}
    assert engines_to_retire(drained, [0, 1, 2, 3, 4], retired=[3]) == [0, 4]
    # A task may still start or PERENGINE STOP is due (None), or a task waits to be placed on any engine.
    assert engines_to_retire(None, [0, 1], []) == []
    assert engines_to_retire({"busy": [], "unplaced": 1}, [0, 1], []) == []
    for bad in ({}, {"busy": "engine0", "unplaced": 0}, {"busy": [], "unplaced": "0"}):
        assert engines_to_retire(bad, [0], []) == []


def test_the_retire_environment_is_disbatchs() -> None:
    engines = {0: "n1", 1: "n2", 2: "n3", 3: "n4", 4: "n4"}
    env = retire_environment(["n3"], [0], engines, live_ranks=[0, 1, 4], keep=["n1", "n2"], driver="n1")
    assert env == {"NODES": "n3", "RETCODES": "0", "ACTIVE": "n2,n4", "RETIRED": "n3", "DRIVER_NODE": "n1"}
    # A replica's node stays active with no engine left there; the driver off the allocation is not named.
    env = retire_environment(["n2", "n4"], [0, 143], engines, live_ranks=[], keep=["n2"], driver="login")
    assert env == {"NODES": "n2,n4", "RETCODES": "0,143", "ACTIVE": "n2", "RETIRED": "n1,n3,n4", "DRIVER_NODE": ""}
    assert "scontrol update" in DEFAULT_RETIRE_COMMAND and "$ACTIVE" in DEFAULT_RETIRE_COMMAND


def _args(*argv: str) -> argparse.Namespace:
    from tasksprint.batch_command import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([*argv, "Tasks"])


def test_retire_and_replica_options_under_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tasksprint.batch_command import _retire_command, prepare

    monkeypatch.chdir(tmp_path)
    assert _retire_command(_args()) == ""  # not under Slurm: nothing is released
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-4]")
    monkeypatch.setenv("SLURM_JOB_CPUS_PER_NODE", "2(x4)")
    monkeypatch.delenv("DISBATCH_SSH_NODELIST", raising=False)
    assert _retire_command(_args()) == DEFAULT_RETIRE_COMMAND
    assert _retire_command(_args("--no-retire")) == ""
    assert _retire_command(_args("--retire-cmd", "echo $NODES")) == "echo $NODES"
    # The allocation as scontrol expands it (a stand-in on PATH: there is no Slurm here).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'n1\\nn2\\nn3\\nn4\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr("socket.gethostname", lambda: "n2")
    prepared = prepare(_args(), b"true\n")
    assert [host for _, host, _ in prepared.engines] == ["n1", "n2", "n3", "n4"]
    assert prepared.run.replica_hosts == ["n2", "n1", "n3"]
    assert prepare(_args("--replica-host", "10.0.0.2"), b"true\n").run.replica_hosts == []


def test_an_idle_engine_is_retired_with_the_retire_command(tmp_path: Path) -> None:
    # Two engines of one slot; one task waits for a file the test writes once an engine was retired,
    # so the other engine is idle for good while the run still goes on.
    (tmp_path / "Tasks").write_text("true\nwhile [ ! -e go ]; do sleep 0.05; done\n")
    retire = 'echo "$NODES|$RETCODES|$ACTIVE|$RETIRED|$DRIVER_NODE" >> retired.txt'
    driver = subprocess.Popen(
        [sys.executable, "-m", "tasksprint.cli", "batch", "-s", "localhost:1,localhost:1", "-p", "rt"]
        + ["--retire-cmd", retire, "Tasks"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (tmp_path / "retired.txt").exists():
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no engine was retired"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        _, err = driver.communicate(timeout=RUN_TIMEOUT)
        assert driver.returncode == 0, err.decode()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    (line,) = (tmp_path / "retired.txt").read_text().splitlines()
    # NODES|RETCODES|ACTIVE|RETIRED|DRIVER_NODE: the retired engine's client was stopped (its exit code
    # is reported as disBatch reports an engine's); the other engine's node stays active.
    nodes, code, active, retired, driver_node = line.split("|")
    assert (nodes, active, retired, driver_node) == ("localhost", "localhost", "", "") and code.lstrip("-").isdigit()
    status = (tmp_path / "rt_status.txt").read_text().splitlines()
    assert len(status) == 2


def test_replicas_on_other_nodes_start_as_job_steps_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasksprint.batch_run import _Cluster

    monkeypatch.setattr("socket.gethostname", lambda: "n2.cluster.org")
    cluster = _Cluster(tmp_path, 3, hosts=["n2", "n1", "n3"])
    assert [host for host, _ in cluster.addrs] == ["n2", "n1", "n3"]
    assert cluster.command(0)[:2] == [sys.executable, "-m"]  # the driver's node: started here
    step = cluster.command(1)
    assert step[:5] == ["srun", "--nodes=1", "--ntasks=1", "--overlap", "--nodelist=n1"]
    assert step[5] == f"--job-name={tmp_path.name}.replica1"  # the step's name: how it is sent SIGTERM
    assert step[step.index("--peers") + 1] == cluster.peers_arg and cluster.peers_arg.startswith("n2:")
    # Without hosts (not under Slurm), every replica listens on the one address, here.
    plain = _Cluster(tmp_path / "plain", 3)
    assert {host for host, _ in plain.addrs} == {"127.0.0.1"} and plain.command(2)[0] == sys.executable


def test_a_driver_whose_replicas_exited_says_why_instead_of_waiting(tmp_path: Path) -> None:
    # As when the replicas' node names do not resolve: they exit at once, and no replica will ever answer.
    from tasksprint.batch_run import BatchRun, _Cluster

    run = BatchRun(str(tmp_path / "r"))
    run.run_dir.mkdir()
    cluster = _Cluster(run.run_dir, 3)
    run.cluster = cluster
    (run.run_dir / "replica1.log").write_text("starting\nreplica 1 cannot listen on n2:5 (its entry in --peers)\n")
    alive = subprocess.Popen(["sleep", "60"])
    try:
        exited = [subprocess.Popen(["sh", "-c", "exit 2"]) for _ in range(2)]
        for p in exited:
            p.wait()
        cluster.procs = [alive, exited[0], alive]
        assert run.replicas_lost() is None  # one of three: a majority is still there
        cluster.procs = [alive, *exited]
        lost = run.replicas_lost()
        assert lost is not None and lost.startswith("2 of 3 replicas exited")
        assert lost.endswith("replica1.log ends: replica 1 cannot listen on n2:5 (its entry in --peers)")
    finally:
        alive.kill()
        alive.wait()
    assert BatchRun(str(tmp_path / "reattached")).replicas_lost() is None  # started none: cannot tell


async def test_the_default_retire_command_runs_only_when_the_job_would_shrink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasksprint.batch_retire import Retirer

    # A stand-in scontrol that notes its arguments (there is no Slurm job here).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOBID", "7")
    logged: list[str] = []
    retirer = Retirer(
        command=DEFAULT_RETIRE_COMMAND,
        engine_nodes={0: "n1", 1: "n2", 2: "n3"},
        keep=["n1"],
        driver="n1",
        stop_engine=lambda rank: 0,
        log=lambda level, message: logged.append(message),
    )
    # The driver's engine goes idle: its node stays (the driver's), so the job would keep every node.
    assert await retirer.check({"retire": {"busy": ["engine1", "engine2"], "unplaced": 0}}) == [0]
    assert not (tmp_path / "calls").exists() and "no scontrol update" in logged[-1]
    # n3's engine: the job shrinks to n1 and n2.
    assert await retirer.check({"retire": {"busy": ["engine1"], "unplaced": 0}}) == [2]
    assert (tmp_path / "calls").read_text() == "update JobId=7 NodeList=n1,n2\n"
    # n2's: to n1 alone; then nothing is left to retire and nothing runs again.
    assert await retirer.check({"retire": {"busy": [], "unplaced": 0}}) == [1]
    assert await retirer.check({"retire": {"busy": [], "unplaced": 0}}) == []
    # ("n1,": disBatch's command as it is; scontrol takes it, as the real-Slurm test shows.)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["update JobId=7 NodeList=n1,n2", "update JobId=7 NodeList=n1,"]
    # Any other command runs every time (it may do more than resize the job).
    other = Retirer(
        command=f"echo $NODES >> {tmp_path / 'other'}",
        engine_nodes={0: "n1", 1: "n2"},
        keep=["n1"],
        driver="n1",
        stop_engine=lambda rank: 0,
        log=lambda level, message: None,
    )
    assert await other.check({"retire": {"busy": ["engine1"], "unplaced": 0}}) == [0]
    assert (tmp_path / "other").read_text() == "n1\n"
