"""The replica's driver pass against a scripted core: records reach the disk in order,
and no Ready is advanced (its held replies released) before its records and every
earlier Ready's are written.

The simulator checks the protocol core; these tests check the driver code that
decides, Ready by Ready, what is written in the loop, what goes to the disk
writer and what waits for the end of the pass.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import structlog

from tasksprint.machine import Applier, KVMachine
from tasksprint.paxos.core import Ready, Role
from tasksprint.paxos.durable import SaveAccepted, SaveChosen
from tasksprint.paxos.messages import Ballot, Batch, Command, Heartbeat
from tasksprint.config import ReplicaConfig
from tasksprint.replica import Outbox, Replica

B = Ballot(1, 0)


def value(size: int = 10) -> Batch:
    return Batch(items=(Command(client_id="c", seq=1, op="x" * size),))


@attrs.define
class ScriptedCore:
    """Hands out the given Readies one pass at a time; records what the driver does."""

    readies: list
    events: list
    role: Role = Role.FOLLOWER
    ballot: Ballot | None = None
    commit_index: int = 0
    leader_hint: int | None = None

    def has_ready(self) -> bool:
        return bool(self.readies)

    def ready(self) -> Ready:
        return self.readies.pop(0)

    def advance(self, rd: Ready) -> None:
        self.events.append(("advance", rd.number))


@attrs.define
class RecordingStorage:
    events: list

    def write(self, records, *, sync: bool = True) -> None:
        self.events.append(("write", tuple(records), sync))


@attrs.define
class RecordingWriter:
    events: list

    def submit(self, records, sync: bool) -> None:
        self.events.append(("submit", tuple(records), sync))


def driver(tmp_path: Path, readies: list) -> tuple[Replica, list]:
    events: list = []
    cfg = ReplicaConfig(rid=0, peers=(("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)), data_dir=tmp_path, secret=b"s")
    r = Replica(cfg)
    r._core = ScriptedCore(readies, events)
    r._applier = Applier(KVMachine())
    r._storage = RecordingStorage(events)
    r._disk = RecordingWriter(events)
    r._log = structlog.get_logger("test")
    r._peer_out = {1: Outbox(), 2: Outbox()}
    return r, events


def rd(number: int, persist: tuple, *, sync: bool = True, messages: tuple = ()) -> Ready:
    return Ready(persist, messages, None, (), sync, number)


def check_order(events: list, readies: list) -> None:
    """Every Ready's records reach the disk (written or submitted) in order, and a Ready is
    advanced only after its records and all earlier ones were handed to the disk; a submitted
    one is advanced by the writer's report, not here."""
    order = {r.persist: r.number for r in readies}
    handed = [order[e[1]] for e in events if e[0] in ("write", "submit") and e[1]]
    assert handed == sorted(handed), events
    written_inline = set()
    for e in events:
        if e[0] == "write":
            written_inline.add(order.get(e[1]))
        elif e[0] == "advance":
            n = e[1]
            for r in readies:
                if r.number <= n and r.persist:
                    assert r.number in written_inline, f"Ready {n} advanced before Ready {r.number} was written: {events}"


def test_a_small_vote_is_written_in_the_pass_and_advanced_after_its_write(tmp_path: Path) -> None:
    vote = rd(1, (SaveAccepted(5, B, value()),))
    r, events = driver(tmp_path, [vote])
    r._run_core()
    assert events == [("write", vote.persist, True), ("advance", 1)]


def test_readies_after_a_pass_write_follow_it_to_the_disk_in_order(tmp_path: Path) -> None:
    vote = rd(1, (SaveAccepted(5, B, value()),), messages=((1, Heartbeat(ballot=B, commit=0, phase1_top=0)),))
    markers = rd(2, (SaveChosen(4, value()),), sync=False)
    big = rd(3, (SaveAccepted(6, B, value(20_000)),))
    readies = [vote, markers, big]
    r, events = driver(tmp_path, list(readies))
    r._run_core()
    check_order(events, readies)
    assert ("advance", 2) not in events and ("advance", 3) not in events  # the writer reports those
    assert [e[0] for e in events] == ["write", "advance", "submit", "submit"]
    assert list(r._unwritten) == [markers, big]


def test_chosen_markers_alone_are_written_last_and_before_a_later_write(tmp_path: Path) -> None:
    markers = rd(1, (SaveChosen(4, value()),), sync=False)
    vote = rd(2, (SaveAccepted(5, B, value()),))
    readies = [markers, vote]
    r, events = driver(tmp_path, list(readies))
    r._run_core()
    check_order(events, readies)
    assert events == [("write", markers.persist, False), ("advance", 1), ("write", vote.persist, True), ("advance", 2)]
    markers_only = rd(3, (SaveChosen(5, value()),), sync=False)
    r._core.readies.append(markers_only)
    r._run_core()
    assert events[-2:] == [("write", markers_only.persist, False), ("advance", 3)]


def test_a_big_write_goes_to_the_writer_and_everything_after_it_too(tmp_path: Path) -> None:
    big = rd(1, (SaveAccepted(6, B, value(20_000)),))
    vote = rd(2, (SaveAccepted(7, B, value()),))
    readies = [big, vote]
    r, events = driver(tmp_path, list(readies))
    r._run_core()
    check_order(events, readies)
    assert [e[0] for e in events] == ["submit", "submit"]
