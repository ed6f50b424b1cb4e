"""The Python client of the service: ``tasksprint.connect(server)`` and its trio twin.

::

    import tasksprint
    svc = tasksprint.connect()                 # this machine's service (or "host:port,...")
    t = svc.submit("python train.py --lr 0.1", require=["gpu"], job="sweep")
    ts = svc.map("python train.py --lr {}", [0.1, 0.2, 0.3], after=[t])
    t.result()                                 # waits; its record, or raises TaskFailed
    svc.wait(ts)                               # True if all succeeded

:class:`Service` and :class:`Task` are synchronous (each call runs its own
trio loop, so they work from a script or a notebook); :class:`AsyncService`
and :class:`AsyncTask` are the same for trio code (``async with
tasksprint.aconnect() as svc``).  Submissions go through the replicated log
exactly once (:class:`~tasksprint.log_client.LogClient`), many tasks per
log command; questions go to the leader when it is known (it has applied
every acknowledged submission), else to any replica.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from tasksprint import codec
from tasksprint.channel import ASK_ERRORS, ReplicaChannel, Unreachable
from tasksprint.coordinator.ops import (
    Commanded,
    CommandOp,
    Refused,
    SchedulerRequest,
    StatusRequest,
    WorkerChanged,
    WorkerOp,
)
from tasksprint.log_client import LogClient, Unavailable
from tasksprint.service.home import locate
from tasksprint.service.records import FINISHED
from tasksprint.service.scheduler import MAX_BATCH

__all__ = [
    "AsyncService",
    "AsyncTask",
    "NotAService",
    "Service",
    "ServiceError",
    "Task",
    "TaskFailed",
    "aconnect",
    "connect",
    "task_spec",
]


class ServiceError(Exception):
    """The service refused a request or could not be reached; the message says why."""


class NotAService(ServiceError):
    """The replicas answer, but run a computation, not the service's queue scheduler."""


class TaskFailed(ServiceError):
    """``result()`` of a task that failed or was cancelled; ``info`` is everything known about it."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(f"task {info['id']} {info['state']}: {info.get('error') or ''}".rstrip(": "))
        self.info = info


def task_spec(
    cmd: str | None = None,
    *,
    argv: Sequence[str] | None = None,
    require: Iterable[str] = (),
    want: Iterable[str] = (),
    after: Iterable[int | AsyncTask | Task] = (),
    name: str | None = None,
    job: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    limits: dict[str, Any] | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A task spec as the queue scheduler takes it (it checks it again, as it does every spec)."""
    spec: dict[str, Any] = {"cmd": cmd} if argv is None else {"argv": list(argv)}
    if cmd is not None and argv is not None:
        raise ValueError("give a command line (cmd) or argv, not both")
    ids = [a if isinstance(a, int) else a.id for a in after]
    for key, value in (
        ("require", list(require)),
        ("want", list(want)),
        ("after", ids),
        ("name", name),
        ("job", job),
        ("retries", retries),
        ("timeout", timeout),
        ("limits", limits),
        ("cwd", cwd),
        ("env", env),
    ):
        if value:
            spec[key] = value
    return spec


def submit_body(specs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The compact ``submit`` command for ``specs``: each distinct spec once, and per task its index."""
    index: dict[Any, int] = {}
    distinct: list[dict[str, Any]] = []
    by_object: dict[int, int] = {}  # the same object again needs no encoding
    each = []
    for spec in specs:
        i = by_object.get(id(spec))
        if i is None:
            key = codec.encode(spec)
            i = index.get(key)
            if i is None:
                i = index[key] = len(distinct)
                distinct.append(spec)
            by_object[id(spec)] = i
        each.append(i)
    return {"do": "submit", "specs": distinct, "each": each}


def _fill(template: str | Callable[[Any], Any], item: Any) -> Any:
    if callable(template):
        return template(item)
    return template.format(*item) if isinstance(item, tuple) else template.format(item)


@attrs.define(eq=False)
class AsyncService:
    """A connection to the service for trio code; use as ``async with``."""

    addrs: list[tuple[str, int]]
    secret: bytes
    _log: LogClient | None = None
    _channel: ReplicaChannel | None = None
    _leader_known: bool = False

    async def __aenter__(self) -> AsyncService:
        self._log = LogClient(self.addrs, self.secret)
        await self._log.__aenter__()
        self._channel = ReplicaChannel(self.addrs, self.secret)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._channel is not None:
            await self._channel.aclose()
        if self._log is not None:
            # Not handed the body's exception: the log client's nursery would wrap it in a group.
            await self._log.__aexit__(None, None, None)

    # ------------------------------------------------------------- submit

    async def command(self, body: dict[str, Any], *, deadline: float = 30.0) -> Any:
        """Send ``body`` to the queue scheduler through the log; its answer, or raise :class:`ServiceError`."""
        assert self._log is not None, "use AsyncService as an async context manager"
        try:
            answer = await self._log.submit(CommandOp(body=body).to_wire(), deadline=deadline)
        except Unavailable as exc:
            raise ServiceError(f"the service did not answer: {exc}") from None
        return _value(answer)

    async def submit_specs(self, specs: Sequence[dict[str, Any]], *, deadline: float = 60.0) -> list[int]:
        """Submit task specs (see :func:`task_spec`), up to ``MAX_BATCH`` per log command; their ids.

        Each command takes the compact form (distinct specs once, then an
        index per task), so submitting one command many times sends it once
        per batch.
        """
        batches = [submit_body(specs[i : i + MAX_BATCH]) for i in range(0, len(specs), MAX_BATCH)]
        assert self._log is not None, "use AsyncService as an async context manager"
        try:
            answers = await self._log.submit_many([CommandOp(body=b).to_wire() for b in batches], deadline=deadline)
        except Unavailable as exc:
            raise ServiceError(f"the service did not answer: {exc}") from None
        ids: list[int] = []
        for i, answer in enumerate(answers):
            value = _value(answer)
            count = len(batches[i]["each"])
            if "error" in value:
                first = i * MAX_BATCH
                raise ServiceError(f"submission refused (tasks {first + 1}..{first + count}): {value['error']}")
            ids += range(value["first"], value["first"] + count)
        return ids

    async def submit(self, cmd: str | None = None, **options: Any) -> AsyncTask:
        """Submit one command task (options as :func:`task_spec`); its handle."""
        (tid,) = await self.submit_specs([task_spec(cmd, **options)])
        return AsyncTask(self, tid)

    async def map(self, template: str | Callable[[Any], Any], items: Iterable[Any], **options: Any) -> list[AsyncTask]:
        """One task per item: ``template.format(item)`` (a tuple fills several fields) or ``template(item)``.

        A callable may return a command line or a whole spec dict.
        """
        specs = []
        for item in items:
            filled = _fill(template, item)
            specs.append(filled if isinstance(filled, dict) else task_spec(filled, **options))
        return [AsyncTask(self, i) for i in await self.submit_specs(specs)]

    async def cancel(self, ids: Iterable[int | AsyncTask] = (), *, job: str | None = None) -> list[int]:
        """Cancel tasks (and every task that runs after them), or a whole job; the ids cancelled."""
        body: dict[str, Any] = {"do": "cancel"}
        if job is not None:
            body["job"] = job
        else:
            body["ids"] = [i if isinstance(i, int) else i.id for i in ids]
        value = await self.command(body)
        if "error" in value:
            raise ServiceError(f"cancel refused: {value['error']}")
        return list(value["cancelled"])

    async def configure(self, *, retention: float) -> None:
        """Set how many seconds finished tasks keep their full record before they are compacted."""
        value = await self.command({"do": "configure", "retention": retention})
        if "error" in value:
            raise ServiceError(f"configure refused: {value['error']}")

    async def tags(self, worker: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
        """Change a live worker's tags; its tags now."""
        return list((await self._worker(WorkerOp(client=worker, add=tuple(add), remove=tuple(remove)))).tags)

    async def drain(self, worker: str) -> None:
        """Let worker ``worker`` finish what it runs and give it nothing more."""
        await self._worker(WorkerOp(client=worker, drain=True))

    async def _worker(self, op: WorkerOp) -> WorkerChanged:
        assert self._log is not None, "use AsyncService as an async context manager"
        try:
            answer = await self._log.submit(op.to_wire(), deadline=30.0)
        except Unavailable as exc:
            raise ServiceError(f"the service did not answer: {exc}") from None
        if isinstance(answer, Refused):
            raise ServiceError(answer.error)
        if not isinstance(answer, WorkerChanged):
            raise ServiceError(f"unexpected answer {answer!r:.200}")
        return answer

    # ------------------------------------------------------------ questions

    async def ask(self, **args: Any) -> Any:
        """A question for the queue scheduler (see :mod:`tasksprint.service.scheduler`)."""
        channel = self._channel
        assert channel is not None, "use AsyncService as an async context manager"
        if not self._leader_known:
            await self._find_leader()
        try:
            answer = await channel.ask_any(SchedulerRequest(body=args))
        except Unreachable as exc:
            if "takes no" in str(exc) or "answers no queries" in str(exc):
                raise NotAService(
                    "the replicas run a computation, not the service (use the computation's commands)"
                ) from None
            raise ServiceError(str(exc)) from None
        return answer.value

    async def _find_leader(self) -> None:
        channel = self._channel
        assert channel is not None
        for host, port in self.addrs:
            try:
                st = await channel.status((host, port), timeout=1.0)
            except (*ASK_ERRORS, OSError):
                continue
            if st.leader is not None and 0 <= st.leader < len(self.addrs):
                await channel.prefer(st.leader)
                self._leader_known = True
            return

    async def worker_addresses(self) -> dict[str, str]:
        """The data address (``HOST:PORT``) of each live worker, by name: where its task outputs are fetched."""
        channel = self._channel
        assert channel is not None, "use AsyncService as an async context manager"
        try:
            status = await channel.ask_any(StatusRequest())
        except Unreachable as exc:
            raise ServiceError(str(exc)) from None
        return {c.name: c.addr for c in status.live_clients}

    async def info(self, tid: int) -> dict[str, Any] | None:
        """Everything known about task ``tid`` (None: no such task).

        A compacted task is read from a replica's history; one that caught
        up from another's snapshot may lack it (``"history": "missing"``),
        so the other replicas are asked before that answer is returned.
        """
        result: dict[str, Any] | None = await self.ask(q="info", id=tid)
        channel = self._channel
        assert channel is not None
        for _ in range(len(self.addrs) - 1):
            if result is None or result.get("history") != "missing":
                break
            await channel.move_on()
            self._leader_known = False  # the next question finds the leader again
            try:
                other = await channel.request(SchedulerRequest(body={"q": "info", "id": tid}))
            except ASK_ERRORS:
                continue
            if isinstance(other.value, dict):
                result = other.value
        return result

    async def status(self, **filters: Any) -> dict[str, Any]:
        """A page of tasks: filters ``state``, ``tag``, ``job``, ``worker``; ``offset``, ``limit``."""
        result: dict[str, Any] = await self.ask(q="status", **{k: v for k, v in filters.items() if v is not None})
        return result

    async def states(self, ids: Sequence[int]) -> dict[int, str | None]:
        """The state of each task of ``ids`` (None: unknown)."""
        out: dict[int, str | None] = {}
        for i in range(0, len(ids), 5000):
            answer = await self.ask(q="states", ids=list(ids[i : i + 5000]))
            out.update({int(k): v for k, v in answer.items()})
        return out

    async def job(self, job: str) -> list[int]:
        """The ids of the tasks of ``job``."""
        return list(await self.ask(q="job", job=job))

    async def wait(
        self, ids: Iterable[int | AsyncTask], *, timeout: float | None = None, poll: float = 0.2
    ) -> dict[int, str]:
        """Wait until every task of ``ids`` finished; their final states.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        want = [i if isinstance(i, int) else i.id for i in ids]
        left = list(dict.fromkeys(want))
        final: dict[int, str] = {}
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                while left:
                    states = await self.states(left)
                    for tid, st in states.items():
                        if st in FINISHED:
                            final[tid] = st
                    left = [i for i in left if i not in final]
                    if left:
                        await trio.sleep(poll)
        except trio.TooSlowError:
            # The documented exception (trio's own is not a TimeoutError).
            raise TimeoutError(f"tasks {left[:10]} not finished after {timeout}s") from None
        return final


@attrs.define(eq=False)
class AsyncTask:
    """A submitted task, for trio code."""

    service: AsyncService
    id: int

    async def wait(self, timeout: float | None = None) -> str:
        """Its final state (``done``, ``failed``, ``cancelled``)."""
        return (await self.service.wait([self.id], timeout=timeout))[self.id]

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait; its info (exit code, times, output) if it succeeded, else raise :class:`TaskFailed`."""
        await self.wait(timeout)
        info = await self.info()
        assert info is not None
        if info["state"] != "done":
            raise TaskFailed(info)
        return info

    async def cancel(self) -> list[int]:
        return await self.service.cancel([self.id])

    async def info(self) -> dict[str, Any] | None:
        return await self.service.info(self.id)


def _value(answer: Any) -> Any:
    if isinstance(answer, Refused):
        if answer.code == "unknown" and "takes no commands" in answer.error:
            raise NotAService("the replicas run a computation, not the service")
        raise ServiceError(answer.error)
    if not isinstance(answer, Commanded):
        raise ServiceError(f"unexpected answer {answer!r:.200}")
    return answer.value


def aconnect(
    server: str | None = None, *, state: Path | str | None = None, secret_file: Path | None = None
) -> AsyncService:
    """An :class:`AsyncService` for the service at ``server`` (``HOST:PORT,...``; default: found as
    :func:`tasksprint.service.home.locate` says); use it as ``async with``."""
    addrs, secret = locate(server, state, secret_file)
    return AsyncService(addrs, secret)


@attrs.define(eq=False)
class Service:
    """A synchronous connection to the service (see the module docstring)."""

    addrs: list[tuple[str, int]]
    secret: bytes

    def _run(self, fn: Callable[[AsyncService], Any]) -> Any:
        async def go() -> Any:
            async with AsyncService(self.addrs, self.secret) as svc:
                return await fn(svc)

        return trio.run(go)

    def submit(self, cmd: str | None = None, **options: Any) -> Task:
        """Submit one command task; see :func:`task_spec` for the options."""
        (tid,) = self.submit_specs([task_spec(cmd, **options)])
        return Task(self, tid)

    def submit_specs(self, specs: Sequence[dict[str, Any]]) -> list[int]:
        return list(self._run(lambda s: s.submit_specs(specs)))

    def map(self, template: str | Callable[[Any], Any], items: Iterable[Any], **options: Any) -> list[Task]:
        """One task per item, submitted in bulk (see :meth:`AsyncService.map`)."""
        items = list(items)
        return [Task(self, t.id) for t in self._run(lambda s: s.map(template, items, **options))]

    def cancel(self, ids: Iterable[int | Task] = (), *, job: str | None = None) -> list[int]:
        plain = [i if isinstance(i, int) else i.id for i in ids]
        return list(self._run(lambda s: s.cancel(plain, job=job)))

    def info(self, tid: int) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._run(lambda s: s.info(tid))
        return result

    def status(self, **filters: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._run(lambda s: s.status(**filters))
        return result

    def wait(self, ids: Iterable[int | Task], *, timeout: float | None = None) -> bool:
        """Wait for every task; True if all of them succeeded."""
        plain = [i if isinstance(i, int) else i.id for i in ids]
        final = self._run(lambda s: s.wait(plain, timeout=timeout))
        return all(v == "done" for v in final.values())

    def tags(self, worker: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> list[str]:
        return list(self._run(lambda s: s.tags(worker, add, remove)))

    def drain(self, worker: str) -> None:
        self._run(lambda s: s.drain(worker))

    def configure(self, *, retention: float) -> None:
        """Set the retention of finished tasks' full records, in seconds."""
        self._run(lambda s: s.configure(retention=retention))


@attrs.define(eq=False)
class Task:
    """A submitted task: ``result()``, ``wait()``, ``cancel()``, ``info()``."""

    service: Service
    id: int

    def wait(self, timeout: float | None = None) -> str:
        """Its final state (``done``, ``failed``, ``cancelled``)."""
        final: dict[int, str] = self.service._run(lambda s: s.wait([self.id], timeout=timeout))
        return final[self.id]

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait; its info (exit code, times, output) if it succeeded, else raise :class:`TaskFailed`."""
        info: dict[str, Any] = self.service._run(lambda s: AsyncTask(s, self.id).result(timeout))
        return info

    def cancel(self) -> list[int]:
        return self.service.cancel([self.id])

    def info(self) -> dict[str, Any] | None:
        return self.service.info(self.id)


def connect(server: str | None = None, *, state: Path | str | None = None, secret_file: Path | None = None) -> Service:
    """A :class:`Service` for the service at ``server`` (``HOST:PORT,...``; default: this machine's)."""
    addrs, secret = locate(server, state, secret_file)
    return Service(addrs, secret)
