"""Checking what a scheduler passes to its actions: ``start_task`` specs, ``finish`` values.

Theory of operation
-------------------
A scheduler calls ``start_task`` with whatever Python values it likes; every
replica must derive the same task from them, and a node in any language
must be able to read its arguments.  :func:`task_spec` turns the call's
arguments into a :class:`TaskSpec` or raises ``TypeError`` / ``ValueError``
with a message saying how to fix the call (the hook then fails with it).
Arguments must be plain data (:func:`check_plain`); tag sets are sorted, so
a set's process-dependent order never reaches the log.  Nothing here
changes the state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from tasksprint import codec
from tasksprint.coordinator.ops import is_int
from tasksprint.coordinator.state import TaskRecord, TaskState

__all__ = ["TaskSpec", "check_plain", "task_seed", "task_spec"]


@attrs.frozen(kw_only=True)
class TaskSpec:
    """A checked ``start_task`` call."""

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


def task_spec(tasks: Mapping[int, TaskRecord], **call: Any) -> TaskSpec:
    """Check the keyword arguments of a ``start_task`` call against the existing ``tasks``.

    Raises ``TypeError`` or ``ValueError`` saying what to change.
    """
    name, args, kwargs, pretasks = call["name"], call["args"], call["kwargs"], call["pretasks"]
    prekeys, keys, replicas, retries, timeout = (
        call["prekeys"],
        call["keys"],
        call["replicas"],
        call["retries"],
        call["timeout"],
    )
    if not isinstance(name, str) or not name:
        raise TypeError(f"start_task(name=...) must be the node method's name, a non-empty string, got {name!r}")
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"start_task(args=...) must be a list or tuple, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"start_task(kwargs=...) must be a dict with string keys, got {kwargs!r}")
    check_plain(list(args), "start_task(args=...)")
    check_plain(kwargs, "start_task(kwargs=...)")
    if not isinstance(pretasks, (list, tuple)):
        raise TypeError(
            f"start_task(pretasks=...) must be a list or tuple of task ids (a set's order differs "
            f"between replicas), got {type(pretasks).__name__}"
        )
    for p in pretasks:
        if not is_int(p) or p not in tasks:
            raise ValueError(f"start_task(pretasks=...): {p!r} is not the id of a started task")
        if tasks[p].state in (TaskState.FAILED, TaskState.KILLED):
            raise ValueError(
                f"start_task(pretasks=...): task {p} is {tasks[p].state.value} and will never produce outputs"
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
    require_tags = _tags(call["require"], "require")
    want_tags = _tags(call["want"], "want")
    if not is_int(replicas) or replicas < 1:
        raise ValueError(f"start_task(replicas=...) must be an int >= 1, got {replicas!r}")
    if not is_int(retries) or retries < 0:
        raise ValueError(f"start_task(retries=...) must be an int >= 0, got {retries!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"start_task(timeout=...) must be None or a positive number of seconds, got {timeout!r}")
    return TaskSpec(
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
    )


def task_seed(seed: int, tid: int) -> int:
    """The seed a node gets for task ``tid`` of the computation seeded with ``seed``."""
    # Independent of the attempt and of the client, so every copy and every
    # retry of a task draws the same numbers.  48 bits: nodes in languages
    # whose JSON numbers are doubles read it exactly.
    return int.from_bytes(hashlib.sha256(f"tasksprint-task-seed:{seed}:{tid}".encode()).digest()[:6], "big")


_SCALARS = (str, int, float, bool, type(None))


def check_plain(value: Any, what: str) -> None:
    """Raise ``TypeError`` unless ``value`` is plain data that every replica and node reads alike."""
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
