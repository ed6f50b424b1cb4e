"""Length-prefixed frames, as bytes in and values out, with no I/O.

Theory of operation
-------------------
A connection carries a sequence of *frames*: a 4-byte big-endian unsigned
length ``n`` followed by ``n`` bytes, one value encoded by
:func:`tasksprint.codec.encode`.  :func:`encode_frame` turns a value into a
frame, refusing one over the sender's cap.  A :class:`FrameBuffer` is the
receiving half: the driver feeds it whatever bytes arrived and takes complete
frames out, decoded, one at a time; :data:`NEED_DATA` says it must read more
first.  A frame whose declared length is over the cap is refused as soon as
its header is buffered, before its body arrives, so a peer cannot make the
receiver buffer more than the cap.

The cap is given per frame taken, not per buffer: the handshake takes its
frames with a small cap, and the frames after it, possibly already in the
same chunk, with the connection's cap.  Nothing here reads a socket or a
clock; :mod:`tasksprint.wire` drives it over trio streams.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Final

from tasksprint import codec
from tasksprint.codec import BadMessage

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME_DEFAULT",
    "MAX_FRAME_LIMIT",
    "NEED_DATA",
    "FrameBuffer",
    "FrameTooLarge",
    "check_max_frame",
    "encode_frame",
    "encode_frames",
]

#: Largest frame body (bytes) a connection accepts unless told otherwise.
MAX_FRAME_DEFAULT = 64 * 1024 * 1024

#: The largest length a 4-byte header can declare.
MAX_FRAME_LIMIT = 2**32 - 1

_HEADER = struct.Struct(">I")

#: Bytes of the length header in front of every frame body.
HEADER_SIZE = _HEADER.size

# How much to ask the stream for: one read normally holds many small frames;
# for a frame larger than the usual chunk ask for what is missing (bounded)
# so a big snapshot does not take thousands of small reads.
_READ_CHUNK = 64 * 1024
_READ_CHUNK_MAX = 4 * 1024 * 1024


class FrameTooLarge(BadMessage):
    """A frame's declared (or, when sending, encoded) length is over the cap."""


class _NeedData:
    """The type of :data:`NEED_DATA`."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: What :meth:`FrameBuffer.next_message` returns while no whole frame is
#: buffered (any decoded value, None included, is a message).
NEED_DATA: Final = _NeedData()


def check_max_frame(max_frame: Any) -> None:
    """Raise ValueError unless ``max_frame`` is an int from 1 to :data:`MAX_FRAME_LIMIT`."""
    if not isinstance(max_frame, int) or isinstance(max_frame, bool) or not 1 <= max_frame <= MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame must be an int from 1 to {MAX_FRAME_LIMIT} (bytes), got {max_frame!r}")


def encode_frame(msg: Any, max_frame: int) -> bytes:
    """One message as one frame: its length header, then its encoding.

    Raises FrameTooLarge if it encodes to more than ``max_frame`` bytes,
    TypeError if it holds an unregistered class.
    """
    payload = codec.encode(msg)
    if len(payload) > max_frame:
        raise FrameTooLarge(
            f"{type(msg).__name__} encodes to {len(payload)} bytes, over the "
            f"{max_frame}-byte frame cap; split it or raise max_frame on both ends"
        )
    return _HEADER.pack(len(payload)) + payload


def encode_frames(msgs: Iterable[Any], max_frame: int) -> bytes:
    """Every message framed, back to back; errors as :func:`encode_frame`, with nothing returned."""
    return b"".join([encode_frame(m, max_frame) for m in msgs])


class FrameBuffer:
    """The bytes received on one connection, cut into frames on demand.

    Feed it with :meth:`feed`; take frames with :meth:`next_message` (or
    :meth:`next_body`).  Frames already taken are dropped lazily, at the
    next :meth:`feed`, so that taking many frames out of one chunk moves
    memory once.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        # Frames before _pos have been taken.
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as part of a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes received from the peer."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def read_size(self) -> int:
        """How many bytes the driver should ask the stream for next.

        Only meaningful after :meth:`next_message` returned NEED_DATA (so a
        buffered header's length was accepted).
        """
        available = len(self._buf) - self._pos
        if available < HEADER_SIZE:
            return _READ_CHUNK
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        return max(_READ_CHUNK, min(HEADER_SIZE + length - available, _READ_CHUNK_MAX))

    def frame_ready(self) -> bool:
        """Whether a whole frame is buffered (the next take returns it)."""
        available = len(self._buf) - self._pos
        if available < HEADER_SIZE:
            return False
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        return available >= HEADER_SIZE + length

    def next_body(self, limit: int) -> bytes | None:
        """Take the next complete frame's body, or return None if it has not all arrived.

        Raises FrameTooLarge as soon as a header declares more than ``limit``
        bytes; the buffer is then unusable (the stream is out of step).
        """
        available = len(self._buf) - self._pos
        if available < HEADER_SIZE:
            return None
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        if length > limit:
            raise FrameTooLarge(f"peer declared a {length}-byte frame, over the {limit}-byte cap")
        if available < HEADER_SIZE + length:
            return None
        start = self._pos + HEADER_SIZE
        self._pos = start + length
        # One copy through a view (slicing the bytearray would copy twice);
        # the view is released at once so the buffer can be compacted later.
        with memoryview(self._buf) as view:
            return bytes(view[start : start + length])

    def next_message(self, limit: int) -> Any:
        """Take and decode the next complete frame, or return NEED_DATA.

        Raises FrameTooLarge as :meth:`next_body`, and BadMessage if the
        frame does not decode (:func:`tasksprint.codec.decode_untrusted`).
        """
        body = self.next_body(limit)
        if body is None:
            return NEED_DATA
        return codec.decode_untrusted(body)

    def check_end(self) -> None:
        """Raise BadMessage if the peer's stream ended in the middle of a frame."""
        if self._pos < len(self._buf):
            raise BadMessage(
                f"peer closed the connection in the middle of a frame ({self.buffered} bytes of it arrived)"
            )
