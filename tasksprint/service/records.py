"""The queue scheduler's per-task records, and how a snapshot packs millions of them.

Part of :mod:`tasksprint.service.scheduler` (deterministic, standard library
only).  A snapshot's pickler visits every object it saves (to check it may
be saved), so a million small records would cost seconds; :func:`pack`
turns the scheduler's per-task containers into one JSON text, which costs
one visit and is written and read by ``json`` in C.
"""

from __future__ import annotations

import collections
import gc
import json
from typing import Any

__all__ = ["FINISHED", "Rec", "Spec", "admission_key", "pack", "status_indexes", "task_tags", "unpack"]


#: The states a task ends in.
FINISHED = ("done", "failed", "cancelled")


class Rec:
    """One submitted task, as small as it can be: a service keeps millions.

    ``spec`` is shared by every task of a submission that gave the same spec
    (it is never changed), so a million copies of one command cost a
    million pointers, not a million dicts.
    """

    __slots__ = (
        "after",
        "blocking",
        "finished",
        "job",
        "name",
        "record",
        "spec",
        "state",
        "submitted",
        "tid",
        "why",
        "worker",
    )

    def __init__(self, spec: Spec, now: float) -> None:
        self.job: str | None = spec.job
        self.name: str | None = spec.name
        self.after: tuple[int, ...] = spec.after
        self.spec: dict[str, Any] | None = spec.run  # what the coordinator gets; None once compacted
        self.state = "waiting"
        self.tid: int | None = None
        self.blocking = 0  # after tasks not done yet
        self.submitted = now
        self.finished: float | None = None
        self.why: str | None = None  # why it failed or was cancelled
        self.record: dict[str, Any] | None = None  # a failed command's record (a done one's is the coordinator's)
        self.worker: str | None = None  # the worker that ran it to success

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in Rec.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for k, v in zip(Rec.__slots__, state, strict=True):
            setattr(self, k, v)


_PACKED_FIELDS = ("after", "blocking", "finished", "job", "name", "state", "submitted", "tid", "why", "worker")
_PACKED = ("sid", "spec", *_PACKED_FIELDS)
_PACKED_ATTRS = frozenset(
    ["recs", "open", "ready", "jobs", "ended", "by_tid", "dependents", "gone", "admitted", "blocked", "tagged"]
)


class Spec:
    """A checked spec split once per distinct spec of a submission: what runs, and the scheduler's own fields."""

    __slots__ = ("after", "job", "name", "run")

    def __init__(self, checked: dict[str, Any]) -> None:
        self.job: str | None = checked.pop("job", None)
        self.name: str | None = checked.pop("name", None)
        self.after: tuple[int, ...] = tuple(checked.pop("after", ()))
        self.run = checked


def admission_key(run: dict[str, Any]) -> tuple[str, ...]:
    """The admission class of a task: its required tags (tasks no worker can take never hold up others)."""
    require = run.get("require")
    return tuple(sorted(require)) if require else ()


def task_tags(run: dict[str, Any] | None) -> set[str]:
    """The tags a task names, required or wanted (what ``status --tag`` matches)."""
    if not run:
        return set()
    return {*(run.get("require") or ()), *(run.get("want") or ())}


def status_indexes(recs: dict[int, Rec], opened: dict[int, None]) -> dict[str, Any]:
    """The scheduler's ``status`` indexes, from its records and unfinished ids (in their order)."""
    admitted: dict[int, None] = {}
    blocked: dict[int, None] = {}
    tagged: dict[str, dict[int, None]] = {}
    tags_of: dict[int, set[str]] = {}  # by id() of a shared spec: most tasks share few
    for sid in opened:
        rec = recs[sid]
        if rec.state == "queued":
            admitted[sid] = None
        elif rec.state == "waiting":
            blocked[sid] = None
        tags = tags_of.get(id(rec.spec))
        if tags is None:
            tags = tags_of[id(rec.spec)] = task_tags(rec.spec)
        for tag in tags:
            tagged.setdefault(tag, {})[sid] = None
    return {"admitted": admitted, "blocked": blocked, "tagged": tagged}


def pack(attrs: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's attributes ``attrs`` as pickled: the per-task containers as one JSON text."""
    recs: dict[int, Rec] = attrs["recs"]
    specs: dict[int, int] = {}  # id(shared spec) -> index
    table: list[dict[str, Any] | None] = []
    columns: dict[str, list[Any]] = {k: [] for k in _PACKED}
    records: dict[int, Any] = {}
    for sid, rec in recs.items():
        spec = rec.spec
        i = specs.get(id(spec))
        if i is None:
            i = specs[id(spec)] = len(table)
            table.append(spec)
        columns["sid"].append(sid)
        columns["spec"].append(i)
        for k in _PACKED_FIELDS:
            columns[k].append(getattr(rec, k))
        if rec.record is not None:
            records[sid] = rec.record
    packed = {
        "specs": table,
        "recs": columns,
        "open": list(attrs["open"]),
        "ready": [[list(key), list(q)] for key, q in attrs["ready"].items()],
        "jobs": attrs["jobs"],
        "ended": list(attrs["ended"]),
        "by_tid": list(attrs["by_tid"].items()),
        "dependents": list(attrs["dependents"].items()),
        "gone": list(attrs["gone"].items()),
        # The status indexes, saved (rebuilding them would visit every task).
        "admitted": list(attrs["admitted"]),
        "blocked": list(attrs["blocked"]),
        "tagged": [[tag, list(ids)] for tag, ids in attrs["tagged"].items()],
    }
    state = {k: v for k, v in attrs.items() if k not in _PACKED_ATTRS}
    state["packed"] = json.dumps(packed, separators=(",", ":"))
    state["records"] = records
    return state


def unpack(state: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's attributes from what :func:`pack` gave."""
    # Millions of objects, none in a cycle: the collector would scan them again and again.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _unpack(dict(state))
    finally:
        if enabled:
            gc.enable()


def _unpack(state: dict[str, Any]) -> dict[str, Any]:
    packed = json.loads(state.pop("packed"))
    records = state.pop("records")
    table = packed["specs"]
    columns = packed["recs"]
    recs = {}
    for row in zip(*(columns[k] for k in _PACKED), strict=True):
        rec = Rec.__new__(Rec)
        sid, spec = row[0], row[1]
        for k, v in zip(_PACKED_FIELDS, row[2:], strict=True):
            setattr(rec, k, v)
        rec.after = tuple(rec.after)
        rec.spec = table[spec]
        rec.record = records.get(sid)
        recs[sid] = rec
    opened = dict.fromkeys(packed["open"])
    if "tagged" in packed:
        indexes = {
            "admitted": dict.fromkeys(packed["admitted"]),
            "blocked": dict.fromkeys(packed["blocked"]),
            "tagged": {tag: dict.fromkeys(ids) for tag, ids in packed["tagged"]},
        }
    else:  # a snapshot from before the indexes
        indexes = status_indexes(recs, opened)
    return {
        **state,
        "recs": recs,
        "open": opened,
        **indexes,
        "ready": {tuple(key): collections.deque(q) for key, q in packed["ready"]},
        "jobs": packed["jobs"],
        "ended": collections.deque(packed["ended"]),
        "by_tid": dict(packed["by_tid"]),
        "dependents": dict(packed["dependents"]),
        "gone": dict(packed["gone"]),
    }
