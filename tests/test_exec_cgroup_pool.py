"""Task cgroups kept from run to run: each run still has a group of its own and measures only itself.

Real cgroups (skipped unless root with a writable hierarchy); the runs are
real processes.  After each test no process of its runs and no task group of
this process may remain.  The CPU and memory figures compared are amounts of
work the tasks do, never how long anything took.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from task_marks import marked_processes, own_task_groups

from tasksprint.exec.cgroup import CgroupLayout, CgroupV1Group, CgroupV2Group, detect_cgroups
from tasksprint.exec.cgroup_pool import CgroupPool
from tasksprint.exec.guardian import Guardian
from tasksprint.exec.runner import TaskEnv, run_command
from tasksprint.exec.spec import CommandRecord, CommandSpec, Enforcement, Limits, Verdict

MARK = "TS_POOL_TEST_MARK"
PY = sys.executable
MIB = 1024 * 1024


def _marked_processes(mark: str) -> list[int]:
    return marked_processes(MARK, mark)


@pytest.fixture
def layout() -> Iterator[CgroupLayout]:
    """This machine's cgroups, v1 (the only version whose groups are kept); checks nothing is left after."""
    if os.geteuid() != 0:
        pytest.skip("writing cgroups needs root")
    found = detect_cgroups()
    if found is None or found.version is not Enforcement.CGROUP_V1:
        pytest.skip("no writable cgroup v1 hierarchy here (only v1 groups are kept)")
    yield found
    assert own_task_groups(found) == [], "task groups were left behind"


@pytest.fixture
def pool(layout: CgroupLayout) -> Iterator[CgroupPool]:
    kept = CgroupPool(layout)
    yield kept
    kept.close()


@pytest.fixture
def mark() -> Iterator[str]:
    value = uuid.uuid4().hex
    yield value
    left = _marked_processes(value)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes of a task outlived its run"


async def _run(pool: CgroupPool, mark: str, limits: Limits, **spec: object) -> CommandRecord:
    command = CommandSpec(env={MARK: mark}, limits=limits, **spec)  # type: ignore[arg-type]
    env = TaskEnv(task_id="t", attempt=0, client="pool-test")
    return await run_command(command, task_env=env, cgroups=pool.layout, pool=pool)


HOG = "import sys; b = bytearray(int(sys.argv[1]) * 1024 * 1024); sum(range(3_000_000))"


async def test_a_kept_group_serves_the_next_run_which_measures_only_itself(pool: CgroupPool, mark: str) -> None:
    limits = Limits(pids=64)
    hog = await _run(pool, mark, limits, argv=(PY, "-c", HOG, "96"))
    assert hog.verdict is Verdict.OK, hog
    assert hog.enforcement is Enforcement.CGROUP_V1
    assert pool.idle() == 1
    groups = own_task_groups(pool.layout)
    light = await _run(pool, mark, limits, cmd="true")
    assert light.verdict is Verdict.OK, light
    assert own_task_groups(pool.layout) == groups, "the second run got a new group"
    assert pool.idle() == 1
    # The first run's 96 MiB and its CPU time are not the second's.
    assert hog.peak_memory_bytes is not None and hog.peak_memory_bytes > 96 * MIB
    assert light.peak_memory_bytes is not None and light.peak_memory_bytes < 16 * MIB
    hog_cpu = hog.user_cpu_s + hog.system_cpu_s
    assert light.user_cpu_s + light.system_cpu_s < hog_cpu / 4
    # Once more after the light run: the counters are read relative to each run's start.
    again = await _run(pool, mark, limits, argv=(PY, "-c", HOG, "96"))
    assert again.peak_memory_bytes is not None and again.peak_memory_bytes > 96 * MIB
    assert again.user_cpu_s + again.system_cpu_s > hog_cpu / 4


async def test_a_run_after_one_killed_by_the_oom_killer_or_the_pids_limit_hits_no_limit(
    pool: CgroupPool, mark: str
) -> None:
    limits = Limits(memory_bytes=64 * MIB, pids=8)
    oom = await _run(pool, mark, limits, argv=(PY, "-c", HOG, "256"))
    assert oom.verdict is Verdict.MEMORY, oom
    after_oom = await _run(pool, mark, limits, cmd="true")
    assert after_oom.verdict is Verdict.OK and after_oom.limits_hit == (), after_oom
    forks = await _run(pool, mark, limits, cmd="for i in $(seq 20); do sleep 0.05 & done; wait; exit 3")
    assert Verdict.PIDS in forks.limits_hit, forks
    after_forks = await _run(pool, mark, limits, cmd="true")
    assert after_forks.verdict is Verdict.OK and after_forks.limits_hit == (), after_forks
    assert pool.idle() == 1


async def test_page_cache_a_run_leaves_is_not_the_next_runs_peak(pool: CgroupPool, mark: str, tmp_path: Path) -> None:
    limits = Limits(pids=64)
    write = f"head -c {64 * MIB} /dev/zero > {tmp_path / 'big'}"
    wrote = await _run(pool, mark, limits, cmd=write)
    assert wrote.verdict is Verdict.OK, wrote
    groups = own_task_groups(pool.layout)
    light = await _run(pool, mark, limits, cmd="true")
    assert light.verdict is Verdict.OK, light
    assert own_task_groups(pool.layout) == groups, "the group was not reclaimed and reused"
    assert light.peak_memory_bytes is not None and light.peak_memory_bytes < 16 * MIB
    assert pool.idle() == 1


async def test_groups_are_kept_per_limits(pool: CgroupPool, mark: str) -> None:
    await _run(pool, mark, Limits(pids=64), cmd="true")
    first = own_task_groups(pool.layout)
    # Other limits: another group, with its own limit files.
    record = await _run(pool, mark, Limits(pids=2), cmd="sleep 1 & sleep 1 & wait")
    assert Verdict.PIDS in record.limits_hit, record
    assert pool.idle() == 2
    assert len(own_task_groups(pool.layout)) == 2 * len(first)
    taken = pool.take(Limits(pids=64))
    try:
        assert isinstance(taken, CgroupV1Group) and taken.limits == Limits(pids=64)
    finally:
        assert pool.give_back(taken)


def test_a_group_that_still_holds_a_process_is_not_kept(pool: CgroupPool) -> None:
    group = pool.take(Limits(pids=64))
    assert isinstance(group, CgroupV1Group)
    sleeper = subprocess.Popen(["sleep", "1000"], preexec_fn=group.child_setup)  # noqa: PLW1509
    try:
        assert not pool.give_back(group)
        assert pool.idle() == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    while group.kill_round():
        pass
    assert pool.give_back(group)  # empty now
    assert pool.idle() == 1


def test_the_pool_keeps_a_bounded_number_of_groups(layout: CgroupLayout) -> None:
    pool = CgroupPool(layout, keep=2)
    try:
        groups = [pool.take(Limits(pids=n)) for n in (10, 11, 12)]
        for group in groups:
            assert pool.give_back(group)
        assert pool.idle() == 2
        assert len({os.path.basename(path) for path in own_task_groups(layout)}) == 2
    finally:
        pool.close()
    assert pool.idle() == 0


def test_the_guardian_removes_kept_groups_of_its_client(layout: CgroupLayout) -> None:
    pool = CgroupPool(layout)
    assert pool.give_back(pool.take(Limits(pids=64)))
    assert own_task_groups(layout)
    guardian = Guardian(layout)
    guardian.start()
    guardian.close()  # as when this process dies: every group it named is removed
    assert own_task_groups(layout) == []


def test_a_v2_group_is_never_kept(tmp_path: Path) -> None:
    layout = CgroupLayout(version=Enforcement.CGROUP_V2, parents={"": str(tmp_path)})
    pool = CgroupPool(layout)
    assert not pool.give_back(CgroupV2Group(str(tmp_path / "g"), Limits()))
    assert pool.idle() == 0


async def test_a_clients_command_runner_keeps_one_group_per_slot_and_removes_them_when_closed(
    layout: CgroupLayout, mark: str
) -> None:
    from tasksprint.command_tasks import CommandTasks
    from tasksprint.coordinator.replies import Assignment
    from tasksprint.coordinator.specs import COMMAND_TASK, command_kwargs

    commands = CommandTasks("pool-client")
    commands.start()
    try:
        spec = CommandSpec(cmd="true", env={MARK: mark}, limits=Limits(pids=64))
        slots = trio.CapacityLimiter(1)
        seen = []
        for tid in (1, 2, 3):
            task = Assignment(
                tid=tid, attempt=1, name=COMMAND_TASK, args=[], kwargs=command_kwargs(spec), seed=0, timeout=None,
                keys=(), inputs=(),
            )  # fmt: skip
            ran = await commands.run_in_slot(task, (), slots)
            assert ran.error is None, ran
            seen.append(own_task_groups(layout))
        assert seen[0] and seen[0] == seen[1] == seen[2], "one slot, one group, kept from task to task"
    finally:
        commands.close()
    assert own_task_groups(layout) == []
