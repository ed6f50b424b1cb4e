"""What the parts of the coordinator machine work on: the machine's fields, declared once.

:class:`~tasksprint.coordinator.machine.CoordinatorMachine` is put together
from parts, each in a module of its own role: the ops of worker clients
(:mod:`~tasksprint.coordinator.client_ops`) and the scheduler's actions
(:mod:`~tasksprint.coordinator.actions`).  Each part is a class without
state of its own; :class:`MachineParts`, their common base, declares the
machine's fields they use, so that the type checker reads every part
against the machine that holds them.  No I/O here.
"""

from __future__ import annotations

from typing import Any

from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.lineage import Lineage
from tasksprint.coordinator.placement import Placement
from tasksprint.coordinator.state import CoordinatorState, Entry

__all__ = ["MachineParts"]


class MachineParts:
    """The fields of :class:`~tasksprint.coordinator.machine.CoordinatorMachine` that its parts use."""

    __slots__ = ()

    _scheduler_cls: type[Coordinator]
    _log: Any
    _state: CoordinatorState
    #: The effects, slot and session of the entry being applied.
    _fx: Entry
    _placement: Placement
    _lineage: Lineage
