"""``tasksprint execute TASK_DIR RESULT_DIR``: one kolejka task on a local cluster.

Theory of operation
-------------------
A kolejka task directory holds ``kolejka_task.json`` (``args``, ``limits``
in kolejka's units, ``stdout``, ``stderr``, ``environment``, ``image``,
``files``) and the files it names.  :func:`read_task` turns the JSON into a
:class:`~tasksprint.exec.spec.CommandSpec` (refusing anything it does not
understand, with a message saying what).  :func:`execute` copies the task
directory into a working directory, writes a one-task scheduler with the
command in it, and runs it as ``tasksprint run`` does -- three replicas and
one client, which runs command tasks only -- without retries.  The client's
runner applies the limits and records the run; the record comes back as the
task's ``task_done`` or ``task_failed`` values.  Finally ``RESULT_DIR`` gets
the task's output files and ``kolejka_result.json``: ``result`` (the exit
code), ``files``, and the verdict and usage figures of the record.

A task with an ``image`` runs under docker or podman
(:mod:`tasksprint.exec.container`): the command task is the runtime's
``run`` of the image with the working directory mounted, the limits handed
to the runtime, and the wall-clock limit kept by the runner; the container
is removed by name afterwards, whatever happened.  When no runtime is
installed and reachable the task is refused with a message naming what is
missing, unless ``ignore_image`` runs it on the host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from tasksprint.coordinator.specs import USAGE_KEYS, command_kwargs
from tasksprint.exec import files
from tasksprint.exec.container import (
    ContainerRuntime,
    ContainerUnavailable,
    container_argv,
    find_runtime,
    remove_container,
)
from tasksprint.exec.spec import CommandSpec, Limits
from tasksprint.run import LocalRun

__all__ = ["RESULT_FILE", "TASK_FILE", "KolejkaError", "KolejkaTask", "execute", "kolejka_result", "read_task"]

TASK_FILE = "kolejka_task.json"
RESULT_FILE = "kolejka_result.json"
_KNOWN = {"args", "limits", "stdout", "stderr", "files", "image", "environment", "requires", "exclusive", "collect"}

_SCHEDULER = """
from tasksprint import Coordinator


class KolejkaTask(Coordinator):
    def init(self, seed):
        self.start_task(retries=0, **COMMAND)

    def task_done(self, tid, values):
        self.finish(values={"record": values, "error": None})

    def task_failed(self, tid, error, record=None):
        self.finish(values={"record": record, "error": error})
"""


class KolejkaError(ValueError):
    """A task directory this runner cannot run; the message says why."""


@attrs.frozen
class KolejkaTask:
    """A task directory's command, and the container it runs in (None: on the host)."""

    spec: CommandSpec
    runtime: ContainerRuntime | None = None
    container: str | None = None


def read_task(
    task_dir: Path,
    work_dir: Path,
    *,
    ignore_image: bool,
    find_container_runtime: Callable[[], ContainerRuntime] = find_runtime,
) -> KolejkaTask:
    """The command of the kolejka task in ``task_dir``, to run in ``work_dir``.

    A task with an ``image`` runs in a container of the runtime
    ``find_container_runtime`` finds, or on the host with ``ignore_image``.
    Raises :class:`KolejkaError` for a missing or malformed task file, an
    unknown field, or an ``image`` no runtime can run (naming what is missing).
    """
    try:
        task = json.loads((task_dir / TASK_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise KolejkaError(f"cannot read {task_dir / TASK_FILE}: {exc}") from None
    if not isinstance(task, dict):
        raise KolejkaError(f"{TASK_FILE} must hold a JSON object")
    unknown = sorted(set(task) - _KNOWN)
    if unknown:
        raise KolejkaError(f"{TASK_FILE} has fields this runner does not know: {unknown}")
    image = task.get("image")
    runtime = None
    if image and not ignore_image:
        if not isinstance(image, str):
            raise KolejkaError(f"{TASK_FILE}: 'image' must be a string, got {type(image).__name__}")
        try:
            runtime = find_container_runtime()
        except ContainerUnavailable as exc:
            raise KolejkaError(
                f"the task asks for the image {image!r}, but no container runtime can run it: {exc}; "
                "start one, or run the task on the host with --ignore-image"
            ) from None
    args = task.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise KolejkaError(f"{TASK_FILE}: 'args' must be a non-empty list of strings, got {args!r:.100}")
    env = task.get("environment") or {}
    if not isinstance(env, dict):
        raise KolejkaError(f"{TASK_FILE}: 'environment' must be an object")
    for key in ("stdout", "stderr"):
        if task.get(key) is not None:
            try:
                files.check_file_name(task[key])
            except ValueError as exc:
                raise KolejkaError(f"{TASK_FILE}: '{key}': {exc}") from None
    try:
        limits = Limits.from_kolejka(task.get("limits") or {})
        pairs = tuple(sorted((str(k), str(v)) for k, v in env.items()))
        if runtime is None:
            spec = CommandSpec(
                argv=tuple(args),
                cwd=str(work_dir),
                env=pairs,
                stdout=task.get("stdout"),
                stderr=task.get("stderr"),
                limits=limits,
            )
            return KolejkaTask(spec)
        name = f"tasksprint-{os.getpid()}-{secrets.token_hex(6)}"
        argv = container_argv(
            runtime, image=image, args=tuple(args), workdir=str(work_dir), name=name, limits=limits, env=pairs
        )
        # The runtime limits the container; the runner keeps the wall clock and the output.
        host_limits = Limits(wall_time_s=limits.wall_time_s, output_bytes=limits.output_bytes)
        spec = CommandSpec(
            argv=argv, cwd=str(work_dir), stdout=task.get("stdout"), stderr=task.get("stderr"), limits=host_limits
        )
        return KolejkaTask(spec, runtime, name)
    except (TypeError, ValueError) as exc:
        raise KolejkaError(f"{TASK_FILE}: {exc}") from None


class _CommandOnlyRun(LocalRun):
    """A local run whose clients start without a node: they run command tasks only."""

    def client_command(self, i: int) -> list[str]:
        cmd = super().client_command(i)
        at = cmd.index("--node")
        return cmd[:at] + cmd[at + 2 :]


def kolejka_result(record: dict[str, Any] | None, error: str | None, result_files: list[str]) -> dict[str, Any]:
    """What ``kolejka_result.json`` holds for a run's ``record`` (None: it never ran), as plain data."""
    record = record or {}
    return {
        "result": record.get("exit_code"),
        "files": result_files,
        "verdict": record.get("verdict"),
        "error": error,
        "stats": {key: record.get(key) for key in (*USAGE_KEYS, "host")},
    }


def execute(
    task_dir: Path,
    result_dir: Path,
    *,
    ignore_image: bool = False,
    timeout: float | None = None,
    err: TextIO = sys.stderr,
) -> int:
    """Run the kolejka task in ``task_dir``, write its result into ``result_dir``; return an exit code.

    0 when the task ran (whatever its exit code: that is the result), 1 when
    the cluster failed, 2 when the task directory cannot be run.
    """
    with tempfile.TemporaryDirectory(prefix="tasksprint-execute-") as tmp:
        base = Path(tmp)
        work = base / "work"
        try:
            shutil.copytree(task_dir, work, ignore=shutil.ignore_patterns(TASK_FILE))
            task = read_task(task_dir, work, ignore_image=ignore_image)
            spec = task.spec
        except (KolejkaError, OSError) as exc:
            print(f"tasksprint execute: {exc}", file=err)
            return 2
        scheduler = base / "kolejka_scheduler.py"
        scheduler.write_text(f"COMMAND = {_call(spec)!r}\n{_SCHEDULER}")
        run = _CommandOnlyRun(f"{scheduler}:KolejkaTask", "", 3, 1, 1, base / "cluster", None, timeout)
        status = None
        try:
            run.start()
            status = trio.run(run.wait_status)
        except TimeoutError as exc:
            print(f"tasksprint execute: {exc}", file=err)
        finally:
            run.stop()
            if task.runtime is not None and task.container is not None:
                remove_container(task.runtime, task.container)
        if status is None or status.state != "finished" or status.result is None:
            print(f"tasksprint execute: the local cluster did not finish the task: {status}", file=err)
            return 1
        values = status.result.values
        result_dir.mkdir(parents=True, exist_ok=True)
        made = []
        for name in (spec.stdout, spec.stderr):
            if name is not None and (work / name).is_file():
                shutil.copyfile(work / name, result_dir / name)
                made.append(name)
        result = kolejka_result(values["record"], values["error"], made)
        (result_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _call(spec: CommandSpec) -> dict[str, Any]:
    """``start_task`` keyword arguments for ``spec`` (plain data for the scheduler file)."""
    plain = command_kwargs(spec)["command"]
    return {k: v for k, v in plain.items() if v not in (None, False, {}, [])}
