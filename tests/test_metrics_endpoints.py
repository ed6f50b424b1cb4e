"""``/metrics`` served by replica and client processes themselves (``--http``, ``--metrics``).

Real processes on loopback: three replicas started with ``--http`` and two
worker clients with ``--metrics``, running gated tasks and a reduce that
reads all of them.  Every exposition is parsed with prometheus-client's own
parser and its figures checked against the cluster's state: tasks by state
against the computation's status, applied index against each replica's own
answer, one task-duration sample per task run, fetches for the reduce.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tasksprint.channel import ReplicaChannel
from tasksprint.localcluster import free_ports
from tests.monitor_cluster import gated_run, get, open_gate, open_reduce_gate, wait_for, wait_status

TASKS = 4


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, /, **labels: str) -> tuple[str, frozenset]:
    return (name, frozenset(labels.items()))


def total(got: dict[tuple[str, frozenset], float], name: str) -> float:
    """The sum of every sample named ``name`` (over all label sets)."""
    return sum(v for (n, _), v in got.items() if n == name)


# Client 1 serves its metrics behind HTTP basic authentication (--http-auth-file).
AUTH = ("prom", "s3cret")
AUTH_HEADER = {"Authorization": "Basic " + base64.b64encode(":".join(AUTH).encode()).decode()}


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    code, body = trio.run(lambda: get(url, headers=headers or {}))
    assert code == 200, (url, code, body[:500])
    return samples(body)


def try_scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float] | None:
    """As :func:`scrape`, None while nothing listens there yet (the server starts after the replica)."""
    try:
        return scrape(url, headers)
    except urllib.error.URLError:
        return None


@pytest.mark.slow
def test_replicas_and_clients_serve_their_own_metrics(tmp_path: Path) -> None:
    ports = free_ports(5)
    rports, cports = ports[:3], ports[3:]
    auth_file = tmp_path / "metrics-auth"
    auth_file.write_text(":".join(AUTH) + "\n")
    extra = [["--have", "gpu", "--have", "big-memory"], ["--http-auth-file", str(auth_file)]]
    with gated_run(
        tmp_path / "run",
        TASKS,
        clients=2,
        slots=2,
        reduce=True,
        replica_args=lambda i: ["--http", f"127.0.0.1:{rports[i]}"],
        # No queue beyond the slots: the gated tasks spread over both clients, so the reduce fetches.
        client_args=lambda i: ["--metrics", f"127.0.0.1:{cports[i]}", "--queue", "0", *extra[i]],
    ) as run:
        cluster = run.cluster
        assert cluster is not None
        rurls = [f"http://127.0.0.1:{p}/metrics" for p in rports]
        curls = [f"http://127.0.0.1:{p}/metrics" for p in cports]

        # While gated: every task created, none done; the replicas wrote (fsync) and chose a leader.
        def gated_seen() -> dict | None:
            got = try_scrape(rurls[0])
            running = got and got.get(key("tasksprint_tasks", state="running"), 0)
            return got if running >= TASKS else None  # the reduce may be placed early, waiting for inputs

        got = wait_for(gated_seen, "the gated tasks running, as replica 0's /metrics says")
        assert got[key("tasksprint_tasks", state="done")] == 0
        assert got[key("tasksprint_tasks_total_created")] == TASKS + 1
        for url in rurls:
            got = wait_for(lambda url=url: try_scrape(url), f"{url} answering")
            assert got[key("tasksprint_fsync_seconds_count", role="replica")] >= 1
            assert got[key("tasksprint_leader_changes_total", role="replica")] >= 1
            assert got[key("process_resident_memory_bytes")] > 0

        async def own_status() -> list:
            channel = ReplicaChannel(cluster.addrs, cluster.secret)
            try:
                return [await channel.status(a) for a in cluster.addrs]
            finally:
                await channel.aclose()

        # The status answer: each replica's fsync latency; each client's memory and last contact.
        status = trio.run(wait_status, cluster, lambda st: all(c.rss_bytes for c in st.live_clients))
        assert len(status.live_clients) == 2
        assert sorted(c.tags for c in status.live_clients) == [(), ("big-memory", "gpu")]
        for c in status.live_clients:
            assert c.rss_bytes is not None and c.rss_bytes > 0
            assert c.heard_s is not None and c.heard_s >= 0
            assert c.cpu_percent is None or c.cpu_percent >= 0
        assert all(st.fsync_samples >= 1 and st.fsync_p50_ms is not None for st in trio.run(own_status))
        got = wait_for(
            lambda: (g := scrape(rurls[0])) and total(g, "tasksprint_client_resident_bytes") > 0 and g,
            "the clients' memory in replica 0's /metrics",
        )
        assert len([k for k in got if k[0] == "tasksprint_client_resident_bytes"]) == 2
        # And tasksprint status prints them.
        shown = subprocess.run(
            [sys.executable, "-m", "tasksprint.cli", "status", "--coordinators", cluster.peers_arg]
            + ["--secret-file", str(cluster.secret_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count(" fsync p50=") == 3, shown.stdout
        assert (
            len(
                re.findall(
                    r"client \d client\d slots=2(?: tags=big-memory,gpu)? running=\d+ .*rss=\d+MiB heard", shown.stdout
                )
            )
            == 2
        )

        open_gate(run)

        # Clients, while the reduce waits for its gate (they exit once the computation ends): one
        # task-duration sample per gated task, and the reduce's fetches from the other client.
        def fetched() -> list | None:
            clients = [try_scrape(curls[0]) or {}, try_scrape(curls[1], AUTH_HEADER) or {}]
            return clients if sum(total(c, "tasksprint_fetch_bytes_total") for c in clients) > 0 else None

        clients = wait_for(fetched, "the reduce's inputs fetched, as the clients' /metrics say")
        assert sum(total(c, "tasksprint_fetch_seconds_count") for c in clients) >= 1
        assert sum(c[key("tasksprint_task_seconds_count", role="client")] for c in clients) == TASKS
        assert all(c[key("tasksprint_node_restarts_total", role="client")] == 0 for c in clients)
        assert all(c[key("process_resident_memory_bytes")] > 0 for c in clients)
        assert trio.run(get, curls[1])[0] == 401  # without the credentials
        wrong = {"Authorization": "Basic " + base64.b64encode(b"prom:guess").decode()}
        assert trio.run(lambda: get(curls[1], headers=wrong))[0] == 401
        # A replica's --http serves the dashboard too: the page and its JSON.
        code, page = trio.run(get, f"http://127.0.0.1:{rports[0]}/")
        assert code == 200 and "<title>TaskSprint dashboard</title>" in page
        code, body = trio.run(get, f"http://127.0.0.1:{rports[0]}/api/graph")
        assert code == 200 and json.loads(body)["total"] == TASKS + 1
        open_reduce_gate(run)
        trio.run(wait_status, cluster, lambda st: st.state == "finished")

        statuses = trio.run(own_status)
        leader = statuses[0].leader
        assert leader is not None

        def finished_seen(url: str) -> dict | None:
            got = scrape(url)
            return got if got.get(key("tasksprint_tasks", state="done")) == TASKS + 1 else None

        for i, url in enumerate(rurls):
            got = wait_for(lambda url=url: finished_seen(url), f"replica {i}'s /metrics showing every task done")
            assert got[key("tasksprint_tasks", state="pending")] == 0
            assert got[key("tasksprint_tasks", state="failed")] == 0
            # Each replica's own applied index, as its dashboard polled it, is no more than it says now.
            labels = {"replica": str(i), "address": "%s:%d" % cluster.addrs[i]}
            assert 0 < got[key("tasksprint_replica_applied_index", **labels)] <= trio.run(own_status)[i].applied
        # The clients' commands (join, reports) were submitted to some replica: counted and timed there.
        everyone = [scrape(url) for url in rurls]
        submitted = sum(g[key("tasksprint_proposals_total", role="replica")] for g in everyone)
        assert submitted >= 3  # two joins, and at least one report of completed tasks
        assert sum(g[key("tasksprint_proposal_bytes_total", role="replica")] for g in everyone) > 0
        assert sum(g[key("tasksprint_commit_seconds_count", role="replica")] for g in everyone) >= 1


def test_a_non_loopback_http_address_needs_credentials(tmp_path: Path) -> None:
    data = tmp_path / "r0"
    data.mkdir()
    base = [sys.executable, "-m", "tasksprint.cli"]
    replica = [*base, "replica", "--id", "0", "--peers", "127.0.0.1:1", "--data", str(data)]
    client = [*base, "client", "--coordinators", "127.0.0.1:1"]
    for cmd, flag in ((replica, "--http"), (client, "--metrics")):
        done = subprocess.run([*cmd, flag, "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "not a loopback address" in done.stderr and "--http-auth-file" in done.stderr
        done = subprocess.run([*cmd, flag, "nonsense"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "expected HOST:PORT" in done.stderr, done.stderr
    auth = tmp_path / "auth"
    auth.write_text("no colon here\n")
    done = subprocess.run(
        [*replica, "--http", "0.0.0.0:0", "--http-auth-file", str(auth)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "user:password" in done.stderr, done.stderr
