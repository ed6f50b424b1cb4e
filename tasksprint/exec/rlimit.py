"""A task group without cgroups: setrlimit in the child, the tree found by /proc scans.

Used when no cgroup can be written (an unprivileged client, a container
without delegation) or when the caller forces it.  Limits are ``setrlimit``
in the child (``RLIMIT_DATA`` for memory, per process; ``RLIMIT_CPU``;
``RLIMIT_NPROC``, which counts every process of the user and is ignored for
root) and ``sched_setaffinity`` for a cpuset; a CPU quota cannot be applied.
Members are found by :mod:`tasksprint.exec.proctree`, whose scans also give
the tree's memory and CPU time to the runner's monitor.
"""

from __future__ import annotations

import os
import resource

import attrs

from tasksprint.exec import proctree
from tasksprint.exec.group import GroupUsage, child_rlimits
from tasksprint.exec.spec import Enforcement, Limits


@attrs.define(eq=False)
class RlimitGroup:
    """A task's processes found by :mod:`proctree`, limited by setrlimit in the child.

    ``markers`` are the ``NAME=value`` environment entries that identify the
    task's orphans; ``known`` accumulates every process a scan attributed to
    the task, so adopted zombies among them can be reaped.
    """

    _limits: Limits
    _markers: tuple[bytes, ...]
    _nproc: int | None = None  # RLIMIT_NPROC to set in the child
    _root: tuple[int, int] | None = None
    _known: dict[int, int] = attrs.Factory(dict)
    _peak_rss: int = 0
    enforcement: Enforcement = Enforcement.RLIMIT
    unenforced: tuple[str, ...] = ()

    @classmethod
    def create(cls, limits: Limits, markers: tuple[bytes, ...]) -> RlimitGroup:
        unenforced = []
        nproc = None
        if limits.cpus is not None:
            unenforced.append("cpus")
        if limits.pids is not None:
            if os.geteuid() == 0:
                unenforced.append("pids")  # the kernel does not apply RLIMIT_NPROC to root
            else:
                # RLIMIT_NPROC counts every process of the user, so the task
                # gets its pids on top of what the user runs now.
                nproc = _user_process_count() + limits.pids
        # The task's orphans must come back to this process to be found and reaped.
        proctree.become_subreaper()
        return cls(limits, markers, nproc, unenforced=tuple(unenforced))

    def child_setup(self) -> None:
        limits = self._limits
        if limits.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (limits.memory_bytes, limits.memory_bytes))
        if self._nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (self._nproc, self._nproc))
        if limits.cpuset is not None:
            os.sched_setaffinity(0, limits.cpuset)
        child_rlimits(limits)

    def started(self, pid: int) -> None:
        st = proctree.proc_stat(pid)
        if st is not None:
            self._root = (pid, st[1])

    def _scan(self) -> dict[int, int]:
        procs = proctree.task_processes(self._root, self._markers)
        self._known.update(procs)
        return procs

    def kill_round(self) -> dict[int, int]:
        procs = self._scan()
        proctree.kill_processes(procs)
        return procs

    def cpu_seconds(self) -> float | None:
        # RLIMIT_CPU holds each process; this sums the live tree for the
        # runner's monitor (a process reaped by a parent that died too is missed).
        return proctree.tree_cpu_seconds(self._scan())

    def memory_bytes(self) -> int | None:
        rss = proctree.tree_rss_bytes(self._scan())
        self._peak_rss = max(self._peak_rss, rss)
        return rss

    def usage(self) -> GroupUsage:
        return GroupUsage(peak_memory_bytes=self._peak_rss or None)

    def reap(self) -> list[tuple[int, resource.struct_rusage]]:
        """Reap the task's orphans that were re-parented to this process."""
        root = self._root[0] if self._root else None
        return proctree.reap_adopted({p: s for p, s in self._known.items() if p != root}, session=root)

    def remove(self) -> None:
        self.reap()


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count
