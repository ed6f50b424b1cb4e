"""Connections over real sockets, for tests of what is sent without yielding."""

from __future__ import annotations

import trio

from tasksprint.wire import Connection


def socket_pair(sndbuf: int | None = None) -> tuple[Connection, Connection]:
    """Connections over a connected pair of stream sockets; ``sndbuf`` shrinks the sender's buffer."""
    a, b = trio.socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, sndbuf)
    return Connection(trio.SocketStream(a)), Connection(trio.SocketStream(b))
