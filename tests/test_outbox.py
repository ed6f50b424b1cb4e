"""Tests of the replica's Outbox: what is queued for one connection leaves in order, at once when it can."""

from __future__ import annotations

import trio
import trio.testing

from tasksprint.replica import Outbox
from tasksprint.wire import Connection

GUARD_SECONDS = 30  # only so that a hang fails; never a measurement
BIG = "z" * 2_000_000  # far more than the socket buffers hold


def socket_pair(sndbuf: int | None = None) -> tuple[Connection, Connection]:
    """Connections over a socket pair; ``sndbuf`` shrinks the sender's buffer."""
    a, b = trio.socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, sndbuf)
    return Connection(trio.SocketStream(a)), Connection(trio.SocketStream(b))


async def start_pump(nursery: trio.Nursery, box: Outbox, conn: Connection) -> None:
    nursery.start_soon(box.pump, conn)
    await trio.testing.wait_all_tasks_blocked()  # the pump waits for messages


async def test_flush_sends_from_the_calling_task_when_the_connection_is_idle():
    left, right = socket_pair()
    box = Outbox()
    with trio.fail_after(GUARD_SECONDS):
        async with left, right, trio.open_nursery() as nursery:
            await start_pump(nursery, box, left)
            with trio.testing.assert_no_checkpoints():
                box.push("a")
                box.push("b")
                box.flush()
            assert [await right.receive(), await right.receive()] == ["a", "b"]
            box.push("c")  # no flush: the pump sends it
            assert await right.receive() == "c"
            nursery.cancel_scope.cancel()


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
    left, right = socket_pair(sndbuf=4096)
    box = Outbox()
    with trio.fail_after(GUARD_SECONDS):
        async with left, right, trio.open_nursery() as nursery:
            await start_pump(nursery, box, left)
            box.push(BIG)
            box.flush()  # hands over part of it; the pump writes the rest
            box.push("one")
            box.flush()  # bytes are waiting: declined, queued for the pump
            await trio.testing.wait_all_tasks_blocked()  # the pump blocks on the full socket
            box.push("two")
            box.flush()  # a send is in progress: queued for the pump
            got = [await right.receive() for _ in range(3)]
            assert got == [BIG, "one", "two"]
            nursery.cancel_scope.cancel()


async def test_the_pump_writes_what_flush_could_hand_over_only_in_part():
    left, right = socket_pair(sndbuf=4096)
    box = Outbox()
    with trio.fail_after(GUARD_SECONDS):
        async with left, right, trio.open_nursery() as nursery:
            await start_pump(nursery, box, left)
            box.push(BIG)
            box.flush()
            assert left.backlog
            assert await right.receive() == BIG  # nothing else pushed: the pump still finishes it
            nursery.cancel_scope.cancel()
