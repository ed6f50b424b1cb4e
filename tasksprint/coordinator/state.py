"""The coordinator's replicated state: task and client records, and their invariants.

Theory of operation
-------------------
:class:`CoordinatorState` is everything a snapshot carries: the run state,
the seed, the leader's time, the user's scheduler object, every task
(:class:`TaskRecord`) and every client (:class:`ClientRecord`) ever seen,
and the placement queues.  It is mutated only by the machine
(:mod:`tasksprint.coordinator.machine`) and placement
(:mod:`tasksprint.coordinator.placement`), always through complete
transitions, so :func:`check_invariants` holds between log entries.

Each client keeps two change tables, ``entries`` (its assignments and kill
orders) and ``holders`` (where inputs of its tasks moved), each ordered by
the global ``version`` at which the row last changed: :meth:`CoordinatorState.bump`
moves a row to the end with a new version, so a view after version V reads
the tables backwards and stops at the first row not newer than V.

:class:`Entry` is per-log-entry scratch (the actions taken, for the effects
digest), never part of a snapshot.  Nothing here does I/O.
"""

from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from tasksprint_sdk.coordinator import Coordinator

__all__ = [
    "ACTIVE",
    "ClientRecord",
    "CoordinatorState",
    "Entry",
    "RunState",
    "TaskRecord",
    "TaskState",
    "check_invariants",
]


class TaskState(enum.Enum):
    PENDING = "pending"  # waiting for inputs or for a free slot
    RUNNING = "running"  # at least one copy placed on a client (maybe still fetching its inputs)
    DONE = "done"
    FAILED = "failed"  # failed on its last allowed attempt
    KILLED = "killed"


ACTIVE = (TaskState.PENDING, TaskState.RUNNING)


class RunState(enum.Enum):
    WAITING = "waiting"  # no init entry applied yet
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@attrs.define(eq=False)
class TaskRecord:
    tid: int
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    pretasks: tuple[int, ...]
    prekeys: tuple[str | None, ...]
    keys: tuple[str, ...]
    require: frozenset[str]
    want: tuple[str, ...]
    replicas: int
    retries: int
    timeout: float | None
    seed: int
    state: TaskState = TaskState.PENDING
    attempt: int = 1
    failures: int = 0  # failed attempts since the task was (re)started
    copies: list[int] = attrs.Factory(list)  # cids running the current attempt, in placement order
    holder: int | None = None  # live cid holding the outputs; None unless DONE and not lost
    values: dict[str, Any] | None = None  # the first completion's values of ``keys``
    sizes: dict[str, int] = attrs.Factory(dict)  # output key -> bytes, from the holder's report
    error: str | None = None
    dependents: list[int] = attrs.Factory(list)  # one entry per pretasks entry naming this task
    # Invariant: the number of pretasks entries whose outputs are not held by a live client.
    missing: int = 0
    # Index into ``pretasks`` where placement last found one waiting to be
    # placed; the next check starts there (a cache: it changes no decision).
    blocker: int = 0
    reported: bool = False  # task_done was called (a lineage recompute does not call it again)
    # The committed completion whose outputs a holder keeps (or kept): the
    # client (incarnation) that made them and the attempt they came from.  A
    # returning client may offer them again (see Lineage.readopt); two ints a task.
    made_by: int | None = None
    made_attempt: int = 0


@attrs.define(eq=False)
class ClientRecord:
    cid: int
    name: str
    addr: str
    slots: int
    tags: frozenset[str]
    alive: bool = True
    #: The log session (command client id) that joined it: only that session
    #: may report for it or join again under its name ("" in older states: any).
    session: str = ""
    running: dict[int, None] = attrs.Factory(dict)  # tids placed here (ordered set)
    # The tids in ``running`` that are missing an input (placed early, or an
    # input was lost): they do not count against ``slots``.
    prefetch: dict[int, None] = attrs.Factory(dict)
    holds: dict[int, None] = attrs.Factory(dict)  # tids whose outputs live here
    # tid -> version of its last change for this client, ordered by version
    # (an entry is moved to the end when bumped), so views can stop early.
    # A tid in ``running`` is an assignment; otherwise the client must kill it.
    entries: dict[int, int] = attrs.Factory(dict)
    # tid -> version of the last change of where that task's outputs are,
    # for tasks whose outputs a task placed here reads; ordered by version.
    holders: dict[int, int] = attrs.Factory(dict)
    last_change: int = 0
    # Tasks the client accepts beyond ``slots`` (its queue): ready tasks wait
    # in its node pool for a free node, so a node that finishes one starts
    # the next at once instead of waiting for the commit of its report and
    # the view that brings new work.  0: only what it can run now.
    queue: int = 0
    # Heap of tids none of whose inputs is available yet but whose missing
    # pretasks all run here: placed here early ("followers") while there is
    # room, so the client can start each as soon as its own nodes made the
    # inputs (only clients with a queue take followers).  Checked when popped.
    follow: list[int] = attrs.Factory(list)
    in_follow: set[int] = attrs.Factory(set)
    # tid -> version at which outputs held here were released (every task
    # reading them finished), ordered by version: the client drops them.
    released: dict[int, int] = attrs.Factory(dict)


@attrs.define(eq=False)
class CoordinatorState:
    """Everything a snapshot carries."""

    run_state: RunState = RunState.WAITING
    seed: int | None = None
    random: random.Random | None = None
    now: float = 0.0
    scheduler: Coordinator | None = None  # the user's Coordinator instance, after init
    tasks: dict[int, TaskRecord] = attrs.Factory(dict)
    clients: dict[int, ClientRecord] = attrs.Factory(dict)
    names: dict[str, int] = attrs.Factory(dict)  # client name -> its latest cid
    live: dict[int, None] = attrs.Factory(dict)  # live cids, ascending (cids are handed out in order)
    next_tid: int = 1
    next_cid: int = 1
    version: int = 0
    # tids that may need a copy placed (ready or prefetchable).  Each is also
    # in one of two heaps, so placement takes them in tid order and stops as
    # soon as no client can take what a heap holds: ``ready_heap`` for tasks
    # whose inputs were all available when queued, ``early_heap`` for the
    # others.  A task's class can change while it waits; it is moved to the
    # other heap when popped.  The heaps may hold tids no longer queued
    # (skipped when popped); ``in_ready`` / ``in_early`` keep each tid in a
    # heap at most once.
    queue: set[int] = attrs.Factory(set)
    ready_heap: list[int] = attrs.Factory(list)
    early_heap: list[int] = attrs.Factory(list)
    in_ready: set[int] = attrs.Factory(set)
    in_early: set[int] = attrs.Factory(set)
    recheck: set[int] = attrs.Factory(set)  # lost outputs to reconsider; empty between entries
    # Outputs lost with their holder's death that its client, coming back
    # under the same name, may offer again: tid -> log time until which they
    # are not recomputed (ordered by insertion, so by deadline).  An entry
    # ends at the deadline, when the name joins again, or when re-adopted.
    awaiting: dict[int, float] = attrs.Factory(dict)
    # Tasks whose held outputs may no longer be needed (a reader finished,
    # or they were made again); empty between entries.
    release_check: set[int] = attrs.Factory(set)
    counts: dict[TaskState, int] = attrs.Factory(lambda: {s: 0 for s in TaskState})
    # Monotone figures for recovery: tasks done at least once, completions of
    # tasks done before (work redone from lineage), outputs taken back from a
    # returning client (work not redone).
    completed: int = 0
    recomputed: int = 0
    readopted: int = 0
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    last_hook: dict[str, Any] | None = None
    # Worker name -> (tags added, tags removed, drained), from worker ops:
    # applied over what each later join of that name offers.
    worker_overrides: dict[str, tuple[frozenset[str], frozenset[str], bool]] = attrs.Factory(dict)
    forgotten: int = 0  # finished tasks the scheduler dropped from the state (forget_task)
    outputs_released: int = 0  # tasks whose held outputs were released, every reader having finished

    def set_state(self, task: TaskRecord, state: TaskState) -> None:
        """Move ``task`` to ``state``, keeping :attr:`counts` true."""
        self.counts[task.state] -= 1
        self.counts[state] += 1
        task.state = state
        if state not in ACTIVE:
            # A reader finished: its inputs may be released at the end of the entry.
            self.release_check.update(task.pretasks)
            if state is TaskState.DONE:
                self.release_check.add(task.tid)

    def bump(self, table: dict[int, int], client: ClientRecord, tid: int) -> None:
        """Record a change of row ``tid`` in ``table`` (a client's ``entries`` or ``holders``)."""
        self.version += 1
        # Re-inserted so the table stays ordered by version.
        table.pop(tid, None)
        table[tid] = self.version
        client.last_change = self.version


@attrs.define(eq=False)
class Entry:
    """Scratch of the log entry being applied: its slot and the actions it caused."""

    slot: int = 0
    #: The log session (command client id) that submitted it; "" for a TICK.
    session: str = ""
    effects: list[list[Any]] = attrs.Factory(list)
    woken: bool = False  # placement queued dependents: place another round


def check_invariants(s: CoordinatorState) -> None:
    """Assert the bookkeeping of ``s`` is consistent (for tests; O(size of state))."""
    counts = {state: 0 for state in TaskState}
    for tid, task in s.tasks.items():
        counts[task.state] += 1
        assert task.tid == tid
        assert (task.state is TaskState.RUNNING) == bool(task.copies), f"task {tid}: {task.state}, {task.copies}"
        assert len(set(task.copies)) == len(task.copies) <= task.replicas, f"task {tid} copies {task.copies}"
        for cid in task.copies:
            assert s.clients[cid].alive and tid in s.clients[cid].running, f"task {tid} not running on {cid}"
        if task.holder is not None:
            assert task.state is TaskState.DONE and s.clients[task.holder].alive
            assert tid in s.clients[task.holder].holds
        missing = sum(1 for p in task.pretasks if s.tasks[p].holder is None)
        assert task.missing == missing, f"task {tid}: missing {task.missing}, really {missing}"
    assert counts == s.counts, f"state counts {s.counts} != {counts}"
    for task in s.tasks.values():
        assert all(p in s.tasks for p in task.pretasks) and all(d in s.tasks for d in task.dependents)
    for cid, client in s.clients.items():
        assert client.alive == (cid in s.live)
        for tid in client.running:
            assert cid in s.tasks[tid].copies, f"client {cid} runs {tid} unknowingly"
            # Exactly the placed tasks missing an input are outside the slots.
            waiting = s.tasks[tid].missing > 0
            assert (tid in client.prefetch) == waiting, f"client {cid}: task {tid} prefetch {not waiting}"
        assert all(tid in client.running for tid in client.prefetch), f"client {cid} prefetch {client.prefetch}"
        if not client.alive:
            assert not client.running and not client.prefetch and not client.entries, f"dead client {cid}"
        for tid in client.holds:
            assert s.tasks[tid].holder == cid
        for versions in (
            list(client.entries.values()),
            list(client.holders.values()),
            list(client.released.values()),
        ):
            assert versions == sorted(versions) and all(v <= s.version for v in versions)
    assert not s.recheck and not s.release_check
    for tid in s.awaiting:
        task = s.tasks[tid]
        assert task.state is TaskState.DONE and task.holder is None, f"awaited task {tid}: {task.state}"
        assert task.made_by is not None and not s.clients[task.made_by].alive, f"awaited task {tid}: maker alive"
    assert s.in_ready == set(s.ready_heap) and len(s.in_ready) == len(s.ready_heap), "ready heap bookkeeping"
    assert s.in_early == set(s.early_heap) and len(s.in_early) == len(s.early_heap), "early heap bookkeeping"
    assert s.queue <= s.in_ready | s.in_early, f"queued tasks on no heap: {sorted(s.queue - s.in_ready - s.in_early)}"
    for client in s.clients.values():
        assert client.in_follow == set(client.follow) and len(client.in_follow) == len(client.follow)
