"""The ``status`` and ``info`` answers are typed values that carry the read models exactly.

A computation is run in memory (``coordinator_harness``) to its end, one
with a failing hook too; at every stage the typed answer holds what the read
model of :mod:`tasksprint.coordinator.views` says, survives the wire codec,
and gives the same plain shape back (the ``--json`` output); malformed
answers are refused by the decoder with its one error.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from coordinator_harness import ECHO, MONTECARLO, BuggyScheduler, Sim, merge, montecarlo
from tasksprint_sdk.coordinator import load_scheduler

from tasksprint import codec
from tasksprint.coordinator.replies import ComputationStatus, TaskGraph, TaskInfo


def as_json(value: Any) -> Any:
    """``value`` as the JSON output shows it."""
    return json.loads(json.dumps(attrs.asdict(value) if attrs.has(type(value)) else value))


def check_typed(machine) -> None:
    plain = machine.status()
    status = ComputationStatus.of(plain)
    expected = as_json(plain)
    for c in expected["live_clients"]:  # filled in by the replica answering, not the machine
        c.update(heard_s=None, cpu_percent=None, rss_bytes=None)
    assert as_json(status) == expected
    assert codec.decode_untrusted(codec.encode(status)) == status
    for tid in range(1, plain["tasks"]["total"] + 1):
        info = TaskInfo.of(machine.task_info(tid))
        assert info is not None and as_json(info) == as_json(machine.task_info(tid))
        assert codec.decode_untrusted(codec.encode(info)) == info
    assert TaskInfo.of(machine.task_info(plain["tasks"]["total"] + 1)) is None
    graph = TaskGraph.of(machine.graph(1, plain["tasks"]["total"] + 5))
    assert codec.decode_untrusted(codec.encode(graph)) == graph
    assert graph.total == plain["tasks"]["total"] and list(graph.tids) == list(range(1, graph.total + 1))
    for tid, name, state, pre in zip(graph.tids, graph.names, graph.states, graph.pretasks, strict=True):
        info = machine.task_info(tid)
        assert name == info["name"] and state == info["state"] and list(pre) == list(dict.fromkeys(info["pretasks"]))
    assert TaskGraph.of(machine.graph(graph.total + 1, 10)).tids == ()


def test_a_task_graph_of_uneven_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="as long as each other"):
        TaskGraph(first=1, total=2, tids=[1, 2], names=["a", "b"], states=["done"], pretasks=[[], [1]])
    with pytest.raises(TypeError):
        TaskGraph(first=1, total=1, tids=[1], names=["a"], states=["done"], pretasks=[["x"]])


def test_status_and_info_of_a_finished_computation_are_typed_and_exact() -> None:
    sim = Sim(load_scheduler(MONTECARLO), {"montecarlo": montecarlo, "merge": merge})
    check_typed(sim.machine)  # before anything is initialised
    sim.join("alpha", slots=3)
    sim.join("beta", slots=2)
    check_typed(sim.machine)
    sim.run()
    status = ComputationStatus.of(sim.machine.status())
    assert status.finished and status.ended and status.result is not None
    assert status.clients.live == 2 and [c.name for c in status.live_clients] == ["alpha", "beta"]
    check_typed(sim.machine)


def test_status_of_a_failed_computation_names_the_hook() -> None:
    sim = Sim(BuggyScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=2)
    sim.poll(cid)
    sim.complete(cid, sched.a)
    sim.complete(cid, sched.b)
    status = ComputationStatus.of(sim.machine.status())
    assert status.state == "failed" and status.ended and status.failure is not None
    assert status.failure.kind == "hook" and status.failure.hook == status.last_hook.hook
    check_typed(sim.machine)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: d.update(state="exploded"),
        lambda d: d.update(finished="yes"),
        lambda d: d.update(tasks={"done": "3"}),
        lambda d: d.update(now="later"),
        lambda d: d.update(live_clients=[1, 2]),
    ],
)
def test_a_malformed_status_is_refused_by_the_decoder(spoil) -> None:
    sim = Sim(load_scheduler(MONTECARLO), {"montecarlo": montecarlo, "merge": merge})
    sim.join("alpha", slots=1)
    status = ComputationStatus.of(sim.machine.status())
    fields = {a.name: getattr(status, a.name) for a in attrs.fields(ComputationStatus)}
    spoil(fields)
    # The spoilt value, made without the validators, as a broken or hostile sender would.
    bad = object.__new__(ComputationStatus)
    for name, value in fields.items():
        object.__setattr__(bad, name, value)
    with pytest.raises(codec.BadMessage):
        codec.decode_untrusted(codec.encode(bad))
