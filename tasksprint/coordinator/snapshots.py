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
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any

from tasksprint import codec
from tasksprint.coordinator.state import CoordinatorState
from tasksprint.machine import StopReplica

__all__ = ["SchedulerMismatch", "dump", "load", "mismatch_message"]

# 2: clients carry their prefetch sets; 3: placement heaps, client queues;
# 4: state records in the tasksprint.coordinator package.
_FORMAT = 4
_SCHEDULER_CLASS_PID = "scheduler-class"


class SchedulerMismatch(StopReplica):
    """This replica's scheduler code differs from the code the computation started with."""


def mismatch_message(what: str) -> str:
    return (
        f"this replica runs different scheduler code than the one the computation started with "
        f"({what}); start every replica with the same scheduler file"
    )


def dump(state: CoordinatorState, scheduler_cls: type, code_digest: str) -> bytes:
    """Encode ``state``; raises ``TypeError`` naming what the user must change if it cannot be pickled."""
    try:
        buf = io.BytesIO()
        _Pickler(buf, scheduler_cls).dump(state)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(
            f"cannot snapshot the coordinator: every attribute of {scheduler_cls.__qualname__} "
            f"must be picklable (no open files, sockets, lambdas or generators): {exc}"
        ) from exc
    return codec.encode([_FORMAT, code_digest, scheduler_cls.__module__, buf.getvalue()])


def load(data: bytes, scheduler_cls: type, code_digest: str) -> CoordinatorState:
    """Decode a :func:`dump`.

    Raises :class:`SchedulerMismatch` if it was taken with different
    scheduler code, ``ValueError`` if it is not a snapshot.
    """
    decoded = codec.decode(data)
    if not (isinstance(decoded, list) and len(decoded) == 4 and decoded[0] == _FORMAT):
        raise ValueError("not a coordinator snapshot (or one from an incompatible version)")
    _, digest, module, blob = decoded
    if digest != code_digest:
        raise SchedulerMismatch(
            mismatch_message(f"snapshot code digest {digest[:16]}..., this replica {code_digest[:16]}...")
        )
    state = _Unpickler(io.BytesIO(blob), scheduler_cls, module).load()
    assert isinstance(state, CoordinatorState)
    return state


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, scheduler_cls: type) -> None:
        super().__init__(file, protocol=5)
        self._scheduler_cls = scheduler_cls

    def persistent_id(self, obj: Any) -> Any:
        if obj is self._scheduler_cls:
            return _SCHEDULER_CLASS_PID
        return None


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
        # Other classes from the user's scheduler file: look them up in the
        # module this replica loaded the file as.
        if module == self._saved_module and module != "builtins":
            obj: Any = sys.modules[self._scheduler_cls.__module__]
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        return super().find_class(module, name)
