"""The runtime protocol: what a scheduler's actions call while TaskSprint runs it.

A :class:`~tasksprint_sdk.coordinator.Coordinator` acts (``start_task``,
``kill_task``, ``finish``, ``random``, ``now``) through a runtime object
that the replicated state machine binds to the instance with :func:`bind`
before the first hook and takes away with :func:`unbind` (for instance
while it pickles the scheduler into a snapshot).  Any object with the
methods of :class:`SchedulerRuntime` can be bound, so a test can run a
scheduler's hooks against a runtime of its own.

Standard library only: the SDK imports no part of the ``tasksprint`` runtime.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["SchedulerRuntime", "bind", "bound", "unbind"]

# The instance attribute holding the bound runtime (never pickled with it: see unbind).
_ATTR = "_tasksprint_runtime"


class SchedulerRuntime(Protocol):
    """What a bound scheduler's actions are delegated to."""

    def check_usable(self, what: str) -> None:
        """Raise ``SchedulerUsageError`` if action ``what`` cannot run now (e.g. outside a hook)."""

    @property
    def random(self) -> random.Random:
        """The computation's seeded random generator."""

    @property
    def now(self) -> float:
        """The time of the last applied tick, in seconds."""

    def start_task(self, **call: Any) -> int:
        """Create a task; ``call`` holds every keyword argument of :meth:`Coordinator.start_task`.

        Returns the new task's id.
        """

    def kill_task(self, tid: int) -> list[int]:
        """Kill ``tid`` and its transitive dependents; return the ids killed."""

    def finish(self, taskids: Sequence[int] | None, values: Any) -> None:
        """End the computation successfully."""

    def task_info(self, tid: int) -> dict[str, Any] | None:
        """What the coordinator knows of task ``tid`` (plain data), or None."""

    def forget_task(self, tid: int) -> None:
        """Drop finished task ``tid`` from the coordinator's state."""

    def archive(self, key: int, record: Any) -> None:
        """Keep ``record`` (plain data) under ``key`` in the replica's durable history, out of the state."""

    def archived(self, key: int) -> Any:
        """The record archived under ``key`` in this replica's history, or None."""


def bind(scheduler: object, runtime: SchedulerRuntime) -> None:
    """Make ``scheduler``'s actions go to ``runtime``."""
    vars(scheduler)[_ATTR] = runtime


def unbind(scheduler: object) -> SchedulerRuntime | None:
    """Take ``scheduler``'s runtime away; return it (None if none was bound)."""
    return vars(scheduler).pop(_ATTR, None)


def bound(scheduler: object) -> SchedulerRuntime | None:
    """The runtime bound to ``scheduler``, or None."""
    return vars(scheduler).get(_ATTR)
