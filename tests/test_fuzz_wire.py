"""A fuzzer against real processes: hostile frames of every message type, before and after authentication.

One computation runs for the whole module: three ``tasksprint replica``
processes with an idle scheduler and one ``tasksprint client`` (its data
port is a target too).  Hypothesis generates hostile values (ints past
2**63, NaN and infinities, deep and wide containers, odd text and bytes);
each example is turned, by a mutator seeded from it, into a batch of frames:

* **after authentication, on long-lived connections** (the bulk): what a
  client may send a replica -- ``Query`` with any name and arguments,
  ``StatusQuery``, ``Submit`` and ``SubmitBlock`` under the connection's
  own client id with hostile operations -- and ``Fetch`` to the worker
  client's data port.  These are answered (or refused with an answer), so
  thousands travel on one connection;
* **after authentication, one connection each** (for a sample of the
  examples): every registered message type with hostile field values, as a
  client and as a replica (whose claims must match its identity), and valid
  frames with bytes flipped, cut or spliced; the target closes such a
  connection (or answers and then sees the end of our stream), never more;
* **before authentication, one connection each**: mutated Hello and Proof
  frames, other message types, lengths over the cap, garbage.

Afterwards every process must still be running, every replica must answer,
the computation must still accept a good client's commands (a ``join``
through the log), and the worker client's data port must still answer a
good fetch.  ``TASKSPRINT_FUZZ_FRAMES`` sets how many frames are sent
(default 100,000; ``make fuzz-soak`` sends far more).
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import cbor2
import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings

from tasksprint import codec, wire
from tasksprint.api import Fetch, FetchReply, Query, ReplicaStatus, StatusQuery
from tasksprint.channel import ReplicaChannel
from tasksprint.coordinator.ops import JoinOp
from tasksprint.handshake import Hello, Proof
from tasksprint.log_client import LogClient
from tasksprint.paxos.messages import Ballot, Command
from tasksprint.run import LocalRun

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FRAMES = int(os.environ.get("TASKSPRINT_FUZZ_FRAMES", "100000"))
# Frames per hypothesis example on the long-lived connections, and examples needed for FRAMES.
BATCH = 1000
EXAMPLES = max(1, FRAMES // BATCH)
# Upper bound on one wait for the cluster (never a measurement).
WAIT_SECONDS = 60
POLL_SECONDS = 0.05
IDENT = "fuzzer"

IDLE_SCHEDULER = """
from tasksprint import Coordinator

class Idle(Coordinator):
    def init(self, seed):
        self.joined = 0

    def client_joined(self, cid):
        self.joined += 1
"""

# --------------------------------------------------------------------------
# Hostile values

EDGE_INTS = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**64), 2**1100, -(2**1100)]
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=24),
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=12,
)


def plain(value: Any) -> bool:
    """Whether ``value`` is plain CBOR (no int past 64 bits, which cbor2 would send as a bignum tag)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**64) <= value < 2**64
    if isinstance(value, list):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(plain(v) for v in value.values())
    return True


def raw_object(name: str, fields: list[Any]) -> bytes:
    """A registered message's encoding with any field values (validators bypassed, as an attacker would)."""
    return cbor2.dumps(cbor2.CBORTag(codec.OBJECT_TAG, [name, *fields]), default=codec._default)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Flip, cut, splice or repeat bytes of a valid encoding."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif kind == 2:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3 and data:
            at = rng.randrange(len(data))
            data[at : at + 1] = bytes([rng.choice([0x9F, 0xBF, 0xD8, 0xD9, 0xFF, 0x5B, 0x1B])])
        elif data:
            data += data[: rng.randint(1, len(data))]
    return bytes(data)


# --------------------------------------------------------------------------
# Batches


def bulk_frames(vals: list[Any], rng: random.Random, seqs: Iterator[int]) -> tuple[list[bytes], list[bytes]]:
    """(frames for a replica, frames for a data port) built from hostile values; all must be answered."""
    to_replica: list[bytes] = []
    to_data: list[bytes] = []
    names = ["view", "status", "info", "x" * 64, "unknown"]
    vals = [v for v in vals if plain(v)] or [None]
    keys = ["cid", "after", "wait", "tid", "op", ""]
    while len(to_replica) + len(to_data) < BATCH:
        v = rng.choice(vals)
        kind = rng.randrange(10)
        if kind < 4:
            args = {rng.choice(keys): rng.choice(vals) for _ in range(rng.randint(0, 3))}
            body = raw_object("Query", [rng.choice(names), args])
        elif kind == 4:
            body = codec.encode(StatusQuery())
        elif kind == 5:
            body = raw_object("Query", ["view", {"cid": 0, "after": 0, "wait": rng.choice([v, float("nan"), 1e308])}])
        elif kind == 6:
            # A command under our own id: applied through the log, refused by the machine's parser.
            op = v if rng.random() < 0.5 else {"op": rng.choice(["done", "failed", "lost", "join", "init"]), "cid": v}
            body = raw_object("Submit", [cbor2.CBORTag(codec.OBJECT_TAG, ["Command", IDENT, next(seqs), 0, op])])
        elif kind == 7:
            ops = [rng.choice(vals) for _ in range(rng.randint(1, 4))]
            first = next(seqs)
            for _ in ops[1:]:
                next(seqs)
            body = raw_object(
                "SubmitBlock", [cbor2.CBORTag(codec.OBJECT_TAG, ["CommandBlock", IDENT, first, 0, cbor2.dumps(ops)])]
            )
        else:
            body = raw_object(
                "Fetch", [rng.choice([0, 1, 2**62, rng.randrange(100)]), rng.choice([None, "v", "x" * 100])]
            )
            to_data.append(frame(body))
            continue
        to_replica.append(frame(body))
    return to_replica, to_data


def closing_frames(vals: list[Any], rng: random.Random) -> list[bytes]:
    """Frames each of which must close its (authenticated) connection: every message type, hostile."""
    out = []
    for name in sorted(codec._by_name):
        cls = codec._by_name[name]
        n = len(codec.field_names(cls))
        out.append(frame(raw_object(name, [rng.choice(vals) for _ in range(n)])))
    out.append(frame(raw_object("Accept", [Ballot(3, 2), [], 1])))  # speaks for replica 2
    out.append(frame(raw_object("Heartbeat", [Ballot(1, 99), 0, 0])))  # a replica that does not exist
    out.append(frame(raw_object("Submit", [Command(client_id="someone-else", seq=1, op=None)])))
    good = [codec.encode(StatusQuery()), codec.encode(Query(name="status", args={}))]
    out += [frame(mutate(rng.choice(good), rng)) for _ in range(8)]
    out.append(struct.pack(">I", 2**31) + b"x" * 16)  # over the cap
    out.append(frame(b"\xd8\x1c" * 40 + b"\x80"))  # shared references
    return out


def preauth_frames(vals: list[Any], rng: random.Random) -> list[bytes]:
    hello = codec.encode(Hello(nonce=rng.randbytes(32), role="client", ident="x"))
    proof = codec.encode(Proof(mac=rng.randbytes(32)))
    out = [frame(mutate(hello, rng)) for _ in range(4)] + [frame(mutate(proof, rng))]
    out.append(frame(raw_object("Hello", [rng.choice(vals), rng.choice(vals), rng.choice(vals)])))
    out.append(frame(raw_object(rng.choice(sorted(codec._by_name)), [rng.choice(vals)])))
    out.append(struct.pack(">I", 5000) + b"y" * 100)
    out.append(rng.randbytes(rng.randint(1, 64)))
    return out


# --------------------------------------------------------------------------
# The computation under attack


@attrs.define
class Targets:
    run: LocalRun
    client_proc: subprocess.Popen
    data_addr: tuple[str, int]
    secret: bytes
    sent: int = 0

    @property
    def replicas(self) -> list[tuple[str, int]]:
        assert self.run.cluster is not None
        return self.run.cluster.addrs

    def check_alive(self, when: str) -> None:
        assert self.run.cluster is not None
        for i, p in enumerate(self.run.cluster.procs):
            assert p is not None and p.poll() is None, (
                f"replica {i} exited ({when}); see {self.run.cluster.log_file(i)}"
            )
        assert self.client_proc.poll() is None, f"the worker client exited ({when})"


async def wait_for_client_addr(secret: bytes, addrs: list[tuple[str, int]]) -> tuple[str, int]:
    channel = ReplicaChannel(addrs, secret)
    try:
        with trio.fail_after(WAIT_SECONDS):
            while True:
                try:
                    st_ = await channel.ask("status", {}, timeout=2.0)
                    if st_.live_clients:
                        host, _, port = st_.live_clients[0].addr.rpartition(":")
                        return host, int(port)
                except Exception:  # not up yet
                    pass
                await trio.sleep(POLL_SECONDS)
    finally:
        await channel.aclose()


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> Iterator[Targets]:
    base = tmp_path_factory.mktemp("fuzz")
    sched = base / "idle.py"
    sched.write_text(IDLE_SCHEDULER)
    node = f"{sys.executable} {REPO / 'examples' / 'montecarlo' / 'node.py'}"
    run = LocalRun(scheduler=f"{sched}:Idle", node=node, clients=0, data=base / "run", progress=None)
    run.start()
    try:
        run.start_client(0)
        client_proc = run.client_procs[0]
        assert run.cluster is not None
        addr = trio.run(wait_for_client_addr, run.cluster.secret, run.cluster.addrs)
        yield Targets(run, client_proc, addr, run.cluster.secret)
    finally:
        run.stop()


async def drain(conn: wire.Connection) -> None:
    """Read and drop every answer until the connection closes."""
    try:
        while True:
            await conn.receive()
    except wire.NETWORK_ERRORS:
        pass


async def send_bulk(t: Targets, to_replica: list[bytes], to_data: list[bytes]) -> None:
    endpoint = wire.Endpoint(secret=t.secret, role="client", ident=IDENT)
    async with trio.open_nursery() as nursery:
        conns = []
        for host, port in t.replicas:
            conn = await wire.connect(host, port, endpoint)
            conns.append(conn)
            nursery.start_soon(drain, conn)
        data = await wire.connect(*t.data_addr, endpoint, expect=("data", None))
        nursery.start_soon(drain, data)
        for i in range(0, len(to_replica), 50):
            chunk = b"".join(to_replica[i : i + 50])
            await conns[(i // 50) % len(conns)].send_frames(chunk)
        await data.send_frames(b"".join(to_data))
        # Every frame was answerable: a status question still gets its answer on each connection.
        for conn in conns:
            await conn.send_frames(frame(codec.encode(StatusQuery())))
        await trio.sleep(0)
        for conn in [*conns, data]:
            await conn.aclose()
        nursery.cancel_scope.cancel()
    t.sent += len(to_replica) + len(to_data)


async def send_each(t: Targets, frames_: list[bytes], *, role: str, ident: str, authenticate: bool) -> None:
    """Every frame on a fresh connection to each target, then the end of our stream; wait for the target to close."""
    endpoint = wire.Endpoint(secret=t.secret, role=role, ident=ident) if authenticate else None
    targets = [*t.replicas, t.data_addr] if role == "client" else t.replicas
    for data in frames_:
        for host, port in targets:
            if endpoint is not None:
                expect = ("data", None) if (host, port) == t.data_addr else ("replica", None)
                try:
                    conn = await wire.connect(host, port, endpoint, expect=expect)
                except wire.NETWORK_ERRORS:
                    continue  # e.g. replica ident refused at once
                stream = conn._stream
            else:
                stream = await trio.open_tcp_stream(host, port)
            async with stream:
                try:
                    await stream.send_all(data)
                    await stream.send_eof()  # a partial frame is then complete as far as it goes
                    with trio.move_on_after(WAIT_SECONDS):  # the target closes; we do not wait for a slow one
                        while await stream.receive_some(65536):
                            pass
                except (trio.BrokenResourceError, OSError):
                    pass
            t.sent += 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(vals=st.lists(values, min_size=1, max_size=30), seed=st.integers(0, 2**32 - 1))
def fuzz(targets: Targets, vals: list[Any], seed: int) -> None:
    rng = random.Random(seed)
    seqs = iter(range(rng.randrange(1, 2**40), 2**62))
    to_replica, to_data = bulk_frames(vals, rng, seqs)
    trio.run(send_bulk, targets, to_replica, to_data)
    if rng.random() < 0.12:  # the closing kinds cost a connection each: a sample of the examples
        trio.run(lambda: send_each(targets, closing_frames(vals, rng), role="client", ident=IDENT, authenticate=True))
        trio.run(
            lambda: send_each(targets, closing_frames(vals, rng)[-14:], role="replica", ident="1", authenticate=True)
        )
        trio.run(lambda: send_each(targets, preauth_frames(vals, rng), role="client", ident="", authenticate=False))
    targets.check_alive(f"after {targets.sent} frames")


def test_hostile_frames_of_every_type_leave_every_process_up_and_serving(targets: Targets) -> None:
    fuzz(targets=targets)
    assert targets.sent >= FRAMES, f"only {targets.sent} frames were sent"
    targets.check_alive("at the end")

    async def check() -> None:
        with trio.fail_after(WAIT_SECONDS):
            for addr in targets.replicas:
                st_ = await LogClient(targets.replicas, targets.secret).status(addr, timeout=WAIT_SECONDS)
                assert isinstance(st_, ReplicaStatus)
            async with LogClient(targets.replicas, targets.secret, client_id="good") as lc:
                joined = await lc.submit(JoinOp(client="good-client", addr="127.0.0.1:1", slots=1).to_wire())
            assert type(joined).__name__ == "Joined", joined
            endpoint = wire.Endpoint(secret=targets.secret, role="client", ident="good")
            conn = await wire.connect(*targets.data_addr, endpoint, expect=("data", None))
            async with conn:
                await conn.send(Fetch(tid=10**6, key=None))
                reply = await conn.receive()
                assert isinstance(reply, FetchReply) and not reply.found
            channel = ReplicaChannel(targets.replicas, targets.secret)
            try:
                reply = await channel.ask("status", {}, timeout=WAIT_SECONDS)
                assert reply.state == "running"
            finally:
                await channel.aclose()

    trio.run(check)
