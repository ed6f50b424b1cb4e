"""What a worker client sends through the log, applied: join, done, failed, lost, and their batch.

Theory of operation
-------------------
A worker client joins under a name (a new incarnation, or an update of the
live one), then reports each task attempt it ran: ``done`` with its
outputs, ``failed`` with its error, or ``lost`` when it could not fetch a
task's outputs from their holder; a ``batch`` applies several reports in
order as one log entry.  Each report must come from the log session that
joined its client, and counts only for the task's current attempt on a live
client; otherwise it is answered with the reason and changes nothing.  A
``done`` whose ``early`` inputs were not committed from that client gives
the task a new attempt instead.  An attempt that fails is retried while the
task has retries left, else the task fails and the scheduler's
``task_failed`` hook decides (without one, the computation fails).  No I/O
here; these methods are a part of
:class:`~tasksprint.coordinator.machine.CoordinatorMachine`, which parses
each op (:mod:`~tasksprint.coordinator.parsing`) and settles after it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.ops import (
    ACCEPTED,
    BadOp,
    BatchApplied,
    DoneOp,
    ErrorCode,
    FailedOp,
    Joined,
    JoinOp,
    LostOp,
    Refused,
    Reported,
    ReportOp,
    described,
)
from tasksprint.coordinator.parts import MachineParts
from tasksprint.coordinator.runtime import Hook
from tasksprint.coordinator.state import ClientRecord, RunState, TaskRecord, TaskState

__all__ = ["ClientOps"]


class ClientOps(MachineParts):
    """The ops of worker clients, applied (a part of :class:`CoordinatorMachine`)."""

    __slots__ = ()

    # The machine's methods these call (see CoordinatorMachine).
    _sched: Callable[[], Coordinator]
    _call_hook: Callable[..., tuple[bool, Any]]
    _fail_computation: Callable[[dict[str, Any], str], None]

    def _op_join(self, op: JoinOp) -> Joined:
        s = self._state
        if s.run_state is RunState.WAITING:
            raise BadOp("join: the computation is not initialized yet; try again", ErrorCode.NOT_INITIALIZED)
        tags = frozenset(op.have)
        slots, queue = op.slots, op.queue
        if op.client in s.worker_overrides:
            added, removed, drained = s.worker_overrides[op.client]
            tags = (tags | added) - removed
            if drained:
                slots = queue = 0
        cid = s.names.get(op.client)
        if op.cid is not None and (cid != op.cid or not s.clients[cid].alive):
            # An update (a new queue size) from an incarnation declared dead
            # since, applied late: it must not start a new incarnation, which
            # would offer none of the outputs the client still holds.
            raise BadOp(
                f"join: client {op.client!r} incarnation {op.cid} is not live; join again as a new incarnation",
                ErrorCode.UNKNOWN,
            )
        if cid is not None and s.clients[cid].alive:
            client = s.clients[cid]
            self._check_session(client, "join")
            moved = client.addr != op.addr
            client.addr, client.slots, client.tags, client.queue = op.addr, slots, tags, queue
            self._fx.effects.append(["rejoin", cid])
            if moved:
                # Tasks reading outputs held here must learn the new address.
                for tid in list(client.holds):
                    self._lineage.bump_dependents(s.tasks[tid])
            return Joined(cid=cid)
        cid = s.next_cid
        s.next_cid += 1
        s.clients[cid] = ClientRecord(
            cid=cid, name=op.client, addr=op.addr, slots=slots, tags=tags, queue=queue, session=self._fx.session
        )
        s.names[op.client] = cid
        s.live[cid] = None
        self._fx.effects.append(["join", cid])
        refused: dict[str, int] = {}
        adopted = self._lineage.readopt(s.clients[cid], op.holds, refused) if op.holds else []
        # What it did not offer back will not come back: recompute it now if needed.
        self._lineage.end_wait(op.client)
        self._log.info(
            "client_joined",
            cid=cid,
            client=op.client,
            addr=op.addr,
            slots=op.slots,
            queue=op.queue,
            offered=len(op.holds),
            adopted=len(adopted),
            refused=refused,
        )
        self._call_hook(Hook.CLIENT_JOINED, lambda: self._sched().client_joined(cid), cid=cid)
        return Joined(cid=cid, adopted=tuple(adopted))

    def _op_report(self, op: ReportOp) -> Reported:
        match op:
            case DoneOp():
                return self._op_done(op)
            case FailedOp():
                return self._op_failed(op)
            case LostOp():
                return self._op_lost(op)

    def _op_batch(self, ops: tuple[ReportOp | Refused, ...]) -> BatchApplied:
        # Only the results that say something beyond "accepted": every
        # replica hashes and keeps them, the client mostly needs none.
        others = []
        for i, sub in enumerate(ops):
            if isinstance(sub, Refused):
                result: Reported | Refused = sub
            else:
                try:
                    result = self._op_report(sub)
                except BadOp as exc:
                    result = exc.refused
            if result != ACCEPTED:
                others.append((i, result))
        return BatchApplied(count=len(ops), others=tuple(others))

    def _report_target(self, op: DoneOp | FailedOp) -> tuple[ClientRecord, TaskRecord]:
        what = "done" if isinstance(op, DoneOp) else "failed"
        client = self._state.clients.get(op.cid)
        if client is None:
            raise BadOp(f"{what}: unknown client {op.cid}", ErrorCode.UNKNOWN)
        task = self._state.tasks.get(op.tid)
        if task is None:
            raise BadOp(f"{what}: unknown task {op.tid}", ErrorCode.UNKNOWN)
        self._check_session(client, what)
        return client, task

    def _check_session(self, client: ClientRecord, what: str) -> None:
        """Refuse an op that speaks for ``client`` from a log session other than the one that joined it."""
        if client.session and client.session != self._fx.session:
            raise BadOp(
                f"{what}: client {client.cid} ({client.name[:64]!r}) was joined by another log session; "
                "a client reports only for itself",
                ErrorCode.FORBIDDEN,
            )

    def _stale_reason(self, client: ClientRecord, task: TaskRecord, attempt: int) -> str | None:
        if self._state.run_state is not RunState.RUNNING:
            return f"the computation is {self._state.run_state.value}"
        if not client.alive:
            return f"client {client.cid} was declared dead; join again"
        if task.state is not TaskState.RUNNING:
            return f"task {task.tid} is {task.state.value}"
        if attempt != task.attempt or client.cid not in task.copies:
            return f"stale attempt {attempt} of task {task.tid} (current attempt {task.attempt})"
        return None

    def _op_done(self, op: DoneOp) -> Reported:
        s = self._state
        client, task = self._report_target(op)
        if not all(ptid in task.pretasks for ptid, _ in op.early):
            raise BadOp(
                f"done: field 'early' must list [pretask tid, attempt] pairs of this task, got {described(op.early)}"
            )
        reason = self._stale_reason(client, task, op.attempt)
        if reason is not None:
            # The client has reported on it, so it needs no kill order for it.
            if task.tid not in client.running:
                client.entries.pop(task.tid, None)
            return Reported(accepted=False, reason=reason)
        for ptid, pattempt in op.early:
            pre = s.tasks[ptid]
            if pre.holder != client.cid or pre.attempt != pattempt:
                # The client ran it on an output of its own that the log did
                # not commit (another copy's or attempt's won, or none did):
                # this completion cannot count; run the task again.
                self._lineage.void_copy(client, task)
                return Reported(
                    accepted=False,
                    rerun=True,
                    reason=f"input from task {ptid} attempt {pattempt} on client {client.cid} was not committed",
                )
        for other in task.copies:
            if other != client.cid:
                self._placement.unassign(s.clients[other], task.tid, tell=True)
        self._placement.unassign(client, task.tid, tell=False)
        task.copies = []
        s.queue.discard(task.tid)
        task.holder = task.made_by = client.cid
        task.made_attempt = task.attempt
        client.holds[task.tid] = None
        task.sizes = dict(op.sizes)
        s.set_state(task, TaskState.DONE)
        self._fx.effects.append(["done", task.tid, client.cid])
        self._lineage.outputs_changed(task, available=True)
        if task.reported:
            s.recomputed += 1
        else:
            s.completed += 1
            task.reported = True
            task.values = {k: op.values[k] for k in task.keys if k in op.values}
            tid, given = task.tid, dict(task.values)
            self._call_hook(Hook.TASK_DONE, lambda: self._sched().task_done(tid, given), tid=tid)
        return ACCEPTED

    def _op_failed(self, op: FailedOp) -> Reported:
        client, task = self._report_target(op)
        reason = self._stale_reason(client, task, op.attempt)
        if reason is not None:
            if task.tid not in client.running:
                client.entries.pop(task.tid, None)
            return Reported(accepted=False, reason=reason)
        self._placement.unassign(client, task.tid, tell=False)
        task.copies.remove(client.cid)
        task.error = op.error
        self._fx.effects.append(["copy_failed", task.tid, client.cid])
        if task.copies:
            # Other copies of this attempt still run; one of them may succeed.
            self._placement.enqueue(task.tid)
            return ACCEPTED
        record = op.record
        if record is not None and "result_files" in record:
            # Where the failed run's result files are kept: said here, not by the client.
            record = {**record, "worker": client.name}
        self._attempt_failed(task, op.error, record)
        return ACCEPTED

    def _op_lost(self, op: LostOp) -> Reported:
        s = self._state
        client = s.clients.get(op.cid)
        task = s.tasks.get(op.tid)
        if client is None or task is None:
            raise BadOp(f"lost: unknown client {op.cid} or task {op.tid}", ErrorCode.UNKNOWN)
        self._check_session(client, "lost")
        if s.run_state is not RunState.RUNNING or not client.alive:
            return Reported(accepted=False, reason="reporter is dead or the computation is over")
        if task.state is not TaskState.DONE or task.holder is None:
            return Reported(accepted=False, reason=f"task {op.tid} has no outputs on record")
        self._lineage.lose_outputs(task)
        return ACCEPTED

    def _attempt_failed(self, task: TaskRecord, error: str, record: dict[str, Any] | None = None) -> None:
        s = self._state
        task.failures += 1
        if task.failures <= task.retries:
            task.attempt += 1
            s.set_state(task, TaskState.PENDING)
            self._placement.enqueue(task.tid)
            self._fx.effects.append(["retry", task.tid, task.attempt])
            return
        s.set_state(task, TaskState.FAILED)
        s.queue.discard(task.tid)
        self._fx.effects.append(["task_failed", task.tid])
        self._log.warning("task_failed", tid=task.tid, name=task.name, attempts=task.failures, error=error)
        # Its dependents can never get their inputs.
        self._lineage.kill(task.tid)
        if type(self._sched()).task_failed is not Coordinator.task_failed:
            tid = task.tid
            hook = self._sched().task_failed
            if "record" in inspect.signature(hook).parameters:
                # A scheduler that asks for it gets a command task's record (None for a node task).
                self._call_hook(Hook.TASK_FAILED, lambda: hook(tid, error, record=record), tid=tid)  # type: ignore[call-arg]
            else:
                self._call_hook(Hook.TASK_FAILED, lambda: hook(tid, error), tid=tid)
            return
        message = (
            f"task {task.tid} ({task.name!r}) failed {task.failures} time(s), exhausting its "
            f"{task.retries} retries; last error: {error}. Override task_failed(tid, error) in "
            f"{self._scheduler_cls.__qualname__} to handle task failures in the scheduler."
        )
        self._fail_computation(
            {"kind": "task", "hook": None, "tid": task.tid, "cid": None, "slot": self._fx.slot, "error": error},
            message,
        )
