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

A task with an ``image`` needs a container runtime, which this runner does
not drive: it is refused, unless ``ignore_image`` runs it on the host.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import trio

from tasksprint.coordinator.specs import command_kwargs
from tasksprint.exec import files
from tasksprint.exec.spec import CommandSpec, Limits
from tasksprint.run import LocalRun

__all__ = ["KolejkaError", "execute", "read_task"]

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


def read_task(task_dir: Path, work_dir: Path, *, ignore_image: bool) -> CommandSpec:
    """The command of the kolejka task in ``task_dir``, to run in ``work_dir``.

    Raises :class:`KolejkaError` for a missing or malformed task file, an
    unknown field, or an ``image`` without ``ignore_image``.
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
    if task.get("image") and not ignore_image:
        raise KolejkaError(
            f"the task asks for the image {task['image']!r}, but this runner drives no container runtime "
            "(docker or podman); run it on the host with --ignore-image"
        )
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
        return CommandSpec(
            argv=tuple(args),
            cwd=str(work_dir),
            env=tuple(sorted((str(k), str(v)) for k, v in env.items())),
            stdout=task.get("stdout"),
            stderr=task.get("stderr"),
            limits=limits,
        )
    except (TypeError, ValueError) as exc:
        raise KolejkaError(f"{TASK_FILE}: {exc}") from None


class _CommandOnlyRun(LocalRun):
    """A local run whose clients start without a node: they run command tasks only."""

    def client_command(self, i: int) -> list[str]:
        cmd = super().client_command(i)
        at = cmd.index("--node")
        return cmd[:at] + cmd[at + 2 :]


def _result(record: dict[str, Any] | None, error: str | None, result_files: list[str]) -> dict[str, Any]:
    record = record or {}
    return {
        "result": record.get("exit_code"),
        "files": result_files,
        "verdict": record.get("verdict"),
        "error": error,
        "stats": {
            key: record.get(key)
            for key in (
                "signal",
                "elapsed_s",
                "user_cpu_s",
                "system_cpu_s",
                "peak_memory_bytes",
                "limits_hit",
                "enforcement",
                "host",
            )
        },
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
            spec = read_task(task_dir, work, ignore_image=ignore_image)
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
        result = _result(values["record"], values["error"], made)
        (result_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _call(spec: CommandSpec) -> dict[str, Any]:
    """``start_task`` keyword arguments for ``spec`` (plain data for the scheduler file)."""
    plain = command_kwargs(spec)["command"]
    return {k: v for k, v in plain.items() if v not in (None, False, {}, [])}
