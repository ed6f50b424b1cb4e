"""Snapshots of the coordinator state, the user's scheduler object included.

Theory of operation
-------------------
A snapshot is CBOR ``[format, code digest, scheduler module, pickle]``.  The
state (:class:`~tasksprint.coordinator.state.CoordinatorState`) is pickled
whole, scheduler object and all, so a restored replica continues the
computation exactly where the snapshot left it.  The scheduler class is
saved by reference to "the scheduler class", not by module name: the
module it was imported under differs between a replica run as
``python scheduler.py`` and one that loaded the file.  Other classes from
the user's file are looked up in the module this replica loaded it as.
The caller unbinds the scheduler's runtime before :func:`dump` (it points
at the machine) and binds its own after :func:`load`.

A snapshot taken with different scheduler code is refused with
:class:`SchedulerMismatch`.  No I/O here: bytes in, bytes out.

A snapshot is data from a peer (or a disk) and restoring it must never run
code it names: pickle's ``GLOBAL`` opcode can name any callable (``os
system``) and ``REDUCE`` calls it.  So both ends keep to one allow-list
(:func:`allowed_class`): the classes of the user's scheduler module, those
its ``SNAPSHOT_CLASSES`` lists, the coordinator's own record classes, and a
few plain data types of the standard library (``set``, ``frozenset``, ``collections.deque``, ``random.Random``...).
Functions are never allowed, whatever module they come from.  :func:`dump`
refuses a state that would need anything else, naming the scheduler
attribute that holds it, so a snapshot that was written can be read.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import io
import pickle
import random
import sys
from typing import Any

from tasksprint import codec
from tasksprint.coordinator.state import CoordinatorState
from tasksprint.machine import BadSnapshot, SnapshotUnavailable, StopReplica

__all__ = [
    "BadSnapshot",
    "SchedulerMismatch",
    "SnapshotRefused",
    "allowed_class",
    "check_scheduler",
    "dump",
    "load",
    "mismatch_message",
]

# 2: clients carry their prefetch sets; 3: placement heaps, client queues;
# 4: state records in the tasksprint.coordinator package.
_FORMAT = 4
_SCHEDULER_CLASS_PID = "scheduler-class"


class SchedulerMismatch(StopReplica):
    """This replica's scheduler code differs from the code the computation started with."""


class SnapshotRefused(SnapshotUnavailable, TypeError):
    """The state cannot be snapshotted; the message names the scheduler attribute and what to change."""


# Plain data types of the standard library a scheduler may keep; each one's
# constructor builds data and runs nothing else.
_ALLOWED_OBJECTS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "range"): range,
    ("builtins", "object"): object,
    ("collections", "deque"): collections.deque,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): collections.defaultdict,
    ("random", "Random"): random.Random,
    ("fractions", "Fraction"): fractions.Fraction,
    ("decimal", "Decimal"): decimal.Decimal,
    ("datetime", "date"): datetime.date,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
}
_RECORDS_MODULE = CoordinatorState.__module__  # the coordinator's own record classes
_SCHEDULER_TYPES = (list, dict, tuple, str, bytes, int, float, bool, type(None))


def allowed_class(obj: Any, scheduler_module: str, listed: tuple[type, ...] = ()) -> bool:
    """Whether a snapshot may name ``obj``: a class of the scheduler's module, one the scheduler
    lists in ``SNAPSHOT_CLASSES`` (``listed``), a coordinator record class, or one of the plain data
    types listed above.  Functions and other callables never are."""
    if not isinstance(obj, type):
        return False
    module = getattr(obj, "__module__", None)
    if module in (scheduler_module, _RECORDS_MODULE) or obj in listed:
        return True
    return _ALLOWED_OBJECTS.get((str(module), obj.__qualname__)) is obj


def _listed(scheduler_cls: type) -> tuple[type, ...]:
    listed = getattr(scheduler_cls, "SNAPSHOT_CLASSES", ())
    return tuple(c for c in listed if isinstance(c, type)) if isinstance(listed, tuple) else ()


def mismatch_message(what: str) -> str:
    return (
        f"this replica runs different scheduler code than the one the computation started with "
        f"({what}); start every replica with the same scheduler file"
    )


def dump(state: CoordinatorState, scheduler_cls: type, code_digest: str) -> bytes:
    """Encode ``state``.

    Raises :class:`SnapshotRefused` (a ``TypeError``) naming the scheduler
    attribute to change if the state cannot be saved.
    """
    try:
        buf = io.BytesIO()
        _Pickler(buf, scheduler_cls).dump(state)
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        raise SnapshotRefused(refusal(state.scheduler, scheduler_cls, exc)) from None
    return codec.encode([_FORMAT, code_digest, scheduler_cls.__module__, buf.getvalue()])


def check_scheduler(sched: Any, scheduler_cls: type) -> str | None:
    """Why the scheduler object ``sched`` could not be snapshotted, or None if it can."""
    try:
        _Pickler(io.BytesIO(), scheduler_cls).dump(sched)
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        return refusal(sched, scheduler_cls, exc)
    return None


def refusal(sched: Any, scheduler_cls: type, exc: BaseException) -> str:
    """What to tell the user when the state holding ``sched`` failed to pickle with ``exc``."""
    cls = scheduler_cls.__qualname__
    where = f"an attribute of {cls}"
    for name, value in sorted(getattr(sched, "__dict__", {}).items()):
        try:
            _Pickler(io.BytesIO(), scheduler_cls).dump(value)
        except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as inner:
            where, exc = f"attribute {name!r} of {cls} ({type(value).__name__})", inner
            break
    return (
        f"cannot save the scheduler's state: {where} cannot be snapshotted ({_short(exc)}); "
        "scheduler attributes must be plain data (numbers, strings, lists, dicts, sets, "
        "instances of classes defined in the scheduler's file), not open files, sockets, "
        "functions, lambdas, generators or objects of other modules; see docs/tutorial.md"
    )


def _short(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def load(data: bytes, scheduler_cls: type, code_digest: str) -> CoordinatorState:
    """Decode a :func:`dump`.

    Raises :class:`SchedulerMismatch` if it was taken with different
    scheduler code, ``ValueError`` if it is not a snapshot.
    """
    try:
        decoded = codec.decode_untrusted(data)
    except codec.BadMessage as exc:
        raise BadSnapshot(f"not a coordinator snapshot: {exc}") from None
    if not (isinstance(decoded, list) and len(decoded) == 4 and decoded[0] == _FORMAT):
        raise BadSnapshot("not a coordinator snapshot (or one from an incompatible version)")
    _, digest, module, blob = decoded
    if not (isinstance(digest, str) and isinstance(module, str) and isinstance(blob, bytes)):
        raise BadSnapshot("not a coordinator snapshot: its header has the wrong types")
    if digest != code_digest:
        raise SchedulerMismatch(
            mismatch_message(f"snapshot code digest {digest[:16]}..., this replica {code_digest[:16]}...")
        )
    try:
        state = _Unpickler(io.BytesIO(blob), scheduler_cls, module).load()
    except BadSnapshot:
        raise
    except Exception as exc:  # pickle raises many types on damaged bytes
        raise BadSnapshot(f"damaged coordinator snapshot ({type(exc).__name__})") from None
    if not isinstance(state, CoordinatorState):
        raise BadSnapshot(f"a coordinator snapshot holds a {type(state).__name__}, not the coordinator's state")
    return state


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, scheduler_cls: type) -> None:
        super().__init__(file, protocol=5)
        self._scheduler_cls = scheduler_cls

    def persistent_id(self, obj: Any) -> Any:
        if obj is self._scheduler_cls:
            return _SCHEDULER_CLASS_PID
        if type(obj) in _SCHEDULER_TYPES:
            return None
        ours = self._scheduler_cls.__module__
        cls = obj if isinstance(obj, type) else type(obj) if callable(obj) else None
        if cls is not None and not allowed_class(cls, ours, _listed(self._scheduler_cls)):
            # Whatever pickle would save by name must be one the loader accepts.
            raise pickle.PicklingError(f"{_name_of(obj)} is not plain data")
        return None


def _name_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"{module}.{name}"


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, scheduler_cls: type, saved_module: str) -> None:
        super().__init__(file)
        self._scheduler_cls = scheduler_cls
        self._saved_module = saved_module

    def persistent_load(self, pid: Any) -> Any:
        if pid == _SCHEDULER_CLASS_PID:
            return self._scheduler_cls
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a coordinator snapshot")

    def find_class(self, module: str, name: str) -> Any:
        ours = self._scheduler_cls.__module__
        if module == self._saved_module and module != "builtins":
            # Other classes from the user's scheduler file: look them up in the
            # module this replica loaded the file as.
            module = ours
        allowed = _ALLOWED_OBJECTS.get((module, name))
        if allowed is not None:
            return allowed
        for cls in _listed(self._scheduler_cls):
            if (cls.__module__, cls.__qualname__) == (module, name):
                return cls
        if module in (ours, _RECORDS_MODULE):
            obj: Any = sys.modules.get(module)
            for part in name.split(".")[:8]:
                obj = getattr(obj, part, None)
            if obj is not None and allowed_class(obj, ours):
                return obj
        raise BadSnapshot(
            f"a coordinator snapshot names {module[:100]}.{name[:100]}, which a snapshot may not hold "
            "(only the scheduler module's classes and plain data); refusing to restore it"
        )
