"""Checked commands are remembered by their content: the same result as checking them, never another.

A queue scheduler starts many tasks with one command, and checking a command
(``CommandSpec`` and its validators) was a large part of what a replica pays
per task.  What is remembered must be exactly what a fresh check gives, on a
replica that remembers nothing (restarted from a snapshot): otherwise the
replicas' states, and their digests, would differ.
"""

from __future__ import annotations

from typing import Any

import pytest

from tasksprint.coordinator import specs


def call(**given: Any) -> dict[str, Any]:
    return {name: given.get(name) for name in specs._COMMAND_FIELDS}


def fresh(c: dict[str, Any]) -> Any:
    given = {k: v for k, v in c.items() if v not in (None, False)}
    return specs._check_command(dict(given))


@pytest.fixture(autouse=True)
def empty_cache() -> Any:
    specs._CHECKED.clear()
    yield
    specs._CHECKED.clear()


def test_the_same_command_is_checked_once_and_gives_what_a_check_gives() -> None:
    c = call(cmd="true", env={"A": "1"}, limits={"pids": 64})
    first = specs._command_call(c)
    assert len(specs._CHECKED) == 1
    again = specs._command_call(call(cmd="true", env={"A": "1"}, limits={"pids": 64}))
    assert again is first and again == fresh(c)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Equal in Python, different commands: the order of the environment...
        (call(cmd="x", env={"A": "1", "B": "2"}), call(cmd="x", env={"B": "2", "A": "1"})),
        # ...a float where an int was given, a tuple where a list was given.
        (call(cmd="x", limits={"cpus": 1}), call(cmd="x", limits={"cpus": 1.0})),
        (call(argv=["echo", "a"]), call(argv=("echo", "a"))),
    ],
)
def test_values_that_compare_equal_but_differ_are_remembered_apart(a: dict, b: dict) -> None:
    sa, sb = specs._command_call(a), specs._command_call(b)
    assert len(specs._CHECKED) == 2
    specs._CHECKED.clear()
    assert specs._command_call(b) == sb == fresh(b) and specs._command_call(a) == sa == fresh(a)
    assert specs.command_kwargs(sa) == specs.command_kwargs(fresh(a))
    assert specs.command_kwargs(sb) == specs.command_kwargs(fresh(b))


def test_a_command_that_fails_its_check_fails_every_time_and_is_not_remembered() -> None:
    bad = call(cmd="x", limits={"pids": -1})
    for _ in range(2):
        with pytest.raises(ValueError, match="pids"):
            specs._command_call(bad)
    assert not specs._CHECKED


def test_the_memory_is_bounded() -> None:
    for i in range(specs.CHECKED_KEPT + 10):
        specs._command_call(call(cmd=f"echo {i}"))
    assert len(specs._CHECKED) == specs.CHECKED_KEPT
