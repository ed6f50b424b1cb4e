"""The coordinator's query answers as typed values: a client's view, the status, one task's info.

Theory of operation
-------------------
A worker client long-polls a replica with a
:class:`~tasksprint.coordinator.ops.ViewRequest`; the answer is a
:class:`ClientView` (built by :func:`tasksprint.coordinator.views.view`):
the tasks assigned to the client since the version it last saw
(:class:`Assignment`, each with where its inputs are, :class:`InputLocation`),
the tasks it must kill, and later moves of inputs it needs
(:class:`HolderChange`).  The client passes ``version`` back next time.

The ``status`` query is answered with a :class:`ComputationStatus` (the
computation at a glance) and ``info`` with a :class:`TaskInfo` (everything
about one task) or None; the command line, ``tasksprint run``'s progress and
the fault-injection monitor read their fields.  :meth:`ComputationStatus.of`
and :meth:`TaskInfo.of` build them from the read models of
:mod:`tasksprint.coordinator.views`, and ``attrs.asdict`` gives those plain
shapes back (the ``--json`` output).

These values cross the network, so each field has a cheap validator: a
malformed answer is a :class:`~tasksprint.codec.BadMessage` in the
receiver's decoder, never an exception deeper in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from tasksprint.codec import message
from tasksprint.coordinator.ops import is_int

__all__ = [
    "Assignment",
    "ClientCounts",
    "ClientLoad",
    "ClientView",
    "ComputationFailure",
    "ComputationResult",
    "ComputationStatus",
    "HolderChange",
    "HookCall",
    "InputLocation",
    "TaskGraph",
    "TaskInfo",
    "TaskValues",
]

# The validators run for every value a client decodes (a view per poll), so
# they are plain functions with exact type tests: CBOR decodes to exact
# ``int``/``str``/``float``, and ``type(v) is int`` also refuses a bool.


def _str(_inst: Any, attribute: Any, value: Any) -> None:
    if type(value) is not str:
        raise TypeError(f"{attribute.name} must be a str, got {type(value).__name__}")


def _opt_str(_inst: Any, attribute: Any, value: Any) -> None:
    if value is not None and type(value) is not str:
        raise TypeError(f"{attribute.name} must be a str or None, got {type(value).__name__}")


def _int(_inst: Any, attribute: Any, value: Any) -> None:
    if type(value) is not int:
        raise TypeError(f"{attribute.name} must be an int, got {type(value).__name__}")


def _opt_int(_inst: Any, attribute: Any, value: Any) -> None:
    if value is not None and type(value) is not int:
        raise TypeError(f"{attribute.name} must be an int or None, got {type(value).__name__}")


def _number(_inst: Any, attribute: Any, value: Any) -> None:
    if type(value) is not float and type(value) is not int:
        raise TypeError(f"{attribute.name} must be a number, got {type(value).__name__}")


def _opt_number(inst: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        _number(inst, attribute, value)


def _opt_dict(_inst: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{attribute.name} must be a dict or None, got {type(value).__name__}")


def _counts(_inst: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and is_int(n) for k, n in value.items()):
        raise TypeError(f"{attribute.name} must map names to ints, got {value!r:.100}")


def _tuple_of(check: Callable[[Any], bool], what: str) -> Callable[[Any], tuple[Any, ...]]:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or not all(check(v) for v in value):
            raise TypeError(f"expected a list of {what}, got {value!r:.100}")
        return tuple(value)

    return convert


def _tuple_of_type(cls: type, what: str) -> Callable[[Any], tuple[Any, ...]]:
    """Converter: a list or tuple whose items are all exactly ``cls``, stored as a tuple."""

    def convert(value: Any) -> tuple[Any, ...]:
        if type(value) is not tuple and type(value) is not list:
            raise TypeError(f"expected a list of {what}, got {type(value).__name__}")
        for v in value:
            if type(v) is not cls:
                raise TypeError(f"expected a list of {what}, got an item of type {type(v).__name__}")
        return tuple(value)

    return convert


@message
class InputLocation:
    """Input of a task: output ``key`` (all outputs: None) of task ``tid``, held by client ``cid`` at ``addr``.

    ``cid`` and ``addr`` are None while no live client holds it.
    """

    tid: int = attrs.field(validator=_int)
    key: str | None = attrs.field(validator=_opt_str)
    cid: int | None = attrs.field(validator=_opt_int)
    addr: str | None = attrs.field(validator=_opt_str)


@message
class Assignment:
    """Run attempt ``attempt`` of task ``tid``: node method ``name`` on ``inputs``, ``args``, ``kwargs``.

    A task listed again supersedes the earlier listing (a higher ``attempt``
    replaces the running one).
    """

    tid: int = attrs.field(validator=_int)
    attempt: int = attrs.field(validator=_int)
    name: str = attrs.field(validator=_str)
    args: list[Any] = attrs.field(validator=attrs.validators.instance_of(list))
    kwargs: dict[str, Any] = attrs.field(validator=attrs.validators.instance_of(dict))
    seed: int = attrs.field(validator=_int)
    timeout: float | None = attrs.field(validator=_opt_number)
    keys: tuple[str, ...] = attrs.field(converter=_tuple_of_type(str, "output keys"))
    inputs: tuple[InputLocation, ...] = attrs.field(converter=_tuple_of_type(InputLocation, "input locations"))


@message
class HolderChange:
    """Task ``tid``'s outputs are now held by client ``cid`` at ``addr`` (None: nowhere for now)."""

    tid: int = attrs.field(validator=_int)
    cid: int | None = attrs.field(validator=_opt_int)
    addr: str | None = attrs.field(validator=_opt_str)


@message
class ClientView:
    """What a client must do, changed since the version it asked after.

    ``state`` is the computation's (waiting, running, finished, failed);
    ``alive`` False means the client was declared dead and must join
    again; ``client_timeout`` is how long it may stay silent.  ``tasks``
    and ``kill`` are by tid; ``holders`` says where outputs moved (appeared,
    were lost, or their client moved) that some task placed here reads:
    the inputs of a listed task are as of this view, later changes come
    only as holder changes.  ``released`` lists outputs held here that no
    task needs any more.
    """

    version: int = attrs.field(validator=_int)
    state: str = attrs.field(validator=attrs.validators.in_(["waiting", "running", "finished", "failed"]))
    alive: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    client_timeout: float = attrs.field(validator=_number)
    tasks: tuple[Assignment, ...] = attrs.field(default=(), converter=_tuple_of_type(Assignment, "assignments"))
    kill: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_type(int, "task ids"))
    holders: tuple[HolderChange, ...] = attrs.field(
        default=(), converter=_tuple_of_type(HolderChange, "holder changes")
    )
    #: Tasks whose outputs this client holds and may drop: every task reading them has finished.
    released: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_type(int, "task ids"))


_ints = _tuple_of(is_int, "ints")
_strs = _tuple_of(lambda v: isinstance(v, str), "strings")
_opt_strs = _tuple_of(lambda v: v is None or isinstance(v, str), "strings or None")


# -- status -----------------------------------------------------------------------------


@message
class TaskValues:
    """The values task ``tid`` gave for its ``keys`` (None if it gave none)."""

    tid: int = attrs.field(validator=_int)
    values: dict[str, Any] | None = attrs.field(validator=_opt_dict)


@message
class ComputationResult:
    """What ``finish`` was given: ``values``, and the values of the tasks it named."""

    values: Any
    tasks: tuple[TaskValues, ...] = attrs.field(converter=_tuple_of(lambda t: isinstance(t, TaskValues), "task values"))


@message
class ComputationFailure:
    """Why the computation failed: a scheduler hook raised (``kind`` hook), a task failed for good (task),
    or tasks were cancelled from outside and the scheduler has no ``task_killed`` hook (cancel).

    ``message`` is the report for people, ``error`` the exception or the task's error.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(["hook", "task", "cancel"]))
    hook: str | None = attrs.field(validator=_opt_str)
    tid: int | None = attrs.field(validator=_opt_int)
    cid: int | None = attrs.field(validator=_opt_int)
    slot: int | None = attrs.field(validator=_opt_int)
    error: str = attrs.field(validator=_str)
    message: str = attrs.field(validator=_str)


@message
class HookCall:
    """The last scheduler hook called: its name, the task or client it was about, the log slot."""

    hook: str = attrs.field(validator=_str)
    tid: int | None = attrs.field(validator=_opt_int)
    cid: int | None = attrs.field(validator=_opt_int)
    slot: int | None = attrs.field(validator=_opt_int)


@message
class ClientCounts:
    """How many clients are live and how many were declared dead."""

    live: int = attrs.field(validator=_int)
    dead: int = attrs.field(validator=_int)


@message
class ClientLoad:
    """One live client: ``running`` tasks take its slots, ``prefetching`` ones still wait for an input.

    Filled in by the replica answering (not replicated state): ``heard_s``,
    seconds since the client was last heard from (as the leader knows it),
    and ``cpu_percent`` and ``rss_bytes``, what the client last reported
    using with its node processes; None when unknown.
    """

    cid: int = attrs.field(validator=_int)
    name: str = attrs.field(validator=_str)
    addr: str = attrs.field(validator=_str)
    slots: int = attrs.field(validator=_int)
    running: int = attrs.field(validator=_int)
    prefetching: int = attrs.field(validator=_int)
    tags: tuple[str, ...] = attrs.field(default=(), converter=_strs)
    heard_s: float | None = attrs.field(default=None, validator=attrs.validators.optional(_number))
    cpu_percent: float | None = attrs.field(default=None, validator=attrs.validators.optional(_number))
    rss_bytes: int | None = attrs.field(default=None, validator=_opt_int)


@message
class ComputationStatus:
    """The computation at a glance: the answer to the ``status`` query.

    ``tasks`` counts tasks by state (``pending``, ``running``, ``done``, ...)
    plus ``total``; ``result`` is set once finished, ``failure`` once failed;
    ``now`` is the last TICK's time, ``version`` the state's change counter.
    """

    state: str = attrs.field(validator=attrs.validators.in_(["waiting", "running", "finished", "failed"]))
    finished: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    result: ComputationResult | None = attrs.field(
        validator=attrs.validators.optional(attrs.validators.instance_of(ComputationResult))
    )
    failure: ComputationFailure | None = attrs.field(
        validator=attrs.validators.optional(attrs.validators.instance_of(ComputationFailure))
    )
    tasks: dict[str, int] = attrs.field(validator=_counts)
    clients: ClientCounts = attrs.field(validator=attrs.validators.instance_of(ClientCounts))
    live_clients: tuple[ClientLoad, ...] = attrs.field(
        converter=_tuple_of(lambda c: isinstance(c, ClientLoad), "client loads")
    )
    now: float = attrs.field(validator=_number)
    seed: int | None = attrs.field(validator=_opt_int)
    version: int = attrs.field(validator=_int)
    last_hook: HookCall | None = attrs.field(
        validator=attrs.validators.optional(attrs.validators.instance_of(HookCall))
    )

    @property
    def ended(self) -> bool:
        """Whether the computation finished or failed."""
        return self.state in ("finished", "failed")

    @classmethod
    def of(cls, status: dict[str, Any]) -> ComputationStatus:
        """The typed form of :func:`tasksprint.coordinator.views.status`'s read model."""
        result, failure, hook = status["result"], status["failure"], status["last_hook"]
        return cls(
            state=status["state"],
            finished=status["finished"],
            result=None
            if result is None
            else ComputationResult(values=result["values"], tasks=tuple(TaskValues(**t) for t in result["tasks"])),
            failure=None if failure is None else ComputationFailure(**failure),
            tasks=status["tasks"],
            clients=ClientCounts(**status["clients"]),
            live_clients=tuple(ClientLoad(**c) for c in status["live_clients"]),
            now=status["now"],
            seed=status["seed"],
            version=status["version"],
            last_hook=None if hook is None else HookCall(**hook),
        )


# -- info -------------------------------------------------------------------------------


@message
class TaskInfo:
    """Everything known about one task: the answer to the ``info`` query (None: no such task).

    ``clients`` run its current attempt (in placement order), ``prefetching``
    are those of them where it waits for inputs; ``holder`` holds its
    outputs; ``values`` are its first completion's values of ``keys`` and
    ``sizes`` its outputs' sizes in bytes; ``dependents`` are the tasks
    that read it.
    """

    tid: int = attrs.field(validator=_int)
    name: str = attrs.field(validator=_str)
    state: str = attrs.field(validator=_str)
    attempt: int = attrs.field(validator=_int)
    failures: int = attrs.field(validator=_int)
    args: list[Any] = attrs.field(validator=attrs.validators.instance_of(list))
    kwargs: dict[str, Any] = attrs.field(validator=attrs.validators.instance_of(dict))
    pretasks: tuple[int, ...] = attrs.field(converter=_ints)
    prekeys: tuple[str | None, ...] = attrs.field(converter=_opt_strs)
    keys: tuple[str, ...] = attrs.field(converter=_strs)
    require: tuple[str, ...] = attrs.field(converter=_strs)
    want: tuple[str, ...] = attrs.field(converter=_strs)
    replicas: int = attrs.field(validator=_int)
    retries: int = attrs.field(validator=_int)
    timeout: float | None = attrs.field(validator=_opt_number)
    clients: tuple[int, ...] = attrs.field(converter=_ints)
    prefetching: tuple[int, ...] = attrs.field(converter=_ints)
    holder: int | None = attrs.field(validator=_opt_int)
    values: dict[str, Any] | None = attrs.field(validator=_opt_dict)
    sizes: dict[str, int] = attrs.field(validator=_counts)
    error: str | None = attrs.field(validator=_opt_str)
    dependents: tuple[int, ...] = attrs.field(converter=_ints)

    @classmethod
    def of(cls, info: dict[str, Any] | None) -> TaskInfo | None:
        """The typed form of :func:`tasksprint.coordinator.views.task_info`'s read model."""
        return None if info is None else cls(**info)


def _int_lists(value: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, list | tuple) for v in value):
        raise TypeError(f"pretasks must be lists of task ids, got {value!r:.100}")
    return tuple(_ints(v) for v in value)


@message
class TaskGraph:
    """A page of the task graph: the answer to the ``graph`` query.

    ``tids[i]``, named ``names[i]``, is in state ``states[i]`` and reads the tasks ``pretasks[i]``;
    ``total`` is how many tasks the computation has created.
    """

    first: int = attrs.field(validator=_int)
    total: int = attrs.field(validator=_int)
    tids: tuple[int, ...] = attrs.field(converter=_ints)
    names: tuple[str, ...] = attrs.field(converter=_strs)
    states: tuple[str, ...] = attrs.field(converter=_strs)
    pretasks: tuple[tuple[int, ...], ...] = attrs.field(converter=_int_lists)

    def __attrs_post_init__(self) -> None:
        if not len(self.tids) == len(self.names) == len(self.states) == len(self.pretasks):
            raise ValueError("a task graph's tids, names, states and pretasks must be as long as each other")

    @classmethod
    def of(cls, graph: dict[str, Any]) -> TaskGraph:
        """The typed form of :func:`tasksprint.coordinator.views.graph`'s read model."""
        return cls(**graph)
