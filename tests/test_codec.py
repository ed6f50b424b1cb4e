"""The strict CBOR decoder: only our own tag, bounded nesting, canonical shapes.

Every input here was a way to hang or slow a process before the first
authenticated byte (a handshake's Hello is decoded with ``decode_untrusted``).
"""

from __future__ import annotations

import attrs
import cbor2
import pytest

from tasksprint import codec
from tasksprint.api import Submit
from tasksprint.coordinator.replies import ClientView, HolderChange, InputLocation
from tasksprint.paxos.messages import Command


def _shared_dag(levels: int) -> bytes:
    """A one-pair map whose key is a DAG of shared references: ``2**levels`` nodes to hash.

    Level k is ``shareable([level k-1, shared-reference(level k-1)])``; the
    outermost level is shareable 0, the next 1, and so on inwards.
    """
    out = bytearray(b"\xa1")  # a map of one pair; the key follows
    for _ in range(levels):
        out += b"\xd8\x1c\x82"  # shareable [ ...
    out += b"\xd8\x1c\x81\x01"  # level 0: shareable [1]
    for k in range(1, levels + 1):
        out += b"\xd8\x1d" + cbor2.dumps(levels - k + 1)  # ... , reference to level k-1 ]
    out += b"\x00"  # the value
    return bytes(out)


def test_shared_reference_dag_is_refused_before_it_is_hashed():
    # With cbor2's built-in tags this decodes to a key whose hash walks
    # 2**28 nodes (many seconds, with the event loop blocked); refused at the first reference, it costs nothing.
    data = _shared_dag(28)
    assert len(data) < 450
    with pytest.raises(codec.BadMessage, match="tag not allowed"):
        codec.decode_untrusted(data)


@pytest.mark.parametrize(
    "tag, body",
    [
        (0, "2020-01-01T00:00:00Z"),  # datetime
        (1, 0),  # epoch datetime
        (2, b"\x01" * 64),  # bignum
        (3, b"\x01" * 64),  # negative bignum
        (4, [10**6, 1]),  # decimal fraction with a huge exponent
        (5, [10**6, 1]),  # bigfloat
        (25, 0),  # string reference
        (28, [1]),  # shareable
        (29, 0),  # shared reference
        (30, [1, 3]),  # rational
        (35, "a+"),  # regular expression
        (36, "Content-Type: text/plain\n\nx"),  # MIME
        (37, b"\x00" * 16),  # UUID
        (52, b"\x7f\x00\x00\x01"),  # IPv4
        (54, b"\x00" * 16),  # IPv6
        (100, 0),  # epoch date
        (256, ["a"]),  # string reference namespace
        (258, [1, 2]),  # set
        (260, b"\x7f\x00\x00\x01"),  # network address
        (261, {b"\x7f\x00\x00\x00": 8}),  # network prefix
        (1004, "2020-01-01"),  # date
        (55799, 1),  # self-described CBOR
        (2**40, 1),  # beyond the 16-bit range
    ],
)
def test_every_tag_but_ours_is_refused(tag, body):
    with pytest.raises(codec.BadMessage):
        codec.decode_untrusted(cbor2.dumps(cbor2.CBORTag(tag, body)))
    with pytest.raises((codec.BadMessage, cbor2.CBORDecodeError)):
        codec.decode(cbor2.dumps(cbor2.CBORTag(tag, body)))


def test_no_tag_below_two_to_the_sixteen_is_decoded():
    # A new cbor2 release adding a built-in tag must not widen what we accept.
    for tag in range(1 << 16):
        if tag == codec.OBJECT_TAG:
            continue
        with pytest.raises(codec.BadMessage):
            codec.decode_untrusted(cbor2.dumps(cbor2.CBORTag(tag, 0)))


def test_nesting_is_bounded():
    ok = b"\x81" * (codec.MAX_DEPTH - 1) + b"\x01"
    assert codec.decode_untrusted(ok) is not None
    with pytest.raises(codec.BadMessage, match="depth"):
        codec.decode_untrusted(b"\x81" * 10_000 + b"\x01")


@pytest.mark.parametrize(
    "data, why",
    [
        (bytes.fromhex("9f01ff"), "indefinite"),  # indefinite-length array
        (bytes.fromhex("5f4101ff"), "indefinite"),  # indefinite-length byte string
        (bytes.fromhex("a2616101616102"), "Duplicate"),  # {"a": 1, "a": 2}
        (bytes.fromhex("0101"), "trailing"),  # two items in one frame
    ],
)
def test_non_canonical_shapes_are_refused(data, why):
    with pytest.raises(codec.BadMessage, match=why):
        codec.decode_untrusted(data)


def test_our_objects_and_plain_data_still_round_trip():
    value = {
        "a": [1, -2, 3.5, None, True, b"x", "y"],
        "sub": Submit(command=Command(client_id="c", seq=1, first_unacked=1, op={"k": [1]})),
    }
    assert codec.decode_untrusted(codec.encode(value)) == value
    assert codec.decode(codec.encode(value)) == value


def test_message_declares_a_frozen_keyword_only_registered_class():
    @codec.message
    class ProbeMessage:
        x: int

    v = ProbeMessage(x=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        v.x = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ProbeMessage(1)  # type: ignore[misc]
    assert codec.decode_untrusted(codec.encode(v)) == v


def test_trusted_builds_the_value_the_checked_constructor_would():
    loc = codec.trusted(InputLocation, tid=3, key=None, cid=1, addr="127.0.0.1:7000")
    assert loc == InputLocation(tid=3, key=None, cid=1, addr="127.0.0.1:7000")
    assert codec.decode_untrusted(codec.encode(loc)) == loc
    # Under test every trusted build is checked: a wrong type, a missing field
    # or a value the converter would change (a list for a tuple) is caught.
    with pytest.raises(TypeError):
        codec.trusted(HolderChange, tid="3", cid=None, addr=None)
    with pytest.raises(TypeError, match="needs exactly the fields"):
        codec.trusted(HolderChange, tid=3, cid=None)


def test_trusted_refuses_what_a_converter_would_change():
    fields = dict(version=1, state="running", alive=True, client_timeout=10.0, kill=(), holders=(), released=())
    assert codec.trusted(ClientView, tasks=(), **fields).tasks == ()
    with pytest.raises(TypeError, match="would change"):
        codec.trusted(ClientView, tasks=[], **fields)


def test_trusted_unchecked_only_sets_fields():
    codec.check_trusted(False)
    try:
        # Unchecked, nothing is validated: the caller's promise is all there is.
        assert codec.trusted(HolderChange, tid="x", cid=None, addr=None).tid == "x"
    finally:
        codec.check_trusted(True)
