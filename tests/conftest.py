"""Fixtures shared by the test modules.

Keep these generic: a fixture here is for any test that needs it, and
everything a fixture starts it also stops and reaps, whatever the test did.
Markers are registered in pyproject.toml, nowhere else.

Every test runs under :func:`no_leaks`: a test that started processes must
leave none running (nor a fault-injection network namespace) once its
fixtures are torn down.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jepsen.harness import leaks
from tasksprint import codec
from tasksprint.localcluster import LocalCluster

# Messages a process builds itself skip their validators (codec.trusted);
# under test they run them too, here and in every process a test starts.
os.environ[codec.CHECK_TRUSTED_ENV] = "1"
codec.check_trusted(True)

# Lines of each replica's log shown in the report of a failed test.
LOG_TAIL_LINES = 60

# Every process a test starts inherits LEAK_MARK_ENV=<that test's id>, which
# finds it even after its parent died and it was re-parented to init.
LEAK_MARK_ENV = "TASKSPRINT_TEST_MARK"
# How long processes a test stopped may take to finish exiting before they
# count as left behind (they are then killed, and the test fails).
LEAK_GRACE_SECONDS = 10.0
LEAK_POLL_SECONDS = 0.05


def _children_waited_for() -> int:
    """Page faults of every child this process has reaped: it grows with each child that ran."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a test that leaves processes or ``tsj-`` network namespaces behind.

    Set up before and torn down after every other function-scoped fixture,
    so a fixture that stops its processes has done so when this one looks.
    Only a test that started a process pays for the look (a scan of /proc):
    one that did not has no child now and reaped none.  Leftovers still
    alive LEAK_GRACE_SECONDS later are killed, and listed in the failure.
    """
    mark = f"{os.getpid()}-{request.node.nodeid}"
    monkeypatch.setenv(LEAK_MARK_ENV, mark)
    # Processes of wider-scoped fixtures are not this test's.
    before = leaks.descendants() if leaks.has_children() else set()
    namespaces_before = leaks.namespaces()
    reaped_before = _children_waited_for()
    yield
    if not leaks.has_children() and _children_waited_for() == reaped_before:
        return

    def left() -> set[int]:
        return (leaks.marked(LEAK_MARK_ENV, mark) | leaks.descendants()) - before

    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    pids = left()
    while pids and time.monotonic() < deadline:
        time.sleep(LEAK_POLL_SECONDS)
        pids = left()
    problems = [f"process left running: {leaks.describe(pid)}" for pid in sorted(pids)]
    leaks.kill(pids)
    stale = leaks.stale_namespaces() - namespaces_before
    problems += [f"network namespace left behind: {name}" for name in sorted(stale)]
    if problems:
        pytest.fail("the test left things behind (its processes are now killed):\n" + "\n".join(problems))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    # A failed test that ran replica processes shows what they logged: the
    # assertion says what went wrong, the logs usually say why.
    outcome = yield
    report = outcome.get_result()
    clusters = getattr(item, "_local_clusters", ())
    if report.when == "call" and report.failed:
        for n, cluster in enumerate(clusters):
            report.sections.append((f"cluster{n} replica logs", log_tails(cluster, LOG_TAIL_LINES)))


@pytest.fixture
def local_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """A factory of started :class:`LocalCluster` instances under ``tmp_path``.

    ``local_cluster(replicas=3, **kwargs)`` starts one more cluster (each in
    its own subdirectory; keyword arguments go to LocalCluster) and returns
    it.  At teardown every replica process of every cluster is stopped and
    reaped.  If the test fails, the tail of every replica's log is added to
    its report.
    """
    clusters: list[LocalCluster] = []
    request.node._local_clusters = clusters

    def make(replicas: int = 3, **kwargs: object) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(clusters)}", replicas=replicas, **kwargs)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()


def log_tails(cluster: LocalCluster, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of every replica's log."""
    parts = []
    for i in range(cluster.replicas):
        tail = cluster.logs(i).splitlines()[-lines:]
        parts.append(f"--- replica {i} ---\n" + "\n".join(tail))
    return "\n".join(parts)
