"""The ``DISBATCH_*`` environment variables a task sees, named and formatted as disBatch does.

disBatch sets, for every task and PERENGINE command:

* ``DISBATCH_JOBID``: the run's name, the last path component of its file
  prefix (by default ``<taskfile>_disBatch_<yymmddHHMMSS>_<nnn>``);
* ``DISBATCH_NAMETASKS``: the task file's base name;
* ``DISBATCH_TASKID``, ``DISBATCH_STREAM_INDEX`` (the 1-based line),
  ``DISBATCH_REPEAT_INDEX`` (-1 outside a REPEAT), and the same three with
  ``_ZP`` appended, zero-padded to six characters with Python's ``06d``
  (so -1 is ``-00001``, and 1234567 stays ``1234567``);
* ``DISBATCH_ENGINE_RANK`` (the engine, 0-based) and
  ``DISBATCH_CYLINDER_RANK`` (the engine's slot running it, -1 for
  PERENGINE commands);
* ``DISBATCH_CORES_PER_TASK``: the engine's cores divided (integer
  division) by its slots (under Slurm with ``-c``, disBatch gives the
  integer part of ``-c`` instead; the caller passes that).

A PERENGINE command gets its START/STOP index as ``DISBATCH_TASKID``.
"""

from __future__ import annotations

import datetime
import os

from tasksprint.batch.taskfile import PerEngine, Task

__all__ = ["cores_per_task", "job_id", "run_name", "slots_per_engine", "task_environment", "taskfile_name"]


def task_environment(
    task: Task | PerEngine,
    *,
    job_id: str,
    taskfile_name: str,
    engine_rank: int,
    slot_rank: int,
    cores_per_task: int,
) -> dict[str, str]:
    """The ``DISBATCH_*`` variables for running ``task`` (to add to the inherited environment).

    ``slot_rank`` is the engine's slot running a task, and must be -1 for a
    PERENGINE command (which runs outside the slots).
    """
    if isinstance(task, PerEngine):
        if slot_rank != -1:
            raise ValueError(f"a PERENGINE command runs outside the slots: slot_rank is -1, not {slot_rank}")
        task_id, repeat_index = task.index, -1
    else:
        task_id, repeat_index = task.task_id, task.repeat_index
    return {
        "DISBATCH_JOBID": job_id,
        "DISBATCH_NAMETASKS": taskfile_name,
        "DISBATCH_CORES_PER_TASK": str(cores_per_task),
        "DISBATCH_CYLINDER_RANK": str(slot_rank),
        "DISBATCH_ENGINE_RANK": str(engine_rank),
        "DISBATCH_STREAM_INDEX": str(task.line),
        "DISBATCH_REPEAT_INDEX": str(repeat_index),
        "DISBATCH_TASKID": str(task_id),
        "DISBATCH_STREAM_INDEX_ZP": f"{task.line:06d}",
        "DISBATCH_REPEAT_INDEX_ZP": f"{repeat_index:06d}",
        "DISBATCH_TASKID_ZP": f"{task_id:06d}",
    }


def slots_per_engine(cores: int, *, cpus_per_task: float = 1.0, tasks_per_node: int | None = None) -> int:
    """How many tasks an engine with ``cores`` runs at once (disBatch's ``-c`` and ``-t``).

    ``tasks_per_node`` wins when given; otherwise ``cores // cpus_per_task``
    (``cpus_per_task`` may be fractional, so 0.5 gives two tasks per core).
    """
    if tasks_per_node:
        return tasks_per_node
    if cpus_per_task <= 0:
        raise ValueError(f"cpus_per_task must be positive, not {cpus_per_task}")
    return int(cores // cpus_per_task)


def cores_per_task(cores: int, slots: int) -> int:
    """``DISBATCH_CORES_PER_TASK`` for an engine with ``cores`` and ``slots``: cores // slots (all if no slots)."""
    return cores // slots if slots else cores


def taskfile_name(path: str | None) -> str:
    """``DISBATCH_NAMETASKS`` for a task file at ``path``: its base name.

    ``"-"`` (standard input) is ``stdin``, and ``None`` (tasks submitted by
    a program rather than read from a file) is ``STREAM``, as in disBatch.
    """
    if path is None:
        return "STREAM"
    if path == "-":
        return "stdin"
    return os.path.basename(path).strip("<>")


def run_name(taskfile_name: str, *, started: datetime.datetime, nonce: int, word: str = "disBatch") -> str:
    """The default name of a run's files: ``<taskfile>_<word>_<yymmddHHMMSS>_<nnn>``.

    ``started`` is when the run started (local time, as disBatch uses) and
    ``nonce`` a number drawn from 0 to 999; both are the caller's, so this
    stays a pure function.  ``Tasks*_status.txt`` finds the status file.
    """
    if not 0 <= nonce < 1000:
        raise ValueError(f"nonce must be in 0..999, not {nonce}")
    return f"{taskfile_name}_{word}_{started:%y%m%d%H%M%S}_{nonce:03d}"


def job_id(prefix: str) -> str:
    """``DISBATCH_JOBID`` for a run whose files start with ``prefix``: its last path component."""
    return os.path.basename(prefix)
