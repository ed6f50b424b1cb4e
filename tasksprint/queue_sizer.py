"""How many tasks a worker client asks for beyond its slots (see :class:`QueueSizer`)."""

from __future__ import annotations

import attrs

__all__ = ["QueueSizer"]


@attrs.define(eq=False)
class QueueSizer:
    """How many tasks beyond its slots a client asks for: enough to cover one round trip.

    A node that finishes a task waits, if nothing else is queued for it,
    for its completion to be committed and for the view that brings the
    next task: a report round trip.  With ``q`` tasks queued per slot, it
    does not wait while ``q x task time`` covers that.  A completion may
    also wait up to ``report_delay`` to be reported with later ones (while
    tasks wait here for a slot: see the client's reporter), so the queue is
    ``slots x 2 x (round trip + report_delay) / task time`` (twice, for the
    view's extra hop and for noise), at most ``max_per_slot x slots``: short
    tasks get a deep queue (and with it many completions to a log command,
    which keeps the replicas' work per task small), tasks much longer than
    a round trip get none, and keep work balanced between clients (a queued
    task cannot move to an idle client).  Averages are exponentially weighted; a change is proposed
    only when the figure at least doubles or halves.
    """

    slots: int
    max_per_slot: int = 64
    report_delay: float = 0.0
    current: int = 0
    _task_s: float | None = None
    _report_s: float | None = None
    _samples: int = 0
    _reports: int = 0

    def task_ran(self, seconds: float) -> None:
        # A plain mean at first (a node's first task is slow: imports,
        # cold caches), an exponentially weighted one from the 20th sample on.
        self._samples += 1
        w = max(0.05, 1 / self._samples)
        self._task_s = seconds if self._task_s is None else (1 - w) * self._task_s + w * seconds

    def reported(self, seconds: float) -> None:
        self._reports += 1
        w = max(0.1, 1 / self._reports)
        self._report_s = seconds if self._report_s is None else (1 - w) * self._report_s + w * seconds

    def proposal(self) -> int | None:
        """A new queue size worth telling the coordinator about, or None."""
        if self._task_s is None or self._report_s is None or self._samples < self.slots:
            return None
        want = round(self.slots * 2 * (self._report_s + self.report_delay) / max(self._task_s, 1e-4))
        want = max(0, min(want, self.max_per_slot * self.slots))
        if want == self.current:
            return None
        if self.current and self.current / 2 < want < self.current * 2:
            return None
        return want
