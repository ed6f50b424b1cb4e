"""Task groups in cgroups: hold, limit, measure and kill a task's whole process tree.

The forked child writes itself into the group's ``cgroup.procs`` between fork
and exec (see :mod:`tasksprint.exec.group`), so every process the task ever
starts is inside from its first instruction, ``setsid`` and daemons included.
Two kinds exist, chosen by :func:`detect_cgroups`:

``cgroup_v2``
    One directory in the unified hierarchy (``memory.max``, ``pids.max``,
    ``cpu.max``, ``cpuset.cpus``); ``cgroup.kill`` kills the tree at once;
    ``memory.events``, ``pids.events``, ``memory.peak`` and ``cpu.stat``
    give the accounting.
``cgroup_v1``
    One directory per controller hierarchy: ``memory`` and ``pids`` always,
    ``cpuacct`` for accounting when mounted, ``cpu`` when a quota is asked,
    ``cpuset`` when pinning is asked.  The pids group lists the members, and
    each kill round kills every listed member.

Limits are written before the child joins.  Groups are created under the
cgroup this process is in, inside a ``tasksprint`` directory, named
``<client pid>-<random>`` so that :func:`sweep_stale_groups` can remove what
a client that died left behind.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import attrs

from tasksprint.exec import proctree
from tasksprint.exec.group import GroupUsage, child_rlimits
from tasksprint.exec.spec import Enforcement, Limits

#: Directory, under this process's own cgroup, that holds the task groups.
GROUP_PARENT = "tasksprint"
CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "pids", "cpuacct", "cpu", "cpuset")


@attrs.frozen
class CgroupLayout:
    """Where task groups are created: ``version`` and the parent directory per controller.

    For v2 ``parents`` has the one key ``""``; for v1 one key per mounted
    controller of :data:`V1_CONTROLLERS` (co-mounted controllers share a
    directory).
    """

    version: Enforcement
    parents: dict[str, str]


# --------------------------------------------------------------------------
# Small file helpers: cgroup files are tiny and local.


_READ_SIZE = 65536


def _read(path: str) -> str:
    # Plain system calls: a file object costs more than the read itself.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, _READ_SIZE)]
        # A cgroup file gives all it has up to the size asked: a short read was the end.
        while len(chunks[-1]) == _READ_SIZE:
            chunks.append(os.read(fd, _READ_SIZE))
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _flat_keyed(path: str) -> dict[str, int]:
    """A ``key value`` per line file (``memory.events``, ``cpu.stat``); missing file -> {}."""
    try:
        text = _read(path)
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_int(path: str) -> int | None:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _members(procs_file: str) -> list[int]:
    try:
        return [int(x) for x in _read(procs_file).split()]
    except (OSError, ValueError):
        return []


def _kill_all(pids: list[int]) -> dict[int, int]:
    """SIGKILL each pid; returns ``{pid: start time}`` of those that were alive."""
    killed = {}
    for pid in pids:
        st = proctree.proc_stat(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        if st is not None:
            killed[pid] = st[1]
    return killed


def _join(procs_file: str) -> None:
    # Runs in the forked child: "0" means the writing process.
    fd = os.open(procs_file, os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def _cpu_ns(cpuacct: str) -> tuple[int | None, int | None]:
    """User and system CPU nanoseconds of a v1 cpuacct group: one file read (``usage_all``) where there is one."""
    try:
        lines = _read(os.path.join(cpuacct, "cpuacct.usage_all")).split("\n")[1:]  # "cpu user system", then per CPU
        rows = [[int(field) for field in line.split()] for line in lines if line.strip()]
        if rows and all(len(row) == 3 for row in rows):
            return sum(row[1] for row in rows), sum(row[2] for row in rows)
    except (OSError, ValueError):
        pass
    return (
        _read_int(os.path.join(cpuacct, "cpuacct.usage_user")),
        _read_int(os.path.join(cpuacct, "cpuacct.usage_sys")),
    )


def _cpu_list(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in sorted(cores))


# --------------------------------------------------------------------------
# Detection


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount point, root inside the hierarchy, super options) of cgroup mounts."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                out.append((rfields[0], fields[4], fields[3], set(rfields[2].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under key ``""`` in the unified hierarchy."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _hier, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                out[name] = path
    return out


def _under(mount: str, mount_root: str, path: str) -> str:
    rel = os.path.relpath(path, mount_root) if mount_root != "/" else path.lstrip("/")
    return os.path.normpath(os.path.join(mount, rel))


def _ensure_parent(base: str, copy_cpuset: bool = False) -> str:
    parent = os.path.join(base, GROUP_PARENT)
    try:
        os.mkdir(parent)
    except FileExistsError:
        pass
    if copy_cpuset:
        # A new v1 cpuset group starts with no cores and no memory nodes.
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not _read(os.path.join(parent, name)).strip():
                _write(os.path.join(parent, name), _read(os.path.join(base, name)).strip())
    return parent


def _detect_v2(mount: str, mount_root: str, own: str) -> CgroupLayout | None:
    base = _under(mount, mount_root, own)
    wanted = {"memory", "pids", "cpu", "cpuset"}
    available = set(_read(os.path.join(base, "cgroup.controllers")).split())
    if not {"memory", "pids"} <= available:
        return None
    enable = " ".join(f"+{c}" for c in sorted(wanted & available))
    try:
        _write(os.path.join(base, "cgroup.subtree_control"), enable)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        # "No internal processes": a group with members cannot pass controllers
        # down.  Move this group's processes into a leaf beside the task groups.
        leaf = os.path.join(base, "tasksprint-client")
        os.makedirs(leaf, exist_ok=True)
        for pid in _members(os.path.join(base, "cgroup.procs")):
            try:
                _write(os.path.join(leaf, "cgroup.procs"), str(pid))
            except ProcessLookupError:
                pass
        _write(os.path.join(base, "cgroup.subtree_control"), enable)
    parent = _ensure_parent(base)
    _write(os.path.join(parent, "cgroup.subtree_control"), enable)
    return CgroupLayout(version=Enforcement.CGROUP_V2, parents={"": parent})


def detect_cgroups() -> CgroupLayout | None:
    """The cgroup layout this process can create task groups in, or None (use rlimits).

    Prefers v2 when the unified hierarchy has the memory and pids
    controllers, else v1 when the memory and pids hierarchies are mounted;
    in either case the parent directory must be writable.  Never raises.
    """
    try:
        mounts = _mounts()
        own = _own_paths()
        for fstype, point, root, _opts in mounts:
            if fstype == "cgroup2" and "" in own:
                try:
                    layout = _detect_v2(point, root, own[""])
                except OSError:
                    layout = None
                if layout is not None:
                    return layout
        parents: dict[str, str] = {}
        for fstype, point, root, opts in mounts:
            if fstype != "cgroup":
                continue
            for name in V1_CONTROLLERS:
                if name in opts and name in own:
                    parents[name] = _ensure_parent(_under(point, root, own[name]), copy_cpuset=name == "cpuset")
        if "memory" in parents and "pids" in parents:
            return CgroupLayout(version=Enforcement.CGROUP_V1, parents=parents)
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------
# cgroup v2


@attrs.define(eq=False)
class CgroupV2Group:
    """A task's group in the unified hierarchy."""

    _path: str
    _limits: Limits
    enforcement: Enforcement = Enforcement.CGROUP_V2
    unenforced: tuple[str, ...] = ()

    @classmethod
    def create(cls, layout: CgroupLayout, name: str, limits: Limits) -> CgroupV2Group:
        path = os.path.join(layout.parents[""], name)
        os.mkdir(path)
        group = cls(path, limits)
        try:
            unenforced = []
            if limits.memory_bytes is not None:
                _write(os.path.join(path, "memory.max"), str(limits.memory_bytes))
                try:
                    _write(os.path.join(path, "memory.swap.max"), "0")
                except OSError:
                    pass  # no swap accounting: the limit is on RAM only
            if limits.pids is not None:
                _write(os.path.join(path, "pids.max"), str(limits.pids))
            if limits.cpus is not None:
                if os.path.exists(os.path.join(path, "cpu.max")):
                    _write(
                        os.path.join(path, "cpu.max"),
                        f"{max(1000, round(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}",
                    )
                else:
                    unenforced.append("cpus")
            if limits.cpuset is not None:
                if os.path.exists(os.path.join(path, "cpuset.cpus")):
                    _write(os.path.join(path, "cpuset.cpus"), _cpu_list(limits.cpuset))
                else:
                    unenforced.append("cpuset")
            group.unenforced = tuple(unenforced)
        except BaseException:
            group.remove()
            raise
        return group

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files a process writes ``0`` to in order to join the group."""
        return (os.path.join(self._path, "cgroup.procs"),)

    def child_setup(self) -> None:
        _join(os.path.join(self._path, "cgroup.procs"))
        child_rlimits(self._limits)

    def started(self, pid: int) -> None:
        pass

    def kill_round(self) -> dict[int, int]:
        pids = _members(os.path.join(self._path, "cgroup.procs"))
        if not pids:
            return {}
        members = {pid: st[1] for pid in pids if (st := proctree.proc_stat(pid)) is not None}
        try:
            _write(os.path.join(self._path, "cgroup.kill"), "1")
        except OSError:  # kernels before 5.14
            _kill_all(pids)
        return members

    def cpu_seconds(self) -> float | None:
        stat = _flat_keyed(os.path.join(self._path, "cpu.stat"))
        return stat["usage_usec"] / 1e6 if "usage_usec" in stat else None

    def memory_bytes(self) -> int | None:
        return _read_int(os.path.join(self._path, "memory.current"))

    def usage(self) -> GroupUsage:
        stat = _flat_keyed(os.path.join(self._path, "cpu.stat"))
        events = _flat_keyed(os.path.join(self._path, "memory.events"))
        pids_events = _flat_keyed(os.path.join(self._path, "pids.events"))
        return GroupUsage(
            peak_memory_bytes=_read_int(os.path.join(self._path, "memory.peak")),  # Linux 5.19+
            user_cpu_s=stat["user_usec"] / 1e6 if "user_usec" in stat else None,
            system_cpu_s=stat["system_usec"] / 1e6 if "system_usec" in stat else None,
            oom_killed=events.get("oom_kill", 0) > 0,
            pids_limit_hit=pids_events.get("max", 0) > 0,
        )

    def remove(self) -> None:
        try:
            os.rmdir(self._path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------
# cgroup v1

#: Memory a v1 group may keep charged (kernel objects of earlier runs) and be reused.
REUSE_RESIDUE = 1024 * 1024


@attrs.frozen
class _V1Counters:
    """A v1 group's counters: peak memory, CPU nanoseconds, OOM kills and pids-limit hits so far."""

    peak: int | None = 0
    user_ns: int | None = 0
    system_ns: int | None = 0
    oom_kills: int = 0
    pids_max_hits: int = 0


@attrs.define(eq=False)
class CgroupV1Group:
    """A task's groups, one per v1 controller hierarchy it needs."""

    _dirs: dict[str, str]  # controller -> this task's directory
    _limits: Limits
    enforcement: Enforcement = Enforcement.CGROUP_V1
    unenforced: tuple[str, ...] = ()
    # What earlier runs in this group left in its counters (see reset): the
    # next run's usage is read relative to it.
    _base: _V1Counters = attrs.Factory(lambda: _V1Counters())
    _last: _V1Counters | None = None  # the counters usage() read last
    _procs_files: tuple[str, ...] | None = None

    @classmethod
    def create(cls, layout: CgroupLayout, name: str, limits: Limits) -> CgroupV1Group:
        wanted = ["memory", "pids", "cpuacct"]
        unenforced = []
        if limits.cpus is not None:
            wanted.append("cpu")
        if limits.cpuset is not None:
            wanted.append("cpuset")
        for controller in ("cpu", "cpuset"):
            if controller in wanted and controller not in layout.parents:
                unenforced.append("cpus" if controller == "cpu" else "cpuset")
        group = cls({}, limits, unenforced=tuple(unenforced))
        try:
            made: dict[str, str] = {}  # co-mounted controllers share one directory
            for controller in wanted:
                if controller not in layout.parents:
                    continue
                path = os.path.join(layout.parents[controller], name)
                if path not in made.values():
                    os.mkdir(path)
                group._dirs[controller] = path
                made[controller] = path
            group._configure()
        except BaseException:
            group.remove()
            raise
        return group

    def _configure(self) -> None:
        limits, d = self._limits, self._dirs
        if limits.memory_bytes is not None:
            _write(os.path.join(d["memory"], "memory.limit_in_bytes"), str(limits.memory_bytes))
            try:  # memory + swap, when swap accounting is on: no escape into swap
                _write(os.path.join(d["memory"], "memory.memsw.limit_in_bytes"), str(limits.memory_bytes))
            except OSError:
                pass
        if limits.pids is not None:
            _write(os.path.join(d["pids"], "pids.max"), str(limits.pids))
        if limits.cpus is not None and "cpu" in d:
            _write(os.path.join(d["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(d["cpu"], "cpu.cfs_quota_us"), str(max(1000, round(limits.cpus * CPU_PERIOD_US))))
        if limits.cpuset is not None and "cpuset" in d:
            parent = os.path.dirname(d["cpuset"])
            _write(os.path.join(d["cpuset"], "cpuset.mems"), _read(os.path.join(parent, "cpuset.mems")).strip())
            _write(os.path.join(d["cpuset"], "cpuset.cpus"), _cpu_list(limits.cpuset))

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The ``cgroup.procs`` files a process writes ``0`` to in order to join the group."""
        if self._procs_files is None:  # the directories are all made by then
            self._procs_files = tuple(os.path.join(path, "cgroup.procs") for path in dict.fromkeys(self._dirs.values()))
        return self._procs_files

    def child_setup(self) -> None:
        for path in self.procs_files:
            _join(path)
        child_rlimits(self._limits)

    def started(self, pid: int) -> None:
        pass

    def kill_round(self) -> dict[int, int]:
        pids = _members(os.path.join(self._dirs["pids"], "cgroup.procs"))
        return _kill_all(pids)

    def cpu_seconds(self) -> float | None:
        if "cpuacct" not in self._dirs:
            return None
        usage = _read_int(os.path.join(self._dirs["cpuacct"], "cpuacct.usage"))
        return usage / 1e9 if usage is not None else None

    def memory_bytes(self) -> int | None:
        return _read_int(os.path.join(self._dirs["memory"], "memory.usage_in_bytes"))

    @property
    def limits(self) -> Limits:
        """The limits the group was made for."""
        return self._limits

    def _counters(self) -> _V1Counters:
        mem, cpuacct = self._dirs["memory"], self._dirs.get("cpuacct")
        user_ns, system_ns = _cpu_ns(cpuacct) if cpuacct else (None, None)
        return _V1Counters(
            peak=_read_int(os.path.join(mem, "memory.max_usage_in_bytes")),
            user_ns=user_ns,
            system_ns=system_ns,
            oom_kills=_flat_keyed(os.path.join(mem, "memory.oom_control")).get("oom_kill", 0),
            pids_max_hits=_flat_keyed(os.path.join(self._dirs["pids"], "pids.events")).get("max", 0),
        )

    def usage(self) -> GroupUsage:
        now, base = self._counters(), self._base
        self._last = now

        def seconds(ns: int | None, base_ns: int | None) -> float | None:
            return (ns - (base_ns or 0)) / 1e9 if ns is not None else None

        return GroupUsage(
            peak_memory_bytes=max(0, now.peak - (base.peak or 0)) if now.peak is not None else None,
            user_cpu_s=seconds(now.user_ns, base.user_ns),
            system_cpu_s=seconds(now.system_ns, base.system_ns),
            oom_killed=now.oom_kills > base.oom_kills,
            pids_limit_hit=now.pids_max_hits > base.pids_max_hits,
        )

    def reset(self) -> bool:
        """Make the group ready for another run; whether it is (else remove it).

        The group must be empty (its tree dead).  Counters that cannot be
        reset -- CPU time, OOM kills, pids-limit hits -- are kept as the
        base the next run's usage is read from.  The peak is reset to the
        memory still charged to the group (kernel objects and page cache of
        earlier runs), which is the base of the next run's peak.  Above
        :data:`REUSE_RESIDUE` the group's memory is reclaimed first; a group
        that keeps more than that is not reused.
        """
        # The pids group's member list is the one the kill empties; a task's
        # processes join it (after the memory group, before running anything).
        if _members(os.path.join(self._dirs["pids"], "cgroup.procs")):
            return False  # a process the kill missed: the caller kills and removes the group
        counters = self._last if self._last is not None else self._counters()
        peak = os.path.join(self._dirs["memory"], "memory.max_usage_in_bytes")
        try:
            _write(peak, "0")  # the peak restarts at what is charged now
            residue = _read_int(peak)
            if residue is not None and residue > REUSE_RESIDUE:
                _write(os.path.join(self._dirs["memory"], "memory.force_empty"), "0")
                _write(peak, "0")
                residue = _read_int(peak)
        except OSError:
            return False
        if residue is None or residue > REUSE_RESIDUE:
            return False
        self._base = attrs.evolve(counters, peak=residue)
        self._last = None
        return True

    def remove(self) -> None:
        for path in dict.fromkeys(self._dirs.values()):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass


def _empty_and_remove(path: str, rounds: int, pause_s: float = 0.0) -> bool:
    """Kill what group directory ``path`` holds, round after round, and remove it; whether it is gone."""
    for _ in range(rounds):
        members = _members(os.path.join(path, "cgroup.procs"))
        if members:
            try:
                _write(os.path.join(path, "cgroup.kill"), "1")  # v2, Linux 5.14+
            except OSError:
                _kill_all(members)
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if pause_s:
                time.sleep(pause_s)  # busy a moment after its last process died
    return False


def remove_client_groups(parents: list[str], owner: int) -> list[str]:
    """Kill and remove every task group client ``owner`` made under ``parents``; the names removed.

    Run by the :mod:`~tasksprint.exec.guardian` of a client that died.  A
    group that stays busy for seconds is left for :func:`sweep_stale_groups`.
    """
    removed = []
    for parent in parents:
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            path = os.path.join(parent, name)
            if name.startswith(f"{owner}-") and os.path.isdir(path) and _empty_and_remove(path, 2000, 0.001):
                removed.append(name)
    return removed


def sweep_stale_groups(layout: CgroupLayout) -> list[str]:
    """Kill and remove task groups left by clients that died (their pid is gone).

    Returns the names removed.  A group still busy after killing is left for
    a later sweep.
    """
    removed = []
    for parent in dict.fromkeys(layout.parents.values()):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            owner, sep, _ = name.partition("-")
            path = os.path.join(parent, name)
            if not sep or not owner.isdigit() or not os.path.isdir(path) or os.path.exists(f"/proc/{owner}"):
                continue
            if _empty_and_remove(path, 100):
                removed.append(name)
    return removed
