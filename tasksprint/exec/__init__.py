"""The built-in command runner: tasks that are commands rather than node methods.

``spec`` holds the values (what to run, its limits, the record of a run) and
the parsers of kolejka's unit strings; ``cgroup`` creates the per-task group
that holds, limits, measures and kills a task's process tree (cgroup v2, v1,
or setrlimit with a /proc scan when cgroups cannot be written); ``proctree``
finds a task's processes without cgroups; ``sandbox`` wraps a command in
bubblewrap; ``files`` checks the names of a task's files; ``runner`` runs
one command with trio and returns its
:class:`~tasksprint.exec.spec.CommandRecord`.

Importing the package loads only the values: the coordinator's state
machine checks command specs and must not load trio; ``run_command`` and
``TaskEnv`` load the runner when first named.
"""

from typing import Any

from tasksprint.exec.spec import (
    CommandRecord,
    CommandSpec,
    Enforcement,
    Limits,
    OutputSummary,
    Verdict,
    parse_count,
    parse_cpus,
    parse_size,
    parse_time,
)

__all__ = [
    "CommandRecord",
    "CommandSpec",
    "Enforcement",
    "Limits",
    "OutputSummary",
    "TaskEnv",
    "Verdict",
    "parse_count",
    "parse_cpus",
    "parse_size",
    "parse_time",
    "run_command",
]


def __getattr__(name: str) -> Any:
    if name in ("TaskEnv", "run_command"):
        from tasksprint.exec import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'tasksprint.exec' has no attribute {name!r}")
