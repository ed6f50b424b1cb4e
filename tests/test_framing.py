"""Tests of tasksprint.framing: frames as bytes in and values out, without I/O.

The frame buffer is fed bytes as a stream would deliver them (all at once,
byte by byte, several frames in one chunk) and must hand out exactly the
frames that were encoded, refusing an oversize header before its body.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasksprint import codec
from tasksprint.codec import BadMessage
from tasksprint.framing import (
    HEADER_SIZE,
    MAX_FRAME_LIMIT,
    NEED_DATA,
    FrameBuffer,
    FrameTooLarge,
    check_max_frame,
    encode_frame,
    encode_frames,
)
from tasksprint.paxos.messages import Ballot, Prepare

CAP = 1 << 20
VALUES = [Prepare(ballot=Ballot(3, 1), from_slot=7), {"plain": [1, 2.5, None, True, b"\x00\xff"]}, "text", 0, None]


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def take_all(buffer: FrameBuffer) -> list[object]:
    taken = []
    while (msg := buffer.next_message(CAP)) is not NEED_DATA:
        taken.append(msg)
    return taken


def test_a_frame_is_a_big_endian_length_then_the_encoding():
    payload = codec.encode(VALUES[0])
    assert encode_frame(VALUES[0], CAP) == header(len(payload)) + payload
    assert encode_frames(VALUES[:2], CAP) == encode_frame(VALUES[0], CAP) + encode_frame(VALUES[1], CAP)
    assert encode_frames([], CAP) == b""


def test_a_message_over_the_cap_is_not_encoded():
    with pytest.raises(FrameTooLarge, match="Prepare encodes to"):
        encode_frame(VALUES[0], 4)
    with pytest.raises(FrameTooLarge):
        encode_frames(["small", "x" * 100], 50)


def test_many_frames_from_one_chunk_come_out_in_order():
    buffer = FrameBuffer()
    buffer.feed(encode_frames(VALUES, CAP))
    assert take_all(buffer) == VALUES
    assert buffer.buffered == 0 and not buffer.frame_ready()


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_frames_split_anywhere_decode_the_same(cuts):
    data = encode_frames(VALUES, CAP)
    buffer = FrameBuffer()
    taken: list[object] = []
    pos = 0
    for size in [*cuts, len(data)]:
        buffer.feed(data[pos : pos + size])
        pos += size
        taken.extend(take_all(buffer))
    assert taken == VALUES


def test_frame_ready_looks_without_taking():
    buffer = FrameBuffer()
    frame = encode_frame("hello", CAP)
    assert not buffer.frame_ready()
    buffer.feed(frame[:-1])
    assert not buffer.frame_ready()
    assert buffer.next_message(CAP) is NEED_DATA
    buffer.feed(frame[-1:])
    assert buffer.frame_ready() and buffer.frame_ready()
    assert buffer.next_message(CAP) == "hello"
    assert not buffer.frame_ready()


def test_a_decoded_none_is_a_message_not_need_data():
    buffer = FrameBuffer()
    buffer.feed(encode_frame(None, CAP))
    assert buffer.next_message(CAP) is None
    assert buffer.next_message(CAP) is NEED_DATA


def test_oversize_header_is_refused_before_its_body_arrives():
    buffer = FrameBuffer()
    buffer.feed(header(1001))
    with pytest.raises(FrameTooLarge, match="1001-byte frame, over the 1000-byte cap"):
        buffer.next_body(1000)


def test_the_cap_is_per_take():
    # The handshake takes its frames with a small cap, later frames with the connection's.
    buffer = FrameBuffer()
    buffer.feed(encode_frames(["short", "x" * 500], CAP))
    assert buffer.next_message(100) == "short"
    with pytest.raises(FrameTooLarge):
        buffer.next_message(100)


@pytest.mark.parametrize("payload", [b"", b"\xff", b"\xd9\xea\x89\x82\x64Nope\x01"])
def test_an_undecodable_frame_is_bad_message(payload):
    buffer = FrameBuffer()
    buffer.feed(header(len(payload)) + payload)
    with pytest.raises(BadMessage):
        buffer.next_message(CAP)


def test_the_end_of_the_stream_is_clean_only_between_frames():
    buffer = FrameBuffer()
    buffer.check_end()
    frame = encode_frame("abc", CAP)
    buffer.feed(frame + frame[:3])
    assert buffer.next_message(CAP) == "abc"
    with pytest.raises(BadMessage, match=r"middle of a frame \(3 bytes of it arrived\)"):
        buffer.check_end()


def test_read_size_asks_for_the_rest_of_a_large_frame_within_bounds():
    buffer = FrameBuffer()
    assert buffer.read_size() == 64 * 1024
    buffer.feed(header(1 << 20) + bytes(10))
    assert buffer.next_body(CAP) is None
    assert buffer.read_size() == HEADER_SIZE + (1 << 20) - (HEADER_SIZE + 10)
    buffer = FrameBuffer()
    buffer.feed(header(MAX_FRAME_LIMIT))
    assert buffer.read_size() == 4 * 1024 * 1024


def test_max_frame_must_be_positive_and_fit_the_header():
    for bad in (0, -1, 2**32, 1.5, True, "1"):
        with pytest.raises(ValueError):
            check_max_frame(bad)
    check_max_frame(1)
    check_max_frame(MAX_FRAME_LIMIT)


def test_registered_message_layout_matches_the_documented_example():
    encoded = codec.encode(Prepare(ballot=Ballot(3, 1), from_slot=7))
    assert encoded.hex() == "d9ea89836750726570617265d9ea89836642616c6c6f74030107"
