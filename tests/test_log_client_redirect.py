"""LogClient follows a leader hint without waiting for the new connection: it keeps
sending through the replica that answered until the leader's connection is open,
and keeps that replica if the leader cannot be reached."""

from __future__ import annotations

import functools

import trio

from tasksprint import wire
from tasksprint.api import BlockResult, SubmitBlock
from tasksprint.log_client import LogClient

SECRET = b"s" * 32
GUARD_SECONDS = 20


class FakeReplica:
    """Answers every block with its ops' count as results and ``leader`` as the hint; records who sent what."""

    def __init__(self, rid: int, leader: int) -> None:
        self.rid = rid
        self.leader = leader
        self.seqs: list[int] = []

    async def handle(self, conn: wire.Connection) -> None:
        while True:
            msg = await conn.receive()
            assert isinstance(msg, SubmitBlock)
            ops = msg.block.op_list()
            self.seqs += range(msg.block.first_seq, msg.block.first_seq + len(ops))
            await conn.send(
                BlockResult(
                    client_id=msg.block.client_id,
                    first_seq=msg.block.first_seq,
                    results=tuple(self.rid for _ in ops),
                    slot=1,
                    leader=self.leader,
                )
            )


async def start(nursery: trio.Nursery, replica: FakeReplica) -> tuple[str, int]:
    endpoint = wire.Endpoint(secret=SECRET, role="replica", ident=str(replica.rid))
    listeners = await nursery.start(functools.partial(wire.serve, replica.handle, "127.0.0.1", 0, endpoint))
    return ("127.0.0.1", listeners[0].socket.getsockname()[1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_leader_hint_moves_the_client_to_the_leader_once_connected() -> None:
    with trio.fail_after(GUARD_SECONDS):
        follower, leader = FakeReplica(0, leader=1), FakeReplica(1, leader=1)
        async with trio.open_nursery() as nursery:
            addrs = [await start(nursery, follower), await start(nursery, leader)]
            async with LogClient(addrs, SECRET) as client:
                assert await client.submit("a") == 0  # through replica 0, which names replica 1
                with trio.move_on_after(GUARD_SECONDS / 2):
                    while client.target != addrs[1]:
                        await trio.sleep(0.01)
                assert client.target == addrs[1]
                assert await client.submit("b") == 1
            nursery.cancel_scope.cancel()
        assert (follower.seqs, leader.seqs) == ([1], [2])


async def test_an_unreachable_leader_hint_keeps_the_replica_that_answers() -> None:
    with trio.fail_after(GUARD_SECONDS):
        follower = FakeReplica(0, leader=1)
        async with trio.open_nursery() as nursery:
            addrs = [await start(nursery, follower), ("127.0.0.1", free_port())]  # nobody listens there
            async with LogClient(addrs, SECRET) as client:
                results = [await client.submit(i) for i in range(20)]
                await trio.sleep(0.05)
                results.append(await client.submit("last"))
                assert client.target == addrs[0]
            nursery.cancel_scope.cancel()
        # Every command went through replica 0, none waited for a connection that could not open.
        assert results == [0] * 21 and follower.seqs == list(range(1, 22)) and client.resent == 0


async def test_an_idle_connection_takes_a_submit_from_the_submitting_task(monkeypatch) -> None:
    """At light load every write goes to the socket at once, without trio's send (one trip through
    the scheduler less per command); what the socket cannot take at once still goes out whole."""
    sends: list[int] = []
    send_many = wire.Connection.send_many

    async def counting_send_many(self, msgs) -> None:
        msgs = list(msgs)
        sends.append(len(msgs))
        await send_many(self, msgs)

    monkeypatch.setattr(wire.Connection, "send_many", counting_send_many)
    with trio.fail_after(GUARD_SECONDS):
        replica = FakeReplica(0, leader=0)
        async with trio.open_nursery() as nursery:
            addrs = [await start(nursery, replica)]
            async with LogClient(addrs, SECRET) as client:
                assert [await client.submit(i) for i in range(10)] == [0] * 10
                assert sends == []
                # Far more than a socket buffer holds: the rest follows the part written at once.
                big = ["x" * 4000 for _ in range(1000)]
                assert await client.submit_many(big) == [0] * 1000
                assert sends == [0]  # the rest only: the blocks were encoded and written once
            nursery.cancel_scope.cancel()
    assert replica.seqs == list(range(1, 1011))
