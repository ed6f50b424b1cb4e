"""One node process: start it, run tasks on it one at a time, stop it.

Theory of operation
-------------------
:class:`NodeProcess` owns one process started from the user's node command,
speaking the node stdio protocol (:mod:`tasksprint.node_protocol`) over its
stdin and stdout; its stderr is its log and passes straight through.
Anything that makes the process untrustworthy -- it exits or closes its
stdout mid-task, writes a line that is not a valid answer to the task it was
given, runs past the task's timeout, or the caller cancels the task -- ends
with the process (and its process group) killed and reaped, and the task's
:class:`~tasksprint.node_protocol.TaskOutcome` saying why. A node is never
reused after it misbehaved, so one bad task cannot corrupt the next.

Each node runs in a task group of its own (:mod:`tasksprint.exec`): a
cgroup where this process can make one, else a process tree found through
``/proc`` with this process as child subreaper.  Killing a node kills the
whole group, round after round until it is empty, so whatever the node
started dies with it -- background jobs, ``setsid`` sessions and daemons
included.

A node sees an explicit environment (:func:`node_environment`): a few
variables of the client's (:data:`NODE_ENV_NAMES`), ``TASKSPRINT_CLIENT``
and ``TASKSPRINT_NODE``, and what the caller adds; nothing else of the
client's environment, which may name its credentials.
"""

from __future__ import annotations

import enum
import functools
import math
import os
import secrets
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import structlog
import trio

from tasksprint.exec import proctree
from tasksprint.exec.cgroup import CgroupLayout, detect_cgroups
from tasksprint.exec.group import TaskGroup
from tasksprint.exec.runner import BASE_ENV_NAMES, KILL_ROUND_PAUSE_S, MAX_KILL_ROUNDS, open_task_group
from tasksprint.exec.spec import Limits
from tasksprint.node_protocol import (
    DEFAULT_MAX_LINE,
    EXIT_LINE,
    READY_LINE,
    FailureKind,
    LineBuffer,
    LineTooLong,
    NodeProtocolError,
    TaskOutcome,
    TaskRequest,
    judge_answer,
    parse_ready,
    quote,
    task_line,
)

__all__ = [
    "HasFileno",
    "NodeProcess",
    "NodeStartError",
    "NodeState",
    "node_environment",
]

_READ_CHUNK = 65536


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class NodeStartError(Exception):
    """A node process could not be started or did not announce itself as ready."""


class NodeState(enum.Enum):
    """Life cycle of a :class:`NodeProcess`."""

    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


#: Variables of the client's own environment a node sees (when set); nothing else passes:
#: those a command task gets, and what finds a node's interpreter and its libraries.
NODE_ENV_NAMES = (*BASE_ENV_NAMES, "PYTHONPATH", "VIRTUAL_ENV", "NODE_PATH")


def node_environment(
    extra: Mapping[str, str] | None = None, client_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for node processes.

    It holds the variables of :data:`NODE_ENV_NAMES` taken from
    ``client_env`` (this process's environment when None), updated with
    ``extra``, with the directory of the running Python first on ``PATH``: a
    node command such as ``python node.py`` then runs the same Python, with
    the same installed packages, as the client.  Nothing else of the
    client's environment passes.

    Returns:
        A new dict.
    """
    source = os.environ if client_env is None else client_env
    env = {name: source[name] for name in NODE_ENV_NAMES if name in source}
    env.update(extra or {})
    if sys.executable:
        bindir = os.path.dirname(os.path.abspath(sys.executable))
        path = env.get("PATH", "")
        env["PATH"] = bindir + os.pathsep + path if path else bindir
    return env


@functools.cache
def _cgroups() -> CgroupLayout | None:
    return detect_cgroups()


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            cause = signal.Signals(-code).name
        except ValueError:
            cause = f"signal {-code}"
        return f"exited with code {code} (killed by {cause})"
    return f"exited with code {code}"


@attrs.define(eq=False)
class _LineReader:
    """Reads a node's stdout into a :class:`~tasksprint.node_protocol.LineBuffer`."""

    _stream: trio.abc.ReceiveStream
    #: What has arrived, cut into lines.
    lines: LineBuffer

    async def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream.

        Raises:
            LineTooLong: more than the buffer's ``max_line`` bytes arrived without a newline.
        """
        while True:
            line = self.lines.next_line()
            if line is not None:
                return line
            try:
                chunk = await self._stream.receive_some(_READ_CHUNK)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # Closed by kill() from another task, or the pipe broke: both end the stream.
                return None
            if not chunk:
                return None
            self.lines.feed(chunk)


@attrs.define(eq=False)
class NodeProcess:
    """One running node process. Create it with :meth:`start`."""

    _command: str
    _process: trio.Process
    _reader: _LineReader
    _exit_grace: float
    _log: Any
    _group: TaskGroup
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
        use_cgroups: bool = True,
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
            use_cgroups: hold the node's processes in a cgroup when this
                process can make one; False: always find them through /proc.

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
        # The marker finds the node's orphans when no cgroup holds them.
        node_env = node_environment({**(env or {}), "TASKSPRINT_NODE": secrets.token_hex(8)})
        group = open_task_group(_cgroups() if use_cgroups else None, Limits(), (_marker(node_env),))
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=node_env,
                cwd=cwd,
                # Own session too: a terminal's signals do not reach the node.
                start_new_session=True,
                preexec_fn=group.child_setup,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            await _end_group(group)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise NodeStartError(f"cannot start node command {command!r}: {reason}: {argv[0]!r}") from exc
        except BaseException:  # cancelled (the pool closing) before the process started: no group left behind
            await _end_group(group)
            raise
        group.started(process.pid)
        base_log = log if log is not None else structlog.get_logger(__name__)
        assert process.stdout is not None and process.stdin is not None
        node = cls(
            command,
            process,
            _LineReader(process.stdout, LineBuffer(max_line)),
            exit_grace,
            base_log.bind(node_pid=process.pid),
            group,
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
        with trio.move_on_after(start_timeout) as waited:
            try:
                line = await self._reader.readline()
            except LineTooLong:
                raise NodeStartError(
                    f"{what} wrote {quote(self._reader.lines.pending)} without a newline instead of {READY_LINE}"
                ) from None
        if waited.cancelled_caught:
            printed = self._reader.lines.pending
            suffix = f"; it wrote {quote(printed)} without a newline" if printed else ""
            raise NodeStartError(f"{what} did not write {READY_LINE} within {start_timeout:g} s{suffix}")
        if line is None:
            printed = self._reader.lines.pending
            status = await self._exit_status_after_eof()
            suffix = f" after writing {quote(printed)}" if printed else ""
            raise NodeStartError(f"{what} {status} before it was ready{suffix}")
        try:
            self._sdk = parse_ready(line)
        except NodeProtocolError as exc:
            raise NodeStartError(f"{what} {exc}") from None

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
        line = task_line(task)
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
            except LineTooLong:
                too_long = True
        if timer.cancelled_caught:
            await self.kill()
            return self._failed(
                task,
                FailureKind.TIMEOUT,
                f"{task.describe()} ran longer than its timeout of {task.timeout:g} s; the node process was killed",
            )
        if too_long:
            return await self._violation(
                task,
                f"node wrote a line longer than {self._reader.lines.max_line} bytes while running "
                f"{task.describe()}: {quote(self._reader.lines.pending)}",
            )
        if answer is None:
            printed = self._reader.lines.pending
            status = await self._exit_status_after_eof()
            suffix = f"; it last wrote {quote(printed)}" if printed else ""
            return self._failed(
                task, FailureKind.CRASHED, f"node process {status} while running {task.describe()}{suffix}"
            )
        return await self._judge(task, answer)

    async def _judge(self, task: TaskRequest, line: bytes) -> TaskOutcome:
        """The outcome for the answer ``line``; a bad answer kills the node."""
        outcome = judge_answer(task, line)
        if outcome.failure is FailureKind.PROTOCOL:
            return await self._violation(task, outcome.error)
        self._state = NodeState.IDLE
        if outcome.failure is FailureKind.TASK_ERROR:
            self._log.info("task_error", tid=task.tid, name=task.name, error=outcome.error)
        return outcome

    async def _violation(self, task: TaskRequest, error: str) -> TaskOutcome:
        await self.kill()
        return self._failed(task, FailureKind.PROTOCOL, error)

    def _failed(self, task: TaskRequest, failure: FailureKind, error: str) -> TaskOutcome:
        self._log.warning("node_task_failed", tid=task.tid, name=task.name, failure=failure.value, error=error)
        return TaskOutcome.failed(task, failure, error)

    async def kill(self) -> None:
        """Kill the node and every process of its task group, and reap them.

        Idempotent; never raises; not cancellable (it waits only for the
        kernel to finish SIGKILLs).
        """
        self._state = NodeState.DEAD
        with trio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._process.kill()
            await _end_group(self._group, self._process.pid)
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
                    await self._process.stdin.send_all(EXIT_LINE)
                    await self._process.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await self._process.wait()
        await self.kill()


def _marker(env: Mapping[str, str]) -> bytes:
    return f"TASKSPRINT_NODE={env['TASKSPRINT_NODE']}".encode()


async def _end_group(group: TaskGroup, main: int | None = None) -> None:
    """Kill every process of ``group`` until none is left, then remove it (reaping adopted orphans).

    Orphans come back to this process when it is a child subreaper (it
    became one for a group without cgroups, here or in the command runner),
    whatever kind ``group`` is: those killed here are reaped here, all but
    ``main``, the node process, which its own waiter reaps.
    """
    killed: dict[int, int] = {}
    with trio.CancelScope(shield=True):
        for _ in range(MAX_KILL_ROUNDS):
            members = group.kill_round()
            if not members:
                break
            killed.update(members)
            await trio.sleep(KILL_ROUND_PAUSE_S)
        if proctree.is_subreaper():
            if main is not None:
                killed.pop(main, None)
            proctree.reap_adopted(killed)
        for _ in range(MAX_KILL_ROUNDS):
            try:
                group.remove()
                return
            except OSError:  # a cgroup whose last process just died may be busy for a moment
                group.kill_round()
                await trio.sleep(KILL_ROUND_PAUSE_S)
