"""A pool of node processes of one command, running tasks on whichever is free.

Theory of operation
-------------------
:class:`NodePool` keeps ``slots`` processes (:class:`~tasksprint.node_process.NodeProcess`)
of the same command: it runs each task on a free one, replaces a process that
died in the background, and cancels a task by killing the process running
it. A semaphore with ``slots`` tokens bounds the processes: a token is held
by a running task or by the start of a replacement, so the pool never runs
more than ``slots`` processes, and closing the pool takes every token back
before it stops the idle processes -- after :meth:`NodePool.aclose` no
process is left, not even a zombie.

The pool reports to its :class:`~tasksprint.observe.Observer`: span
``node.run`` (a task, including the wait for a free node), ``node.exchange``
(the pipe round trip plus the node's work), ``node.start`` (a process until
its ready line) and ``node.idle`` (a node's time between the end of its
previous task and the start of this one).  The callables are wrapped once,
when the pool is built; unobserved, the pool reads no clock for ``node.idle``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from typing import Any

import attrs
import structlog
import trio

from tasksprint.node_process import HasFileno, NodeProcess, NodeStartError
from tasksprint.node_protocol import (
    DEFAULT_MAX_LINE,
    FailureKind,
    TaskOutcome,
    TaskRequest,
    check_int,
    check_seconds,
)
from tasksprint.observe import NULL, Observer

__all__ = ["NodePool"]


class _PoolState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@attrs.define(eq=False)
class _RunHandle:
    """A pool.run() in progress, so that cancel() and aclose() can stop it."""

    _scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    # Why it was stopped; the first reason given wins.
    _reason: FailureKind | None = attrs.field(init=False, default=None)

    @property
    def scope(self) -> trio.CancelScope:
        """The scope the run executes in."""
        return self._scope

    @property
    def reason(self) -> FailureKind | None:
        """CANCELLED or CLOSED once stopped, else None."""
        return self._reason

    def stop(self, reason: FailureKind) -> None:
        """Cancel the run, recording ``reason`` unless it was already stopped."""
        if self._reason is None:
            self._reason = reason
        self._scope.cancel()


@attrs.define(eq=False)
class NodePool:
    """``slots`` processes of one node command, running tasks on whichever is free.

    Usage::

        pool = NodePool("python node.py", slots=4)
        await pool.start(nursery)
        try:
            outcome = await pool.run(task)
        finally:
            await pool.aclose()

    Args:
        command: the node command line (see :meth:`NodeProcess.start`).
        slots: how many node processes to keep, and so how many tasks run at once.
        env: variables added to the nodes' environment; the running Python's
            directory is put first on ``PATH`` (:func:`node_environment`).
        cwd: the nodes' working directory.
        stderr: where the nodes' logs go (file descriptor or file object);
            this process's stderr when None.
        start_timeout: seconds a node gets to write its ready line.
        exit_grace: seconds a node gets to exit when asked before it is killed.
        max_line: longest line, in bytes, accepted from a node.
        log: a structlog logger; the module's logger when None.
        observer: where the pool reports what tasks and nodes cost (see the module docstring).
    """

    _command: str = attrs.field(validator=attrs.validators.instance_of(str))
    _slots: int = attrs.field(validator=[check_int, attrs.validators.ge(1)])
    _env: Mapping[str, str] | None = None
    _cwd: str | os.PathLike[str] | None = None
    _stderr: int | HasFileno | None = None
    _start_timeout: float = attrs.field(default=30.0, validator=check_seconds)
    _exit_grace: float = attrs.field(default=2.0, validator=check_seconds)
    _max_line: int = attrs.field(default=DEFAULT_MAX_LINE, validator=[check_int, attrs.validators.ge(1)])
    _log: Any = None
    _observer: Observer = attrs.field(default=NULL, kw_only=True)

    _state: _PoolState = attrs.field(init=False, default=_PoolState.NEW)
    _idle: list[NodeProcess] = attrs.field(init=False, factory=list)
    _busy: set[NodeProcess] = attrs.field(init=False, factory=set)
    # One token per slot, held by a running task or by the start of a replacement node.
    _tokens: trio.Semaphore = attrs.field(init=False)
    _running: dict[int, list[_RunHandle]] = attrs.field(init=False, factory=dict)
    _helpers: trio.Nursery | None = attrs.field(init=False, default=None)
    # Cancelled by aclose(): ends _serve, the pool's one long-lived task.
    _serve_scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _closed: trio.Event = attrs.field(init=False, factory=trio.Event)
    # The steps the observer times, wrapped once (the functions themselves when unobserved).
    _run_timed: Any = attrs.field(init=False, default=None)
    _exchange: Any = attrs.field(init=False, default=None)
    _spawn: Any = attrs.field(init=False, default=None)
    # When each idle node finished its last task (trio clock), only when observed.
    _finished_at: dict[NodeProcess, float] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._tokens = trio.Semaphore(self._slots)
        observer = self._observer
        self._run_timed = observer.timed_async("node.run", NodePool._run_on_node)
        self._exchange = observer.timed_async("node.exchange", NodeProcess.run)
        self._spawn = observer.timed_async("node.start", NodeProcess.start)
        if observer is not NULL:
            self._finished_at = {}
        base = self._log if self._log is not None else structlog.get_logger(__name__)
        self._log = base.bind(node_command=self._command)

    @property
    def pids(self) -> tuple[int, ...]:
        """Process ids of the node processes now idle or running a task."""
        return tuple(sorted(node.pid for node in [*self._idle, *self._busy]))

    async def start(self, nursery: trio.Nursery) -> None:
        """Start ``slots`` node processes; the pool then lives in ``nursery``.

        The pool closes itself (as :meth:`aclose`) when ``nursery`` is cancelled.

        Raises:
            NodeStartError: a node could not be started (those that did are stopped).
            RuntimeError: the pool was started before.
        """
        if self._state is not _PoolState.NEW:
            raise RuntimeError(f"this node pool is {self._state.value}; a pool can be started once")
        # Open before _serve runs, so that an aclose() from now on goes through _serve's shutdown.
        self._state = _PoolState.OPEN
        await nursery.start(self._serve)

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._serve_scope:
                self._idle.extend(await self._start_nodes(self._slots))
                async with trio.open_nursery() as helpers:
                    self._helpers = helpers
                    task_status.started()
                    try:
                        await trio.sleep_forever()
                    finally:
                        # Before the helpers nursery waits for its tasks, so that
                        # nothing new is started from now on.
                        self._state = _PoolState.CLOSING
            if self._helpers is None:
                # aclose() came while the first nodes were starting: start() returns, the pool is closed.
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _start_nodes(self, count: int) -> list[NodeProcess]:
        """Start ``count`` nodes at once; on any failure stop them all and raise the first error."""
        started: list[NodeProcess] = []
        errors: list[NodeStartError] = []

        async def start_one() -> None:
            try:
                started.append(await self._start_node())
            except NodeStartError as exc:
                errors.append(exc)

        complete = False
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(start_one)
            complete = not errors
        finally:
            if not complete:
                for node in started:
                    await node.kill()
        if errors:
            raise errors[0]
        return started

    async def _start_node(self) -> NodeProcess:
        return await self._spawn(
            self._command,
            env=self._env,
            cwd=self._cwd,
            stderr=self._stderr,
            start_timeout=self._start_timeout,
            exit_grace=self._exit_grace,
            max_line=self._max_line,
            log=self._log,
        )

    async def run(self, task: TaskRequest) -> TaskOutcome:
        """Run ``task`` on the next free node.

        Returns:
            The outcome. Failures: the node's error answer (TASK_ERROR), a
            crash, a protocol violation, a timeout (the node is replaced by a
            fresh process in each of these three cases), a cancellation by
            :meth:`cancel`, no node could be started, or the pool is closed.

        Raises:
            ValueError: the task's inputs or arguments are not JSON.
            RuntimeError: the pool was never started.
        """
        if self._state is _PoolState.NEW:
            raise RuntimeError("start the node pool (await pool.start(nursery)) before running tasks")
        if self._state is not _PoolState.OPEN:
            return TaskOutcome.failed(
                task, FailureKind.CLOSED, f"{task.describe()} was not run: the node pool is closed"
            )
        entry = _RunHandle()
        self._running.setdefault(task.tid, []).append(entry)
        try:
            with entry.scope:
                return await self._run_timed(self, task)
            if entry.reason is FailureKind.CLOSED:
                error = f"{task.describe()} was stopped: the node pool is closing"
            else:
                error = f"{task.describe()} was cancelled"
            return TaskOutcome.failed(task, entry.reason or FailureKind.CANCELLED, error)
        finally:
            entries = self._running[task.tid]
            entries.remove(entry)
            if not entries:
                del self._running[task.tid]

    async def _run_on_node(self, task: TaskRequest) -> TaskOutcome:
        await self._tokens.acquire()
        node: NodeProcess | None = None
        token_passed = False
        try:
            node = await self._take_node()
            self._busy.add(node)
            finished_at = self._finished_at
            if finished_at is None:
                return await self._exchange(node, task)
            previous = finished_at.pop(node, None)
            if previous is not None:
                self._observer.timing("node.idle", max(0.0, trio.current_time() - previous))
            try:
                return await self._exchange(node, task)
            finally:
                if node.alive:
                    finished_at[node] = trio.current_time()
        except NodeStartError as exc:
            self._log.error("node_start_failed", tid=task.tid, error=str(exc))
            return TaskOutcome.failed(task, FailureKind.START_FAILED, f"{task.describe()} was not run: {exc}")
        finally:
            if node is not None:
                self._busy.discard(node)
                if node.alive:
                    self._idle.append(node)
                elif self._state is _PoolState.OPEN and self._helpers is not None:
                    # The replacement starts in the background and gives the token back when done.
                    self._helpers.start_soon(self._replace)
                    token_passed = True
            if not token_passed:
                self._tokens.release()

    async def _take_node(self) -> NodeProcess:
        while self._idle:
            node = self._idle.pop()
            if node.alive:
                return node
            # Died while idle (killed from outside, out of memory): reap it and move on.
            self._log.warning("idle_node_died", node_pid=node.pid)
            self._observer.count("node.restart")
            if self._finished_at is not None:
                self._finished_at.pop(node, None)
            await node.kill()
        return await self._start_node()

    async def _replace(self) -> None:
        try:
            try:
                node = await self._start_node()
            except NodeStartError as exc:
                # The next task starts a node itself and reports the error if it persists.
                self._log.error("node_restart_failed", error=str(exc))
                return
            self._observer.count("node.restart")
            self._idle.append(node)
        finally:
            self._tokens.release()

    def cancel(self, tid: int) -> bool:
        """Stop every attempt of task ``tid`` running or waiting in this pool.

        A running attempt's node is killed (and replaced); the attempt's
        :meth:`run` returns a CANCELLED outcome promptly.

        Returns:
            Whether an attempt of ``tid`` was found.
        """
        entries = self._running.get(tid, [])
        for entry in entries:
            entry.stop(FailureKind.CANCELLED)
        if entries:
            self._log.info("task_cancelled", tid=tid, attempts=len(entries))
        return bool(entries)

    async def aclose(self) -> None:
        """Stop the pool: running tasks end with CLOSED outcomes, every node process is stopped.

        Returns once every node process has exited and been reaped.
        Idempotent.
        """
        if self._state is _PoolState.NEW:
            self._state = _PoolState.CLOSED
            self._closed.set()
            return
        self._serve_scope.cancel()
        await self._closed.wait()

    async def _shutdown(self) -> None:
        self._state = _PoolState.CLOSING
        for entries in self._running.values():
            for entry in entries:
                entry.stop(FailureKind.CLOSED)
        # Every token back means no task is running and no replacement is starting.
        for _ in range(self._slots):
            await self._tokens.acquire()
        idle, self._idle = self._idle, []
        async with trio.open_nursery() as nursery:
            for node in idle:
                nursery.start_soon(node.aclose)
        self._state = _PoolState.CLOSED
        self._closed.set()
        self._log.info("node_pool_closed")
