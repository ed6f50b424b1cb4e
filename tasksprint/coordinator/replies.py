"""A client's view as typed values: what the coordinator tells a worker client to do.

Theory of operation
-------------------
A worker client long-polls a replica with a
:class:`~tasksprint.coordinator.ops.ViewRequest`; the answer is a
:class:`ClientView` (built by :func:`tasksprint.coordinator.views.view`):
the tasks assigned to the client since the version it last saw
(:class:`Assignment`, each with where its inputs are, :class:`InputLocation`),
the tasks it must kill, and later moves of inputs it needs
(:class:`HolderChange`).  The client passes ``version`` back next time.

These values cross the network into the client, so each field has a cheap
validator: a malformed view is a :class:`~tasksprint.codec.BadMessage` in the
client's decoder, never an exception deeper in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from tasksprint.codec import message
from tasksprint.coordinator.ops import is_int

__all__ = ["Assignment", "ClientView", "HolderChange", "InputLocation"]

_str = attrs.validators.instance_of(str)
_opt_str = attrs.validators.optional(_str)


def _int(_inst: Any, attribute: Any, value: Any) -> None:
    if not is_int(value):
        raise TypeError(f"{attribute.name} must be an int, got {value!r:.100}")


def _opt_int(inst: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        _int(inst, attribute, value)


def _tuple_of(check: Callable[[Any], bool], what: str) -> Callable[[Any], tuple[Any, ...]]:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or not all(check(v) for v in value):
            raise TypeError(f"expected a list of {what}, got {value!r:.100}")
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
    timeout: float | None = attrs.field(validator=attrs.validators.optional(attrs.validators.instance_of((int, float))))
    keys: tuple[str, ...] = attrs.field(converter=_tuple_of(lambda k: isinstance(k, str), "output keys"))
    inputs: tuple[InputLocation, ...] = attrs.field(
        converter=_tuple_of(lambda i: isinstance(i, InputLocation), "input locations")
    )


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
    only as holder changes.
    """

    version: int = attrs.field(validator=_int)
    state: str = attrs.field(validator=attrs.validators.in_(["waiting", "running", "finished", "failed"]))
    alive: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    client_timeout: float = attrs.field(validator=attrs.validators.instance_of((int, float)))
    tasks: tuple[Assignment, ...] = attrs.field(
        default=(), converter=_tuple_of(lambda t: isinstance(t, Assignment), "assignments")
    )
    kill: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of(is_int, "task ids"))
    holders: tuple[HolderChange, ...] = attrs.field(
        default=(), converter=_tuple_of(lambda h: isinstance(h, HolderChange), "holder changes")
    )
