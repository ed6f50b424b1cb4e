"""The metrics hook: the null observer records nothing and adds nothing; a
recorder's figures are exact where promised and its quantiles within the
stated error; an observer named in the environment's spec is found or
refused with a reason."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from tasksprint import observe
from tasksprint.observe import NULL, Figures, Histogram, Observer, ObserverSpecError, Recorder


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def nearest_rank(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(1, math.ceil(q * len(s))) - 1]


def test_null_observer_hands_back_the_callable_itself() -> None:
    def f(x: int) -> int:
        return x + 1

    async def g() -> int:
        return 2

    assert NULL.timed("a", f) is f
    assert NULL.timed_async("a", g) is g
    with NULL.span("a"):
        pass
    NULL.timing("a", 1.0)
    NULL.count("a")
    NULL.value("a", 3.0)
    assert NULL.read() == observe.Readings()
    assert isinstance(NULL, Observer)


def test_timed_call_records_its_duration_and_keeps_result_and_errors() -> None:
    clock = FakeClock()
    rec = Recorder(clock)

    def work(x: int) -> int:
        clock.now += 0.25
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    timed = rec.timed("storage.write", work)
    assert timed(4) == 8
    with pytest.raises(ValueError, match="negative"):
        timed(-1)
    fig = rec.read().spans["storage.write"]
    assert fig.count == 2 and fig.total == pytest.approx(0.5)
    assert fig.min == fig.max == pytest.approx(0.25)


async def test_timed_async_covers_the_whole_await() -> None:
    clock = FakeClock()
    rec = Recorder(clock)

    async def exchange() -> str:
        await trio.lowlevel.checkpoint()
        clock.now += 0.5
        await trio.lowlevel.checkpoint()
        return "ok"

    assert await rec.timed_async("node.exchange", exchange)() == "ok"
    assert rec.read().spans["node.exchange"].total == pytest.approx(0.5)


def test_span_counts_and_values_are_kept_apart() -> None:
    clock = FakeClock()
    rec = Recorder(clock)
    with rec.span("paxos.step"):
        clock.now += 0.001
    with pytest.raises(KeyError):
        with rec.span("paxos.step"):
            clock.now += 0.003
            raise KeyError("x")
    rec.timing("paxos.step", 0.002)
    rec.count("client.report", 5)
    rec.count("client.report")
    rec.value("applier.items_per_slot", 3)
    got = rec.read()
    assert got.spans["paxos.step"].count == 3
    assert got.spans["paxos.step"].total == pytest.approx(0.006)
    assert got.counts == {"client.report": Figures(count=2, total=6.0)}
    assert got.values["applier.items_per_slot"].max == 3
    assert set(got.as_dict()) == {"spans", "counts", "values"}


def test_readings_are_a_copy() -> None:
    rec = Recorder(FakeClock())
    rec.value("v", 1.0)
    before = rec.read()
    rec.value("v", 2.0)
    assert before.values["v"].count == 1
    assert rec.read().values["v"].count == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_histogram_quantiles_within_the_stated_error_and_exact_moments(seed: int) -> None:
    rng = random.Random(seed)
    xs = [rng.lognormvariate(-7, 2) for _ in range(5000)] + [0.0] * 50
    h = Histogram()
    for x in xs:
        h.add(x)
    fig = h.figures()
    assert fig.count == len(xs)
    assert fig.total == pytest.approx(sum(xs))
    assert fig.min == 0.0 and fig.max == max(xs)
    for q, got in ((0.5, fig.p50), (0.9, fig.p90), (0.99, fig.p99)):
        want = nearest_rank(xs, q)
        assert got is not None
        assert abs(got - want) <= observe.RELATIVE_ERROR * want, (q, got, want)


def test_histogram_memory_is_bounded_by_the_range_not_the_samples() -> None:
    h = Histogram()
    for i in range(100_000):
        h.add(1e-3 * (1 + i % 1000))
    # Three decades at 16 buckets per doubling: about 160 buckets.
    assert len(h._buckets) <= 10 * observe.BUCKETS_PER_DOUBLING + 1


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_histogram_refuses_what_is_not_a_finite_non_negative_number(bad: float) -> None:
    with pytest.raises(ValueError, match="finite number >= 0"):
        Histogram().add(bad)


def test_empty_figures() -> None:
    fig = Histogram().figures()
    assert fig == Figures(count=0, total=0.0)
    assert fig.mean is None and fig.p50 is None


def test_from_spec_without_a_spec_is_the_null_observer() -> None:
    assert observe.from_spec(None, "replica") is NULL
    assert observe.from_spec("", "client") is NULL


@pytest.fixture
def observer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "obs_for_test.py").write_text(
        textwrap.dedent(
            """
            import time
            from tasksprint.observe import Recorder

            made = []

            def observer(role):
                made.append(role)
                return Recorder(time.perf_counter)

            def broken(role):
                return object()

            not_callable = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "obs_for_test", raising=False)
    return "obs_for_test"


def test_from_spec_calls_the_factory_with_the_role(observer_module: str) -> None:
    obs = observe.from_spec(f"{observer_module}:observer", "replica")
    assert isinstance(obs, Recorder)
    assert sys.modules[observer_module].made == ["replica"]


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("no_colon", "expected module:factory"),
        (":observer", "expected module:factory"),
        ("no_such_module_anywhere:observer", "cannot import"),
        ("{m}:missing", "has no callable 'missing'"),
        ("{m}:not_callable", "has no callable 'not_callable'"),
        ("{m}:broken", "returned object"),
    ],
)
def test_from_spec_refuses_with_a_reason(observer_module: str, spec: str, reason: str) -> None:
    with pytest.raises(ObserverSpecError, match=reason):
        observe.from_spec(spec.format(m=observer_module), "client")


# --- The runtime reports through the hook ---------------------------------------------------


async def test_an_observed_replica_reports_its_steps(tmp_path: Path) -> None:
    from tasksprint.config import ReplicaConfig
    from tasksprint.log_client import LogClient
    from tasksprint.replica import Replica

    recorder = Recorder(time.perf_counter)
    config = ReplicaConfig(rid=0, peers=(("127.0.0.1", 0),), data_dir=tmp_path, secret=b"s" * 24)
    replica = Replica(config, observer=recorder)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(replica.run)
            async with LogClient([("127.0.0.1", replica.port)], config.secret) as client:
                for i in range(5):
                    await client.submit(["put", f"k{i}", i], deadline=20)
            nursery.cancel_scope.cancel()
    got = recorder.read()
    for name in ("paxos.propose", "paxos.ready", "paxos.advance", "paxos.tick", "storage.write"):
        assert got.spans[name].count >= 1, name
    assert got.spans["applier.apply_slot"].count >= 5
    assert got.spans["machine.apply"].count >= 5
    assert got.spans["replica.commit"].count == 5  # one per command submitted to the leader
    assert got.values["applier.items_per_slot"].count == got.spans["applier.apply_slot"].count


async def test_an_observed_pair_of_replicas_reports_paxos_steps(tmp_path: Path) -> None:
    """``paxos.step`` is one message from a peer, so it takes two replicas to see it."""
    from tasksprint.config import ReplicaConfig
    from tasksprint.localcluster import free_ports
    from tasksprint.log_client import LogClient
    from tasksprint.replica import Replica

    ports = free_ports(3)
    peers = tuple(("127.0.0.1", p) for p in ports)
    recorders = [Recorder(time.perf_counter) for _ in peers]
    replicas = []
    for rid, recorder in enumerate(recorders):
        (tmp_path / str(rid)).mkdir()
        config = ReplicaConfig(rid=rid, peers=peers, data_dir=tmp_path / str(rid), secret=b"s" * 24)
        replicas.append(Replica(config, observer=recorder))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for replica in replicas:
                await nursery.start(replica.run)
            async with LogClient(list(peers), b"s" * 24) as client:
                await client.submit(["put", "k", 1], deadline=50)
            # The followers learn that the slot was chosen a moment after the leader answered.
            while any(replica.applier.applied < 1 for replica in replicas):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    for recorder in recorders:
        got = recorder.read()
        assert got.spans["paxos.step"].count >= 1
        assert got.spans["applier.apply_slot"].count >= 1


async def test_an_observed_node_pool_reports_exchanges_runs_starts_and_idle_time(tmp_path: Path) -> None:
    from nodes import SDK_NODE, request, write_node

    from tasksprint.node_pool import NodePool

    recorder = Recorder(time.perf_counter)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            pool = NodePool(write_node(tmp_path, SDK_NODE), 1, observer=recorder)
            await pool.start(nursery)
            try:
                for tid in (1, 2, 3):
                    outcome = await pool.run(request(tid, "echo", tid))
                    assert outcome.failure is None, outcome
            finally:
                await pool.aclose()
    got = recorder.read()
    assert got.spans["node.start"].count == 1
    assert got.spans["node.run"].count == 3
    assert got.spans["node.exchange"].count == 3
    assert got.spans["node.idle"].count == 2  # the one node waited between its three tasks


def test_a_coordinator_app_reports_its_views() -> None:
    from coordinator_harness import MONTECARLO

    from tasksprint.coordinator.app import CoordinatorApp

    recorder = Recorder(time.perf_counter)
    app = CoordinatorApp.create(MONTECARLO, observer=recorder)
    app.query("view", {"cid": 1, "after": 0})
    got = recorder.read()
    assert got.spans["machine.view"].count == 1
    assert got.values["machine.tasks_per_view"].count == 1


def test_a_replica_with_an_unusable_observer_spec_exits_with_the_reason(tmp_path: Path) -> None:
    env = {**os.environ, observe.OBSERVER_ENV: "no_such_module_anywhere:observer"}
    done = subprocess.run(
        [sys.executable, "-m", "tasksprint.cli", "replica", "--id", "0", "--peers", "127.0.0.1:1"]
        + ["--data", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "no_such_module_anywhere" in done.stderr and "cannot import" in done.stderr
