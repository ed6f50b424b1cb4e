"""disBatch's status file: one tab-separated line per finished task, written and read back.

Theory of operation
-------------------
A status line has 15 fields, separated by tabs, the command last (it may
hold tabs itself, so a reader splits at the first 14 only):

1. flags: for a task, four characters: ``R`` (non-zero exit) or space,
   ``O`` (leaked output) or space, ``E`` (leaked error output) or space,
   then ``P`` (PERENGINE command), ``S`` (skipped, done in an earlier run),
   ``Z`` (finished after it was given up for dead), ``D`` (not run: a task
   it waits for with ``#DISBATCH AFTER`` failed; TaskSprint's extension) or
   space.  For a
   barrier, ``B`` or ``C`` (BARRIER CHECK) followed by four spaces;
2. task id; 3. line (1-based); 4. repeat index (-1 outside a REPEAT);
5. node; 6. pid of the task's shell; 7. exit code;
8. elapsed seconds, 9. start and 10. finish (Unix time), each ``%.3f``,
   elapsed computed as finish - start from the values held;
11. bytes of leaked standard output, 12. its snippet; 13. bytes of leaked
    standard error, 14. its snippet.  A snippet is the first 40 bytes, and,
    if there were more, ``...`` and the last up to 40 bytes after those,
    decoded as UTF-8 (undecodable bytes become U+FFFD) and written as a
    Python string literal (``repr``);
15. the command as run: its text when it is UTF-8, else the Python
    literal of its bytes (``b'...'``).

``--status-header`` puts :data:`STATUS_HEADER` first.

Resume (``-r``) reads earlier status files: of their plain task lines (not
barriers, PERENGINE, skipped, zombie or dependency-failed lines) the one with the lowest exit
code for each task id is kept, the first on ties.  A task of the new run
is then skipped when such a line exists, unless ``--retry`` is given and
the line's exit code is not 0.  A skipped task must match the line on
task id, line, repeat index and command, or the run stops with
:class:`ResumeMismatch` (``--force-resume`` goes on, matching on task id
alone).  A skipped task's status line is the earlier line with ``S`` flag.
"""

from __future__ import annotations

import ast
import enum
import re
from collections.abc import Iterable, Mapping

import attrs

from tasksprint.batch.taskfile import Barrier, PerEngine, Task

__all__ = [
    "STATUS_HEADER",
    "Outcome",
    "RecordKind",
    "ResumeMismatch",
    "Run",
    "Skip",
    "StatusFile",
    "StatusLineError",
    "StatusRecord",
    "barrier_record",
    "dependency_failed_record",
    "format_status_line",
    "parse_status_file",
    "parse_status_line",
    "resume_decision",
    "resume_index",
    "snippet",
]

STATUS_HEADER = (
    "ROE[ PSZ]\tTaskID\tLineNum\tRepeatIndex\tNode\tPID\tReturnCode\tElapsed\tStart\tFinish\t"
    "BytesOfLeakedOutput\tOutputSnippet\tBytesOfLeakedError\tErrorSnippet\tCommand"
)
_FIELDS = 15

# Bytes kept from each end of leaked output for its snippet.
SNIPPET_END_BYTES = 40


class RecordKind(enum.Enum):
    """What a status line records; the value is its letter in the flags."""

    TASK = " "
    PER_ENGINE = "P"
    SKIPPED = "S"
    ZOMBIE = "Z"
    #: Not run, because a task it depends on (``#DISBATCH AFTER``) failed.
    DEPENDENCY_FAILED = "D"
    BARRIER = "B"
    CHECK_BARRIER = "C"


_TASK_LIKE = (
    RecordKind.TASK,
    RecordKind.PER_ENGINE,
    RecordKind.SKIPPED,
    RecordKind.ZOMBIE,
    RecordKind.DEPENDENCY_FAILED,
)


@attrs.frozen(kw_only=True)
class StatusRecord:
    """One status line's content; ``command`` is bytes, as the task ran it."""

    kind: RecordKind
    task_id: int
    line: int
    repeat_index: int
    node: str
    pid: int
    exit_code: int
    start: float
    finish: float
    out_bytes: int
    out_snippet: str
    err_bytes: int
    err_snippet: str
    command: bytes

    @property
    def flags(self) -> str:
        """The flags field."""
        if self.kind in _TASK_LIKE:
            return (
                ("R" if self.exit_code else " ")
                + ("O" if self.out_bytes else " ")
                + ("E" if self.err_bytes else " ")
                + self.kind.value
            )
        return self.kind.value + "    "

    @property
    def elapsed(self) -> float:
        """Seconds from start to finish."""
        return self.finish - self.start


@attrs.frozen(kw_only=True)
class Outcome:
    """How one run of a task went, as its runner saw it.

    ``out_snippet`` / ``err_snippet`` are made by :func:`snippet` from the
    leaked output; ``start`` and ``finish`` are Unix times in seconds.
    """

    node: str
    pid: int
    exit_code: int
    start: float
    finish: float
    out_bytes: int = 0
    out_snippet: str = ""
    err_bytes: int = 0
    err_snippet: str = ""

    def record(self, task: Task | PerEngine) -> StatusRecord:
        """The status record of ``task`` having run with this outcome."""
        if isinstance(task, PerEngine):
            kind, task_id, repeat_index = RecordKind.PER_ENGINE, task.index, -1
        else:
            kind, task_id, repeat_index = RecordKind.TASK, task.task_id, task.repeat_index
        return StatusRecord(
            kind=kind,
            task_id=task_id,
            line=task.line,
            repeat_index=repeat_index,
            node=self.node,
            pid=self.pid,
            exit_code=self.exit_code,
            start=self.start,
            finish=self.finish,
            out_bytes=self.out_bytes,
            out_snippet=self.out_snippet,
            err_bytes=self.err_bytes,
            err_snippet=self.err_snippet,
            command=task.command,
        )


def barrier_record(barrier: Barrier, *, node: str, pid: int, start: float, finish: float) -> StatusRecord:
    """The status record of a barrier reached at ``start`` and met at ``finish``.

    disBatch gives the driver's node and pid; the command field is the
    barrier's line as written.
    """
    return StatusRecord(
        kind=RecordKind.CHECK_BARRIER if barrier.check else RecordKind.BARRIER,
        task_id=barrier.task_id,
        line=barrier.line,
        repeat_index=-1,
        node=node,
        pid=pid,
        exit_code=0,
        start=start,
        finish=finish,
        out_bytes=0,
        out_snippet="",
        err_bytes=0,
        err_snippet="",
        command=barrier.text,
    )


def dependency_failed_record(task: Task, *, node: str, at: float) -> StatusRecord:
    """The status record of ``task``, not run because a task it waits for failed (flag ``D``, exit code -1)."""
    return StatusRecord(
        kind=RecordKind.DEPENDENCY_FAILED,
        task_id=task.task_id,
        line=task.line,
        repeat_index=task.repeat_index,
        node=node,
        pid=0,
        exit_code=-1,
        start=at,
        finish=at,
        out_bytes=0,
        out_snippet="",
        err_bytes=0,
        err_snippet="",
        command=task.command,
    )


def snippet(data: bytes) -> str:
    """The snippet of leaked output ``data`` (all of it, not just the ends)."""
    head = data[:SNIPPET_END_BYTES]
    rest = data[SNIPPET_END_BYTES:]
    if rest:
        head += b"..." + rest[-SNIPPET_END_BYTES:]
    return head.decode("utf-8", "replace")


def format_status_line(record: StatusRecord) -> str:
    """The status line for ``record``, without its newline."""
    try:
        command = record.command.decode("utf-8")
    except UnicodeDecodeError:
        command = repr(record.command)
    fields = [
        record.flags,
        str(record.task_id),
        str(record.line),
        str(record.repeat_index),
        record.node,
        str(record.pid),
        str(record.exit_code),
        f"{record.elapsed:.3f}",
        f"{record.start:.3f}",
        f"{record.finish:.3f}",
        str(record.out_bytes),
        repr(record.out_snippet),
        str(record.err_bytes),
        repr(record.err_snippet),
        command,
    ]
    return "\t".join(fields)


class StatusLineError(ValueError):
    """A status line that cannot be read; says which field and why."""


# Field readers check shape before converting, so a hostile line costs time
# linear in its length (no huge integers, no expressions evaluated).
_INT = re.compile(r"[+-]?[0-9]{1,30}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,4})?")
# A Python string or bytes literal as repr writes it: one quote kind, escapes.
_STR_LITERAL = re.compile(r"""[bB]?(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")""", re.DOTALL)


def _int(text: str, field: str) -> int:
    if not _INT.fullmatch(text):
        raise StatusLineError(f"{field} is not an integer: {text[:40]!r}")
    return int(text)


def _float(text: str, field: str) -> float:
    if not _FLOAT.fullmatch(text):
        raise StatusLineError(f"{field} is not a number: {text[:40]!r}")
    return float(text)


def _literal(text: str, field: str) -> str | bytes:
    if not _STR_LITERAL.fullmatch(text):
        raise StatusLineError(f"{field} is not a quoted string: {text[:40]!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise StatusLineError(f"{field} is not a quoted string: {e}") from None
    assert isinstance(value, (str, bytes))
    return value


def _snippet_field(text: str, field: str) -> str:
    value = _literal(text, field)
    # Older writers quoted the bytes themselves.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _kind(flags: str) -> RecordKind:
    # disBatch reads the kind from the fourth flag, else from the first.
    if len(flags) < 4:
        raise StatusLineError(f"flags field {flags!r} is shorter than 4 characters")
    if flags[3] in "PSZD":
        return RecordKind(flags[3])
    if flags[0] in " R":
        return RecordKind.TASK
    if flags[0] in "BC":
        return RecordKind(flags[0])
    raise StatusLineError(f"flags field {flags!r} names no kind of line")


def parse_status_line(line: str) -> StatusRecord | None:
    """Read one status line (without its line end); None for the header line.

    Raises :class:`StatusLineError` for anything else that is not a status line.
    """
    if line == STATUS_HEADER:
        return None
    fields = line.split("\t", _FIELDS - 1)
    if len(fields) != _FIELDS:
        raise StatusLineError(f"{len(fields)} tab-separated fields, not {_FIELDS}")
    flags, task_id, line_no, repeat, node, pid, code, _elapsed, start, finish, ob, od, eb, ed, command = fields
    if command.startswith("b'") or (command.startswith('b"') and _STR_LITERAL.fullmatch(command)):
        # A command that is not UTF-8 was written as its bytes literal.  disBatch
        # reads back only the b'...' form, so a command holding ' (written b"...")
        # never matched on resume; both forms are read here.
        literal = _literal(command, "command")
        if not isinstance(literal, bytes):
            raise StatusLineError("command starting b' is not a bytes literal")
        command_bytes = literal
    else:
        command_bytes = command.encode("utf-8")
    return StatusRecord(
        kind=_kind(flags),
        task_id=_int(task_id, "task id"),
        line=_int(line_no, "line number"),
        repeat_index=_int(repeat, "repeat index"),
        node=node,
        pid=_int(pid, "pid"),
        exit_code=_int(code, "exit code"),
        start=_float(start, "start"),
        finish=_float(finish, "finish"),
        out_bytes=_int(ob, "leaked output bytes"),
        out_snippet=_snippet_field(od, "output snippet"),
        err_bytes=_int(eb, "leaked error bytes"),
        err_snippet=_snippet_field(ed, "error snippet"),
        command=command_bytes,
    )


@attrs.frozen(kw_only=True)
class StatusFile:
    """A status file read back: its records in file order, and the lines it could not read."""

    records: tuple[StatusRecord, ...]
    rejected: tuple[tuple[int, str], ...]  # (1-based line, why)


_LINE_END = re.compile(rb"\r\n|\r|\n")


def parse_status_file(data: bytes) -> StatusFile:
    """Read a status file's bytes, tolerant as disBatch is.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r``; a header line is skipped; a
    line that is not UTF-8 or not a status line is left out and listed in
    ``rejected`` with the reason (disBatch logs and skips such lines too).
    """
    lines = _LINE_END.split(data)
    if lines and lines[-1] == b"":
        lines.pop()
    records: list[StatusRecord] = []
    rejected: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        try:
            record = parse_status_line(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            rejected.append((number, f"not UTF-8 at byte {e.start}"))
            continue
        except StatusLineError as e:
            rejected.append((number, str(e)))
            continue
        if record is not None:
            records.append(record)
    return StatusFile(records=tuple(records), rejected=tuple(rejected))


def resume_index(files: Iterable[StatusFile]) -> dict[int, StatusRecord]:
    """What earlier runs did, for ``-r`` (given once per file, in order).

    Maps each task id to its plain task line with the lowest exit code,
    the first of equals; barriers, PERENGINE, skipped and zombie lines do
    not count (so resuming a resumed run needs its predecessors' files too).
    """
    index: dict[int, StatusRecord] = {}
    for status in files:
        for record in status.records:
            if record.kind is not RecordKind.TASK:
                continue
            known = index.get(record.task_id)
            if known is None or record.exit_code < known.exit_code:
                index[record.task_id] = record
    return index


class ResumeMismatch(Exception):
    """A task to skip differs from the earlier run's line with its id."""

    def __init__(self, task: Task, earlier: StatusRecord) -> None:
        super().__init__(
            f"task {task.task_id} (line {task.line}, repeat index {task.repeat_index}, command "
            f"{task.command!r}) does not match the earlier status line (line {earlier.line}, repeat index "
            f"{earlier.repeat_index}, command {earlier.command!r}); is this the same task file? "
            "Use --force-resume to match on task id alone"
        )
        self.task = task
        self.earlier = earlier


@attrs.frozen(kw_only=True)
class Run:
    """Run the task."""


@attrs.frozen(kw_only=True)
class Skip:
    """Do not run the task: ``record`` is its status line (the earlier one, flagged S).

    ``mismatch`` is true when only ``--force-resume`` allowed the skip.
    """

    record: StatusRecord
    mismatch: bool


def resume_decision(
    task: Task, earlier: Mapping[int, StatusRecord], *, retry: bool = False, force: bool = False
) -> Run | Skip:
    """Whether a resumed run runs ``task``, given ``earlier`` from :func:`resume_index`.

    ``retry`` is ``-R`` (run again what failed), ``force`` is
    ``--force-resume``.  Raises :class:`ResumeMismatch` when the task would
    be skipped but differs from the earlier line and ``force`` is false.
    """
    record = earlier.get(task.task_id)
    if record is None or (retry and record.exit_code != 0):
        return Run()
    mismatch = (record.line, record.repeat_index, record.command) != (task.line, task.repeat_index, task.command)
    if mismatch and not force:
        raise ResumeMismatch(task, record)
    return Skip(record=attrs.evolve(record, kind=RecordKind.SKIPPED), mismatch=mismatch)
