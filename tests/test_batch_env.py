"""The DISBATCH_* variables of a task, and the names they are built from."""

from __future__ import annotations

import datetime

import pytest

from tasksprint.batch.env import (
    cores_per_task,
    job_id,
    run_name,
    slots_per_engine,
    task_environment,
    taskfile_name,
)
from tasksprint.batch.taskfile import EngineEvent, PerEngine, Task


def test_a_task_gets_disbatch_variables_with_six_digit_zero_padding() -> None:
    task = Task(task_id=12, line=315, repeat_index=-1, command=b"x")
    env = task_environment(
        task,
        job_id="Tasks_disBatch_261207133410_994",
        taskfile_name="Tasks",
        engine_rank=3,
        slot_rank=1,
        cores_per_task=4,
    )
    assert env == {
        "DISBATCH_JOBID": "Tasks_disBatch_261207133410_994",
        "DISBATCH_NAMETASKS": "Tasks",
        "DISBATCH_CORES_PER_TASK": "4",
        "DISBATCH_CYLINDER_RANK": "1",
        "DISBATCH_ENGINE_RANK": "3",
        "DISBATCH_STREAM_INDEX": "315",
        "DISBATCH_REPEAT_INDEX": "-1",
        "DISBATCH_TASKID": "12",
        "DISBATCH_STREAM_INDEX_ZP": "000315",
        "DISBATCH_REPEAT_INDEX_ZP": "-00001",
        "DISBATCH_TASKID_ZP": "000012",
    }


def test_padding_never_truncates() -> None:
    task = Task(task_id=12_345_678, line=1, repeat_index=7, command=b"x")
    env = task_environment(task, job_id="j", taskfile_name="T", engine_rank=0, slot_rank=0, cores_per_task=1)
    assert (env["DISBATCH_TASKID_ZP"], env["DISBATCH_REPEAT_INDEX_ZP"]) == ("12345678", "000007")


def test_a_perengine_command_gets_its_index_and_runs_outside_the_slots() -> None:
    pe = PerEngine(event=EngineEvent.START, index=2, line=4, command=b"setup")
    env = task_environment(pe, job_id="j", taskfile_name="T", engine_rank=1, slot_rank=-1, cores_per_task=2)
    assert (env["DISBATCH_TASKID"], env["DISBATCH_STREAM_INDEX"], env["DISBATCH_REPEAT_INDEX"]) == ("2", "4", "-1")
    assert env["DISBATCH_CYLINDER_RANK"] == "-1"
    with pytest.raises(ValueError):
        task_environment(pe, job_id="j", taskfile_name="T", engine_rank=1, slot_rank=0, cores_per_task=2)


@pytest.mark.parametrize(
    ("cores", "cpus", "per_node", "slots", "per_task"),
    [
        (8, 1.0, None, 8, 1),
        (8, 4.0, None, 2, 4),
        (3, 2.0, None, 1, 3),
        (2, 0.5, None, 4, 0),
        (16, 1.0, 3, 3, 5),
        (1, 2.0, None, 0, 1),
    ],
)
def test_slots_and_cores_per_task_follow_cpus_per_task_and_tasks_per_node(
    cores: int, cpus: float, per_node: int | None, slots: int, per_task: int
) -> None:
    assert slots_per_engine(cores, cpus_per_task=cpus, tasks_per_node=per_node) == slots
    assert cores_per_task(cores, slots) == per_task


def test_names() -> None:
    assert taskfile_name("/some/dir/Tasks") == "Tasks"
    assert taskfile_name("-") == "stdin"
    assert taskfile_name(None) == "STREAM"
    started = datetime.datetime(2026, 12, 7, 13, 34, 10)
    assert run_name("Tasks", started=started, nonce=7) == "Tasks_disBatch_261207133410_007"
    assert run_name("Tasks", started=started, nonce=994, word="tasksprint") == "Tasks_tasksprint_261207133410_994"
    with pytest.raises(ValueError):
        run_name("Tasks", started=started, nonce=1000)
    assert job_id("/runs/Tasks_disBatch_261207133410_994") == "Tasks_disBatch_261207133410_994"
    assert job_id("myprefix") == "myprefix"
