"""Fixtures shared by the test modules.

Keep these generic: a fixture here is for any test that needs it, and
everything a fixture starts it also stops and reaps, whatever the test did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasksprint.localcluster import LocalCluster

# Lines of each replica's log shown in the report of a failed test.
LOG_TAIL_LINES = 60


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: starts real processes and takes seconds; deselect with -m 'not slow'",
    )


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
