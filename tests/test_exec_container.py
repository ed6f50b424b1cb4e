"""Tasks with an image: docker or podman when one can run containers, else a refusal naming what is missing.

The refusal is tested with the real ``PATH`` lookups: an empty ``PATH`` (no
runtime installed) and, where docker is installed without a reachable
daemon, that case.  The container path runs only where a runtime answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cluster_e2e import tasksprint_command

from tasksprint.exec.container import (
    CONTAINER_WORKDIR,
    ContainerRuntime,
    ContainerUnavailable,
    container_argv,
    find_runtime,
)
from tasksprint.exec.spec import Limits
from tasksprint.execute import KolejkaError, read_task


def _reachable() -> ContainerRuntime | None:
    try:
        return find_runtime()
    except ContainerUnavailable:
        return None


RUNTIME = _reachable()
TASK = {"image": "ubuntu:xenial", "args": ["uname"], "limits": {"memory": "64M", "pids": "16"}, "stdout": "out.txt"}


def _task_dir(tmp_path: Path) -> Path:
    task = tmp_path / "task"
    task.mkdir()
    (task / "kolejka_task.json").write_text(json.dumps(TASK))
    return task


def test_without_any_runtime_the_task_is_refused_naming_both(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    with pytest.raises(ContainerUnavailable, match="docker is not installed; podman is not installed"):
        find_runtime(path=str(empty))
    with pytest.raises(KolejkaError) as refused:
        read_task(
            _task_dir(tmp_path),
            tmp_path / "work",
            ignore_image=False,
            find_container_runtime=lambda: find_runtime(path=str(empty)),
        )
    message = str(refused.value)
    assert "'ubuntu:xenial'" in message and "docker is not installed" in message and "--ignore-image" in message


@pytest.mark.skipif(
    shutil.which("docker") is None or RUNTIME is not None, reason="needs docker installed without a reachable daemon"
)
def test_docker_without_its_daemon_is_refused_saying_so(tmp_path: Path) -> None:
    with pytest.raises(ContainerUnavailable) as refused:
        find_runtime()
    assert "docker is installed" in str(refused.value) and "cannot run containers" in str(refused.value)


def test_ignore_image_runs_on_the_host_without_asking_for_a_runtime(tmp_path: Path) -> None:
    def no_runtime() -> ContainerRuntime:
        raise AssertionError("no runtime is looked for with ignore_image")

    task = read_task(_task_dir(tmp_path), tmp_path / "work", ignore_image=True, find_container_runtime=no_runtime)
    assert task.runtime is None and task.spec.argv == ("uname",)
    assert task.spec.limits.memory_bytes == 64 * 1024 * 1024


def test_the_container_gets_the_limits_the_workdir_and_no_network(tmp_path: Path) -> None:
    runtime = ContainerRuntime("docker", "/usr/bin/docker")
    argv = container_argv(
        runtime,
        image="ubuntu:xenial",
        args=("uname", "-a"),
        workdir=str(tmp_path),
        name="t1",
        limits=Limits(memory_bytes=64 * 1024 * 1024, cpus=1.5, pids=16),
        env=(("A", "b c"),),
    )
    assert argv[:3] == ("/usr/bin/docker", "run", "--rm") and argv[-3:] == ("ubuntu:xenial", "uname", "-a")
    flags = list(argv)
    assert flags[flags.index("--volume") + 1] == f"{tmp_path}:{CONTAINER_WORKDIR}"
    assert flags[flags.index("--memory") + 1] == str(64 * 1024 * 1024)
    assert flags[flags.index("--cpus") + 1] == "1.5" and flags[flags.index("--pids-limit") + 1] == "16"
    assert flags[flags.index("--network") + 1] == "none" and flags[flags.index("--env") + 1] == "A=b c"
    with pytest.raises(ValueError, match="not an image name"):
        container_argv(runtime, image="--privileged", args=("x",), workdir=".", name="t", limits=Limits())


@pytest.mark.slow
@pytest.mark.skipif(RUNTIME is None, reason="no container runtime can run containers here")
def test_the_kolejka_example_runs_in_its_image(tmp_path: Path) -> None:
    result = tmp_path / "result"
    done = subprocess.run(
        [*tasksprint_command(), "execute", str(_task_dir(tmp_path)), str(result), "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    written = json.loads((result / "kolejka_result.json").read_text())
    assert written["result"] == 0 and (result / "out.txt").read_text() == "Linux\n", written
