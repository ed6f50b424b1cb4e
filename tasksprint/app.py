"""What a replica replicates: the application protocol and the built-in key-value app.

A replica (:mod:`tasksprint.replica`) drives the Paxos log and hands every
chosen command to ``app.machine`` through an :class:`~tasksprint.machine.Applier`;
the rest of :class:`App` is what the replica asks of the application around
that: tick data, read-only queries, leader duties.  The coordinator's app is
:mod:`tasksprint.coordinator.app`; :class:`KVApp` runs the log alone (tests,
``bench/log.py``).  No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

from tasksprint.machine import KVMachine, StateMachine
from tasksprint.paxos.messages import Command


class NotYet(Exception):
    """Raised by ``App.query`` to park a long-poll until the state changes or it times out.

    The replica asks again after every applied slot, and once more with
    ``wait`` set to 0 when the deadline (``args["wait"]`` seconds) passes;
    the app must answer then.
    """


class App(Protocol):
    """What a replica needs from the application it replicates."""

    machine: StateMachine

    def tick_data(self, now: float) -> Any:
        """Data for the next TICK the leader proposes (leader only)."""

    def query(self, name: str, args: dict[str, Any]) -> Any:
        """Answer a read-only question about the applied state."""

    def describe_slot(self, slot: int) -> str:
        """Say what applying ``slot`` did, for a divergence report."""

    def hook_running(self) -> tuple[int, dict[str, Any]] | None:
        """(call number, {"hook", "slot", "tid", "cid"}) while user code runs, else None (for a watchdog)."""

    def effects_summary(self) -> tuple[str, int]:
        """For a divergence report: the last scheduler call (or "") and how many tasks (or items) there are."""

    def on_applied(self, slot: int) -> None:
        """Called after each applied slot, for bookkeeping of the application's own.

        Parked long-polls need nothing from it: the replica asks
        :meth:`query` again after every applied slot (see :class:`NotYet`).
        """

    def leader_duties(self, propose: Callable[[Command], bool]) -> None:
        """Called while this replica leads; may propose commands with ``propose``."""

    def role_changed(self, leader: bool, now: float) -> None:
        """This replica became (or stopped being) the leader."""

    def drain_contacts(self) -> list[int]:
        """Clients heard from since the last call (a follower reports them to the leader)."""

    def merge_contacts(self, cids: list[int], now: float) -> None:
        """Clients another replica heard from."""


@attrs.define(eq=False)
class KVApp:
    """The built-in key-value application used to run and test the log alone."""

    machine: KVMachine = attrs.Factory(KVMachine)

    def tick_data(self, now: float) -> Any:
        return None

    def query(self, name: str, args: dict[str, Any]) -> Any:
        raise KeyError(f"unknown query {name!r}")

    def describe_slot(self, slot: int) -> str:
        return f"key-value commands of slot {slot}"

    def effects_summary(self) -> tuple[str, int]:
        return "", self.machine.size

    def hook_running(self) -> tuple[int, dict[str, Any]] | None:
        return None

    def on_applied(self, slot: int) -> None:
        pass

    def leader_duties(self, propose: Callable[[Command], bool]) -> None:
        pass

    def role_changed(self, leader: bool, now: float) -> None:
        pass

    def drain_contacts(self) -> list[int]:
        return []

    def merge_contacts(self, cids: list[int], now: float) -> None:
        pass
