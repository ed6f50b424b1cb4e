"""The coordinator's log operations, their answers and the questions to a replica, as typed values.

Theory of operation
-------------------
Clients, the command line and the leader submit operations through the log
as plain CBOR maps with an ``"op"`` field (the log's stable format; see
:meth:`Op.to_wire`).  Every replica applies each one, so parsing happens in
the state machine, once per operation, with
:func:`~tasksprint.coordinator.parsing.parse_op`: a strict parser that
turns the map into one of the frozen classes below or raises
:class:`BadOp`, never another exception.  A bad operation gets an error
result for that one command and changes nothing; past the parser, the
machine handles only typed values.

Operations (what each does: :class:`~tasksprint.coordinator.machine.CoordinatorMachine`):

- :class:`InitOp` — first entry: the seed and the scheduler code digest.
- :class:`JoinOp` — a client's name, data address, slots, queue and tags.
- :class:`DoneOp`, :class:`FailedOp` — a task attempt's outcome on a client.
- :class:`LostOp` — a client could not fetch a task's outputs from their holder.
- :class:`CancelOp` — kill a task (and its dependents) from the command line.
- :class:`BatchOp` — several done/failed/lost reports in one log command.
- :class:`CommandOp` — a command for the scheduler itself (its ``command`` hook).
- :class:`WorkerOp` — change a live worker's tags, or drain it, by name.

Each operation is answered with a frozen value too (:class:`Initialized`,
:class:`Joined`, :class:`Reported`, :class:`Cancelled`, :class:`BatchApplied`,
:class:`Commanded`, :class:`WorkerChanged` or :class:`Refused`), which travels back to the submitter as it is.
:class:`ErrorCode` says why an operation was refused, so no reader has to
match error text.

Read-only questions to a replica (not logged) are typed the same way:
:class:`ViewRequest`, :class:`StatusRequest`, :class:`InfoRequest`,
:class:`SchedulerRequest` (the scheduler's read-only ``query`` hook), each
sent as a :class:`~tasksprint.api.Query` named :attr:`NAME` with
:meth:`args`, and parsed by :func:`~tasksprint.coordinator.parsing.parse_query`
on the replica; a question that does not parse is answered with its
:class:`Refused`.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, TypeGuard

import attrs

from tasksprint.codec import message

__all__ = [
    "described",
    "ACCEPTED",
    "Answer",
    "BadOp",
    "BatchApplied",
    "Cancelled",
    "Initialized",
    "Joined",
    "Reported",
    "BatchOp",
    "CancelOp",
    "CommandOp",
    "Commanded",
    "SchedulerAnswer",
    "SchedulerRequest",
    "WorkerChanged",
    "WorkerOp",
    "DoneOp",
    "ErrorCode",
    "FailedOp",
    "InitOp",
    "JoinOp",
    "LostOp",
    "Op",
    "Refused",
    "ReportOp",
    "GRAPH_MAX",
    "GraphRequest",
    "InfoRequest",
    "Request",
    "StatusRequest",
    "ViewRequest",
    "is_int",
]


class ErrorCode(enum.Enum):
    """Why the machine refused an operation (the ``code`` of an error result)."""

    MALFORMED = "malformed"  # a field is missing or has the wrong type or range
    NOT_INITIALIZED = "not_initialized"  # the computation's first entry is not applied yet: try again
    UNKNOWN = "unknown"  # names a client or task the coordinator does not know
    FORBIDDEN = "forbidden"  # speaks for a client that another log session joined


_str_v = attrs.validators.instance_of(str)
_bool_v = attrs.validators.instance_of(bool)
_opt_str_v = attrs.validators.optional(_str_v)


@message
class Refused:
    """The answer to a refused operation or question: an :class:`ErrorCode` value and a message for people.

    ``effects`` is the digest of the actions the log entry caused (see
    :class:`~tasksprint.coordinator.machine.CoordinatorMachine`; empty inside a batch and for questions).
    """

    code: str = attrs.field(validator=attrs.validators.in_([c.value for c in ErrorCode]))
    error: str = attrs.field(validator=_str_v)
    effects: str = attrs.field(default="", validator=_str_v)


class BadOp(Exception):
    """Raised for an operation the machine refuses; it changed nothing."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(message)
        self.refused = Refused(code=code.value, error=message)


def is_int(v: Any) -> TypeGuard[int]:
    """An int that is not a bool (CBOR and Python both let a bool pass for an int)."""
    return isinstance(v, int) and not isinstance(v, bool)


def described(v: Any) -> str:
    """``v`` named by its type and size only, for error text about data from a client.

    Such text is part of an answer every replica hashes into its digest, so
    it must not depend on a repr: exponential for shared references, hash-seed
    dependent for sets, holding memory addresses for other objects.
    """
    if v is None or isinstance(v, bool):
        return repr(v)
    if is_int(v):
        return repr(v) if -(10**18) < v < 10**18 else f"an int of {v.bit_length()} bits"
    if isinstance(v, (str, bytes, list, tuple, dict)):
        unit = "characters" if isinstance(v, str) else "bytes" if isinstance(v, bytes) else "items"
        return f"a {type(v).__name__} of {len(v)} {unit}"
    return f"a {type(v).__name__}"


@message
class InitOp:
    seed: int
    code_digest: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": "init", "seed": self.seed, "code_digest": self.code_digest}


@message
class JoinOp:
    """Join (or, under a name already live, update): ``addr`` is the client's data server.

    ``holds`` lists the ``(tid, attempt)`` outputs a client declared dead still
    keeps in its object store: the new incarnation offers them for re-adoption.
    ``cid`` makes it an update of that live incarnation only (a new queue
    size): refused if the name's live client is another one or none, so an
    update that arrives late never starts a new incarnation offering nothing.
    """

    client: str
    addr: str
    slots: int
    queue: int = 0
    have: tuple[str, ...] = ()
    holds: tuple[tuple[int, int], ...] = ()
    cid: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": "join",
            "client": self.client,
            "addr": self.addr,
            "slots": self.slots,
            "queue": self.queue,
            "have": list(self.have),
            **({"holds": [list(h) for h in self.holds]} if self.holds else {}),
            **({"cid": self.cid} if self.cid is not None else {}),
        }


@message
class DoneOp:
    """Attempt ``attempt`` of task ``tid`` succeeded on client ``cid``.

    ``values`` are the outputs named in the task's ``keys``; ``sizes`` the
    byte count of every output.  ``early`` lists ``(pretask tid, attempt)``
    inputs the client took from its own store before the log said so: the
    completion counts only if each is that pretask's committed completion
    on this client.
    """

    cid: int
    tid: int
    attempt: int
    values: dict[str, Any] = attrs.Factory(dict)
    sizes: dict[str, int] = attrs.Factory(dict)
    early: tuple[tuple[int, int], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        out = {
            "op": "done",
            "cid": self.cid,
            "tid": self.tid,
            "attempt": self.attempt,
            "values": dict(self.values),
            "sizes": dict(self.sizes),
        }
        if self.early:
            out["early"] = [list(e) for e in self.early]
        return out


@message
class FailedOp:
    """Attempt ``attempt`` of task ``tid`` failed on client ``cid`` with ``error``.

    ``record`` is a command task's record of the run, as plain data (see
    :func:`tasksprint.coordinator.specs.record_outputs`); None for a node task.
    """

    cid: int
    tid: int
    attempt: int
    error: str
    record: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        out = {"op": "failed", "cid": self.cid, "tid": self.tid, "attempt": self.attempt, "error": self.error}
        if self.record is not None:
            out["record"] = dict(self.record)
        return out


@message
class LostOp:
    """Client ``cid`` could not fetch output ``key`` (all outputs: None) of task ``tid``."""

    cid: int
    tid: int
    key: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"op": "lost", "cid": self.cid, "tid": self.tid, "key": self.key}


@message
class CancelOp:
    tid: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": "cancel", "tid": self.tid}


ReportOp = DoneOp | FailedOp | LostOp


@message
class BatchOp:
    """Reports applied in order as if each had its own entry.

    An entry of ``ops`` that did not parse is the :class:`Refused` saying why
    (the others still apply).
    """

    ops: tuple[DoneOp | FailedOp | LostOp | Refused, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"op": "batch", "ops": [op.to_wire() for op in self.ops if not isinstance(op, Refused)]}


@message
class CommandOp:
    """A command for the scheduler: ``body`` (plain data) goes to its ``command`` hook.

    The hook's return value is the answer (:class:`Commanded`); a scheduler
    without a ``command`` hook refuses it.
    """

    body: Any

    def to_wire(self) -> dict[str, Any]:
        return {"op": "command", "body": self.body}


@message
class WorkerOp:
    """Change live worker ``client``'s tags (``add``, then ``remove``), or ``drain`` it.

    The change outlives the worker's later joins under the same name: a
    join announces what the worker offers, this op what the operator wants.
    A drained worker keeps what it runs and is given nothing more.
    """

    client: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    drain: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": "worker",
            "client": self.client,
            "add": list(self.add),
            "remove": list(self.remove),
            "drain": self.drain,
        }


Op = InitOp | JoinOp | DoneOp | FailedOp | LostOp | CancelOp | BatchOp | CommandOp | WorkerOp


# ------------------------------------------------------------- answers


def _int_v(_inst: Any, attribute: Any, value: Any) -> None:
    if not is_int(value):
        raise TypeError(f"{attribute.name} must be an int, got {value!r:.100}")


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(is_int(v) for v in value):
        raise TypeError(f"expected a list of ints, got {value!r:.100}")
    return tuple(value)


def _others(value: Any) -> tuple[tuple[int, Any], ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of [index, answer] pairs, got {value!r:.100}")
    out = []
    for pair in value:
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and is_int(pair[0])
            and isinstance(pair[1], (Reported, Refused))
        ):
            raise TypeError(f"expected an [index, answer] pair, got {pair!r:.100}")
        out.append((pair[0], pair[1]))
    return tuple(out)


@message
class Initialized:
    """The answer to :class:`InitOp`; ``ignored`` when the computation had started already."""

    ignored: bool = attrs.field(default=False, validator=_bool_v)
    effects: str = attrs.field(default="", validator=_str_v)


@message
class Joined:
    """The answer to :class:`JoinOp`: the client's id (the same as before for a live name).

    ``adopted``: the offered outputs (tids) the coordinator took back; the client may drop the others.
    """

    cid: int = attrs.field(validator=_int_v)
    effects: str = attrs.field(default="", validator=_str_v)
    adopted: tuple[int, ...] = attrs.field(default=(), converter=_ints)


@message
class Reported:
    """The answer to a done, failed or lost report.

    ``accepted`` False says why in ``reason`` (stale attempt, dead client,
    ...); ``rerun`` means the task got a new attempt because the completion
    used early inputs the log did not commit.
    """

    accepted: bool = attrs.field(validator=_bool_v)
    reason: str | None = attrs.field(default=None, validator=_opt_str_v)
    rerun: bool = attrs.field(default=False, validator=_bool_v)
    effects: str = attrs.field(default="", validator=_str_v)


#: The answer of a report that counted (inside a batch, only others are listed).
ACCEPTED = Reported(accepted=True)


@message
class Cancelled:
    """The answer to :class:`CancelOp`: the tasks killed (``reason`` says why none were)."""

    killed: tuple[int, ...] = attrs.field(converter=_ints)
    reason: str | None = attrs.field(default=None, validator=_opt_str_v)
    effects: str = attrs.field(default="", validator=_str_v)


@message
class BatchApplied:
    """The answer to :class:`BatchOp`: how many entries, and the answers that are not :data:`ACCEPTED`.

    ``others`` pairs each such answer with its entry's position in the batch.
    """

    count: int = attrs.field(validator=_int_v)
    others: tuple[tuple[int, Reported | Refused], ...] = attrs.field(converter=_others)
    effects: str = attrs.field(default="", validator=_str_v)


@message
class Commanded:
    """The answer to :class:`CommandOp`: what the scheduler's ``command`` hook returned (plain data)."""

    value: Any = None
    effects: str = attrs.field(default="", validator=_str_v)


@message
class WorkerChanged:
    """The answer to :class:`WorkerOp`: the worker's id, its tags now, and whether it is drained."""

    cid: int = attrs.field(validator=_int_v)
    tags: tuple[str, ...] = attrs.field(converter=tuple)
    drained: bool = attrs.field(validator=_bool_v)
    effects: str = attrs.field(default="", validator=_str_v)


Answer = Initialized | Joined | Reported | Cancelled | BatchApplied | Commanded | WorkerChanged | Refused


# ------------------------------------------------------------- queries


@message
class ViewRequest:
    """Client ``cid``'s view changed since version ``after``; wait up to ``wait`` seconds for a change.

    ``cpu`` (percent of one CPU) and ``rss`` (bytes) are what the client and
    its node processes use, for the status answer; not logged.
    """

    NAME: ClassVar[str] = "view"
    cid: int
    after: int = 0
    wait: float = 0.0
    cpu: float | None = None
    rss: int | None = None

    def args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cid": self.cid, "after": self.after, "wait": self.wait}
        if self.cpu is not None:
            out["cpu"] = self.cpu
        if self.rss is not None:
            out["rss"] = self.rss
        return out


@message
class StatusRequest:
    """The computation at a glance."""

    NAME: ClassVar[str] = "status"

    def args(self) -> dict[str, Any]:
        return {}


@message
class InfoRequest:
    """Everything about task ``tid``."""

    NAME: ClassVar[str] = "info"
    tid: int

    def args(self) -> dict[str, Any]:
        return {"tid": self.tid}


@message
class SchedulerRequest:
    """A read-only question for the scheduler's ``query`` hook; ``args`` is plain data."""

    NAME: ClassVar[str] = "scheduler"
    body: Any = None

    def args(self) -> dict[str, Any]:
        return {"args": self.body}


@message
class SchedulerAnswer:
    """What the scheduler's ``query`` hook returned (plain data)."""

    value: Any = None


#: Most tasks one ``graph`` query answers about.
GRAPH_MAX = 5000


@message
class GraphRequest:
    """Tasks ``first`` .. ``first + count - 1``: their states and what each reads (the DAG, a page of it)."""

    NAME: ClassVar[str] = "graph"
    first: int = 1
    count: int = GRAPH_MAX

    def args(self) -> dict[str, Any]:
        return {"first": self.first, "count": self.count}


Request = ViewRequest | StatusRequest | InfoRequest | SchedulerRequest | GraphRequest
