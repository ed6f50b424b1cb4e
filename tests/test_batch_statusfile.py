"""The status file: line format, reading back, and the resume decision."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasksprint.batch.statusfile import (
    STATUS_HEADER,
    Outcome,
    RecordKind,
    ResumeMismatch,
    Run,
    Skip,
    StatusLineError,
    StatusRecord,
    barrier_record,
    format_status_line,
    parse_status_file,
    parse_status_line,
    resume_decision,
    resume_index,
    snippet,
)
from tasksprint.batch.taskfile import Barrier, EngineEvent, PerEngine, Task

TASK = Task(task_id=314, line=315, repeat_index=-1, command=b"cd /w ; myprog -a 3 > task_3.log 2>&1")


def outcome(**changes: Any) -> Outcome:
    base = Outcome(node="worker032", pid=8016, exit_code=0, start=1458660919.78, finish=1458660929.83)
    return attrs.evolve(base, **changes)


def test_a_task_line_has_the_fifteen_fields_of_the_manual() -> None:
    line = format_status_line(outcome().record(TASK))
    assert line == (
        "    \t314\t315\t-1\tworker032\t8016\t0\t10.050\t1458660919.780\t1458660929.830\t0\t''\t0\t''\t"
        "cd /w ; myprog -a 3 > task_3.log 2>&1"
    )
    assert len(line.split("\t")) == 15


@pytest.mark.parametrize(
    ("changes", "flags"),
    [
        ({}, "    "),
        ({"exit_code": 3}, "R   "),
        ({"exit_code": -9}, "R   "),
        ({"out_bytes": 1, "out_snippet": "x"}, " O  "),
        ({"err_bytes": 1, "err_snippet": "x"}, "  E "),
        ({"exit_code": 1, "out_bytes": 5, "err_bytes": 2}, "ROE "),
    ],
)
def test_task_flags_say_exit_code_and_leaked_output(changes: dict[str, Any], flags: str) -> None:
    assert outcome(**changes).record(TASK).flags == flags


def test_per_engine_skipped_and_barrier_flags() -> None:
    pe = PerEngine(event=EngineEvent.STOP, index=2, line=3, command=b"cleanup")
    record = outcome(out_bytes=4).record(pe)
    assert (record.flags, record.task_id, record.repeat_index) == (" O P", 2, -1)
    assert attrs.evolve(outcome(exit_code=1).record(TASK), kind=RecordKind.SKIPPED).flags == "R  S"
    barrier = Barrier(task_id=7, line=10, check=True, key=b"k", text=b"#DISBATCH BARRIER CHECK k")
    line = format_status_line(barrier_record(barrier, node="vm", pid=76, start=1.0, finish=2.5))
    assert line == "C    \t7\t10\t-1\tvm\t76\t0\t1.500\t1.000\t2.500\t0\t''\t0\t''\t#DISBATCH BARRIER CHECK k"
    plain = attrs.evolve(barrier, check=False)
    assert barrier_record(plain, node="vm", pid=1, start=0, finish=0).flags == "B    "


def test_snippet_keeps_forty_bytes_from_each_end() -> None:
    assert snippet(b"") == ""
    assert snippet(b"hello\n") == "hello\n"
    data = bytes(range(48, 48 + 40))
    assert snippet(data) == data.decode()
    assert snippet(data + b"Z") == data.decode() + "...Z"
    long = b"a" * 40 + b"b" * 100 + b"c" * 40
    assert snippet(long) == "a" * 40 + "..." + "c" * 40
    # Cut multi-byte characters and undecodable bytes become U+FFFD.
    assert snippet("é".encode() * 21) == "é" * 20 + "...é"
    assert snippet(b"a" + "é".encode() * 20) == "a" + "é" * 19 + "\ufffd...\ufffd"
    assert snippet(b"\xff") == "\ufffd"


def test_snippets_are_python_literals_and_non_utf8_commands_bytes_literals() -> None:
    record = outcome(out_bytes=3, out_snippet="it's\n", err_bytes=1, err_snippet="\t").record(
        attrs.evolve(TASK, command=b"echo \xff\tx")
    )
    fields = format_status_line(record).split("\t", 14)
    assert fields[11] == '"it\'s\\n"'
    assert fields[13] == "'\\t'"
    assert fields[14] == "b'echo \\xff\\tx'"
    assert parse_status_line(format_status_line(record)) == record


def test_the_header_line() -> None:
    assert STATUS_HEADER.split("\t") == [
        "ROE[ PSZ]",
        "TaskID",
        "LineNum",
        "RepeatIndex",
        "Node",
        "PID",
        "ReturnCode",
        "Elapsed",
        "Start",
        "Finish",
        "BytesOfLeakedOutput",
        "OutputSnippet",
        "BytesOfLeakedError",
        "ErrorSnippet",
        "Command",
    ]
    assert parse_status_line(STATUS_HEADER) is None


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)
_MILLIS = st.integers(0, 4_000_000_000_000).map(lambda ms: ms / 1000)


@st.composite
def records(draw: st.DrawFn, kinds: tuple[RecordKind, ...] = tuple(RecordKind)) -> StatusRecord:
    kind = draw(st.sampled_from(kinds))
    command = draw(st.one_of(_TEXT.map(str.encode), st.binary(max_size=40)))
    command = command.replace(b"\n", b" ").replace(b"\r", b" ")
    if command.startswith((b"b'", b'b"')):  # text that reads as a bytes literal is ambiguous, as in disBatch
        command = b" " + command
    return StatusRecord(
        kind=kind,
        task_id=draw(st.integers(0, 10**9)),
        line=draw(st.integers(1, 10**9)),
        repeat_index=draw(st.integers(-1, 10**9)),
        node=draw(st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True)),
        pid=draw(st.integers(-1, 2**22)),
        exit_code=draw(st.integers(-255, 255)),
        start=draw(_MILLIS),
        finish=draw(_MILLIS),
        out_bytes=draw(st.integers(0, 10**12)),
        out_snippet=draw(_TEXT),
        err_bytes=draw(st.integers(0, 10**12)),
        err_snippet=draw(_TEXT),
        command=command,
    )


@settings(max_examples=300)
@given(records())
def test_status_line_round_trip(record: StatusRecord) -> None:
    line = format_status_line(record)
    assert "\n" not in line and len(line.split("\t", 14)) == 15
    assert parse_status_line(line) == record
    assert format_status_line(parse_status_line(line)) == line  # type: ignore[arg-type]


def test_status_file_reading_skips_the_header_and_reports_bad_lines() -> None:
    good = format_status_line(outcome().record(TASK))
    data = "\n".join([STATUS_HEADER, good, "garbage", good.replace("\t315\t", "\tx\t"), good]).encode()
    data += b"\r\n" + b"\xff" + good.encode() + b"\r" + good.encode()
    status = parse_status_file(data)
    assert len(status.records) == 3
    assert [n for n, _ in status.rejected] == [3, 4, 6]
    assert "line number" in status.rejected[1][1]
    assert "UTF-8" in status.rejected[2][1]
    assert parse_status_file(b"").records == ()


@pytest.mark.parametrize(
    "line",
    [
        "",
        "\t" * 13,
        "  \t1\t1\t-1\tn\t1\t0\t0\t0\t0\t0\t''\t0\t''\tcmd",  # flags too short
        "X   \t1\t1\t-1\tn\t1\t0\t0\t0\t0\t0\t''\t0\t''\tcmd",  # no such kind
        "    \t1\t1\t-1\tn\t1\t0\t0\t0\t0\t0\t__import__('os')\t0\t''\tcmd",
        "    \t1\t1\t-1\tn\t1\t0\t0\t0\t0\t0\t''+''\t0\t''\tcmd",
        "    \t1\t1\t-1\tn\t1\t0\t0\tnan\t0\t0\t''\t0\t''\tcmd",
        "    \t1\t1\t-1\tn\t1\t0\t0\t0\t0\t0\t''\t0\t''\tb'unterminated",
        "    \t" + "9" * 100_000 + "\t1\t-1\tn\t1\t0\t0\t0\t0\t0\t''\t0\t''\tcmd",
    ],
)
def test_malformed_status_lines_raise_the_typed_error(line: str) -> None:
    with pytest.raises(StatusLineError):
        parse_status_line(line)


def test_hostile_status_file_costs_time_linear_in_its_size() -> None:
    quote = "'" + "\\\\" * 2_000_000 + "'"
    line = f"    \t1\t1\t-1\tn\t1\t0\t0\t0\t0\t4000000\t{quote}\t0\t''\t" + "x" * 10_000_000
    status = parse_status_file((line + "\n" + "\0" * 1_000_000 + "\n").encode())
    assert len(status.records) == 1 and status.records[0].out_snippet == "\\" * 2_000_000
    assert [n for n, _ in status.rejected] == [2]


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_status_reader(data: bytes) -> None:
    status = parse_status_file(data)
    assert len(status.records) + len(status.rejected) <= data.count(b"\n") + data.count(b"\r") + 1


# Resume: -r, -R and --force-resume.


def line_record(task: Task, exit_code: int, **changes: Any) -> StatusRecord:
    return attrs.evolve(outcome(exit_code=exit_code).record(task), **changes)


def tasks(*commands: str) -> list[Task]:
    return [Task(task_id=i, line=i + 1, repeat_index=-1, command=c.encode()) for i, c in enumerate(commands)]


def file_of(*records: StatusRecord) -> bytes:
    return "".join(format_status_line(r) + "\n" for r in records).encode()


def test_resume_skips_what_completed_and_runs_the_rest() -> None:
    t = tasks("touch A", "exit 1", "touch C", "touch D")
    earlier = resume_index(
        [parse_status_file(file_of(line_record(t[0], 0), line_record(t[1], 1), line_record(t[2], 0)))]
    )
    decisions = [resume_decision(task, earlier) for task in t]
    assert [type(d) for d in decisions] == [Skip, Skip, Skip, Run]
    skip = decisions[1]
    assert isinstance(skip, Skip) and not skip.mismatch
    assert skip.record == attrs.evolve(line_record(t[1], 1), kind=RecordKind.SKIPPED)
    assert skip.record.flags == "R  S"


def test_retry_runs_what_failed_again() -> None:
    t = tasks("ok", "fail", "killed")
    earlier = resume_index(
        [parse_status_file(file_of(line_record(t[0], 0), line_record(t[1], 2), line_record(t[2], -9)))]
    )
    assert [type(resume_decision(task, earlier, retry=True)) for task in t] == [Skip, Run, Run]


def test_lowest_exit_code_wins_across_files_and_only_plain_task_lines_count() -> None:
    t = tasks("a", "b", "c", "d")
    run1 = file_of(line_record(t[0], 0), line_record(t[1], 3), line_record(t[2], 1))
    run2 = file_of(
        line_record(t[0], 5),
        line_record(t[1], 0),
        line_record(t[2], 0, kind=RecordKind.SKIPPED),  # skipped lines do not count
        line_record(t[3], 0, kind=RecordKind.PER_ENGINE),
    )
    earlier = resume_index([parse_status_file(run1), parse_status_file(run2)])
    assert {i: r.exit_code for i, r in earlier.items()} == {0: 0, 1: 0, 2: 1}
    assert [type(resume_decision(task, earlier, retry=True)) for task in t] == [Skip, Skip, Run, Run]


def test_ties_keep_the_first_line() -> None:
    t = tasks("a")
    first, second = line_record(t[0], 0, node="first"), line_record(t[0], 0, node="second")
    assert resume_index([parse_status_file(file_of(first, second))])[0].node == "first"


@pytest.mark.parametrize(
    "changed",
    [{"command": b"touch B"}, {"line": 9}, {"repeat_index": 4}],
)
def test_a_skipped_task_must_match_unless_forced(changed: dict[str, Any]) -> None:
    old = Task(task_id=0, line=1, repeat_index=-1, command=b"touch A")
    earlier = resume_index([parse_status_file(file_of(line_record(old, 0)))])
    new = attrs.evolve(old, **changed)
    with pytest.raises(ResumeMismatch) as e:
        resume_decision(new, earlier)
    assert "--force-resume" in str(e.value)
    forced = resume_decision(new, earlier, force=True)
    assert isinstance(forced, Skip) and forced.mismatch
    assert forced.record.command == b"touch A"  # the earlier line is what the status file repeats
    # A task that runs again is not compared at all.
    failed = resume_index([parse_status_file(file_of(line_record(old, 1)))])
    assert resume_decision(new, failed, retry=True) == Run()
