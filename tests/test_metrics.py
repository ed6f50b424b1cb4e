"""Prometheus metrics: the observer's metrics, the cluster collector, ``/metrics`` on a live cluster.

Every exposition is parsed with prometheus-client's own parser; the
cluster's figures are checked against what the replicas answer themselves.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tasksprint.channel import ReplicaChannel
from tasksprint.dashboard.server import Dashboard, build_app, serve_app, serve_metrics
from tasksprint.metrics import ClusterCollector, PrometheusObserver, exposition, observer
from tasksprint.observe import Observer, from_spec
from tasksprint.readmodel import ClientRow, History, Poller, ReplicaRow, Snapshot
from tests.monitor_cluster import gated_run, get, open_gate, wait_status


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, /, **labels: str) -> tuple[str, frozenset]:
    return (name, frozenset(labels.items()))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_observer_is_an_observer_and_named_by_the_environment_spec() -> None:
    obs = from_spec("tasksprint.metrics:observer", "replica")
    assert isinstance(obs, PrometheusObserver) and isinstance(obs, Observer)
    assert obs.role == "replica"


def test_named_hooks_go_to_their_own_metrics_and_others_to_the_generic_families() -> None:
    clock = FakeClock()
    obs = PrometheusObserver("replica", clock=clock)
    obs.timing("storage.fsync", 0.002)
    obs.timing("storage.fsync", 0.004)

    def step(x: int) -> int:
        clock.now += 0.5
        return x + 1

    assert obs.timed("paxos.step", step)(1) == 2
    with obs.span("replica.commit"):
        clock.now += 0.25
    obs.count("node.restart")
    obs.count("fetch.bytes", 1000)
    obs.count("fetch.bytes", 24)
    obs.count("limit.memory")
    obs.count("something.new", 3)
    obs.value("applier.items_per_slot", 7)
    obs.value("other.quantity", 2.5)

    got = samples(exposition(obs.registry).decode())
    assert got[key("tasksprint_fsync_seconds_count", role="replica")] == 2
    assert got[key("tasksprint_fsync_seconds_sum", role="replica")] == pytest.approx(0.006)
    assert got[key("tasksprint_fsync_seconds_bucket", role="replica", le="0.0025")] == 1
    assert got[key("tasksprint_fsync_seconds_bucket", role="replica", le="0.005")] == 2
    assert got[key("tasksprint_span_seconds_sum", role="replica", span="paxos.step")] == pytest.approx(0.5)
    assert got[key("tasksprint_commit_seconds_sum", role="replica")] == pytest.approx(0.25)
    assert got[key("tasksprint_node_restarts_total", role="replica")] == 1
    assert got[key("tasksprint_fetch_bytes_total", role="replica")] == 1024
    assert got[key("tasksprint_limit_verdicts_total", role="replica", verdict="memory")] == 1
    assert got[key("tasksprint_events_total", role="replica", event="something.new")] == 3
    assert got[key("tasksprint_items_per_slot_sum", role="replica")] == 7
    assert got[key("tasksprint_value_sum", role="replica", value="other.quantity")] == 2.5


def test_the_cluster_collector_exports_the_last_snapshot() -> None:
    snap = Snapshot(
        at=10.0,
        replicas=(
            ReplicaRow(address="h:1", up=True, rid=0, role="leader", leader=0, commit=9, applied=9, commit_p50_ms=2.0),
            ReplicaRow(address="h:2", up=True, rid=1, role="follower", leader=0, commit=9, applied=7, lag=2),
            ReplicaRow(address="h:3", up=False),
        ),
        leader=0,
        state="running",
        tasks={"pending": 3, "running": 2, "done": 5, "failed": 0, "killed": 0, "total": 10},
        clients=(
            ClientRow(
                cid=1,
                name="w1",
                addr="h:9",
                slots=4,
                running=2,
                prefetching=0,
                cpu_percent=150.0,
                rss_bytes=1 << 20,
                heard_s=0.5,
            ),
        ),
        dead_clients=1,
    )
    history = History()
    history.add(snap)
    registry = CollectorRegistry()
    registry.register(ClusterCollector(lambda: snap, history))
    got = samples(exposition(registry).decode())
    assert got[key("tasksprint_replica_up", replica="0", address="h:1")] == 1
    assert got[key("tasksprint_replica_up", replica="2", address="h:3")] == 0
    assert got[key("tasksprint_replica_leader", replica="0", address="h:1")] == 1
    assert got[key("tasksprint_replica_applied_index", replica="1", address="h:2")] == 7
    assert got[key("tasksprint_replica_lag", replica="1", address="h:2")] == 2
    assert got[key("tasksprint_replica_commit_latency_seconds", replica="0", address="h:1", quantile="0.5")] == 0.002
    assert got[key("tasksprint_cluster_leader_changes_total")] == 1
    assert got[key("tasksprint_tasks", state="done")] == 5
    assert got[key("tasksprint_tasks", state="pending")] == 3
    assert got[key("tasksprint_clients", alive="false")] == 1
    assert got[key("tasksprint_client_slots", client="1", name="w1")] == 4
    assert got[key("tasksprint_client_cpu_percent", client="1", name="w1")] == 150.0
    assert got[key("tasksprint_client_resident_bytes", client="1", name="w1")] == 1 << 20
    assert got[key("tasksprint_client_last_heard_seconds", client="1", name="w1")] == 0.5


def test_every_metric_the_grafana_dashboard_plots_is_exported() -> None:
    import json
    import re

    obs = PrometheusObserver("replica")
    for name in ("storage.fsync", "replica.commit", "task.run", "fetch"):
        obs.timing(name, 0.01)
    for name in ("paxos.leader_change", "paxos.proposals", "paxos.proposal_bytes", "fetch.bytes", "node.restart"):
        obs.count(name)
    obs.count("limit.memory")
    row = ReplicaRow(address="h:1", up=True, rid=0, role="leader", commit_p50_ms=1.0, fsync_p50_ms=1.0)
    worker = ClientRow(cid=1, name="w", addr="h:9", slots=1, running=0, prefetching=0, cpu_percent=1.0)
    snap = Snapshot(
        at=1.0,
        replicas=(row,),
        leader=0,
        state="running",
        tasks={"done": 1, "total": 1},
        clients=(attrs.evolve(worker, rss_bytes=1, heard_s=0.1),),
    )
    registry = CollectorRegistry()
    registry.register(ClusterCollector(lambda: snap, History()))
    exported = {name for name, _ in samples(exposition(registry).decode() + exposition(obs.registry).decode())}
    plotted = set()
    for panel in json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())["panels"]:
        for target in panel.get("targets", ()):
            plotted.update(re.findall(r"\btasksprint_[a-z_]+", target["expr"]))
    assert plotted and plotted <= exported, plotted - exported


async def test_serve_metrics_serves_an_observers_registry_over_http() -> None:
    obs = observer("client")
    obs.count("node.restart", 2)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, "127.0.0.1", 0, obs.registry)
        code, body = await get(f"http://127.0.0.1:{port}/metrics")
        nursery.cancel_scope.cancel()
    assert code == 200
    assert samples(body)[key("tasksprint_node_restarts_total", role="client")] == 2


@pytest.mark.slow
def test_metrics_of_a_live_cluster_agree_with_the_replicas(tmp_path: Path) -> None:
    tasks = 6
    with gated_run(tmp_path / "run", tasks) as run:
        cluster = run.cluster
        assert cluster is not None

        async def scrape_and_compare() -> None:
            poller = Poller(cluster.addrs, cluster.secret)
            dashboard = Dashboard(poller)
            registry = CollectorRegistry()
            registry.register(ClusterCollector(lambda: dashboard.latest, dashboard.history))
            channel = ReplicaChannel(cluster.addrs, cluster.secret)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_app, build_app(dashboard, registry), "127.0.0.1", 0)
                url = f"http://127.0.0.1:{port}/metrics"

                # While gated: nothing done, every task created.
                await dashboard.poll_once()
                got = samples((await get(url))[1])
                assert got[key("tasksprint_tasks", state="done")] == 0
                assert got[key("tasksprint_tasks_total_created")] == tasks

                open_gate(run)
                await wait_status(cluster, lambda st: st.state == "finished")
                before = [await channel.status(a) for a in cluster.addrs]
                await dashboard.poll_once()
                after = [await channel.status(a) for a in cluster.addrs]
                code, body = await get(url)
                assert code == 200
                got = samples(body)
                assert got[key("tasksprint_tasks", state="done")] == tasks
                assert got[key("tasksprint_tasks", state="pending")] == 0
                for (host, p), b, a in zip(cluster.addrs, before, after):
                    labels = {"replica": str(a.rid), "address": f"{host}:{p}"}
                    assert got[key("tasksprint_replica_up", **labels)] == 1
                    # The leader keeps ticking: the scraped index lies between the two readings.
                    assert b.applied <= got[key("tasksprint_replica_applied_index", **labels)] <= a.applied
                    assert b.commit <= got[key("tasksprint_replica_commit_index", **labels)] <= a.commit
                leaders = {k for k, v in got.items() if k[0] == "tasksprint_replica_leader" and v == 1}
                if before[0].leader == after[0].leader:
                    assert leaders == {
                        key(
                            "tasksprint_replica_leader",
                            replica=str(before[0].leader),
                            address="%s:%d" % cluster.addrs[before[0].leader],
                        )
                    }
                assert got[key("tasksprint_cluster_leader_changes_total")] >= 1
                nursery.cancel_scope.cancel()
            await channel.aclose()
            await poller.aclose()

        trio.run(scrape_and_compare)
