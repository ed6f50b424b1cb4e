"""The hook runtime: how the machine calls a user's scheduler, and what its actions reach.

Theory of operation
-------------------
The machine binds one :class:`HookRuntime` to the scheduler object (through
the SDK's public :mod:`tasksprint_sdk.runtime` protocol); the scheduler's
``start_task``, ``kill_task`` and ``finish`` land here and go on to the
machine.  They work only while a hook runs (:meth:`HookRuntime.call`), so
every replica sees the same actions at the same point of the log;
``random`` and ``now`` work at any time.

:meth:`HookRuntime.call` runs one hook: it records which hook ran last
(for a divergence report), marks the runtime active, and sends the hook's
``print()`` output to stderr, since a replica's stdout may carry
machine-readable output.  A hook that raises fails the computation: the
report names the hook, its task or client, the log slot and the line of the
user's file where it went wrong (:func:`failure_message`).

The stdout swap is the only process-wide effect of running a hook; it
reads no clock and does no other I/O.
"""

from __future__ import annotations

import enum
import os
import random
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from tasksprint_sdk.coordinator import SchedulerUsageError

from tasksprint.coordinator.state import RunState

if TYPE_CHECKING:
    from tasksprint.coordinator.machine import CoordinatorMachine

__all__ = ["Hook", "HookRuntime", "failure_message"]


class Hook(enum.Enum):
    CREATE = "__init__"
    INIT = "init"
    CLIENT_JOINED = "client_joined"
    CLIENT_DEAD = "client_dead"
    TASK_DONE = "task_done"
    TASK_FAILED = "task_failed"
    TASK_KILLED = "task_killed"
    COMMAND = "command"


@attrs.define(eq=False)
class HookRuntime:
    """Implements :class:`tasksprint_sdk.runtime.SchedulerRuntime` for one machine."""

    _machine: CoordinatorMachine
    _active: bool = False
    #: Hooks called so far through this runtime (tells one long call from two short ones).
    calls: int = 0

    @property
    def active(self) -> bool:
        """Whether a hook is running now."""
        return self._active

    def check_usable(self, what: str) -> None:
        """Raise :class:`SchedulerUsageError` if action ``what`` cannot run now."""
        if what in ("random", "now", "task_info"):
            return
        if what == "archived":
            if self._active:
                raise SchedulerUsageError(
                    "archived() reads this replica's own history, which replicas may hold differently: "
                    "call it in query() only, never in a hook that changes the state"
                )
            return
        if not self._active:
            raise SchedulerUsageError(
                f"{what}() can only be called while a hook (init, client_joined, client_dead, task_done, "
                f"task_failed) runs: the coordinator must see the same actions on every replica"
            )
        if self._machine.run_state is not RunState.RUNNING:
            raise SchedulerUsageError(f"{what}() called after finish(): the computation is already finished")

    @property
    def random(self) -> random.Random:
        rng = self._machine.state.random
        assert rng is not None, "the scheduler is bound only after init"
        return rng

    @property
    def now(self) -> float:
        return self._machine.now

    def start_task(self, **kwargs: Any) -> int:
        return self._machine.start_task(**kwargs)

    def kill_task(self, tid: int) -> list[int]:
        return self._machine.kill_task(tid)

    def finish(self, taskids: Any, values: Any) -> None:
        self._machine.end_computation(taskids, values)

    def task_info(self, tid: int) -> dict[str, Any] | None:
        return self._machine.scheduler_task_info(tid)

    def forget_task(self, tid: int) -> None:
        self._machine.forget_task(tid)

    def archive(self, key: int, record: Any) -> None:
        self._machine.archive(key, record)

    def archived(self, key: int) -> Any:
        return self._machine.archived(key)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (one hook) with actions enabled and ``print()`` going to stderr.

        Exceptions from ``fn`` propagate.
        """
        # By hand rather than two context managers: this runs once per
        # completion on every replica.
        stdout = sys.stdout
        self._active = True
        self.calls += 1
        sys.stdout = sys.stderr
        try:
            return fn()
        finally:
            self._active = False
            sys.stdout = stdout


def failure_message(
    scheduler_cls: type,
    hook: Hook,
    exc: BaseException,
    *,
    seed: int | None,
    tid: int | None,
    cid: int | None,
    slot: int,
) -> str:
    """What to tell the user when ``hook`` raised ``exc``."""
    cls = scheduler_cls.__qualname__
    match hook:
        case Hook.CREATE:
            call = f"{cls}()"
        case Hook.INIT:
            call = f"{cls}.init(seed={seed})"
        case Hook.CLIENT_JOINED | Hook.CLIENT_DEAD:
            call = f"{cls}.{hook.value}(cid={cid})"
        case Hook.TASK_DONE | Hook.TASK_FAILED | Hook.TASK_KILLED:
            call = f"{cls}.{hook.value}(tid={tid})"
        case Hook.COMMAND:
            call = f"{cls}.command(...)"
    error = f"{type(exc).__name__}: {exc}"
    return f"scheduler hook {call} raised at log slot {slot}: {error}{_user_frame(scheduler_cls, exc)}"


def _user_frame(scheduler_cls: type, exc: BaseException) -> str:
    # The innermost frame in the scheduler's own file is where the user
    # should look, even when the exception came from an action's checks.
    module = sys.modules.get(scheduler_cls.__module__)
    path = getattr(module, "__file__", None)
    if path is None:
        return ""
    path = os.path.abspath(path)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if os.path.abspath(frame.filename) == path:
            return f" ({os.path.basename(path)} line {frame.lineno}, in {frame.name})"
    return ""
