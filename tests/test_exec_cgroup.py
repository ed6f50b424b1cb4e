"""How task groups read cgroup files, checked on a directory that imitates them.

The machine the tests run on may offer cgroup v1 only (or none), so the v2
reader is checked here against files in the kernel's formats; the real
hierarchies are exercised by test_exec_runner.py.
"""

from __future__ import annotations

from pathlib import Path

from tasksprint.exec.cgroup import CgroupV1Group, CgroupV2Group, _cpu_ns, _under
from tasksprint.exec.group import GroupUsage
from tasksprint.exec.spec import Limits


def test_v2_usage_reads_peak_cpu_oom_and_pids_events(tmp_path: Path) -> None:
    (tmp_path / "memory.peak").write_text("73400320\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    (tmp_path / "pids.events").write_text("max 3\n")
    group = CgroupV2Group(str(tmp_path), Limits())
    assert group.usage() == GroupUsage(
        peak_memory_bytes=73400320, user_cpu_s=2.0, system_cpu_s=0.5, oom_killed=True, pids_limit_hit=True
    )
    assert group.cpu_seconds() == 2.5


def test_v2_usage_without_the_newer_files(tmp_path: Path) -> None:
    # memory.peak exists from Linux 5.19; before that the peak is unknown, not zero.
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    assert CgroupV2Group(str(tmp_path), Limits()).usage() == GroupUsage()


def test_v1_usage_reads_each_controller(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("memory", "pids", "cpuacct")}
    for path in dirs.values():
        path.mkdir()
    (dirs["memory"] / "memory.max_usage_in_bytes").write_text("1048576\n")
    (dirs["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (dirs["pids"] / "pids.events").write_text("max 0\n")
    (dirs["cpuacct"] / "cpuacct.usage_user").write_text("1500000000\n")
    (dirs["cpuacct"] / "cpuacct.usage_sys").write_text("250000000\n")
    (dirs["cpuacct"] / "cpuacct.usage").write_text("1750000000\n")
    group = CgroupV1Group({k: str(v) for k, v in dirs.items()}, Limits())
    assert group.usage() == GroupUsage(
        peak_memory_bytes=1048576, user_cpu_s=1.5, system_cpu_s=0.25, oom_killed=False, pids_limit_hit=False
    )
    assert group.cpu_seconds() == 1.75


def test_v1_cpu_time_comes_from_usage_all_in_one_read_where_there_is_one(tmp_path: Path) -> None:
    (tmp_path / "cpuacct.usage_all").write_text("cpu user system\n0 1000000000 200000000\n1 500000000 50000000\n")
    (tmp_path / "cpuacct.usage_user").write_text("7\n")  # not read: usage_all has both
    (tmp_path / "cpuacct.usage_sys").write_text("7\n")
    assert _cpu_ns(str(tmp_path)) == (1_500_000_000, 250_000_000)
    # A file this code does not understand: the two separate files instead.
    (tmp_path / "cpuacct.usage_all").write_text("cpu user system\n0 1 2 3\n")
    assert _cpu_ns(str(tmp_path)) == (7, 7)
    (tmp_path / "cpuacct.usage_all").unlink()
    assert _cpu_ns(str(tmp_path)) == (7, 7)
    (tmp_path / "cpuacct.usage_user").unlink()
    assert _cpu_ns(str(tmp_path)) == (None, 7)


def test_a_group_path_is_placed_under_the_mount_of_its_hierarchy() -> None:
    assert _under("/sys/fs/cgroup/memory", "/", "/user/job") == "/sys/fs/cgroup/memory/user/job"
    # In a container the mount's root is the container's own cgroup.
    assert _under("/sys/fs/cgroup", "/docker/abc", "/docker/abc/sub") == "/sys/fs/cgroup/sub"
    assert _under("/sys/fs/cgroup", "/", "/") == "/sys/fs/cgroup"
