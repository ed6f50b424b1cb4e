"""The ``Batch`` Python API (like disBatch's ``DisBatcher``), and lines submitted to a running batch.

A batch started open (``tasksprint batch --open``, ``Batch(..., open=True)``)
takes more task lines while it runs: each submission is a command to the
batch scheduler through the replicated log (exactly once, read by every
replica in the same order), answered with the task ids each line made.
Closing the input (``--close PREFIX``, :meth:`Batch.done`) lets the run end
once its tasks are done.  Status records are read as tasks finish, with the
same ``scheduler`` query the driver uses for the status file.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from tasksprint.batch.scheduler import MAX_SUBMIT_LINES
from tasksprint.batch.statusfile import STATUS_HEADER, StatusRecord, parse_status_line
from tasksprint.batch_command import EXIT_FAILED, EXIT_USAGE, UsageError, add_arguments, prepare
from tasksprint.batch_run import BatchRun
from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.config import parse_peers
from tasksprint.coordinator.ops import Commanded, CommandOp, ErrorCode, Refused, SchedulerAnswer, SchedulerRequest
from tasksprint.log_client import CommandRefused, LogClient, Unavailable

__all__ = ["Batch", "BatchCommandError", "close_input", "send_command", "submit_command", "submit_lines"]

#: About the most bytes of task lines one submit command carries (far below a log entry's limit).
SUBMIT_CHUNK_BYTES = 1 << 20


class BatchCommandError(Exception):
    """A running batch refused a command (or did not answer); the message says why.

    ``accepted`` are the task ids of the lines submitted before a refused one (one range per line).
    """

    def __init__(self, message: str, accepted: Sequence[range] = ()) -> None:
        super().__init__(message)
        self.accepted = list(accepted)


async def send_command(run: BatchRun, body: dict[str, Any], *, deadline: float = 60.0) -> Any:
    """Send ``body`` to the run's scheduler through the log (exactly once); its answer.

    Raises :class:`BatchCommandError` when the replicas refuse it or do not answer by ``deadline`` seconds.
    """
    info = run.info()
    secret = (run.run_dir / "secret").read_bytes().strip()
    until = trio.current_time() + deadline
    try:
        async with LogClient(list(parse_peers(info["peers"])), secret) as log:
            while True:
                left = max(0.1, until - trio.current_time())
                answer = await log.submit(CommandOp(body=body).to_wire(), deadline=left)
                # A run just started may not have applied its first entry: the
                # refusal changed nothing, so the command is sent again.
                if not (isinstance(answer, Refused) and answer.code == ErrorCode.NOT_INITIALIZED.value):
                    break
                if trio.current_time() >= until:
                    break
                await trio.sleep(0.05)
    except Unavailable as exc:
        raise BatchCommandError(f"the run's replicas did not answer: {exc}") from None
    except CommandRefused as exc:
        raise BatchCommandError(f"the command cannot be sent: {exc}") from None
    if isinstance(answer, Refused):
        raise BatchCommandError(f"refused: {answer.error}")
    if not isinstance(answer, Commanded) or not isinstance(answer.value, dict):
        raise BatchCommandError(f"unexpected answer {answer!r:.200}")
    value: dict[str, Any] = answer.value
    if "error" in value and "refused" not in value:
        raise BatchCommandError(value["error"])
    return value


def submit_lines(run: BatchRun, lines: Iterable[str | bytes]) -> list[range]:
    """Submit task lines to the open run ``run``, in order; the task ids each line made.

    A line may be any task-file line (directives too, PERENGINE excepted).
    Raises :class:`BatchCommandError` for a refused line (its ``accepted``
    are the ids of the lines before it, which stay submitted).
    """
    encoded = [line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line for line in lines]
    ids: list[range] = []
    at = 0
    while at < len(encoded):
        # One log command carries up to MAX_SUBMIT_LINES lines and about SUBMIT_CHUNK_BYTES (a longer line alone).
        end, size = at, 0
        while (
            end < len(encoded)
            and end - at < MAX_SUBMIT_LINES
            and (end == at or size + len(encoded[end]) <= SUBMIT_CHUNK_BYTES)
        ):
            size += len(encoded[end])
            end += 1
        value = trio.run(functools.partial(send_command, run, {"do": "submit", "lines": encoded[at:end]}))
        ids += [range(first, first + count) for first, count in value["ids"]]
        if "error" in value:
            raise BatchCommandError(f"line {at + value['refused'] + 1} refused: {value['error']}", ids)
        at = end
    return ids


def close_input(run: BatchRun) -> int:
    """Tell the open run ``run`` that no more lines come (it ends once its tasks are done); its task count."""
    value = trio.run(functools.partial(send_command, run, {"do": "close"}))
    return int(value["tasks"])


def submit_command(args: argparse.Namespace, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``--submit PREFIX`` (task lines from stdin, one per line) and ``--close PREFIX``."""
    prefix = args.submit or args.close
    run = BatchRun(prefix)
    if not (run.run_dir / "run.json").exists():
        print(f"tasksprint batch: no run at {run.run_dir} (run.json is missing)", file=err)
        return EXIT_USAGE
    try:
        if args.submit:
            data = sys.stdin.buffer.read()
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            for ids in submit_lines(run, lines):
                print(" ".join(map(str, ids)) if len(ids) < 20 else f"{ids.start}..{ids.stop - 1}", file=out)
        else:
            print(f"tasksprint batch: input closed; {close_input(run)} task ids in all", file=err)
    except BatchCommandError as exc:
        for ids in exc.accepted:
            print(" ".join(map(str, ids)) if len(ids) < 20 else f"{ids.start}..{ids.stop - 1}", file=out)
        print(f"tasksprint batch: {exc}", file=err)
        return EXIT_FAILED
    return 0


class Batch:
    """A batch run from Python, like disBatch's ``DisBatcher``: start it, read each task's status record.

    ``tasks`` is the task file's content (a string, bytes, or an iterable of
    lines, directives allowed); ``prefix`` names the run's files as ``-p``
    does; ``options`` are more ``tasksprint batch`` options (``["-s",
    "localhost:4", "--fail-fast"]``).  Use it as a context manager: leaving
    the block stops whatever still runs.  The run's replicas and clients do
    not depend on this object: if the program dies, ``tasksprint batch
    --attach PREFIX`` finishes the run and writes its status file.

    With ``open=True`` the batch takes more lines as it runs (:meth:`submit`,
    from any process: ``tasksprint batch --submit PREFIX``) until
    :meth:`done` says no more come; only then can it end.

    ::

        with Batch("", prefix="sweep", options=["-s", "localhost:4"], open=True) as b:
            ids = [b.submit(f"./simulate --seed {i}")[0] for i in range(10)]
            b.submit("#DISBATCH AFTER 1-10")
            (summary,) = b.submit("./summarize")
            b.done()
            print(b.sync_tasks([summary])[summary].exit_code)
            b.wait()
    """

    def __init__(
        self,
        tasks: str | bytes | Iterable[str] = "",
        *,
        prefix: str,
        options: Sequence[str] = (),
        open: bool = False,  # noqa: A002 (disBatch-like keyword)
    ) -> None:
        if isinstance(tasks, str):
            data = tasks.encode("utf-8", "surrogateescape")
        elif isinstance(tasks, bytes):
            data = tasks
        else:
            data = "".join(line if line.endswith("\n") else line + "\n" for line in tasks).encode()
        parser = argparse.ArgumentParser(prog="Batch", exit_on_error=False)
        add_arguments(parser)
        try:
            self._args = parser.parse_args([*options, *(["--open"] if open else []), "-p", prefix, "STREAM"])
        except argparse.ArgumentError as exc:
            raise UsageError(str(exc)) from None
        self._args.taskfile = None
        self._prepared = prepare(self._args, data)
        self.run = self._prepared.run
        self.records: dict[int, StatusRecord] = {}  # task id -> its status record, as they finish
        self._lines: list[str] = []
        self._answer: dict[str, Any] = {}
        self._stopped = False
        self.run.start(self._prepared.config, self._prepared.engines)

    @property
    def status_path(self) -> Path:
        """The status file, written by :meth:`wait`."""
        return self.run.status_path

    def submit(self, *lines: str | bytes) -> list[int]:
        """Add task lines to the open batch, each read as the next line of its task file; their task ids.

        A line may be a directive (``#DISBATCH REPEAT``, ``AFTER``, ...; not
        PERENGINE), which makes several task ids or none.  Raises
        :class:`BatchCommandError` for a refused line (the lines before it
        are submitted) or a batch that is not open.
        """
        return [task_id for ids in submit_lines(self.run, lines) for task_id in ids]

    def done(self) -> None:
        """No more lines come (disBatch's ``done``): the batch ends once its tasks are done."""
        close_input(self.run)

    def poll(self) -> list[StatusRecord]:
        """The status records that came in since the last call (asks the replicas once)."""
        answer = trio.run(self._ask)
        if answer is None:
            return []
        self._answer = answer
        new = []
        for line in answer["lines"]:
            self._lines.append(line)
            record = parse_status_line(line)
            if record is not None:
                self.records[record.task_id] = record
                new.append(record)
        return new

    async def _ask(self) -> dict[str, Any] | None:
        info = self.run.info()
        secret = (self.run.run_dir / "secret").read_bytes().strip()
        addrs = list(parse_peers(info["peers"]))
        channel = ReplicaChannel(addrs, secret)
        try:
            for _ in addrs:
                try:
                    reply = await channel.request(SchedulerRequest(body={"after": len(self._lines)}))
                except ASK_ERRORS:
                    await channel.move_on()
                    continue
                if isinstance(reply, SchedulerAnswer) and isinstance(reply.value, dict):
                    return reply.value
            return None
        finally:
            await channel.aclose()

    @property
    def ended(self) -> bool:
        """Whether the run ended and every status line was read."""
        return bool(self._answer.get("ended")) and len(self._lines) >= self._answer.get("total", 0)

    def sync_tasks(self, task_ids: Iterable[int], timeout: float | None = None) -> dict[int, StatusRecord]:
        """Wait until the tasks ``task_ids`` finished (disBatch's ``syncTasks``); their records by id.

        Raises TimeoutError after ``timeout`` seconds, KeyError for a task the ended run never finished.
        """
        wanted = list(task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(t in self.records for t in wanted):
            if self.ended:
                missing = [t for t in wanted if t not in self.records]
                raise KeyError(f"the run ended without finishing tasks {missing}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"tasks {[t for t in wanted if t not in self.records]} did not finish in time")
            if not self.poll():
                time.sleep(0.02)
        return {t: self.records[t] for t in wanted}

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the run to end; write the status file, stop the replicas and return the summary.

        The summary has ``failed`` (tasks with a non-zero exit) and ``reason``
        (why the run ended early, or None).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the batch did not end in time")
            if not self.poll():
                time.sleep(0.02)
        with open(self.status_path, "w", encoding="utf-8", errors="surrogateescape") as status:
            if self._args.status_header:
                status.write(STATUS_HEADER + "\n")
            status.write("".join(line + "\n" for line in self._lines))
        self.close()
        return {"failed": self._answer.get("failed", 0), "reason": self._answer.get("reason")}

    def close(self) -> None:
        """Stop the run's processes (what still runs is killed with them)."""
        if not self._stopped:
            self._stopped = True
            self.run.stop(kill_clients=True)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
