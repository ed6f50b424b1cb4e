"""The coordinator's replicated state machine: task lifecycle and lineage, driven by the log.

Theory of operation
-------------------
Every coordinator replica applies the same chosen log entries, in the same
order, to its own :class:`CoordinatorMachine`.  The machine holds the user's
scheduler (a ``Coordinator`` subclass) and calls its hooks as the log
dictates (:mod:`~tasksprint.coordinator.runtime`), so the scheduler runs in
lockstep on every replica.  The machine does no I/O and reads no clock:
time arrives only in TICK entries, and randomness only from the seed in the
log's first entry.

Operations (:mod:`~tasksprint.coordinator.ops`) are parsed once, as they
enter :meth:`CoordinatorMachine.apply`: ``init`` (first; seed and scheduler
code digest), ``join``, ``done`` / ``failed`` (a task attempt's outcome),
``cancel`` and ``lost``, or a ``batch`` of reports.  A TICK carries the
leader's clock, the clients it considers expired and a ``grace`` (the
leader's client timeout); the machine marks them dead, places their running
tasks again and recomputes, from lineage, outputs that lived only on them
and are still needed, once the grace has passed without the client coming
back to offer them (or at once if it comes back without them).

After each entry the machine *settles*: it recomputes lost outputs that some
unfinished task needs, then places tasks on live clients
(:mod:`~tasksprint.coordinator.placement`).  A placed task whose input is
lost again (its holder died) moves back to its client's prefetch set, so a
recompute of that input can take the slot it held.  A prefetch-placed task
stays placed when a pretask fails and is retried or its client dies (its
input entry stays None until some attempt completes); if a pretask is
killed or fails for good, it is killed with it, as every dependent is.

Every result carries ``effects``: a digest of the actions this entry caused
(hooks called, tasks started, placed, killed, ...).  The log's applier folds
results into its running digest, so a scheduler that behaves differently on
two replicas shows up as a digest mismatch, and :attr:`CoordinatorMachine.last_hook`
names the hook that ran last.  What a worker client sends (join and its
reports) is applied in :mod:`~tasksprint.coordinator.client_ops`; what the
scheduler's hooks may call is in :mod:`~tasksprint.coordinator.actions`;
questions, liveness and snapshots in
:mod:`~tasksprint.coordinator.queries` (read models in
:mod:`~tasksprint.coordinator.views`, the snapshot format in
:mod:`~tasksprint.coordinator.snapshots`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import attrs
import structlog
from tasksprint_sdk.coordinator import Coordinator, scheduler_code_digest
from tasksprint_sdk.runtime import bind, unbind

from tasksprint import codec
from tasksprint.coordinator import snapshots, views
from tasksprint.coordinator.actions import SchedulerActions
from tasksprint.coordinator.archive import History, MemoryHistory
from tasksprint.coordinator.client_ops import ClientOps
from tasksprint.coordinator.lineage import MAX_GRACE, Lineage
from tasksprint.coordinator.ops import (
    Answer,
    BadOp,
    BatchOp,
    Cancelled,
    CancelOp,
    Commanded,
    CommandOp,
    DoneOp,
    ErrorCode,
    FailedOp,
    Initialized,
    InitOp,
    JoinOp,
    LostOp,
    WorkerChanged,
    WorkerOp,
    is_int,
)
from tasksprint.coordinator.parsing import parse_op
from tasksprint.coordinator.placement import Placement
from tasksprint.coordinator.queries import MachineQueries
from tasksprint.coordinator.runtime import Hook, HookRuntime, failure_message
from tasksprint.coordinator.snapshots import SchedulerMismatch
from tasksprint.coordinator.specs import check_plain
from tasksprint.coordinator.state import CoordinatorState, Entry, RunState, TaskState
from tasksprint.machine import ApplyContext

__all__ = ["CoordinatorMachine", "RunState", "SchedulerMismatch", "TaskState"]


@attrs.define(eq=False)
class CoordinatorMachine(ClientOps, SchedulerActions, MachineQueries):
    """The coordinator state machine (implements :class:`tasksprint.machine.StateMachine`).

    ``scheduler_cls`` is the user's ``Coordinator`` subclass; ``client_timeout``
    (seconds) is how long a client may stay silent before the leader should
    report it expired (see :meth:`expired_clients`).
    """

    _scheduler_cls: type[Coordinator]
    _client_timeout: float = attrs.field(default=10.0, kw_only=True)
    _log: Any = attrs.field(factory=lambda: structlog.get_logger("tasksprint.coordinator"), kw_only=True)
    _code_digest: str = attrs.field(init=False)
    _state: CoordinatorState = attrs.field(init=False, factory=CoordinatorState)
    _runtime: HookRuntime = attrs.field(init=False)
    _fx: Entry = attrs.field(init=False, factory=Entry)  # scratch of the entry being applied
    _placement: Placement = attrs.field(init=False)
    _lineage: Lineage = attrs.field(init=False)
    _history: History = attrs.field(factory=MemoryHistory, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self._scheduler_cls, type) and issubclass(self._scheduler_cls, Coordinator)):
            raise TypeError(f"CoordinatorMachine needs a Coordinator subclass, got {self._scheduler_cls!r}")
        if not (isinstance(self._client_timeout, (int, float)) and self._client_timeout > 0):
            raise ValueError(f"client_timeout must be a positive number of seconds, got {self._client_timeout!r}")
        self._code_digest = scheduler_code_digest(self._scheduler_cls)
        self._runtime = HookRuntime(self)
        self._placement = Placement(self._state, self._fx)
        self._lineage = Lineage(self._state, self._fx, self._placement)

    # ------------------------------------------------------------ properties

    @property
    def code_digest(self) -> str:
        """SHA-256 (hex) of this replica's scheduler source file."""
        return self._code_digest

    @property
    def client_timeout(self) -> float:
        """Seconds of silence after which a client counts as expired."""
        return self._client_timeout

    @property
    def run_state(self) -> RunState:
        return self._state.run_state

    @property
    def now(self) -> float:
        """The time of the last applied TICK (seconds, leader's clock)."""
        return self._state.now

    @property
    def state(self) -> CoordinatorState:
        """The replicated state (read it; only the machine changes it)."""
        return self._state

    @property
    def scheduler(self) -> Coordinator | None:
        """The user's scheduler object (None before the init entry)."""
        return self._state.scheduler

    def hook_running(self) -> tuple[int, dict[str, Any]] | None:
        """(call number, the hook as in :attr:`last_hook`) while a scheduler hook runs, else None.

        Read from another thread by a replica's watchdog: it looks, and changes nothing.
        """
        runtime = self._runtime
        hook = self._state.last_hook
        if not runtime.active or hook is None:
            return None
        return runtime.calls, dict(hook)

    @property
    def tasks_started(self) -> int:
        """How many tasks the scheduler has started so far."""
        return self._state.next_tid - 1

    @property
    def last_hook(self) -> dict[str, Any] | None:
        """The last hook called: ``{"hook", "tid", "cid", "slot"}``, or None."""
        return views.last_hook(self._state)

    # ------------------------------------------------------------- log input

    def apply(self, op: Any, ctx: ApplyContext) -> Answer:
        """Apply one client op (see :mod:`tasksprint.coordinator.ops`); return its answer.

        Every answer carries ``effects``, a digest of the actions taken:

        - init -> :class:`Initialized`; raises :class:`SchedulerMismatch` if
          its ``code_digest`` is not this replica's.  A second init is ignored.
        - join -> :class:`Joined`.
        - done, failed, lost -> :class:`Reported`; a done whose ``early``
          inputs were not committed from this client has ``rerun``: the task
          gets a new attempt, placed again, because it may have run on
          outputs the log never committed.
        - cancel -> :class:`Cancelled`.
        - batch -> :class:`BatchApplied`: the reports applied in order, as if
          each had its own log entry, except that placement runs once, after
          the last (one log item, one answer and one digest update for all
          the completions a client has ready).  Only the answers that are not
          :data:`ACCEPTED` are listed, with their position.

        A refused op changes nothing and gets :class:`Refused` (its code says why).
        """
        self._begin(ctx)
        result: Answer
        try:
            match parse_op(op):
                case InitOp() as init:
                    result = self._op_init(init)
                case JoinOp() as join:
                    result = self._op_join(join)
                case DoneOp() | FailedOp() | LostOp() as report:
                    result = self._op_report(report)
                case CancelOp(tid=tid):
                    result = self._op_cancel(tid)
                case BatchOp(ops=ops):
                    result = self._op_batch(ops)
                case CommandOp(body=body):
                    result = self._op_command(body)
                case WorkerOp() as worker:
                    result = self._op_worker(worker)
        except BadOp as exc:
            result = exc.refused
        self._settle()
        # mypy does not know @message classes for attrs classes.
        return attrs.evolve(result, effects=self._effects_digest())  # type: ignore[misc]

    def tick(self, now: float, data: Any, ctx: ApplyContext) -> dict[str, Any]:
        """Apply a TICK: advance time, declare ``data["expired"]`` clients dead, settle.

        Returns ``{"now": float, "dead": [cid, ...], "effects": str}``.
        """
        self._begin(ctx)
        s = self._state
        s.now = max(s.now, float(now))
        expired = data.get("expired", []) if isinstance(data, dict) else []
        wanted = sorted({cid for cid in expired if is_int(cid)}) if isinstance(expired, list) else []
        grace = data.get("grace", 0.0) if isinstance(data, dict) else 0.0
        if not (isinstance(grace, (int, float)) and not isinstance(grace, bool) and 0 <= grace <= MAX_GRACE):
            grace = 0.0
        dead: list[int] = []
        for cid in wanted:
            client = s.clients.get(cid)
            if client is not None and client.alive:
                running, holds = len(client.running), len(client.holds)
                self._log.warning("client_dead", cid=client.cid, client=client.name, running=running, holds=holds)
                self._lineage.client_died(client, float(grace))
                dead.append(cid)
        for cid in dead:
            # The default binds this cid (the hook runs now); mypy cannot type such a lambda.
            self._call_hook(Hook.CLIENT_DEAD, lambda cid=cid: self._sched().client_dead(cid), cid=cid)  # type: ignore[misc]
        self._settle()
        return {"now": s.now, "dead": dead, "effects": self._effects_digest()}

    # ------------------------------------------------------------------- ops

    def _op_init(self, op: InitOp) -> Initialized:
        s = self._state
        if s.run_state is not RunState.WAITING:
            return Initialized(ignored=True)
        if op.code_digest != self._code_digest:
            raise SchedulerMismatch(
                snapshots.mismatch_message(
                    f"{self._scheduler_cls.__qualname__}: code digest {self._code_digest[:16]}..., "
                    f"computation: {op.code_digest[:16]}..."
                )
            )
        seed = op.seed
        s.seed = seed
        s.random = random.Random(seed)
        s.run_state = RunState.RUNNING
        self._fx.effects.append(["init", seed])
        self._log.info("computation_started", seed=seed, scheduler=self._scheduler_cls.__qualname__)
        ok, sched = self._call_hook(Hook.CREATE, self._scheduler_cls)
        if not ok:
            return Initialized()
        s.scheduler = sched
        bind(sched, self._runtime)
        ok, _ = self._call_hook(Hook.INIT, lambda: sched.init(seed))
        if ok:
            self._check_snapshottable(sched)
        return Initialized()

    def _check_snapshottable(self, sched: Coordinator) -> None:
        # Here, at a log slot every replica applies alike, rather than at a
        # replica's own first snapshot, which would stop every replica.
        runtime = unbind(sched)
        try:
            why = snapshots.check_scheduler(sched, self._scheduler_cls)
        finally:
            if runtime is not None:
                bind(sched, runtime)
        if why is not None:
            slot = self._fx.slot
            self._fail_computation(
                {"kind": "snapshot", "hook": Hook.INIT.value, "tid": None, "cid": None, "slot": slot, "error": why},
                why,
            )
            # No hook runs again; dropping the object lets this state be saved.
            self._state.scheduler = None

    def _op_cancel(self, tid: int) -> Cancelled:
        if tid not in self._state.tasks:
            raise BadOp(f"cancel: unknown task {tid}", ErrorCode.UNKNOWN)
        if self._state.run_state is not RunState.RUNNING:
            return Cancelled(killed=(), reason=f"the computation is {self._state.run_state.value}")
        killed = self._lineage.kill(tid)
        if killed:
            self._tell_killed(killed)
        return Cancelled(killed=tuple(killed))

    def _tell_killed(self, killed: list[int]) -> None:
        """The scheduler's ``task_killed`` for each task a cancel killed; without one, the computation ends."""
        sched = self._sched()
        if type(sched).task_killed is Coordinator.task_killed:
            listed = ", ".join(map(str, killed[:20])) + (" ..." if len(killed) > 20 else "")
            message = (
                f"task {killed[0]} was cancelled (tasks killed: {listed}), so the computation cannot finish as "
                f"planned. Override task_killed(tid) in {self._scheduler_cls.__qualname__} to carry on without them."
            )
            info = {"kind": "cancel", "hook": None, "tid": killed[0], "cid": None, "slot": self._fx.slot}
            self._fail_computation({**info, "error": message}, message)
            return
        for tid in killed:
            self._call_hook(Hook.TASK_KILLED, lambda tid=tid: sched.task_killed(tid), tid=tid)  # type: ignore[misc]

    def _op_command(self, body: Any) -> Commanded:
        s = self._state
        if s.run_state is RunState.WAITING:
            raise BadOp("command: the computation is not initialized yet; try again", ErrorCode.NOT_INITIALIZED)
        if s.run_state is not RunState.RUNNING:
            raise BadOp(f"command: the computation is {s.run_state.value}", ErrorCode.UNKNOWN)
        sched = self._sched()
        if type(sched).command is Coordinator.command:
            raise BadOp(f"command: scheduler {self._scheduler_cls.__qualname__} takes no commands", ErrorCode.UNKNOWN)
        ok, value = self._call_hook(Hook.COMMAND, lambda: sched.command(body))
        if not ok:
            return Commanded(value=None)
        try:
            check_plain(value, "the command hook's answer")
        except TypeError as exc:
            message = f"{self._scheduler_cls.__qualname__}.command returned {exc}"
            info = {"kind": "hook", "hook": Hook.COMMAND.value, "tid": None, "cid": None, "slot": self._fx.slot}
            self._fail_computation({**info, "error": message}, message)
            return Commanded(value=None)
        return Commanded(value=value)

    def _op_worker(self, op: WorkerOp) -> WorkerChanged:
        s = self._state
        cid = s.names.get(op.client)
        if cid is None or not s.clients[cid].alive:
            raise BadOp(f"worker: no live worker named {op.client!r}", ErrorCode.UNKNOWN)
        client = s.clients[cid]
        added, removed, drained = s.worker_overrides.get(op.client, (frozenset(), frozenset(), False))
        add, remove = frozenset(op.add), frozenset(op.remove)
        added, removed = (added - remove) | add, (removed - add) | remove
        drained = drained or op.drain
        s.worker_overrides[op.client] = (added, removed, drained)
        client.tags = (client.tags | add) - remove
        if drained:
            client.slots = client.queue = 0
        self._fx.effects.append(["worker", cid, sorted(client.tags), drained])
        return WorkerChanged(cid=cid, tags=tuple(sorted(client.tags)), drained=drained)

    def attach_history(self, history: History) -> None:
        """Keep archived records in ``history`` from now on (a replica's, in its data directory)."""
        self._history = history

    # ------------------------------------------------------------ mechanics

    def _begin(self, ctx: ApplyContext) -> None:
        self._fx.effects = []
        self._fx.slot = ctx.slot
        self._fx.session = ctx.client_id

    def _effects_digest(self) -> str:
        return hashlib.sha256(codec.encode(self._fx.effects)).hexdigest()[:32]

    def _sched(self) -> Coordinator:
        assert self._state.scheduler is not None
        return self._state.scheduler

    def _call_hook(
        self, hook: Hook, fn: Callable[[], Any], *, tid: int | None = None, cid: int | None = None
    ) -> tuple[bool, Any]:
        """Run one scheduler hook; return (succeeded, its return value).

        Hooks run only while the computation runs.  A hook that raises fails
        the computation with a report; the machine itself stays consistent
        because hooks are only called between complete state transitions.
        """
        s = self._state
        if s.run_state is not RunState.RUNNING:
            return False, None
        slot = self._fx.slot
        s.last_hook = {"hook": hook.value, "tid": tid, "cid": cid, "slot": slot}
        self._fx.effects.append(["hook", hook.value, tid, cid])
        try:
            return True, self._runtime.call(fn)
        except BaseException as exc:
            # Anything the user's code raises, SystemExit and GeneratorExit
            # included, fails the computation; only an interrupt of this
            # process (Ctrl-C) goes on up.
            if isinstance(exc, KeyboardInterrupt):
                raise
            message = failure_message(self._scheduler_cls, hook, exc, seed=s.seed, tid=tid, cid=cid, slot=slot)
            self._log.error("scheduler_hook_failed", hook=hook.value, tid=tid, cid=cid, slot=slot, exc_info=exc)
            error = f"{type(exc).__name__}: {exc}"
            self._fail_computation(
                {"kind": "hook", "hook": hook.value, "tid": tid, "cid": cid, "slot": slot, "error": error}, message
            )
            return False, None

    def _fail_computation(self, info: dict[str, Any], message: str) -> None:
        s = self._state
        s.failure = {**info, "message": message}
        s.run_state = RunState.FAILED
        self._fx.effects.append(["computation_failed", info["kind"], info["hook"], info["tid"], info["slot"]])
        self._log.error("computation_failed", message=message)

    # -------------------------------------------------------------- settling

    def _settle(self) -> None:
        s = self._state
        if s.run_state is not RunState.RUNNING:
            s.recheck.clear()
            s.release_check.clear()
            return
        self._lineage.end_wait()
        recomputes = self._lineage.recompute_lost()
        if recomputes:
            self._log.info("recompute_started", tasks=recomputes)
        self._lineage.release_consumed()
        self._placement.place()

    # ------------------------------------------------------------- snapshots

    def snapshot(self) -> bytes:
        """The whole state, including the user's scheduler object, as bytes."""
        # What the state no longer holds must be on disk before a snapshot says so.
        self._history.sync()
        sched = self._state.scheduler
        # The runtime points back at this machine; the restoring machine binds its own.
        runtime = unbind(sched) if sched is not None else None
        try:
            return snapshots.dump(self._state, self._scheduler_cls, self._code_digest)
        finally:
            if runtime is not None:
                bind(sched, runtime)

    def restore(self, data: bytes) -> None:
        """Replace the state with a :meth:`snapshot`.

        Raises :class:`SchedulerMismatch` if the snapshot was taken with
        different scheduler code, ``ValueError`` if it is not a snapshot.
        """
        self._state = snapshots.load(data, self._scheduler_cls, self._code_digest)
        self._runtime = HookRuntime(self)
        self._placement = Placement(self._state, self._fx)
        self._lineage = Lineage(self._state, self._fx, self._placement)
        if self._state.scheduler is not None:
            bind(self._state.scheduler, self._runtime)
