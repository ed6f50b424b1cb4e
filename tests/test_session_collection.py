"""Per-client sessions are collected deterministically, and a collected session never applies twice."""

from __future__ import annotations

from coordinator_harness import Harness
from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.ops import Joined
from tasksprint.machine import DUPLICATE, Applier, KVMachine, SessionExpired
from tasksprint.paxos.messages import Batch, Command, CommandBlock


def _append(client: str, seq: int, value: str, first_unacked: int | None = None) -> Command:
    fu = seq if first_unacked is None else first_unacked
    return Command(client_id=client, seq=seq, first_unacked=fu, op=["append", "log", value])


def _apply(a: Applier, *items: Command | CommandBlock) -> list:
    return [r for _, r in a.apply_slot(a.applied + 1, Batch(items=items))]


def _log(a: Applier) -> list:
    return a.machine._data.get("log", [])  # type: ignore[attr-defined]


def test_sessions_are_bounded_and_the_least_recently_used_go_first():
    a = Applier(KVMachine(), max_sessions=32)
    for i in range(100):
        _apply(a, _append("hot", i + 1, f"h{i}"), _append(f"c{i}", 1, f"c{i}"))
        assert a.session_count <= 32
    # "hot" used every slot: kept, and its next command is applied as usual.
    (first,) = _apply(a, _append("hot", 101, "h100"))
    assert first == _log(a).index("h100") + 1
    # Its resend of that command gets the same answer, and one it acknowledged is a duplicate.
    assert _apply(a, _append("hot", 101, "h100", first_unacked=101)) == [first]
    assert _apply(a, _append("hot", 100, "h99", first_unacked=101)) == [DUPLICATE]
    assert _log(a).count("h100") == 1 and _log(a).count("h99") == 1


def test_a_command_of_a_collected_session_is_answered_expired_and_not_applied():
    a = Applier(KVMachine(), max_sessions=16)
    _apply(a, _append("old", 1, "once"))
    _apply(a, _append("old", 2, "twice", first_unacked=2))
    for i in range(40):  # others push "old" out
        _apply(a, _append(f"c{i}", 1, f"c{i}"))
    before = list(_log(a))
    # The client had answers (first_unacked 2): a resend of seq 2, or a new seq 3.
    assert _apply(a, _append("old", 2, "twice", first_unacked=2)) == [SessionExpired(client_id="old", seq=2)]
    assert _apply(a, _append("old", 3, "third", first_unacked=3)) == [SessionExpired(client_id="old", seq=3)]
    block = CommandBlock.of("old", 3, 3, [["append", "log", "x"], ["append", "log", "y"]])
    assert _apply(a, block) == [[SessionExpired(client_id="old", seq=3), SessionExpired(client_id="old", seq=4)]]
    assert _log(a) == before, "nothing of a collected session is applied again"
    assert a.session_count <= 16


def test_collection_is_deterministic_and_survives_a_snapshot():
    slots = []
    for i in range(60):
        slots.append((_append(f"c{i % 23}", i // 23 + 1, f"v{i}"), _append(f"d{i}", 1, f"d{i}")))
    first, second = Applier(KVMachine(), max_sessions=20), Applier(KVMachine(), max_sessions=20)
    for items in slots[:30]:
        _apply(first, *items)
        _apply(second, *items)
    restored = Applier(KVMachine(), max_sessions=20)
    restored.restore(second.snapshot())
    answers = []
    for app in (first, restored):
        answers.append([_apply(app, *items) for items in slots[30:]])
    assert answers[0] == answers[1]
    assert first.digest == restored.digest
    assert first.snapshot() == restored.snapshot()
    assert any(isinstance(r, SessionExpired) for rs in answers[0] for r in rs), "some session was collected"


class Idle(Coordinator):
    def init(self, seed: int) -> None:
        self.tid = self.start_task("work", args=[1])


def test_a_live_workers_session_is_never_collected():
    h = Harness(Idle)
    h.applier.max_sessions = 16
    h.init()
    joined = h.apply(
        Command(
            client_id="worker-1",
            seq=1,
            first_unacked=1,
            op={"op": "join", "client": "w", "addr": "w:7000", "slots": 1, "have": []},
        )
    )[0]
    assert isinstance(joined, Joined)
    for i in range(100):  # many short-lived sessions (CLI calls) while the worker is busy
        h.apply(Command(client_id=f"cli-{i}", seq=1, first_unacked=1, op={"op": "status"}))
        assert h.applier.session_count <= 16
    tid = h.machine.scheduler.tid
    done = {"op": "done", "cid": joined.cid, "tid": tid, "attempt": 1, "values": {}, "sizes": {}}
    answer = h.apply(Command(client_id="worker-1", seq=2, first_unacked=2, op=done))[0]
    assert not isinstance(answer, SessionExpired)
    assert h.machine.task_info(tid)["state"] == "done"


def test_an_expired_answer_to_a_hostile_block_at_the_top_of_the_seq_range_does_not_raise():
    a = Applier(KVMachine(), max_sessions=16)
    top = 2**63 - 1
    block = CommandBlock.of("gone", top, top, [["append", "log", "x"], ["append", "log", "y"]])
    (answer,) = _apply(a, block)
    assert [r.seq for r in answer] == [top, top + 1] and all(isinstance(r, SessionExpired) for r in answer)
    assert _log(a) == []
