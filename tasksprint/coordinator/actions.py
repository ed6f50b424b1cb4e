"""What a scheduler may do and ask while its hooks run: the machine's side of the hook runtime.

Theory of operation
-------------------
The user's ``Coordinator`` reaches the replicated state only through the
runtime protocol (:mod:`~tasksprint.coordinator.runtime`), which calls
these methods of the :class:`~tasksprint.coordinator.machine.CoordinatorMachine`
it is bound to: ``start_task``, ``kill_task``, ``forget_task``,
``archive`` / ``archived``, ``finish`` (:meth:`SchedulerActions.end_computation`),
``task_info`` and, outside the log, ``query``.  Every action that changes
the state adds what it did to the entry's effects (the digest the replicas
compare), so two replicas whose schedulers act differently disagree.  Each
checks its arguments and raises ``ValueError`` / ``TypeError`` naming the
call, which the runtime turns into the hook's failure.  No I/O here: an
archived record goes to the :class:`~tasksprint.coordinator.archive.History`
the replica attached.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tasksprint_sdk.coordinator import Coordinator

from tasksprint import codec
from tasksprint.coordinator import views
from tasksprint.coordinator.archive import History
from tasksprint.coordinator.ops import BadOp, ErrorCode, is_int
from tasksprint.coordinator.parts import MachineParts
from tasksprint.coordinator.specs import check_plain, task_spec
from tasksprint.coordinator.state import RunState

__all__ = ["SchedulerActions"]


class SchedulerActions(MachineParts):
    """The hook runtime's calls into the coordinator machine (a part of :class:`CoordinatorMachine`)."""

    __slots__ = ()

    # The machine's field these methods use besides MachineParts' (see CoordinatorMachine).
    _history: History

    def start_task(self, **call: Any) -> int:
        """The scheduler's ``start_task`` (arguments as there); returns the new task's id."""
        s = self._state
        assert s.seed is not None
        spec = task_spec(s.tasks, **call)
        task = self._lineage.add(spec)
        tid = task.tid
        self._placement.maybe_queue(task)
        # The whole spec, so replicas whose schedulers started different
        # tasks (not just a different number of them) disagree on the digest.
        self._fx.effects.append(
            [
                "start",
                tid,
                task.name,
                task.args,
                task.kwargs,
                list(task.pretasks),
                list(task.prekeys),
                list(task.keys),
                sorted(task.require),
                list(task.want),
                task.replicas,
                task.retries,
                task.timeout,
            ]
        )
        return tid

    def kill_task(self, tid: Any) -> list[int]:
        """The scheduler's ``kill_task``."""
        if not is_int(tid) or tid not in self._state.tasks:
            raise ValueError(f"kill_task({tid!r}): there is no task with that id")
        return self._lineage.kill(tid)

    def forget_task(self, tid: Any) -> None:
        """The scheduler's ``forget_task``."""
        if not is_int(tid) or tid not in self._state.tasks:
            raise ValueError(f"forget_task({tid!r}): there is no task with that id")
        self._lineage.forget(tid)

    def archive(self, key: Any, record: Any) -> None:
        """The scheduler's ``archive``: ``record`` goes to this replica's history, not the state."""
        if not is_int(key) or key < 0:
            raise ValueError(f"archive({key!r}, ...): the key must be an int >= 0")
        check_plain(record, "archive(record=...)")
        data = codec.encode(record)
        self._history.put(key, data)
        self._fx.effects.append(["archive", key, hashlib.sha256(data).hexdigest()[:16]])

    def archived(self, key: Any) -> Any:
        """The scheduler's ``archived``: what this replica's history keeps under ``key``, or None."""
        if not is_int(key) or key < 0:
            return None
        data = self._history.get(key)
        if data is None:
            return None
        try:
            return codec.decode_untrusted(data)
        except codec.BadMessage:
            return None  # a damaged record reads as missing: another replica may have it

    def end_computation(self, taskids: Any, values: Any) -> None:
        """The scheduler's ``finish``: the computation ends with ``values`` and those tasks' values."""
        s = self._state
        taskids = [] if taskids is None else taskids
        if not isinstance(taskids, (list, tuple)):
            raise TypeError(f"finish(taskids=...) must be a list of task ids, got {taskids!r}")
        for tid in taskids:
            if not is_int(tid) or tid not in s.tasks:
                raise ValueError(f"finish(taskids=...): {tid!r} is not a task id")
            if not s.tasks[tid].reported:
                raise ValueError(f"finish(taskids=...): task {tid} is not done, so it has no values yet")
        check_plain(values, "finish(values=...)")
        s.result = {"values": values, "tasks": [{"tid": tid, "values": s.tasks[tid].values} for tid in taskids]}
        s.run_state = RunState.FINISHED
        self._fx.effects.append(["finish", list(taskids), values])
        self._log.info("computation_finished", tasks=list(taskids))

    def scheduler_task_info(self, tid: Any) -> dict[str, Any] | None:
        """The scheduler's ``task_info``: :meth:`task_info` with the names of the clients running it."""
        if not is_int(tid):
            return None
        info = views.task_info(self._state, tid)
        if info is not None:
            clients = self._state.clients
            info["workers"] = [clients[cid].name for cid in info["clients"]]
            holder = self._state.tasks[tid].holder
            info["holder_worker"] = None if holder is None else clients[holder].name
        return info

    def scheduler_query(self, args: Any) -> Any:
        """The scheduler's ``query`` hook's answer to ``args``; raises :class:`BadOp` if it refuses or fails.

        Not part of the log: only reads.  The answer must be plain data.
        """
        sched = self._state.scheduler
        if sched is None or self._state.run_state is RunState.WAITING:
            raise BadOp("scheduler query: the computation is not initialized yet", ErrorCode.NOT_INITIALIZED)
        if type(sched).query is Coordinator.query:
            raise BadOp(f"scheduler {self._scheduler_cls.__qualname__} answers no queries", ErrorCode.UNKNOWN)
        try:
            value = sched.query(args)
            check_plain(value, "the query hook's answer")
        except Exception as exc:
            raise BadOp(f"scheduler query failed: {type(exc).__name__}: {exc}") from None
        return value
