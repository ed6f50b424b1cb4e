"""A worker client cut off past the client timeout comes back and keeps its work (real processes).

The client is frozen with SIGSTOP (to the cluster it looks exactly like a
partition: it stops polling and answering), declared dead, then resumed
with SIGCONT: it finds out, joins again as a new incarnation and offers
the outputs its object store kept; the coordinator re-adopts them, so
nothing is recomputed and every task completes exactly once.  Leaves run
only on the frozen client (a tag only it has), so no recompute can finish
elsewhere while it is away; a gate task holds the total back until the
test has seen the re-adoption.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from test_cluster_e2e import (
    CLIENT_TIMEOUT,
    GUARD_SECONDS,
    PY_NODE,
    client_logs,
    computation,  # noqa: F401 (the fixture)
    finished_values,
    node_command,
    outcome,
    query,
    settled_info,
    wait_until,
    write_scheduler,
)

from tasksprint.run import LocalRun

pytestmark = pytest.mark.slow

LEAVES = 4

READOPT = """
class Readopt(Coordinator):
    def init(self, seed):
        self.done = []
        self.leaves = [
            self.start_task("noted", args=[i, RUNS], keys=["v"], require=["x"]) for i in range(1, LEAVES + 1)
        ]
        self.gate = self.start_task("gate", args=[GATE], keys=["v"], require=["y"])
        pre = self.leaves + [self.gate]
        self.root = self.start_task("total", pretasks=pre, prekeys=["v"] * len(pre), keys=["v"], require=["y"])

    def task_done(self, tid, values):
        self.done.append(tid)
        if tid == self.root:
            self.finish(
                taskids=[tid],
                values={"total": values["v"], "done": self.done, "tasks": self.leaves + [self.gate, self.root]},
            )
"""


def start_tagged_client(run: LocalRun, i: int, tag: str) -> subprocess.Popen:
    """Worker client ``client{i}`` offering resource tag ``tag``; stopped with the run."""
    return run.start_client(i, ("--have", tag))


async def test_a_client_partitioned_past_the_timeout_returns_and_its_outputs_are_readopted(
    computation,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    spec = write_scheduler(tmp_path, "Readopt", READOPT, LEAVES=LEAVES, RUNS=str(runs), GATE=str(gate))
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(
            spec, node_command(PY_NODE), clients=0, replica_args=("--client-timeout", str(CLIENT_TIMEOUT))
        )
        victim = start_tagged_client(run, 0, "x")
        start_tagged_client(run, 1, "y")

        async def leaves_done() -> bool:
            st = await query(run, "status")
            return st is not None and st.tasks["done"] >= LEAVES

        await wait_until(leaves_done, "the leaves to be done on client0")
        first = {i: (await settled_info(run, i)).holder for i in range(1, LEAVES + 1)}
        assert len(set(first.values())) == 1, first

        os.kill(victim.pid, signal.SIGSTOP)
        try:

            async def declared_dead() -> bool:
                st = await query(run, "status")
                return st is not None and st.clients.dead == 1

            await wait_until(declared_dead, "client0 to be declared dead")
        finally:
            os.kill(victim.pid, signal.SIGCONT)

        async def readopted() -> bool:
            st = await query(run, "status")
            if st is None or st.clients.live != 2:
                return False
            infos = [await query(run, "info", {"tid": i}) for i in range(1, LEAVES + 1)]
            return all(i is not None and i.state == "done" and i.holder not in (None, *first.values()) for i in infos)

        await wait_until(readopted, f"client0's outputs to be re-adopted\n{client_logs(run)}")
        gate.touch()
        values = finished_values(await outcome(run), run)
        assert values["total"] == sum(range(1, LEAVES + 1))
        assert sorted(values["done"]) == sorted(values["tasks"]), "task_done not called once per task"
        # Nothing was recomputed: each leaf ran once, on client0's first incarnation.
        ran = sorted(p.name.split("-")[0] for p in runs.iterdir())
        assert ran == [str(i) for i in range(1, LEAVES + 1)], ran
