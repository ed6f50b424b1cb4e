"""The leak detector the suites share (jepsen.harness.leaks) and the
fixture every test runs under (tests/conftest.py: no_leaks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jepsen.harness import leaks

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_a_child_is_a_descendant_and_carries_the_marker(tmp_path: Path) -> None:
    env = {**os.environ, "LEAKS_TEST_MARK": str(tmp_path)}
    proc = subprocess.Popen(SLEEPER, env=env, start_new_session=True)
    try:
        assert proc.pid in leaks.descendants()
        assert leaks.marked("LEAKS_TEST_MARK", str(tmp_path)) == {proc.pid}
        assert leaks.marked("LEAKS_TEST_MARK", str(tmp_path)[:-1], prefix=True) == {proc.pid}
        assert leaks.marked("LEAKS_TEST_MARK", str(tmp_path)[:-1]) == set()
        assert leaks.has_children()
        assert "time.sleep(600)" in leaks.describe(proc.pid)
    finally:
        leaks.kill([proc.pid])
        proc.wait()
    assert not leaks.alive(proc.pid)
    assert proc.pid not in leaks.descendants()


def test_an_orphan_is_found_by_its_marker_only(tmp_path: Path) -> None:
    # The middle process starts a sleeper in a new session and exits: the
    # sleeper is re-parented away from this process.
    env = {**os.environ, "LEAKS_TEST_MARK": str(tmp_path)}
    starter = (
        "import subprocess, sys; "
        f"p = subprocess.Popen({SLEEPER!r}, "
        "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
    )
    out = subprocess.run([sys.executable, "-c", starter], env=env, capture_output=True, text=True, check=True)
    orphan = int(out.stdout)
    try:
        assert leaks.marked("LEAKS_TEST_MARK", str(tmp_path)) == {orphan}
    finally:
        leaks.kill([orphan])


def test_namespace_names_follow_the_harness_rule() -> None:
    assert leaks.namespace_owner("tsj-1234-r0") == 1234
    assert leaks.namespace_owner("tsj-run") is None
    assert leaks.namespace_owner("other-1234-r0") is None


def _run_inner(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run one test file under this suite's conftest, in a pytest of its own."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "conftest",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_fixture_fails_a_test_that_leaves_a_process_and_kills_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    res = _run_inner(
        tmp_path,
        f"""
        import subprocess, sys
        def test_leaky():
            p = subprocess.Popen({SLEEPER!r}, start_new_session=True)
            open({str(pidfile)!r}, "w").write(str(p.pid))
        """,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "process left running" in res.stdout and "time.sleep(600)" in res.stdout, res.stdout
    assert not leaks.alive(int(pidfile.read_text()))


def test_the_fixture_passes_a_test_that_stops_what_it_started(tmp_path: Path) -> None:
    res = _run_inner(
        tmp_path,
        f"""
        import subprocess
        def test_tidy():
            p = subprocess.Popen({SLEEPER!r}, start_new_session=True)
            p.kill()
            p.wait()
        def test_no_process():
            assert True
        """,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_no_children_without_starting_any() -> None:
    # Whatever earlier tests started has been stopped and reaped by now.
    assert leaks.descendants() == set()
