"""The replica's driver pass against a scripted core: records reach the disk in order,
and no Ready is advanced (its held replies released) before its records and every
earlier Ready's are written.

The simulator checks the protocol core through the same driver; these tests check,
Ready by Ready, what the driver writes in the pass, what goes to the background
writer and what waits for the end of the pass.
"""

from __future__ import annotations

from typing import Any

import attrs

from tasksprint.api import PeerDigest, Result
from tasksprint.app import KVApp
from tasksprint.driver import DriverConfig, ReplicaDriver
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


def driver(readies: list, core: type[ScriptedCore] = ScriptedCore, **config: Any) -> tuple[ReplicaDriver, list]:
    events: list = []
    app = KVApp()
    d = ReplicaDriver(
        core=core(readies, events),
        applier=Applier(app.machine),
        app=app,
        storage=RecordingStorage(events),
        writer=RecordingWriter(events),
        peers={1: RecordingMailbox(events, 1), 2: RecordingMailbox(events, 2)},
        wake=lambda: events.append(("wake",)),
        clock=lambda: 0.0,
        config=DriverConfig(**config),
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


# ----------------------------------------------------------------------
# Answers leave only once a majority shares the state they describe


@attrs.define
class ProposingCore(ScriptedCore):
    """A leader that takes every command (the test hands out the Readies that choose them)."""

    role: Role = Role.LEADER
    #: The peers the latest Accept went to (see PaxosCore.accepting): every one.
    accepting: tuple[int, ...] = (1, 2)

    def propose(self, cmd: object) -> bool:
        return True

    def tick(self, now: float, data: object = None, wall: float | None = None) -> None:
        pass


def applying(number: int, slot: int, *items: Command) -> Ready:
    return Ready((), (), None, ((slot, Batch(items=items)),), False, number)


def leader_driver(**config: Any) -> tuple[ReplicaDriver, list, RecordingMailbox]:
    r, events = driver([], ProposingCore, **config)
    return r, events, RecordingMailbox(events, 99)


def pushed_to(events: list, dst: int) -> list:
    return [e[2] for e in events if e[0] == "push" and e[1] == dst]


def test_a_command_result_waits_for_a_peer_to_report_the_same_digest() -> None:
    r, events, client = leader_driver()
    cmd = Command(client_id="c", seq=1, op=["put", "k", "v"])
    assert r.submit(cmd, client)
    r.core.readies.append(applying(1, 1, cmd))
    r.run()
    assert r.applier.applied == 1 and r.confirmed == 0
    assert pushed_to(events, 99) == [] and r.held == 1, "applied here alone: not answered yet"
    [mine] = [m for m in pushed_to(events, 1) if isinstance(m, PeerDigest)]
    r.digest_from(1, attrs.evolve(mine, digest=b"\x00" * len(mine.digest)))  # peer 1 differs
    assert pushed_to(events, 99) == [] and r.confirmed == 0
    r.digest_from(2, mine)  # peer 2 agrees: a majority of three
    [result] = pushed_to(events, 99)
    assert isinstance(result, Result) and result.seq == 1 and r.held == 0


def test_a_query_answered_after_a_new_slot_waits_for_that_slot_to_be_confirmed() -> None:
    """Regression: a long-poll parked before slot 2 was answered from the state after
    slot 2 as soon as slot 2 was applied, although only slot 1 was confirmed."""
    r, events, client = leader_driver()
    r.core.readies.append(applying(1, 1, Command(client_id="c", seq=1, op=["put", "k", "1"])))
    r.run()
    first = [m for m in pushed_to(events, 1) if isinstance(m, PeerDigest)][-1]
    r.digest_from(1, first)
    assert r.confirmed == 1
    r.answer(client, "state after slot 1")
    assert pushed_to(events, 99) == ["state after slot 1"]
    r.core.readies.append(applying(2, 2, Command(client_id="c", seq=2, op=["put", "k", "2"])))
    r.run()
    r.answer(client, "state after slot 2")
    assert pushed_to(events, 99) == ["state after slot 1"]
    r.digest_from(2, [m for m in pushed_to(events, 2) if isinstance(m, PeerDigest)][-1])
    assert pushed_to(events, 99) == ["state after slot 1", "state after slot 2"]


def test_a_leader_reports_at_once_to_the_followers_its_accepts_go_to_and_to_the_others_at_its_tick() -> None:
    """Light load: a thrifty Accept went to follower 1 only; follower 2 hears of the
    slot from the heartbeat at the next tick, and of the leader's digest then too."""
    r, events, client = leader_driver()
    r.core.accepting = (1,)
    cmd = Command(client_id="c", seq=1, op=["put", "k", "v"])
    assert r.submit(cmd, client)
    r.core.readies.append(applying(1, 1, cmd))
    r.run()
    [report] = [m for m in pushed_to(events, 1) if isinstance(m, PeerDigest)]
    assert report.slot == 1
    assert not [m for m in pushed_to(events, 2) if isinstance(m, PeerDigest)]
    r.digest_from(1, report)  # follower 1's own report agrees: the answer leaves
    assert [m.seq for m in pushed_to(events, 99)] == [1]
    r.tick(1.0)
    assert [m.slot for m in pushed_to(events, 2) if isinstance(m, PeerDigest)] == [1]
    assert len([m for m in pushed_to(events, 1) if isinstance(m, PeerDigest)]) == 1, "told once"


def test_held_answers_of_a_closed_connection_are_dropped_and_a_quiet_replica_reports_at_its_tick() -> None:
    r, events, client = leader_driver(digest_every=1000)  # a busy replica's spacing: no report in the pass
    r.core.readies.append(applying(1, 1, Command(client_id="c", seq=1, op=["put", "k", "1"])))
    r.run()
    assert not [m for m in pushed_to(events, 1) if isinstance(m, PeerDigest)]
    r.answer(client, "kept")
    closing = RecordingMailbox(events, 98)
    r.answer(closing, "for a connection that closes")
    r.forget(closing)
    assert r.held == 1
    r.tick(1.0)  # the last slot before a quiet spell is reported at the next tick
    [report] = [m for m in pushed_to(events, 1) if isinstance(m, PeerDigest)]
    assert report.slot == 1
    r.digest_from(1, report)
    assert pushed_to(events, 99) == ["kept"] and pushed_to(events, 98) == []


def test_a_tick_asks_for_a_pass_only_if_it_gave_the_core_something_to_do() -> None:
    """Most ticks change nothing (no heartbeat or timeout due): a pass for each would cost
    the replica more than the messages it handles, so the driver asks for one only when
    the core has a Ready or its role changed."""
    r, events, _ = leader_driver()
    r.run()  # the driver notes the core's role
    events.clear()
    r.tick(1.0)
    assert ("wake",) not in events
    r.core.readies.append(rd(1, ()))  # as a heartbeat the tick made
    r.tick(2.0)
    assert ("wake",) in events
    r.run()
    events.clear()
    r.core.role = Role.FOLLOWER  # as a leader stepping down at its tick (check-quorum)
    r.tick(3.0)
    assert ("wake",) in events


@attrs.define
class FollowingCore(ScriptedCore):
    """A follower of replica 1 whose ticks change nothing."""

    leader_hint: int | None = 1

    def tick(self, now: float, data: object = None, wall: float | None = None) -> None:
        pass


def test_a_follower_of_three_reports_to_the_other_follower_only_every_spacing() -> None:
    """Its leader hears its digest at once; the other follower needs it only if the leader
    differs, so it is sent at a tick at most every ``follower_digest_spacing`` seconds."""
    r, events = driver([], FollowingCore, follower_digest_spacing=0.1)

    def digests(dst: int) -> list[int]:
        return [m.slot for m in pushed_to(events, dst) if isinstance(m, PeerDigest)]

    r.core.readies.append(applying(1, 1, Command(client_id="c", seq=1, op=["put", "k", "1"])))
    r.run()
    assert digests(1) == [1] and digests(2) == []
    r.tick(1.0)
    assert digests(2) == [1]
    r.core.readies.append(applying(2, 2, Command(client_id="c", seq=2, op=["put", "k", "2"])))
    r.run()
    r.tick(1.05)
    assert digests(1) == [1, 2] and digests(2) == [1], "the other follower waits"
    r.tick(1.1)
    assert digests(2) == [1, 2]
