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
  (those of engines declared dead are given up);
* a task with ``#DISBATCH AFTER`` lines waits, without holding up later
  tasks, until every task of those lines finished (at most ``window`` tasks
  wait at once; past that, dispatch waits too).  If one of them failed
  (non-zero exit, or itself not run for this reason) it does not run: its
  status line, flagged ``D``, has exit code -1.  A barrier waits for waiting
  tasks as for running ones.

A batch started *open* (``CONFIG`` ``open``) takes more task lines while it
runs: the ``command`` hook's ``{"do": "submit", "lines": [...]}`` reads each
line as the next line of the task file (PERENGINE refused) and answers the
task ids each made; ``{"do": "close"}`` says no more lines come, and the run
ends once the tasks it has are done.  Both go through the log, so every
replica reads the same lines in the same order, exactly once.

Each task is a command task: ``bash -c`` with a one-line prelude that sources
the driver's environment file (so tasks see the environment ``tasksprint
batch`` was started with, as in disBatch) and sets ``DISBATCH_ENGINE_RANK``
from the client's name, then the command as the task file wrote it.
Non-zero exit codes are results, not errors: a task is never retried for one.
"""

from __future__ import annotations

import base64
import bisect
import shlex
from typing import Any

from tasksprint_sdk.coordinator import Coordinator

from tasksprint.batch.env import task_environment
from tasksprint.batch.statusfile import (
    Outcome,
    StatusRecord,
    barrier_record,
    dependency_failed_record,
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
    TaskFileError,
    TaskFileReader,
    read_taskfile,
)

__all__ = ["ENGINE_TAG_PREFIX", "BatchScheduler", "engine_name", "status_outcome"]

#: Engines (worker clients) are named, and tagged, ``engine<rank>``.
ENGINE_TAG_PREFIX = "engine"

# Where a command that is not UTF-8 travels (base64) to the shell that runs it.
_COMMAND_B64 = "DISBATCH_TASKSPRINT_COMMAND_B64"

# The most status lines one ``scheduler`` query answers.
_MAX_LINES_PER_ANSWER = 4096
# The most task lines one ``submit`` command carries, and the longest line (bytes).
MAX_SUBMIT_LINES = 4096
MAX_LINE_BYTES = 1 << 20


# What the tasks a task waits for (#DISBATCH AFTER) came to.
_READY, _WAIT, _FAILED = "ready", "wait", "failed"


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
    ``driver_pid``, ``cores_per_task``, ``open`` (more lines may be submitted).
    """

    CONFIG: dict[str, Any] = {}
    # The task file read so far and the tasks in flight are kept in the state.
    SNAPSHOT_CLASSES = (TaskFileReader, TaskFile, Task, Repeat, Barrier, PerEngine, Notice, EngineEvent)

    def init(self, seed: int) -> None:
        c = self.CONFIG
        self.taskfile: TaskFileReader = read_taskfile(c["taskfile"], name=c["name"])
        self.open = bool(c.get("open"))
        if self.open:
            # PERENGINE commands have been started by then: a submitted one could never run everywhere.
            self.taskfile.close_engine_lists()
        self.waiting: list[Task] = []  # tasks whose AFTER lines are not all finished, in task-id order
        self.unfinished: list[int] = []  # sorted batch task ids running or waiting
        self.failed_ids: list[int] = []  # sorted batch task ids that failed (for AFTER)
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

    def command(self, body: Any) -> Any:
        """``{"do": "submit", "lines": [...]}`` or ``{"do": "close"}`` (an open batch); an error value otherwise."""
        do = body.get("do") if isinstance(body, dict) else None
        if do not in ("submit", "close"):
            return {"error": "a batch takes {'do': 'submit', 'lines': [...]} or {'do': 'close'}"}
        if do == "close" and self.CONFIG.get("open") and not self.open and self.reason is None:
            return {"closed": True, "tasks": self.taskfile.id_count}  # closed before: closing again is no error
        if not self.open:
            why = "its input was closed, or it ended" if self.CONFIG.get("open") else "this batch was not started open"
            return {"error": f"no more lines can be submitted: {why}"}
        if self.reason is not None:
            return {"error": f"no more lines can be submitted: the run is ending early ({self.reason})"}
        if do == "close":
            self.open = False
            self._advance()
            return {"closed": True, "tasks": self.taskfile.id_count}
        lines = body.get("lines")
        if not isinstance(lines, list) or len(lines) > MAX_SUBMIT_LINES:
            return {"error": f"'lines' must be a list of at most {MAX_SUBMIT_LINES} lines"}
        ids: list[list[int]] = []
        answer: dict[str, Any] = {}
        for i, line in enumerate(lines):
            if not isinstance(line, str | bytes) or len(line) > MAX_LINE_BYTES:
                answer = {"refused": i, "error": f"line {i} is not a string of at most {MAX_LINE_BYTES} bytes"}
                break
            first = self.taskfile.id_count
            try:
                self.taskfile.submit(line)
            except TaskFileError as exc:
                answer = {"refused": i, "error": str(exc)}
                break
            ids.append([first, self.taskfile.id_count - first])
        # The lines before a refused one stay submitted (the answer says which were).
        self._advance()
        if answer:
            return {"ids": ids, **answer}
        return {"ids": ids, "line": self.taskfile.lines_read}

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
            "open": self.open,
            "waiting": len(self.waiting),
            "retire": self._retire(),
        }

    def _retire(self) -> dict[str, Any] | None:
        """Once no batch task will start any more (and no PERENGINE STOP is due on every engine):
        the engines still running something, and how many tasks are not placed yet; else None.

        An engine not named can never get work again (Slurm retires it).  Read
        from one state, so the driver needs no other question to decide.
        """
        if not self._drained() or self.taskfile.engine_stop:
            return None
        busy: set[str] = set()
        unplaced = 0
        for tid in (*self.running, *self.engine_tasks):
            info = self.task_info(tid)
            workers = info.get("workers", []) if info is not None else []
            busy.update(workers)
            unplaced += not workers
        return {"busy": sorted(busy), "unplaced": unplaced}

    def _drained(self) -> bool:
        return self.stopping or (not self.open and self.next_id >= self.taskfile.id_count and not self.waiting)

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
        self._settled(task.task_id)
        outcome = status_outcome(record, error)
        self.lines.append(format_status_line(outcome.record(task)))
        if outcome.exit_code != 0:
            self._note_failure(task.task_id)
            if self.CONFIG.get("fail_fast") and self.reason is None:
                self.reason = f"task {task.task_id} (line {task.line}) failed with exit code {outcome.exit_code}"
                self._stop_early()
        self._advance()

    def _note_failure(self, task_id: int) -> None:
        self.failed += 1
        self.failed_since_barrier = True
        bisect.insort(self.failed_ids, task_id)

    def _settled(self, task_id: int) -> None:
        i = bisect.bisect_left(self.unfinished, task_id)
        if i < len(self.unfinished) and self.unfinished[i] == task_id:
            del self.unfinished[i]

    def _stop_early(self) -> None:
        for tid in list(self.running):
            self.kill_task(tid)
        self.running.clear()
        self.waiting.clear()
        self.unfinished.clear()
        self.next_id = self.taskfile.id_count
        self.open = False

    def _advance(self) -> None:
        window = int(self.CONFIG.get("window", 1))
        tf = self.taskfile
        if self.waiting:
            self._release(window)
        while not self.stopping and self.next_id < tf.id_count and len(self.running) < window:
            entry = tf.record(self.next_id)
            if isinstance(entry, Barrier):
                if not self._barrier(entry):
                    return
                continue
            earlier = self.skip.get(entry.task_id)
            ready = _READY
            if earlier is None and entry.after:
                ready = self._after_state(entry)
                if ready == _WAIT:
                    if len(self.waiting) >= window:
                        break
                    self.next_id += 1
                    self.waiting.append(entry)
                    bisect.insort(self.unfinished, entry.task_id)
                    continue
            self.next_id += 1
            if earlier is not None:
                record = parse_status_line(earlier)
                assert record is not None
                self.lines.append(earlier)
                if record.exit_code != 0:
                    self._note_failure(entry.task_id)
                continue
            if ready == _FAILED:
                self._dependency_failed(entry)
                continue
            self._start(entry)
        if self._drained() and not self.running and not self.stopping:
            self._begin_stop()

    def _after_state(self, task: Task) -> str:
        """Whether the tasks ``task`` waits for all succeeded (_READY), one failed (_FAILED), or some still run."""
        state = _READY
        for first, end in task.after:
            i = bisect.bisect_left(self.unfinished, first)
            if i < len(self.unfinished) and self.unfinished[i] < end:
                state = _WAIT
            i = bisect.bisect_left(self.failed_ids, first)
            if i < len(self.failed_ids) and self.failed_ids[i] < end:
                return _FAILED
        return state

    def _release(self, window: int) -> None:
        """Start (or give up) the waiting tasks whose AFTER lines are done, in task-id order."""
        still: list[Task] = []
        for task in self.waiting:
            state = self._after_state(task)
            if state == _WAIT or (state == _READY and len(self.running) >= window):
                still.append(task)
                continue
            self._settled(task.task_id)
            if state == _FAILED:
                self._dependency_failed(task)
            else:
                self._start(task)
        self.waiting = still

    def _dependency_failed(self, task: Task) -> None:
        self.lines.append(
            format_status_line(dependency_failed_record(task, node=self.CONFIG["driver_node"], at=self.now))
        )
        self._note_failure(task.task_id)

    def _barrier(self, barrier: Barrier) -> bool:
        """Pass ``barrier`` if every earlier task finished (True), else note when it was reached."""
        if self.barrier_reached is None and self.now > 0:
            # (Before the first TICK the coordinator has no time yet: then the barrier's start is when it is met.)
            self.barrier_reached = self.now
        if self.running or self.waiting:
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
        bisect.insort(self.unfinished, task.task_id)

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
