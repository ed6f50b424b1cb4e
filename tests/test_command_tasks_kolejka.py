"""``tasksprint execute``: kolejka's own one-line example runs unchanged on a local cluster."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_cluster_e2e import tasksprint_command

from tasksprint.exec.container import ContainerUnavailable, find_runtime

pytestmark = pytest.mark.slow

# The example of kolejka's README: uname in a container, with limits, stdout collected.
KOLEJKA_TASK = {
    "image": "ubuntu:xenial",
    "args": ["uname"],
    "limits": {"memory": "64M", "cpus": "1", "pids": "16", "time": "1s"},
    "stdout": "stdout.txt",
}


def _execute(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    task, result = tmp_path / "task", tmp_path / "result"
    task.mkdir()
    (task / "kolejka_task.json").write_text(json.dumps(KOLEJKA_TASK))
    # Whatever the run leaves behind, the suite's leak check (no_leaks) finds.
    done = subprocess.run(
        [*tasksprint_command(), "execute", str(task), str(result), "--timeout", "120", *extra],
        capture_output=True,
        text=True,
        timeout=240,
    )
    return done, result


def test_the_kolejka_example_gives_its_documented_result(tmp_path: Path) -> None:
    done, result = _execute(tmp_path, "--ignore-image")
    assert done.returncode == 0, done.stderr
    written = json.loads((result / "kolejka_result.json").read_text())
    assert written["result"] == 0 and written["files"] == ["stdout.txt"], written
    assert written["verdict"] == "ok" and written["stats"]["elapsed_s"] >= 0, written
    assert (result / "stdout.txt").read_text() == "Linux\n"


def _runtime_answers() -> bool:
    try:
        find_runtime()
    except ContainerUnavailable:
        return False
    return True


@pytest.mark.skipif(_runtime_answers(), reason="a container runtime answers here: the image runs")
def test_a_task_with_an_image_is_refused_without_ignore_image(tmp_path: Path) -> None:
    done, result = _execute(tmp_path)
    assert done.returncode == 2 and "--ignore-image" in done.stderr, done.stderr
    assert not result.exists()
