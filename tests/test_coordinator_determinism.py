"""Coordinator determinism: every replica applying one log reaches one state and one digest."""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys
import textwrap
from typing import Any

from coordinator_harness import (
    ECHO,
    Harness,
    LongChain,
    RandomScheduler,
    ReplicaScheduler,
    Sim,
    SloppyScheduler,
    done_op,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasksprint.coordinator.machine import CoordinatorMachine, RunState
from tasksprint.machine import Applier
from tasksprint.paxos.messages import Batch, Command, Tick


def test_replicas_draw_the_same_seed() -> None:
    sim = Sim(ReplicaScheduler, ECHO)
    one, two = sim.join("one"), sim.join("two")
    seeds = {sim.poll(c)["tasks"][0]["seed"] for c in (one, two)}
    assert len(seeds) == 1 and 0 <= seeds.pop() < 2**53


def drive(seed: int, steps: list[tuple[int, int]], snap_at: int | None = None) -> list[Applier]:
    """Feed the same ops (chosen from machine A's state) to two machines; return their appliers.

    With ``snap_at``, a third machine restored from A's snapshot at that
    step joins in.  Digests are compared and invariants checked after every step.
    """
    appliers = [Applier(CoordinatorMachine(RandomScheduler)) for _ in range(2)]
    lead = appliers[0].machine
    assert isinstance(lead, CoordinatorMachine)
    sent: list[Command] = []
    now = 0.0

    def cmd(op: dict[str, Any]) -> Command:
        c = Command(client_id="driver", seq=len(sent) + 1, op=op)
        sent.append(c)
        return c

    def feed(item: Command | Tick) -> None:
        results = [a.apply_slot(a.applied + 1, Batch(items=(item,))) for a in appliers]
        assert all(r == results[0] for r in results)
        assert len({a.digest for a in appliers}) == 1
        for a in appliers:
            a.machine.check_invariants()

    feed(cmd({"op": "init", "seed": seed, "code_digest": lead.code_digest}))
    for n, (kind, r) in enumerate(steps):
        if n == snap_at:
            clone = Applier(CoordinatorMachine(RandomScheduler))
            clone.restore(appliers[0].snapshot())
            appliers.append(clone)
        live = [cid for cid, _, _ in lead.live_clients()]
        work = [(cid, t) for cid in live for t in lead.view(cid, 0).tasks]
        item: Command | Tick
        if kind == 0 or not live:
            tags = [t for i, t in enumerate(RandomScheduler.TAGS) if r >> i & 1]
            join = {
                "op": "join",
                "client": f"n{r % 7}",
                "addr": f"n{r % 7}:{1 + r % 65535}",
                "slots": 1 + r % 3,
                "have": tags,
            }
            item = cmd({**join, "queue": r % 4} if r % 5 else join)
        elif kind == 1:
            now += r % 5
            expired = [live[r % len(live)]] if r % 3 == 0 else []
            # Some deaths with a grace: their outputs are awaited, and snapshots must keep the wait.
            item = Tick(now=now, data={"expired": expired, "grace": float(r % 4)} if r % 2 else {"expired": expired})
        elif kind in (2, 3, 4) and work:
            cid, t = work[r % len(work)]
            attempt = t.attempt - (1 if r % 11 == 0 else 0)
            if kind == 4:
                item = cmd({"op": "failed", "cid": cid, "tid": t.tid, "attempt": attempt, "error": f"e{r}"})
            else:
                sizes = {k: r % 1000 for k in [*t.keys, "extra"]}
                done = {"op": "done", "cid": cid, "tid": t.tid, "attempt": attempt, "values": {"out": r}}
                item = cmd({**done, "sizes": sizes})
        elif kind == 5:
            item = cmd({"op": "cancel", "tid": 1 + r % (lead.status()["tasks"]["total"] + 1)})
        elif kind == 6:
            tid = 1 + r % (lead.status()["tasks"]["total"] + 1)
            item = cmd({"op": "lost", "cid": live[r % len(live)], "tid": tid, "key": "out"})
        elif kind == 8 and work:
            # Batched reports, some claiming inputs used before their commit
            # (accepted or sent back for a rerun, depending on what committed).
            ops: list[Any] = []
            for k in range(1 + r % 4):
                cid, t = work[(r + 7 * k) % len(work)]
                if (r >> k) % 5 == 0:
                    ops.append({"op": "failed", "cid": cid, "tid": t.tid, "attempt": t.attempt, "error": "e"})
                    continue
                done = {"op": "done", "cid": cid, "tid": t.tid, "attempt": t.attempt, "values": {"out": r}}
                if (r >> k) % 2:
                    pretasks = [i.tid for i in t.inputs]
                    done["early"] = [[p, lead.task_info(p)["attempt"]] for p in pretasks]
                ops.append({**done, "sizes": {"out": k}})
            if r % 9 == 0:
                ops.append({"op": "join", "client": "x"})  # not batchable: an error result, the rest applies
            item = cmd({"op": "batch", "ops": ops})
        elif kind == 7 and r % 2 == 0:
            # A client (maybe declared dead) joining with outputs it may or may not have made: re-adoption.
            holds = [[1 + (r >> k) % 9, 1 + (r >> (k + 4)) % 2] for k in range(1 + r % 4)]
            item = cmd({"op": "join", "client": f"n{r % 7}", "addr": f"n{r % 7}:1", "slots": 1, "holds": holds})
        elif sent:
            item = sent[r % len(sent)]  # a client retrying an old command
        else:
            continue
        feed(item)
    return appliers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    steps=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**16)), min_size=1, max_size=120),
    snap_at=st.none() | st.integers(0, 120),
)
def test_same_log_gives_same_digest(seed: int, steps: list[tuple[int, int]], snap_at: int | None) -> None:
    appliers = drive(seed, steps, snap_at)
    statuses = [a.machine.status() for a in appliers]
    assert all(s == statuses[0] for s in statuses)


def test_a_nondeterministic_scheduler_shows_up_as_a_digest_mismatch() -> None:
    replicas = [Harness(SloppyScheduler) for _ in range(2)]
    ops = [
        {"op": "init", "seed": 3, "code_digest": replicas[0].machine.code_digest},
        {"op": "join", "client": "c", "addr": "c:1", "slots": 1, "have": []},
    ]
    digests = []
    for op in ops:
        for h in replicas:
            h.op(op)
        digests.append({h.applier.digest for h in replicas})
    assert [len(d) for d in digests] == [1, 2]
    assert replicas[1].machine.last_hook == {"hook": "client_joined", "tid": None, "cid": 1, "slot": 2}


def scenario_digest() -> str:
    """The digest of a fixed randomized run (compared across hash seeds)."""
    rng = random.Random(2024)
    steps = [(rng.randint(0, 8), rng.randint(0, 2**16)) for _ in range(300)]
    return drive(99, steps)[0].digest.hex()


def test_digest_does_not_depend_on_the_process_hash_seed() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        import test_coordinator_determinism
        print(test_coordinator_determinism.scenario_digest())
        """
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
        )
        digests.add(out.stdout.strip().splitlines()[-1])
    assert digests == {scenario_digest()}


def test_batched_reports_give_every_replica_the_same_state() -> None:
    replicas = [Harness(LongChain) for _ in range(3)]
    for h in replicas:
        h.init()
    lead = replicas[0]
    ops: list[dict[str, Any]] = [{"op": "join", "client": "c", "addr": "c:1", "slots": 1, "queue": 3, "have": []}]
    for op in ops:
        for h in replicas:
            h.op(op)
    while lead.machine.run_state is RunState.RUNNING:
        view = lead.machine.view(1).tasks
        batch = {
            "op": "batch",
            "ops": [done_op(1, t.tid, t.attempt, early=[[i.tid, 1] for i in t.inputs]) for t in view],
        }
        for h in replicas:
            h.op(batch)
        assert len({h.applier.digest for h in replicas}) == 1
        assert len({repr(h.machine.status()) for h in replicas}) == 1
    assert lead.status["result"]["values"] == "end"
