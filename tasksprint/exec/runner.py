"""Run one command task with trio and return its record.

Theory of operation.  :func:`run_command` takes a validated
:class:`~tasksprint.exec.spec.CommandSpec` and:

1. builds the environment explicitly: a small base passed through from the
   client (:data:`BASE_ENV_NAMES`, nothing else of the client's), then
   ``TASKSPRINT_TASK_ID``, ``TASKSPRINT_ATTEMPT``, ``TASKSPRINT_CLIENT`` and
   ``TASKSPRINT_CPUS``, then the spec's additions;
2. opens a task group (:func:`open_task_group`: :mod:`tasksprint.exec.cgroup`
   or :mod:`tasksprint.exec.rlimit`) and forks the program
   in a new session; between fork and exec the child joins the group, sets
   its rlimits and asks to be killed if the client dies;
3. supervises: waits for the main process (through a pidfd, so the exit
   status and rusage come from ``wait4``), pumps stdout and stderr into their
   files or into a capture that keeps size, head and tail, counts output
   against the output limit, and polls the group for CPU time (and, without
   cgroups, memory) every :data:`POLL_INTERVAL_S`.  The wall-clock limit is
   a trio deadline;
4. when the main process exits or any limit fires, kills the whole group,
   round after round until it is empty — background jobs, ``setsid``
   sessions and daemons included — then reads the group's accounting and
   removes it.

The same cleanup runs when the caller cancels (trio cancellation: the
cleanup is shielded and ``Cancelled`` propagates) or sets ``cancel`` (the
run returns a record with the verdict ``cancelled``).  If the client itself
is killed, its :class:`~tasksprint.exec.guardian.Guardian` kills and removes
its task groups; without a guardian each main process gets SIGKILL from
``PR_SET_PDEATHSIG`` and the cgroups it leaves are removed by
:func:`~tasksprint.exec.cgroup.sweep_stale_groups` on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from tasksprint.exec import proctree, sandbox, spawner
from tasksprint.exec.cgroup import CgroupLayout
from tasksprint.exec.cgroup_pool import CgroupPool, new_group
from tasksprint.exec.group import GroupUsage, TaskGroup
from tasksprint.exec.guardian import Guardian
from tasksprint.exec.rlimit import RlimitGroup
from tasksprint.exec.spawner import DEFAULT_PATH
from tasksprint.exec.spec import SNIPPET_BYTES, CommandRecord, CommandSpec, Enforcement, Limits, OutputSummary, Verdict

#: Variables of the client's own environment a task sees (when set); nothing else passes.
BASE_ENV_NAMES = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR")
POLL_INTERVAL_S = 0.05
READ_CHUNK = 64 * 1024
# How long a stream may stay open after the whole group was killed (a
# process that escaped a cgroup-less scan may still hold it).
DRAIN_GRACE_S = 2.0
KILL_ROUND_PAUSE_S = 0.002
MAX_KILL_ROUNDS = 5000


@attrs.frozen(kw_only=True)
class TaskEnv:
    """Who runs: the task id and attempt, the client's name, the CPUs given (None: from the limits)."""

    task_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    attempt: int = attrs.field(validator=attrs.validators.instance_of(int))
    client: str = attrs.field(validator=attrs.validators.instance_of(str))
    cpus: float | None = None


def task_cpus(spec: CommandSpec, task_env: TaskEnv) -> float:
    """The CPUs a task is told it has: given, else its quota, else its cpuset, else this machine's."""
    if task_env.cpus is not None:
        return task_env.cpus
    if spec.limits.cpus is not None:
        return spec.limits.cpus
    if spec.limits.cpuset is not None:
        return float(len(spec.limits.cpuset))
    return float(len(os.sched_getaffinity(0)))


def build_env(spec: CommandSpec, task_env: TaskEnv, client_env: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a task (a pure function of its inputs)."""
    env = {name: client_env[name] for name in BASE_ENV_NAMES if name in client_env}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env["TASKSPRINT_TASK_ID"] = task_env.task_id
    env["TASKSPRINT_ATTEMPT"] = str(task_env.attempt)
    env["TASKSPRINT_CLIENT"] = task_env.client
    env["TASKSPRINT_CPUS"] = f"{task_cpus(spec, task_env):g}"
    env.update(spec.env)
    return env


@attrs.define(eq=False)
class _Capture:
    """One output stream: to a file descriptor or kept as size, head and tail."""

    _fd: int | None  # file to write to; None when captured
    size: int = 0
    cut: bool = False
    _head: bytearray = attrs.Factory(bytearray)
    _tail: bytearray = attrs.Factory(bytearray)

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self._fd is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            return
        if len(self._head) < SNIPPET_BYTES:
            self._head += data[: SNIPPET_BYTES - len(self._head)]
        self._tail = (self._tail + data[-SNIPPET_BYTES:])[-SNIPPET_BYTES:]

    def summary(self) -> OutputSummary:
        captured = self._fd is None
        fits = self.size <= SNIPPET_BYTES  # then the head is the whole output
        return OutputSummary(
            size_bytes=self.size,
            cut=self.cut,
            head=bytes(self._head) if captured else b"",
            tail=bytes(self._tail) if captured and not fits else b"",
        )


@attrs.define(eq=False)
class _Run:
    """The state of one supervised run."""

    _spec: CommandSpec
    _group: TaskGroup
    _pid: int
    _pidfd: int
    _watch: trio.CancelScope | None = None  # the supervision's scope, while it runs
    _output_left: float = math.inf
    first_hit: Verdict | None = None
    hits: set[Verdict] = attrs.Factory(set)
    status: int | None = None
    rusage: Any = None
    killed: dict[int, int] = attrs.Factory(dict)  # every process kill_tree killed: {pid: start time}
    # Whether /proc scans must find orphans: not when a cgroup holds the tree
    # and nothing comes back to this process (it is no subreaper).
    scans: bool = True
    dead: bool = False  # kill_tree found the group empty: nothing of the task is left

    def hit(self, verdict: Verdict) -> None:
        """A limit fired (or a cancel came): remember it and stop supervising."""
        self.hits.add(verdict)
        if self.first_hit is None:
            self.first_hit = verdict
        if self._watch is not None:
            self._watch.cancel()

    async def wait_main(self) -> None:
        if self.status is None:
            while True:
                await trio.lowlevel.wait_readable(self._pidfd)
                # The pidfd is readable once the process exited: this does not block.
                pid, status, rusage = os.wait4(self._pid, os.WNOHANG)  # noqa: ASYNC222
                if pid == self._pid:
                    self.status, self.rusage = status, rusage
                    return

    async def pump(self, fd: int, out: _Capture) -> None:
        """Read the non-blocking pipe ``fd`` to its end into ``out``.

        Plain reads after ``wait_readable``: a stream object would add two
        scheduler round trips per read, and most tasks write nothing.
        """
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                return
            if out.cut or self._output_left <= 0:
                out.cut = True
                continue  # drain, so writers see no error before they are killed
            if len(data) > self._output_left:
                data = data[: int(self._output_left)]
                out.cut = True
            self._output_left -= len(data)
            out.add(data)
            if out.cut:
                self.hit(Verdict.OUTPUT)

    async def monitor(self) -> None:
        limits = self._spec.limits
        while True:
            await trio.sleep(POLL_INTERVAL_S)
            if limits.cpu_time_s is not None:
                used = self._group.cpu_seconds()
                if used is not None and used > limits.cpu_time_s:
                    self.hit(Verdict.CPU_TIME)
            # Without cgroups this also scans the tree, so orphans are known before they exit.
            used_mem = self._group.memory_bytes() if isinstance(self._group, RlimitGroup) else None
            if limits.memory_bytes is not None and used_mem is not None and used_mem > limits.memory_bytes:
                self.hit(Verdict.MEMORY)

    def _polls(self) -> bool:
        """Whether the run needs the monitor: a CPU-time limit to poll, or a tree without a cgroup to scan."""
        return self._spec.limits.cpu_time_s is not None or isinstance(self._group, RlimitGroup)

    async def supervise(self, wall_time_s: float | None, cancel: trio.Event | None) -> None:
        with trio.move_on_after(wall_time_s if wall_time_s is not None else math.inf) as wall:
            with trio.CancelScope() as watch:
                self._watch = watch
                if self.first_hit is not None:  # the output limit fired before the gate opened
                    watch.cancel()
                try:
                    if self._polls() or cancel is not None:
                        # Tasks only where something must be polled or awaited beside the main process.
                        async with trio.open_nursery() as helpers:
                            if self._polls():
                                helpers.start_soon(self.monitor)
                            if cancel is not None:
                                helpers.start_soon(self._watch_cancel, cancel)
                            await self.wait_main()
                            helpers.cancel_scope.cancel()
                    else:
                        await self.wait_main()
                finally:
                    self._watch = None
        if wall.cancelled_caught and self.status is None:
            self.hit(Verdict.TIME)

    async def _watch_cancel(self, cancel: trio.Event) -> None:
        await cancel.wait()
        self.hit(Verdict.CANCELLED)

    async def kill_tree(self) -> None:
        """Kill every process of the group, round after round, until none is left (once is enough)."""
        if self.dead:
            return
        for _ in range(MAX_KILL_ROUNDS):
            if self.status is None:
                try:
                    os.kill(self._pid, signal.SIGKILL)  # the main process, even outside any group
                except ProcessLookupError:
                    pass
            killed = self._group.kill_round()
            if not killed:
                if not self.scans:
                    self.dead = True
                    return
                # An orphan that already left its group on its way out is
                # still to be reaped: wait until it is a zombie.
                killed = proctree.session_orphans(self._pid)
                killed.update(proctree.still_dying({p: s for p, s in self.killed.items() if p != self._pid}))
                if not killed:
                    self.dead = True
                    return
                proctree.kill_processes(killed)
            self.killed.update(killed)
            await trio.sleep(KILL_ROUND_PAUSE_S)


def _needs_scans(group: TaskGroup) -> bool:
    """Whether killing ``group`` needs /proc scans for orphans and zombies to reap.

    A cgroup's member list is authoritative: once it is empty every process
    of the task has exited.  Its orphans were re-parented to init, which
    reaps them, unless this process is a subreaper (it became one for an
    earlier run without cgroups): then they come back here and must be reaped.
    """
    return isinstance(group, RlimitGroup) or proctree.is_subreaper()


def _find_program(name: str, cwd: str, path: str) -> bool:
    """Whether ``name`` (argv[0]) names an executable file, found as exec would find it."""
    if "/" in name:
        full = os.path.join(cwd, name)
        return os.path.isfile(full) and os.access(full, os.X_OK)
    return shutil.which(name, path=path) is not None


def open_task_group(
    layout: CgroupLayout | None, limits: Limits, markers: tuple[bytes, ...], pool: CgroupPool | None = None
) -> TaskGroup:
    """A task group: in ``layout`` when given and writable, else the rlimit fallback.

    With ``pool`` (for ``layout``) the group is one it kept, when one fits.
    Raises nothing for an unwritable cgroup: the fallback is used and says
    so in its ``enforcement``.
    """
    if layout is not None:
        try:
            if pool is not None and pool.layout == layout:
                return pool.take(limits)
            return new_group(layout, limits)
        except OSError:
            pass
    return RlimitGroup.create(limits, markers)


def _open_stdin(spec: CommandSpec, cwd: str) -> int:
    if spec.stdin is None:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return os.open(os.path.join(cwd, spec.stdin), os.O_RDONLY | os.O_CLOEXEC)


def _open_output(name: str | None, cwd: str) -> int | None:
    if name is None:
        return None
    return os.open(os.path.join(cwd, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)


async def run_command(
    spec: CommandSpec,
    *,
    task_env: TaskEnv,
    cgroups: CgroupLayout | None,
    host: str | None = None,
    cancel: trio.Event | None = None,
    client_env: dict[str, str] | None = None,
    slot: contextlib.AbstractAsyncContextManager[Any] | None = None,
    guardian: Guardian | None = None,
    pool: CgroupPool | None = None,
) -> CommandRecord:
    """Run ``spec`` to the end and return its :class:`CommandRecord`; never leaves a process behind.

    ``cgroups`` is where task groups go (from
    :func:`~tasksprint.exec.cgroup.detect_cgroups`); None forces the rlimit
    fallback.  ``host`` names this machine in the record (default: the host
    name).  Setting ``cancel`` ends the run with the verdict ``cancelled``;
    cancelling the calling trio scope kills the tree and raises
    ``Cancelled``.  ``client_env`` is where the base variables come from
    (default: this process's environment).  Problems starting the program
    (missing program, bad working directory or stdin) give the verdict
    ``start_failed``; the function raises only for a bug.

    ``slot`` (an async context manager: a free slot of the caller's) is
    entered before the program starts and left once its process tree is
    dead.  Where the task gets a cgroup, the task is spawned *ahead* of it:
    the wrapper process starts, joins the group and waits at a gate until the
    slot is had, so what a start costs (a few process executions) overlaps
    the slot's previous task instead of following it.  The record's times
    count from the gate's opening.

    ``guardian`` (running for ``cgroups``) kills the task's group if this
    process dies; without one only the task's main process dies with this
    process (``PR_SET_PDEATHSIG``), and the rest waits for the next sweep.

    ``pool`` (for ``cgroups``) lends the task a group kept from an earlier
    run with the same limits, and keeps its group afterwards, emptied and
    reset, instead of removing it (see :mod:`tasksprint.exec.cgroup_pool`).
    """
    host = host if host is not None else socket.gethostname()
    cwd = spec.cwd if spec.cwd is not None else os.getcwd()
    env = build_env(spec, task_env, os.environ if client_env is None else client_env)  # no copy: 8 names are read
    markers = tuple(f"{n}={env[n]}".encode() for n in ("TASKSPRINT_TASK_ID", "TASKSPRINT_ATTEMPT", "TASKSPRINT_CLIENT"))
    started = time.time()
    t0 = time.monotonic()
    group = open_task_group(cgroups, spec.limits, markers, pool)

    def record(verdict: Verdict, **fields: Any) -> CommandRecord:
        finished = time.time()
        return CommandRecord(
            verdict=verdict,
            started=started,
            finished=finished,
            elapsed_s=time.monotonic() - t0,
            host=host,
            enforcement=group.enforcement,
            unenforced=group.unenforced,
            **fields,
        )

    fds: list[int] = []
    held = contextlib.AsyncExitStack()  # the slot, once entered
    try:
        argv = spec.program_argv
        if spec.sandbox:
            bwrap = sandbox.find_bwrap(env["PATH"])
            if bwrap is None:
                return record(Verdict.START_FAILED, detail=sandbox.missing_message())
            argv = sandbox.sandbox_argv(argv, bwrap=bwrap, cwd=os.path.abspath(cwd), network=spec.network)
        try:
            stdin = _open_stdin(spec, cwd)
            fds.append(stdin)
            files = [_open_output(spec.stdout, cwd), _open_output(spec.stderr, cwd)]
            fds.extend(fd for fd in files if fd is not None)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            fds.extend((out_r, out_w, err_r, err_w))

            def child_setup() -> None:
                proctree.die_with_parent()
                group.child_setup()

            guarded = guardian is not None and guardian.alive()
            if slot is not None:  # spawned ahead, at a gate, when a wrapper can start it
                stdin_path = os.devnull if spec.stdin is None else os.path.abspath(os.path.join(cwd, spec.stdin))
                wrapper = spawner.spawn_argv(group, spec, argv, env=env, gated_stdin=stdin_path, guarded=guarded)
            else:
                wrapper = spawner.spawn_argv(group, spec, argv, env=env, guarded=guarded)
            gated = slot is not None and wrapper is not None
            gate_r = gate_w = -1
            if gated:
                gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
                fds.extend((gate_r, gate_w))
            if wrapper is not None and not os.path.isdir(cwd):
                raise FileNotFoundError(errno.ENOENT, "no such working directory", cwd)
            # A wrapper that is the task's own program (a cmd task's bash) fails to start as the task would.
            if wrapper is not None and wrapper[0] != argv[0] and not _find_program(argv[0], cwd, env["PATH"]):
                raise FileNotFoundError(errno.ENOENT, "no such executable program", argv[0])
            if slot is not None and not gated:
                await held.enter_async_context(slot)  # no gate: the slot first, then the spawn
            spawn = functools.partial(
                subprocess.Popen,
                argv if wrapper is None else wrapper,
                stdin=gate_r if gated else stdin,
                stdout=out_w,
                stderr=err_w,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=child_setup if wrapper is None else None,
                close_fds=True,  # noqa: PLW1509
            )
            # PR_SET_PDEATHSIG fires when the forking *thread* exits: the
            # child is forked from this thread or from the spawner thread,
            # never from a worker thread (they come and go).  The child setup
            # makes only system calls (libc is loaded already).
            popen = spawn() if wrapper is None else await spawner.spawn(spawn)
        except (OSError, subprocess.SubprocessError) as exc:
            return record(Verdict.START_FAILED, detail=f"cannot start {spec.program_argv[0]!r}: {exc}")
        pid = popen.pid
        pidfd = os.pidfd_open(pid)
        fds.append(pidfd)
        group.started(pid)
        for fd in (stdin, out_w, err_w, *((gate_r,) if gated else ())):
            os.close(fd)
            fds.remove(fd)
        out, err = _Capture(files[0]), _Capture(files[1])
        run = _Run(
            spec,
            group,
            pid,
            pidfd,
            output_left=spec.limits.output_bytes if spec.limits.output_bytes is not None else math.inf,
            scans=_needs_scans(group),
        )
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(run.pump, out_r, out)
                pumps.start_soon(run.pump, err_r, err)
                if gated:
                    assert slot is not None
                    await held.enter_async_context(slot)
                    started, t0 = time.time(), time.monotonic()
                    _open_gate(gate_w)
                    fds.remove(gate_w)
                await run.supervise(spec.limits.wall_time_s, cancel)
                await run.kill_tree()
                await run.wait_main()
                await held.aclose()  # the tree is dead: the slot's next task may start
                # Every writer is dead; a stream still open after the grace
                # belongs to a process no scan could find.
                pumps.cancel_scope.deadline = trio.current_time() + DRAIN_GRACE_S
        finally:
            with trio.CancelScope(shield=True):
                await run.kill_tree()
                await run.wait_main()
                # Without cgroups this process is a subreaper: the task's orphans are its children.
                adopted = (
                    proctree.reap_adopted({p: s for p, s in run.killed.items() if p != pid}, session=pid)
                    if run.scans
                    else []
                )
                popen.returncode = run.status if run.status is not None else -1
                for fd in (pidfd, out_r, err_r):
                    trio.lowlevel.notify_closing(fd)  # closed below, with the other descriptors
        usage = group.usage()  # read once, the tree being dead
        return record(
            _verdict(run, usage),
            pid=pid,
            **_accounting(run, group, usage, adopted),
            stdout=out.summary(),
            stderr=err.summary(),
        )
    finally:
        with trio.CancelScope(shield=True):
            for fd in fds:
                os.close(fd)  # a gate never opened: the waiting wrapper (killed already) would read its end
            await held.aclose()
            if pool is None or not pool.give_back(group):
                await _remove_group(group)


def _open_gate(gate_w: int) -> None:
    """Let a task spawned ahead start, and close the gate (``gate_w``: its write end)."""
    try:
        os.write(gate_w, b"go\n")
    except OSError:
        pass  # the wrapper is gone already (it could not join its group): its exit status says so
    finally:
        os.close(gate_w)


def _verdict(run: _Run, usage: GroupUsage) -> Verdict:
    """Why the run ended; also completes ``run.hits`` with the limits the group saw fire."""
    status = run.status
    assert status is not None
    failed = not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
    limits = run._spec.limits
    if usage.oom_killed:
        run.hits.add(Verdict.MEMORY)
    if usage.pids_limit_hit:
        run.hits.add(Verdict.PIDS)
    if os.WIFSIGNALED(status) and limits.cpu_time_s is not None:
        main_cpu = run.rusage.ru_utime + run.rusage.ru_stime if run.rusage is not None else 0.0
        if os.WTERMSIG(status) == signal.SIGXCPU or (run.first_hit is None and main_cpu >= limits.cpu_time_s):
            run.hits.add(Verdict.CPU_TIME)
    if run.first_hit is not None:
        return run.first_hit
    if failed:
        for verdict in (Verdict.MEMORY, Verdict.CPU_TIME, Verdict.PIDS):
            if verdict in run.hits:
                return verdict
    if os.WIFSIGNALED(status):
        return Verdict.SIGNAL
    return Verdict.OK if not failed else Verdict.EXIT


def _accounting(run: _Run, group: TaskGroup, usage: GroupUsage, adopted: list[tuple[int, Any]]) -> dict[str, Any]:
    status = run.status
    assert status is not None
    fields: dict[str, Any] = {"limits_hit": tuple(sorted(run.hits))}
    if os.WIFSIGNALED(status):
        fields["signal"] = os.WTERMSIG(status)
    else:
        fields["exit_code"] = os.WEXITSTATUS(status)
    user = run.rusage.ru_utime if run.rusage is not None else 0.0
    system = run.rusage.ru_stime if run.rusage is not None else 0.0
    peak = run.rusage.ru_maxrss * 1024 if run.rusage is not None else 0
    if isinstance(group, RlimitGroup):
        adopted = adopted + group.reap()
    for _pid, usage_of in adopted:
        user += usage_of.ru_utime
        system += usage_of.ru_stime
        peak = max(peak, usage_of.ru_maxrss * 1024)
    fields["user_cpu_s"] = usage.user_cpu_s if usage.user_cpu_s is not None else user
    fields["system_cpu_s"] = usage.system_cpu_s if usage.system_cpu_s is not None else system
    # A cgroup's peak is the tree's charged memory; without one, the largest
    # single process (rusage) or the largest polled sum over the tree.
    if group.enforcement is Enforcement.RLIMIT or usage.peak_memory_bytes is None:
        fields["peak_memory_bytes"] = max(peak, usage.peak_memory_bytes or 0) or None
    else:
        fields["peak_memory_bytes"] = usage.peak_memory_bytes
    return fields


async def _remove_group(group: TaskGroup) -> None:
    # A cgroup whose last process just died may be busy for a moment.
    for _ in range(MAX_KILL_ROUNDS):
        try:
            group.remove()
            return
        except OSError:
            group.kill_round()
            await trio.sleep(KILL_ROUND_PAUSE_S)
    group.remove()
