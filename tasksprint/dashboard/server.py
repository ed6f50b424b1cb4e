"""The dashboard's web server: pages, a JSON read API, server-sent events and ``/metrics``.

Theory of operation
-------------------
A :class:`Dashboard` polls the replicas once every ``interval`` seconds with
a :class:`~tasksprint.readmodel.Poller`, keeps the last snapshot and
a short :class:`~tasksprint.readmodel.History`, and wakes every
open event stream after each poll.  The Starlette app (:func:`build_app`)
is read-only: it serves the page and its assets from the package (nothing
from a CDN), ``/api/snapshot``, ``/api/task/{tid}`` (asked of the replicas
when requested), ``/events`` (one ``snapshot`` event per poll) and
``/metrics`` (:class:`~tasksprint.metrics.ClusterCollector`),
``/api/graph`` (the task DAG, for computations up to
:data:`~tasksprint.readmodel.GRAPH_TASKS_MAX` tasks) and, when the dashboard
was given a batch run's status file, ``/api/status-file`` (the file read
and parsed at each request, at most :data:`STATUS_FILE_MAX` bytes of its
end).  Hypercorn's trio worker serves it (:func:`serve_app`).

Binding: loopback by default.  A non-loopback address is refused unless
:class:`Credentials` are given, and then every request must carry them
(HTTP basic authentication); put TLS in front (or use hypercorn's) when the
network is not trusted.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tasksprint.readmodel import History, Poller, Snapshot

__all__ = ["BindRefused", "Credentials", "Dashboard", "build_app", "is_loopback", "serve_app", "serve_dashboard"]

STATIC = Path(__file__).resolve().parent / "static"

#: Bytes of a status file the dashboard reads (its end: the latest tasks).
STATUS_FILE_MAX = 16 * 1024 * 1024


class BindRefused(ValueError):
    """A non-loopback address without credentials; the message says how to allow it."""


@attrs.frozen(kw_only=True, repr=False)
class Credentials:
    """HTTP basic authentication credentials every request must carry."""

    user: str
    password: str

    @classmethod
    def from_file(cls, path: Path) -> Credentials:
        """Read ``user:password`` (one line) from ``path``; raises ValueError if malformed."""
        text = path.read_text().strip()
        user, sep, password = text.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{path}: expected one line user:password")
        return cls(user=user, password=password)

    def accepts(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries these credentials."""
        if not header or not header.startswith("Basic "):
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except ValueError:
            return False
        expected = f"{self.user}:{self.password}".encode()
        return hmac.compare_digest(given, expected)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, credentials: Credentials | None) -> None:
    """Raise :class:`BindRefused` for a non-loopback ``host`` without credentials."""
    if credentials is None and not is_loopback(host):
        raise BindRefused(
            f"refusing to serve on {host}, which is not a loopback address, without credentials: "
            "give --auth-file FILE (one line user:password), or bind 127.0.0.1"
        )


class _BasicAuth:
    """ASGI middleware: answer 401 to a request without the credentials."""

    def __init__(self, app: Any, credentials: Credentials) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or ())
            auth = headers.get(b"authorization")
            if not self.credentials.accepts(auth.decode("latin-1") if auth else None):
                response = Response(
                    "credentials required", status_code=401, headers={"WWW-Authenticate": 'Basic realm="tasksprint"'}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def serve_app(
    app: Any,
    host: str,
    port: int,
    *,
    credentials: Credentials | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` on ``host:port`` with hypercorn until cancelled; reports the bound port.

    Raises :class:`BindRefused` (before binding) for a non-loopback ``host``
    without ``credentials``; with them, every request must carry them.
    """
    check_bind(host, credentials)
    if credentials is not None:
        app = _BasicAuth(app, credentials)
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5

    async def started(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started)
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


@attrs.define(eq=False)
class Dashboard:
    """The polled state the app serves: the last snapshot, the history, a wake-up per poll."""

    poller: Poller
    interval: float = 1.0
    status_file: Path | None = None
    history: History = attrs.Factory(History)
    _latest: Snapshot | None = None
    _polled: trio.Event = attrs.Factory(trio.Event)
    _polls: int = 0

    @property
    def latest(self) -> Snapshot | None:
        return self._latest

    @property
    def polls(self) -> int:
        """Polls done so far."""
        return self._polls

    async def poll_once(self) -> Snapshot:
        """Poll now, record the snapshot and wake the event streams."""
        snap = await self.poller.poll()
        self.history.add(snap)
        self._latest = snap
        self._polls += 1
        woken, self._polled = self._polled, trio.Event()
        woken.set()
        return snap

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every ``interval`` seconds until cancelled (reports started after the first poll)."""
        try:
            await self.poll_once()
            task_status.started()
            while True:
                await trio.sleep(self.interval)
                await self.poll_once()
        finally:
            with trio.CancelScope(shield=True):
                await self.poller.aclose()

    async def wait_beyond(self, polls: int) -> None:
        """Wait until more than ``polls`` polls have been recorded (at once if they have)."""
        while self._polls <= polls:
            await self._polled.wait()

    def state(self) -> dict[str, Any]:
        """What ``/api/snapshot`` and each event carry."""
        snap = self._latest
        return {
            "snapshot": None if snap is None else snap.as_dict(),
            "history": self.history.as_dict(),
            "polls": self._polls,
        }


def _json(data: Any) -> str:
    return json.dumps(data, default=_jsonable, allow_nan=False)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, set | frozenset | tuple):
        return list(x)
    if attrs.has(type(x)):
        return attrs.asdict(x)
    return repr(x)


def build_app(dashboard: Dashboard, registry: CollectorRegistry) -> Starlette:
    """The read-only Starlette app over ``dashboard`` (see the module docstring)."""
    from tasksprint.metrics import exposition

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def snapshot(request: Request) -> Response:
        return Response(_json(dashboard.state()), media_type="application/json")

    async def task(request: Request) -> Response:
        try:
            tid = int(request.path_params["tid"])
        except ValueError:
            return JSONResponse({"error": "a task id is a number"}, status_code=400)
        info = await dashboard.poller.task(tid)
        if info is None:
            return JSONResponse({"error": f"no task {tid} (or no replica answered)"}, status_code=404)
        return Response(_json(info), media_type="application/json")

    async def tasks(request: Request) -> Response:
        try:
            first = int(request.query_params.get("first", "1"))
            count = int(request.query_params.get("count", "25"))
        except ValueError:
            return JSONResponse({"error": "first and count are numbers"}, status_code=400)
        return Response(_json(await dashboard.poller.tasks(first, count)), media_type="application/json")

    async def events(request: Request) -> Response:
        async def stream() -> Any:
            # The current state at once, then one event after every poll.
            while True:
                # Counted, not awaited as an event: a poll recorded while this
                # event was being sent must not be missed.
                sent = dashboard.polls
                yield f"event: snapshot\ndata: {_json(dashboard.state())}\n\n"
                await dashboard.wait_beyond(sent)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def graph(request: Request) -> Response:
        answer = await dashboard.poller.graph()
        if answer is None:
            return JSONResponse({"error": "no replica answered"}, status_code=503)
        return Response(_json(answer), media_type="application/json")

    async def status_file(request: Request) -> Response:
        if dashboard.status_file is None:
            return JSONResponse({"error": "no status file: start the dashboard with --status-file FILE"}, 404)
        try:
            return Response(_json(await trio.to_thread.run_sync(read_status_file, dashboard.status_file)))
        except OSError as exc:
            return JSONResponse({"error": f"{dashboard.status_file}: {exc.strerror or exc}"}, status_code=404)

    async def metrics(request: Request) -> Response:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/snapshot", snapshot),
            Route("/api/task/{tid}", task),
            Route("/api/tasks", tasks),
            Route("/api/graph", graph),
            Route("/api/status-file", status_file),
            Route("/events", events),
            Route("/metrics", metrics),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )


def read_status_file(path: Path) -> dict[str, Any]:
    """A batch run's status file as plain data: its records, the lines left out and why, counts.

    Reads at most :data:`STATUS_FILE_MAX` bytes, from the end (the first,
    partial line is then dropped and ``cut`` is true).  Raises OSError if
    the file cannot be read.
    """
    from tasksprint.batch.statusfile import parse_status_file

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        cut = size > STATUS_FILE_MAX
        f.seek(max(0, size - STATUS_FILE_MAX))
        data = f.read(STATUS_FILE_MAX)
    if cut:
        data = data[data.find(b"\n") + 1 :]
    parsed = parse_status_file(data)
    records = [
        {
            "flags": r.flags,
            "kind": r.kind.name.lower(),
            "task_id": r.task_id,
            "line": r.line,
            "repeat_index": r.repeat_index,
            "node": r.node,
            "pid": r.pid,
            "exit_code": r.exit_code,
            "start": r.start,
            "finish": r.finish,
            "elapsed": r.elapsed,
            "out_bytes": r.out_bytes,
            "out_snippet": r.out_snippet,
            "err_bytes": r.err_bytes,
            "err_snippet": r.err_snippet,
            "command": r.command.decode("utf-8", "replace"),
        }
        for r in parsed.records
    ]
    failed = sum(1 for r in parsed.records if r.exit_code != 0 and r.kind.name != "BARRIER")
    return {
        "path": str(path),
        "size": size,
        "cut": cut,
        "records": records,
        "rejected": [{"line": n, "why": why} for n, why in parsed.rejected],
        "counts": {"records": len(records), "failed": failed, "rejected": len(parsed.rejected)},
    }


async def serve_dashboard(
    addrs: list[tuple[str, int]],
    secret: bytes,
    host: str = "127.0.0.1",
    port: int = 8470,
    *,
    interval: float = 1.0,
    credentials: Credentials | None = None,
    own_metrics: CollectorRegistry | None = None,
    status_file: Path | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poll the replicas at ``addrs`` and serve the dashboard until cancelled; reports the bound port.

    ``own_metrics`` (a replica's or a client's
    :class:`~tasksprint.metrics.PrometheusObserver` registry) is served at
    ``/metrics`` with the cluster's.  Raises :class:`BindRefused` for a
    non-loopback ``host`` without ``credentials``.

    A replica started with ``--http HOST:PORT`` runs this in its nursery::

        await nursery.start(serve_dashboard, peers, secret, host, port, own_metrics=observer.registry)
    """
    from tasksprint.metrics import ClusterCollector, RegistryCollector

    check_bind(host, credentials)
    dashboard = Dashboard(Poller(addrs, secret), interval=interval, status_file=status_file)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ClusterCollector(lambda: dashboard.latest, dashboard.history))
    if own_metrics is not None:
        registry.register(RegistryCollector(own_metrics))
    app = build_app(dashboard, registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(dashboard.run)
        bound = await nursery.start(_serve, app, host, port, credentials)
        task_status.started(bound)


async def _serve(
    app: Any,
    host: str,
    port: int,
    credentials: Credentials | None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_app(app, host, port, credentials=credentials, task_status=task_status)


async def serve_metrics(
    host: str,
    port: int,
    registry: Any,
    *,
    credentials: Any = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` at ``http://host:port/metrics`` until cancelled; reports the bound port.

    Loopback only unless ``credentials`` (a
    :class:`Credentials`) guard it: raises
    :class:`BindRefused` otherwise.
    """
    from tasksprint.metrics import metrics_app

    await serve_app(metrics_app(registry), host, port, credentials=credentials, task_status=task_status)
