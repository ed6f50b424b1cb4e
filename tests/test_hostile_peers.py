"""Regression tests of issue 11's network findings, each with its concrete input, against real replicas.

Every test starts ``tasksprint replica`` processes on loopback
(``local_cluster``), sends what the finding described, and checks that the
offending connection (or command) is refused while every replica stays up
and keeps serving.  The numbers are the findings' numbers in the issue:

1. before authentication, a ~450-byte shared-reference DAG used to hang a
   process in C code;
3. one authenticated message used to kill a replica: a Query wait of
   2**1100, a cyclic op, slots and ballots past SQLite's integers;
4. values over the frame cap used to kill the sender;
6. identities were not bound: any ballot rid, any client id, one secret
   for every role;
8. unbounded long-polls (a NaN wait never expired).
"""

from __future__ import annotations

import struct
from typing import Any

import cbor2
import pytest
import trio

from tasksprint import codec, wire
from tasksprint.api import Query, QueryReply, Submit, SubmitRefused
from tasksprint.coordinator.ops import Joined, JoinOp
from tasksprint.localcluster import LocalCluster
from tasksprint.log_client import CommandRefused, LogClient
from tasksprint.paxos.messages import Ballot, Command, Heartbeat
from tasksprint.replica_clients import MAX_PARKED_PER_CONNECTION

pytestmark = pytest.mark.slow

GUARD_SECONDS = 100  # only so that a hang fails
WAIT_SECONDS = 30
POLL_SECONDS = 0.05


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


async def wait_leader(cluster: LocalCluster) -> int:
    with trio.fail_after(WAIT_SECONDS):
        while True:
            for i, addr in enumerate(cluster.addrs):
                try:
                    st = await LogClient(cluster.addrs, cluster.secret).status(addr, timeout=2.0)
                except wire.NETWORK_ERRORS:
                    continue
                if st.role == "leader":
                    return i
            await trio.sleep(POLL_SECONDS)


async def serves(cluster: LocalCluster, tag: str) -> None:
    """Every replica is alive and the cluster applies a command."""
    for i in range(cluster.replicas):
        assert cluster.alive(i), f"replica {i} exited after {tag}"
    async with LogClient(cluster.addrs, cluster.secret) as lc:
        result = await lc.submit(["append", "probes", tag], deadline=WAIT_SECONDS)
    assert isinstance(result, int), f"{tag}: {result!r}"


async def closed_after(stream: trio.SocketStream, data: bytes) -> None:
    """Send ``data``; the replica must close the connection (without our help)."""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(WAIT_SECONDS):
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass


async def authenticated(cluster: LocalCluster, i: int, *, role: str = "client", ident: str = "tester") -> Any:
    stream = await trio.open_tcp_stream(*cluster.addrs[i])
    await wire.handshake(
        wire.Connection(stream), secret=cluster.secret, role=role, ident=ident, side=wire.Side.INITIATOR
    )
    return stream


def problems(cluster: LocalCluster, i: int) -> list[str]:
    import json

    out = []
    for line in cluster.log_file(i).read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "connection_closed" and event.get("reason") != "peer_closed":
                out.append(f"{event.get('reason')}: {event.get('error')}")
    return out


async def logged(cluster: LocalCluster, i: int, *needles: str, count: int = 1) -> None:
    """Wait until replica ``i`` logged ``count`` closed connections whose reason and error contain every needle."""
    with trio.fail_after(WAIT_SECONDS):
        while sum(all(n in p for n in needles) for p in problems(cluster, i)) < count:
            await trio.sleep(POLL_SECONDS)


async def test_finding_1_a_shared_reference_dag_before_authentication_closes_only_that_connection(local_cluster):
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        await wait_leader(cluster)
        # Tag 28 (shareable) around arrays of tag 29 (references) 30 levels
        # deep: hashing it as a map key took exponential time.
        dag = b"\xd8\x1c\x82\xd8\x1d\x00\xd8\x1d\x00" * 30
        body = b"\xa1" + dag + b"\x00" + b"\x00"
        for i in range(3):
            await closed_after(await trio.open_tcp_stream(*cluster.addrs[i]), frame(body))
        await serves(cluster, "shared-reference DAG")
        await logged(cluster, 0, "expected a Hello")


async def test_finding_3_one_authenticated_message_never_kills_a_replica(local_cluster):
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster)
        # A wait of 2**1100 arrives as a bignum: refused at decoding, the connection closes.
        big_wait = codec.encode(Query(name="view", args={"cid": 0, "wait": 0}))
        big_wait = big_wait.replace(b"\x64wait\x00", b"\x64wait" + codec.encode(2**1100))
        await closed_after(await authenticated(cluster, leader), frame(big_wait))
        # Plain numbers the parser refuses (NaN, 2**64-1) are answered at once, never parked.
        conn = wire.Connection(await authenticated(cluster, leader))
        async with conn:
            for wait in (float("nan"), 2**64 - 1, float("inf")):
                await conn.send(Query(name="view", args={"cid": 0, "wait": wait}))
                with trio.fail_after(WAIT_SECONDS):
                    reply = await conn.receive()
                assert isinstance(reply, QueryReply)
        # Slots and ballots past 2**63-1 do not decode into a message: SQLite never sees them.
        sender = (leader + 2) % 3
        huge = cbor2.dumps(
            cbor2.CBORTag(codec.OBJECT_TAG, ["Accept", Ballot(10**6, sender), [], 2**64 - 1]), default=codec._default
        )
        stream = await authenticated(cluster, (leader + 1) % 3, role="replica", ident=str(sender))
        await closed_after(stream, frame(huge))
        await logged(cluster, (leader + 1) % 3, "2**63")
        # A cyclic op never leaves the submitter: refused with a clear error.
        cyclic: list[Any] = ["append", "x"]
        cyclic.append(cyclic)
        async with LogClient(cluster.addrs, cluster.secret) as lc:
            with pytest.raises(CommandRefused, match="cannot be encoded"):
                await lc.submit(cyclic)
        await serves(cluster, "finding 3")


async def test_finding_4_a_command_over_the_frame_cap_is_refused_to_its_submitter(local_cluster):
    cluster = local_cluster(3, extra_args=["--max-frame", str(256 * 1024)])
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster)
        conn = wire.Connection(await authenticated(cluster, leader, ident="big"))
        async with conn:
            await conn.send(Submit(command=Command(client_id="big", seq=1, op=["append", "x", "y" * 200_000])))
            with trio.fail_after(WAIT_SECONDS):
                reply = await conn.receive()
        assert isinstance(reply, SubmitRefused) and "over the" in reply.reason, reply
        async with LogClient(cluster.addrs, cluster.secret, max_frame=256 * 1024) as lc:
            with pytest.raises(CommandRefused, match="over the"):
                await lc.submit(["append", "x", "y" * 300_000])
            # Many commands that each fit go in blocks under the cap, and are all applied.
            results = await lc.submit_many([["append", "many", "z" * 50_000] for _ in range(12)], deadline=WAIT_SECONDS)
        assert results == list(range(1, 13))
        await serves(cluster, "finding 4")


async def test_finding_6_claims_must_match_the_authenticated_identity(local_cluster):
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster)
        follower = (leader + 1) % 3
        other = (leader + 2) % 3
        # A Heartbeat for replica 99, and one for another replica, from replica `other`.
        for rid in (99, leader):
            stream = await authenticated(cluster, follower, role="replica", ident=str(other))
            await closed_after(
                stream, frame(codec.encode(Heartbeat(ballot=Ballot(10**6, rid), commit=0, phase1_top=0)))
            )
        await logged(cluster, follower, "bad_message", "sent by replica", count=2)
        # A command under another client's id.
        stream = await authenticated(cluster, leader, ident="mallory")
        await closed_after(
            stream, frame(codec.encode(Submit(command=Command(client_id="alice", seq=1, op=["get", "x"]))))
        )
        # The replicas' own client id (the coordinator's init) cannot be used to submit.
        stream = await authenticated(cluster, leader, ident="__init__")
        await closed_after(
            stream, frame(codec.encode(Submit(command=Command(client_id="__init__", seq=1, op=["get", "x"]))))
        )
        # A client credential talks to the replicas but cannot act as one.
        credential = wire.client_credential(cluster.secret)
        with pytest.raises(ValueError, match="cannot act as a replica"):
            wire.Endpoint(secret=credential, role="replica", ident=str(other))
        async with LogClient(cluster.addrs, credential) as lc:
            assert isinstance(await lc.submit(["append", "probes", "with a credential"], deadline=WAIT_SECONDS), int)
        # Nor can a forged Hello claiming the replica role with the client key pass.
        stream = await trio.open_tcp_stream(*cluster.addrs[follower])
        conn = wire.Connection(stream)
        hello = wire.Hello(nonce=b"\x07" * 32, role="replica", ident=str(other))
        await conn.send(hello)
        theirs = await conn.receive()
        mac = wire.proof_mac(wire.role_keys(credential).client, wire.Side.INITIATOR, hello, theirs)
        await closed_after(stream, frame(codec.encode(wire.Proof(mac=mac))))
        await logged(cluster, follower, "auth_failed", "replica key")
        await serves(cluster, "finding 6")


IDLE_SCHEDULER = """
from tasksprint import Coordinator

class Idle(Coordinator):
    def init(self, seed):
        self.n = 0
"""


async def test_finding_8_long_polls_parked_per_connection_are_bounded(local_cluster, tmp_path):
    sched = tmp_path / "idle.py"
    sched.write_text(IDLE_SCHEDULER)
    cluster = local_cluster(3, scheduler=f"{sched}:Idle")
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster)
        async with LogClient(cluster.addrs, cluster.secret, client_id="w") as lc:
            with trio.fail_after(WAIT_SECONDS):
                while True:
                    joined = await lc.submit(JoinOp(client="w", addr="127.0.0.1:1", slots=1).to_wire())
                    if isinstance(joined, Joined):
                        break
                    await trio.sleep(POLL_SECONDS)
        conn = wire.Connection(await authenticated(cluster, leader))
        async with conn:
            # Views that wait for a change that never comes: 16 park, the rest
            # are answered at once (a view after version 10**9 is empty).
            extra = 5
            for _ in range(MAX_PARKED_PER_CONNECTION + extra):
                await conn.send(Query(name="view", args={"cid": joined.cid, "after": 10**9, "wait": 3000}))
            with trio.fail_after(WAIT_SECONDS):
                replies = [await conn.receive() for _ in range(extra)]
            assert all(isinstance(r, QueryReply) and not r.error for r in replies), replies
        await serves_coordinator(cluster, "finding 8")


async def serves_coordinator(cluster: LocalCluster, tag: str) -> None:
    for i in range(cluster.replicas):
        assert cluster.alive(i), f"replica {i} exited after {tag}"
    async with LogClient(cluster.addrs, cluster.secret) as lc:
        st = await lc.query("status", {})
    assert st.state == "running", st
