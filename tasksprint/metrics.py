"""Prometheus metrics: an :class:`~tasksprint.observe.Observer` feeding prometheus-client, and ``/metrics``.

Theory of operation
-------------------
Two sources feed one :class:`prometheus_client.CollectorRegistry`:

* :class:`PrometheusObserver` is the metrics hook of a replica or a client
  (``TASKSPRINT_OBSERVER=tasksprint.metrics:observer``).  A name listed in
  :data:`SPANS`, :data:`COUNTS` or :data:`VALUES` goes to its own metric
  (``storage.write`` to ``tasksprint_fsync_seconds``, ...); any other name to
  the generic families ``tasksprint_span_seconds{span=...}``,
  ``tasksprint_events_total{event=...}`` and ``tasksprint_value{value=...}``,
  so a name added to the hook is exported before it gets a metric of its own.
* :class:`ClusterCollector` exports what the replicas answer about
  themselves and the computation (a :class:`~tasksprint.readmodel.Snapshot`):
  commit and applied index, lag, role, commit latency quantiles, tasks by
  state, clients, and the leader changes the poller saw.  It reads the last
  snapshot at scrape time and keeps nothing else.

:func:`~tasksprint.dashboard.server.serve_metrics` serves a registry at
``/metrics`` with hypercorn's trio worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from tasksprint.observe import TimedByClock
from tasksprint.readmodel import TASK_STATES, History, Snapshot

__all__ = [
    "COUNTS",
    "SPANS",
    "VALUES",
    "ClusterCollector",
    "PrometheusObserver",
    "RegistryCollector",
    "metrics_app",
    "observer",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds, from 100 microseconds (an fsync on a fast disk) to a minute (a long task).
TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)

#: Hook span name -> (metric name, help) of a histogram of its own.
SPANS: dict[str, tuple[str, str]] = {
    "storage.fsync": ("tasksprint_fsync_seconds", "Synced writes of promises and accepts (one fsync each)"),
    "replica.commit": ("tasksprint_commit_seconds", "Client commands from arrival at this replica to answer"),
    "task.run": ("tasksprint_task_seconds", "Tasks from start on a node to its answer"),
    "fetch": ("tasksprint_fetch_seconds", "Fetches of a task output from a peer client"),
}
#: Hook count name -> (metric name, help) of a counter of its own (the counted ``n`` is added).
COUNTS: dict[str, tuple[str, str]] = {
    "paxos.leader_change": ("tasksprint_leader_changes", "Times this replica saw the leader change"),
    "paxos.proposals": (
        "tasksprint_proposals",
        "Client commands submitted here (proposed, or forwarded to the leader)",
    ),
    "paxos.proposal_bytes": ("tasksprint_proposal_bytes", "Bytes of the client commands submitted here"),
    "fetch.bytes": ("tasksprint_fetch_bytes", "Bytes of task outputs fetched from peers"),
    "node.restart": ("tasksprint_node_restarts", "Node processes replaced after a crash or a timeout"),
}
#: Hook value name -> (metric name, help) of a summary of its own.
VALUES: dict[str, tuple[str, str]] = {
    "applier.items_per_slot": ("tasksprint_items_per_slot", "Commands applied per log slot"),
}
#: Counts whose name starts with this are limit verdicts: ``limit.<verdict>``.
LIMIT_PREFIX = "limit."


@attrs.define(eq=False)
class PrometheusObserver(TimedByClock):
    """An :class:`~tasksprint.observe.Observer` recording into prometheus-client metrics.

    ``registry`` is this observer's own (no process-wide state); ``role``
    (``replica``, ``client``) is a label of every metric; ``clock`` returns
    seconds (e.g. ``time.perf_counter``).
    """

    role: str
    registry: CollectorRegistry = attrs.Factory(lambda: CollectorRegistry(auto_describe=True))
    clock: Callable[[], float] = time.perf_counter
    _spans: dict[str, Any] = attrs.Factory(dict)
    _counts: dict[str, Any] = attrs.Factory(dict)
    _values: dict[str, Any] = attrs.Factory(dict)
    _generic_span: Histogram = attrs.field(init=False)
    _generic_count: Counter = attrs.field(init=False)
    _generic_value: Summary = attrs.field(init=False)
    _limits: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r, role = self.registry, ["role"]
        # This process's CPU seconds, memory and open files (process_* metrics; Linux only).
        ProcessCollector(registry=r)
        for hook, (metric, doc) in SPANS.items():
            buckets = TASK_BUCKETS if hook == "task.run" else TIME_BUCKETS
            self._spans[hook] = Histogram(metric, doc, role, registry=r, buckets=buckets).labels(self.role)
        for hook, (metric, doc) in COUNTS.items():
            self._counts[hook] = Counter(metric, doc, role, registry=r).labels(self.role)
        for hook, (metric, doc) in VALUES.items():
            self._values[hook] = Summary(metric, doc, role, registry=r).labels(self.role)
        self._generic_span = Histogram(
            "tasksprint_span_seconds",
            "Other timed steps, by hook name",
            [*role, "span"],
            registry=r,
            buckets=TIME_BUCKETS,
        )
        self._generic_count = Counter(
            "tasksprint_events", "Other counted events, by hook name", [*role, "event"], registry=r
        )
        self._generic_value = Summary(
            "tasksprint_value", "Other recorded quantities, by hook name", [*role, "value"], registry=r
        )
        self._limits = Counter(
            "tasksprint_limit_verdicts", "Tasks stopped by a limit, by verdict", [*role, "verdict"], registry=r
        )

    def timing(self, name: str, seconds: float) -> None:
        h = self._spans.get(name)
        if h is None:
            h = self._spans[name] = self._generic_span.labels(self.role, name)
        h.observe(seconds)

    def now(self) -> float:
        return self.clock()

    def count(self, name: str, n: int = 1) -> None:
        c = self._counts.get(name)
        if c is None:
            if name.startswith(LIMIT_PREFIX):
                c = self._limits.labels(self.role, name[len(LIMIT_PREFIX) :])
            else:
                c = self._generic_count.labels(self.role, name)
            self._counts[name] = c
        c.inc(n)

    def value(self, name: str, x: float) -> None:
        s = self._values.get(name)
        if s is None:
            s = self._values[name] = self._generic_value.labels(self.role, name)
        s.observe(x)


def observer(role: str) -> PrometheusObserver:
    """The factory ``TASKSPRINT_OBSERVER=tasksprint.metrics:observer`` names."""
    return PrometheusObserver(role)


@attrs.define(eq=False)
class ClusterCollector(Collector):
    """Exports the last polled :class:`Snapshot` (and the poller's :class:`History`) at scrape time."""

    latest: Callable[[], Snapshot | None]
    history: History | None = None

    def collect(self) -> Iterator[Any]:
        snap = self.latest()
        if snap is None:
            return
        rl = ["replica", "address"]
        up = GaugeMetricFamily("tasksprint_replica_up", "1 if the replica answered the last poll", labels=rl)
        leader = GaugeMetricFamily("tasksprint_replica_leader", "1 if the replica leads", labels=rl)
        commit = GaugeMetricFamily("tasksprint_replica_commit_index", "Highest log slot known chosen", labels=rl)
        applied = GaugeMetricFamily("tasksprint_replica_applied_index", "Highest log slot applied", labels=rl)
        lag = GaugeMetricFamily("tasksprint_replica_lag", "Slots behind the most advanced replica", labels=rl)
        latency = GaugeMetricFamily(
            "tasksprint_replica_commit_latency_seconds",
            "Leader's recent command latency, arrival to answer",
            labels=[*rl, "quantile"],
        )
        fsync = GaugeMetricFamily(
            "tasksprint_replica_fsync_latency_seconds",
            "The replica's recent synced writes (promises, accepts)",
            labels=[*rl, "quantile"],
        )
        for i, r in enumerate(snap.replicas):
            labels = [str(r.rid if r.rid is not None else i), r.address]
            up.add_metric(labels, 1.0 if r.up else 0.0)
            if not r.up:
                continue
            leader.add_metric(labels, 1.0 if r.role == "leader" else 0.0)
            commit.add_metric(labels, r.commit)
            applied.add_metric(labels, r.applied)
            lag.add_metric(labels, r.lag)
            for q, ms in (("0.5", r.commit_p50_ms), ("0.99", r.commit_p99_ms)):
                if ms is not None:
                    latency.add_metric([*labels, q], ms / 1000.0)
            for q, ms in (("0.5", r.fsync_p50_ms), ("0.99", r.fsync_p99_ms)):
                if ms is not None:
                    fsync.add_metric([*labels, q], ms / 1000.0)
        yield from (up, leader, commit, applied, lag, latency, fsync)
        if self.history is not None:
            changes = CounterMetricFamily(
                "tasksprint_cluster_leader_changes", "Changes of the leader seen by this poller"
            )
            changes.add_metric([], self.history.leader_change_count)
            yield changes
        if not snap.has_computation:
            return
        tasks = GaugeMetricFamily("tasksprint_tasks", "Tasks of the computation by state", labels=["state"])
        for state in TASK_STATES:
            tasks.add_metric([state], snap.tasks.get(state, 0))
        yield tasks
        total = GaugeMetricFamily("tasksprint_tasks_total_created", "Tasks the computation has created")
        total.add_metric([], snap.tasks.get("total", 0))
        yield total
        clients = GaugeMetricFamily("tasksprint_clients", "Worker clients by liveness", labels=["alive"])
        clients.add_metric(["true"], len(snap.clients))
        clients.add_metric(["false"], snap.dead_clients)
        yield clients
        cl = ["client", "name"]
        slots = GaugeMetricFamily("tasksprint_client_slots", "Node processes of a live client", labels=cl)
        running = GaugeMetricFamily("tasksprint_client_running", "Tasks placed on a live client", labels=cl)
        cpu = GaugeMetricFamily(
            "tasksprint_client_cpu_percent", "CPU a live client and its nodes use, percent of one CPU", labels=cl
        )
        rss = GaugeMetricFamily(
            "tasksprint_client_resident_bytes", "Memory a live client and its nodes hold", labels=cl
        )
        heard = GaugeMetricFamily(
            "tasksprint_client_last_heard_seconds", "Seconds since the leader last heard from a client", labels=cl
        )
        for c in snap.clients:
            labels = [str(c.cid), c.name]
            slots.add_metric(labels, c.slots)
            running.add_metric(labels, c.running)
            for family, x in ((cpu, c.cpu_percent), (rss, c.rss_bytes), (heard, c.heard_s)):
                if x is not None:
                    family.add_metric(labels, x)
        yield from (slots, running, cpu, rss, heard)


@attrs.define(eq=False)
class RegistryCollector(Collector):
    """Every metric of another registry (a process's own, served beside the cluster's)."""

    registry: CollectorRegistry

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format."""
    return generate_latest(registry)


def metrics_app(registry: CollectorRegistry) -> Any:
    """A Starlette app answering ``GET /metrics`` with ``registry``'s metrics."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def metrics(request: Any) -> Response:
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics)])
