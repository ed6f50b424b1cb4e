"""A replica's parked long-polls are asked again after a pass that applied something, not after every pass.

Most passes (a peer's message, a tick, a write completed) apply nothing, and a
long-poll's answer is a function of the applied state: asking every parked
query again in each of them cost a replica a query per pass per waiting client.
Asked again they must be once the state moved, and at their deadline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs

from tasksprint.api import QueryReply
from tasksprint.app import KVApp, NotYet
from tasksprint.config import ReplicaConfig
from tasksprint.driver import ReplicaDriver
from tasksprint.machine import Applier
from tasksprint.paxos.messages import Command
from tasksprint.replica import Replica
from tests.test_replica_driver import (
    ProposingCore,
    RecordingMailbox,
    RecordingStorage,
    RecordingWriter,
    applying,
)


@attrs.define
class WaitingApp(KVApp):
    """A key-value app whose ``view`` query waits (NotYet) until its wait is 0; it counts the asks."""

    asked: list = attrs.Factory(list)

    def query(self, name: str, args: dict[str, Any]) -> Any:
        self.asked.append(dict(args))
        if args.get("wait"):
            raise NotYet()
        return "answer"


def replica(tmp_path: Path) -> tuple[Replica, WaitingApp, list]:
    events: list = []
    app = WaitingApp()
    config = ReplicaConfig(
        rid=0, peers=(("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)), data_dir=tmp_path, secret=b"s"
    )
    r = Replica(config, app)
    r._driver = ReplicaDriver(
        core=ProposingCore([], events),
        applier=Applier(app.machine),
        app=app,
        storage=RecordingStorage(events),
        writer=RecordingWriter(events),
        peers={1: RecordingMailbox(events, 1), 2: RecordingMailbox(events, 2)},
        wake=lambda: None,
        clock=lambda: 0.0,
    )
    return r, app, events


def test_a_parked_long_poll_is_asked_again_only_after_a_pass_that_applied_a_slot(tmp_path: Path) -> None:
    r, app, _ = replica(tmp_path)
    box = RecordingMailbox([], 99)
    r._answer_query(box, "view", {"wait": 5}, math.inf)  # type: ignore[arg-type]
    assert len(app.asked) == 1 and len(r._parked) == 1
    for _ in range(3):
        r._run_pass()  # nothing applied: nothing to ask again
    assert len(app.asked) == 1
    r.core.readies.append(applying(1, 1, Command(client_id="c", seq=1, op=["put", "k", "v"])))
    r._run_pass()
    assert r.applier.applied == 1
    assert len(app.asked) == 2 and len(r._parked) == 1, "asked again after the slot; still nothing new"
    r._run_pass()
    assert len(app.asked) == 2


def test_a_parked_long_poll_past_its_deadline_is_answered(tmp_path: Path) -> None:
    r, app, _ = replica(tmp_path)
    box = RecordingMailbox([], 99)
    r._answer_query(box, "view", {"wait": 5}, 10.0)  # type: ignore[arg-type]
    r._retry_parked(11.0)
    assert app.asked[-1]["wait"] == 0 and not r._parked
    [reply] = [e[2] for e in box.events if e[0] == "push"] or [None]
    # The driver holds answers until a majority confirms the state (slot 0 is: nothing applied).
    assert reply == QueryReply(name="view", result="answer")
