"""disBatch's task-file language, read into task records without running anything.

Theory of operation
-------------------
A task file is bytes, read as disBatch reads it: the source is cut into
*stream items* at ``\\n`` (one item per line of a file, or one per call of
:meth:`TaskFileReader.feed` for a source that submits lines as a run goes);
an item's stream index, 1-based, is what the task records call ``line``.
Each item is then cut again at ``\\r`` and ``\\r\\n`` (``bytes.splitlines``),
and every piece is read on its own, with the item's line number.

A piece is, in this order of precedence:

* a comment, ignored: blank, or starting (after optional whitespace) with
  ``#``, unless it starts with the upper-case word ``#DISBATCH``;
* ``#DISBATCH PERENGINE START|STOP cmd``: a command each engine (client)
  runs once when it joins (START) or leaves (STOP).  Allowed only before
  the first piece that is not a comment, PERENGINE, PREFIX or SUFFIX;
  after that it is a :class:`TaskFileError` naming the line;
* ``#DISBATCH PREFIX text`` / ``#DISBATCH SUFFIX text``: text put before /
  after every later command (each replaces the previous one; an empty text
  clears it; ``#DISBATCH PREFIX`` with no space after it is not a PREFIX);
* ``#DISBATCH REPEAT n [start s] [step k] [cmd]``: n tasks, each with
  ``PREFIX + cmd + SUFFIX``, with repeat indices s, s+k, ... (s=0, k=1);
* ``#DISBATCH BARRIER [CHECK] [key]``: no later task starts until all
  earlier ones finished; with CHECK the run ends there if a task since the
  previous barrier failed.  A barrier takes a task id of its own;
* ``#DISBATCH AFTER refs`` (TaskSprint's extension; disBatch logs it as an
  unknown directive and runs the file without it): the next task line or
  REPEAT runs only after every task of the earlier lines ``refs`` finished
  without failing.  ``refs`` are 1-based line numbers and ranges ``a-b``,
  separated by spaces or commas; each must name earlier lines that made
  tasks.  Several AFTER lines before one task add up;
* any other ``#DISBATCH ...`` (after the word, a space): not understood,
  skipped with a :class:`Notice` (disBatch logs it and skips it too);
* anything else is a task: ``PREFIX + piece + SUFFIX``.

The word after ``#DISBATCH`` is matched without regard to case, except
``BARRIER`` and ``CHECK`` (as disBatch does); ``#DISBATCH`` itself must be
upper case, and is followed by exactly one space.

Task ids are 0-based and count every task, repeats and barriers included;
PERENGINE commands are numbered apart, START and STOP each from 0.

Cost is bounded by the input: reading is linear in its bytes, and a REPEAT
is kept as one :class:`Repeat` entry whatever its count (tasks are expanded
only when asked for, one at a time), under a limit on the total number of
task ids (``max_tasks``).
"""

from __future__ import annotations

import bisect
import enum
import re
from collections.abc import Iterator

import attrs

__all__ = [
    "DEFAULT_MAX_TASKS",
    "Barrier",
    "EngineEvent",
    "Notice",
    "PerEngine",
    "Repeat",
    "Task",
    "TaskFile",
    "TaskFileError",
    "TaskFileReader",
    "parse_taskfile",
    "read_taskfile",
]

# The most task ids one file may number.  A REPEAT costs nothing to read
# whatever its count, but every task id becomes a status line and a record in
# the replicated log, so a file asking for more is refused before the run.
DEFAULT_MAX_TASKS = 100_000_000

# A REPEAT's count, start or step is refused past this many digits, before
# converting it, so a line of digits cannot cost quadratic time.
_MAX_NUMBER_DIGITS = 18


class TaskFileError(ValueError):
    """A task file that cannot be run; ``line`` is the 1-based line, ``reason`` what is wrong."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"task file line {line}: {reason}")
        self.line = line
        self.reason = reason


class EngineEvent(enum.Enum):
    """When a PERENGINE command runs on an engine."""

    START = "START"
    STOP = "STOP"


@attrs.frozen(kw_only=True)
class Task:
    """One task: ``command`` is what bash runs, PREFIX and SUFFIX applied.

    ``line`` is the 1-based line (disBatch's stream index) of the line that
    made it; ``repeat_index`` is -1 outside a REPEAT.
    """

    task_id: int
    line: int
    repeat_index: int
    command: bytes
    #: Task ids it waits for (``#DISBATCH AFTER``): sorted, disjoint ``(first, end)`` ranges, ``end`` excluded.
    after: tuple[tuple[int, int], ...] = ()


@attrs.frozen(kw_only=True)
class Repeat:
    """A REPEAT directive: tasks ``first_id .. first_id + count - 1``, all with one command."""

    first_id: int
    line: int
    count: int
    start: int
    step: int
    command: bytes
    after: tuple[tuple[int, int], ...] = ()

    def task(self, task_id: int) -> Task:
        """The task with ``task_id``, which must be one of this REPEAT's."""
        offset = task_id - self.first_id
        if not 0 <= offset < self.count:
            raise IndexError(f"task {task_id} is not one of the REPEAT on line {self.line}")
        return Task(
            task_id=task_id,
            line=self.line,
            repeat_index=self.start + offset * self.step,
            command=self.command,
            after=self.after,
        )

    def tasks(self) -> Iterator[Task]:
        """This REPEAT's tasks in order, made one at a time."""
        for task_id in range(self.first_id, self.first_id + self.count):
            yield self.task(task_id)


@attrs.frozen(kw_only=True)
class Barrier:
    """A BARRIER: ``text`` is its line as written (the status file's command field).

    ``key`` is what follows ``BARRIER [CHECK] ``, if anything (disBatch posts
    the barrier's task id under it when the barrier is met).
    """

    task_id: int
    line: int
    check: bool
    key: bytes | None
    text: bytes


@attrs.frozen(kw_only=True)
class PerEngine:
    """A PERENGINE command; ``index`` counts START and STOP commands apart, from 0."""

    event: EngineEvent
    index: int
    line: int
    command: bytes


@attrs.frozen(kw_only=True)
class Notice:
    """A line read but not understood, and skipped (as disBatch does)."""

    line: int
    text: bytes
    reason: str


Entry = Task | Repeat | Barrier


@attrs.frozen(kw_only=True)
class TaskFile:
    """A whole task file, read.

    ``entries`` are the tasks, REPEATs and barriers in file order (task ids
    increasing); ``id_count`` is the number of task ids they use.
    """

    name: str
    entries: tuple[Entry, ...]
    engine_start: tuple[PerEngine, ...]
    engine_stop: tuple[PerEngine, ...]
    notices: tuple[Notice, ...]
    id_count: int
    _first_ids: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_first_ids", tuple(_first_id(e) for e in self.entries))

    def records(self) -> Iterator[Task | Barrier]:
        """Every task and barrier in task-id order, REPEATs expanded lazily."""
        for entry in self.entries:
            if isinstance(entry, Repeat):
                yield from entry.tasks()
            else:
                yield entry

    def record(self, task_id: int) -> Task | Barrier:
        """The task or barrier numbered ``task_id``; IndexError if there is none."""
        if not 0 <= task_id < self.id_count:
            raise IndexError(f"no task {task_id}: this file numbers 0 to {self.id_count - 1}")
        entry = self.entries[bisect.bisect_right(self._first_ids, task_id) - 1]
        if isinstance(entry, Repeat):
            return entry.task(task_id)
        return entry


def _first_id(entry: Entry) -> int:
    return entry.first_id if isinstance(entry, Repeat) else entry.task_id


def _size(entry: Entry) -> int:
    return entry.count if isinstance(entry, Repeat) else 1


def _merged(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``(first, end)`` ranges sorted, overlapping and touching ones merged."""
    out: list[tuple[int, int]] = []
    for first, end in sorted(ranges):
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return tuple(out)


# A comment: optional whitespace, then '#' or the end.  Lines starting with the
# upper-case word '#DISBATCH' are never comments; the callers check that first.
_COMMENT = re.compile(rb"\s*(?:#|\Z)")
_DIRECTIVE = b"#DISBATCH"
_PERENGINE = re.compile(rb"\#DISBATCH[ ]PERENGINE[ ](START|STOP)[ ](.*)", re.IGNORECASE | re.VERBOSE | re.DOTALL)
_PREFIX = re.compile(rb"\#DISBATCH[ ]PREFIX[ ](.*)", re.IGNORECASE | re.VERBOSE | re.DOTALL)
_SUFFIX = re.compile(rb"\#DISBATCH[ ]SUFFIX[ ](.*)", re.IGNORECASE | re.VERBOSE | re.DOTALL)
_REPEAT = re.compile(
    rb"""
    \#DISBATCH[ ]REPEAT \s+ (?P<count>[0-9]+)
    (?: \s+ start \s+ (?P<start>[0-9]+) )?
    (?: \s+ step \s+ (?P<step>[0-9]+) )?
    (?: [ ] (?P<command>.+) )?
    \s* \Z
    """,
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_BARRIER = b"#DISBATCH BARRIER"
_AFTER = re.compile(rb"\#DISBATCH[ ]AFTER[ ](.*)", re.IGNORECASE | re.VERBOSE | re.DOTALL)
_AFTER_REF = re.compile(rb"([0-9]+)(?:-([0-9]+))?")
_AFTER_SEPARATORS = re.compile(rb"[\s,]+")


@attrs.define(eq=False)
class TaskFileReader:
    """Reads a task file as its lines arrive (the streaming form of :func:`parse_taskfile`).

    Each :meth:`feed` is one stream item (one line of a file); it returns the
    entries and PERENGINE commands that item made, in order.  Raises
    :class:`TaskFileError` for an item that cannot be run; the reader is then
    unusable (later items would be numbered against a broken prefix).
    """

    _name: str
    _max_tasks: int = DEFAULT_MAX_TASKS
    _line: int = attrs.field(default=0, init=False)
    _next_id: int = attrs.field(default=0, init=False)
    _prefix: bytes = attrs.field(default=b"", init=False)
    _suffix: bytes = attrs.field(default=b"", init=False)
    _engine_counts: dict[EngineEvent, int] = attrs.field(factory=lambda: dict.fromkeys(EngineEvent, 0), init=False)
    _engine_lists_closed: bool = attrs.field(default=False, init=False)
    _broken: TaskFileError | None = attrs.field(default=None, init=False)
    _entries: list[Entry] = attrs.field(factory=list, init=False)
    _per_engine: list[PerEngine] = attrs.field(factory=list, init=False)
    _notices: list[Notice] = attrs.field(factory=list, init=False)
    # Per entry, in order: its first task id, its line, and how many entries up to it make tasks.
    _first_ids: list[int] = attrs.field(factory=list, init=False)
    _entry_lines: list[int] = attrs.field(factory=list, init=False)
    _task_entries: list[int] = attrs.field(factory=list, init=False)
    _pending_after: list[tuple[int, int]] = attrs.field(factory=list, init=False)

    @property
    def engine_lists_closed(self) -> bool:
        """True once no more PERENGINE commands may come (a task or other directive was read)."""
        return self._engine_lists_closed

    @property
    def id_count(self) -> int:
        """How many task ids the items fed so far use."""
        return self._next_id

    @property
    def lines_read(self) -> int:
        """How many stream items were fed (the last one's line number)."""
        return self._line

    @property
    def engine_start(self) -> tuple[PerEngine, ...]:
        return tuple(p for p in self._per_engine if p.event is EngineEvent.START)

    @property
    def engine_stop(self) -> tuple[PerEngine, ...]:
        return tuple(p for p in self._per_engine if p.event is EngineEvent.STOP)

    def close_engine_lists(self) -> None:
        """Refuse PERENGINE commands from now on (lines submitted to a running batch)."""
        self._engine_lists_closed = True

    def record(self, task_id: int) -> Task | Barrier:
        """The task or barrier numbered ``task_id``; IndexError if there is none (yet)."""
        if not 0 <= task_id < self._next_id:
            raise IndexError(f"no task {task_id}: the lines read number 0 to {self._next_id - 1}")
        entry = self._entries[bisect.bisect_right(self._first_ids, task_id) - 1]
        if isinstance(entry, Repeat):
            return entry.task(task_id)
        return entry

    def submit(self, item: bytes | str) -> list[Entry | PerEngine]:
        """One line submitted to a running batch: as :meth:`feed`, but a refused line changes nothing.

        The line must not hold a line end.  Raises :class:`TaskFileError`; the
        reader stays usable, and the next line gets the refused one's number.
        """
        if self._broken is not None:
            raise self._broken
        if isinstance(item, str):
            item = item.encode("utf-8", "surrogateescape")
        if b"\n" in item or b"\r" in item:
            raise TaskFileError(self._line + 1, "a submitted line holds a line end; submit one line at a time")
        saved = (self._line, self._engine_lists_closed)
        try:
            return self._feed(item)
        except TaskFileError:
            # Every check in _read_piece comes before its change, so the line's number and
            # the PERENGINE block's state are all a refused single piece can have changed.
            self._line, self._engine_lists_closed = saved
            raise

    def feed(self, item: bytes | str) -> list[Entry | PerEngine]:
        """Read one stream item; returns what it adds, in order.

        ``item`` may hold several lines (cut at ``\\n``, ``\\r``, ``\\r\\n``);
        they share its line number, as in disBatch.  ``str`` is encoded as
        UTF-8 (``surrogateescape``, so text decoded that way round-trips).
        """
        if self._broken is not None:
            raise self._broken
        if isinstance(item, str):
            item = item.encode("utf-8", "surrogateescape")
        try:
            return self._feed(item)
        except TaskFileError as e:
            self._broken = e
            raise

    def _feed(self, item: bytes) -> list[Entry | PerEngine]:
        self._line += 1
        added: list[Entry | PerEngine] = []
        for piece in item.splitlines():
            self._read_piece(piece, added)
        return added

    def result(self) -> TaskFile:
        """Everything read so far, as a :class:`TaskFile`."""
        if self._broken is not None:
            raise self._broken
        return TaskFile(
            name=self._name,
            entries=tuple(self._entries),
            engine_start=tuple(p for p in self._per_engine if p.event is EngineEvent.START),
            engine_stop=tuple(p for p in self._per_engine if p.event is EngineEvent.STOP),
            notices=tuple(self._notices),
            id_count=self._next_id,
        )

    def _read_piece(self, piece: bytes, added: list[Entry | PerEngine]) -> None:
        directive = piece.startswith(_DIRECTIVE)
        if not directive and _COMMENT.match(piece):
            return
        if directive:
            if (m := _PERENGINE.fullmatch(piece)) is not None:
                added.append(self._per_engine_command(m))
                return
            if (m := _PREFIX.fullmatch(piece)) is not None:
                self._prefix = m.group(1)
                return
            if (m := _SUFFIX.fullmatch(piece)) is not None:
                self._suffix = m.group(1)
                return
        # Anything else ends the PERENGINE block, even a directive that is skipped.
        self._engine_lists_closed = True
        if directive:
            if (m := _REPEAT.fullmatch(piece)) is not None:
                repeat = self._repeat(m)
                if repeat is not None:
                    added.append(repeat)
                return
            if piece.startswith(_BARRIER):
                added.append(self._barrier(piece))
                return
            if (m := _AFTER.fullmatch(piece)) is not None:
                self._pending_after += self._after(m.group(1))
                return
            if piece.startswith(_DIRECTIVE + b" "):
                self._notices.append(Notice(line=self._line, text=piece, reason="unknown #DISBATCH directive, skipped"))
                return
        # A task (a line such as '#DISBATCHX' is one too: bash reads it as a comment).
        task = Task(
            task_id=self._next_id,
            line=self._line,
            repeat_index=-1,
            command=self._command(piece),
            after=_merged(self._pending_after),
        )
        self._add(task)
        added.append(task)

    def _per_engine_command(self, m: re.Match[bytes]) -> PerEngine:
        if self._engine_lists_closed:
            raise TaskFileError(
                self._line,
                "#DISBATCH PERENGINE must come before the first task or other directive "
                "(only comments, PREFIX and SUFFIX may precede it); move it to the top of the file",
            )
        event = EngineEvent(m.group(1).upper().decode("ascii"))
        command = PerEngine(
            event=event, index=self._engine_counts[event], line=self._line, command=self._command(m.group(2))
        )
        self._engine_counts[event] += 1
        self._per_engine.append(command)
        return command

    def _repeat(self, m: re.Match[bytes]) -> Repeat | None:
        count = self._number(m.group("count"), "count")
        start = self._number(m.group("start") or b"0", "start")
        step = self._number(m.group("step") or b"1", "step")
        command = self._command(m.group("command") or b"")
        if count == 0:
            return None
        self._reserve(count)
        repeat = Repeat(
            first_id=self._next_id,
            line=self._line,
            count=count,
            start=start,
            step=step,
            command=command,
            after=_merged(self._pending_after),
        )
        self._append(repeat, count)
        return repeat

    def _after(self, text: bytes) -> list[tuple[int, int]]:
        """The task-id ranges of the lines an AFTER names; TaskFileError for a line that made no task."""
        refs = [r for r in _AFTER_SEPARATORS.split(text) if r]
        if not refs:
            raise TaskFileError(
                self._line, "#DISBATCH AFTER names no line; give earlier line numbers, e.g. AFTER 3 5-7"
            )
        ranges = []
        for ref in refs:
            m = _AFTER_REF.fullmatch(ref)
            if m is None or len(ref) > 2 * _MAX_NUMBER_DIGITS + 1:
                raise TaskFileError(self._line, f"#DISBATCH AFTER: {ref!r:.60} is not a line number or range a-b")
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
            if not 1 <= first <= last < self._line:
                raise TaskFileError(
                    self._line, f"#DISBATCH AFTER {ref.decode()}: name earlier lines (1 to {self._line - 1}), low-high"
                )
            lo = bisect.bisect_left(self._entry_lines, first)
            hi = bisect.bisect_right(self._entry_lines, last)
            before = self._task_entries[lo - 1] if lo > 0 else 0
            if hi == lo or self._task_entries[hi - 1] == before:
                raise TaskFileError(self._line, f"#DISBATCH AFTER {ref.decode()}: no task was made on that line")
            # The ids from the first entry's to the last's: barriers among them are met before the dependent starts.
            ranges.append((self._first_ids[lo], self._first_ids[hi - 1] + _size(self._entries[hi - 1])))
        return ranges

    def _barrier(self, piece: bytes) -> Barrier:
        # 'BARRIER', then optionally ' CHECK', then optionally ' key'; whatever
        # else follows is ignored (disBatch reads '#DISBATCH BARRIERS' as a barrier).
        rest = piece[len(_BARRIER) :]
        check = rest.startswith(b" CHECK")
        if check:
            rest = rest[len(b" CHECK") :]
        key = rest[1:] if rest.startswith(b" ") else None
        barrier = Barrier(task_id=self._next_id, line=self._line, check=check, key=key, text=piece)
        self._add(barrier)
        return barrier

    def _add(self, entry: Task | Barrier) -> None:
        self._reserve(1)
        self._append(entry, 1)

    def _append(self, entry: Entry, count: int) -> None:
        makes_tasks = not isinstance(entry, Barrier)
        self._first_ids.append(self._next_id)
        self._entry_lines.append(entry.line)
        self._task_entries.append((self._task_entries[-1] if self._task_entries else 0) + makes_tasks)
        self._entries.append(entry)
        self._next_id += count
        if makes_tasks:
            self._pending_after = []

    def _reserve(self, count: int) -> None:
        if self._next_id + count > self._max_tasks:
            raise TaskFileError(
                self._line,
                f"this line brings the file to {self._next_id + count} tasks, more than the limit of "
                f"{self._max_tasks}; split the work into several runs or raise max_tasks",
            )

    def _number(self, digits: bytes, what: str) -> int:
        if len(digits) > _MAX_NUMBER_DIGITS:
            raise TaskFileError(self._line, f"REPEAT {what} has {len(digits)} digits, more than any run can use")
        return int(digits)

    def _command(self, text: bytes) -> bytes:
        command = self._prefix + text + self._suffix
        if b"\0" in command:
            raise TaskFileError(
                self._line, "the command holds a NUL byte, which no shell command can contain; remove it"
            )
        return command


def parse_taskfile(text: bytes | str, *, name: str, max_tasks: int = DEFAULT_MAX_TASKS) -> TaskFile:
    """Read a whole task file.

    ``text`` is the file's content (``str`` is encoded as UTF-8 with
    ``surrogateescape``); ``name`` is the task file's base name
    (``DISBATCH_NAMETASKS``).  Returns a :class:`TaskFile`; raises
    :class:`TaskFileError` naming the line of the first thing that cannot
    run: a misplaced PERENGINE, a NUL byte in a command, more than
    ``max_tasks`` task ids, an AFTER naming no earlier task.
    """
    return read_taskfile(text, name=name, max_tasks=max_tasks).result()


def read_taskfile(text: bytes | str, *, name: str, max_tasks: int = DEFAULT_MAX_TASKS) -> TaskFileReader:
    """:func:`parse_taskfile`, returning the reader, so that more lines can be submitted to it."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    reader = TaskFileReader(name, max_tasks)
    # Lines of a file end at '\n' only; the reader cuts each at '\r' as well.
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for line in lines:
        reader.feed(line)
    return reader
