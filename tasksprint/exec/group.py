"""The interface between the runner and a task group, shared by every enforcement.

A *task group* holds one run's process tree.  The runner uses it so:

* ``child_setup`` runs in the forked child before it executes the program:
  it joins the group and sets the per-process limits, so everything the
  task starts is in the group from its first instruction;
* ``started`` is told the main process's pid;
* while the task runs the runner's monitor polls ``cpu_seconds`` (the
  tree's CPU time, against the CPU-time limit; ``RLIMIT_CPU`` holds each
  process) and ``memory_bytes``;
* ``kill_round`` sends SIGKILL to every process in the group and returns
  them as ``{pid: start time}``; the runner repeats it until the group is
  empty (a process forking while it is killed leaves a child the next
  round finds) and reaps those re-parented to it;
* ``usage`` reads peak memory, user and system CPU and whether the OOM
  killer or the pids limit fired, once the tree is dead;
* ``remove`` deletes the group.

:mod:`tasksprint.exec.cgroup` implements it with cgroups v2 and v1,
:mod:`tasksprint.exec.rlimit` without cgroups.
"""

from __future__ import annotations

import math
import resource
from typing import Protocol

import attrs

from tasksprint.exec.spec import Enforcement, Limits


@attrs.frozen
class GroupUsage:
    """What a task group measured; None where the enforcement cannot see it."""

    peak_memory_bytes: int | None = None
    user_cpu_s: float | None = None
    system_cpu_s: float | None = None
    oom_killed: bool = False
    pids_limit_hit: bool = False


class TaskGroup(Protocol):
    """The interface the runner uses; see the module docstring."""

    enforcement: Enforcement
    unenforced: tuple[str, ...]

    def child_setup(self) -> None: ...
    def started(self, pid: int) -> None: ...
    def kill_round(self) -> dict[int, int]: ...
    def cpu_seconds(self) -> float | None: ...
    def memory_bytes(self) -> int | None: ...
    def usage(self) -> GroupUsage: ...
    def remove(self) -> None: ...


def child_rlimits(limits: Limits) -> None:
    """The per-process limits every enforcement applies in the child."""
    if limits.cpu_time_s is not None:
        soft = max(1, math.ceil(limits.cpu_time_s))
        # SIGXCPU at the soft limit, SIGKILL a second later for a process that ignores it.
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
