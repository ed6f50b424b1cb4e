"""Tests of the replica's Outbox: what is queued for one connection leaves in order, at once when it can."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio
import trio.testing
from streams import socket_pair

from tasksprint import codec
from tasksprint.outbox import Outbox
from tasksprint.paxos.leadership import Phase1
from tasksprint.paxos.messages import Accept, AcceptedValue, Ballot, Batch, Command, Promise, Proposal
from tasksprint.wire import Connection

GUARD_SECONDS = 30  # only so that a hang fails; never a measurement
BIG = "z" * 2_000_000  # far more than the socket buffers hold


@contextlib.asynccontextmanager
async def pumping(sndbuf: int | None = None) -> AsyncIterator[tuple[Outbox, Connection, Connection]]:
    """An Outbox whose pump runs on the sending side of a socket pair, waiting for messages."""
    left, right = socket_pair(sndbuf)
    box = Outbox()
    with trio.fail_after(GUARD_SECONDS):
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(box.pump, left)
            await trio.testing.wait_all_tasks_blocked()
            yield box, left, right
            nursery.cancel_scope.cancel()


async def test_flush_sends_from_the_calling_task_when_the_connection_is_idle():
    async with pumping() as (box, left, right):
        with trio.testing.assert_no_checkpoints():
            box.push("a")
            box.push("b")
            box.flush()
        assert [await right.receive(), await right.receive()] == ["a", "b"]
        box.push("c")
        await trio.testing.wait_all_tasks_blocked()
        assert box.waiting == 1  # queued until the next flush
        box.flush()
        assert await right.receive() == "c"


class _StepCounter(trio.abc.Instrument):
    """Counts the steps of the tasks whose name contains ``part``."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.part in task.name:
            self.steps += 1


async def test_a_flush_that_hands_everything_over_does_not_wake_the_pump():
    async with pumping() as (box, left, right):
        counter = _StepCounter("Outbox.pump")
        trio.lowlevel.add_instrument(counter)
        try:
            for i in range(5):
                box.push(i)
                box.flush()
                assert await right.receive() == i
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 0


async def test_flush_before_the_pump_runs_leaves_the_messages_to_it():
    left, right = socket_pair()
    box = Outbox()
    with trio.fail_after(GUARD_SECONDS):
        async with left, right, trio.open_nursery() as nursery:
            box.push("early")
            box.flush()  # no connection yet
            nursery.start_soon(box.pump, left)
            assert await right.receive() == "early"
            nursery.cancel_scope.cancel()


async def test_flush_during_a_blocked_send_keeps_the_order():
    async with pumping(sndbuf=4096) as (box, left, right):
        box.push(BIG)
        box.flush()  # hands over part of it; the pump writes the rest
        box.push("one")
        box.flush()  # bytes are waiting: declined, queued for the pump
        await trio.testing.wait_all_tasks_blocked()  # the pump blocks on the full socket
        box.push("two")
        box.flush()  # a send is in progress: queued for the pump
        got = [await right.receive() for _ in range(3)]
        assert got == [BIG, "one", "two"]


async def test_the_pump_writes_what_flush_could_hand_over_only_in_part():
    async with pumping(sndbuf=4096) as (box, left, right):
        box.push(BIG)
        box.flush()
        assert left.backlog
        assert await right.receive() == BIG  # nothing else pushed: the pump still finishes it


def _accept(n: int, size: int) -> Accept:
    value = Batch(items=(Command(client_id="c", seq=1, op="v" * size),))
    return Accept(
        ballot=Ballot(1, 0), proposals=tuple(Proposal(slot=s, value=value) for s in range(1, n + 1)), commit=0
    )


async def test_a_message_of_several_values_over_the_frame_cap_is_split_not_fatal():
    """Finding 4: an Accept of 8 proposals of 100 kB, under a 256 kB cap, leaves as several Accepts."""
    left, right = socket_pair()
    box = Outbox(max_frame=256 * 1024)
    with trio.fail_after(GUARD_SECONDS):
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(box.pump, left)
            box.push(_accept(8, 100_000))
            box.flush()
            got: list[Accept] = []
            while sum(len(a.proposals) for a in got) < 8:
                got.append(await right.receive())
            assert len(got) > 1 and all(isinstance(a, Accept) and a.ballot == Ballot(1, 0) for a in got)
            assert [p.slot for a in got for p in a.proposals] == list(range(1, 9))
            # One value alone over the cap cannot be split: dropped, logged, and the box goes on.
            box.push(_accept(1, 300_000))
            box.push("after")
            box.flush()
            assert await right.receive() == "after"
            nursery.cancel_scope.cancel()


async def test_a_promise_over_the_frame_cap_leaves_in_parts_that_add_up_to_it():
    """Finding 4: a Promise of 8 accepted values of 100 kB under a 256 kB cap was
    dropped; it now leaves as parts, and a candidate holding them all decides
    as it would on the whole Promise."""
    value = Batch(items=(Command(client_id="c", seq=1, op="v" * 100_000),))
    whole = Promise(
        ballot=Ballot(2, 1),
        log_start=1,
        accepted=tuple(AcceptedValue(slot=s, ballot=Ballot(1, 0), value=value) for s in range(3, 11)),
    )
    left, right = socket_pair()
    box = Outbox(max_frame=256 * 1024)
    with trio.fail_after(GUARD_SECONDS):
        async with left, right, trio.open_nursery() as nursery:
            nursery.start_soon(box.pump, left)
            box.push(whole)
            box.flush()
            p1 = Phase1(Ballot(2, 1), from_slot=2)
            parts: list[Promise] = []
            while not p1.has(0):
                part = await right.receive()
                assert isinstance(part, Promise)
                parts.append(part)
                p1.add(0, part)
            nursery.cancel_scope.cancel()
    assert len(parts) > 1
    assert sorted(a.slot for p in parts for a in p.accepted) == list(range(3, 11))
    reference = Phase1(Ballot(2, 1), from_slot=2)
    reference.add(0, whole)
    assert p1.outcome() == reference.outcome()


def test_the_queue_is_bounded_in_bytes_dropping_the_oldest():
    box = Outbox(limit_bytes=10_000)
    for i in range(50):
        box.push({"n": i, "pad": "p" * 1000})
    assert box.dropped > 0 and box._bytes <= 10_000
    frames = list(box._queue)
    assert len(frames) == 50 - box.dropped
    assert codec.decode(frames[-1][4:])["n"] == 49  # the newest are kept
