"""A client's reports and joins must come from the log session that joined it (issue 11, finding 6)."""

from __future__ import annotations

from coordinator_harness import Harness
from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.ops import ErrorCode, Joined, Refused, Reported
from tasksprint.paxos.messages import Command


class OneTask(Coordinator):
    def init(self, seed: int) -> None:
        self.tid = self.start_task("work", args=[1])


def as_session(h: Harness, session: str, op: dict) -> object:
    h.seq += 1
    return h.apply(Command(client_id=session, seq=h.seq, op=op))[0]


def join(name: str) -> dict:
    return {"op": "join", "client": name, "addr": f"{name}:7000", "slots": 1, "have": []}


def test_reports_for_a_client_from_another_session_are_refused():
    h = Harness(OneTask)
    h.init()
    joined = as_session(h, "alice-1", join("alice"))
    assert isinstance(joined, Joined)
    tid = h.machine.scheduler.tid
    assert h.machine.task_info(tid)["state"] == "running"
    done = {"op": "done", "cid": joined.cid, "tid": tid, "attempt": 1, "values": {}, "sizes": {}}
    for op in (
        done,
        {"op": "failed", "cid": joined.cid, "tid": tid, "attempt": 1, "error": "fake"},
        {"op": "lost", "cid": joined.cid, "tid": tid, "key": None},
    ):
        refused = as_session(h, "mallory", op)
        assert isinstance(refused, Refused) and refused.code == ErrorCode.FORBIDDEN.value, refused
        assert "another log session" in refused.error
    assert h.machine.task_info(tid)["state"] == "running"
    # A join reusing a live client's name from another session cannot redirect its address.
    refused = as_session(h, "mallory", {**join("alice"), "addr": "evil:1"})
    assert isinstance(refused, Refused) and refused.code == ErrorCode.FORBIDDEN.value
    assert h.machine.live_clients() == [(joined.cid, "alice", "alice:7000")]
    # The client itself still reports.
    answer = as_session(h, "alice-1", done)
    assert isinstance(answer, Reported) and answer.accepted
    assert h.machine.task_info(tid)["state"] == "done"
