"""The coordinator as a replicated application: what a replica adds around the state machine.

:class:`~tasksprint.coordinator.machine.CoordinatorMachine` is deterministic
and knows nothing of time or the network.  This module is the replica-local,
non-deterministic part:

* the leader proposes the ``init`` entry (the seed is drawn once, by whichever
  leader gets there first: every leader proposes it under one fixed client id
  and sequence number, so the log applies it once);
* every replica notes which worker clients talk to it; followers pass these
  contacts to the leader, and the leader puts the clients silent for longer
  than ``client_timeout`` in the ``expired`` list of its next TICK.  A new
  leader has heard from nobody yet, so it counts every client as heard at the
  moment it took over: a grace period of one full timeout;
* read-only queries, parsed by :func:`~tasksprint.coordinator.parsing.parse_query`:
  ``view`` (long-poll for one client's assignments), ``status``, ``info``,
  and ``scheduler`` (the scheduler's own ``query`` hook, read-only),
  answered with the typed values of :mod:`tasksprint.coordinator.replies`.
  Building a view is reported to the app's observer as span
  ``machine.view``, with the value ``machine.tasks_per_view``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import attrs
from tasksprint_sdk.coordinator import Coordinator, load_scheduler

from tasksprint.app import NotYet
from tasksprint.coordinator.archive import History
from tasksprint.coordinator.machine import CoordinatorMachine, RunState
from tasksprint.coordinator.ops import (
    BadOp,
    GraphRequest,
    InfoRequest,
    InitOp,
    SchedulerAnswer,
    SchedulerRequest,
    StatusRequest,
    ViewRequest,
)
from tasksprint.coordinator.parsing import parse_query
from tasksprint.coordinator.replies import ComputationStatus, TaskGraph, TaskInfo
from tasksprint.observe import NULL, Observer
from tasksprint.paxos.messages import Command

#: Client id under which every leader proposes the init entry; the session
#: table applies (INIT_CLIENT, 1) once, so the first leader's seed wins.
INIT_CLIENT = "__init__"

#: Clients whose reported usage a replica keeps at most.
USAGE_KEPT = 100_000


@attrs.define(eq=False)
class CoordinatorApp:
    """Implements the replica's ``App`` protocol for a user's scheduler."""

    machine: CoordinatorMachine
    _leader_since: float | None = None
    _seen: dict[int, float] = attrs.Factory(dict)  # cid -> last contact (monotonic), leader's view
    _contacts: set[int] = attrs.Factory(set)  # heard since the last drain (to report to the leader)
    _usage: dict[int, tuple[float | None, int | None]] = attrs.Factory(dict)  # cid -> (cpu %, rss) reported
    _init_proposed_at: float = -1e9
    observer: Observer = attrs.field(default=NULL, kw_only=True)
    #: The replica-local inputs this class may read, injected so a test or the
    #: simulator can fix them: a monotonic clock, and random bytes for the seed.
    clock: Callable[[], float] = attrs.field(default=time.monotonic, kw_only=True)
    entropy: Callable[[int], bytes] = attrs.field(default=os.urandom, kw_only=True)
    _view: Any = attrs.field(init=False, default=None)  # machine.view, wrapped once for the observer

    def __attrs_post_init__(self) -> None:
        self._view = self.observer.timed("machine.view", self.machine.view)

    @classmethod
    def create(
        cls,
        scheduler: str | type[Coordinator],
        *,
        client_timeout: float = 10.0,
        observer: Observer = NULL,
        clock: Callable[[], float] = time.monotonic,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> CoordinatorApp:
        """Load ``scheduler`` (``file.py:Class``, ``module:Class`` or the class itself)."""
        scheduler_cls = load_scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        machine = CoordinatorMachine(scheduler_cls, client_timeout=client_timeout)
        return cls(machine, observer=observer, clock=clock, entropy=entropy)

    def attach_history(self, history: History) -> None:
        """Archived records go to ``history`` (the replica's, in its data directory)."""
        self.machine.attach_history(history)

    # -- App protocol ------------------------------------------------------

    def tick_data(self, now: float) -> Any:
        if self._leader_since is None:
            return None
        since = self._leader_since
        seen = {}
        for cid, _name, _addr in self.machine.live_clients():
            # A client this leader has not noticed before (it just joined, or
            # we just took over) gets a full timeout from now.
            first = self._seen.setdefault(cid, now)
            seen[cid] = max(first, since)
        expired = self.machine.expired_clients(seen, now)
        # The grace travels in the log, so every replica waits alike for the
        # outputs of these clients, whatever its own configuration says.
        return {"expired": expired, "grace": self.machine.client_timeout} if expired else None

    def leader_duties(self, propose: Callable[[Command], bool]) -> None:
        if self.machine.run_state is not RunState.WAITING:
            return
        now = self.clock()
        if now - self._init_proposed_at < 1.0:
            return
        self._init_proposed_at = now
        seed = int.from_bytes(self.entropy(7), "big")
        propose(
            Command(
                client_id=INIT_CLIENT,
                seq=1,
                op=InitOp(seed=seed, code_digest=self.machine.code_digest).to_wire(),
            )
        )

    def role_changed(self, leader: bool, now: float) -> None:
        self._leader_since = now if leader else None
        self._seen.clear()

    def drain_contacts(self) -> list[int]:
        out = sorted(self._contacts)
        self._contacts.clear()
        return out

    def merge_contacts(self, cids: list[int], now: float) -> None:
        for cid in cids:
            self._seen[cid] = now

    def on_applied(self, slot: int) -> None:
        pass  # parked view polls are asked again by the replica after every slot

    def describe_slot(self, slot: int) -> str:
        hook = self.machine.last_hook
        if hook is None:
            return f"slot {slot}, before any scheduler hook ran"
        where = f"hook {hook['hook']}"
        if hook.get("tid") is not None:
            where += f" for task {hook['tid']}"
        if hook.get("cid") is not None:
            where += f" for client {hook['cid']}"
        return f"last scheduler call: {where} in slot {hook['slot']} (compared at slot {slot})"

    def hook_running(self) -> tuple[int, dict[str, Any]] | None:
        return self.machine.hook_running()

    def effects_summary(self) -> tuple[str, int]:
        hook = self.machine.last_hook
        if hook is None:
            return "none yet", self.machine.tasks_started
        where = f"{hook['hook']} in slot {hook['slot']}"
        if hook.get("tid") is not None:
            where = f"{hook['hook']}(tid={hook['tid']}) in slot {hook['slot']}"
        elif hook.get("cid") is not None:
            where = f"{hook['hook']}(cid={hook['cid']}) in slot {hook['slot']}"
        return where, self.machine.tasks_started

    def query(self, name: str, args: dict[str, Any]) -> Any:
        """Answer a :class:`~tasksprint.api.Query`; a malformed one is answered with its ``Refused``."""
        try:
            request = parse_query(name, args)
        except BadOp as exc:
            return exc.refused
        match request:
            case ViewRequest(cid=cid, after=after, wait=wait, cpu=cpu, rss=rss):
                self._note_contact(cid)
                if cpu is not None or rss is not None:
                    self._note_usage(cid, cpu, rss)
                if (
                    wait
                    and self.machine.client_version(cid) <= after
                    and self.machine.run_state in (RunState.WAITING, RunState.RUNNING)
                    and self.machine.is_live(cid)
                ):
                    raise NotYet()
                view = self._view(cid, after)
                self.observer.value("machine.tasks_per_view", len(view.tasks))
                return view
            case StatusRequest():
                return self._with_usage(ComputationStatus.of(self.machine.status()))
            case InfoRequest(tid=tid):
                return TaskInfo.of(self.machine.task_info(tid))
            case GraphRequest(first=first, count=count):
                return TaskGraph.of(self.machine.graph(first, count))
            case SchedulerRequest(body=body):
                try:
                    return SchedulerAnswer(value=self.machine.scheduler_query(body))
                except BadOp as exc:
                    return exc.refused

    def _note_usage(self, cid: int, cpu: float | None, rss: int | None) -> None:
        if cid not in self._usage and len(self._usage) >= USAGE_KEPT:
            self._usage.pop(next(iter(self._usage)))  # bounded: forget the oldest reporter
        self._usage[cid] = (cpu, rss)

    def _with_usage(self, status: ComputationStatus) -> ComputationStatus:
        """``status`` with each live client's last contact and reported usage, as this replica knows them."""
        now = self.clock()
        loads = []
        for c in status.live_clients:
            seen = self._seen.get(c.cid)
            cpu, rss = self._usage.get(c.cid, (None, None))
            heard = None if seen is None else round(max(0.0, now - seen), 3)
            loads.append(attrs.evolve(c, heard_s=heard, cpu_percent=cpu, rss_bytes=rss))  # type: ignore[misc]
        return attrs.evolve(status, live_clients=tuple(loads))  # type: ignore[misc]

    def _note_contact(self, cid: int) -> None:
        if not self.machine.is_live(cid):
            return  # only clients the log knows: a view query naming any number must not grow these tables
        self._contacts.add(cid)
        self._seen[cid] = self.clock()
