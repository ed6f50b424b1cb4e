"""The coordinator's replicated state machine: tasks, clients, placement, the user's hooks.

Theory of operation
-------------------
Every coordinator replica applies the same chosen log entries, in the same
order, to its own :class:`CoordinatorMachine`.  The machine holds the user's
scheduler (a ``Coordinator`` subclass) and calls its hooks as the log
dictates, so the scheduler runs in lockstep on every replica.  The machine
does no I/O and reads no clock: time arrives only in TICK entries, and
randomness only from the seed in the log's first entry.

Log ops are plain dicts (see :meth:`CoordinatorMachine.apply`): ``init``
(first; seed and scheduler code digest), ``join`` (a client with its data
address, slots and tags), ``done`` / ``failed`` (a task attempt's outcome),
``cancel`` (kill from the command line) and ``lost`` (a client could not
fetch an input).  A TICK carries the leader's clock and the clients it
considers expired; the machine marks them dead, places their running tasks
again and recomputes, from lineage, outputs that lived only on them and are
still needed.

After each entry the machine *settles*: it recomputes lost outputs that some
unfinished task needs, then places tasks on live clients.

Placement
~~~~~~~~~
A task is *ready* when the outputs of all its pretasks are held by live
clients; it is placed on a client with room: fewer than ``slots + queue``
ready tasks placed there, where ``queue`` is what the client asked for
beyond its slots (0 unless it said so at join; the extra tasks wait in its
node pool, so its nodes never idle for a report round trip).  A task is
*prefetchable* when at least one of its inputs is available and none of its
pretasks is waiting to be placed (each is running somewhere or done with
its outputs held): it may be placed early, into the client's *prefetch
allowance* of ``slots + queue`` tasks on top of its running ones (early
placement stops while ``slots + queue`` tasks wait for inputs there or
``2 * (slots + queue)`` are placed there in all), so the client fetches
each input as its pretask completes (rolling prefetch) while the other
pretasks still run, and starts the task on a node once the last input is
in.  A task none of whose inputs is available yet, whose pretasks all run
on one client with a queue, *follows* them there, in the same allowance:
that client will hold every input and may start it as soon as its own
nodes made them (see ``early`` in :meth:`CoordinatorMachine.apply`).
Prefetch is never needed for progress: an early
placement takes no slot and its pretasks already hold or need only normal
slots, so a computation with few slots cannot deadlock on it.  Either way
placement honours ``require`` tags, prefers ``want`` tags, then the client
already holding most bytes of the task's inputs available so far, then the
least loaded client (by tasks placed on it, prefetching ones included),
then the lowest client id.  First one copy of every placeable task is
placed, in task order, then the extra copies of replicated tasks.  Waiting
tasks sit in heaps (ready, early, and each client's followers), taken from
only while a client has room for them, so a completion costs O(log n)
however many tasks wait.

How a placed task counts: it takes one of its client's ``slots`` exactly
while all its inputs are available, and otherwise sits in the client's
``prefetch`` set.  So an early-placed task moves to the slots when its last
input becomes available, even if that puts the client over its ``slots``
(the client then runs it on the next free node, and no new task is placed
there until it is under its slots again); the count never lies about what
the client's nodes have to run.  A placed task whose input is lost again
(its holder died) moves back to the prefetch set, so a recompute of that
input can take the slot it held.  A prefetch-placed task stays placed when
a pretask fails and is retried or its client dies (its input entry stays
None until some attempt completes); if a pretask is killed or fails for
good, it is killed with it, as every dependent is.

Everything is iterated in sorted or log order, never in set order, so every
replica places alike.

Every result carries ``effects``: a digest of the actions this entry caused
(hooks called, tasks started, placed, killed, ...).  The log's applier folds
results into its running digest, so a scheduler that behaves differently on
two replicas shows up as a digest mismatch, and :attr:`last_hook` names the
hook that ran last.

Clients learn their work through :meth:`CoordinatorMachine.view`: each
client keeps a per-task change version, and one per input whose holder
changed, each ordered by version, so a view after version V touches only
what changed for that client since V: a task is listed once per
assignment, later moves of its inputs as holder changes.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hashlib
import heapq
import io
import os
import pickle
import random
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import structlog

from tasksprint import codec
from tasksprint.machine import ApplyContext, StopReplica
from tasksprint_sdk.coordinator import _RUNTIME_ATTR, Coordinator, SchedulerUsageError, scheduler_code_digest

__all__ = ["CoordinatorMachine", "SchedulerMismatch", "TaskState", "RunState"]

_SNAPSHOT_FORMAT = 3  # 2: clients carry their prefetch sets; 3: placement heaps, client queues
_SCHEDULER_CLASS_PID = "scheduler-class"


class SchedulerMismatch(StopReplica):
    """This replica's scheduler code differs from the code the computation started with."""


class TaskState(enum.Enum):
    PENDING = "pending"  # waiting for inputs or for a free slot
    RUNNING = "running"  # at least one copy placed on a client (maybe still fetching its inputs)
    DONE = "done"
    FAILED = "failed"  # failed on its last allowed attempt
    KILLED = "killed"


_ACTIVE = (TaskState.PENDING, TaskState.RUNNING)
_ACCEPTED = {"ok": True, "accepted": True, "reason": None}


class RunState(enum.Enum):
    WAITING = "waiting"  # no init entry applied yet
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class Hook(enum.Enum):
    CREATE = "__init__"
    INIT = "init"
    CLIENT_JOINED = "client_joined"
    CLIENT_DEAD = "client_dead"
    TASK_DONE = "task_done"
    TASK_FAILED = "task_failed"


class _BadOp(Exception):
    """A malformed op: answered with an error result, nothing changed."""


@attrs.define(eq=False)
class _Task:
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
    # Index into ``pretasks`` where _prefetchable last found one waiting to be
    # placed; the next check starts there (a cache: it changes no decision).
    blocker: int = 0
    reported: bool = False  # task_done was called (a lineage recompute does not call it again)


@attrs.define(eq=False)
class _Client:
    cid: int
    name: str
    addr: str
    slots: int
    tags: frozenset[str]
    alive: bool = True
    running: dict[int, None] = attrs.Factory(dict)  # tids placed here (ordered set)
    # The tids in ``running`` that are missing an input (placed early, or an
    # input was lost): they do not count against ``slots``.  Early placement
    # adds tasks here while it holds fewer than ``slots`` (see _early_room).
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


@attrs.define(eq=False)
class _State:
    """Everything a snapshot carries."""

    run_state: RunState = RunState.WAITING
    seed: int | None = None
    random: random.Random | None = None
    now: float = 0.0
    scheduler: Coordinator | None = None
    tasks: dict[int, _Task] = attrs.Factory(dict)
    clients: dict[int, _Client] = attrs.Factory(dict)
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
    counts: dict[TaskState, int] = attrs.Factory(lambda: {s: 0 for s in TaskState})
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    last_hook: dict[str, Any] | None = None


@attrs.define(eq=False)
class _Runtime:
    """What a scheduler's actions call; bound to the scheduler as ``_tasksprint_runtime``."""

    _machine: CoordinatorMachine
    _active: bool = False

    def check_usable(self, what: str) -> None:
        """Raise :class:`SchedulerUsageError` if action ``what`` cannot run now."""
        if what in ("random", "now"):
            return
        if not self._active:
            raise SchedulerUsageError(
                f"{what}() can only be called while a hook (init, client_joined, client_dead, task_done, "
                f"task_failed) runs: the coordinator must see the same actions on every replica"
            )
        if self._machine._state.run_state is not RunState.RUNNING:
            raise SchedulerUsageError(f"{what}() called after finish(): the computation is already finished")

    @contextlib.contextmanager
    def active(self) -> Any:
        self._active = True
        try:
            yield
        finally:
            self._active = False

    @property
    def random(self) -> random.Random:
        rng = self._machine._state.random
        assert rng is not None, "the scheduler is bound only after init"
        return rng

    @property
    def now(self) -> float:
        return self._machine._state.now

    def start_task(self, **kwargs: Any) -> int:
        return self._machine._start_task(**kwargs)

    def kill_task(self, tid: int) -> list[int]:
        return self._machine._kill_task_action(tid)

    def finish(self, taskids: Any, values: Any) -> None:
        self._machine._finish(taskids, values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get_int(op: Mapping[str, Any], key: str, *, minimum: int | None = None) -> int:
    v = op.get(key)
    if not _is_int(v) or (minimum is not None and v < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise _BadOp(f"{op.get('op')}: field {key!r} must be an int{bound}, got {v!r}")
    return v


def _get_str(op: Mapping[str, Any], key: str) -> str:
    v = op.get(key)
    if not isinstance(v, str):
        raise _BadOp(f"{op.get('op')}: field {key!r} must be a string, got {v!r}")
    return v


def _task_seed(seed: int, tid: int) -> int:
    # Independent of the attempt and of the client, so every copy and every
    # retry of a task draws the same numbers.  48 bits: nodes in languages
    # whose JSON numbers are doubles read it exactly.
    return int.from_bytes(hashlib.sha256(f"tasksprint-task-seed:{seed}:{tid}".encode()).digest()[:6], "big")


_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, what: str) -> None:
    # Fast path (start_task runs on every replica for every task): a flat
    # list or str-keyed dict of scalars is plain data.
    if type(value) is list:
        if all(type(v) in _SCALARS for v in value):
            return
    elif type(value) is dict:
        if all(type(k) is str and type(v) in _SCALARS for k, v in value.items()):
            return
    try:
        _no_sets(value)
        codec.encode(value)
    except Exception as exc:
        raise TypeError(
            f"{what} must be plain data (None, bool, int, float, str, bytes, and lists/dicts of them) "
            f"so every replica and node sees the same value: {exc}"
        ) from None


def _no_sets(value: Any) -> None:
    """Refuse sets anywhere inside ``value``: nodes get JSON, which has none."""
    if isinstance(value, (set, frozenset)):
        raise TypeError("a set is not plain data; pass a sorted list")
    if isinstance(value, (list, tuple)):
        for v in value:
            _no_sets(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_sets(k)
            _no_sets(v)


def _tags(value: Any, what: str) -> list[str]:
    if type(value) is tuple and not value:  # the default: no tags
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"start_task({what}=...) must be a list of tag strings, e.g. {what}=['gpu'], got {value!r}")
    tags = list(value)
    for t in tags:
        if not isinstance(t, str):
            raise TypeError(f"start_task({what}=...) tags must be strings, got {t!r}")
    # Sorted so a set passed by the user (whose order differs between
    # processes) still gives the same task on every replica.
    return sorted(set(tags))


class _SnapshotPickler(pickle.Pickler):
    # The scheduler class is saved by reference to "the scheduler class", not
    # by module name: the module it was imported under differs between a
    # replica run as ``python scheduler.py`` and one that loaded the file.
    def __init__(self, file: io.BytesIO, scheduler_cls: type) -> None:
        super().__init__(file, protocol=5)
        self._scheduler_cls = scheduler_cls

    def persistent_id(self, obj: Any) -> Any:
        if obj is self._scheduler_cls:
            return _SCHEDULER_CLASS_PID
        return None


class _SnapshotUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, scheduler_cls: type, saved_module: str) -> None:
        super().__init__(file)
        self._scheduler_cls = scheduler_cls
        self._saved_module = saved_module

    def persistent_load(self, pid: Any) -> Any:
        if pid == _SCHEDULER_CLASS_PID:
            return self._scheduler_cls
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a coordinator snapshot")

    def find_class(self, module: str, name: str) -> Any:
        # Other classes from the user's scheduler file: look them up in the
        # module this replica loaded the file as.
        if module == self._saved_module and module != "builtins":
            obj: Any = sys.modules[self._scheduler_cls.__module__]
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        return super().find_class(module, name)


@attrs.define(eq=False)
class CoordinatorMachine:
    """The coordinator state machine (implements :class:`tasksprint.machine.StateMachine`).

    ``scheduler_cls`` is the user's ``Coordinator`` subclass; ``client_timeout``
    (seconds) is how long a client may stay silent before the leader should
    report it expired (see :meth:`expired_clients`).
    """

    _scheduler_cls: type[Coordinator]
    _client_timeout: float = attrs.field(default=10.0, kw_only=True)
    _log: Any = attrs.field(factory=lambda: structlog.get_logger("tasksprint.coordinator"), kw_only=True)
    _code_digest: str = attrs.field(init=False)
    _state: _State = attrs.field(init=False, factory=_State)
    _runtime: _Runtime = attrs.field(init=False)
    # Per-entry scratch, reset before each apply/tick.
    _effects: list[list[Any]] = attrs.field(init=False, factory=list)
    _slot: int = attrs.field(init=False, default=0)
    _woken: bool = attrs.field(init=False, default=False)  # _place: a placement queued dependents

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self._scheduler_cls, type) and issubclass(self._scheduler_cls, Coordinator)):
            raise TypeError(f"CoordinatorMachine needs a Coordinator subclass, got {self._scheduler_cls!r}")
        if not (isinstance(self._client_timeout, (int, float)) and self._client_timeout > 0):
            raise ValueError(f"client_timeout must be a positive number of seconds, got {self._client_timeout!r}")
        self._code_digest = scheduler_code_digest(self._scheduler_cls)
        self._runtime = _Runtime(self)

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
    def scheduler(self) -> Coordinator | None:
        """The user's scheduler object (None before the init entry)."""
        return self._state.scheduler

    @property
    def last_hook(self) -> dict[str, Any] | None:
        """The last hook called: ``{"hook", "tid", "cid", "slot"}``, or None."""
        return None if self._state.last_hook is None else dict(self._state.last_hook)

    # ------------------------------------------------------------- log input

    def apply(self, op: Any, ctx: ApplyContext) -> dict[str, Any]:
        """Apply one client op (a dict with an ``"op"`` field); return its result.

        Ops and their results (every result also has ``"effects"``, a digest
        of the actions taken):

        - ``{"op": "init", "seed": int, "code_digest": str}`` -> ``{"ok": True}``;
          raises :class:`SchedulerMismatch` if ``code_digest`` is not this
          replica's.  A second init is ignored.
        - ``{"op": "join", "client": name, "addr": "host:port", "slots": int,
          "have": [tag, ...]}`` -> ``{"ok": True, "cid": int}``.
        - ``{"op": "done", "cid", "tid", "attempt", "values": {key: value},
          "sizes": {key: nbytes}}`` -> ``{"ok": True, "accepted": bool, "reason": str | None}``.
        - ``{"op": "failed", "cid", "tid", "attempt", "error": str}`` -> same shape.
        - ``{"op": "cancel", "tid"}`` -> ``{"ok": True, "killed": [tid, ...]}``.
        - ``{"op": "lost", "cid", "tid", "key"}`` -> ``{"ok": True, "accepted": bool, "reason": ...}``.
        - ``{"op": "batch", "ops": [op, ...]}`` where each op is a ``done``,
          ``failed`` or ``lost`` -> ``{"ok": True, "count": int, "others":
          [[index, result], ...]}``: the ops applied in order, as if each had
          its own log entry, except that placement runs once, after the last
          (one log item, one answer and one digest update for all the
          completions a client has ready).  ``others`` has the results that
          are not ``{"ok": True, "accepted": True, "reason": None}``, with
          their position in ``ops``.  A malformed op in the batch gets its
          ``{"ok": False, "error"}`` result; the others still apply.

        A ``done`` may carry ``"early": [[pretask tid, attempt], ...]``: the
        inputs the client took from its own object store as soon as its own
        node made them, before the log said so.  It is accepted only if each
        of those pretasks' committed completion is that attempt on this
        client; otherwise the result has ``"rerun": True`` and the task gets
        a new attempt, placed again, because it may have run on outputs the
        log never committed.

        A malformed op changes nothing and gets ``{"ok": False, "error": str}``.
        """
        self._begin(ctx)
        try:
            match op:
                case {"op": "init"}:
                    result = self._op_init(op)
                case {"op": "join"}:
                    result = self._op_join(op)
                case {"op": "done" | "failed" | "lost"}:
                    result = self._op_report(op)
                case {"op": "cancel"}:
                    result = self._op_cancel(op)
                case {"op": "batch"}:
                    result = self._op_batch(op)
                case _:
                    raise _BadOp(f"unknown coordinator op {op!r:.200}")
        except _BadOp as exc:
            result = {"ok": False, "error": str(exc)}
        self._settle()
        result["effects"] = self._effects_digest()
        return result

    def _op_report(self, op: Mapping[str, Any]) -> dict[str, Any]:
        match op["op"]:
            case "done":
                return self._op_done(op)
            case "failed":
                return self._op_failed(op)
            case _:
                return self._op_lost(op)

    def _op_batch(self, op: Mapping[str, Any]) -> dict[str, Any]:
        ops = op.get("ops")
        if not isinstance(ops, list):
            raise _BadOp(f"batch: field 'ops' must be a list of done/failed/lost ops, got {ops!r:.200}")
        # Only the results that say something beyond "accepted": every
        # replica hashes and keeps them, the client mostly needs none.
        others = []
        for i, sub in enumerate(ops):
            try:
                if not isinstance(sub, dict) or sub.get("op") not in ("done", "failed", "lost"):
                    raise _BadOp(f"batch: only done, failed and lost ops can be batched, got {sub!r:.200}")
                result = self._op_report(sub)
            except _BadOp as exc:
                result = {"ok": False, "error": str(exc)}
            if result != _ACCEPTED:
                others.append([i, result])
        return {"ok": True, "count": len(ops), "others": others}

    def tick(self, now: float, data: Any, ctx: ApplyContext) -> dict[str, Any]:
        """Apply a TICK: advance time, declare ``data["expired"]`` clients dead, settle.

        Returns ``{"now": float, "dead": [cid, ...], "effects": str}``.
        """
        self._begin(ctx)
        s = self._state
        s.now = max(s.now, float(now))
        expired = data.get("expired", []) if isinstance(data, dict) else []
        wanted = sorted({cid for cid in expired if _is_int(cid)}) if isinstance(expired, list) else []
        dead: list[int] = []
        for cid in wanted:
            client = s.clients.get(cid)
            if client is not None and client.alive:
                self._client_died(client)
                dead.append(cid)
        for cid in dead:
            self._call_hook(Hook.CLIENT_DEAD, lambda cid=cid: self._sched().client_dead(cid), cid=cid)
        self._settle()
        return {"now": s.now, "dead": dead, "effects": self._effects_digest()}

    # ------------------------------------------------------------------- ops

    def _op_init(self, op: Mapping[str, Any]) -> dict[str, Any]:
        s = self._state
        if s.run_state is not RunState.WAITING:
            return {"ok": True, "ignored": "the computation is already initialized"}
        seed = _get_int(op, "seed")
        digest = _get_str(op, "code_digest")
        if digest != self._code_digest:
            raise SchedulerMismatch(
                f"this replica runs different scheduler code than the one the computation started with "
                f"({self._scheduler_cls.__qualname__}: code digest {self._code_digest[:16]}..., "
                f"computation: {digest[:16]}...); start every replica with the same scheduler file"
            )
        s.seed = seed
        s.random = random.Random(seed)
        s.run_state = RunState.RUNNING
        self._effects.append(["init", seed])
        self._log.info("computation_started", seed=seed, scheduler=self._scheduler_cls.__qualname__)
        ok, sched = self._call_hook(Hook.CREATE, self._scheduler_cls)
        if not ok:
            return {"ok": True}
        s.scheduler = sched
        self._bind(sched)
        self._call_hook(Hook.INIT, lambda: sched.init(seed))
        return {"ok": True}

    def _op_join(self, op: Mapping[str, Any]) -> dict[str, Any]:
        s = self._state
        name = _get_str(op, "client")
        addr = _get_str(op, "addr")
        slots = _get_int(op, "slots", minimum=0)
        queue = _get_int(op, "queue", minimum=0) if "queue" in op else 0
        have = op.get("have", [])
        if not isinstance(have, list) or not all(isinstance(t, str) for t in have):
            raise _BadOp(f"join: field 'have' must be a list of tag strings, got {have!r:.200}")
        if s.run_state is RunState.WAITING:
            raise _BadOp("join: the computation is not initialized yet; try again")
        cid = s.names.get(name)
        if cid is not None and s.clients[cid].alive:
            client = s.clients[cid]
            moved = client.addr != addr
            client.addr, client.slots, client.tags, client.queue = addr, slots, frozenset(have), queue
            self._effects.append(["rejoin", cid])
            if moved:
                # Tasks reading outputs held here must learn the new address.
                for tid in list(client.holds):
                    self._bump_dependents(s.tasks[tid])
            return {"ok": True, "cid": cid}
        cid = s.next_cid
        s.next_cid += 1
        s.clients[cid] = _Client(cid=cid, name=name, addr=addr, slots=slots, tags=frozenset(have), queue=queue)
        s.names[name] = cid
        s.live[cid] = None
        self._effects.append(["join", cid])
        self._log.info("client_joined", cid=cid, client=name, addr=addr, slots=slots, queue=queue)
        self._call_hook(Hook.CLIENT_JOINED, lambda: self._sched().client_joined(cid), cid=cid)
        return {"ok": True, "cid": cid}

    def _report_target(self, op: Mapping[str, Any]) -> tuple[_Client, _Task, int]:
        s = self._state
        cid = _get_int(op, "cid")
        tid = _get_int(op, "tid")
        attempt = _get_int(op, "attempt")
        client = s.clients.get(cid)
        if client is None:
            raise _BadOp(f"{op['op']}: unknown client {cid}")
        task = s.tasks.get(tid)
        if task is None:
            raise _BadOp(f"{op['op']}: unknown task {tid}")
        return client, task, attempt

    def _stale_reason(self, client: _Client, task: _Task, attempt: int) -> str | None:
        if self._state.run_state is not RunState.RUNNING:
            return f"the computation is {self._state.run_state.value}"
        if not client.alive:
            return f"client {client.cid} was declared dead; join again"
        if task.state is not TaskState.RUNNING:
            return f"task {task.tid} is {task.state.value}"
        if attempt != task.attempt or client.cid not in task.copies:
            return f"stale attempt {attempt} of task {task.tid} (current attempt {task.attempt})"
        return None

    def _op_done(self, op: Mapping[str, Any]) -> dict[str, Any]:
        s = self._state
        client, task, attempt = self._report_target(op)
        values = op.get("values", {})
        sizes = op.get("sizes", {})
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise _BadOp(f"done: field 'values' must be a dict with string keys, got {values!r:.200}")
        if not isinstance(sizes, dict) or not all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in sizes.items()
        ):
            raise _BadOp(f"done: field 'sizes' must map output keys to byte counts, got {sizes!r:.200}")
        early = op.get("early", [])
        if not isinstance(early, list) or not all(
            isinstance(e, list) and len(e) == 2 and _is_int(e[0]) and _is_int(e[1]) and e[0] in task.pretasks
            for e in early
        ):
            raise _BadOp(f"done: field 'early' must list [pretask tid, attempt] pairs of this task, got {early!r:.200}")
        reason = self._stale_reason(client, task, attempt)
        if reason is not None:
            # The client has reported on it, so it needs no kill order for it.
            if task.tid not in client.running:
                client.entries.pop(task.tid, None)
            return {"ok": True, "accepted": False, "reason": reason}
        for ptid, pattempt in early:
            pre = s.tasks[ptid]
            if pre.holder != client.cid or pre.attempt != pattempt:
                # The client ran it on an output of its own that the log did
                # not commit (another copy's or attempt's won, or none did):
                # this completion cannot count; run the task again.
                self._void_copy(client, task)
                return {
                    "ok": True,
                    "accepted": False,
                    "rerun": True,
                    "reason": f"input from task {ptid} attempt {pattempt} on client {client.cid} was not committed",
                }
        for other in task.copies:
            if other != client.cid:
                self._unassign(s.clients[other], task.tid, tell=True)
        self._unassign(client, task.tid, tell=False)
        task.copies = []
        s.queue.discard(task.tid)
        task.holder = client.cid
        client.holds[task.tid] = None
        task.sizes = dict(sizes)
        self._set_state(task, TaskState.DONE)
        self._effects.append(["done", task.tid, client.cid])
        self._outputs_changed(task, available=True)
        if not task.reported:
            task.reported = True
            task.values = {k: values[k] for k in task.keys if k in values}
            tid, given = task.tid, dict(task.values)
            self._call_hook(Hook.TASK_DONE, lambda: self._sched().task_done(tid, given), tid=tid)
        return {"ok": True, "accepted": True, "reason": None}

    def _op_failed(self, op: Mapping[str, Any]) -> dict[str, Any]:
        client, task, attempt = self._report_target(op)
        error = _get_str(op, "error")
        reason = self._stale_reason(client, task, attempt)
        if reason is not None:
            if task.tid not in client.running:
                client.entries.pop(task.tid, None)
            return {"ok": True, "accepted": False, "reason": reason}
        self._unassign(client, task.tid, tell=False)
        task.copies.remove(client.cid)
        task.error = error
        self._effects.append(["copy_failed", task.tid, client.cid])
        if task.copies:
            # Other copies of this attempt still run; one of them may succeed.
            self._enqueue(task.tid)
            return {"ok": True, "accepted": True, "reason": None}
        self._attempt_failed(task, error)
        return {"ok": True, "accepted": True, "reason": None}

    def _void_copy(self, client: _Client, task: _Task) -> None:
        """Forget ``client``'s copy of ``task``'s attempt; a new attempt if it was the last copy."""
        self._unassign(client, task.tid, tell=False)
        task.copies.remove(client.cid)
        self._effects.append(["void", task.tid, task.attempt, client.cid])
        if task.copies:
            self._enqueue(task.tid)
        else:
            task.attempt += 1
            self._set_state(task, TaskState.PENDING)
            self._maybe_queue(task)

    def _op_cancel(self, op: Mapping[str, Any]) -> dict[str, Any]:
        tid = _get_int(op, "tid")
        if tid not in self._state.tasks:
            raise _BadOp(f"cancel: unknown task {tid}")
        if self._state.run_state is not RunState.RUNNING:
            return {"ok": True, "killed": [], "reason": f"the computation is {self._state.run_state.value}"}
        return {"ok": True, "killed": self._kill(tid)}

    def _op_lost(self, op: Mapping[str, Any]) -> dict[str, Any]:
        s = self._state
        cid = _get_int(op, "cid")
        tid = _get_int(op, "tid")
        client = s.clients.get(cid)
        task = s.tasks.get(tid)
        if client is None or task is None:
            raise _BadOp(f"lost: unknown client {cid} or task {tid}")
        if s.run_state is not RunState.RUNNING or not client.alive:
            return {"ok": True, "accepted": False, "reason": "reporter is dead or the computation is over"}
        if task.state is not TaskState.DONE or task.holder is None:
            return {"ok": True, "accepted": False, "reason": f"task {tid} has no outputs on record"}
        self._lose_outputs(task)
        return {"ok": True, "accepted": True, "reason": None}

    # --------------------------------------------------------------- actions

    def _start_task(
        self,
        *,
        name: Any,
        args: Any,
        kwargs: Any,
        pretasks: Any,
        prekeys: Any,
        keys: Any,
        require: Any,
        want: Any,
        replicas: Any,
        retries: Any,
        timeout: Any,
    ) -> int:
        s = self._state
        assert s.seed is not None
        if not isinstance(name, str) or not name:
            raise TypeError(f"start_task(name=...) must be the node method's name, a non-empty string, got {name!r}")
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"start_task(args=...) must be a list or tuple, got {type(args).__name__}")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError(f"start_task(kwargs=...) must be a dict with string keys, got {kwargs!r}")
        _check_plain(list(args), "start_task(args=...)")
        _check_plain(kwargs, "start_task(kwargs=...)")
        if not isinstance(pretasks, (list, tuple)):
            raise TypeError(
                f"start_task(pretasks=...) must be a list or tuple of task ids (a set's order differs "
                f"between replicas), got {type(pretasks).__name__}"
            )
        for p in pretasks:
            if not _is_int(p) or p not in s.tasks:
                raise ValueError(f"start_task(pretasks=...): {p!r} is not the id of a started task")
            if s.tasks[p].state in (TaskState.FAILED, TaskState.KILLED):
                raise ValueError(
                    f"start_task(pretasks=...): task {p} is {s.tasks[p].state.value} and will never produce outputs"
                )
        if prekeys is None:
            prekeys = [None] * len(pretasks)
        if not isinstance(prekeys, (list, tuple)) or len(prekeys) != len(pretasks):
            raise ValueError(
                f"start_task(prekeys=...) must be a list with one output key per pretask "
                f"({len(pretasks)} pretasks), got {prekeys!r}"
            )
        if not all(k is None or isinstance(k, str) for k in prekeys):
            raise TypeError(f"start_task(prekeys=...) entries must be output key strings or None, got {prekeys!r}")
        keys = [] if keys is None else keys
        if isinstance(keys, str) or not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"start_task(keys=...) must be a list of output key strings, got {keys!r}")
        require_tags = _tags(require, "require")
        want_tags = _tags(want, "want")
        if not _is_int(replicas) or replicas < 1:
            raise ValueError(f"start_task(replicas=...) must be an int >= 1, got {replicas!r}")
        if not _is_int(retries) or retries < 0:
            raise ValueError(f"start_task(retries=...) must be an int >= 0, got {retries!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"start_task(timeout=...) must be None or a positive number of seconds, got {timeout!r}")

        tid = s.next_tid
        s.next_tid += 1
        task = _Task(
            tid=tid,
            name=name,
            args=list(args),
            kwargs=dict(kwargs),
            pretasks=tuple(pretasks),
            prekeys=tuple(prekeys),
            keys=tuple(dict.fromkeys(keys)),
            require=frozenset(require_tags),
            want=tuple(want_tags),
            replicas=replicas,
            retries=retries,
            timeout=None if timeout is None else float(timeout),
            seed=_task_seed(s.seed, tid),
        )
        s.tasks[tid] = task
        s.counts[TaskState.PENDING] += 1
        for p in task.pretasks:
            pre = s.tasks[p]
            pre.dependents.append(tid)
            if pre.holder is None:
                task.missing += 1
                if pre.state is TaskState.DONE:
                    s.recheck.add(p)  # a lost output is needed again
        self._maybe_queue(task)
        # The whole spec, so replicas whose schedulers started different
        # tasks (not just a different number of them) disagree on the digest.
        self._effects.append(
            ["start", tid, name, task.args, task.kwargs, list(task.pretasks), list(task.prekeys), list(task.keys),
             sorted(task.require), list(task.want), replicas, retries, task.timeout]
        )
        return tid

    def _kill_task_action(self, tid: Any) -> list[int]:
        if not _is_int(tid) or tid not in self._state.tasks:
            raise ValueError(f"kill_task({tid!r}): there is no task with that id")
        return self._kill(tid)

    def _finish(self, taskids: Any, values: Any) -> None:
        s = self._state
        taskids = [] if taskids is None else taskids
        if not isinstance(taskids, (list, tuple)):
            raise TypeError(f"finish(taskids=...) must be a list of task ids, got {taskids!r}")
        for tid in taskids:
            if not _is_int(tid) or tid not in s.tasks:
                raise ValueError(f"finish(taskids=...): {tid!r} is not a task id")
            if not s.tasks[tid].reported:
                raise ValueError(f"finish(taskids=...): task {tid} is not done, so it has no values yet")
        _check_plain(values, "finish(values=...)")
        s.result = {"values": values, "tasks": [{"tid": tid, "values": s.tasks[tid].values} for tid in taskids]}
        s.run_state = RunState.FINISHED
        self._effects.append(["finish", list(taskids), values])
        self._log.info("computation_finished", tasks=list(taskids))

    # ------------------------------------------------------------ mechanics

    def _begin(self, ctx: ApplyContext) -> None:
        self._effects = []
        self._slot = ctx.slot

    def _effects_digest(self) -> str:
        return hashlib.sha256(codec.encode(self._effects)).hexdigest()[:32]

    def _sched(self) -> Coordinator:
        assert self._state.scheduler is not None
        return self._state.scheduler

    def _bind(self, sched: Coordinator) -> None:
        vars(sched)[_RUNTIME_ATTR] = self._runtime

    def _set_state(self, task: _Task, state: TaskState) -> None:
        counts = self._state.counts
        counts[task.state] -= 1
        counts[state] += 1
        task.state = state

    def _bump(self, client: _Client, tid: int) -> None:
        s = self._state
        s.version += 1
        # Re-inserted so ``entries`` stays ordered by version.
        client.entries.pop(tid, None)
        client.entries[tid] = s.version
        client.last_change = s.version

    def _assign(self, task: _Task, client: _Client) -> None:
        s = self._state
        task.copies.append(client.cid)
        client.running[task.tid] = None
        if task.missing:
            client.prefetch[task.tid] = None
        self._bump(client, task.tid)
        self._effects.append(["prefetch" if task.missing else "place", task.tid, task.attempt, client.cid])
        if task.state is TaskState.PENDING:
            self._set_state(task, TaskState.RUNNING)
            # No longer waiting for placement: its dependents may prefetch.
            for d in dict.fromkeys(task.dependents):
                dep = s.tasks[d]
                if dep.tid not in s.queue and dep.missing and self._maybe_queue(dep):
                    self._woken = True

    def _unassign(self, client: _Client, tid: int, *, tell: bool) -> None:
        """Take ``tid`` off ``client``; ``tell`` leaves a kill order in its view."""
        client.running.pop(tid, None)
        client.prefetch.pop(tid, None)
        if tell:
            self._bump(client, tid)
        else:
            client.entries.pop(tid, None)

    def _bump_dependents(self, task: _Task) -> None:
        # Running dependents read this task's outputs: their clients' views
        # must show the new holder (or that there is none for now).  The
        # view carries it as a holder change, not by listing every dependent
        # again with all its inputs (a reduce over n maps would cost O(n) per
        # map completion, O(n^2) in all).
        s = self._state
        told: set[int] = set()
        for d in dict.fromkeys(task.dependents):
            dep = s.tasks[d]
            if dep.state is TaskState.RUNNING:
                for cid in dep.copies:
                    if cid not in told:
                        told.add(cid)
                        self._bump_holder(s.clients[cid], task.tid)

    def _bump_holder(self, client: _Client, tid: int) -> None:
        s = self._state
        s.version += 1
        client.holders.pop(tid, None)
        client.holders[tid] = s.version
        client.last_change = s.version

    def _outputs_changed(self, task: _Task, *, available: bool) -> None:
        s = self._state
        for d in task.dependents:
            dep = s.tasks[d]
            dep.missing += -1 if available else 1
            assert dep.missing >= 0, f"task {d} has a negative count of missing inputs"
            if available:
                if dep.missing == 0:
                    # All inputs are in: from now on it takes one of the slots.
                    for cid in dep.copies:
                        s.clients[cid].prefetch.pop(d, None)
                self._maybe_queue(dep)
            elif dep.missing == 1:
                # An input it had is gone: it waits again, without a slot.
                for cid in dep.copies:
                    s.clients[cid].prefetch[d] = None
        self._bump_dependents(task)

    def _lose_outputs(self, task: _Task) -> None:
        s = self._state
        assert task.holder is not None
        s.clients[task.holder].holds.pop(task.tid, None)
        task.holder = None
        self._effects.append(["lost", task.tid])
        self._outputs_changed(task, available=False)
        s.recheck.add(task.tid)

    def _client_died(self, client: _Client) -> None:
        s = self._state
        client.alive = False
        del s.live[client.cid]
        self._effects.append(["dead", client.cid])
        self._log.warning("client_dead", cid=client.cid, client=client.name, running=len(client.running))
        for tid in sorted(client.running):
            task = s.tasks[tid]
            task.copies.remove(client.cid)
            if not task.copies and task.state is TaskState.RUNNING:
                # A new attempt number, so a late report from the dead
                # client cannot be mistaken for the new placement's.
                task.attempt += 1
                self._set_state(task, TaskState.PENDING)
                self._effects.append(["replace", tid, task.attempt])
            self._enqueue(tid)
        client.running.clear()
        client.prefetch.clear()
        client.entries.clear()
        client.holders.clear()
        client.follow.clear()
        client.in_follow.clear()
        for tid in sorted(client.holds):
            self._lose_outputs(s.tasks[tid])

    def _attempt_failed(self, task: _Task, error: str) -> None:
        s = self._state
        task.failures += 1
        if task.failures <= task.retries:
            task.attempt += 1
            self._set_state(task, TaskState.PENDING)
            self._enqueue(task.tid)
            self._effects.append(["retry", task.tid, task.attempt])
            return
        self._set_state(task, TaskState.FAILED)
        s.queue.discard(task.tid)
        self._effects.append(["task_failed", task.tid])
        self._log.warning("task_failed", tid=task.tid, name=task.name, attempts=task.failures, error=error)
        # Its dependents can never get their inputs.
        self._kill(task.tid)
        if type(self._sched()).task_failed is not Coordinator.task_failed:
            tid = task.tid
            self._call_hook(Hook.TASK_FAILED, lambda: self._sched().task_failed(tid, error), tid=tid)
            return
        message = (
            f"task {task.tid} ({task.name!r}) failed {task.failures} time(s), exhausting its "
            f"{task.retries} retries; last error: {error}. Override task_failed(tid, error) in "
            f"{self._scheduler_cls.__qualname__} to handle task failures in the scheduler."
        )
        self._fail_computation(
            {"kind": "task", "hook": None, "tid": task.tid, "cid": None, "slot": self._slot, "error": error},
            message,
        )

    def _kill(self, tid: int) -> list[int]:
        """Kill ``tid`` and its transitive dependents that are still pending or running."""
        s = self._state
        killed: list[int] = []
        seen = {tid}
        frontier = collections.deque([tid])
        while frontier:
            task = s.tasks[frontier.popleft()]
            if task.state in _ACTIVE:
                for cid in task.copies:
                    self._unassign(s.clients[cid], task.tid, tell=True)
                task.copies = []
                self._set_state(task, TaskState.KILLED)
                s.queue.discard(task.tid)
                killed.append(task.tid)
                self._effects.append(["kill", task.tid])
            for d in task.dependents:
                if d not in seen:
                    seen.add(d)
                    frontier.append(d)
        return killed

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
        s.last_hook = {"hook": hook.value, "tid": tid, "cid": cid, "slot": self._slot}
        self._effects.append(["hook", hook.value, tid, cid])
        try:
            # The replica's stdout may carry machine-readable output; a
            # scheduler's print() goes to the log instead.
            # (By hand rather than two context managers: this runs once per
            # completion on every replica.)
            runtime, stdout = self._runtime, sys.stdout
            runtime._active = True
            sys.stdout = sys.stderr
            try:
                return True, fn()
            finally:
                runtime._active = False
                sys.stdout = stdout
        except (Exception, SystemExit) as exc:
            self._hook_failed(hook, exc, tid=tid, cid=cid)
            return False, None

    def _hook_failed(self, hook: Hook, exc: BaseException, *, tid: int | None, cid: int | None) -> None:
        cls = self._scheduler_cls.__qualname__
        match hook:
            case Hook.CREATE:
                call = f"{cls}()"
            case Hook.INIT:
                call = f"{cls}.init(seed={self._state.seed})"
            case Hook.CLIENT_JOINED | Hook.CLIENT_DEAD:
                call = f"{cls}.{hook.value}(cid={cid})"
            case Hook.TASK_DONE | Hook.TASK_FAILED:
                call = f"{cls}.{hook.value}(tid={tid})"
        error = f"{type(exc).__name__}: {exc}"
        where = self._user_frame(exc)
        message = f"scheduler hook {call} raised at log slot {self._slot}: {error}{where}"
        self._log.error("scheduler_hook_failed", hook=hook.value, tid=tid, cid=cid, slot=self._slot, exc_info=exc)
        self._fail_computation(
            {"kind": "hook", "hook": hook.value, "tid": tid, "cid": cid, "slot": self._slot, "error": error}, message
        )

    def _user_frame(self, exc: BaseException) -> str:
        # The innermost frame in the scheduler's own file is where the user
        # should look, even when the exception came from an action's checks.
        module = sys.modules.get(self._scheduler_cls.__module__)
        path = getattr(module, "__file__", None)
        if path is None:
            return ""
        path = os.path.abspath(path)
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if os.path.abspath(frame.filename) == path:
                return f" ({os.path.basename(path)} line {frame.lineno}, in {frame.name})"
        return ""

    def _fail_computation(self, info: dict[str, Any], message: str) -> None:
        s = self._state
        s.failure = {**info, "message": message}
        s.run_state = RunState.FAILED
        self._effects.append(["computation_failed", info["kind"], info["hook"], info["tid"], info["slot"]])
        self._log.error("computation_failed", message=message)

    # -------------------------------------------------------------- settling

    def _settle(self) -> None:
        s = self._state
        if s.run_state is not RunState.RUNNING:
            s.recheck.clear()
            return
        self._recompute_lost()
        self._place()

    def _recompute_lost(self) -> None:
        """Run again every task whose lost outputs an unfinished task needs (lineage)."""
        s = self._state
        while s.recheck:
            batch = sorted(s.recheck)
            s.recheck.clear()
            for tid in batch:
                task = s.tasks[tid]
                if task.state is not TaskState.DONE or task.holder is not None:
                    continue
                if not any(s.tasks[d].state in _ACTIVE for d in task.dependents):
                    continue
                task.attempt += 1
                task.failures = 0
                self._set_state(task, TaskState.PENDING)
                self._effects.append(["recompute", tid, task.attempt])
                self._maybe_queue(task)
                # Its own inputs may be gone too: then they are needed now.
                for p in task.pretasks:
                    pre = s.tasks[p]
                    if pre.state is TaskState.DONE and pre.holder is None:
                        s.recheck.add(p)

    def _place(self) -> None:
        # Placing a task can make its dependents prefetchable or followers
        # (none of their pretasks waits for placement any more); they are
        # pushed onto the heaps as it happens, and another round places the
        # followers and the extra copies they bring in the same entry.
        while True:
            self._woken = False
            self._place_round()
            self._place_followers()
            if not self._woken:
                return

    def _enqueue(self, tid: int) -> None:
        """Queue ``tid`` for placement, on the heap of its class (ready or early)."""
        s = self._state
        s.queue.add(tid)
        self._push(tid, ready=s.tasks[tid].missing == 0)

    def _push(self, tid: int, *, ready: bool) -> None:
        s = self._state
        if ready:
            if tid not in s.in_ready:
                s.in_ready.add(tid)
                heapq.heappush(s.ready_heap, tid)
        elif tid not in s.in_early:
            s.in_early.add(tid)
            heapq.heappush(s.early_heap, tid)

    def _place_round(self) -> None:
        s = self._state
        live = [s.clients[cid] for cid in s.live]
        # Clients with room for a ready task, and clients with room in their prefetch allowance.
        free = [c for c in live if self._ready_room(c)]
        early = [c for c in live if self._early_room(c)]
        ready_heap, early_heap = s.ready_heap, s.early_heap
        # Tasks no client in the pool could take now (tags, copies), back on their heap afterwards.
        skipped: list[tuple[int, bool]] = []
        extras: list[int] = []  # tasks with copies placed that need more (replicas > 1)
        # One copy of every placeable task, in tid order across both heaps,
        # taking from a heap only while some client has room for its class:
        # a completion costs O(log n) however many tasks wait.
        while True:
            r = ready_heap[0] if free and ready_heap else None
            e = early_heap[0] if early and early_heap else None
            if r is None and e is None:
                break
            from_ready = e is None or (r is not None and r < e)
            if from_ready:
                tid = heapq.heappop(ready_heap)
                s.in_ready.discard(tid)
            else:
                tid = heapq.heappop(early_heap)
                s.in_early.discard(tid)
            if tid not in s.queue:
                continue
            task = s.tasks[tid]
            if task.state not in _ACTIVE or len(task.copies) >= task.replicas:
                s.queue.discard(tid)
                continue
            if task.copies:
                extras.append(tid)
                continue
            if task.missing == 0:
                if not from_ready:
                    self._push(tid, ready=True)  # its inputs came in while it waited
                    continue
                pool, prefetch = free, False
            elif not self._prefetchable(task):
                # Queued again when an input arrives or a pretask is placed.
                s.queue.discard(tid)
                continue
            elif from_ready:
                self._push(tid, ready=False)  # an input was lost while it waited
                continue
            else:
                pool, prefetch = early, True
            client = self._choose(task, pool, self._local_bytes(task))
            if client is None:
                skipped.append((tid, not prefetch))
                continue
            self._assign(task, client)
            self._take_room(client, pool, prefetch)
            if len(task.copies) < task.replicas:
                extras.append(tid)
            else:
                s.queue.discard(tid)
        # Then the extra copies of replicated tasks, so replicas never starve other tasks.
        for tid in sorted(set(extras)):
            task = s.tasks[tid]
            prefetch = task.missing > 0
            pool = early if prefetch else free
            if pool:
                local = self._local_bytes(task)
                while len(task.copies) < task.replicas:
                    client = self._choose(task, pool, local)
                    if client is None:
                        break
                    self._assign(task, client)
                    self._take_room(client, pool, prefetch)
            if len(task.copies) < task.replicas:
                skipped.append((tid, not prefetch))
            else:
                s.queue.discard(tid)
        for tid, ready in skipped:
            self._push(tid, ready=ready)

    def _take_room(self, client: _Client, pool: list[_Client], prefetch: bool) -> None:
        if client in pool and not (self._early_room(client) if prefetch else self._ready_room(client)):
            pool.remove(client)

    def _place_followers(self) -> None:
        """Place each client's followers on it while its prefetch allowance has room."""
        s = self._state
        for cid in s.live:
            client = s.clients[cid]
            while client.follow and self._early_room(client):
                tid = heapq.heappop(client.follow)
                client.in_follow.discard(tid)
                task = s.tasks[tid]
                if task.copies or tid in s.queue or self._follow_target(task) != cid:
                    continue  # placed meanwhile, or no longer a follower of this client
                self._assign(task, client)
                if len(task.copies) < task.replicas:
                    self._enqueue(tid)
                self._woken = True

    @staticmethod
    def _load(client: _Client) -> int:
        """Tasks counting against ``client``'s slots: placed there with all inputs available."""
        return len(client.running) - len(client.prefetch)

    @classmethod
    def _ready_room(cls, client: _Client) -> bool:
        """Whether ``client`` takes another ready task: fewer than ``slots + queue`` placed there."""
        return cls._load(client) < client.slots + client.queue

    @staticmethod
    def _early_room(client: _Client) -> bool:
        """Whether ``client``'s prefetch allowance takes another early placement.

        Fewer than ``slots + queue`` tasks wait for inputs there, and fewer
        than ``2 * (slots + queue)`` are placed there in all: an early-placed
        task moves to the slots when its inputs are in, and must not free
        room for another one beyond that bound.
        """
        room = client.slots + client.queue
        return len(client.prefetch) < room and len(client.running) < 2 * room

    def _placed_or_held(self, task: _Task) -> bool:
        """No pretask of ``task`` waits to be placed: each runs somewhere or its outputs are held."""
        n = len(task.pretasks)
        tasks = self._state.tasks
        # Start at the pretask that blocked last time: a wide fan-in whose
        # pretasks are placed one by one is then checked in linear time overall.
        for k in range(n):
            i = (task.blocker + k) % n
            pre = tasks[task.pretasks[i]]
            if pre.holder is None and pre.state is not TaskState.RUNNING:
                task.blocker = i
                return False
        return True

    def _prefetchable(self, task: _Task) -> bool:
        """Some input is available and no pretask waits to be placed (each runs or is held)."""
        return task.missing < len(task.pretasks) and self._placed_or_held(task)

    def _follow_target(self, task: _Task) -> int | None:
        """The client ``task`` may follow its pretasks to, or None.

        A pending task none of whose inputs is available yet, whose
        pretasks all run (none waits for placement), can be placed early on
        a client with a queue that runs every one of them: that client will
        hold every input, and can start the task as soon as its own nodes
        made them.  The lowest such cid.
        """
        s = self._state
        if task.state is not TaskState.PENDING or task.copies or not task.pretasks:
            return None
        if task.missing != len(task.pretasks) or not self._placed_or_held(task):
            return None
        common: set[int] | None = None
        for p in dict.fromkeys(task.pretasks):
            cids = {cid for cid in s.tasks[p].copies if s.clients[cid].queue > 0}
            common = cids if common is None else common & cids
            if not common:
                return None
        if not common:
            return None
        target = min(common)
        return target if task.require <= s.clients[target].tags else None

    def _maybe_queue(self, task: _Task) -> bool:
        """Queue ``task`` for placement if it may be ready or prefetchable, or as a follower.

        Returns whether it was queued either way.
        """
        if task.state not in _ACTIVE:
            return False
        if task.missing == 0 or task.missing < len(task.pretasks):
            self._enqueue(task.tid)
            return True
        target = self._follow_target(task)
        if target is None:
            return False
        client = self._state.clients[target]
        if task.tid not in client.in_follow:
            client.in_follow.add(task.tid)
            heapq.heappush(client.follow, task.tid)
        return True

    def _local_bytes(self, task: _Task) -> dict[int, int]:
        """Bytes of ``task``'s inputs held by each client."""
        out: dict[int, int] = {}
        for p, key in zip(task.pretasks, task.prekeys):
            pre = self._state.tasks[p]
            if pre.holder is not None:
                n = sum(pre.sizes.values()) if key is None else pre.sizes.get(key, 0)
                out[pre.holder] = out.get(pre.holder, 0) + n
        return out

    def _choose(self, task: _Task, free: list[_Client], local: dict[int, int]) -> _Client | None:
        best: _Client | None = None
        best_key: tuple[int, int, int, int] | None = None
        for client in free:
            if client.cid in task.copies or not task.require <= client.tags:
                continue
            wanted = sum(1 for t in task.want if t in client.tags) if task.want else 0
            key = (-wanted, -local.get(client.cid, 0), len(client.running) - client.slots, client.cid)
            if best_key is None or key < best_key:
                best, best_key = client, key
        return best


    # --------------------------------------------------------------- queries

    def view(self, cid: int, after_version: int = 0) -> dict[str, Any]:
        """What client ``cid`` must do, changed since ``after_version`` (0: everything).

        Returns ``{"version": int, "state": "waiting"|"running"|"finished"|"failed",
        "alive": bool, "client_timeout": float, "tasks": [task, ...], "kill":
        [tid, ...], "holders": [{"tid", "cid", "addr"}, ...]}``; pass
        ``version`` as ``after_version`` next time.  Each task is
        ``{"tid", "attempt", "name", "args", "kwargs", "seed", "timeout",
        "keys", "inputs": [{"tid", "key", "cid", "addr"}, ...]}`` where an
        input's ``cid``/``addr`` is the live client holding that pretask's
        outputs, or None while they are not available.  A task listed again
        supersedes the earlier listing (a higher ``attempt`` replaces the
        running one).  ``holders`` says where the outputs of a task moved
        (appeared, were lost, or their client moved) that some task placed
        here reads: the inputs of a listed task are as of this view; after
        that, only ``holders`` reports changes, so a client keeps the latest
        holder of each input it needs.  ``alive`` False means the client
        must join again.
        """
        s = self._state
        client = s.clients.get(cid)
        alive = client is not None and client.alive
        out: dict[str, Any] = {
            "version": s.version,
            "state": s.run_state.value,
            "alive": alive,
            # How long this client may be silent: it keeps its polls well inside it.
            "client_timeout": self._client_timeout,
            "tasks": [],
            "kill": [],
        }
        if not alive:
            return out
        assert client is not None
        tasks: list[dict[str, Any]] = []
        kill: list[int] = []
        entries = client.entries
        for tid in reversed(entries):
            if entries[tid] <= after_version:
                break
            if tid in client.running:
                tasks.append(self._task_view(s.tasks[tid]))
            elif after_version > 0:  # a client starting afresh runs nothing to kill
                kill.append(tid)
        out["tasks"] = sorted(tasks, key=lambda t: t["tid"])
        out["kill"] = sorted(kill)
        holders: list[dict[str, Any]] = []
        for tid in reversed(client.holders):
            if client.holders[tid] <= after_version:
                break
            holder = s.tasks[tid].holder
            addr = s.clients[holder].addr if holder is not None else None
            holders.append({"tid": tid, "cid": holder, "addr": addr})
        out["holders"] = sorted(holders, key=lambda h: h["tid"])
        return out

    def client_version(self, cid: int) -> int:
        """The version of the last change to client ``cid``'s view (0 if none or unknown)."""
        client = self._state.clients.get(cid)
        return 0 if client is None else client.last_change

    def _task_view(self, task: _Task) -> dict[str, Any]:
        s = self._state
        inputs = []
        for p, key in zip(task.pretasks, task.prekeys):
            holder = s.tasks[p].holder
            addr = s.clients[holder].addr if holder is not None else None
            inputs.append({"tid": p, "key": key, "cid": holder, "addr": addr})
        return {
            "tid": task.tid,
            "attempt": task.attempt,
            "name": task.name,
            "args": list(task.args),
            "kwargs": dict(task.kwargs),
            "seed": task.seed,
            "timeout": task.timeout,
            "keys": list(task.keys),
            "inputs": inputs,
        }

    def status(self) -> dict[str, Any]:
        """The computation at a glance.

        Returns ``{"state", "finished": bool, "result": {"values", "tasks":
        [{"tid", "values"}]} | None, "failure": {"kind", "hook", "tid", "cid",
        "slot", "error", "message"} | None, "tasks": {state: count, "total"},
        "clients": {"live", "dead"}, "live_clients": [{"cid", "name",
        "addr", "slots", "running", "prefetching"}], "now", "seed", "version",
        "last_hook"}``.  A client's ``running`` counts the tasks taking its
        slots (all inputs available), ``prefetching`` those placed there that
        still wait for an input; both are ``running`` in the task counts.
        """
        s = self._state
        counts = {state.value: n for state, n in s.counts.items()}
        counts["total"] = len(s.tasks)
        return {
            "state": s.run_state.value,
            "finished": s.run_state is RunState.FINISHED,
            "result": s.result,
            "failure": None if s.failure is None else dict(s.failure),
            "tasks": counts,
            "clients": {"live": len(s.live), "dead": len(s.clients) - len(s.live)},
            "live_clients": [
                {
                    "cid": c.cid,
                    "name": c.name,
                    "addr": c.addr,
                    "slots": c.slots,
                    "running": self._load(c),
                    "prefetching": len(c.prefetch),
                }
                for c in (s.clients[cid] for cid in s.live)
            ],
            "now": s.now,
            "seed": s.seed,
            "version": s.version,
            "last_hook": self.last_hook,
        }

    def task_info(self, tid: int) -> dict[str, Any] | None:
        """Everything known about task ``tid``, or None if there is no such task."""
        s = self._state
        task = s.tasks.get(tid)
        if task is None:
            return None
        return {
            "tid": task.tid,
            "name": task.name,
            "state": task.state.value,
            "attempt": task.attempt,
            "failures": task.failures,
            "args": list(task.args),
            "kwargs": dict(task.kwargs),
            "pretasks": list(task.pretasks),
            "prekeys": list(task.prekeys),
            "keys": list(task.keys),
            "require": sorted(task.require),
            "want": list(task.want),
            "replicas": task.replicas,
            "retries": task.retries,
            "timeout": task.timeout,
            "clients": list(task.copies),
            # Of those, the clients where it waits for inputs (placed early).
            "prefetching": [cid for cid in task.copies if task.tid in s.clients[cid].prefetch],
            "holder": task.holder,
            "values": None if task.values is None else dict(task.values),
            "sizes": dict(task.sizes),
            "error": task.error,
            "dependents": list(dict.fromkeys(task.dependents)),
        }

    def live_clients(self) -> list[tuple[int, str, str]]:
        """``(cid, name, addr)`` of every live client, by cid."""
        s = self._state
        return [(cid, s.clients[cid].name, s.clients[cid].addr) for cid in s.live]

    def expired_clients(self, last_seen: Mapping[int, float], now: float) -> list[int]:
        """Live clients silent for longer than ``client_timeout``, for the leader's next TICK.

        ``last_seen`` maps cid to when the leader last heard from it (the
        leader should start every live client at its own start time); cids
        missing from it are not expired.  Returns cids in ascending order.
        """
        return [
            cid for cid in self._state.live if cid in last_seen and now - last_seen[cid] > self._client_timeout
        ]

    def check_invariants(self) -> None:
        """Assert the internal bookkeeping is consistent (for tests; O(size of state))."""
        s = self._state
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
            for versions in (list(client.entries.values()), list(client.holders.values())):
                assert versions == sorted(versions) and all(v <= s.version for v in versions)
        assert not s.recheck
        assert s.in_ready == set(s.ready_heap) and len(s.in_ready) == len(s.ready_heap), "ready heap bookkeeping"
        assert s.in_early == set(s.early_heap) and len(s.in_early) == len(s.early_heap), "early heap bookkeeping"
        assert s.queue <= s.in_ready | s.in_early, f"queued tasks on no heap: {sorted(s.queue - s.in_ready - s.in_early)}"
        for client in s.clients.values():
            assert client.in_follow == set(client.follow) and len(client.in_follow) == len(client.follow)

    # ------------------------------------------------------------- snapshots

    def snapshot(self) -> bytes:
        """The whole state, including the user's scheduler object, as bytes."""
        s = self._state
        sched = s.scheduler
        # The runtime points back at this machine; the restoring machine binds its own.
        runtime = vars(sched).pop(_RUNTIME_ATTR, None) if sched is not None else None
        try:
            buf = io.BytesIO()
            _SnapshotPickler(buf, self._scheduler_cls).dump(s)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(
                f"cannot snapshot the coordinator: every attribute of {self._scheduler_cls.__qualname__} "
                f"must be picklable (no open files, sockets, lambdas or generators): {exc}"
            ) from exc
        finally:
            if runtime is not None:
                vars(sched)[_RUNTIME_ATTR] = runtime
        return codec.encode([_SNAPSHOT_FORMAT, self._code_digest, self._scheduler_cls.__module__, buf.getvalue()])

    def restore(self, data: bytes) -> None:
        """Replace the state with a :meth:`snapshot`.

        Raises :class:`SchedulerMismatch` if the snapshot was taken with
        different scheduler code, ``ValueError`` if it is not a snapshot.
        """
        decoded = codec.decode(data)
        if not (isinstance(decoded, list) and len(decoded) == 4 and decoded[0] == _SNAPSHOT_FORMAT):
            raise ValueError("not a coordinator snapshot (or one from an incompatible version)")
        _, digest, module, blob = decoded
        if digest != self._code_digest:
            raise SchedulerMismatch(
                f"this replica runs different scheduler code than the one the computation started with "
                f"(snapshot code digest {digest[:16]}..., this replica {self._code_digest[:16]}...); "
                f"start every replica with the same scheduler file"
            )
        state = _SnapshotUnpickler(io.BytesIO(blob), self._scheduler_cls, module).load()
        assert isinstance(state, _State)
        self._state = state
        self._runtime = _Runtime(self)
        if state.scheduler is not None:
            self._bind(state.scheduler)
