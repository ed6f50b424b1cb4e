"""The coordinator: the user's scheduler run as a replicated state machine.

Modules, each with its own theory of operation:

- :mod:`~tasksprint.coordinator.ops` — the log operations, their answers and the questions, typed.
- :mod:`~tasksprint.coordinator.parsing` — the strict parsers of an operation and of a question.
- :mod:`~tasksprint.coordinator.state` — task and client records, their invariants.
- :mod:`~tasksprint.coordinator.specs` — checking ``start_task`` arguments.
- :mod:`~tasksprint.coordinator.machine` — applying operations, calling hooks, settling.
- :mod:`~tasksprint.coordinator.client_ops` — a worker client's join and reports, applied.
- :mod:`~tasksprint.coordinator.parts` — the machine's fields its parts use, declared once.
- :mod:`~tasksprint.coordinator.lineage` — task records, outputs appearing and lost, kills, recomputation.
- :mod:`~tasksprint.coordinator.placement` — which client runs each task.
- :mod:`~tasksprint.coordinator.runtime` — calling the scheduler's hooks; what its actions reach.
- :mod:`~tasksprint.coordinator.views` — read models: a client's view, status, task info.
- :mod:`~tasksprint.coordinator.replies` — a client's view as typed values.
- :mod:`~tasksprint.coordinator.snapshots` — the state as bytes, scheduler object included.
- :mod:`~tasksprint.coordinator.app` — what a replica runs around the machine (not deterministic).

Everything but ``app`` is deterministic and does no I/O.
"""
