"""End-to-end tests of whole computations: real replicas, clients and nodes.

Every test starts a local cluster the way ``tasksprint run`` does -- three
replica processes (fsync on) with the test's scheduler, two worker client
processes, each running real node processes -- and checks the outcome
through the interfaces a user has: the ``tasksprint`` command, the values
the scheduler gives to ``finish``, and the ``status`` / ``info`` queries.

* Monte Carlo through ``tasksprint run`` estimates pi;
* clients join however their start-up races the replicas', and are not
  declared dead for joining long after the leader took office;
* a client killed with SIGKILL mid-run: its tasks (and outputs that lived
  only on it) are redone elsewhere, ``client_dead`` is called, the result is
  exact;
* the leader replica killed with SIGKILL mid-run: the result is exact and
  every task's completion reaches the scheduler exactly once;
* node crashes, timeouts and protocol violations: the node is killed and
  replaced, the task retried, and a task that keeps failing fails the
  computation with a report naming it;
* a scheduler hook that raises fails the computation with a report naming
  the hook, the task and the log slot, and the replicas stay up;
* a JavaScript node; ``tasksprint status`` / ``info`` / ``cancel``;
  replicated non-deterministic tasks draw the same numbers everywhere.

Schedulers are small files written into ``tmp_path``; the nodes are
``tests/fixtures/e2e_node.py`` (Python SDK), ``tests/fixtures/e2e_raw_node.py``
(the stdio protocol by hand) and ``examples/js/node.js``.

Timing: every wait polls until a condition holds and is bounded by a
generous deadline that only turns a hang into a failure; no test asserts
how long anything took.  Each test's processes carry a marker in their
environment (the shared ``no_leaks`` fixture of ``conftest.py``), so that
whatever a test started -- replicas, clients, nodes, a ``tasksprint run``
-- is found when it ends: anything still running a few seconds after the
test stopped its cluster is killed, and the test fails, since the runtime
should have stopped it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

from tasksprint.api import ReplicaStatus
from tasksprint.channel import ASK_ERRORS
from tasksprint.coordinator.replies import ClientLoad, ComputationStatus, TaskInfo
from tasksprint.localcluster import LocalCluster
from tasksprint.log_client import LogClient
from tasksprint.run import LocalRun

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PY_NODE = FIXTURES / "e2e_node.py"
RAW_NODE = FIXTURES / "e2e_raw_node.py"
MONTECARLO = REPO / "examples" / "montecarlo"
JS_NODE = REPO / "examples" / "js" / "node.js"

# Upper bound on one test, only so that a hang fails instead of blocking the suite.
GUARD_SECONDS = 240
# Upper bound on one computation, from its start to finished/failed.
RUN_SECONDS = 150
# Upper bound on any one wait for the cluster to reach a state.
WAIT_SECONDS = 60
# Upper bound on one short ``tasksprint`` command (status, info, cancel).
CLI_SECONDS = 60
POLL_SECONDS = 0.05
# Seconds of silence before a client is declared dead, in the tests about client deaths.
CLIENT_TIMEOUT = 3.0

SCALE_ENV = "TASKSPRINT_TIMEOUT_SCALE"

T = TypeVar("T")


# --------------------------------------------------------------------------
# Processes


def tasksprint_command() -> list[str]:
    """The ``tasksprint`` console script of the running Python (or its module form)."""
    script = Path(sys.executable).parent / "tasksprint"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tasksprint.cli"]


def node_command(script: Path, *args: object) -> str:
    """A node command line running ``script`` with this Python."""
    return shlex.join([sys.executable, str(script), *map(str, args)])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may contain spaces.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def run_cli(cmd: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a ``tasksprint`` command to completion; fail the test if it hangs.

    A hanging ``tasksprint run`` gets SIGINT first, on which it stops the
    cluster it started.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} did not end within {timeout}s\nstdout:\n{out}\nstderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --------------------------------------------------------------------------
# Schedulers


def write_scheduler(directory: Path, cls: str, source: str, **constants: Any) -> str:
    """Write a scheduler file defining ``cls``; return its ``FILE.py:CLASS`` spec.

    ``constants`` become module-level names (paths the tasks need, ...) at
    the top of the file.
    """
    path = directory / f"{cls.lower()}.py"
    header = "from tasksprint import Coordinator\n" + "".join(f"{k} = {v!r}\n" for k, v in constants.items())
    path.write_text(header + "\n" + textwrap.dedent(source))
    return f"{path}:{cls}"


# Squares of 0..7, summed in two halves and then in total.  Each leaf sleeps
# so that the computation is still running when a test breaks something.
SUM_DAG = """
LEAVES = 8

class SumDag(Coordinator):
    def init(self, seed):
        self.done = []
        self.dead = []
        self.leaves = [
            self.start_task("value", args=[i * i], kwargs={"sleep": SLEEP}, keys=["v"]) for i in range(LEAVES)
        ]
        half = LEAVES // 2
        self.halves = [
            self.start_task("total", pretasks=part, prekeys=["v"] * half, keys=["v"])
            for part in (self.leaves[:half], self.leaves[half:])
        ]
        self.root = self.start_task("total", pretasks=self.halves, prekeys=["v", "v"], keys=["v"])

    def client_dead(self, cid):
        self.dead.append(cid)

    def task_done(self, tid, values):
        self.done.append(tid)
        if tid == self.root:
            self.finish(
                taskids=[tid],
                values={
                    "total": values["v"],
                    "done": self.done,
                    "dead": self.dead,
                    "tasks": self.leaves + self.halves + [self.root],
                },
            )
"""
SUM_DAG_TOTAL = sum(i * i for i in range(8))


# --------------------------------------------------------------------------
# Talking to the cluster


async def wait_until(check: Callable[[], Awaitable[T | None]], what: str, *, timeout: float = WAIT_SECONDS) -> T:
    """Poll ``check`` until it returns something other than None or False; return that.

    Fails the test after ``timeout`` seconds.
    """
    with trio.move_on_after(timeout):
        while True:
            value = await check()
            if value is not None and value is not False:
                return value
            await trio.sleep(POLL_SECONDS)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


async def query(run: LocalRun, name: str, args: dict | None = None, *, replica: int | None = None) -> Any:
    """The answer of replica ``replica`` (default: the first that answers) to query ``name``; None if none answers."""
    assert run.cluster is not None
    client = LogClient(run.cluster.addrs, run.cluster.secret)
    order = range(run.cluster.replicas) if replica is None else [replica]
    for i in order:
        try:
            return await client.query(name, args or {}, addr=run.cluster.addrs[i], timeout=2.0)
        except ASK_ERRORS:
            continue
    return None


async def replica_status(run: LocalRun, i: int) -> ReplicaStatus | None:
    assert run.cluster is not None
    try:
        return await LogClient(run.cluster.addrs, run.cluster.secret).status(run.cluster.addrs[i], timeout=2.0)
    except ASK_ERRORS:
        return None


async def status(run: LocalRun) -> ComputationStatus:
    """The computation's status from some replica (waits until one answers)."""

    async def ask() -> ComputationStatus | None:
        return await query(run, "status")

    return await wait_until(ask, "a replica to answer a status query")


async def settled_info(run: LocalRun, tid: int) -> TaskInfo:
    """Task ``tid``'s info once the answering replica has it done, failed or killed.

    Replicas apply the log independently, so one may not have applied the
    latest entries yet when another already reported the computation's end.
    """

    async def ask() -> TaskInfo | None:
        task = await query(run, "info", {"tid": tid})
        return task if task is not None and task.state not in ("pending", "running") else None

    return await wait_until(ask, f"task {tid} to be done, failed or killed")


async def leader_of(run: LocalRun) -> int:
    """The id of the replica that says it leads."""
    assert run.cluster is not None

    async def find() -> int | None:
        for i in range(run.cluster.replicas):
            st = await replica_status(run, i)
            if st is not None and st.role == "leader":
                return i
        return None

    return await wait_until(find, "a leader")


def client_logs(run: LocalRun, lines: int = 40) -> str:
    """The tails of the worker clients' logs (they include their nodes' stderr)."""
    parts = []
    for i in range(len(run.client_procs)):
        try:
            text = (run.base() / f"client{i}.log").read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        parts.append(f"--- client {i} ---\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(parts)


async def outcome(run: LocalRun) -> ComputationStatus:
    """Wait for the computation to end; its final status."""
    try:
        return await run.wait_status()
    except TimeoutError as exc:
        st = await query(run, "status")
        pytest.fail(f"{exc}; last status: {st}\n{client_logs(run)}")


def finished_values(st: ComputationStatus, run: LocalRun) -> Any:
    """The values given to ``finish``, after checking the computation finished."""
    assert st.state == "finished", f"the computation {st.state}: {st.failure}\n{client_logs(run)}"
    assert st.result is not None
    return st.result.values


def kill_client(run: LocalRun, client: ClientLoad) -> None:
    """kill -9 the worker client of ``run`` that ``status`` lists as ``client``, and reap it."""
    proc = run.client_procs[int(client.name.removeprefix("client"))]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


async def cli(run: LocalRun, *args: str) -> subprocess.CompletedProcess:
    """Run ``tasksprint ARGS --coordinators ... --secret-file ...`` against ``run``'s cluster."""
    assert run.cluster is not None
    cmd = [
        *tasksprint_command(),
        *args,
        "--coordinators",
        run.cluster.peers_arg,
        "--secret-file",
        str(run.cluster.secret_file),
    ]
    with trio.fail_after(CLI_SECONDS):
        return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)


async def cli_json(run: LocalRun, *args: str) -> Any:
    done = await cli(run, *args, "--json")
    assert done.returncode == 0, f"tasksprint {' '.join(args)} exited {done.returncode}: {done.stderr.decode()}"
    return json.loads(done.stdout)


# --------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def computation(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Awaitable[LocalRun]]]:
    """Start computations on local clusters; everything is stopped and reaped at the end.

    ``await computation(scheduler_spec, node_command, clients=2, slots=1,
    replica_args=(), join_early=False)`` starts three replicas (fsync on) and
    ``clients`` worker clients with ``slots`` node processes each, under
    ``tmp_path/runN`` (kept for inspection), and returns the ``LocalRun``.

    The clients start once the computation is initialised: a client that
    joins before the init entry is applied is refused (see
    ``test_clients_started_with_the_replicas_all_join``), and the other
    tests are about other things.  ``join_early=True`` starts them at once,
    as ``tasksprint run`` does.
    """
    runs: list[LocalRun] = []
    clusters: list[LocalCluster] = []
    request.node._local_clusters = clusters  # replica logs in the report of a failed test

    async def start(
        scheduler: str,
        node: str,
        *,
        clients: int = 2,
        slots: int = 1,
        replica_args: tuple[str, ...] = (),
        join_early: bool = False,
    ) -> LocalRun:
        base = tmp_path / f"run{len(runs)}"
        base.mkdir()
        run = LocalRun(scheduler, node, 3, clients, slots, base, None, RUN_SECONDS)
        runs.append(run)
        run.cluster = LocalCluster(base, 3, scheduler=scheduler, extra_args=tuple(replica_args))
        clusters.append(run.cluster)
        run.cluster.start()
        if not join_early:

            async def initialised() -> bool:
                st = await query(run, "status")
                return st is not None and st.state != "waiting"

            await wait_until(initialised, "the computation to be initialised")
        for i in range(clients):
            run.start_client(i)
        return run

    try:
        yield start
    finally:
        for run in runs:
            run.stop()


# --------------------------------------------------------------------------
# 1. The seed's own example, through the command line


def test_monte_carlo_through_tasksprint_run_estimates_pi(tmp_path: Path) -> None:
    cmd = [
        *tasksprint_command(),
        "run",
        f"{MONTECARLO / 'scheduler.py'}:MonteCarloCoordinator",
        "--node",
        node_command(MONTECARLO / "node.py"),
        "--clients",
        "2",
        "--slots",
        "1",
        "--data",
        str(tmp_path / "run"),
        "--timeout",
        str(RUN_SECONDS),
    ]
    # Each of the eleven samplers runs for 5 s * 0.02 = 0.1 s.
    env = {**os.environ, SCALE_ENV: "0.02"}
    done = run_cli(cmd, env=env, timeout=RUN_SECONDS + 60)
    assert done.returncode == 0, f"tasksprint run exited {done.returncode}\nstderr:\n{done.stderr[-4000:]}"
    result = json.loads(done.stdout)
    estimate = result["values"]["result"]
    assert abs(estimate - math.pi) < 0.05, f"pi estimated as {estimate}"
    [merge] = result["tasks"]
    assert merge["values"] == {"result": estimate}


# --------------------------------------------------------------------------
# Joining


async def test_clients_started_with_the_replicas_all_join(computation, tmp_path: Path) -> None:
    """Clients started together with the replicas (as ``tasksprint run`` does) must all join.

    A client may reach the leader before the computation's init entry is
    applied; it is then told to try again, and must.
    """
    spec = write_scheduler(
        tmp_path,
        "JoinBoth",
        """
        class JoinBoth(Coordinator):
            def init(self, seed):
                self.joined = []

            def client_joined(self, cid):
                self.joined.append(cid)
                if len(self.joined) == 2:
                    self.finish(values={"joined": self.joined})
        """,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE), join_early=True)

        async def ended() -> ComputationStatus | None:
            # A client exits 0 only once the computation finished, which may
            # be before this poll sees it (it ends as the second client joins);
            # one that gave up exits otherwise.
            exited = {i: code for i, p in enumerate(run.client_procs) if (code := p.poll()) is not None}
            gave_up = {i: code for i, code in exited.items() if code != 0}
            assert not gave_up, f"clients exited before the computation ended: {gave_up}\n{client_logs(run)}"
            st = await query(run, "status")
            return st if st is not None and st.ended else None

        st = await wait_until(ended, "both clients to join", timeout=RUN_SECONDS)
        values = finished_values(st, run)
        assert sorted(values["joined"]) == [1, 2]


async def test_clients_joining_long_after_the_leader_took_office_are_not_declared_dead(
    computation, tmp_path: Path
) -> None:
    """A client is judged silent from when it joined, not from when the leader took office.

    Clients ask the first replica of their list for their views.  Here that
    replica is a follower (as it is for most clients of a real cluster), so
    the leader hears of a new client's polls second-hand, a little later.
    """
    spec = write_scheduler(tmp_path, "SumDag", SUM_DAG, SLEEP=0.2)
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(
            spec, node_command(PY_NODE), clients=0, replica_args=("--client-timeout", str(CLIENT_TIMEOUT))
        )
        assert run.cluster is not None

        async def leader_other_than_0() -> bool:
            for i in (1, 2):
                st = await replica_status(run, i)
                if st is not None and st.role == "leader":
                    return True
            return False

        for _ in range(5):
            if await leader_of(run) != 0:
                break
            run.cluster.kill(0)
            await wait_until(leader_other_than_0, "replica 1 or 2 to take over")
            run.cluster.start_replica(0)
        else:
            pytest.fail("replica 0 won every election")
        leader = await leader_of(run)
        started_at = (await query(run, "status", replica=leader)).now

        async def timeout_passed() -> bool:
            # The coordinator's own clock (the leader's, through TICKs), not ours.
            st = await query(run, "status", replica=leader)
            return st is not None and st.now > started_at + CLIENT_TIMEOUT + 1

        await wait_until(timeout_passed, "the coordinator's clock to pass the client timeout")
        assert await leader_of(run) == leader, "the leadership moved while the test waited; run it again"
        for i in range(2):
            run.start_client(i)
        st = await outcome(run)
        values = finished_values(st, run)
        assert values["total"] == SUM_DAG_TOTAL
        assert values["dead"] == [], "client_dead called although no client stopped"
        assert (st.clients.live, st.clients.dead) == (2, 0)


# --------------------------------------------------------------------------
# 2. A client killed mid-run


async def test_client_killed_mid_run_its_work_is_redone_and_client_dead_is_called(computation, tmp_path: Path) -> None:
    spec = write_scheduler(tmp_path, "SumDag", SUM_DAG, SLEEP=0.4)
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE), replica_args=("--client-timeout", str(CLIENT_TIMEOUT)))

        async def busy_client() -> ClientLoad | None:
            # Once some leaf is done (its outputs live on a client) and a client runs a task;
            # asked of the leader, whose view is the freshest.
            st = await query(run, "status", replica=await leader_of(run))
            if st is None or st.tasks["done"] < 1:
                return None
            busy = [c for c in st.live_clients if c.running > 0]
            return busy[0] if busy else None

        victim = await wait_until(busy_client, "a client running a task after a first completion")
        kill_client(run, victim)

        st = await outcome(run)
        values = finished_values(st, run)
        assert values["total"] == SUM_DAG_TOTAL
        assert sorted(values["done"]) == sorted(values["tasks"]), "task_done not called once per task"
        assert victim.cid in values["dead"], f"client_dead not called for the killed client {victim}"
        assert values["dead"] == [victim.cid], "client_dead called for clients that were not killed"
        assert (st.clients.live, st.clients.dead) == (1, 1)


# Many short tasks, so each client asks for a queue beyond its one slot; a
# reduce over all of them, then a chain, whose links run on the client that
# made the previous one without waiting for the log (early inputs).
QUEUED_SUM = """
class QueuedSum(Coordinator):
    def init(self, seed):
        self.done = []
        self.dead = []
        self.leaves = [
            self.start_task("value", args=[i], kwargs={"sleep": SLEEP}, keys=["v"]) for i in range(LEAVES)
        ]
        link = self.start_task("total", pretasks=self.leaves, prekeys=["v"] * LEAVES, keys=["v"])
        self.chain = [link]
        for _ in range(CHAIN):
            link = self.start_task("total", pretasks=[link], prekeys=["v"], keys=["v"])
            self.chain.append(link)

    def client_dead(self, cid):
        self.dead.append(cid)

    def task_done(self, tid, values):
        self.done.append(tid)
        if tid == self.chain[-1]:
            self.finish(
                taskids=[tid],
                values={"total": values["v"], "done": self.done, "dead": self.dead, "tasks": self.leaves + self.chain},
            )
"""


async def test_client_killed_with_tasks_queued_beyond_its_slots_they_are_placed_again(
    computation, tmp_path: Path
) -> None:
    leaves = 600
    spec = write_scheduler(tmp_path, "QueuedSum", QUEUED_SUM, SLEEP=0.005, LEAVES=leaves, CHAIN=40)
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE), replica_args=("--client-timeout", str(CLIENT_TIMEOUT)))

        async def queued_client() -> ClientLoad | None:
            # A client holding more tasks than its one slot: the rest wait in its node pool.
            st = await query(run, "status", replica=await leader_of(run))
            if st is None or st.state != "running":
                return None
            queued = [c for c in st.live_clients if c.running > c.slots + 1]
            return queued[0] if queued and st.tasks["done"] < leaves // 2 else None

        victim = await wait_until(queued_client, "a client with tasks queued beyond its slots")
        kill_client(run, victim)

        st = await outcome(run)
        values = finished_values(st, run)
        assert values["total"] == sum(range(leaves))
        assert sorted(values["done"]) == sorted(values["tasks"]), "task_done not called once per task"
        assert values["dead"] == [victim.cid]
        assert st.tasks["done"] == st.tasks["total"] == leaves + 41


async def test_a_chain_of_short_tasks_runs_ahead_of_the_log_and_every_link_counts_once(
    computation, tmp_path: Path
) -> None:
    spec = write_scheduler(tmp_path, "QueuedSum", QUEUED_SUM, SLEEP=0.0, LEAVES=50, CHAIN=300)
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE), clients=1, slots=2)
        st = await outcome(run)
        values = finished_values(st, run)
        assert values["total"] == sum(range(50))
        chain = values["tasks"][50:]
        assert [t for t in values["done"] if t in chain] == chain, "task_done not called in chain order"
        assert sorted(values["done"]) == sorted(values["tasks"])
        # The links followed each other onto the one client (placed before their input existed).
        info = await settled_info(run, values["tasks"][-1])
        assert info.holder is not None and info.attempt == 1


# --------------------------------------------------------------------------
# 3. The leader replica killed mid-run


async def test_leader_killed_mid_run_every_completion_counts_once(computation, tmp_path: Path) -> None:
    spec = write_scheduler(tmp_path, "SumDag", SUM_DAG, SLEEP=0.3)
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))
        assert run.cluster is not None

        async def mid_run() -> bool:
            st = await query(run, "status")
            return st is not None and st.tasks["done"] >= 2 and st.tasks["running"] >= 1

        await wait_until(mid_run, "two completions with tasks still running")
        leader = await leader_of(run)
        run.cluster.kill(leader)

        st = await outcome(run)
        values = finished_values(st, run)
        assert values["total"] == SUM_DAG_TOTAL
        done = values["done"]
        assert len(done) == len(set(done)), f"a completion reached task_done twice: {done}"
        assert sorted(done) == sorted(values["tasks"]), f"completions missing: {done}"
        assert st.tasks["done"] == st.tasks["total"] == len(values["tasks"])

        # The killed replica comes back from its data directory and agrees.
        run.cluster.start_replica(leader)

        async def caught_up() -> ComputationStatus | None:
            mine = await query(run, "status", replica=leader)
            return mine if mine is not None and mine.state == "finished" else None

        restarted = await wait_until(caught_up, f"replica {leader} to come back and catch up")
        assert restarted.result == st.result


# --------------------------------------------------------------------------
# 4. Node processes that crash


async def test_node_crash_on_first_attempt_is_retried_and_the_computation_finishes(computation, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = write_scheduler(
        tmp_path,
        "CrashOnce",
        """
        class CrashOnce(Coordinator):
            def init(self, seed):
                self.crashers = [
                    self.start_task("crash_once", args=[x], kwargs={"marks": MARKS}, keys=["v"]) for x in (3, 4)
                ]
                self.root = self.start_task("total", pretasks=self.crashers, prekeys=["v", "v"], keys=["v"])

            def task_done(self, tid, values):
                if tid == self.root:
                    self.finish(taskids=[tid], values={"total": values["v"], "crashers": self.crashers})
        """,
        MARKS=str(marks),
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))
        st = await outcome(run)
        values = finished_values(st, run)
        assert values["total"] == 7
        for tid in values["crashers"]:
            task = await settled_info(run, tid)
            assert task.state == "done"
            assert task.failures == 1, task
            assert task.error is not None, task
            assert "exited with code 3" in task.error and f"task {tid} (crash_once)" in task.error, task


def test_node_that_always_crashes_exhausts_its_retries_and_tasksprint_run_reports_it(tmp_path: Path) -> None:
    spec = write_scheduler(
        tmp_path,
        "AlwaysCrash",
        """
        class AlwaysCrash(Coordinator):
            def init(self, seed):
                self.start_task("always_crash", retries=1)
        """,
    )
    cmd = [
        *tasksprint_command(),
        "run",
        spec,
        "--node",
        node_command(PY_NODE),
        "--clients",
        "2",
        "--slots",
        "1",
        "--data",
        str(tmp_path / "run"),
        "--timeout",
        str(RUN_SECONDS),
    ]
    done = run_cli(cmd, env=dict(os.environ), timeout=RUN_SECONDS + 60)
    assert done.returncode == 1, f"tasksprint run exited {done.returncode}\nstderr:\n{done.stderr[-4000:]}"
    assert done.stdout == ""
    report = done.stderr[done.stderr.find("the computation failed") :]
    assert "the computation failed" in report, done.stderr[-4000:]
    # Task 1 is the only task; one retry means two attempts.
    for expected in ("task 1 ('always_crash') failed 2 time(s)", "tid: 1", "exited with code 3"):
        assert expected in report, f"{expected!r} not in the report:\n{report}"


# --------------------------------------------------------------------------
# 5. Tasks that run past their timeout


async def test_task_past_its_timeout_is_killed_and_retried_and_one_that_always_hangs_fails(
    computation, tmp_path: Path
) -> None:
    marks, pids = tmp_path / "marks", tmp_path / "pids"
    marks.mkdir()
    pids.mkdir()
    spec = write_scheduler(
        tmp_path,
        "Timeouts",
        """
        class Timeouts(Coordinator):
            def init(self, seed):
                self.hangs_once = self.start_task(
                    "hang_once", args=[5], kwargs={"marks": MARKS}, keys=["v"], timeout=1, retries=1
                )

            def task_done(self, tid, values):
                # Only then, so that the two tasks cannot be confused.
                self.start_task("hang", args=["forever", PIDS], timeout=1, retries=1)
        """,
        MARKS=str(marks),
        PIDS=str(pids),
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))
        st = await outcome(run)
        assert st.state == "failed", st
        failure = st.failure
        assert failure is not None and failure.kind == "task" and failure.tid == 2, failure
        assert "task 2 (hang) ran longer than its timeout of 1 s" in failure.error, failure
        assert "'hang'" in failure.message and "failed 2 time(s)" in failure.message, failure

        first = await settled_info(run, 1)
        assert first.state == "done" and first.values == {"v": 5}, first
        assert first.failures == 1 and first.error is not None and "ran longer than its timeout" in first.error, first

        # Both attempts of the hanging task ran, each in a node process that is gone now.
        hung = [int(p.name.rpartition("-")[2]) for p in pids.iterdir()]
        assert len(hung) == 2, hung

        async def all_gone() -> bool:
            return not any(pid_alive(p) for p in hung)

        await wait_until(all_gone, f"the node processes {hung} that ran past the timeout to be killed")


# --------------------------------------------------------------------------
# 6. A scheduler hook that raises


async def test_scheduler_hook_that_raises_fails_the_computation_and_the_replicas_stay_up(
    computation, tmp_path: Path
) -> None:
    spec = write_scheduler(
        tmp_path,
        "HookRaises",
        """
        class HookRaises(Coordinator):
            def init(self, seed):
                self.tids = [self.start_task("value", args=[x], keys=["v"]) for x in (1, 2, 3)]
                self.bad = self.tids[1]
                self.seen = []

            def task_done(self, tid, values):
                if tid == self.bad:
                    raise ValueError(f"refusing the value of task {tid}")
                self.seen.append(tid)
                if len(self.seen) == len(self.tids):
                    self.finish(values=self.seen)
        """,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))
        st = await outcome(run)
        assert st.state == "failed", st
        assert run.cluster is not None

        async def shown_failed() -> dict | None:
            shown = await cli_json(run, "status")
            return shown if shown["computation"]["state"] != "running" else None

        shown = await wait_until(shown_failed, "tasksprint status to show the computation's end")
        replicas = shown["replicas"]
        assert [r["reachable"] for r in replicas] == [True] * 3, replicas
        computation_ = shown["computation"]
        assert computation_["state"] == "failed"
        failure = computation_["failure"]
        assert failure["kind"] == "hook" and failure["hook"] == "task_done" and failure["tid"] == 2, failure
        slot = failure["slot"]
        assert isinstance(slot, int) and slot > 0, failure
        message = failure["message"]
        expected_parts = (
            "HookRaises.task_done(tid=2)",
            f"log slot {slot}",
            "ValueError: refusing the value of task 2",
        )
        for expected in expected_parts:
            assert expected in message, f"{expected!r} not in {message!r}"

        # Every replica is still running and reports the same failure.
        for i in range(3):
            assert run.cluster.alive(i), f"replica {i} exited:\n{run.cluster.logs(i)[-3000:]}"

            async def reports_failure(i: int = i) -> ComputationStatus | None:
                mine = await query(run, "status", replica=i)
                return mine if mine is not None and mine.state == "failed" else None

            reported = await wait_until(reports_failure, f"replica {i} to report the failure")
            assert attrs.asdict(reported.failure) == failure


# --------------------------------------------------------------------------
# 7. A node that breaks the stdio protocol


async def test_bad_node_output_fails_the_task_with_the_output_quoted_and_the_node_is_replaced(
    computation, tmp_path: Path
) -> None:
    nodelog = tmp_path / "nodelog"
    nodelog.mkdir()
    spec = write_scheduler(
        tmp_path,
        "BadOutput",
        """
        class BadOutput(Coordinator):
            def init(self, seed):
                self.errors = []
                self.got = []
                self.bad = [self.start_task("garbage", retries=0), self.start_task("wrong_id", retries=0)]

            def task_failed(self, tid, error):
                self.errors.append([tid, error])
                if len(self.errors) == len(self.bad):
                    for x in (10, 20):
                        self.start_task("ok", args=[x], keys=["v"])

            def task_done(self, tid, values):
                self.got.append(values["v"])
                if len(self.got) == 2:
                    self.finish(values={"errors": self.errors, "bad": self.bad, "got": sorted(self.got)})
        """,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(RAW_NODE, nodelog))
        st = await outcome(run)
        values = finished_values(st, run)
        assert values["got"] == [10, 20], "the tasks after the bad outputs did not work"
        garbage, wrong_id = values["bad"]
        errors = dict(values["errors"])
        assert f"node wrote invalid output while running task {garbage} (garbage)" in errors[garbage], errors
        assert "'this line is not json'" in errors[garbage], errors
        assert f"node answered task {wrong_id + 1000} attempt" in errors[wrong_id], errors
        assert f"while running task {wrong_id} (wrong_id)" in errors[wrong_id], errors

        # Which node process (and which client, its parent) ran what.
        started: dict[int, int] = {}  # node pid -> client pid
        ran: dict[str, list[int]] = {}  # task name -> node pids
        for path in nodelog.iterdir():
            pid = int(path.name)
            for line in path.read_text().splitlines():
                word, _, rest = line.partition(" ")
                if word == "started":
                    started[pid] = int(rest)
                else:
                    ran.setdefault(rest, []).append(pid)
        bad_pids = ran.get("garbage", []) + ran.get("wrong_id", [])
        assert len(bad_pids) == 2, ran
        assert not set(bad_pids) & set(ran.get("ok", [])), f"a node that misbehaved ran another task: {ran}"
        assert not any(pid_alive(p) for p in bad_pids), f"a node that misbehaved is still running: {bad_pids}"
        # Each misbehaving node was replaced by a fresh process of the same
        # client, and a later task ran on such a replacement.
        bad_clients = {started[p] for p in bad_pids}
        for client in bad_clients:
            restarted = sum(1 for c in started.values() if c == client) >= 2
            assert restarted, f"client {client} started no node after the bad one: {started}"
        assert any(started[p] in bad_clients for p in ran["ok"]), f"no later task ran on a restarted node: {ran}"


# --------------------------------------------------------------------------
# 8. A node written in JavaScript


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js (the `node` command) is not installed")
async def test_javascript_node_runs_tasks_in_a_real_cluster(computation, tmp_path: Path) -> None:
    spec = write_scheduler(
        tmp_path,
        "SquareSum",
        """
        class SquareSum(Coordinator):
            def init(self, seed):
                squares = [self.start_task("square", args=[x], keys=["result"]) for x in range(1, 6)]
                self.root = self.start_task("sum", pretasks=squares, prekeys=["result"] * 5, keys=["result"])

            def task_done(self, tid, values):
                if tid == self.root:
                    self.finish(taskids=[tid], values={"sum": values["result"]})
        """,
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, shlex.join(["node", str(JS_NODE)]))
        st = await outcome(run)
        assert finished_values(st, run) == {"sum": 55}


# --------------------------------------------------------------------------
# 9. status, info and cancel from the command line


async def test_status_info_and_cancel_commands_against_a_running_cluster(computation, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    spec = write_scheduler(
        tmp_path,
        "LongTask",
        """
        class LongTask(Coordinator):
            def init(self, seed):
                self.quick = self.start_task("value", args=[1], keys=["v"])  # task 1
                self.long = self.start_task("hang", args=["long", PIDS])  # task 2
                self.dependent = self.start_task("total", pretasks=[self.long])  # task 3
                self.grand = self.start_task("total", pretasks=[self.dependent, self.quick])  # task 4
        """,
        PIDS=str(pids),
    )
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(PY_NODE))

        async def long_task_running() -> list[int] | None:
            st = await query(run, "status")
            if st is None or st.tasks["done"] < 1 or st.tasks["running"] < 1:
                return None
            return [int(p.name.rpartition("-")[2]) for p in pids.iterdir()] or None

        [node_pid] = await wait_until(long_task_running, "task 2 to run on a node and task 1 to be done")

        shown = await cli_json(run, "status")
        assert [r["reachable"] for r in shown["replicas"]] == [True] * 3, shown["replicas"]
        assert sum(r["role"] == "leader" for r in shown["replicas"]) == 1, shown["replicas"]
        counts = shown["computation"]["tasks"]
        assert shown["computation"]["state"] == "running"
        assert (counts["total"], counts["done"], counts["running"], counts["pending"]) == (4, 1, 1, 2), counts

        task = await cli_json(run, "info", "2")
        assert (task["tid"], task["name"], task["state"]) == (2, "hang", "running"), task
        assert task["dependents"] == [3], task

        cancelled = await cli_json(run, "cancel", "2")
        assert cancelled["ok"] is True and sorted(cancelled["killed"]) == [2, 3, 4], cancelled

        expected_states = (
            (1, "value", "done"),
            (2, "hang", "killed"),
            (3, "total", "killed"),
            (4, "total", "killed"),
        )
        for tid, name, state in expected_states:

            async def shown_settled(tid: int = tid) -> dict | None:
                # The replica that answers may apply the cancel a moment after the leader did.
                task = await cli_json(run, "info", str(tid))
                return task if task["state"] not in ("pending", "running") else None

            task = await wait_until(shown_settled, f"tasksprint info {tid} to show it settled")
            assert (task["name"], task["state"]) == (name, state), task

        async def node_killed() -> bool:
            return not pid_alive(node_pid)

        await wait_until(node_killed, f"the node process {node_pid} running the cancelled task to be killed")

        missing = await cli(run, "info", "99")
        assert missing.returncode != 0 and b"no task 99" in missing.stderr


# --------------------------------------------------------------------------
# 10. Replicated non-deterministic tasks


async def test_replicated_random_task_draws_the_same_number_on_both_copies_and_completes_once(
    computation, tmp_path: Path
) -> None:
    out = tmp_path / "draws"
    out.mkdir()
    spec = write_scheduler(
        tmp_path,
        "Replicated",
        """
        class Replicated(Coordinator):
            def init(self, seed):
                self.done = []
                self.values = {}
                self.labels = {
                    label: self.start_task("draw", args=[label, OUT], replicas=2, keys=["v"])
                    for label in ("r0", "r1")
                }

            def task_done(self, tid, values):
                self.done.append(tid)
                self.values[tid] = values["v"]
                if len(self.values) == len(self.labels):
                    drawn = {label: self.values[tid] for label, tid in self.labels.items()}
                    self.finish(values={"done": self.done, "labels": self.labels, "drawn": drawn})
        """,
        OUT=str(out),
    )
    with trio.fail_after(GUARD_SECONDS):
        # Two slots per client: both copies of both tasks run at once, one copy on each client.
        run = await computation(spec, node_command(PY_NODE), slots=2)
        st = await outcome(run)
        values = finished_values(st, run)
        labels, drawn = values["labels"], values["drawn"]
        assert sorted(values["done"]) == sorted(labels.values()), f"completions: {values['done']}"
        assert st.tasks["done"] == st.tasks["total"] == 2

        for label, tid in labels.items():
            copies = [json.loads(p.read_text()) for p in out.glob(f"{label}-*.json")]
            assert len(copies) == 2, f"task {tid} ran {len(copies)} copies: {copies}"
            assert copies[0]["pid"] != copies[1]["pid"]
            assert copies[0]["value"] == copies[1]["value"] == drawn[label], (copies, drawn)
            task = await settled_info(run, tid)
            assert task.replicas == 2 and task.state == "done", task
        assert drawn["r0"] != drawn["r1"], "two different tasks drew the same number: their seeds are equal"
