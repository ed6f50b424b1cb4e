"""Coordinator operations: parsing, refusals, batches, joins, actions and the view protocol."""

from __future__ import annotations

import random

import cbor2
import pytest
from coordinator_harness import (
    ECHO,
    ChainScheduler,
    Harness,
    KillScheduler,
    ManyScheduler,
    PlainArgs,
    Sim,
    done_op,
    join,
    names,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tasksprint_sdk.coordinator import (
    SchedulerUsageError,
)

from tasksprint import codec
from tasksprint.coordinator.app import CoordinatorApp
from tasksprint.coordinator.machine import CoordinatorMachine
from tasksprint.coordinator.ops import (
    ACCEPTED,
    GRAPH_MAX,
    BadOp,
    BatchApplied,
    BatchOp,
    Cancelled,
    CancelOp,
    DoneOp,
    ErrorCode,
    FailedOp,
    GraphRequest,
    InfoRequest,
    Initialized,
    InitOp,
    Joined,
    JoinOp,
    LostOp,
    Refused,
    Reported,
    StatusRequest,
    ViewRequest,
)
from tasksprint.coordinator.parsing import parse_op, parse_query
from tasksprint.coordinator.replies import Assignment, ClientView, HolderChange, InputLocation


def test_actions_outside_hooks_are_refused() -> None:
    with pytest.raises(SchedulerUsageError, match="inside a hook"):
        ChainScheduler().start_task("a")
    h = Harness(ChainScheduler)
    h.init()
    with pytest.raises(SchedulerUsageError, match="only be called while a hook"):
        h.machine.scheduler.start_task("a")
    with pytest.raises(SchedulerUsageError):
        h.machine.scheduler.finish()
    assert isinstance(h.machine.scheduler.random, random.Random)


def test_view_reports_only_changes_since_a_version() -> None:
    sim = Sim(KillScheduler, ECHO)
    sched = sim.machine.scheduler
    cid = sim.join("w", slots=4)
    first = sim.machine.view(cid, 0)
    assert names(first.tasks) == [sched.a, sched.d]
    again = sim.machine.view(cid, first.version)
    assert again.tasks == () and again.kill == () and again.version == first.version
    assert sim.machine.client_version(cid) == first.version
    sim.h.op({"op": "cancel", "tid": sched.d})
    delta = sim.machine.view(cid, first.version)
    assert delta.tasks == () and delta.kill == (sched.d,)
    assert names(sim.machine.view(cid, 0).tasks) == [sched.a]


def test_malformed_ops_change_nothing() -> None:
    h = Harness(ChainScheduler)
    early = h.op({"op": "join", "client": "c", "addr": "c:1", "slots": 1, "have": []})
    assert isinstance(early, Refused) and early.code == ErrorCode.NOT_INITIALIZED.value
    h.init()
    before = h.machine.snapshot()
    for op in (
        {"op": "bogus"},
        ["done"],
        {"op": "done", "cid": True, "tid": 1, "attempt": 1},
        {"op": "done", "cid": 1, "tid": 1, "attempt": 1},
        {"op": "join", "client": "c", "addr": "c:1", "slots": -1, "have": []},
        {"op": "join", "client": "c", "addr": "c:1", "slots": 1, "have": "gpu"},
        {"op": "failed", "cid": 1, "tid": 1, "attempt": 1, "error": 3},
    ):
        result = h.op(op)
        assert isinstance(result, Refused) and result.error
    assert h.machine.snapshot() == before
    assert h.op({"op": "init", "seed": 5, "code_digest": "other"}).ignored
    assert h.machine.status()["seed"] == 11


def test_rejoin_under_a_live_name_keeps_the_cid() -> None:
    sim = Sim(ChainScheduler, ECHO)
    x = sim.join("x", slots=1, have=("x",))
    assert sim.join("x", slots=2, have=("x",)) == x
    assert sim.machine.live_clients() == [(x, "x", "x:7000")]


def test_expired_clients_uses_client_timeout() -> None:
    h = Harness(ChainScheduler, client_timeout=5.0)
    h.init()
    a = h.op({"op": "join", "client": "a", "addr": "a:1", "slots": 1, "have": []}).cid
    b = h.op({"op": "join", "client": "b", "addr": "b:1", "slots": 1, "have": []}).cid
    assert h.machine.expired_clients({a: 10.0, b: 3.0}, now=9.0) == [b]
    assert h.machine.expired_clients({a: 10.0}, now=100.0) == [a]
    with pytest.raises(ValueError, match="client_timeout"):
        CoordinatorMachine(ChainScheduler, client_timeout=0)
    # Clients learn it from their views, to keep their polls well inside it.
    assert h.machine.view(a).client_timeout == 5.0


def test_a_batch_applies_each_report_in_order_as_one_log_item() -> None:
    h = Harness(ManyScheduler)
    h.init()
    cid = join(h, "c", slots=3)
    a, b, c = names(h.machine.view(cid).tasks)
    result = h.op(
        {
            "op": "batch",
            "ops": [
                done_op(cid, b),
                {"op": "failed", "cid": cid, "tid": c, "attempt": 1, "error": "boom"},
                {"op": "join", "client": "z", "addr": "z:1", "slots": 1},
                done_op(cid, 999),
                done_op(cid, b),
                done_op(cid, a),
            ],
        }
    )
    assert isinstance(result, BatchApplied) and result.count == 6
    # Only the results other than a plain acceptance come back, with their positions.
    others = dict(result.others)
    assert sorted(others) == [2, 3, 4]
    results = [others.get(i, ACCEPTED) for i in range(6)]
    assert results[1].accepted and isinstance(results[2], Refused) and "only done, failed and lost" in results[2].error
    assert isinstance(results[3], Refused) and "unknown task 999" in results[3].error
    assert not results[4].accepted and "is done" in results[4].reason
    assert results[5].accepted
    # task_done ran in the batch's order; the failed one is retried (attempt 2), and placed again.
    assert h.machine.scheduler.done == [b, a]
    assert h.machine.task_info(c)["attempt"] == 2 and h.machine.task_info(c)["clients"] == [cid]
    assert h.status["clients"]["live"] == 1  # the join inside the batch did nothing
    h.machine.check_invariants()
    assert isinstance(h.op({"op": "batch", "ops": "nope"}), Refused)


def test_start_task_takes_plain_data_only() -> None:
    h = Harness(PlainArgs)
    h.init()
    assert h.machine.scheduler.refused == [2, 3, 4, 5, 6]
    assert h.status["tasks"]["total"] == 2


# --------------------------------------------------------------- parsing

OPS = [
    InitOp(seed=7, code_digest="ab"),
    JoinOp(client="c", addr="c:1", slots=2, queue=3, have=("gpu",)),
    DoneOp(cid=1, tid=2, attempt=1, values={"x": [1]}, sizes={"x": 3}, early=((1, 1),)),
    DoneOp(cid=1, tid=2, attempt=1),
    FailedOp(cid=1, tid=2, attempt=3, error="boom"),
    LostOp(cid=1, tid=2, key=None),
    LostOp(cid=1, tid=2, key="x"),
    CancelOp(tid=4),
    BatchOp(ops=(DoneOp(cid=1, tid=2, attempt=1), FailedOp(cid=1, tid=3, attempt=1, error="e"))),
]


@pytest.mark.parametrize("op", OPS, ids=lambda op: type(op).__name__)
def test_every_op_survives_its_wire_form(op: object) -> None:
    # The wire form is plain CBOR data, as the log stores it.
    wire = codec.decode(codec.encode(op.to_wire()))
    assert parse_op(wire) == op


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"op": "join", "client": "c", "addr": "c:1", "slots": -1}, "slots"),
        ({"op": "join", "client": "c", "addr": "c:1", "slots": True}, "slots"),
        ({"op": "join", "client": "c", "addr": "c:1", "slots": 1, "have": "gpu"}, "have"),
        ({"op": "join", "client": 3, "addr": "c:1", "slots": 1}, "client"),
        ({"op": "done", "cid": 1, "tid": 2}, "attempt"),
        ({"op": "done", "cid": 1, "tid": 2, "attempt": 1, "sizes": {"x": -1}}, "sizes"),
        ({"op": "done", "cid": 1, "tid": 2, "attempt": 1, "early": [[1]]}, "early"),
        ({"op": "failed", "cid": 1, "tid": 2, "attempt": 1}, "error"),
        ({"op": "lost", "cid": 1, "tid": 2, "key": 5}, "key"),
        ({"op": "cancel", "tid": "4"}, "tid"),
        ({"op": "batch", "ops": {}}, "ops"),
        ({"op": "init", "seed": 1.5, "code_digest": "ab"}, "seed"),
    ],
)
def test_the_parser_names_the_bad_field(raw: dict, field: str) -> None:
    with pytest.raises(BadOp, match=repr(field)) as info:
        parse_op(raw)
    assert info.value.refused.code == ErrorCode.MALFORMED.value


def test_a_batch_keeps_the_refusal_of_each_bad_entry_in_its_place() -> None:
    op = parse_op({"op": "batch", "ops": [{"op": "cancel", "tid": 1}, {"op": "lost", "cid": 1, "tid": 2}, 7]})
    assert isinstance(op, BatchOp)
    assert [type(sub) for sub in op.ops] == [Refused, LostOp, Refused]
    assert "only done, failed and lost" in op.ops[0].error


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "op",
        "seed",
        "code_digest",
        "client",
        "addr",
        "slots",
        "queue",
        "have",
        "cid",
        "tid",
        "attempt",
        "values",
        "sizes",
        "early",
        "error",
        "key",
        "ops",
    ]
)
names_ = st.sampled_from(["init", "join", "done", "failed", "lost", "cancel", "batch", "nope"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=names_, raw=st.dictionaries(fields, plain, max_size=8))
def test_the_parser_only_ever_returns_an_op_or_raises_bad_op(name: str, raw: dict) -> None:
    try:
        op = parse_op({**raw, "op": name})
    except BadOp as exc:
        assert exc.refused.code in {c.value for c in ErrorCode}
    else:
        # A batch's refused entries have no wire form: they are dropped, the reports kept.
        kept = BatchOp(ops=tuple(o for o in op.ops if not isinstance(o, Refused))) if isinstance(op, BatchOp) else op
        assert parse_op(codec.decode(codec.encode(op.to_wire()))) == kept


def test_queries_parse_into_requests_or_are_refused_by_code() -> None:
    assert parse_query("view", {"cid": 3}) == ViewRequest(cid=3, after=0, wait=0.0)
    request = ViewRequest(cid=3, after=9, wait=1.5)
    assert parse_query(request.NAME, request.args()) == request
    request = ViewRequest(cid=3, after=9, wait=1.5, cpu=12.5, rss=4096)
    assert parse_query(request.NAME, request.args()) == request
    assert parse_query("status", {}) == StatusRequest()
    assert parse_query("info", {"tid": 2}) == InfoRequest(tid=2)
    assert parse_query("graph", {}) == GraphRequest(first=1, count=GRAPH_MAX)
    assert parse_query("graph", GraphRequest(first=7, count=3).args()) == GraphRequest(first=7, count=3)
    for name, args in [
        ("graph", {"first": 0}),
        ("graph", {"count": 0}),
        ("graph", {"count": GRAPH_MAX + 1}),
        ("graph", {"first": "1"}),
        ("view", {}),
        ("view", {"cid": 1, "after": -1}),
        ("view", {"cid": 1, "wait": True}),
        ("view", {"cid": 1, "wait": float("nan")}),
        ("view", {"cid": 1, "cpu": -1}),
        ("view", {"cid": 1, "cpu": float("inf")}),
        ("view", {"cid": 1, "cpu": "lots"}),
        ("view", {"cid": 1, "rss": -5}),
        ("view", {"cid": 1, "rss": 1.5}),
        ("info", {"tid": "2"}),
        ("status", []),
    ]:
        with pytest.raises(BadOp) as info:
            parse_query(name, args)
        assert info.value.refused.code == ErrorCode.MALFORMED.value, (name, args)
    with pytest.raises(BadOp) as info:
        parse_query("shutdown", {})
    assert info.value.refused.code == ErrorCode.UNKNOWN.value


def test_the_app_answers_a_malformed_query_with_its_refusal() -> None:
    app = CoordinatorApp(CoordinatorMachine(ChainScheduler))
    answer = app.query("view", {"cid": "me"})
    assert isinstance(answer, Refused) and answer.code == ErrorCode.MALFORMED.value and "'cid'" in answer.error
    assert codec.decode_untrusted(codec.encode(answer)) == answer  # it travels as the reply
    assert app.query("status", {}).state == "waiting"
    assert app.query("info", {"tid": 1}) is None


def test_the_app_reads_time_and_randomness_only_through_what_it_was_given() -> None:
    now = [100.0]
    app = CoordinatorApp(
        CoordinatorMachine(ChainScheduler), clock=lambda: now[0], entropy=lambda n: bytes(range(1, n + 1))
    )
    app.role_changed(leader=True, now=now[0])
    proposed: list = []
    app.leader_duties(lambda command: proposed.append(command) or True)
    assert [c.op["seed"] for c in proposed] == [int.from_bytes(bytes(range(1, 8)), "big")]
    app.leader_duties(proposed.append)  # the injected clock has not moved: no second proposal yet
    assert len(proposed) == 1
    now[0] += 1.5
    app.leader_duties(proposed.append)
    assert len(proposed) == 2


@pytest.mark.parametrize(
    "answer",
    [
        Initialized(ignored=True, effects="e"),
        Joined(cid=3),
        Reported(accepted=False, reason="stale", rerun=True),
        Cancelled(killed=(1, 2)),
        BatchApplied(
            count=3, others=((1, Reported(accepted=False, reason="r")), (2, Refused(code="unknown", error="x")))
        ),
        Refused(code="not_initialized", error="try again"),
    ],
    ids=lambda a: type(a).__name__,
)
def test_every_answer_travels_back_to_the_submitter_as_it_is(answer: object) -> None:
    assert codec.decode_untrusted(codec.encode(answer)) == answer


def test_a_malformed_answer_from_the_network_is_a_bad_message() -> None:
    good = codec.encode(BatchApplied(count=1, others=((0, Refused(code="unknown", error="x")),)))
    bad = good.replace(b"unknown", b"unknow!")  # not an error code
    with pytest.raises(codec.BadMessage):
        codec.decode_untrusted(bad)
    joined = codec.encode(Joined(cid=1))
    assert joined.count(b"\x01") == 1
    with pytest.raises(codec.BadMessage):
        codec.decode_untrusted(joined.replace(b"\x01", b"\xf5"))  # cid: true, not an int


def test_a_view_travels_typed_and_a_malformed_one_is_a_bad_message() -> None:
    view = ClientView(
        version=4,
        state="running",
        alive=True,
        client_timeout=10.0,
        tasks=(
            Assignment(
                tid=2,
                attempt=1,
                name="f",
                args=[1],
                kwargs={},
                seed=9,
                timeout=None,
                keys=("out",),
                inputs=(InputLocation(tid=1, key=None, cid=3, addr="h:1"),),
            ),
        ),
        kill=(5,),
        holders=(HolderChange(tid=1, cid=None, addr=None),),
    )
    assert codec.decode_untrusted(codec.encode(view)) == view
    for fields in (
        [4, "dreaming", True, 10.0, [], [], []],  # not a run state
        [1.5, "running", True, 10.0, [], [], []],  # version not an int
        [4, "running", True, 10.0, [7], [], []],  # a task that is not an Assignment
    ):
        with pytest.raises(codec.BadMessage):
            codec.decode_untrusted(cbor2.dumps(cbor2.CBORTag(codec.OBJECT_TAG, ["ClientView", *fields])))
