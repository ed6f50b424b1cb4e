"""Running command tasks in a worker client: an assignment in, a log command out.

A command task is an :class:`~tasksprint.coordinator.replies.Assignment`
of the reserved method :data:`~tasksprint.coordinator.specs.COMMAND_TASK`
whose kwargs carry its command.  :class:`CommandTasks` parses the command
(a malformed one fails the task), runs it with
:func:`tasksprint.exec.runner.run_command` under the limits it asks for
(in a cgroup where this client can make one, else with rlimits) and turns
the record into the task's outputs or its failure.  Cancelling the caller
kills the command's whole process tree.

A task with input files (its own, or its pretasks' result files among its
inputs) or result patterns runs in a fresh working directory under
``work_root`` (:mod:`tasksprint.exec.workdir`): the files are staged before
the run, the results collected after the run into the output ``files`` (names to
base64 text), which dependents on any client fetch like any output; the
directory is removed afterwards.  A failed run's result files are collected
too (a log it wrote tells why it failed): the client keeps them in its
object store, where ``tasksprint result get`` fetches them, and the failure
it reports names them (``result_files``) without carrying them.

A client with GPUs hands each running command a free one of its own
(``CUDA_VISIBLE_DEVICES``), while one is free; a command started when all
are taken sees none.  (Such a client takes the slot before it runs a
command: a command spawned ahead would hold a GPU while it waits.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import trio

from tasksprint.coordinator.replies import Assignment
from tasksprint.coordinator.specs import command_from_kwargs, record_outputs
from tasksprint.exec.cgroup import CgroupLayout, detect_cgroups, sweep_stale_groups
from tasksprint.exec.cgroup_pool import CgroupPool
from tasksprint.exec.guardian import Guardian
from tasksprint.exec.runner import BASE_ENV_NAMES, TaskEnv, run_command
from tasksprint.exec.spec import CommandRecord, CommandSpec, Verdict
from tasksprint.exec.workdir import FILES_KEY, FilesError, collect, encode_files, input_files, stage
from tasksprint.observe import NULL, Observer

__all__ = ["CommandOutcome", "CommandTasks", "failure_text", "node_name"]


@attrs.frozen(kw_only=True)
class CommandOutcome:
    """How a command task went: ``outputs`` (its record as plain data) and ``error`` (None: it succeeded)."""

    outputs: dict
    error: str | None
    seconds: float


def failure_text(record: CommandRecord) -> str:
    """One line saying why a run failed, naming its verdict."""
    parts = [f"command failed: verdict {record.verdict.value}"]
    if record.exit_code is not None:
        parts.append(f"exit code {record.exit_code}")
    if record.signal is not None:
        parts.append(f"signal {record.signal}")
    if record.limits_hit:
        parts.append("limits hit " + ", ".join(v.value for v in record.limits_hit))
    parts.append(f"after {record.elapsed_s:.3f}s on {record.host}")
    if record.detail:
        parts.append(record.detail)
    return "; ".join(parts)


def node_name() -> str:
    """The machine a record names: Slurm's name for it in a job step (``SLURMD_NODENAME``), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


@attrs.define(eq=False)
class CommandTasks:
    """The command runner of one client named ``client``."""

    client: str
    host: str = attrs.Factory(lambda: node_name())
    #: Where tasks with files get their working directories (None: the system's temporary directory).
    work_root: Path | None = None
    gpus: list[str] = attrs.Factory(list)  # free GPUs (CUDA device indices)
    observer: Observer = attrs.field(default=NULL, kw_only=True)
    _cgroups: CgroupLayout | None = None
    _guardian: Guardian | None = None  # kills the task groups if this process dies
    _pool: CgroupPool | None = None  # task groups kept from run to run
    # The variables of this process's environment a task may see, read once.
    _client_env: dict[str, str] = attrs.Factory(lambda: {n: os.environ[n] for n in BASE_ENV_NAMES if n in os.environ})
    # Commands spawned ahead of a slot or waiting to be (see run_in_slot); made with the first.
    _ahead: trio.CapacityLimiter | None = None
    _has_gpus: bool = False

    def __attrs_post_init__(self) -> None:
        self._has_gpus = bool(self.gpus)

    def ahead(self) -> int:
        """How many commands are spawned ahead of a slot, or wait to be."""
        if self._ahead is None:
            return 0
        stats = self._ahead.statistics()
        return stats.borrowed_tokens + stats.tasks_waiting

    async def run_in_slot(self, task: Assignment, inputs: Sequence[Any], slots: trio.CapacityLimiter) -> CommandOutcome:
        """Run ``task`` (as :meth:`run`) in one of ``slots``, spawned ahead of it when it must wait.

        At most one command per slot is spawned ahead: it has its files
        staged and its process started and waiting at a gate, so the slot's
        next task starts the moment the last one's process tree is dead.
        A client with GPUs takes the slot first: a command takes its GPU
        when it is spawned.
        """
        if self._has_gpus:
            async with slots:
                return await self.run(task, inputs)
        if self._ahead is None:
            self._ahead = trio.CapacityLimiter(slots.total_tokens)
        ahead, token = self._ahead, object()
        await ahead.acquire_on_behalf_of(token)
        waiting = True

        def done_waiting() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                ahead.release_on_behalf_of(token)

        @contextlib.asynccontextmanager
        async def slot() -> AsyncIterator[None]:
            async with slots:
                done_waiting()
                yield

        try:
            return await self.run(task, inputs, slot=slot())
        finally:
            done_waiting()

    def start(self) -> None:
        """Find where task groups go, remove those a dead client left behind, start the guardian.

        Call :meth:`close` when done.  Without a guardian (it could not be
        started) tasks still die with the client, but not their whole trees.
        """
        self._cgroups = detect_cgroups()
        if self._cgroups is not None:
            sweep_stale_groups(self._cgroups)
            self._pool = CgroupPool(self._cgroups)
            guardian = Guardian(self._cgroups)
            try:
                guardian.start()
                self._guardian = guardian
            except OSError:
                pass

    def close(self) -> None:
        """Remove the kept task groups and stop the guardian (once no task runs: it removes what is left)."""
        if self._pool is not None:
            self._pool.close()
        if self._guardian is not None:
            self._guardian.close()
            self._guardian = None

    async def run(
        self, task: Assignment, inputs: Sequence[Any] = (), *, slot: AbstractAsyncContextManager[Any] | None = None
    ) -> CommandOutcome:
        """Run ``task``'s command to its end (cancelling kills its process tree).

        ``inputs`` are the task's inputs (its pretasks' outputs, as its
        prekeys select them): their result files are staged into the task's
        working directory.  ``slot`` (None: the caller holds one already) is
        entered just before the command starts: its files are staged and its
        process spawned ahead (see :func:`~tasksprint.exec.runner.run_command`).
        """
        try:
            spec = command_from_kwargs(task.kwargs)
            staged = [*input_files(inputs, [i.key for i in task.inputs]), *spec.files]
        except (ValueError, FilesError) as exc:
            return CommandOutcome(outputs={}, error=str(exc), seconds=0.0)
        if task.timeout is not None and spec.limits.wall_time_s is None:
            # start_task(timeout=...) bounds each attempt, as for a node task.
            limits = attrs.evolve(spec.limits, wall_time_s=float(task.timeout))  # type: ignore[misc]
            spec = attrs.evolve(spec, limits=limits)  # type: ignore[misc]
        if not (staged or spec.results):
            return await self._run(task, spec, None, slot)
        if spec.cwd is not None:
            return CommandOutcome(
                outputs={},
                error=f"task {task.tid} receives input files from its pretasks but names a cwd; leave cwd unset",
                seconds=0.0,
            )
        workdir = Path(tempfile.mkdtemp(prefix=f"task-{task.tid}-", dir=self.work_root))
        try:
            try:
                stage(workdir, staged)
            except FilesError as exc:
                return CommandOutcome(outputs={}, error=str(exc), seconds=0.0)
            # Staged: the spec keeps only what to collect.
            run_spec = attrs.evolve(spec, cwd=str(workdir), files=(), results=())  # type: ignore[misc]
            return await self._run(task, run_spec, (workdir, spec.results), slot)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _run(
        self,
        task: Assignment,
        spec: CommandSpec,
        results: tuple[Path, tuple[str, ...]] | None,
        slot: AbstractAsyncContextManager[Any] | None,
    ) -> CommandOutcome:
        gpu = self.gpus.pop(0) if self.gpus else None
        if gpu is not None:
            env = tuple(kv for kv in spec.env if kv[0] != "CUDA_VISIBLE_DEVICES") + (("CUDA_VISIBLE_DEVICES", gpu),)
            spec = attrs.evolve(spec, env=env)  # type: ignore[misc]
        try:
            record = await run_command(
                spec,
                task_env=TaskEnv(task_id=str(task.tid), attempt=task.attempt, client=self.client),
                cgroups=self._cgroups,
                guardian=self._guardian,
                pool=self._pool,
                host=self.host,
                client_env=self._client_env,
                slot=slot,
            )
        finally:
            if gpu is not None:
                self.gpus.append(gpu)
        for verdict in record.limits_hit:
            self.observer.count(f"limit.{verdict.value}")
        outputs = record_outputs(record)
        error = None if record.verdict is Verdict.OK else failure_text(record)
        if results is not None and results[1]:
            # Collected whatever the verdict: a failed run's log is often what tells why it failed.
            try:
                outputs[FILES_KEY] = encode_files(collect(*results))
            except FilesError as exc:
                error = f"task {task.tid}: {exc}" if error is None else f"{error}; result files not kept: {exc}"
        return CommandOutcome(outputs=outputs, error=error, seconds=record.elapsed_s)
