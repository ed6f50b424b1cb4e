"""The coordinator machine's answers to questions, and the leader's liveness judgement.

Theory of operation
-------------------
Questions are not logged: any replica answers them from the state it
applied (the read models are :mod:`~tasksprint.coordinator.views`), and the
replica sends the answer once a majority has confirmed that state (see
:meth:`tasksprint.driver.ReplicaDriver.answer`).  The leader's liveness
judgement (:meth:`MachineQueries.expired_clients`) is a question too: it
reads the leader's clock, so its answer travels in the next TICK rather than
being decided here.  No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasksprint.coordinator import views
from tasksprint.coordinator.replies import ClientView
from tasksprint.coordinator.state import CoordinatorState, check_invariants

__all__ = ["MachineQueries"]


class MachineQueries:
    """Read models and liveness of the coordinator machine (a part of :class:`CoordinatorMachine`)."""

    __slots__ = ()

    # The machine's fields these methods use (see CoordinatorMachine).
    _client_timeout: float
    _state: CoordinatorState

    def view(self, cid: int, after_version: int = 0) -> ClientView:
        """What client ``cid`` must do, changed since ``after_version`` (see :func:`views.view`)."""
        return views.view(self._state, cid, after_version, self._client_timeout)

    def client_version(self, cid: int) -> int:
        """The version of the last change to client ``cid``'s view (0 if none or unknown)."""
        return views.client_version(self._state, cid)

    def status(self) -> dict[str, Any]:
        """The computation at a glance (see :func:`views.status`)."""
        return views.status(self._state)

    def graph(self, first: int, count: int) -> dict[str, Any]:
        """A page of the task graph (see :func:`views.graph`)."""
        return views.graph(self._state, first, count)

    def task_info(self, tid: int) -> dict[str, Any] | None:
        """Everything known about task ``tid``, or None if there is no such task."""
        return views.task_info(self._state, tid)

    def live_clients(self) -> list[tuple[int, str, str]]:
        """``(cid, name, addr)`` of every live client, by cid."""
        s = self._state
        return [(cid, s.clients[cid].name, s.clients[cid].addr) for cid in s.live]

    def sessions_in_use(self) -> list[str]:
        """The log sessions of the live clients: never collected (a worker may be silent for hours)."""
        s = self._state
        return [s.clients[cid].session for cid in s.live if s.clients[cid].session]

    def is_live(self, cid: int) -> bool:
        """Whether ``cid`` is a live client."""
        return cid in self._state.live

    def expired_clients(self, last_seen: Mapping[int, float], now: float) -> list[int]:
        """Live clients silent for longer than ``client_timeout``, for the leader's next TICK.

        ``last_seen`` maps cid to when the leader last heard from it (the
        leader should start every live client at its own start time); cids
        missing from it are not expired.  Returns cids in ascending order.
        """
        return [cid for cid in self._state.live if cid in last_seen and now - last_seen[cid] > self._client_timeout]

    def check_invariants(self) -> None:
        """Assert the internal bookkeeping is consistent (for tests; O(size of state))."""
        check_invariants(self._state)
