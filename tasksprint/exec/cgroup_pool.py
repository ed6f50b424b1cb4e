"""Task cgroups kept from run to run: one made per slot, not one per task.

Making a task's cgroup costs a directory per controller hierarchy and
writing its limits; removing it, as many ``rmdir`` calls, and the kernel's
deferred work of taking a memory cgroup offline.  For short tasks that is a
good part of what a client spends per task.  A :class:`CgroupPool` keeps the
groups of finished runs instead and hands them to the next runs that ask for
the same limits:

* :meth:`CgroupPool.take` gives a kept group made for exactly these limits
  (so no limit is ever rewritten, and the per-process limits its child
  setup applies are the run's), else a new one;
* :meth:`CgroupPool.give_back` takes a group back once its run is over:
  the group is checked empty (the whole tree dead) and made ready again
  (:meth:`~tasksprint.exec.cgroup.CgroupV1Group.reset`: memory still
  charged is reclaimed, the peak reset, the counters that cannot be reset
  kept as the base the next run's usage is read from).  A group that is not
  empty or cannot be reset is not kept: the caller removes it, as before.

Each run thus has a group of its own, with its limits, from its first
instruction, and measures only itself.  Kept groups are named like any
task group (``<client pid>-<random>``): the client's guardian and the sweep
of dead clients' groups remove them as they remove the others.

Only cgroup v1 groups are kept.  A v2 group's ``memory.peak`` cannot be
reset before Linux 6.12 (and then only per open file), so on v2 every run
gets a fresh group.
"""

from __future__ import annotations

import collections
import os
import secrets

from tasksprint.exec.cgroup import CgroupLayout, CgroupV1Group, CgroupV2Group
from tasksprint.exec.spec import Enforcement, Limits

__all__ = ["KEEP", "CgroupPool", "new_group"]

#: How many idle groups a pool keeps at most (the oldest goes first).
KEEP = 16


def group_name() -> str:
    """A new task group's name: this process's pid (for the guardian and the sweep) and a random part."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def new_group(layout: CgroupLayout, limits: Limits) -> CgroupV1Group | CgroupV2Group:
    """A new task group in ``layout`` with ``limits``; raises ``OSError`` when it cannot be made."""
    if layout.version is Enforcement.CGROUP_V2:
        return CgroupV2Group.create(layout, group_name(), limits)
    return CgroupV1Group.create(layout, group_name(), limits)


class CgroupPool:
    """Idle task groups of ``layout``, kept for the next runs with the same limits."""

    def __init__(self, layout: CgroupLayout, keep: int = KEEP) -> None:
        self.layout = layout
        self._keep = keep
        self._idle: collections.OrderedDict[CgroupV1Group, Limits] = collections.OrderedDict()

    def idle(self) -> int:
        """How many groups are kept, idle."""
        return len(self._idle)

    def take(self, limits: Limits) -> CgroupV1Group | CgroupV2Group:
        """A group for a run with ``limits``: a kept one made for them, else a new one.

        Raises ``OSError`` when a new one cannot be made.
        """
        for group, made_for in reversed(self._idle.items()):
            if made_for == limits:
                del self._idle[group]
                return group
        return new_group(self.layout, limits)

    def give_back(self, group: object) -> bool:
        """Keep ``group`` (its run is over) for a later run; whether it was kept (if not, remove it)."""
        if not isinstance(group, CgroupV1Group) or self._keep <= 0 or not group.reset():
            return False
        self._idle[group] = group.limits
        while len(self._idle) > self._keep:
            _remove(self._idle.popitem(last=False)[0])
        return True

    def close(self) -> None:
        """Remove every kept group (they are empty)."""
        while self._idle:
            _remove(self._idle.popitem(last=False)[0])


def _remove(group: CgroupV1Group) -> None:
    try:
        group.remove()
    except OSError:
        pass  # empty, yet busy a moment: the guardian or the next sweep removes it
