"""End-to-end tests of the replicated log with real ``tasksprint replica`` processes.

Every test here starts replica processes on loopback (``LocalCluster``, data
directories and logs under ``tmp_path``), drives them with ``LogClient`` or
raw wire connections, and checks the invariants of the design on what the
processes themselves report:

* agreement: replicas that applied the same number of slots report the same
  digest, and all of them converge to one (applied, digest);
* durability: a replica killed with SIGKILL comes back from its data
  directory; a wiped one rebuilds from the others; a far-behind one is sent a
  snapshot;
* exactly-once effect: every acknowledged ``append`` is in the final list
  once, at the position its answer named, across a leader crash;
* liveness: with a majority up the cluster keeps answering;
* robustness: bad peers, bad frames and bad start-up arguments are refused
  without taking a process down (or, at start-up, with a message naming the
  problem).

Timing: every wait polls until a condition holds and is bounded by a
generous deadline that only turns a hang into a failure; no test asserts how
long anything took.  The replicas are stopped and reaped by the
``local_cluster`` fixture whatever happens.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pytest
import trio

from tasksprint import codec, wire
from tasksprint.api import ReplicaStatus, Result, Submit, SubmitBlock
from tasksprint.localcluster import HOST, LocalCluster, free_ports
from tasksprint.log_client import LogClient, SessionExpiredError
from tasksprint.paxos.core import PaxosConfig
from tasksprint.paxos.messages import Command, CommandBlock
from tasksprint.storage import Storage

pytestmark = pytest.mark.slow

# Upper bound on one test, only so that a hang fails instead of blocking the suite.
GUARD_SECONDS = 100
# Upper bound on any one wait for the cluster to reach a state (a leader, convergence, ...).
WAIT_SECONDS = 30
# How long a client keeps retrying one command before it reports the cluster unavailable.
SUBMIT_DEADLINE = 30.0
# Upper bound on a replica process that must refuse to start.
STARTUP_TIMEOUT = 30
POLL_SECONDS = 0.05

# --------------------------------------------------------------------------
# Observing the cluster


async def replica_status(cluster: LocalCluster, i: int) -> ReplicaStatus | None:
    """Replica ``i``'s status, or None if it does not answer."""
    try:
        return await LogClient(cluster.addrs, cluster.secret).status(cluster.addrs[i], timeout=2.0)
    except wire.NETWORK_ERRORS:
        return None


async def statuses(cluster: LocalCluster, replicas: Iterable[int]) -> dict[int, ReplicaStatus | None]:
    """The status of several replicas, asked at the same time."""
    out: dict[int, ReplicaStatus | None] = {}

    async def ask(i: int) -> None:
        out[i] = await replica_status(cluster, i)

    async with trio.open_nursery() as nursery:
        for i in replicas:
            nursery.start_soon(ask, i)
    return out


def _show(sts: dict[int, ReplicaStatus | None] | None) -> str:
    if not sts:
        return "no answer yet"
    return "; ".join(
        f"replica {i}: unreachable"
        if s is None
        else f"replica {i}: {s.role} leader={s.leader} ballot={s.ballot} applied={s.applied} digest={s.digest[:12]}"
        for i, s in sorted(sts.items())
    )


def _check_agreement(sts: dict[int, ReplicaStatus | None], seen: dict[int, tuple[str, int]]) -> None:
    """Fail if two replicas ever reported different digests after the same applied slot."""
    for i, s in sts.items():
        if s is None or s.applied == 0:
            continue
        if s.applied in seen and seen[s.applied][0] != s.digest:
            other_digest, other = seen[s.applied]
            pytest.fail(
                f"agreement broken: after slot {s.applied} replica {i} has digest {s.digest} "
                f"but replica {other} had {other_digest}"
            )
        seen.setdefault(s.applied, (s.digest, i))


async def wait_leader(cluster: LocalCluster, replicas: Iterable[int], *, timeout: float = WAIT_SECONDS) -> int:
    """Wait until one of ``replicas`` leads and all the others of them follow it; return its id."""
    replicas = list(replicas)
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await statuses(cluster, replicas)
            leaders = [i for i, s in last.items() if s is not None and s.role == "leader"]
            if len(leaders) == 1 and all(s is not None and s.leader == leaders[0] for s in last.values()):
                return leaders[0]
            await trio.sleep(POLL_SECONDS)
    pytest.fail(f"replicas {replicas} agreed on no leader within {timeout}s: {_show(last)}")


async def wait_converged(
    cluster: LocalCluster, replicas: Iterable[int], *, at_least: int = 0, timeout: float = WAIT_SECONDS
) -> ReplicaStatus:
    """Wait until ``replicas`` report one applied index (>= ``at_least``) and one digest.

    Fails at once if two of them report different digests for the same
    applied index (a broken agreement), and after ``timeout`` seconds if they
    never meet.  Returns one of the matching statuses.
    """
    replicas = list(replicas)
    seen: dict[int, tuple[str, int]] = {}
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await statuses(cluster, replicas)
            _check_agreement(last, seen)
            answers = list(last.values())
            if all(s is not None for s in answers):
                states = {(s.applied, s.digest) for s in answers}
                if len(states) == 1 and answers[0].applied >= at_least:
                    return answers[0]
            await trio.sleep(POLL_SECONDS)
    pytest.fail(f"replicas {replicas} did not converge at or after slot {at_least} within {timeout}s: {_show(last)}")


async def wait_role(cluster: LocalCluster, i: int, roles: set[str], *, timeout: float = WAIT_SECONDS) -> ReplicaStatus:
    """Wait until replica ``i`` reports one of ``roles``."""
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await replica_status(cluster, i)
            if last is not None and last.role in roles:
                return last
            await trio.sleep(POLL_SECONDS)
    pytest.fail(f"replica {i} did not become {sorted(roles)} within {timeout}s: {_show({i: last})}")


async def submit(cluster: LocalCluster, op: Any, *, addrs: list | None = None) -> tuple[Any, int]:
    """Apply ``op`` through the log once, on a fresh client; return (result, slot)."""
    async with LogClient(addrs or cluster.addrs, cluster.secret) as client:
        return await client.submit_with_slot(op, deadline=SUBMIT_DEADLINE)


def log_events(cluster: LocalCluster, i: int) -> list[dict]:
    """Replica ``i``'s structured log events (JSON lines), oldest first, over all its runs."""
    events = []
    for line in cluster.logs(i).splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a traceback or other unstructured output
        if isinstance(event, dict):
            events.append(event)
    return events


def events_of_last_run(cluster: LocalCluster, i: int) -> list[dict]:
    """Replica ``i``'s log events since it last started."""
    events = log_events(cluster, i)
    starts = [n for n, e in enumerate(events) if e.get("event") == "replica_starting"]
    return events[starts[-1] :] if starts else events


def assert_all_alive(cluster: LocalCluster, replicas: Iterable[int] | None = None) -> None:
    dead = [i for i in (range(cluster.replicas) if replicas is None else replicas) if not cluster.alive(i)]
    assert not dead, f"replica processes {dead} exited (see their logs in the report)"


# --------------------------------------------------------------------------
# Load: writers appending unique items to one key


@attrs.define(eq=False)
class AppendLoad:
    """Writers (one LogClient each) appending unique items to one key until stopped.

    Remembers every item it tried (``attempted``) and every acknowledged one
    with the list length its ``append`` returned (``acked``).  A submit that
    gives up raises ``Unavailable``, which fails the test: the load is only
    run while a majority is up.
    """

    cluster: LocalCluster
    key: str
    writers: int = 3
    attempted: set[str] = attrs.Factory(set)
    acked: dict[str, int] = attrs.Factory(dict)
    _stop: trio.Event = attrs.Factory(trio.Event)

    def start(self, nursery: trio.Nursery) -> None:
        for w in range(self.writers):
            nursery.start_soon(self._writer, w)

    def stop(self) -> None:
        """Stop after the commands in flight are answered (so none is left half-known)."""
        self._stop.set()

    async def wait_acks(self, n: int, *, timeout: float = WAIT_SECONDS) -> None:
        with trio.move_on_after(timeout):
            while len(self.acked) < n:
                await trio.sleep(POLL_SECONDS / 2)
            return
        pytest.fail(f"only {len(self.acked)} of {n} appends acknowledged within {timeout}s")

    async def _writer(self, w: int) -> None:
        async with LogClient(self.cluster.addrs, self.cluster.secret) as client:
            if w % 2 == 0:
                n = 0
                while not self._stop.is_set():
                    item = f"w{w}-{n}"
                    n += 1
                    self.attempted.add(item)
                    self.acked[item] = await client.submit(["append", self.key, item], deadline=SUBMIT_DEADLINE)
                return
            # Several tasks sharing one client, each submitting several appends
            # at once: their commands travel together in blocks.
            async with trio.open_nursery() as nursery:
                for t in range(4):
                    nursery.start_soon(self._many, client, f"w{w}.{t}")

    async def _many(self, client: LogClient, name: str) -> None:
        n = 0
        while not self._stop.is_set():
            items = [f"{name}-{n + i}" for i in range(5)]
            n += 5
            self.attempted.update(items)
            lengths = await client.submit_many([["append", self.key, item] for item in items], deadline=SUBMIT_DEADLINE)
            self.acked.update(zip(items, lengths))


def check_exactly_once(final: Any, load: AppendLoad) -> None:
    """Every acknowledged append is in ``final`` once, where its answer said; nothing else is."""
    assert isinstance(final, list), f"expected the list under {load.key!r}, got {final!r}"
    duplicated = sorted(item for item, count in collections.Counter(final).items() if count > 1)
    assert not duplicated, f"applied more than once: {duplicated}"
    lost = sorted(set(load.acked) - set(final))
    assert not lost, f"acknowledged but missing from the final list: {lost}"
    invented = sorted(set(final) - load.attempted)
    assert not invented, f"never submitted but in the list: {invented}"
    misplaced = {
        item: n
        for item, n in load.acked.items()
        if not (isinstance(n, int) and 0 < n <= len(final) and final[n - 1] == item)
    }
    assert not misplaced, f"acknowledged with a length that does not match the item's position: {misplaced}"


# --------------------------------------------------------------------------
# 1. Election, apply, convergence


async def test_three_replicas_elect_one_leader_apply_commands_and_converge(local_cluster):
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster, range(3))
        assert 0 <= leader < 3

        async with LogClient(cluster.addrs, cluster.secret) as client:
            assert await client.submit(["put", "greeting", "hello"]) is None
            assert await client.submit(["get", "greeting"]) == "hello"
            assert await client.submit(["cas", "greeting", "nope", "x"]) is False
            assert await client.submit(["cas", "greeting", "hello", "bye"]) is True
            for i in range(20):
                assert await client.submit(["append", "seq", i]) == i + 1

        # Concurrent clients, pipelined: every append applied once, each answer a distinct length.
        answers: list[int] = []

        async def writer(w: int) -> None:
            async with LogClient(cluster.addrs, cluster.secret) as c:
                async with trio.open_nursery() as nursery:
                    for n in range(10):
                        nursery.start_soon(lambda n=n: _append_into(c, answers, f"{w}-{n}"))

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)
        assert sorted(answers) == list(range(1, 41))

        seq, _ = await submit(cluster, ["get", "seq"])
        assert seq == list(range(20))
        mixed, _ = await submit(cluster, ["get", "mixed"])
        assert sorted(mixed) == sorted(f"{w}-{n}" for w in range(4) for n in range(10))
        greeting, slot = await submit(cluster, ["get", "greeting"])
        assert greeting == "bye"

        final = await wait_converged(cluster, range(3), at_least=slot)
        assert final.digest.strip("0"), "the digest of a log with commands should not be all zero"

        # The leader reports how long the commands submitted to it took; followers report nothing.
        sts = await statuses(cluster, range(3))
        leaders = [s for s in sts.values() if s is not None and s.role == "leader"]
        assert len(leaders) == 1, _show(sts)
        lead = leaders[0]
        assert lead.commit_samples > 0
        assert 0 < lead.commit_p50_ms <= lead.commit_p99_ms
        assert all(s.commit_samples == 0 and s.commit_p50_ms is None for s in sts.values() if s is not lead)
        assert_all_alive(cluster)


async def _append_into(client: LogClient, answers: list[int], item: str) -> None:
    answers.append(await client.submit(["append", "mixed", item], deadline=SUBMIT_DEADLINE))


# --------------------------------------------------------------------------
# 2. Leader killed under load


@pytest.mark.parametrize(
    ("replicas", "followers_killed"),
    [(3, 0), (5, 1)],
    ids=["3-replicas-leader-killed", "5-replicas-leader-and-follower-killed"],
)
async def test_leader_killed_under_load_loses_and_duplicates_no_acknowledged_command(
    local_cluster, replicas, followers_killed
):
    cluster = local_cluster(replicas)
    with trio.fail_after(GUARD_SECONDS):
        old_leader = await wait_leader(cluster, range(replicas))
        killed = [old_leader] + [(old_leader + 1 + k) % replicas for k in range(followers_killed)]
        survivors = [i for i in range(replicas) if i not in killed]
        load = AppendLoad(cluster, "events")
        async with trio.open_nursery() as nursery:
            load.start(nursery)
            await load.wait_acks(30)
            for i in killed:
                cluster.kill(i)
            new_leader = await wait_leader(cluster, survivors)
            # Enough acknowledgements after the crash that some went through the new leader.
            await load.wait_acks(len(load.acked) + 40)
            load.stop()

        assert new_leader != old_leader
        final, slot = await submit(cluster, ["get", "events"])
        check_exactly_once(final, load)
        await wait_converged(cluster, survivors, at_least=slot)

        # The killed replicas come back from their data directories and agree.
        for i in killed:
            cluster.start_replica(i)
        await wait_converged(cluster, range(replicas), at_least=slot)
        again, _ = await submit(cluster, ["get", "events"])
        assert again == final
        assert_all_alive(cluster)


# --------------------------------------------------------------------------
# 3. A replica restarted from its data directory catches up


async def test_replica_killed_and_restarted_from_its_data_dir_catches_up(local_cluster):
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster, range(3))
        victim = (leader + 1) % 3
        _, slot = await submit(cluster, ["put", "before", "crash"])
        st = await wait_converged(cluster, range(3), at_least=slot)
        # Once it reports a later slot, everything up to st.applied went through
        # a finished driver step, records written; only then kill it.
        while (later := await replica_status(cluster, victim)) is None or later.applied <= st.applied:
            await trio.sleep(POLL_SECONDS)
        cluster.kill(victim)

        # What it had on disk when it died: initialized, every slot it had applied chosen.
        with Storage.open(cluster.data_dir(victim), replica_id=victim, cluster="default") as storage:
            state = storage.load()
        assert state.initialized
        chosen = {slot for slot, row in state.log.items() if row.chosen}
        assert set(range(1, st.applied + 1)) <= chosen, (
            f"replica {victim} applied {st.applied} slots but its disk holds chosen slots "
            f"up to {max(chosen, default=0)} with gaps {sorted(set(range(1, st.applied + 1)) - chosen)[:10]}"
        )

        async with LogClient(cluster.addrs, cluster.secret) as client:
            for i in range(100):
                await client.submit(["append", "while-down", i], deadline=SUBMIT_DEADLINE)
        down, slot = await submit(cluster, ["get", "while-down"])
        assert down == list(range(100))

        cluster.start_replica(victim)
        await wait_converged(cluster, range(3), at_least=slot)
        # It has its state: it never needs the recovery of a wiped replica.  Its
        # log names every role it took since it started (the first one included).
        events = events_of_last_run(cluster, victim)
        starting = [e for e in events if e.get("event") == "replica_starting"]
        assert starting and starting[0]["recovering"] is False, starting
        roles = [e["role"] for e in events if e.get("event") == "role_changed"]
        assert roles and "recovering" not in roles, f"replica {victim} restarted with its data but took roles {roles}"
        assert not [e for e in events_of_last_run(cluster, victim) if e.get("event") == "snapshot_installed"], (
            "no snapshot exists at the default snapshot interval, yet one was installed"
        )
        assert_all_alive(cluster)


async def test_second_process_on_a_live_data_dir_is_refused_and_the_first_keeps_serving(local_cluster, tmp_path):
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        await wait_leader(cluster, range(3))
        # Same id, same data directory, another port: it must not get a vote.
        peers = list(cluster.addrs)
        peers[0] = (HOST, free_ports(1)[0])
        cmd = _replica_cmd(0, ",".join(f"{h}:{p}" for h, p in peers), cluster.data_dir(0), cluster.secret_file)
        proc = await trio.to_thread.run_sync(_run, cmd)
        assert proc.returncode != 0
        assert str(cluster.data_dir(0)) in proc.stderr, proc.stderr
        assert "another replica process" in proc.stderr, proc.stderr

        _, slot = await submit(cluster, ["put", "still", "here"])
        await wait_converged(cluster, range(3), at_least=slot)
        assert_all_alive(cluster)


# --------------------------------------------------------------------------
# 4. A wiped replica rejoins while the cluster keeps serving


@pytest.mark.parametrize("which", ["follower", "leader"])
async def test_wiped_replica_rejoins_while_the_cluster_keeps_serving(local_cluster, which):
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster, range(3))
        victim = leader if which == "leader" else (leader + 1) % 3
        others = [i for i in range(3) if i != victim]
        load = AppendLoad(cluster, "wiped", writers=2)
        async with trio.open_nursery() as nursery:
            load.start(nursery)
            await load.wait_acks(20)
            cluster.wipe(victim)
            assert not any(cluster.data_dir(victim).iterdir())
            await wait_leader(cluster, others)
            await load.wait_acks(len(load.acked) + 30)  # served while it was gone
            cluster.start_replica(victim)
            await wait_role(cluster, victim, {"follower", "leader"})  # recovered
            await load.wait_acks(len(load.acked) + 30)  # and after it came back
            load.stop()

        final, slot = await submit(cluster, ["get", "wiped"])
        check_exactly_once(final, load)
        await wait_converged(cluster, range(3), at_least=slot)
        assert_all_alive(cluster)


# --------------------------------------------------------------------------
# 5. Bad peers and bad input against a running replica


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def _drain_until_closed(stream: trio.SocketStream) -> None:
    """Read until the replica closes the connection (bounded by the caller)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass  # a reset is a close too


async def _raw(cluster: LocalCluster, i: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(*cluster.addrs[i])


async def _authenticated(cluster: LocalCluster, i: int, *, role: str = "client", ident: str = "tester"):
    """A TCP stream to replica ``i`` with the handshake done, for writing raw bytes after it."""
    stream = await _raw(cluster, i)
    conn = wire.Connection(stream)
    await wire.handshake(conn, secret=cluster.secret, role=role, ident=ident, side=wire.Side.INITIATOR)
    return stream


async def _still_serves(cluster: LocalCluster, i: int, tag: str) -> None:
    """Replica ``i`` is alive, answers status, still in the cluster, and applies a command sent to it."""
    assert cluster.alive(i), f"replica {i} exited after {tag}"
    result, _slot = await submit(cluster, ["append", "probes", f"replica {i}: {tag}"], addrs=[cluster.addrs[i]])
    assert isinstance(result, int) and result >= 1, f"unexpected answer after {tag}: {result!r}"
    st = await replica_status(cluster, i)
    assert st is not None, f"replica {i} does not answer status after {tag}"
    assert st.leader is not None, f"replica {i} knows no leader after {tag}: {st}"


async def test_bad_peers_and_bad_frames_do_not_take_a_replica_down(local_cluster):
    cluster = local_cluster(3)
    rng = random.Random(20240611)
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster, range(3))
        # A silent connection held open the whole time must not block anyone.
        idle = await _raw(cluster, leader)
        try:
            for target in (leader, (leader + 1) % 3):
                host, port = cluster.addrs[target]

                for role in ("client", "replica"):
                    with pytest.raises(wire.AuthError):
                        await wire.connect(
                            host, port, wire.Endpoint(secret=b"not-the-cluster-secret", role=role, ident="1")
                        )
                    await _still_serves(cluster, target, f"wrong secret as {role}")

                attacks: dict[str, Any] = {
                    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                    "random bytes": b"\x00\x00\x00\x10" + rng.randbytes(4096),
                    "huge length before handshake": b"\xff\xff\xff\xff" + b"x" * 100,
                }
                for tag, data in attacks.items():
                    stream = await _raw(cluster, target)
                    async with stream:
                        await stream.send_all(data)
                        with trio.fail_after(WAIT_SECONDS):
                            await _drain_until_closed(stream)
                    await _still_serves(cluster, target, tag)

                after_handshake = {
                    "huge length": b"\xff\xff\xff\xff",
                    "length over the cap": struct.pack(">I", wire.MAX_FRAME_DEFAULT + 1),
                    "unknown message type": _frame(
                        cbor2.dumps(cbor2.CBORTag(codec.OBJECT_TAG, ["NoSuchMessage", 1, 2]))
                    ),
                    "unknown CBOR tag": _frame(cbor2.dumps(cbor2.CBORTag(4711, "x"))),
                    "undecodable CBOR": _frame(b"\xff\xfe\xfd"),
                    "wrong fields": _frame(cbor2.dumps(cbor2.CBORTag(codec.OBJECT_TAG, ["Submit", "not a command"]))),
                    "a known message a client may not send": _frame(
                        codec.encode(wire.Hello(nonce=bytes(wire.NONCE_SIZE), role="client", ident="x"))
                    ),
                    "plain data": _frame(codec.encode({"submit": ["put", "k", 1]})),
                    "block whose ops are not CBOR": _frame(
                        codec.encode(SubmitBlock(block=CommandBlock(client_id="x", first_seq=1, ops=b"\xff\xfe")))
                    ),
                    "block whose ops are not a list": _frame(
                        codec.encode(SubmitBlock(block=CommandBlock(client_id="x", first_seq=1, ops=codec.encode(7))))
                    ),
                }
                for tag, data in after_handshake.items():
                    stream = await _authenticated(cluster, target)
                    async with stream:
                        await stream.send_all(data)
                        with trio.fail_after(WAIT_SECONDS):
                            await _drain_until_closed(stream)
                    await _still_serves(cluster, target, tag)

                # Half a frame, then the connection closes.
                stream = await _authenticated(cluster, target)
                await stream.send_all(struct.pack(">I", 100) + b"y" * 10)
                await stream.aclose()
                await _still_serves(cluster, target, "half a frame then close")

                # Authenticated, but claiming to be a replica that does not exist, or the target itself.
                for ident in ("99", "-1", "abc", str(target)):
                    stream = await _authenticated(cluster, target, role="replica", ident=ident)
                    async with stream:
                        with trio.fail_after(WAIT_SECONDS):
                            await _drain_until_closed(stream)
                    await _still_serves(cluster, target, f"replica ident {ident!r}")
        finally:
            await idle.aclose()

        probes, slot = await submit(cluster, ["get", "probes"])
        assert len(probes) == len(set(probes)), f"a probe was applied twice: {probes}"
        await wait_converged(cluster, range(3), at_least=slot)
        assert_all_alive(cluster)


async def test_resubmitting_an_acknowledged_command_is_not_reapplied_and_does_not_stop_the_replica(local_cluster):
    # A client that retries a sequence number it has already acknowledged
    # (a buggy or replayed client): the session forgot that result, so the
    # replica must answer without applying the command again, and must stay up.
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster, range(3))
        host, port = cluster.addrs[leader]
        conn = await wire.connect(host, port, wire.Endpoint(secret=cluster.secret, role="client", ident="replayer"))
        async with conn:
            for seq, first_unacked in [(1, 1), (2, 2), (1, 1)]:
                op = ["append", "replayed", seq]
                cmd = Command(client_id="replayer", seq=seq, first_unacked=first_unacked, op=op)
                await conn.send(Submit(command=cmd))
                try:
                    with trio.fail_after(WAIT_SECONDS):
                        reply = await conn.receive()
                except wire.ConnectionClosed:
                    pytest.fail(f"replica {leader} closed the connection instead of answering seq {seq} again")
                assert isinstance(reply, Result) and reply.seq == seq, reply
        await _still_serves(cluster, leader, "a replayed sequence number")
        replayed, slot = await submit(cluster, ["get", "replayed"])
        assert replayed == [1, 2], f"the replayed command changed the state: {replayed}"
        await wait_converged(cluster, range(3), at_least=slot)
        assert_all_alive(cluster)


async def test_a_command_the_state_machine_cannot_apply_does_not_stop_the_cluster(local_cluster):
    # ``append`` to a key holding a number is a user error.  It reaches every
    # replica through the log, so if applying it raised, every replica would
    # stop at the same slot, and again at every restart.
    cluster = local_cluster(3)
    with trio.fail_after(GUARD_SECONDS):
        await wait_leader(cluster, range(3))
        # A healthy cluster answers in milliseconds; the deadline only keeps a
        # dead one from using up the suite's time.
        deadline = SUBMIT_DEADLINE / 3
        async with LogClient(cluster.addrs, cluster.secret) as client:
            await client.submit(["put", "n", 5], deadline=deadline)
            answer = await client.submit(["append", "n", 1], deadline=deadline)
            assert answer != 2, f"append to a number answered {answer!r}"
            assert await client.submit(["get", "n"], deadline=deadline) == 5
            _, slot = await client.submit_with_slot(["put", "after", True], deadline=deadline)
        await wait_converged(cluster, range(3), at_least=slot)
        assert_all_alive(cluster)


# --------------------------------------------------------------------------
# 6. Bad start-up


def _replica_cmd(rid: Any, peers: str, data: Path, secret_file: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "tasksprint.cli", "replica", "--id", str(rid), "--peers", peers, "--data", str(data)]
    if secret_file is not None:
        cmd += ["--secret-file", str(secret_file)]
    return cmd


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a replica that must refuse to start; a hang fails (and is killed and reaped by run)."""
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"replica still running after {STARTUP_TIMEOUT}s instead of refusing to start: {exc.stderr!r}")


@pytest.fixture
def startup(tmp_path: Path) -> dict:
    """A valid set of replica arguments; each case spoils one of them."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(os.urandom(24).hex().encode() + b"\n")
    data = tmp_path / "data"
    data.mkdir()
    ports = free_ports(3)
    return {
        "tmp": tmp_path,
        "rid": 1,
        "ports": ports,
        "peers": ",".join(f"{HOST}:{p}" for p in ports),
        "data": data,
        "secret_file": secret_file,
    }


def _case_missing_data_dir(a: dict) -> str:
    a["data"] = a["tmp"] / "no-such-dir"
    return str(a["data"])


def _case_garbage_db(a: dict) -> str:
    db = a["data"] / "replica.db"
    db.write_bytes(random.Random(7).randbytes(8192))
    return str(db)


def _case_other_replicas_dir(a: dict) -> str:
    Storage.open(a["data"], replica_id=0, cluster="default").close()
    return str(a["data"])


def _case_damaged_snapshot(a: dict) -> str:
    Storage.open(a["data"], replica_id=1, cluster="default", peers=a["peers"]).close()
    db = a["data"] / "replica.db"
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO snapshot (id, idx, data) VALUES (1, 7, ?)", (b"\x85damaged",))
    conn.close()
    return str(db)


def _case_other_clusters_peers(a: dict) -> str:
    # Another cluster's directory, under the same default cluster name.
    other = ",".join(f"{HOST}:{p}" for p in free_ports(3))
    Storage.open(a["data"], replica_id=1, cluster="default", peers=other).close()
    return "replica 0 was"


def _case_three_restarted_as_five(a: dict) -> str:
    Storage.open(a["data"], replica_id=1, cluster="default", peers=a["peers"]).close()
    a["peers"] += "," + ",".join(f"{HOST}:{p}" for p in free_ports(2))
    return "3 replicas, now 5"


def _case_bad_peers_port(a: dict) -> str:
    a["peers"] = f"{HOST}:{a['ports'][0]},{HOST}:99999,{HOST}:{a['ports'][2]}"
    return f"{HOST}:99999"


def _case_bad_peers_no_port(a: dict) -> str:
    a["peers"] = f"{HOST}:{a['ports'][0]},localhost,{HOST}:{a['ports'][2]}"
    return "localhost"


def _case_two_peers(a: dict) -> str:
    a["peers"] = f"{HOST}:{a['ports'][0]},{HOST}:{a['ports'][1]}"
    return "2 peers"


def _case_id_too_large(a: dict) -> str:
    a["rid"] = 3
    return "--id 3"


def _case_id_negative(a: dict) -> str:
    a["rid"] = -1
    return "--id -1"


def _case_missing_secret(a: dict) -> str:
    a["secret_file"] = a["tmp"] / "no-such-secret"
    return str(a["secret_file"])


def _case_empty_secret(a: dict) -> str:
    a["secret_file"].write_bytes(b"\n")
    return str(a["secret_file"])


@pytest.mark.parametrize(
    "spoil",
    [
        _case_missing_data_dir,
        _case_garbage_db,
        _case_other_replicas_dir,
        _case_damaged_snapshot,
        _case_other_clusters_peers,
        _case_three_restarted_as_five,
        _case_bad_peers_port,
        _case_bad_peers_no_port,
        _case_two_peers,
        _case_id_too_large,
        _case_id_negative,
        _case_missing_secret,
        _case_empty_secret,
    ],
    ids=lambda f: f.__name__.removeprefix("_case_"),
)
def test_replica_refuses_bad_startup_with_a_message_naming_the_problem(startup, spoil):
    a = dict(startup)
    named = spoil(a)
    db = a["data"] / "replica.db"
    before = db.read_bytes() if db.exists() else None

    proc = _run(_replica_cmd(a["rid"], a["peers"], a["data"], a["secret_file"]))

    assert proc.returncode != 0, f"replica started (exit {proc.returncode}); stderr: {proc.stderr}"
    assert named in proc.stderr, f"stderr does not name {named!r}: {proc.stderr}"
    assert "Traceback" not in proc.stderr, f"a crash, not a message: {proc.stderr}"
    # It changed nothing it was refusing to use (subprocess.run reaped the process).
    if before is not None:
        assert db.read_bytes() == before, f"{db} was modified by a replica that refused to start"
    if spoil is _case_missing_data_dir:
        assert not a["data"].exists(), f"the missing data directory {a['data']} was created"


def test_replica_whose_port_is_taken_exits_with_a_message_naming_the_address(startup):
    a = startup
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        peers = f"{HOST}:{a['ports'][0]},{HOST}:{port},{HOST}:{a['ports'][2]}"
        proc = _run(_replica_cmd(1, peers, a["data"], a["secret_file"]))
    assert proc.returncode != 0, f"replica started (exit {proc.returncode}); stderr: {proc.stderr}"
    assert f"{HOST}:{port}" in proc.stderr, f"stderr does not name the address in use: {proc.stderr}"
    assert "Traceback" not in proc.stderr, f"a crash, not a message: {proc.stderr}"


# --------------------------------------------------------------------------
# 7. Snapshots and catch-up by snapshot


async def test_replica_far_behind_catches_up_by_snapshot(local_cluster):
    snapshot_every = 50
    cluster = local_cluster(3, extra_args=["--snapshot-every", str(snapshot_every)])
    # A replica keeps this many log entries behind its snapshot for lagging peers;
    # the victim must fall further behind than that to need a snapshot.
    keep = PaxosConfig(replicas=3).keep_after_snapshot
    with trio.fail_after(GUARD_SECONDS):
        leader = await wait_leader(cluster, range(3))
        victim = (leader + 1) % 3
        _, slot = await submit(cluster, ["put", "before", "snapshot"])
        st = await wait_converged(cluster, range(3), at_least=slot)
        cluster.kill(victim)
        behind = st.applied

        # Fill slots until the others have snapshotted and truncated past what
        # the victim has: its next slot is then only in their snapshots.
        target = behind + keep + 2 * snapshot_every
        top = 0
        items: list[str] = []

        async def writer(w: int) -> None:
            nonlocal top
            async with LogClient(cluster.addrs, cluster.secret) as client:
                n = 0
                while top < target:
                    item = f"{w}-{n}"
                    n += 1
                    _, s = await client.submit_with_slot(["append", "many", item], deadline=SUBMIT_DEADLINE)
                    items.append(item)
                    top = max(top, s)

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)
        many, slot = await submit(cluster, ["get", "many"])
        assert sorted(many) == sorted(items)
        await wait_converged(cluster, [i for i in range(3) if i != victim], at_least=slot)

        cluster.start_replica(victim)
        await wait_converged(cluster, range(3), at_least=slot)
        installed = [
            e.get("index")
            for e in events_of_last_run(cluster, victim)
            if e.get("event") == "snapshot_installed" and isinstance(e.get("index"), int) and e["index"] > behind
        ]
        assert installed, (
            f"replica {victim} was {slot - behind} slots behind with the others truncated, "
            "yet no snapshot from them was installed"
        )

        # Life goes on after the snapshot: new commands reach the restored replica too.
        _, slot = await submit(cluster, ["append", "many", "after"])
        await wait_converged(cluster, range(3), at_least=slot)
        assert_all_alive(cluster)


async def test_a_leader_stopped_with_sigterm_hands_over_and_exits_cleanly(local_cluster):
    """SIGTERM to the leader: it asks a follower to take over (no election timeout), then exits 0."""
    cluster = local_cluster()
    leader = await wait_leader(cluster, range(3))
    _, before = await submit(cluster, ["put", "k", 1])
    cluster.signal(leader, signal.SIGTERM)
    proc = cluster.procs[leader]
    assert proc is not None
    with trio.fail_after(WAIT_SECONDS):
        while proc.poll() is None:
            await trio.sleep(POLL_SECONDS)
    assert proc.returncode == 0, cluster.logs(leader)[-2000:]
    [handed] = [e for e in events_of_last_run(cluster, leader) if e.get("event") == "leadership_handed_over"]
    rest = [i for i in range(3) if i != leader]
    assert handed["to"] in rest
    # The follower asked is the one that leads now, and the log goes on.
    assert await wait_leader(cluster, rest) == handed["to"]
    _, after = await submit(cluster, ["put", "k", 2])
    assert after > before


async def test_a_client_whose_session_was_collected_is_told_so_and_nothing_is_applied_twice(local_cluster):
    """Issue 11: sessions are collected (here past 16); a client that had answers gets SessionExpiredError."""
    cluster = local_cluster(3, extra_args=["--max-sessions", "16"])
    with trio.fail_after(GUARD_SECONDS):
        await wait_leader(cluster, range(3))
        async with LogClient(cluster.addrs, cluster.secret) as old:
            assert await old.submit(["append", "log", "old-1"]) == 1
            for i in range(40):  # other clients, one command each, push "old" out
                async with LogClient(cluster.addrs, cluster.secret) as other:
                    await other.submit(["append", "others", i])
            with pytest.raises(SessionExpiredError):
                await old.submit(["append", "log", "old-2"])
        async with LogClient(cluster.addrs, cluster.secret) as fresh:
            assert await fresh.submit(["get", "log"]) == ["old-1"]
