"""The command runner with real processes, under cgroups and under the rlimit fallback.

Every run is tagged with a unique environment variable, and after each test
no process carrying it may exist, no zombie child may be left, and no task
cgroup of this process may remain.  Tests parametrized with ``enforce`` run
once with the cgroups this machine offers (skipped unless root with a
writable cgroup hierarchy) and once with the fallback forced.  Time limits
here are the tasks' own limits; no test asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from task_marks import marked_processes, own_task_groups

from tasksprint.exec import proctree
from tasksprint.exec.cgroup import CgroupLayout, detect_cgroups, sweep_stale_groups
from tasksprint.exec.guardian import Guardian
from tasksprint.exec.runner import TaskEnv, open_task_group, run_command
from tasksprint.exec.sandbox import find_bwrap
from tasksprint.exec.spawner import spawn_argv
from tasksprint.exec.spec import CommandRecord, CommandSpec, Enforcement, Limits, Verdict

MARK = "TS_EXEC_TEST_MARK"


def _cgroups_or_skip() -> CgroupLayout:
    if os.geteuid() != 0:
        pytest.skip("writing cgroups needs root")
    layout = detect_cgroups()
    if layout is None:
        pytest.skip("no writable cgroup v2 or v1 (memory and pids) hierarchy here")
    return layout


@pytest.fixture(scope="module", autouse=True)
def _no_parent_groups_left() -> Iterator[None]:
    """Remove the (empty) ``tasksprint`` parent groups this module's runs created."""
    layout = detect_cgroups() if os.geteuid() == 0 else None
    yield
    if layout is not None:
        for parent in set(layout.parents.values()):
            try:
                os.rmdir(parent)  # fails, as it should, while another client's group is inside
            except OSError:
                pass


# The guardian the runs of a "guarded" test pass to the runner (see enforce).
_guardian: list[Guardian] = []


@contextlib.contextmanager
def _enforcement(kind: str) -> Iterator[CgroupLayout | None]:
    if kind == "rlimit":
        yield None
        return
    layout = _cgroups_or_skip()
    if kind == "cgroup":
        yield layout
        return
    guardian = Guardian(layout)
    guardian.start()
    _guardian.append(guardian)
    try:
        yield layout
    finally:
        _guardian.remove(guardian)
        guardian.close()


@pytest.fixture(params=["cgroup", "guarded", "rlimit"])
def enforce(request: pytest.FixtureRequest) -> Iterator[CgroupLayout | None]:
    """Where task groups go: this machine's cgroups, or None to force the rlimit fallback.

    "cgroup" starts each task behind ``setpriv --pdeathsig`` (no guardian),
    "guarded" with a guardian running, as a client does.
    """
    with _enforcement(request.param) as layout:
        yield layout


@pytest.fixture(params=["cgroup", "guarded"])
def cgroups(request: pytest.FixtureRequest) -> Iterator[CgroupLayout]:
    """This machine's cgroups (skipped without), without and with a guardian."""
    with _enforcement(request.param) as layout:
        assert layout is not None
        yield layout


def _marked_processes(mark: str) -> list[int]:
    return marked_processes(MARK, mark)


def _zombie_children() -> list[int]:
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proctree.proc_stat(int(name))
            if st is not None and st[0] == me and st[2] == "Z":
                found.append(int(name))
    return found


def _own_task_groups() -> list[str]:
    layout = detect_cgroups() if os.geteuid() == 0 else None
    return [] if layout is None else own_task_groups(layout)


@pytest.fixture
def mark() -> Iterator[str]:
    """A tag for this test's tasks; checks afterwards that nothing of them is left."""
    value = uuid.uuid4().hex
    yield value
    left = _marked_processes(value)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes of a task outlived its run"
    assert _zombie_children() == [], "the runner left unreaped children"
    assert _own_task_groups() == [], "the runner left task cgroups behind"


def _env(**kw: object) -> TaskEnv:
    return TaskEnv(
        task_id=str(kw.get("task_id", "t1")),
        attempt=int(kw.get("attempt", 0)),  # type: ignore[call-overload]
        client=str(kw.get("client", "client-a")),
    )


async def run(spec_kwargs: dict, mark: str, cgroups: CgroupLayout | None, **kw: object) -> CommandRecord:
    env = dict(spec_kwargs.pop("env", {}))
    env[MARK] = mark
    spec = CommandSpec(env=env, **spec_kwargs)
    if _guardian and cgroups is not None:
        kw.setdefault("guardian", _guardian[0])
    return await run_command(spec, task_env=kw.pop("task_env", _env()), cgroups=cgroups, **kw)  # type: ignore[arg-type]


PY = sys.executable


# --------------------------------------------------------------------------
# How a run ended


async def test_exit_code_signal_and_start_failure_are_distinct(enforce: CgroupLayout | None, mark: str) -> None:
    ok = await run({"cmd": "true"}, mark, enforce)
    exit3 = await run({"cmd": "exit 3"}, mark, enforce)
    killed = await run({"cmd": "kill -TERM $$"}, mark, enforce)
    missing = await run({"argv": ["tasksprint-no-such-program"]}, mark, enforce)
    assert (ok.verdict, ok.exit_code, ok.signal) == (Verdict.OK, 0, None)
    assert (exit3.verdict, exit3.exit_code, exit3.signal) == (Verdict.EXIT, 3, None)
    assert (killed.verdict, killed.exit_code, killed.signal) == (Verdict.SIGNAL, None, signal.SIGTERM)
    assert (missing.verdict, missing.exit_code, missing.signal, missing.pid) == (Verdict.START_FAILED, None, None, None)
    assert "tasksprint-no-such-program" in missing.detail
    expected = Enforcement.RLIMIT if enforce is None else enforce.version
    assert {r.enforcement for r in (ok, exit3, killed, missing)} == {expected}
    assert ok.pid is not None and ok.host and ok.finished >= ok.started


async def test_a_cmd_task_without_bash_on_its_path_is_a_start_failure(
    enforce: CgroupLayout | None, mark: str, tmp_path: Path
) -> None:
    record = await run({"cmd": "true", "env": {"PATH": str(tmp_path)}}, mark, enforce)
    assert (record.verdict, record.pid) == (Verdict.START_FAILED, None)
    assert "bash" in record.detail


async def test_a_missing_working_directory_is_a_start_failure(mark: str, tmp_path: Path) -> None:
    record = await run({"cmd": "true", "cwd": str(tmp_path / "absent")}, mark, None)
    assert record.verdict is Verdict.START_FAILED


async def test_captured_output_keeps_size_head_and_tail(enforce: CgroupLayout | None, mark: str) -> None:
    script = "import sys; sys.stdout.write(''.join(chr(65 + i % 26) for i in range(1000))); sys.stderr.write('short')"
    record = await run({"argv": [PY, "-c", script]}, mark, enforce)
    text = "".join(chr(65 + i % 26) for i in range(1000)).encode()
    assert record.verdict is Verdict.OK
    assert record.stdout is not None and record.stderr is not None
    assert (record.stdout.size_bytes, record.stdout.head, record.stdout.tail, record.stdout.cut) == (
        1000,
        text[:80],
        text[-80:],
        False,
    )
    assert (record.stderr.size_bytes, record.stderr.head, record.stderr.tail) == (5, b"short", b"")


async def test_output_to_files_with_stdin_and_cwd(enforce: CgroupLayout | None, mark: str, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("3\n1\n2\n")
    record = await run(
        {"cmd": "sort -n; pwd >&2", "cwd": str(tmp_path), "stdin": "in.txt", "stdout": "out.txt", "stderr": "err.txt"},
        mark,
        enforce,
    )
    assert record.verdict is Verdict.OK
    assert (tmp_path / "out.txt").read_text() == "1\n2\n3\n"
    assert (tmp_path / "err.txt").read_text() == f"{tmp_path}\n"
    assert record.stdout is not None and record.stdout.size_bytes == 6 and record.stdout.head == b""


async def test_the_environment_is_built_explicitly(
    enforce: CgroupLayout | None, mark: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLUSTER_SECRET", "s3cr3t-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-s3cr3t")
    record = await run(
        {"argv": ["env"], "cwd": str(tmp_path), "stdout": "env.txt", "env": {"EXTRA": "x y"}},
        mark,
        enforce,
        task_env=TaskEnv(task_id="42", attempt=3, client="worker-7", cpus=2.0),
    )
    assert record.verdict is Verdict.OK
    lines = (tmp_path / "env.txt").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines)
    assert "s3cr3t" not in (tmp_path / "env.txt").read_text()
    assert env["TASKSPRINT_TASK_ID"] == "42"
    assert env["TASKSPRINT_ATTEMPT"] == "3"
    assert env["TASKSPRINT_CLIENT"] == "worker-7"
    assert env["TASKSPRINT_CPUS"] == "2"
    assert env["EXTRA"] == "x y"
    assert set(env) <= {
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "TZ",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "EXTRA",
        MARK,
        "TASKSPRINT_TASK_ID",
        "TASKSPRINT_ATTEMPT",
        "TASKSPRINT_CLIENT",
        "TASKSPRINT_CPUS",
    }


# --------------------------------------------------------------------------
# Limits


async def test_a_memory_hog_is_killed_with_the_verdict_memory(mark: str) -> None:
    layout = _cgroups_or_skip()
    hog = "x = b' ' * (512 << 20); print(len(x))"
    record = await run({"argv": [PY, "-c", hog], "limits": Limits(memory_bytes=64 << 20)}, mark, layout)
    assert record.verdict is Verdict.MEMORY
    assert record.signal == signal.SIGKILL
    assert Verdict.MEMORY in record.limits_hit
    assert record.peak_memory_bytes is not None and record.peak_memory_bytes <= 64 << 20


async def test_background_sleeps_are_held_by_pids_and_ended_by_time(enforce: CgroupLayout | None, mark: str) -> None:
    cmd = "for i in $(seq 200); do sleep 1000 & done; wait"
    record = await run({"cmd": cmd, "limits": Limits(pids=20, wall_time_s=1.5)}, mark, enforce)
    assert record.verdict is Verdict.TIME
    if enforce is not None:
        assert Verdict.PIDS in record.limits_hit  # bash's fork retries hit the limit
    elif os.geteuid() == 0:
        assert record.unenforced == ("pids",)  # RLIMIT_NPROC does not apply to root


async def test_time_limit_kills_setsid_and_daemonized_descendants(enforce: CgroupLayout | None, mark: str) -> None:
    # A setsid grandchild, and a daemon whose parent exited (re-parented away from the task).
    cmd = "setsid sleep 1000 & (setsid sleep 1001 &) ; sleep 1002"
    record = await run({"cmd": cmd, "limits": Limits(wall_time_s=0.5)}, mark, enforce)
    assert record.verdict is Verdict.TIME
    assert record.limits_hit == (Verdict.TIME,)


async def test_background_jobs_die_when_the_main_process_exits(enforce: CgroupLayout | None, mark: str) -> None:
    record = await run({"cmd": "sleep 1000 & setsid sleep 1001 & echo started"}, mark, enforce)
    assert record.verdict is Verdict.OK
    assert record.stdout is not None and record.stdout.head == b"started\n"


async def test_an_output_flood_is_cut_at_the_limit(enforce: CgroupLayout | None, mark: str, tmp_path: Path) -> None:
    captured = await run({"argv": ["yes"], "limits": Limits(output_bytes=10_000)}, mark, enforce)
    assert captured.verdict is Verdict.OUTPUT
    assert captured.stdout is not None
    assert (captured.stdout.size_bytes, captured.stdout.cut) == (10_000, True)
    to_file = await run(
        {"cmd": "yes >&2", "stderr": "err.txt", "cwd": str(tmp_path), "limits": Limits(output_bytes=12_345)},
        mark,
        enforce,
    )
    assert to_file.verdict is Verdict.OUTPUT
    assert (tmp_path / "err.txt").stat().st_size == 12_345


async def test_cpu_time_limit_counts_the_whole_tree(enforce: CgroupLayout | None, mark: str) -> None:
    spin = "while :; do :; done"
    record = await run(
        {"cmd": f"bash -c '{spin}' & bash -c '{spin}' & wait", "limits": Limits(cpu_time_s=1.0, wall_time_s=60)},
        mark,
        enforce,
    )
    assert record.verdict is Verdict.CPU_TIME
    # The limit is checked against the total; the user/system split is sampled, so
    # their sum may fall a hair short of the total that fired.
    assert record.user_cpu_s + record.system_cpu_s >= 0.95


async def test_cpu_time_limit_of_one_process(enforce: CgroupLayout | None, mark: str) -> None:
    record = await run(
        {"argv": [PY, "-c", "while True: pass"], "limits": Limits(cpu_time_s=1.0, wall_time_s=60)}, mark, enforce
    )
    assert record.verdict is Verdict.CPU_TIME


async def test_cpuset_pins_the_task(enforce: CgroupLayout | None, mark: str) -> None:
    core = max(os.sched_getaffinity(0))
    record = await run(
        {"cmd": "grep Cpus_allowed_list /proc/self/status", "limits": Limits(cpuset=[core])}, mark, enforce
    )
    assert record.verdict is Verdict.OK
    assert record.stdout is not None and record.stdout.head.split() == [b"Cpus_allowed_list:", str(core).encode()]


async def test_a_cpu_quota_is_set_on_the_tasks_cgroup(mark: str) -> None:
    layout = _cgroups_or_skip()
    if layout.version is Enforcement.CGROUP_V2:
        cmd = 'cat "/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cpu.max"'
        expected = b"50000 100000\n"
    else:
        if "cpu" not in layout.parents:
            pytest.skip("no v1 cpu controller mounted")
        own = '$(basename $(grep -E "[:,]cpu[:,]" /proc/self/cgroup | cut -d: -f3))'
        cmd = f'cat "{os.path.dirname(layout.parents["cpu"])}/tasksprint/{own}/cpu.cfs_quota_us"'
        expected = b"50000\n"
    record = await run({"cmd": cmd, "limits": Limits(cpus=0.5)}, mark, layout)
    assert record.verdict is Verdict.OK, record
    assert record.stdout is not None and record.stdout.head == expected


async def test_the_fallback_applies_limits_without_cgroups(mark: str) -> None:
    hog = "x = b' ' * (512 << 20)"
    memory = await run({"argv": [PY, "-c", hog], "limits": Limits(memory_bytes=128 << 20)}, mark, None)
    assert memory.enforcement is Enforcement.RLIMIT
    assert memory.verdict is not Verdict.OK  # RLIMIT_DATA refused the allocation
    assert memory.stderr is not None and b"MemoryError" in memory.stderr.tail
    quota = await run({"cmd": "true", "limits": Limits(cpus=0.5)}, mark, None)
    assert quota.verdict is Verdict.OK and quota.unenforced == ("cpus",)


# --------------------------------------------------------------------------
# Cancellation


async def test_a_cancel_event_kills_the_tree_and_says_cancelled(enforce: CgroupLayout | None, mark: str) -> None:
    cancel = trio.Event()
    async with trio.open_nursery() as nursery:
        result: list[CommandRecord] = []

        async def runner() -> None:
            result.append(await run({"cmd": "setsid sleep 1000 & sleep 1001"}, mark, enforce, cancel=cancel))

        nursery.start_soon(runner)
        # bash runs its last command in its own process: two processes in all.
        while len(_marked_processes(mark)) < 2:
            await trio.sleep(0.01)
        cancel.set()
    assert result[0].verdict is Verdict.CANCELLED


async def test_trio_cancellation_kills_the_tree(enforce: CgroupLayout | None, mark: str) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, {"cmd": "setsid sleep 1000 & (setsid sleep 1001 &); sleep 1002"}, mark, enforce)
            while len(_marked_processes(mark)) < 3:
                await trio.sleep(0.01)
            scope.cancel()
    assert scope.cancelled_caught
    assert _marked_processes(mark) == []


# --------------------------------------------------------------------------
# Spawned ahead of a slot


def _children() -> list[int]:
    """This process's children (any thread's)."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


class _Slot:
    """A slot the test opens: records what was true when the runner got it."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.waiting = trio.Event()
        self.held = False
        self.children_before: list[int] = []
        self.marker_before: bool | None = None
        self.marker: Path | None = None

    async def __aenter__(self) -> None:
        self.children_before = _children()
        self.marker_before = self.marker is not None and self.marker.exists()
        self.waiting.set()
        await self.open.wait()
        self.held = True

    async def __aexit__(self, *exc: object) -> None:
        self.held = False


async def test_a_task_spawned_ahead_waits_at_its_gate_for_the_slot(
    cgroups: CgroupLayout, mark: str, tmp_path: Path
) -> None:
    layout = cgroups
    (tmp_path / "in.txt").write_text("from stdin\n")
    slot = _Slot()
    slot.marker = tmp_path / "ran"
    got: list[CommandRecord] = []

    async def go() -> None:
        got.append(
            await run({"cmd": "touch ran; cat", "cwd": str(tmp_path), "stdin": "in.txt"}, mark, layout, slot=slot)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(go)
        await slot.waiting.wait()
        # Spawned (its wrapper is a child already) but not run: the gate holds it.
        assert slot.children_before != [] and slot.marker_before is False
        assert not slot.marker.exists()
        slot.open.set()
    [record] = got
    assert record.verdict is Verdict.OK and record.enforcement is not Enforcement.RLIMIT
    # Through the gate the task still reads its own stdin.
    assert record.stdout is not None and record.stdout.head == b"from stdin\n"
    assert slot.marker.exists() and not slot.held


async def test_without_a_cgroup_the_slot_comes_before_the_spawn(mark: str, tmp_path: Path) -> None:
    slot = _Slot()
    slot.marker = tmp_path / "ran"
    slot.open.set()
    record = await run({"cmd": "touch ran", "cwd": str(tmp_path)}, mark, None, slot=slot)
    assert record.verdict is Verdict.OK and record.enforcement is Enforcement.RLIMIT
    assert slot.children_before == [] and slot.marker_before is False and slot.marker.exists()


async def test_a_task_waiting_at_its_gate_dies_when_its_run_is_cancelled(cgroups: CgroupLayout, mark: str) -> None:
    layout = cgroups
    slot = _Slot()  # never opened
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(run, {"cmd": "sleep 1000"}, mark, layout, slot=slot))
            await slot.waiting.wait()
            # The wrapper waits at the gate: it is our child already.  Behind
            # setpriv (no guardian) it may still be executing its shell, and a
            # read of /proc/PID/environ that meets an exec sees nothing: its
            # mark shows once that exec is done.
            assert slot.children_before != []
            with trio.fail_after(10):
                while not _marked_processes(mark):
                    await trio.sleep(0.01)
            scope.cancel()
    assert scope.cancelled_caught
    # The mark fixture checks that no process, zombie or cgroup is left.


# --------------------------------------------------------------------------
# How a task is started

# What a shell shows of itself: the wrapper's join must leave no trace.
SHELL_PROBE = 'echo "$0|$#|$LINENO|$_|$?|$-|${f-unset}|${go-unset}|${stdin_file-unset}"\necho "$LINENO"; exit 7'


async def test_a_cmd_task_runs_as_in_a_fresh_bash_c(cgroups: CgroupLayout, mark: str, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("")
    expected = subprocess.run(["bash", "-c", SHELL_PROBE], capture_output=True, env={"PATH": os.environ["PATH"]})
    assert expected.returncode == 7 and expected.stdout.startswith(b"bash|0|1|")
    slot = _Slot()
    slot.open.set()
    direct = await run({"cmd": SHELL_PROBE}, mark, cgroups)
    gated = await run({"cmd": SHELL_PROBE, "cwd": str(tmp_path), "stdin": "in.txt"}, mark, cgroups, slot=slot)
    for record in (direct, gated):
        assert record.verdict is Verdict.EXIT and record.exit_code == 7, record
        assert record.stdout is not None and record.stdout.head == expected.stdout


async def test_a_bash_env_file_is_sourced_inside_the_tasks_cgroup(
    cgroups: CgroupLayout, mark: str, tmp_path: Path
) -> None:
    # bash sources BASH_ENV before its -c string: it must not run before the join (or the gate).
    (tmp_path / "env.sh").write_text('cat /proc/self/cgroup >> "$PWD/groups"; echo sourced >> "$PWD/groups"\n')
    slot = _Slot()
    slot.open.set()
    spec = {"cmd": "echo $((1 + 1))", "cwd": str(tmp_path), "env": {"BASH_ENV": str(tmp_path / "env.sh")}}
    direct = await run(dict(spec), mark, cgroups)
    gated = await run(dict(spec), mark, cgroups, slot=slot)
    for record in (direct, gated):
        assert record.verdict is Verdict.OK and record.stdout is not None and record.stdout.head == b"2\n"
    blocks = (tmp_path / "groups").read_text().split("sourced\n")
    assert len(blocks) == 3 and blocks[2] == ""
    for block in blocks[:2]:  # each time, this process's task group is among the file's lines
        assert f"/tasksprint/{os.getpid()}-" in block, block


async def test_a_syntax_error_runs_nothing_and_exits_2(cgroups: CgroupLayout, mark: str, tmp_path: Path) -> None:
    record = await run({"cmd": "touch ran; if", "cwd": str(tmp_path)}, mark, cgroups)
    assert record.verdict is Verdict.EXIT and record.exit_code == 2
    assert not (tmp_path / "ran").exists()


def test_a_guarded_cmd_task_is_its_own_bash_only() -> None:
    layout = _cgroups_or_skip()
    group = open_task_group(layout, Limits(), ())
    try:
        cmd = CommandSpec(cmd="echo hi", limits=Limits(cpu_time_s=2.5))
        guarded = spawn_argv(group, cmd, cmd.program_argv, guarded=True)
        unguarded = spawn_argv(group, cmd, cmd.program_argv)
        assert guarded is not None and guarded[:2] == ("bash", "-c") and guarded[2].endswith("; echo hi")
        assert "ulimit -S -t 3" in guarded[2] and guarded[3] == "bash"
        assert unguarded is not None and unguarded[1:4] == ("--pdeathsig", "KILL", "--") and unguarded[4] == "bash"
        # Any other program is executed by sh once it joined.
        argv = CommandSpec(argv=["echo", "hi"])
        other = spawn_argv(group, argv, argv.program_argv, guarded=True)
        assert other is not None and other[-3:] == ("--", "echo", "hi") and os.path.basename(other[0]) == "sh"
    finally:
        group.remove()


# --------------------------------------------------------------------------
# Groups a dead client left

CLIENT_SCRIPT = """
import functools, sys, trio
from tasksprint.exec.cgroup import detect_cgroups
from tasksprint.exec.runner import TaskEnv, open_task_group, run_command
from tasksprint.exec.spawner import spawn_argv
from tasksprint.exec.spec import CommandSpec

spec = CommandSpec(cmd="setsid sleep 1000 & sleep 1001", env={sys.argv[1]: sys.argv[2]})
env = TaskEnv(task_id="1", attempt=0, client="doomed")
trio.run(functools.partial(run_command, spec, task_env=env, cgroups=detect_cgroups()))
"""


def test_a_killed_clients_task_dies_and_its_group_is_swept(mark: str, tmp_path: Path) -> None:
    layout = _cgroups_or_skip()
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    client = subprocess.Popen([PY, str(script), MARK, mark])
    try:
        while len(_marked_processes(mark)) < 2:
            assert client.poll() is None, "the client ended before its task started"
            time.sleep(0.01)
        task = {pid: st[1] for pid in _marked_processes(mark) if (st := proctree.proc_stat(pid)) is not None}
        main = next(pid for pid in task if (st := proctree.proc_stat(pid)) and st[0] == client.pid)
    finally:
        client.kill()
        client.wait()
    # The kernel kills the main process with its client (PR_SET_PDEATHSIG) ...
    while main in _marked_processes(mark):
        time.sleep(0.01)
    # ... and the next start sweeps what the group still holds.
    removed: list[str] = []
    while not any(name.startswith(f"{client.pid}-") for name in removed):
        removed += sweep_stale_groups(layout)
    while _marked_processes(mark):
        time.sleep(0.01)
    # This process may be a subreaper (after rlimit runs): the orphans then came here.
    pending = task
    while pending:
        for pid, _usage in proctree.reap_adopted(pending):
            del pending[pid]
        pending = {
            pid: start
            for pid, start in pending.items()
            if (st := proctree.proc_stat(pid)) is not None and st[0] == os.getpid() and st[1] == start
        }
        time.sleep(0.01)


# A bound on how long the processes of a dead client may live (not a speed check).
GONE_WITHIN_S = 60.0
GUARDED_CLIENT_SCRIPT = """
import functools, sys, trio
from tasksprint.exec.cgroup import detect_cgroups
from tasksprint.exec.guardian import Guardian
from tasksprint.exec.runner import TaskEnv, open_task_group, run_command
from tasksprint.exec.spawner import spawn_argv
from tasksprint.exec.spec import CommandSpec

layout = detect_cgroups()
guardian = Guardian(layout)
guardian.start()
print(guardian._proc.pid, flush=True)
spec = CommandSpec(cmd="setsid sleep 1000 & sleep 1001", env={sys.argv[1]: sys.argv[2]})
env = TaskEnv(task_id="1", attempt=0, client="doomed")
run = functools.partial(run_command, spec, task_env=env, cgroups=layout, guardian=guardian)
trio.run(run)
"""


def _reap_if_mine(pids: dict[int, int]) -> None:
    """Wait until ``pids`` ({pid: start time}) are gone, reaping those re-parented to this process.

    Fails after :data:`GONE_WITHIN_S`: what should die does not outlive the test.
    """
    pending = dict(pids)
    deadline = time.monotonic() + GONE_WITHIN_S
    while pending:
        if time.monotonic() > deadline:
            for pid in pending:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"still running: {sorted(pending)}")
        for pid, _usage in proctree.reap_adopted(pending):
            del pending[pid]
        pending = {pid: start for pid, start in pending.items() if (st := proctree.proc_stat(pid)) and st[1] == start}
        time.sleep(0.01)


def test_a_killed_clients_guardian_kills_its_whole_trees_and_removes_their_groups(mark: str, tmp_path: Path) -> None:
    layout = _cgroups_or_skip()
    script = tmp_path / "client.py"
    script.write_text(GUARDED_CLIENT_SCRIPT)
    client = subprocess.Popen([PY, str(script), MARK, mark], stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None
        guardian = int(client.stdout.readline())
        guardian_stat = proctree.proc_stat(guardian)
        assert guardian_stat is not None
        while len(_marked_processes(mark)) < 2:
            assert client.poll() is None, "the client ended before its task started"
            time.sleep(0.01)
        task = {pid: st[1] for pid in _marked_processes(mark) if (st := proctree.proc_stat(pid)) is not None}
        assert any(proctree.proc_stat(pid)[3] == pid for pid in task)  # type: ignore[index]  # one has its own session
        client.kill()
        # Not reaped until the end: while the dead client is a zombie its pid
        # exists, so no other client's sweep takes its groups for stale ones.
        # The guardian alone kills the whole tree, the setsid one included,
        # removes the group and ends.
        _reap_if_mine({guardian: guardian_stat[1], **task})
        assert _marked_processes(mark) == []
        names = [name for parent in layout.parents.values() for name in os.listdir(parent)]
        assert not [name for name in names if name.startswith(f"{client.pid}-")]
    finally:
        client.kill()
        client.wait()
        if client.stdout is not None:
            client.stdout.close()


def test_a_closed_guardian_kills_and_removes_its_owners_groups_only() -> None:
    layout = _cgroups_or_skip()
    parent = layout.parents["pids"]
    # The other owner is alive (this process's parent): no client's sweep takes its group for stale.
    mine, other = os.path.join(parent, f"{os.getpid()}-left"), os.path.join(parent, f"{os.getppid()}-other")
    os.mkdir(mine)
    os.mkdir(other)
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        with open(os.path.join(mine, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        guardian = Guardian(layout)
        guardian.start()
        assert guardian.alive()
        guardian.close()
        assert not guardian.alive()
        assert sleeper.wait() == -signal.SIGKILL
        assert not os.path.exists(mine) and os.path.exists(other)
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in (mine, other):
            if os.path.exists(path):
                os.rmdir(path)


def test_sweep_removes_groups_of_dead_clients() -> None:
    layout = _cgroups_or_skip()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    parent = layout.parents["pids"]
    path = os.path.join(parent, f"{dead}-stale")
    os.mkdir(path)
    try:
        assert f"{dead}-stale" in sweep_stale_groups(layout)
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.rmdir(path)


# --------------------------------------------------------------------------
# The bubblewrap sandbox


async def _bwrap_or_skip(mark: str, tmp_path: Path) -> None:
    if find_bwrap(None) is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    # Through the runner, which reaps what bwrap leaves to this process.
    probe = await run({"cmd": "true", "cwd": str(tmp_path), "sandbox": True}, mark, None)
    if probe.verdict is not Verdict.OK:
        pytest.skip(f"bwrap cannot create namespaces here: {probe.stderr}")


async def test_a_sandboxed_task_sees_a_read_only_root_and_a_private_tmp(
    enforce: CgroupLayout | None, mark: str, tmp_path: Path
) -> None:
    await _bwrap_or_skip(mark, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    probe = f"sandbox-probe-{mark}"
    cmd = (
        f"touch /usr/{probe} 2>/dev/null && echo root-writable; "
        f"echo private > /tmp/{probe}; echo result > out.txt; "
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo pid=$$"
    )
    record = await run({"cmd": cmd, "cwd": str(work), "sandbox": True}, mark, enforce)
    assert record.verdict is Verdict.OK, record
    assert record.stdout is not None
    lines = record.stdout.head.decode().split()
    assert "root-writable" not in lines
    assert (work / "out.txt").read_text() == "result\n"
    assert not os.path.exists(f"/tmp/{probe}")
    assert not os.path.exists(f"/usr/{probe}")
    assert lines[:-1] == ["lo"]  # no network but loopback
    assert lines[-1] != f"pid={record.pid}"  # its own pid namespace


async def test_a_sandboxed_task_may_ask_for_the_network(mark: str, tmp_path: Path) -> None:
    await _bwrap_or_skip(mark, tmp_path)
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    host_devices = sorted(line.split(":")[0].strip() for line in lines)
    record = await run(
        {
            "cmd": "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort",
            "cwd": str(tmp_path),
            "sandbox": True,
            "network": True,
        },
        mark,
        None,
    )
    assert record.verdict is Verdict.OK
    assert record.stdout is not None and record.stdout.head.decode().split() == host_devices


async def test_the_sandbox_time_limit_kills_everything_inside(
    enforce: CgroupLayout | None, mark: str, tmp_path: Path
) -> None:
    await _bwrap_or_skip(mark, tmp_path)
    record = await run(
        {
            "cmd": "setsid sleep 1000 & (setsid sleep 1001 &); sleep 1002",
            "cwd": str(tmp_path),
            "sandbox": True,
            "limits": Limits(wall_time_s=0.5),
        },
        mark,
        enforce,
    )
    assert record.verdict is Verdict.TIME


async def test_a_sandbox_without_bwrap_is_a_start_failure_naming_the_package(mark: str, tmp_path: Path) -> None:
    record = await run(
        {"cmd": "true", "cwd": str(tmp_path), "sandbox": True, "env": {"PATH": str(tmp_path)}}, mark, None
    )
    assert record.verdict is Verdict.START_FAILED
    assert "bubblewrap" in record.detail


async def test_one_command_per_slot_is_spawned_ahead_the_rest_wait_unspawned(mark: str) -> None:
    from tasksprint.command_tasks import CommandTasks
    from tasksprint.coordinator.replies import Assignment
    from tasksprint.coordinator.specs import COMMAND_TASK, command_kwargs

    _cgroups_or_skip()
    commands = CommandTasks("client-a")
    commands.start()
    try:
        slots = trio.CapacityLimiter(1)
        spec = CommandSpec(cmd="true", env={MARK: mark})

        def task(tid: int) -> Assignment:
            return Assignment(
                tid=tid, attempt=1, name=COMMAND_TASK, args=[], kwargs=command_kwargs(spec), seed=0, timeout=None,
                keys=(), inputs=(),
            )  # fmt: skip

        outcomes: list[object] = []

        async def one(tid: int) -> None:
            outcomes.append(await commands.run_in_slot(task(tid), (), slots))

        async with trio.open_nursery() as nursery:
            async with slots:  # the one slot is busy
                for tid in (1, 2, 3):
                    nursery.start_soon(one, tid)
                while commands.ahead() < 3:
                    await trio.sleep(0)
                while not _marked_processes(mark):
                    await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                # One waits at its gate; the two others wait for the right to be spawned.
                assert len(_marked_processes(mark)) == 1
                assert outcomes == []
        assert len(outcomes) == 3 and all(o.error is None for o in outcomes)  # type: ignore[attr-defined]
        assert commands.ahead() == 0
    finally:
        commands.close()  # the guardian ends
