"""``wait_exit``: waiting for a local cluster's processes as ``Popen.wait`` does, without its polling."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasksprint.localcluster import wait_exit


def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_returns_the_exit_code_once_the_process_exits() -> None:
    proc = _python("import sys, time; time.sleep(0.2); sys.exit(3)")
    assert wait_exit(proc, 60) == 3
    assert proc.returncode == 3


def test_a_process_still_running_at_the_timeout_raises_as_popen_wait_does() -> None:
    proc = _python("import time; time.sleep(60)")
    try:
        with pytest.raises(subprocess.TimeoutExpired) as raised:
            wait_exit(proc, 0.05)
        assert raised.value.timeout == 0.05
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_process_already_reaped_gives_its_code() -> None:
    proc = _python("import sys; sys.exit(5)")
    proc.wait()
    assert wait_exit(proc, 60) == 5


def test_a_process_killed_by_a_signal_gives_the_negative_signal() -> None:
    proc = _python("import time; time.sleep(60)")
    proc.kill()
    assert wait_exit(proc, 60) == -9
