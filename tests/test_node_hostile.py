"""Bad answers from nodes and peers are task failures, never a client crash.

Each case is the concrete input that used to crash a client: a node line of
deeply nested JSON (RecursionError), NaN or Infinity in outputs, integers
past 64 bits, outputs nested deeper than a peer's decoder follows, bytes or
NaN served by a peer, a ``join`` address like ``h:x``, a line cap larger
than the frame cap.  Also: a node's descendants die with it even after
``setsid``, nodes see an explicit environment, and a full spill is a clear
error.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

import pytest
import trio
from nodes import FOREVER, TEST_LIMIT, request, write_node

from tasksprint import framing
from tasksprint.coordinator.ops import BadOp
from tasksprint.coordinator.parsing import parse_op
from tasksprint.credentials import SecretError, load_secret
from tasksprint.node_process import NodeProcess, node_environment
from tasksprint.node_protocol import (
    DEFAULT_MAX_LINE,
    MAX_OUTPUT_DEPTH,
    FailureKind,
    judge_answer,
    plain_json_problem,
)
from tasksprint.object_store import ObjectStore, StoreFull
from tasksprint.peer_data import BadPeerAddress, PeerFetcher, split_addr
from tasksprint.wire import Endpoint


def answer(outputs_json: str) -> bytes:
    return b'{"type":"result","id":1,"attempt":0,"outputs":' + outputs_json.encode() + b"}"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ('{"x": NaN}', "NaN is not JSON"),
        ('{"x": Infinity}', "Infinity is not JSON"),
        ('{"x": -Infinity}', "-Infinity is not JSON"),
        ('{"x": ' + nested(200_000) + "}", "nested too deeply to parse"),
        ('{"x": ' + nested(MAX_OUTPUT_DEPTH + 1) + "}", f"nested more than {MAX_OUTPUT_DEPTH} levels deep"),
        ('{"x": ' + str(2**64) + "}", "integer outside 64 bits"),
        ('{"x": ' + "9" * 5000 + "}", "not JSON"),
    ],
    ids=["nan", "infinity", "minus-infinity", "recursion", "too-deep", "big-int", "huge-int"],
)
def test_an_answer_that_is_not_plain_json_is_a_protocol_failure(outputs: str, expected: str) -> None:
    outcome = judge_answer(request(1, "t"), answer(outputs))
    assert outcome.failure is FailureKind.PROTOCOL
    assert expected in outcome.error
    assert "task 1 (t)" in outcome.error


def test_plain_outputs_at_the_limits_are_accepted() -> None:
    fine = {"deep": json.loads(nested(MAX_OUTPUT_DEPTH - 1)), "big": 2**64 - 1, "small": -(2**63), "f": 1.5}
    outcome = judge_answer(request(1, "t"), answer(json.dumps(fine)))
    assert outcome.ok and outcome.outputs == fine


def test_values_a_peer_may_serve_are_checked_too() -> None:
    assert plain_json_problem({"a": b"raw"}) == "value['a'] holds a bytes, which is not JSON"
    assert plain_json_problem([1.0, math.nan]) == "value[1] holds nan, which JSON cannot carry"
    assert plain_json_problem({1: 2}) == "value has a key that is not a string (int)"
    assert plain_json_problem({"a": [1, "x", None, True, {"b": 2.5}]}) is None


def test_a_node_line_always_fits_in_a_frame() -> None:
    # An accepted output that a peer cannot fetch would be recomputed forever.
    assert DEFAULT_MAX_LINE < framing.MAX_FRAME_DEFAULT


@pytest.mark.parametrize("addr", ["h:x", "h:", ":5", "h", "h:0", "h:70000", "h:٣"])
def test_a_data_address_that_is_not_host_port_is_refused(addr: str) -> None:
    with pytest.raises(BadPeerAddress, match="is not HOST:PORT"):
        split_addr(addr)
    with pytest.raises(BadOp, match="HOST:PORT"):
        parse_op({"op": "join", "client": "c", "addr": addr, "slots": 1})


async def test_fetching_from_a_bad_address_is_a_lookup_error_not_a_crash() -> None:
    with trio.fail_after(TEST_LIMIT):
        async with trio.open_nursery() as nursery:
            fetcher = PeerFetcher(Endpoint(secret=b"s" * 16, role="client", ident="c"), nursery)
            with pytest.raises(LookupError, match="'h:x' is not HOST:PORT"):
                await fetcher.fetch("h:x", 1, None)
            assert split_addr("[::1]:5000") == ("[::1]", 5000)


SETSID_NODE = f"""
import json, subprocess, sys
print(json.dumps({{"type": "ready", "protocol": 1}}), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m["type"] == "exit":
        break
    # A daemon: in a session of its own (a process-group kill misses it),
    # its parent gone (it is nobody's child the node knows of).
    subprocess.run(["sh", "-c", "setsid sleep {FOREVER} >/dev/null 2>&1 </dev/null & echo $! > " + m["args"][0]])
    print(json.dumps({{"type": "result", "id": m["id"], "attempt": m["attempt"], "outputs": {{}}}}), flush=True)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.mark.parametrize("use_cgroups", [True, False], ids=["cgroup-if-possible", "proc-scan"])
async def test_a_nodes_setsid_daemon_dies_with_the_node(tmp_path: Path, use_cgroups: bool) -> None:
    marker = tmp_path / "daemon.pid"
    with trio.fail_after(TEST_LIMIT):
        node = await NodeProcess.start(write_node(tmp_path, SETSID_NODE), use_cgroups=use_cgroups)
        try:
            outcome = await node.run(request(1, "spawn", str(marker)))
            assert outcome.ok, outcome
            daemon = int(marker.read_text())
            assert alive(daemon)
        finally:
            await node.aclose()
        assert not alive(daemon)


def test_nodes_get_an_explicit_environment() -> None:
    client_env = {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "TASKSPRINT_SECRET_FILE": "/etc/tasksprint/secret",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "PYTHONPATH": "/src",
    }
    env = node_environment({"EXTRA": "1"}, client_env=client_env)
    assert env["HOME"] == "/home/u" and env["PYTHONPATH"] == "/src" and env["EXTRA"] == "1"
    assert env["PATH"].endswith(os.pathsep + "/usr/bin")
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(os.path.abspath(sys.executable))
    assert "TASKSPRINT_SECRET_FILE" not in env and "AWS_SECRET_ACCESS_KEY" not in env


ENV_NODE = """
import json, os, sys
print(json.dumps({"type": "ready", "protocol": 1}), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m["type"] == "exit":
        break
    out = {"env": sorted(os.environ)}
    print(json.dumps({"type": "result", "id": m["id"], "attempt": m["attempt"], "outputs": out}), flush=True)
"""


async def test_a_node_does_not_see_the_clients_other_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTER_TOKEN", "s3cr3t")
    with trio.fail_after(TEST_LIMIT):
        node = await NodeProcess.start(write_node(tmp_path, ENV_NODE))
        try:
            outcome = await node.run(request(1, "env"))
        finally:
            await node.aclose()
    assert outcome.ok and outcome.outputs is not None
    names = set(outcome.outputs["env"])
    assert "CLUSTER_TOKEN" not in names and "TASKSPRINT_NODE" in names


def test_a_full_spill_is_a_clear_error_and_the_store_stays_usable(tmp_path: Path) -> None:
    store = ObjectStore(memory_limit=10, spill_dir=tmp_path, spill_limit=100)
    store.put(1, {"a": "x" * 50})  # spilled: over the memory limit
    with pytest.raises(StoreFull, match=r"task 2's outputs \(62 bytes\) do not fit.*spill limit 100"):
        store.put(2, {"a": "y" * 60})
    assert not store.has(2) and store.get(1) == {"a": "x" * 50}
    store.drop(1)
    store.put(2, {"a": "y" * 60})  # room again once an output is dropped
    assert store.get(2) == {"a": "y" * 60}


def test_a_spill_the_disk_refuses_is_a_clear_error(tmp_path: Path) -> None:
    store = ObjectStore(memory_limit=10, spill_dir=tmp_path / "absent", spill_limit=1000)
    with pytest.raises(StoreFull, match="cannot spill task 3's outputs to"):
        store.put(3, {"a": "z" * 50})
    assert not store.has(3)


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [(b"s3cr3t\n", b"s3cr3t"), (b"", "held none"), (b"x" * (64 * 1024 + 1), "longer than")],
    ids=["secret", "empty", "too-long"],
)
def test_a_client_reads_the_secret_from_standard_input(
    monkeypatch: pytest.MonkeyPatch, stdin: bytes, expected: bytes | str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    if isinstance(expected, bytes):
        assert load_secret("-") == expected
    else:
        with pytest.raises(SecretError, match=expected):
            load_secret("-")
