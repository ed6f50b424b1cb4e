"""The cluster as the dashboard, ``tasksprint top`` and the metrics exporter see it.

Theory of operation
-------------------
One :class:`Poller` asks every replica for its own
:class:`~tasksprint.api.ReplicaStatus` (each on a connection of its own, so
a dead replica is seen as down) and the leader, or failing that any replica,
for the computation's ``status``.  The answers are turned into a frozen
:class:`Snapshot` here and nowhere else: this module is the one place that
reads the fields of the replies, defensively (a reply may be a dict or a typed
value; a missing field reads as its default), so a change of a reply's shape
is absorbed in one function.

:class:`History` keeps the last :data:`HISTORY_POINTS` snapshots' figures
(tasks done, throughput, leader, commit index) and counts leader changes; it
is the only state the dashboard keeps that the replicas do not have.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from tasksprint.channel import ASK_ERRORS, ReplicaChannel, Unreachable
from tasksprint.coordinator.ops import GRAPH_MAX, GraphRequest, InfoRequest, StatusRequest

__all__ = [
    "GRAPH_TASKS_MAX",
    "HISTORY_POINTS",
    "PAGE_MAX",
    "TASK_STATES",
    "ClientRow",
    "History",
    "Point",
    "Poller",
    "ReplicaRow",
    "Snapshot",
    "computation_from_reply",
    "field",
    "replica_from_reply",
]

#: The task states the coordinator counts, in the order they are shown.
TASK_STATES = ("pending", "running", "done", "failed", "killed")

#: Points kept by a :class:`History` (at one poll a second: ten minutes).
HISTORY_POINTS = 600

#: Most tasks one :meth:`Poller.tasks` asks about.
PAGE_MAX = 100

#: Most tasks of the graph :meth:`Poller.graph` reads (the dashboard draws them all).
GRAPH_TASKS_MAX = 5000


def field(reply: Any, name: str, default: Any = None) -> Any:
    """Field ``name`` of ``reply``, a mapping or an object with attributes; ``default`` if absent."""
    if reply is None:
        return default
    if isinstance(reply, Mapping):
        return reply.get(name, default)
    return getattr(reply, name, default)


def _int(x: Any, default: int = 0) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) else default


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _opt_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _str(x: Any, default: str = "") -> str:
    return x if isinstance(x, str) else default


@attrs.frozen(kw_only=True)
class ReplicaRow:
    """One replica as last polled; ``up`` is False when it did not answer (the rest is then empty)."""

    address: str
    up: bool
    rid: int | None = None
    role: str = ""
    leader: int | None = None
    ballot: str = ""
    commit: int = 0
    applied: int = 0
    lag: int = 0  # slots applied by the most advanced replica and not yet by this one
    commit_p50_ms: float | None = None
    commit_p99_ms: float | None = None
    fsync_p50_ms: float | None = None
    fsync_p99_ms: float | None = None
    error: str = ""


@attrs.frozen(kw_only=True)
class ClientRow:
    """One live worker client, as the coordinator knows it."""

    cid: int
    name: str
    addr: str
    slots: int
    running: int
    prefetching: int
    tags: tuple[str, ...] = ()
    heard_s: float | None = None  # seconds since the leader last heard from it
    cpu_percent: float | None = None  # of one CPU, the client and its node processes
    rss_bytes: int | None = None


@attrs.frozen(kw_only=True)
class Snapshot:
    """The cluster at one poll: replicas, the computation (None if no coordinator answered)."""

    at: float  # wall-clock seconds of the poll
    replicas: tuple[ReplicaRow, ...]
    leader: int | None = None
    state: str = ""  # the computation's run state, "" when unknown
    tasks: Mapping[str, int] = attrs.field(factory=dict)  # by state, and "total"
    clients: tuple[ClientRow, ...] = ()
    dead_clients: int = 0
    result: Any = None
    failure: Mapping[str, Any] | None = None

    @property
    def has_computation(self) -> bool:
        return bool(self.state)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return attrs.asdict(self, recurse=True)


def replica_from_reply(address: str, reply: Any) -> ReplicaRow:
    """A :class:`ReplicaRow` from a ``ReplicaStatus`` reply (read field by field)."""
    leader = _int(field(reply, "leader"), -1)
    return ReplicaRow(
        address=address,
        up=True,
        rid=_int(field(reply, "rid"), -1),
        role=_str(field(reply, "role")),
        leader=leader if leader >= 0 else None,
        ballot=_str(field(reply, "ballot")),
        commit=_int(field(reply, "commit")),
        applied=_int(field(reply, "applied")),
        commit_p50_ms=_num(field(reply, "commit_p50_ms")),
        commit_p99_ms=_num(field(reply, "commit_p99_ms")),
        fsync_p50_ms=_num(field(reply, "fsync_p50_ms")),
        fsync_p99_ms=_num(field(reply, "fsync_p99_ms")),
    )


def computation_from_reply(reply: Any) -> dict[str, Any]:
    """The :class:`Snapshot` fields taken from a coordinator ``status`` reply."""
    raw_tasks = field(reply, "tasks", {}) or {}
    tasks = {s: _int(field(raw_tasks, s)) for s in TASK_STATES}
    tasks["total"] = _int(field(raw_tasks, "total"), sum(tasks.values()))
    clients = tuple(
        ClientRow(
            cid=_int(field(c, "cid")),
            name=_str(field(c, "name")),
            addr=_str(field(c, "addr")),
            slots=_int(field(c, "slots")),
            running=_int(field(c, "running")),
            prefetching=_int(field(c, "prefetching")),
            tags=tuple(t for t in field(c, "tags", ()) or () if isinstance(t, str)),
            heard_s=_num(field(c, "heard_s")),
            cpu_percent=_num(field(c, "cpu_percent")),
            rss_bytes=_opt_int(field(c, "rss_bytes")),
        )
        for c in field(reply, "live_clients", ()) or ()
    )
    state = field(reply, "state", "")
    failure = field(reply, "failure")
    return {
        "state": _str(getattr(state, "value", state)),
        "tasks": tasks,
        "clients": clients,
        "dead_clients": _int(field(field(reply, "clients", {}), "dead")),
        "result": field(reply, "result"),
        "failure": _plain(failure),
    }


def _plain(x: Any) -> dict[str, Any] | None:
    if isinstance(x, Mapping):
        return dict(x)
    return attrs.asdict(x) if attrs.has(type(x)) else None


def task_from_reply(reply: Any) -> dict[str, Any] | None:
    """One task's ``info`` reply as plain data (None if there is no such task)."""
    if reply is None:
        return None
    if isinstance(reply, Mapping):
        return dict(reply)
    if attrs.has(type(reply)):
        return attrs.asdict(reply)
    return None


@attrs.frozen(kw_only=True)
class Point:
    """The figures of one poll kept over time."""

    at: float
    done: int
    total: int
    running: int
    throughput: float  # tasks done per second since the previous point
    leader: int | None
    commit: int
    replicas_up: int
    commit_p50_ms: float | None = None  # the leader's recent command latency
    fsync_p50_ms: float | None = None  # the leader's recent synced writes


@attrs.define(eq=False)
class History:
    """The last ``size`` polls' :class:`Point` values and the leader changes seen."""

    size: int = HISTORY_POINTS
    _points: collections.deque[Point] = attrs.field(init=False)
    _leader_changes: list[tuple[float, int | None]] = attrs.Factory(list)
    _leader_change_count: int = 0

    def __attrs_post_init__(self) -> None:
        self._points = collections.deque(maxlen=self.size)

    @property
    def points(self) -> tuple[Point, ...]:
        return tuple(self._points)

    @property
    def leader_changes(self) -> tuple[tuple[float, int | None], ...]:
        """``(when, new leader)`` of the last ``size`` changes of the leader seen."""
        return tuple(self._leader_changes)

    @property
    def leader_change_count(self) -> int:
        """Changes of the leader seen since this history started (the first leader counts as one)."""
        return self._leader_change_count

    def add(self, snap: Snapshot) -> Point:
        """Record ``snap``; returns its point."""
        prev = self._points[-1] if self._points else None
        lead = next((r for r in snap.replicas if r.up and r.rid == snap.leader), None)
        done = snap.tasks.get("done", 0)
        throughput = 0.0
        if prev is not None and snap.at > prev.at:
            throughput = max(0, done - prev.done) / (snap.at - prev.at)
        point = Point(
            at=snap.at,
            done=done,
            total=snap.tasks.get("total", 0),
            running=snap.tasks.get("running", 0),
            throughput=throughput,
            leader=snap.leader,
            commit=max((r.commit for r in snap.replicas if r.up), default=0),
            replicas_up=sum(r.up for r in snap.replicas),
            commit_p50_ms=lead.commit_p50_ms if lead is not None else None,
            fsync_p50_ms=lead.fsync_p50_ms if lead is not None else None,
        )
        last_leader = self._leader_changes[-1][1] if self._leader_changes else None
        if snap.leader is not None and snap.leader != last_leader:
            self._leader_changes.append((snap.at, snap.leader))
            del self._leader_changes[: -self.size]
            self._leader_change_count += 1
        self._points.append(point)
        return point

    def as_dict(self) -> dict[str, Any]:
        return {
            "points": [attrs.asdict(p) for p in self._points],
            "leader_changes": [{"at": at, "leader": leader} for at, leader in self._leader_changes],
            "leader_change_count": self._leader_change_count,
        }


@attrs.define(eq=False)
class Poller:
    """Polls the replicas at ``addrs`` into snapshots (see the module docstring).

    ``clock`` gives the wall-clock time stamped on each snapshot.
    """

    addrs: tuple[tuple[str, int], ...] = attrs.field(converter=tuple)
    secret: bytes
    timeout: float = 2.0
    clock: Callable[[], float] = time.time
    _channel: ReplicaChannel | None = None
    # One channel per replica, to ask each for what only it knows of the clients talking to it.
    _each: dict[tuple[str, int], ReplicaChannel] = attrs.Factory(dict)
    # The channel keeps one connection: one question at a time (the poll loop and page requests share it).
    _asking: trio.Lock = attrs.Factory(trio.Lock)

    def _chan(self) -> ReplicaChannel:
        if self._channel is None:
            self._channel = ReplicaChannel(self.addrs, self.secret, ident="dashboard")
        return self._channel

    async def poll(self) -> Snapshot:
        """Ask every replica, then the computation's status; never raises for a down replica."""
        chan = self._chan()
        rows: list[ReplicaRow] = [ReplicaRow(address="", up=False)] * len(self.addrs)

        async def ask(i: int, addr: tuple[str, int]) -> None:
            address = f"{addr[0]}:{addr[1]}"
            try:
                rows[i] = replica_from_reply(address, await chan.status(addr, timeout=self.timeout))
            except (*ASK_ERRORS, trio.TooSlowError) as exc:
                rows[i] = ReplicaRow(address=address, up=False, error=f"{type(exc).__name__}: {exc}"[:200])

        async with trio.open_nursery() as nursery:
            for i, addr in enumerate(self.addrs):
                nursery.start_soon(ask, i, addr)
        top = max((r.applied for r in rows if r.up), default=0)
        rows = [attrs.evolve(r, lag=top - r.applied) if r.up else r for r in rows]
        leader = _leader_of(rows)
        computation: dict[str, Any] = {}
        async with self._asking:
            if leader is not None and 0 <= leader < len(self.addrs):
                await chan.prefer(leader)  # the leader is the most up to date
            try:
                computation = computation_from_reply(await chan.ask_any(StatusRequest(), timeout=self.timeout))
            except (Unreachable, trio.TooSlowError):
                pass  # no replica answered, or no coordinator runs there
        if computation.get("clients"):
            up = [addr for addr, r in zip(self.addrs, rows, strict=True) if r.up]
            computation["clients"] = await self._merge_usage(computation["clients"], up)
        return Snapshot(at=self.clock(), replicas=tuple(rows), leader=leader, **computation)

    async def _merge_usage(self, clients: tuple[ClientRow, ...], up: list[tuple[str, int]]) -> tuple[ClientRow, ...]:
        """``clients`` with the usage and last contact each up replica heard (a client reports to one).

        Last heard from is the most recent any replica saw; the usage is that
        replica's.  A replica that does not answer adds nothing.
        """
        heard: dict[int, list[ClientRow]] = {c.cid: [c] for c in clients}

        async def ask(addr: tuple[str, int]) -> None:
            chan = self._each.get(addr)
            if chan is None:
                chan = self._each[addr] = ReplicaChannel([addr], self.secret, ident="dashboard")
            try:
                reply = await chan.request(StatusRequest(), timeout=self.timeout)
            except (*ASK_ERRORS, trio.TooSlowError):
                return
            for c in computation_from_reply(reply)["clients"]:
                if c.cid in heard:
                    heard[c.cid].append(c)

        async with trio.open_nursery() as nursery:
            for addr in up:
                nursery.start_soon(ask, addr)
        out = []
        for c in clients:
            known = [r for r in heard[c.cid] if r.heard_s is not None]
            if known:
                last = min(known, key=lambda r: r.heard_s or 0.0)
                reported = [r for r in known if r.rss_bytes is not None]
                usage = min(reported, key=lambda r: r.heard_s or 0.0) if reported else last
                c = attrs.evolve(c, heard_s=last.heard_s, cpu_percent=usage.cpu_percent, rss_bytes=usage.rss_bytes)
            out.append(c)
        return tuple(out)

    async def task(self, tid: int) -> dict[str, Any] | None:
        """Task ``tid``'s ``info`` as plain data; None if there is no such task or nobody answered."""
        try:
            async with self._asking:
                reply = await self._chan().ask_any(InfoRequest(tid=tid), timeout=self.timeout)
            return task_from_reply(reply)
        except (Unreachable, trio.TooSlowError):
            return None

    async def graph(self) -> dict[str, Any] | None:
        """The task graph as columns (``tids``, ``names``, ``states``, ``pretasks``) and ``total``.

        At most :data:`GRAPH_TASKS_MAX` tasks (``truncated`` says whether
        there were more); None if no replica answered.
        """
        out: dict[str, Any] = {"tids": [], "names": [], "states": [], "pretasks": [], "total": 0}
        first = 1
        try:
            while first <= GRAPH_TASKS_MAX:
                count = min(GRAPH_MAX, GRAPH_TASKS_MAX - first + 1)
                async with self._asking:
                    page = await self._chan().ask_any(GraphRequest(first=first, count=count), timeout=self.timeout)
                out["total"] = _int(field(page, "total"))
                for name in ("tids", "names", "states", "pretasks"):
                    out[name].extend(list(x) if isinstance(x, tuple) else x for x in field(page, name, ()) or ())
                first += count
                if first > out["total"]:
                    break
        except (Unreachable, trio.TooSlowError):
            return None
        out["truncated"] = out["total"] > len(out["tids"])
        return out

    async def tasks(self, first: int, count: int) -> list[dict[str, Any]]:
        """The ``info`` of tasks ``first`` .. ``first + count - 1`` that exist (at most :data:`PAGE_MAX`)."""
        out = []
        for tid in range(max(1, first), max(1, first) + min(max(0, count), PAGE_MAX)):
            info = await self.task(tid)
            if info is not None:
                out.append(info)
        return out

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.aclose()
        for chan in self._each.values():
            await chan.aclose()


def _leader_of(rows: list[ReplicaRow]) -> int | None:
    """The leader a majority of the answering replicas name; a replica leading by its own word first."""
    for r in rows:
        if r.up and r.role == "leader" and r.rid is not None:
            return r.rid
    named = collections.Counter(r.leader for r in rows if r.up and r.leader is not None)
    return named.most_common(1)[0][0] if named else None
