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

Command tasks
~~~~~~~~~~~~~
A call with ``cmd=`` or ``argv=`` starts a *command task*, run by the
client's built-in runner (:mod:`tasksprint.exec`) instead of a node: its
:class:`~tasksprint.exec.spec.CommandSpec` is checked here (a bad one fails
the hook) and carried as plain data in the task's kwargs under the reserved
method name :data:`COMMAND_TASK` (:func:`command_kwargs`); the client reads
it back with :func:`command_from_kwargs`.  A command task's outputs are its
:class:`~tasksprint.exec.spec.CommandRecord` as plain data
(:func:`record_outputs`); by default all of them go to ``task_done``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import attrs

from tasksprint import codec
from tasksprint.coordinator.ops import is_int
from tasksprint.coordinator.state import TaskRecord, TaskState
from tasksprint.exec.spec import CommandRecord, CommandSpec, Limits, OutputSummary

__all__ = [
    "COMMAND_KEYS",
    "COMMAND_TASK",
    "USAGE_KEYS",
    "TaskSpec",
    "check_plain",
    "command_from_kwargs",
    "command_kwargs",
    "record_outputs",
    "task_seed",
    "task_spec",
]

#: The method name of a command task: never a node method's (not an identifier).
COMMAND_TASK = "tasksprint:command"
#: A command task's outputs: the fields of its record.
COMMAND_KEYS: tuple[str, ...] = codec.field_names(CommandRecord)
#: The outputs of a command task that say how its run ended and what it used:
#: ``tasksprint info``'s ``usage`` (the service) and ``stats`` in a kolejka result.
USAGE_KEYS = (
    "signal",
    "elapsed_s",
    "user_cpu_s",
    "system_cpu_s",
    "peak_memory_bytes",
    "limits_hit",
    "enforcement",
)
_COMMAND_FIELDS = (
    "cmd",
    "argv",
    "cwd",
    "env",
    "stdin",
    "stdout",
    "stderr",
    "limits",
    "sandbox",
    "network",
    "files",
    "results",
)


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
    prekeys, replicas, retries, timeout = (
        call["prekeys"],
        call["replicas"],
        call["retries"],
        call["timeout"],
    )
    command = _command_call(call)
    if command is not None:
        if name is not None:
            raise TypeError(f"start_task(name={name!r}) names a node method: a command task (cmd= or argv=) has none")
        if args or kwargs:
            raise TypeError("start_task(args=..., kwargs=...) are a node method's: a command task takes neither")
        name, args, kwargs = COMMAND_TASK, [], command_kwargs(command)
        if call["keys"] is None:
            call = {**call, "keys": list(COMMAND_KEYS)}
    elif not isinstance(name, str) or not name or name == COMMAND_TASK:
        raise TypeError(f"start_task(name=...) must be the node method's name, a non-empty string, got {name!r}")
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"start_task(args=...) must be a list or tuple, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"start_task(kwargs=...) must be a dict with string keys, got {kwargs!r}")
    check_plain(list(args), "start_task(args=...)")
    if command is None:
        # A command task's kwargs are built above from a checked CommandSpec: plain by construction.
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
    keys = [] if call["keys"] is None else call["keys"]
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


#: Checked commands by the content of their ``start_task`` arguments (see _command_call).
_CHECKED: collections.OrderedDict[Hashable, CommandSpec] = collections.OrderedDict()
CHECKED_KEPT = 1024  # distinct commands whose check is remembered, least recently used dropped


class _NoKey(Exception):
    """A value :func:`_content_key` does not describe exactly (a class of the caller's, a ``Limits``)."""


def _content_key(value: Any) -> Hashable:
    """A key equal for two values only if checking them must give equal results.

    Types are part of it (``1``, ``1.0`` and ``True`` differ; a list is not a
    tuple), and so is the order of a dict's entries; a float is keyed by its
    ``repr`` (``0.0`` and ``-0.0`` are equal numbers but encode differently).
    Anything but plain data raises :class:`_NoKey`.
    """
    t = type(value)
    if t is float:
        return (t, repr(value))
    if t is str or t is int or t is bool or t is bytes or value is None:
        return (t, value)
    if t is list or t is tuple:
        return (t, tuple(_content_key(v) for v in value))
    if t is dict:
        return (t, tuple((_content_key(k), _content_key(v)) for k, v in value.items()))
    raise _NoKey


def _command_call(call: Mapping[str, Any]) -> CommandSpec | None:
    """The command of a ``start_task`` call with ``cmd=`` or ``argv=``, or None for a node task.

    A queue scheduler starts many tasks with the same command: a command whose
    arguments were checked before, with the same content (:func:`_content_key`),
    gets the same :class:`CommandSpec` (immutable) without the check.  The
    result is a function of the content alone, so a replica whose memory of
    checks differs (restarted, or fed another order of calls) starts the same
    tasks; a check that fails is never remembered.
    """
    given = {k: call[k] for k in _COMMAND_FIELDS if call.get(k) not in (None, False)}
    if "cmd" not in given and "argv" not in given:
        if given:
            raise TypeError(f"start_task({', '.join(sorted(given))}=...) belong to a command task: give cmd= or argv=")
        return None
    try:
        key: Hashable | None = _content_key(given)
    except _NoKey:
        key = None
    if key is not None:
        spec = _CHECKED.get(key)
        if spec is not None:
            _CHECKED.move_to_end(key)
            return spec
    spec = _check_command(given)
    if key is not None:
        _CHECKED[key] = spec
        if len(_CHECKED) > CHECKED_KEPT:
            _CHECKED.popitem(last=False)
    return spec


def _check_command(given: dict[str, Any]) -> CommandSpec:
    """The checked :class:`CommandSpec` of a command task's arguments (``given``: those set)."""
    limits = given.get("limits")
    if isinstance(limits, dict):
        unknown = sorted(set(limits) - set(codec.field_names(Limits)))
        if unknown:
            raise ValueError(
                f"start_task(limits=...) has unknown keys {unknown}; known: {list(codec.field_names(Limits))}"
            )
        given["limits"] = Limits(**limits)
    elif limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"start_task(limits=...) must be a Limits or a dict of its fields, got {limits!r:.100}")
    try:
        return CommandSpec(**given)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"start_task(...) command: {exc}") from None


def command_kwargs(spec: CommandSpec) -> dict[str, Any]:
    """``spec`` as the plain-data kwargs of a command task (what the log and ``info`` carry)."""
    limits = {name: getattr(spec.limits, name) for name in codec.field_names(Limits)}
    if limits["cpuset"] is not None:
        limits["cpuset"] = list(limits["cpuset"])
    return {
        "command": {
            "cmd": spec.cmd,
            "argv": None if spec.argv is None else list(spec.argv),
            "cwd": spec.cwd,
            "env": dict(spec.env),
            "stdin": spec.stdin,
            "stdout": spec.stdout,
            "stderr": spec.stderr,
            "limits": {k: v for k, v in limits.items() if v is not None},
            "sandbox": spec.sandbox,
            "network": spec.network,
            "files": {name: base64.b64encode(content).decode("ascii") for name, content in spec.files},
            "results": list(spec.results),
        }
    }


def command_from_kwargs(kwargs: Mapping[str, Any]) -> CommandSpec:
    """The :class:`CommandSpec` in a command task's kwargs; ``ValueError`` if it is malformed."""
    plain = kwargs.get("command")
    if not isinstance(plain, dict) or not set(plain) <= set(_COMMAND_FIELDS):
        raise ValueError(f"a command task's kwargs must hold its command, got {plain!r:.200}")
    limits = plain.get("limits") or {}
    if not isinstance(limits, dict):
        raise ValueError(f"a command's limits must be a map, got {limits!r:.200}")
    files = plain.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError("a command's files must map names to base64 text")
    try:
        decoded = {name: base64.b64decode(text, validate=True) for name, text in files.items()}
        return CommandSpec(**{**plain, "limits": Limits(**limits), "files": decoded})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad command: {exc}") from None


def _summary(out: OutputSummary | None) -> dict[str, Any] | None:
    if out is None:
        return None
    return {
        "size_bytes": out.size_bytes,
        "cut": out.cut,
        "head": out.head.decode("utf-8", "replace"),
        "tail": out.tail.decode("utf-8", "replace"),
    }


def record_outputs(record: CommandRecord) -> dict[str, Any]:
    """A command task's outputs: ``record`` as plain data (JSON-ready; output snippets as text)."""
    out = {name: getattr(record, name) for name in codec.field_names(CommandRecord)}
    out["verdict"] = record.verdict.value
    out["enforcement"] = record.enforcement.value
    out["limits_hit"] = [v.value for v in record.limits_hit]
    out["unenforced"] = list(record.unenforced)
    out["stdout"] = _summary(record.stdout)
    out["stderr"] = _summary(record.stderr)
    return out
