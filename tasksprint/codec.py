"""CBOR encoding of TaskSprint's message classes.

Every value that crosses a process boundary or reaches the disk is either
plain CBOR data (None, bool, int, float, str, bytes, list, dict) or an
instance of a frozen attrs class registered here.  A registered instance is
encoded as CBOR tag ``OBJECT_TAG`` around ``[name, field1, field2, ...]`` in
field order, so encodings are compact and the same on every replica.

This module does no I/O; the Paxos core and the state machines may import it.
Network data is decoded with :func:`decode_untrusted`, which can only raise
:class:`BadMessage`.
"""

from __future__ import annotations

import io
import operator
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast, dataclass_transform

import attrs
import cbor2

__all__ = [
    "BadMessage",
    "field_names",
    "message",
    "register",
    "trusted",
    "check_trusted",
    "encode",
    "decode",
    "decode_untrusted",
    "OBJECT_TAG",
]

#: CBOR tag number for a registered object (in the first-come-first-served range).
OBJECT_TAG = 55799 + 4242

T = TypeVar("T", bound=type)
M = TypeVar("M")

_by_name: dict[str, type] = {}
# Per wire name: (class, field names in wire order), for the decoder.
_decoders: dict[str, tuple[type, tuple[str, ...]]] = {}
_fields: dict[type, tuple[str, ...]] = {}
# Per class: (wire name, getter of the field values as a tuple, keeps its encoding).
_encoders: dict[type, tuple[str, Callable[[Any], tuple[Any, ...]], bool]] = {}
# Per class: the values of its fields that are not set by ``__init__`` (caches), for :func:`trusted`.
_not_init: dict[type, tuple[tuple[str, Any], ...]] = {}

#: Set (to anything) to make :func:`trusted` run every validator and converter
#: too and compare: the test suite sets it, so a builder that passes a wrong
#: type is caught there, while a replica builds its answers at full speed.
CHECK_TRUSTED_ENV = "TASKSPRINT_CHECK_TRUSTED"
_check_trusted = bool(os.environ.get(CHECK_TRUSTED_ENV))


def check_trusted(on: bool) -> None:
    """Make :func:`trusted` also run the checked constructor (in this process; the env var reaches children)."""
    global _check_trusted
    _check_trusted = on


class BadMessage(Exception):
    """Data from the network (or a file) that is not a valid TaskSprint value."""


def register(cls: T) -> T:
    """Class decorator: make a frozen attrs class encodable.

    The class name is its wire name, so renaming a class changes the wire
    format; two classes with one name are refused.
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls.__qualname__} must be an attrs class to be registered")
    name = cls.__name__
    if name in _by_name and _by_name[name] is not cls:
        raise TypeError(f"two message classes are both called {name!r}")
    _by_name[name] = cls
    # Fields with init=False are caches (see ``_cbor``), not part of the value.
    names = tuple(a.name for a in attrs.fields(cls) if a.init)
    _fields[cls] = names
    _decoders[name] = (cls, names)
    getter = operator.attrgetter(*names) if len(names) > 1 else (lambda v, n=names: tuple(getattr(v, x) for x in n))
    _encoders[cls] = (name, getter, "_cbor" in attrs.fields_dict(cls))
    _not_init[cls] = tuple((a.name, a.default) for a in attrs.fields(cls) if not a.init)
    # attrs.has() narrowed cls to an attrs class; callers get their own class back.
    return cast(T, cls)


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(attrs.field,))
def message(cls: T) -> T:
    """Class decorator declaring a message: a frozen, keyword-only attrs class, registered.

    The one way to declare a value that crosses a process boundary::

        @message
        class Heartbeat:
            ballot: Ballot
            commit: int = attrs.field(validator=non_negative)
    """
    return register(attrs.frozen(kw_only=True)(cls))


def field_names(cls: type) -> tuple[str, ...]:
    """The fields of a registered message class, in wire order."""
    return _fields[cls]


def trusted(cls: type[M], **fields: Any) -> M:
    """Build message ``cls`` from values this process made itself, skipping validators and converters.

    The validators of a message guard the decoder against hostile bytes; a
    replica answering a query already holds checked values, and running the
    checks again on every answer costs more than building it (as pydantic's
    ``model_construct``).  Every field must be given, in the type it is
    stored as (a tuple where the converter would make one).  With
    ``TASKSPRINT_CHECK_TRUSTED`` set, the checked constructor runs too and
    must give an equal value.
    """
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    for name, value in _not_init[cls]:
        object.__setattr__(obj, name, value)
    if _check_trusted:
        names = _fields[cls]
        if set(fields) != set(names):
            raise TypeError(f"trusted({cls.__name__}) needs exactly the fields {names}, got {sorted(fields)}")
        checked = cls(**fields)
        if checked != obj or any(type(getattr(checked, n)) is not type(fields[n]) for n in names):
            raise TypeError(f"trusted({cls.__name__}) was given values its constructor would change: {fields!r:.300}")
    return obj


def _default(encoder: cbor2.CBOREncoder, value: Any) -> None:
    spec = _encoders.get(type(value))
    if spec is None:
        raise TypeError(f"cannot encode {type(value).__qualname__}: not a registered message class")
    name, getter, cached = spec
    if cached:
        # A class with a ``_cbor`` field keeps its encoding: values that go to
        # several peers and to the disk are encoded once.
        data = value._cbor
        if data is None:
            data = cbor2.dumps(cbor2.CBORTag(OBJECT_TAG, [name, *getter(value)]), default=_default, canonical=True)
            object.__setattr__(value, "_cbor", data)
        encoder.write(data)
        return
    # The tag's head written as bytes, then the array: what encoding a
    # CBORTag would write, without building one per object.
    encoder.write(_TAG_HEAD)
    encoder.encode([name, *getter(value)])


# CBOR head of tag OBJECT_TAG (major type 6, a two-byte argument).
_TAG_HEAD = b"\xd9" + OBJECT_TAG.to_bytes(2, "big")


def _tag_hook(tag: cbor2.CBORTag, _immutable: bool = False) -> Any:
    raise BadMessage(f"unknown CBOR tag {tag.tag}")


def _decode_object(body: Any, _immutable: bool = False) -> Any:
    # A semantic decoder (not a tag hook) so the fields inside decode as
    # ordinary lists and dicts, as they were before encoding.  It runs for
    # every object a peer sends (a view holds one per task and input), hence
    # the one lookup and the exact type tests.
    if (type(body) is not list and type(body) is not tuple) or not body or type(body[0]) is not str:
        raise BadMessage("malformed object: expected [name, fields...]")
    spec = _decoders.get(body[0])
    if spec is None:
        raise BadMessage(f"unknown message type {body[0]!r:.100}")
    cls, names = spec
    if len(body) - 1 != len(names):
        raise BadMessage(f"{body[0]} takes {len(names)} fields, got {len(body) - 1}")
    try:
        return cls(**dict(zip(names, body[1:])))
    except (TypeError, ValueError) as exc:
        raise BadMessage(f"invalid {body[0]}: {bounded(str(exc))}") from None


#: Longest error text built from a peer's data (validator messages may quote it).
MAX_ERROR_CHARS = 300


def bounded(text: str) -> str:
    """``text`` cut to :data:`MAX_ERROR_CHARS` characters, so a log line about bad data stays small."""
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


_REFUSED = "CBOR tag not allowed"


def _refuse_tag(*_args: Any) -> Any:
    raise BadMessage(_REFUSED)


#: Nesting of arrays and maps a decoder follows before refusing the data.
MAX_DEPTH = 64

# cbor2 decodes many tags itself (shared references 28/29, sets, bignums,
# decimals, datetimes, regexes, MIME, UUIDs, IP addresses...).  Some of them
# cost without bound: a shared-reference DAG hashed as a map key is
# exponential, a decimal with a huge exponent takes minutes to convert.  Our
# encoder writes none of them, so every tag below 2**16 but ours is refused
# here; larger ones reach ``_tag_hook``, which refuses them too.
_SEMANTIC: dict[int, Callable[..., Any]] = {tag: _refuse_tag for tag in range(1 << 16)}
_SEMANTIC[OBJECT_TAG] = _decode_object
# Canonical encodings never hold indefinite lengths or a key twice, and a
# nesting deeper than MAX_DEPTH is no message of ours.
_STRICT: dict[str, Any] = dict(
    tag_hook=_tag_hook,
    semantic_decoders=_SEMANTIC,
    max_depth=MAX_DEPTH,
    allow_indefinite=False,
    allow_duplicate_keys=False,
)


def encode(value: Any) -> bytes:
    """Encode plain data and registered objects to canonical CBOR bytes."""
    return cbor2.dumps(value, default=_default, canonical=True)


def encode_array(items: list[bytes]) -> bytes:
    """The canonical CBOR array of values given already encoded: ``encode(list)`` without encoding them again."""
    n = len(items)
    if n < 24:
        head = bytes([0x80 + n])
    elif n < 1 << 8:
        head = bytes([0x98, n])
    elif n < 1 << 16:
        head = b"\x99" + n.to_bytes(2, "big")
    elif n < 1 << 32:
        head = b"\x9a" + n.to_bytes(4, "big")
    else:
        head = b"\x9b" + n.to_bytes(8, "big")
    return head + b"".join(items)


def decode(data: bytes) -> Any:
    """Decode bytes this process (or a trusted file) produced, with the same strict rules."""
    return cbor2.loads(data, **_STRICT)


def decode_untrusted(data: bytes) -> Any:
    """Decode bytes from the network; any problem raises :class:`BadMessage`.

    Only plain CBOR data and our own tag (``OBJECT_TAG``) are accepted, nested
    at most ``MAX_DEPTH`` deep, with definite lengths and no repeated map key.
    The bytes must hold exactly one CBOR item: trailing bytes are refused, so
    a frame cannot smuggle data past the decoder.
    """
    try:
        fp = io.BytesIO(data)
        value = cbor2.CBORDecoder(fp, **_STRICT).decode()
        if fp.tell() != len(data):
            raise BadMessage(f"{len(data) - fp.tell()} trailing bytes after the CBOR item")
        return value
    except BadMessage:
        raise
    except Exception as exc:  # cbor2 raises several types on garbage
        if isinstance(exc.__cause__, BadMessage):  # raised by our hooks, wrapped by cbor2
            if exc.__cause__.args == (_REFUSED,):
                raise BadMessage(f"{_REFUSED}: {exc}") from None
            raise BadMessage(str(exc.__cause__)) from None
        raise BadMessage(f"undecodable CBOR: {exc}") from None


def tuple_of(item_check: Callable[[Any], bool] | None = None) -> Callable[[Any], tuple[Any, ...]]:
    """attrs converter: accept any list/tuple (CBOR gives lists) and store a tuple."""

    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a sequence, got {type(value).__name__}")
        out = tuple(value)
        if item_check is not None:
            for item in out:
                if not item_check(item):
                    raise TypeError(f"bad element: a {type(item).__name__}")
        return out

    return convert


def int_range(low: int, high: int) -> Callable[[Any, Any, Any], None]:
    """attrs validator: an int (not a bool) from ``low`` to ``high`` inclusive; the error never quotes a huge value."""

    def check(_inst: Any, attr: Any, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            got = (
                str(value)
                if isinstance(value, int) and abs(value) < 2**64
                else f"an int of {value.bit_length()} bits"
                if isinstance(value, int)
                else f"a {type(value).__name__}"
            )
            raise ValueError(f"{attr.name} must be an int from {low} to {high}, got {got}")

    return check


def text(max_chars: int, *, min_chars: int = 0) -> Callable[[Any, Any, Any], None]:
    """attrs validator: a str of ``min_chars`` to ``max_chars`` characters."""

    def check(_inst: Any, attr: Any, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attr.name} must be a str, got a {type(value).__name__}")
        if not min_chars <= len(value) <= max_chars:
            raise ValueError(f"{attr.name} must have {min_chars} to {max_chars} characters, got {len(value)}")

    return check
