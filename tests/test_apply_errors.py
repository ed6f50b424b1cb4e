"""Errors on the apply path are deterministic and bounded, and user code cannot escape the applier.

An answer to a refused command is hashed into every replica's digest, so its
text must be the same on every replica and cheap to make, whatever the
command holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from coordinator_harness import ROOT, ChainScheduler, Harness
from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.machine import RunState
from tasksprint.coordinator.ops import Refused, described
from tasksprint.machine import Applier, KVMachine
from tasksprint.paxos.messages import Batch, Command


def _dag(depth: int) -> list:
    """A list whose repr is 2**depth leaves long: what CBOR shared references build."""
    node: list = []
    for _ in range(depth):
        node = [node, node]
    return node


def test_refusing_a_shared_reference_dag_names_its_type_and_size_only() -> None:
    h = Harness(ChainScheduler)
    h.init()
    answer = h.op({"op": "join", "client": "x", "addr": "127.0.0.1:1", "slots": 1, "have": _dag(12)})
    assert isinstance(answer, Refused)
    assert "a list of 2 items" in answer.error, answer.error
    assert "[[" not in answer.error


def test_described_is_bounded_and_repr_free() -> None:
    assert described(None) == "None"
    assert described(7) == "7"
    assert described(2**1100) == "an int of 1101 bits"
    assert described("x" * 10**6) == "a str of 1000000 characters"
    assert described({1, 2}) == "a set"
    assert described(object()) == "a object"
    assert described(_dag(200)) == "a list of 2 items"


_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from coordinator_harness import ChainScheduler, Harness
    h = Harness(ChainScheduler)
    h.init()
    names = {{"tag-%d" % i for i in range(50)}}
    h.op({{"op": "join", "client": "x", "addr": "127.0.0.1:1", "slots": 1, "have": [names]}})
    h.op({{"op": "bogus", "payload": names}})
    print(h.applier.digest.hex())
    """
)


def test_refusals_hash_alike_under_different_hash_seeds() -> None:
    # A set's repr depends on PYTHONHASHSEED, which differs between replica processes.
    script = _SCRIPT.format(tests=str(ROOT / "tests"))
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


class _Addressed:
    def __repr__(self) -> str:
        return f"<_Addressed at {id(self):#x}>"


class _Raising(KVMachine):
    def apply(self, op: object, ctx: object) -> object:
        raise ValueError(f"cannot apply {op!r}")


def test_an_exception_while_applying_answers_its_type_name_only() -> None:
    first, second = Applier(_Raising()), Applier(_Raising())
    for ap in (first, second):
        cmd = Command(client_id="c", seq=1, op=["x"])
        ((_, result),) = ap.apply_slot(1, Batch(items=(cmd,)))
        assert result == {"error": "ValueError while applying the command"}
    assert first.digest == second.digest
    kv = KVMachine()
    assert kv.apply(["nope", "k"], None) == {"error": "unknown kv op (a list)"}


class _Boom(BaseException):
    pass


class RaisesBaseException(Coordinator):
    def init(self, seed: int) -> None:
        raise _Boom("not an Exception")


class RaisesGeneratorExit(Coordinator):
    def init(self, seed: int) -> None:
        raise GeneratorExit


class ExitsTheProcess(Coordinator):
    def init(self, seed: int) -> None:
        sys.exit(3)


@pytest.mark.parametrize("cls", [RaisesBaseException, RaisesGeneratorExit, ExitsTheProcess])
def test_any_base_exception_from_a_hook_fails_the_computation(cls: type[Coordinator]) -> None:
    h = Harness(cls)
    h.init()
    assert h.machine.run_state is RunState.FAILED
    failure = h.machine.status()["failure"]
    assert failure["hook"] == "init" and failure["slot"] == 1


class Interrupted(Coordinator):
    def init(self, seed: int) -> None:
        raise KeyboardInterrupt


def test_an_interrupt_of_the_process_still_goes_up() -> None:
    h = Harness(Interrupted)
    with pytest.raises(KeyboardInterrupt):
        h.init()
