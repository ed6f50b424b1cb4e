"""The replica's driver pass against a scripted core: records reach the disk in order,
and no Ready is advanced (its held replies released) before its records and every
earlier Ready's are written.

The simulator checks the protocol core through the same driver; these tests check,
Ready by Ready, what the driver writes in the pass, what goes to the background
writer and what waits for the end of the pass.
"""

from __future__ import annotations

import attrs

from tasksprint.app import KVApp
from tasksprint.driver import ReplicaDriver
from tasksprint.machine import Applier
from tasksprint.paxos.core import Role
from tasksprint.paxos.durable import SaveAccepted, SaveChosen
from tasksprint.paxos.messages import Ballot, Batch, Command, Heartbeat
from tasksprint.paxos.output import Ready

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
    rid: int = 0

    def has_ready(self) -> bool:
        return bool(self.readies)

    def ready(self) -> Ready:
        return self.readies.pop(0)

    def advance(self, rd: Ready) -> None:
        self.events.append(("advance", rd.number))

    # Not scripted: these tests feed the driver Readies only.
    def step(self, src: int, msg: object) -> None:
        raise AssertionError("ScriptedCore.step is not scripted")

    def propose(self, cmd: object) -> bool:
        raise AssertionError("ScriptedCore.propose is not scripted")

    def tick(self, now: float, data: object = None, wall: float | None = None) -> None:
        raise AssertionError("ScriptedCore.tick is not scripted")


@attrs.define
class RecordingStorage:
    events: list

    def write(self, records, *, sync: bool = True) -> None:
        self.events.append(("write", tuple(records), sync))


@attrs.define
class RecordingMailbox:
    events: list
    dst: int

    def push(self, msg) -> None:
        self.events.append(("push", self.dst, msg))

    def flush(self) -> None:
        pass


@attrs.define
class RecordingWriter:
    events: list

    def submit(self, records, sync: bool) -> None:
        self.events.append(("submit", tuple(records), sync))


def driver(readies: list) -> tuple[ReplicaDriver, list]:
    events: list = []
    app = KVApp()
    d = ReplicaDriver(
        core=ScriptedCore(readies, events),
        applier=Applier(app.machine),
        app=app,
        storage=RecordingStorage(events),
        writer=RecordingWriter(events),
        peers={1: RecordingMailbox(events, 1), 2: RecordingMailbox(events, 2)},
        wake=lambda: events.append(("wake",)),
        clock=lambda: 0.0,
    )
    return d, events


def disk_events(events: list) -> list:
    return [e for e in events if e[0] in ("write", "submit", "advance")]


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
                    assert r.number in written_inline, (
                        f"Ready {n} advanced before Ready {r.number} was written: {events}"
                    )


def test_a_small_vote_is_written_in_the_pass_and_advanced_after_its_write() -> None:
    vote = rd(1, (SaveAccepted(5, B, value()),))
    r, events = driver([vote])
    r.run()
    assert disk_events(events) == [("write", vote.persist, True), ("advance", 1)]


def test_readies_after_a_pass_write_follow_it_to_the_disk_in_order() -> None:
    vote = rd(1, (SaveAccepted(5, B, value()),), messages=((1, Heartbeat(ballot=B, commit=0, phase1_top=0)),))
    markers = rd(2, (SaveChosen(4, value()),), sync=False)
    big = rd(3, (SaveAccepted(6, B, value(20_000)),))
    readies = [vote, markers, big]
    r, events = driver(list(readies))
    r.run()
    check_order(events, readies)
    assert ("advance", 2) not in events and ("advance", 3) not in events  # the writer reports those
    assert [e[0] for e in disk_events(events)] == ["write", "advance", "submit", "submit"]
    assert r.writes_in_flight == 2
    # The vote's Heartbeat was queued for its peer before anything was written.
    assert events.index(("push", 1, vote.messages[0][1])) < events.index(("write", vote.persist, True))
    r.written(1)
    r.written(1)
    assert disk_events(events)[-2:] == [("advance", 2), ("advance", 3)]
    assert r.writes_in_flight == 0


def test_chosen_markers_alone_are_written_last_and_before_a_later_write() -> None:
    markers = rd(1, (SaveChosen(4, value()),), sync=False)
    vote = rd(2, (SaveAccepted(5, B, value()),))
    readies = [markers, vote]
    r, events = driver(list(readies))
    r.run()
    check_order(events, readies)
    assert disk_events(events) == [
        ("write", markers.persist, False),
        ("advance", 1),
        ("write", vote.persist, True),
        ("advance", 2),
    ]
    markers_only = rd(3, (SaveChosen(5, value()),), sync=False)
    r.core.readies.append(markers_only)
    r.run()
    assert disk_events(events)[-2:] == [("write", markers_only.persist, False), ("advance", 3)]


def test_a_big_write_goes_to_the_writer_and_everything_after_it_too() -> None:
    big = rd(1, (SaveAccepted(6, B, value(20_000)),))
    vote = rd(2, (SaveAccepted(7, B, value()),))
    readies = [big, vote]
    r, events = driver(list(readies))
    r.run()
    check_order(events, readies)
    assert [e[0] for e in disk_events(events)] == ["submit", "submit"]
