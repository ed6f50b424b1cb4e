"""The worker client's reports: completions through the log, in the order they finished.

Part of :mod:`tasksprint.client`.  Completions go to one reporter, which
sends all it has in one ``batch`` command, waits for that command's result,
and sends the next: the log commits them in the order they finished here
(what makes early inputs safe, see :mod:`tasksprint.client_inputs`).
While tasks queued here wait for a slot, a completion waits up to
``report_delay`` for later ones to share its command.  Reports are commands
with the client's id and a sequence number, so a retry after a lost answer
is applied once.  :class:`ClientReports` is a base class of
:class:`~tasksprint.client.Client` and works on its fields, declared below.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Protocol

import trio

from tasksprint.command_tasks import CommandTasks
from tasksprint.coordinator.ops import BatchApplied, BatchOp, DoneOp, FailedOp, LostOp, Reported
from tasksprint.log_client import LogClient, SessionExpiredError
from tasksprint.observe import Observer
from tasksprint.queue_sizer import QueueSizer

__all__ = ["ClientReports", "ReportSettings", "session_lost"]


class ReportSettings(Protocol):
    """What the reporter reads of the client's settings (:class:`tasksprint.client.ClientConfig`)."""

    @property
    def report_batch(self) -> int: ...

    @property
    def report_delay(self) -> float: ...


def session_lost(exc: SessionExpiredError) -> RuntimeError:
    """Retrying cannot help: the replicas forgot which of this client's commands they applied."""
    return RuntimeError(f"the replicas collected this client's log session ({exc}); start the client again")


class ClientReports:
    """Reporting completions through the log (see the module docstring)."""

    # The client's fields (tasksprint.client.Client).
    config: ReportSettings
    observer: Observer
    _lc: LogClient | None
    _cid: int | None
    _nursery: trio.Nursery | None
    _outbox: list[DoneOp | FailedOp]
    _outbox_ready: trio.Event
    _finished: collections.OrderedDict[tuple[int, int], None]
    _sizer: QueueSizer | None
    _commands: CommandTasks | None
    _slots: trio.CapacityLimiter | None
    _idle_since: float | None
    _log: Any

    if TYPE_CHECKING:  # defined by another base of Client, or by Client

        async def _resize_queue(self, queue: int) -> None: ...

    def _failed_op(self, tid: int, attempt: int, error: str) -> FailedOp:
        assert self._cid is not None
        return FailedOp(cid=self._cid, tid=tid, attempt=attempt, error=error)

    def _queue_report(self, tid: int, attempt: int, op: DoneOp | FailedOp) -> None:
        """Queue ``op`` (this attempt's completion) for the reporter."""
        self._finished[(tid, attempt)] = None
        self._idle_since = trio.current_time()
        while len(self._finished) > 100_000:
            self._finished.popitem(last=False)
        self._outbox.append(op)
        self._outbox_ready.set()

    async def _reporter(self) -> None:
        """Report completions in order, all those ready in one log command, one command at a time.

        One command in flight keeps them in the order they finished, so a
        completion that used an output of this client's before the log had
        it (``early``) always comes after the completion that made it.
        """
        assert self._lc is not None
        resized = -1e9
        while True:
            if not self._outbox:
                self._outbox_ready = trio.Event()
                await self._outbox_ready.wait()
            await self._coalesce(trio.current_time() + self.config.report_delay)
            n = self.config.report_batch
            ops, self._outbox = self._outbox[:n], self._outbox[n:]
            started = trio.current_time()
            result = await self._report(ops[0] if len(ops) == 1 else BatchOp(ops=tuple(ops)))
            if self._sizer is not None:
                now = trio.current_time()
                self._sizer.reported(now - started)
                # At most four resizes a second: each is a log entry on every replica.
                proposal = self._sizer.proposal() if now - resized >= 0.25 else None
                if proposal is not None:
                    resized = now
                    self._sizer.current = proposal
                    assert self._nursery is not None
                    self._nursery.start_soon(self._resize_queue, proposal)
            if len(ops) == 1:
                others: tuple[tuple[int, Any], ...] = ((0, result),)
            else:
                others = result.others if isinstance(result, BatchApplied) else ()
            for i, answer in others:
                if isinstance(answer, Reported) and answer.rerun and 0 <= i < len(ops):
                    sub = ops[i]
                    self._log.info("task_rerun", tid=sub.tid, attempt=sub.attempt, reason=answer.reason)

    async def _coalesce(self, deadline: float) -> None:
        """Wait until ``deadline`` for more completions to report with those queued, while that idles no slot.

        Every log command costs each replica a round of messages, a synced
        write and an apply, however many completions it carries: short tasks
        reported one command each keep the replicas busier than the tasks
        keep the slots.  A completion waits only while tasks queued here wait
        for a slot (so no slot here idles for want of work), until the batch
        is full or ``deadline``.
        """
        while len(self._outbox) < self.config.report_batch and self._queued():
            self._outbox_ready = trio.Event()
            with trio.move_on_at(deadline) as waited:
                # Set by the next completion; checked again then.
                await self._outbox_ready.wait()
            if waited.cancelled_caught:
                return

    def _queued(self) -> bool:
        """Whether tasks assigned here wait for a slot (or are being spawned ahead of one)."""
        assert self._slots is not None and self._commands is not None
        return self._slots.statistics().tasks_waiting + self._commands.ahead() > 0

    async def _report(self, op: DoneOp | FailedOp | LostOp | BatchOp) -> Any:
        """Apply ``op`` through the log, retrying until it is; returns its result."""
        assert self._lc is not None
        wire_op = op.to_wire()
        with self.observer.span("client.report"):
            while True:
                try:
                    return await self._lc.submit(wire_op, deadline=30.0)
                except SessionExpiredError as exc:
                    raise session_lost(exc) from None
                except Exception as exc:  # Unavailable; keep the result and try again
                    self._log.warning("report_delayed", op=wire_op["op"], tid=wire_op.get("tid"), error=str(exc))
                    await trio.sleep(1.0)
