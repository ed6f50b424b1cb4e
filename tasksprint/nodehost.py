"""Run a user's node processes and talk to them over the node stdio protocol.

Theory of operation
-------------------
A node is a process started from the user's node command. It speaks the
node stdio protocol (version 1, ``docs/protocol.md``): JSON objects, one per
line, on its stdin and stdout; its stderr is its log and passes straight
through. The node first writes ``{"type": "ready", "protocol": 1, ...}``;
after that the host writes one ``task`` line at a time and reads exactly one
``result`` or ``error`` line back.

:class:`NodeProcess` owns one such process. Anything that makes the process
untrustworthy -- it exits or closes its stdout mid-task, writes a line that
is not a valid answer to the task it was given, runs past the task's
timeout, or the caller cancels the task -- ends with the process (and its
process group) killed and reaped, and the task's :class:`TaskOutcome` saying
why. A node is never reused after it misbehaved, so one bad task cannot
corrupt the next.

:class:`NodePool` keeps ``slots`` processes of the same command: it runs each
task on a free one, replaces a process that died in the background, and
cancels a task by killing the process running it. A semaphore with ``slots``
tokens bounds the processes: a token is held by a running task or by the
start of a replacement, so the pool never runs more than ``slots``
processes, and closing the pool takes every token back before it stops the
idle processes -- after :meth:`NodePool.aclose` no process is left, not even
a zombie.

Processes start in a session of their own so that killing a node also kills
whatever it started.
"""

from __future__ import annotations

import enum
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from typing import Any, Mapping, Protocol

import attrs
import structlog
import trio

__all__ = [
    "PROTOCOL_VERSION",
    "FailureKind",
    "NodePool",
    "NodeProcess",
    "NodeStartError",
    "NodeState",
    "TaskOutcome",
    "TaskRequest",
    "node_environment",
]

#: The version of the node stdio protocol this host speaks.
PROTOCOL_VERSION = 1

#: Longest line (bytes) accepted from a node; one task's outputs travel as one line.
DEFAULT_MAX_LINE = 256 * 1024 * 1024

# How much of a node's bad output an error message quotes.
_QUOTE_CHARS = 200
_READ_CHUNK = 65536
_EXIT_LINE = b'{"type":"exit"}\n'


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class NodeStartError(Exception):
    """A node process could not be started or did not announce itself as ready."""


class FailureKind(enum.Enum):
    """Why a task did not produce outputs."""

    #: The node ran the task and reported an error (the task's code raised).
    TASK_ERROR = "task_error"
    #: The node process exited or closed its stdout while running the task.
    CRASHED = "crashed"
    #: The node wrote something that is not a valid answer to the task.
    PROTOCOL = "protocol"
    #: The task ran past its timeout.
    TIMEOUT = "timeout"
    #: The task was cancelled (:meth:`NodePool.cancel`).
    CANCELLED = "cancelled"
    #: No node process could be started to run the task.
    START_FAILED = "start_failed"
    #: The pool was closing or closed.
    CLOSED = "closed"


class NodeState(enum.Enum):
    """Life cycle of a :class:`NodeProcess`."""

    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


def _check_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")


def _check_seconds(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _check_timeout(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _check_seconds(instance, attribute, value)


@attrs.frozen(kw_only=True)
class TaskRequest:
    """One task for a node, with its inputs already selected by the task's prekeys."""

    tid: int = attrs.field(validator=_check_int)
    attempt: int = attrs.field(validator=_check_int)
    name: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: Dependency values in pretask order.
    inputs: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    args: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    kwargs: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    seed: int = attrs.field(validator=_check_int)
    #: Seconds the task may run before its node is killed; None for no limit.
    timeout: float | None = attrs.field(default=None, validator=_check_timeout)

    def describe(self) -> str:
        """``task TID (NAME)``, for messages."""
        return f"task {self.tid} ({self.name})"


@attrs.frozen(kw_only=True)
class TaskOutcome:
    """How a task ended: ``outputs`` when ``ok``, else ``failure`` and ``error``."""

    tid: int = attrs.field(validator=_check_int)
    attempt: int = attrs.field(validator=_check_int)
    ok: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    outputs: dict[str, Any] | None = None
    failure: FailureKind | None = None
    error: str = ""
    #: The node's traceback for a TASK_ERROR, when it sent one.
    traceback: str = ""
    #: Seconds from writing the task to the node to its answer (0 if no node ran it).
    seconds: float = attrs.field(default=0.0, eq=False)

    def __attrs_post_init__(self) -> None:
        # Invariant: exactly one of (outputs) and (failure, error) describes the outcome.
        if self.ok:
            assert isinstance(self.outputs, dict) and self.failure is None, self
        else:
            assert self.outputs is None and isinstance(self.failure, FailureKind) and self.error, self

    @classmethod
    def success(cls, task: TaskRequest, outputs: dict[str, Any]) -> TaskOutcome:
        """The outcome of ``task`` that produced ``outputs``."""
        return cls(tid=task.tid, attempt=task.attempt, ok=True, outputs=outputs)

    @classmethod
    def failed(cls, task: TaskRequest, failure: FailureKind, error: str, traceback: str = "") -> TaskOutcome:
        """The outcome of ``task`` that failed for ``failure``, explained by ``error``."""
        return cls(
            tid=task.tid, attempt=task.attempt, ok=False, failure=failure, error=error, traceback=traceback
        )


def node_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for node processes.

    It is this process's environment, updated with ``extra``, with the
    directory of the running Python first on ``PATH``: a node command such
    as ``python node.py`` then runs the same Python, with the same installed
    packages, as the client.

    Returns:
        A new dict.
    """
    env = dict(os.environ)
    env.update(extra or {})
    if sys.executable:
        bindir = os.path.dirname(os.path.abspath(sys.executable))
        path = env.get("PATH", "")
        env["PATH"] = bindir + os.pathsep + path if path else bindir
    return env


def _quote(raw: bytes | bytearray) -> str:
    text = bytes(raw).decode("utf-8", errors="replace")
    if len(text) > _QUOTE_CHARS:
        text = text[:_QUOTE_CHARS] + "..."
    return repr(text)


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            cause = signal.Signals(-code).name
        except ValueError:
            cause = f"signal {-code}"
        return f"exited with code {code} (killed by {cause})"
    return f"exited with code {code}"


def _task_line(task: TaskRequest) -> bytes:
    """The task message as one protocol line.

    Raises:
        ValueError: an input or argument cannot be written as JSON.
    """
    message = {
        "type": "task",
        "id": task.tid,
        "attempt": task.attempt,
        "name": task.name,
        "inputs": list(task.inputs),
        "args": list(task.args),
        "kwargs": dict(task.kwargs),
        "seed": task.seed,
    }
    try:
        # allow_nan=False: NaN is not JSON, and nodes in other languages could not read it.
        text = json.dumps(message, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{task.describe()} has inputs or arguments that are not JSON: {exc}") from exc
    return text.encode("utf-8") + b"\n"


class _LineTooLong(Exception):
    pass


@attrs.define(eq=False)
class _LineReader:
    """Splits a byte stream into lines, refusing lines longer than ``max_line``."""

    _stream: trio.abc.ReceiveStream
    _max_line: int
    _buffer: bytearray = attrs.field(factory=bytearray)
    # Bytes of _buffer already searched for a newline.
    _scanned: int = 0

    @property
    def max_line(self) -> int:
        """The longest line accepted, in bytes."""
        return self._max_line

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete line."""
        return bytes(self._buffer)

    async def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream.

        Raises:
            _LineTooLong: more than ``max_line`` bytes arrived without a newline.
        """
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            if self._scanned > self._max_line:
                raise _LineTooLong
            try:
                chunk = await self._stream.receive_some(_READ_CHUNK)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # Closed by kill() from another task, or the pipe broke: both end the stream.
                return None
            if not chunk:
                return None
            self._buffer += chunk


@attrs.define(eq=False)
class NodeProcess:
    """One running node process. Create it with :meth:`start`."""

    _command: str
    _process: trio.Process
    _reader: _LineReader
    _exit_grace: float
    _log: Any
    _state: NodeState = NodeState.IDLE
    _sdk: str = "unknown"

    @classmethod
    async def start(
        cls,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stderr: int | HasFileno | None = None,
        start_timeout: float = 30.0,
        exit_grace: float = 2.0,
        max_line: int = DEFAULT_MAX_LINE,
        log: Any = None,
    ) -> NodeProcess:
        """Start ``command`` and wait until the node says it is ready.

        Args:
            command: a shell-style command line, split with :func:`shlex.split`
                (no shell runs it).
            env: variables added to this process's environment (see
                :func:`node_environment`).
            cwd: the node's working directory; this process's when None.
            stderr: where the node's log goes: a file descriptor or file
                object; this process's stderr when None.
            start_timeout: seconds to wait for the ready line.
            exit_grace: seconds a node gets to exit on its own before it is
                killed, on :meth:`aclose` and after it closed its stdout.
            max_line: longest line, in bytes, accepted from the node.
            log: a structlog logger; the module's logger when None.

        Returns:
            An idle node process.

        Raises:
            NodeStartError: the command is empty or malformed, cannot be
                executed, exits or writes anything but a ready line, speaks
                another protocol version, or is not ready in time. The
                message names the command and quotes what the node wrote.
        """
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise NodeStartError(f"node command {command!r} cannot be parsed: {exc}") from exc
        if not argv:
            raise NodeStartError("the node command is empty; give the command that starts a node")
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=node_environment(env),
                cwd=cwd,
                # Own process group: kill() then reaches whatever the node started.
                start_new_session=True,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NodeStartError(f"cannot start node command {command!r}: {reason}: {argv[0]!r}") from exc
        base_log = log if log is not None else structlog.get_logger(__name__)
        assert process.stdout is not None and process.stdin is not None
        node = cls(
            command,
            process,
            _LineReader(process.stdout, max_line),
            exit_grace,
            base_log.bind(node_pid=process.pid),
        )
        try:
            await node._await_ready(start_timeout)
        except BaseException:
            await node.kill()
            raise
        node._log.info("node_started", command=command, sdk=node._sdk)
        return node

    @property
    def pid(self) -> int:
        """The node's process id."""
        return self._process.pid

    @property
    def state(self) -> NodeState:
        """IDLE, BUSY or DEAD."""
        return self._state

    @property
    def alive(self) -> bool:
        """Whether the node can run tasks: not killed and its process still running."""
        return self._state is not NodeState.DEAD and self._process.returncode is None

    @property
    def sdk(self) -> str:
        """What the node's ready line said it was written with (``python``, ``js``, ...)."""
        return self._sdk

    async def _await_ready(self, start_timeout: float) -> None:
        what = f"node command {self._command!r}"
        expected = f'the ready line {{"type": "ready", "protocol": {PROTOCOL_VERSION}}}'
        with trio.move_on_after(start_timeout) as waited:
            try:
                line = await self._reader.readline()
            except _LineTooLong:
                raise NodeStartError(
                    f"{what} wrote {_quote(self._reader.pending)} without a newline instead of {expected}"
                ) from None
        if waited.cancelled_caught:
            printed = self._reader.pending
            suffix = f"; it wrote {_quote(printed)} without a newline" if printed else ""
            raise NodeStartError(f"{what} did not write {expected} within {start_timeout:g} s{suffix}")
        if line is None:
            printed = self._reader.pending
            status = await self._exit_status_after_eof()
            suffix = f" after writing {_quote(printed)}" if printed else ""
            raise NodeStartError(f"{what} {status} before it was ready{suffix}")
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("type") != "ready":
            raise NodeStartError(f"{what} wrote {_quote(line)} instead of {expected}")
        if message.get("protocol") != PROTOCOL_VERSION:
            raise NodeStartError(
                f"{what} speaks node protocol {message.get('protocol')!r}, but this client speaks "
                f"protocol {PROTOCOL_VERSION}; use a node SDK for protocol {PROTOCOL_VERSION}"
            )
        sdk = message.get("sdk")
        self._sdk = sdk if isinstance(sdk, str) else "unknown"

    async def _exit_status_after_eof(self) -> str:
        """Wait a grace period for a node that closed its stdout; kill it if it lingers.

        Returns:
            How it ended, e.g. ``exited with code 3``.
        """
        with trio.move_on_after(self._exit_grace):
            await self._process.wait()
        if self._process.returncode is not None:
            status = _exit_description(self._process.returncode)
            await self.kill()
            return status
        await self.kill()
        return "closed its stdout (it was killed)"

    async def run(self, task: TaskRequest) -> TaskOutcome:
        """Run one task on this node and return how it ended.

        Every failure other than an error answer from the node (crash,
        protocol violation, timeout, cancellation of the caller) leaves
        the node killed, reaped and DEAD.

        Returns:
            The outcome; a failure names the task and what went wrong.

        Raises:
            RuntimeError: the node is not idle.
            ValueError: the task's inputs or arguments are not JSON.
            trio.Cancelled: the caller was cancelled (the node is killed first).
        """
        if self._state is not NodeState.IDLE:
            raise RuntimeError(f"node process {self.pid} is {self._state.value}; run tasks only on an idle node")
        line = _task_line(task)
        self._state = NodeState.BUSY
        started = trio.current_time()
        try:
            outcome = await self._exchange(task, line)
            return attrs.evolve(outcome, seconds=trio.current_time() - started)
        finally:
            if self._state is NodeState.BUSY:
                # Left without an answer (cancelled, or an unexpected error): the
                # node may still be working on the task and must not get another.
                await self.kill()

    async def _exchange(self, task: TaskRequest, line: bytes) -> TaskOutcome:
        limit = task.timeout if task.timeout is not None else math.inf
        answer: bytes | None = None
        too_long = False
        with trio.move_on_after(limit) as timer:
            assert self._process.stdin is not None
            try:
                await self._process.stdin.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the node is gone; reading finds the end of its stdout
            try:
                answer = await self._reader.readline()
            except _LineTooLong:
                too_long = True
        if timer.cancelled_caught:
            await self.kill()
            return self._failed(
                task,
                FailureKind.TIMEOUT,
                f"{task.describe()} ran longer than its timeout of {task.timeout:g} s; "
                "the node process was killed",
            )
        if too_long:
            return await self._violation(
                task,
                f"node wrote a line longer than {self._reader.max_line} bytes while running "
                f"{task.describe()}: {_quote(self._reader.pending)}",
            )
        if answer is None:
            printed = self._reader.pending
            status = await self._exit_status_after_eof()
            suffix = f"; it last wrote {_quote(printed)}" if printed else ""
            return self._failed(
                task, FailureKind.CRASHED, f"node process {status} while running {task.describe()}{suffix}"
            )
        return await self._judge(task, answer)

    async def _judge(self, task: TaskRequest, line: bytes) -> TaskOutcome:
        """The outcome for the answer ``line``; a bad answer kills the node."""
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind not in ("result", "error"):
            return await self._violation(
                task, f"node wrote invalid output while running {task.describe()}: {_quote(line)}"
            )
        assert isinstance(message, dict)
        tid, attempt = message.get("id"), message.get("attempt")
        if not (_is_int(tid) and _is_int(attempt)) or (tid, attempt) != (task.tid, task.attempt):
            return await self._violation(
                task,
                f"node answered task {tid!r} attempt {attempt!r} while running {task.describe()} "
                f"attempt {task.attempt}: {_quote(line)}",
            )
        if kind == "result":
            outputs = message.get("outputs")
            if not isinstance(outputs, dict):
                return await self._violation(
                    task,
                    f"node answered {task.describe()} with outputs that are not a JSON object: {_quote(line)}",
                )
            self._state = NodeState.IDLE
            return TaskOutcome.success(task, outputs)
        error, trace = message.get("error"), message.get("traceback", "")
        if not isinstance(error, str) or not isinstance(trace, str):
            return await self._violation(
                task,
                f"node answered {task.describe()} with an error whose error or traceback is not a string: "
                f"{_quote(line)}",
            )
        self._state = NodeState.IDLE
        self._log.info("task_error", tid=task.tid, name=task.name, error=error)
        return TaskOutcome.failed(task, FailureKind.TASK_ERROR, error or f"{task.describe()} failed", trace)

    async def _violation(self, task: TaskRequest, error: str) -> TaskOutcome:
        await self.kill()
        return self._failed(task, FailureKind.PROTOCOL, error)

    def _failed(self, task: TaskRequest, failure: FailureKind, error: str) -> TaskOutcome:
        self._log.warning("node_task_failed", tid=task.tid, name=task.name, failure=failure.value, error=error)
        return TaskOutcome.failed(task, failure, error)

    async def kill(self) -> None:
        """Kill the node and everything in its process group, and reap it.

        Idempotent; never raises; not cancellable (it waits only for the
        kernel to finish a SIGKILL).
        """
        first = self._state is not NodeState.DEAD
        self._state = NodeState.DEAD
        with trio.CancelScope(shield=True):
            if first:
                # The node leads its own session, so its process group id is its pid.
                # The group outlives a node that crashed and leaves children behind,
                # and the kernel does not reuse a pid while a group still uses it.
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            # Also the node itself, in case it moved to another group; a no-op once reaped.
            self._process.kill()
            await self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    await stream.aclose()

    async def aclose(self) -> None:
        """Ask an idle node to exit; kill it if it has not after the exit grace period.

        A busy node is killed at once. Always ends with the process reaped.
        Idempotent; never raises.
        """
        if self._state is NodeState.IDLE and self._process.returncode is None:
            assert self._process.stdin is not None
            with trio.move_on_after(self._exit_grace):
                try:
                    await self._process.stdin.send_all(_EXIT_LINE)
                    await self._process.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await self._process.wait()
        await self.kill()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _PoolState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@attrs.define(eq=False)
class _Run:
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
    """

    _command: str = attrs.field(validator=attrs.validators.instance_of(str))
    _slots: int = attrs.field(validator=[_check_int, attrs.validators.ge(1)])
    _env: Mapping[str, str] | None = None
    _cwd: str | os.PathLike[str] | None = None
    _stderr: int | HasFileno | None = None
    _start_timeout: float = attrs.field(default=30.0, validator=_check_seconds)
    _exit_grace: float = attrs.field(default=2.0, validator=_check_seconds)
    _max_line: int = attrs.field(default=DEFAULT_MAX_LINE, validator=[_check_int, attrs.validators.ge(1)])
    _log: Any = None

    _state: _PoolState = attrs.field(init=False, default=_PoolState.NEW)
    _idle: list[NodeProcess] = attrs.field(init=False, factory=list)
    _busy: set[NodeProcess] = attrs.field(init=False, factory=set)
    # One token per slot, held by a running task or by the start of a replacement node.
    _tokens: trio.Semaphore = attrs.field(init=False)
    _running: dict[int, list[_Run]] = attrs.field(init=False, factory=dict)
    _helpers: trio.Nursery | None = attrs.field(init=False, default=None)
    # Cancelled by aclose(): ends _serve, the pool's one long-lived task.
    _serve_scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _closed: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._tokens = trio.Semaphore(self._slots)
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
        return await NodeProcess.start(
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
            return TaskOutcome.failed(task, FailureKind.CLOSED, f"{task.describe()} was not run: the node pool is closed")
        entry = _Run()
        self._running.setdefault(task.tid, []).append(entry)
        try:
            with entry.scope:
                return await self._run_on_node(task)
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
            return await node.run(task)
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
