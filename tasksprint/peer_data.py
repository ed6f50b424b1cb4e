"""Moving task outputs between worker clients: the data port and fetches from peers.

Theory of operation
-------------------
Every client serves its object store on a data port (:func:`serve_data`):
a peer sends :class:`~tasksprint.api.Fetch` requests on an authenticated
connection and gets one :class:`~tasksprint.api.FetchReply` per request,
in order.  A client keeps at most one data connection per peer address
(:class:`PeerFetcher`) and pipelines all its fetches from that peer over
it (:class:`PeerLink`): replies are matched to requests by position.  A
connection that fails fails every fetch waiting on it and is dropped; the
next fetch opens a new one.
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
import trio

from tasksprint import wire
from tasksprint.api import Fetch, FetchReply
from tasksprint.node_protocol import plain_json_problem
from tasksprint.object_store import InputError, ObjectStore, select

__all__ = ["PeerFetcher", "PeerLink", "serve_data"]


@attrs.define(eq=False)
class _FetchWaiter:
    """A Fetch sent on a peer link, waiting for its reply."""

    done: trio.Event = attrs.Factory(trio.Event)
    reply: Any = None
    error: BaseException | None = None


@attrs.define(eq=False)
class PeerLink:
    """One authenticated data connection to a peer client, with fetches pipelined over it.

    The peer answers the requests of one connection in order, so replies
    are matched to requests by position: ``waiting`` holds the requests
    sent and not yet answered, in sending order (appended under the send
    lock, so the order is the order on the wire).  When the connection
    fails, every waiting request fails with it and the link is dropped;
    the next fetch opens a new one.
    """

    conn: wire.Connection
    waiting: collections.deque = attrs.Factory(collections.deque)
    send_lock: trio.Lock = attrs.Factory(trio.Lock)
    error: BaseException | None = None

    async def fetch(self, msg: Fetch) -> Any:
        pending = _FetchWaiter()
        async with self.send_lock:
            if self.error is not None:
                raise self.error
            self.waiting.append(pending)
            try:
                await self.conn.send(msg)
            except BaseException as exc:
                # Maybe not sent, maybe half sent: requests and replies are out of step for good.
                self.fail(exc if isinstance(exc, Exception) else trio.ClosedResourceError("send interrupted"))
                raise
        # A fetcher cancelled here leaves its entry: the reader drops the reply.
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.reply

    async def read(self) -> None:
        """Hand each reply to the request it answers, until the connection fails."""
        try:
            while True:
                reply = await self.conn.receive()
                if not self.waiting:
                    raise wire.BadMessage(f"unrequested {type(reply).__name__} on a data connection")
                pending = self.waiting.popleft()
                pending.reply = reply
                pending.done.set()
        except wire.NETWORK_ERRORS as exc:
            self.fail(exc)
        finally:
            with trio.CancelScope(shield=True):
                await self.conn.aclose()

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        while self.waiting:
            pending = self.waiting.popleft()
            pending.error = self.error
            pending.done.set()


class BadPeerAddress(LookupError):
    """A peer's data address is not ``HOST:PORT``: its outputs cannot be fetched (they count as lost)."""


def split_addr(addr: str) -> tuple[str, int]:
    """``(host, port)`` of a data address ``HOST:PORT``; raises :class:`BadPeerAddress` otherwise."""
    host, _, port = addr.rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        raise BadPeerAddress(f"peer data address {addr[:100]!r} is not HOST:PORT with a port from 1 to 65535")
    return host, int(port)


@attrs.define(eq=False)
class PeerFetcher:
    """A client's fetches from its peers: one :class:`PeerLink` per peer address.

    Link readers run in ``nursery``; ``endpoint`` authenticates this client.
    """

    endpoint: wire.Endpoint
    nursery: trio.Nursery
    _links: dict[str, PeerLink] = attrs.Factory(dict)
    _link_locks: dict[str, trio.Lock] = attrs.Factory(dict)

    async def fetch(self, addr: str, tid: int, key: str | None) -> Any:
        """Output ``key`` (None: all outputs) of task ``tid`` from the peer at ``addr``.

        Raises a network error or :class:`LookupError` when the peer cannot
        serve it (it should be reported lost), :class:`InputError` when the
        task has no such output.
        """
        with trio.fail_after(60.0):
            link = await self._link(addr)
            reply = await link.fetch(Fetch(tid=tid, key=key))
        if not isinstance(reply, FetchReply) or reply.tid != tid:
            raise wire.BadMessage(f"expected the FetchReply for task {tid}, got {reply!r:.200}")
        if not reply.found:
            raise LookupError(f"{addr} does not hold task {tid}'s outputs: {reply.error}")
        if reply.error:
            raise InputError(reply.error)
        problem = plain_json_problem(reply.value, f"task {tid}'s output" if key is None else f"output {key!r:.60}")
        if problem is not None:
            raise InputError(f"the client at {addr} served task {tid}'s outputs that are not plain JSON: {problem}")
        return reply.value

    async def _link(self, addr: str) -> PeerLink:
        """The open data connection to the peer at ``addr`` (opened now if there is none)."""
        lock = self._link_locks.setdefault(addr, trio.Lock())
        async with lock:
            link = self._links.get(addr)
            if link is not None and link.error is None:
                return link
            if link is not None:
                self.nursery.start_soon(link.conn.aclose)  # ends its reader
            host, port = split_addr(addr)
            with trio.fail_after(10.0):
                conn = await wire.connect(host, port, self.endpoint, expect=("data", None))
            link = self._links[addr] = PeerLink(conn)
            self.nursery.start_soon(self._read_link, addr, link)
            return link

    async def _read_link(self, addr: str, link: PeerLink) -> None:
        await link.read()
        if self._links.get(addr) is link:
            del self._links[addr]


async def serve_data(store: ObjectStore, conn: wire.Connection) -> None:
    """Answer a peer's Fetch requests on ``conn`` from ``store``, in order."""
    while True:
        try:
            msg = await conn.receive()
        except wire.ConnectionClosed:
            return
        if not isinstance(msg, Fetch):
            raise wire.BadMessage(f"unexpected {type(msg).__name__} on the data port")
        if not store.has(msg.tid):
            await conn.send(FetchReply(tid=msg.tid, found=False, error="not in this client's object store"))
            continue
        try:
            value = select(store.get(msg.tid), msg.key, msg.tid)
        except KeyError as exc:
            await conn.send(FetchReply(tid=msg.tid, found=True, error=str(exc.args[0])))
            continue
        await conn.send(FetchReply(tid=msg.tid, found=True, value=value))
