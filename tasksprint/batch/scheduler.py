"""The batch scheduler: a disBatch task file run as a TaskSprint computation.

Theory of operation
-------------------
``tasksprint batch`` writes, in the run's directory, a scheduler file that
subclasses :class:`BatchScheduler` and holds the run's whole configuration
(:attr:`BatchScheduler.CONFIG`): the task file's bytes, the options, the
engines (worker clients) and the status lines an earlier run lets this one
skip.  Every replica loads that file, and the log's first entry carries the
digest of its bytes, so every replica runs the same task file and a replica
started with another refuses to apply.  Everything the run decides — which
task starts when, what a barrier waited for, what failed — is a deterministic
function of the log; so is the list of status lines, which the scheduler
keeps in the order tasks finished.  A driver (``tasksprint batch``) reads them
with the read-only ``scheduler`` query (:meth:`BatchScheduler.query`) and
appends them to the status file; a driver that died is replaced by one that
reads them again from the first.

Dispatch follows disBatch:

* tasks start in task-id order, at most :data:`CONFIG` ``window`` at a time
  (all the engines' slots under ``--fail-fast``, so that a failure stops the
  run before a later task starts; more otherwise, so every client has work
  queued);
* a barrier waits until every earlier task finished; it then gets its status
  line (``B``, or ``C`` for ``BARRIER CHECK``, with the driver's node and pid,
  start when reached, finish when met) and, for a ``CHECK``, ends the run if a
  task since the previous barrier failed;
* ``--fail-fast``: the first failure kills every running task and ends the run;
* a task an earlier status file marks as done (``-r``) is not run: its line,
  flagged ``S``, is the earlier one;
* ``PERENGINE START`` commands are started once per engine at the start,
  each pinned to its engine by the engine's tag, so each runs when its engine
  joins; ``STOP`` commands once per engine when the task file is done
  (those of engines declared dead are given up).

Each task is a command task: ``bash -c`` with a one-line prelude that sources
the driver's environment file (so tasks see the environment ``tasksprint
batch`` was started with, as in disBatch) and sets ``DISBATCH_ENGINE_RANK``
from the client's name, then the command as the task file wrote it.
Non-zero exit codes are results, not errors: a task is never retried for one.
"""

from __future__ import annotations

import base64
import shlex
from typing import Any

from tasksprint_sdk.coordinator import Coordinator

from tasksprint.batch.env import task_environment
from tasksprint.batch.statusfile import (
    Outcome,
    StatusRecord,
    barrier_record,
    format_status_line,
    parse_status_line,
    snippet,
)
from tasksprint.batch.taskfile import (
    Barrier,
    EngineEvent,
    Notice,
    PerEngine,
    Repeat,
    Task,
    TaskFile,
    parse_taskfile,
)

__all__ = ["ENGINE_TAG_PREFIX", "BatchScheduler", "engine_name", "status_outcome"]

#: Engines (worker clients) are named, and tagged, ``engine<rank>``.
ENGINE_TAG_PREFIX = "engine"

# Where a command that is not UTF-8 travels (base64) to the shell that runs it.
_COMMAND_B64 = "DISBATCH_TASKSPRINT_COMMAND_B64"

# The most status lines one ``scheduler`` query answers.
_MAX_LINES_PER_ANSWER = 4096


def engine_name(rank: int) -> str:
    """The name and tag of engine ``rank``."""
    return f"{ENGINE_TAG_PREFIX}{rank}"


def _end_snippet(summary: Any) -> tuple[int, str]:
    """(bytes, snippet) of a run's captured stream, from its head and tail (see OutputSummary)."""
    if not isinstance(summary, dict):
        return 0, ""
    size = int(summary.get("size_bytes", 0))
    head = summary.get("head", b"")
    tail = summary.get("tail", b"")
    if isinstance(head, str):
        head = head.encode("utf-8", "replace")
    if isinstance(tail, str):
        tail = tail.encode("utf-8", "replace")
    if size <= len(head):
        return size, snippet(head)
    # More than the head holds: the first 40 bytes, '...', the last 40 (as snippet() writes it).
    return size, (head[:40] + b"..." + tail[-40:]).decode("utf-8", "replace")


def status_outcome(record: dict[str, Any] | None, error: str = "") -> Outcome:
    """The status-file outcome of a command task's record (plain data, as task_done gets it)."""
    if record is None:
        return Outcome(node="", pid=0, exit_code=-1, start=0.0, finish=0.0, err_bytes=len(error), err_snippet=error)
    code = record.get("exit_code")
    signal = record.get("signal")
    if code is None:
        code = -int(signal) if signal is not None else -1
    out_bytes, out_snippet = _end_snippet(record.get("stdout"))
    err_bytes, err_snippet = _end_snippet(record.get("stderr"))
    return Outcome(
        node=str(record.get("host", "")),
        pid=int(record.get("pid") or 0),
        exit_code=int(code),
        start=float(record.get("started", 0.0)),
        finish=float(record.get("finished", 0.0)),
        out_bytes=out_bytes,
        out_snippet=out_snippet,
        err_bytes=err_bytes,
        err_snippet=err_snippet,
    )


class BatchScheduler(Coordinator):
    """Runs the task file in :attr:`CONFIG`; see the module docstring.

    ``CONFIG`` keys: ``taskfile`` (bytes), ``name`` (the task file's name),
    ``job_id``, ``cwd``, ``env_file`` (sourced by every task), ``engines``
    (list of ranks), ``window`` (tasks started at once), ``fail_fast``,
    ``skip`` (task id -> earlier status line), ``driver_node``,
    ``driver_pid``, ``cores_per_task``.
    """

    CONFIG: dict[str, Any] = {}
    # The parsed task file and the tasks in flight are kept in the state.
    SNAPSHOT_CLASSES = (TaskFile, Task, Repeat, Barrier, PerEngine, Notice, EngineEvent)

    def init(self, seed: int) -> None:
        c = self.CONFIG
        self.taskfile: TaskFile = parse_taskfile(c["taskfile"], name=c["name"])
        self.lines: list[str] = []
        self.next_id = 0
        self.running: dict[int, Task] = {}  # TaskSprint task id -> batch task
        self.engine_tasks: dict[int, PerEngine] = {}
        self.stopping = False
        self.failed_since_barrier = False
        self.failed = 0
        self.dead_engines = 0
        self.barrier_reached: float | None = None
        self.reason: str | None = None  # why the run ended early
        self.ended = False
        self.skip: dict[int, str] = {int(k): v for k, v in c.get("skip", {}).items()}
        for rank in c["engines"]:
            for command in self.taskfile.engine_start:
                self._start_engine_command(command, rank)
        self._advance()

    # ------------------------------------------------------------ the hooks

    def client_dead(self, cid: int) -> None:
        self.dead_engines += 1
        self._maybe_end()

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        self._finished(tid, values, "")

    def task_failed(self, tid: int, error: str, record: dict[str, Any] | None = None) -> None:
        self._finished(tid, record, error)

    def query(self, args: Any) -> Any:
        """Status lines ``after``.. (at most a few thousand), how many there are, and whether the run ended."""
        after = args.get("after", 0) if isinstance(args, dict) else None
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ValueError(f"'after' must be a whole number >= 0, got {after!r:.80}")
        if not hasattr(self, "lines"):
            return {"lines": [], "total": 0, "ended": False, "reason": None, "failed": 0, "tasks": 0}
        return {
            "lines": self.lines[after : after + _MAX_LINES_PER_ANSWER],
            "total": len(self.lines),
            "ended": self.ended,
            "reason": self.reason,
            "failed": self.failed,
            "tasks": self.taskfile.id_count,
        }

    # ------------------------------------------------------------ dispatch

    def _finished(self, tid: int, record: dict[str, Any] | None, error: str) -> None:
        if tid in self.engine_tasks:
            command = self.engine_tasks.pop(tid)
            self.lines.append(format_status_line(status_outcome(record, error).record(command)))
            self._maybe_end()
            return
        task = self.running.pop(tid, None)
        if task is None:
            return
        outcome = status_outcome(record, error)
        self.lines.append(format_status_line(outcome.record(task)))
        if outcome.exit_code != 0:
            self._note_failure()
            if self.CONFIG.get("fail_fast") and self.reason is None:
                self.reason = f"task {task.task_id} (line {task.line}) failed with exit code {outcome.exit_code}"
                self._stop_early()
        self._advance()

    def _note_failure(self) -> None:
        self.failed += 1
        self.failed_since_barrier = True

    def _stop_early(self) -> None:
        for tid in list(self.running):
            self.kill_task(tid)
        self.running.clear()
        self.next_id = self.taskfile.id_count

    def _advance(self) -> None:
        window = int(self.CONFIG.get("window", 1))
        tf = self.taskfile
        while not self.stopping and self.next_id < tf.id_count and len(self.running) < window:
            entry = tf.record(self.next_id)
            if isinstance(entry, Barrier):
                if not self._barrier(entry):
                    return
                continue
            self.next_id += 1
            earlier = self.skip.get(entry.task_id)
            if earlier is not None:
                record = parse_status_line(earlier)
                assert record is not None
                self.lines.append(earlier)
                if record.exit_code != 0:
                    self._note_failure()
                continue
            self._start(entry)
        if self.next_id >= tf.id_count and not self.running and not self.stopping:
            self._begin_stop()

    def _barrier(self, barrier: Barrier) -> bool:
        """Pass ``barrier`` if every earlier task finished (True), else note when it was reached."""
        if self.barrier_reached is None and self.now > 0:
            # (Before the first TICK the coordinator has no time yet: then the barrier's start is when it is met.)
            self.barrier_reached = self.now
        if self.running:
            return False
        c = self.CONFIG
        record: StatusRecord = barrier_record(
            barrier,
            node=c["driver_node"],
            pid=c["driver_pid"],
            start=self.now if self.barrier_reached is None else self.barrier_reached,
            finish=self.now,
        )
        self.lines.append(format_status_line(record))
        self.barrier_reached = None
        self.next_id += 1
        if barrier.check and self.failed_since_barrier and self.reason is None:
            self.reason = f"BARRIER CHECK on line {barrier.line}: a task since the previous barrier failed"
            self._stop_early()
        self.failed_since_barrier = False
        return True

    def _command_call(self, command: bytes, env: dict[str, str], rank: int | None) -> dict[str, Any]:
        c = self.CONFIG
        prelude = f". {shlex.quote(c['env_file'])}; " if c.get("env_file") else ""
        if rank is None:
            prelude += f'export DISBATCH_ENGINE_RANK="${{TASKSPRINT_CLIENT#{ENGINE_TAG_PREFIX}}}"'
        else:
            prelude += f"export DISBATCH_ENGINE_RANK={rank}"
        try:
            text = command.decode("utf-8")
        except UnicodeDecodeError:
            # The log carries text: bytes that are not UTF-8 travel base64-encoded and bash runs them as they are.
            env = {**env, _COMMAND_B64: base64.b64encode(command).decode("ascii")}
            text = f'eval "$(printf %s "${_COMMAND_B64}" | base64 -d)"'
        return {
            "cmd": prelude + "\n" + text,
            "env": env,
            "cwd": c.get("cwd"),
            "retries": 0,
        }

    def _env(self, task: Task | PerEngine) -> dict[str, str]:
        c = self.CONFIG
        env = task_environment(
            task,
            job_id=c["job_id"],
            taskfile_name=c["name"],
            engine_rank=0,
            slot_rank=-1 if isinstance(task, PerEngine) else 0,
            cores_per_task=int(c.get("cores_per_task", 1)),
        )
        # Which engine and slot run it is known only there; the prelude sets the engine.
        del env["DISBATCH_ENGINE_RANK"]
        if not isinstance(task, PerEngine):
            del env["DISBATCH_CYLINDER_RANK"]
        return env

    def _start(self, task: Task) -> None:
        tid = self.start_task(**self._command_call(task.command, self._env(task), None))
        self.running[tid] = task

    def _start_engine_command(self, command: PerEngine, rank: int) -> None:
        call = self._command_call(command.command, self._env(command), rank)
        tid = self.start_task(require=[engine_name(rank)], **call)
        self.engine_tasks[tid] = command

    def _begin_stop(self) -> None:
        self.stopping = True
        for rank in self.CONFIG["engines"]:
            for command in self.taskfile.engine_stop:
                self._start_engine_command(command, rank)
        self._maybe_end()

    def _maybe_end(self) -> None:
        if not self.stopping or self.ended:
            return
        # STOP commands of engines declared dead can never run: give them up.
        if len(self.engine_tasks) > self.dead_engines * max(1, len(self.taskfile.engine_stop)):
            return
        for tid in list(self.engine_tasks):
            self.kill_task(tid)
        self.engine_tasks.clear()
        self.ended = True
        self.finish(values={"failed": self.failed, "reason": self.reason, "lines": len(self.lines)})
