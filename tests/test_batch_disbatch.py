"""Side by side with disBatch itself: the same task files, status lines and resume decisions.

The disbatch package is a test-only dependency; these tests skip without it.
The first part calls disBatch's own reader and writer in this process; the
last part runs ``disbatch -s localhost:2`` for real and compares its status
file field by field.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_batch_statusfile import records

from tasksprint.batch.env import task_environment
from tasksprint.batch.statusfile import (
    STATUS_HEADER,
    Outcome,
    RecordKind,
    ResumeMismatch,
    Run,
    Skip,
    StatusRecord,
    barrier_record,
    dependency_failed_record,
    format_status_line,
    parse_status_file,
    parse_status_line,
    resume_decision,
    resume_index,
    snippet,
)
from tasksprint.batch.taskfile import (
    Barrier,
    PerEngine,
    Task,
    TaskFile,
    TaskFileError,
    parse_taskfile,
)

disbatch = pytest.importorskip("disbatch.disBatch")

_KIND_LETTER = {
    RecordKind.TASK: "N",
    RecordKind.PER_ENGINE: "P",
    RecordKind.SKIPPED: "S",
    RecordKind.ZOMBIE: "Z",
    RecordKind.BARRIER: "B",
    RecordKind.CHECK_BARRIER: "C",
}


@pytest.fixture(autouse=True, scope="module")
def quiet_disbatch() -> Iterator[None]:
    # disBatch logs what it skips; the assertions here say what matters.
    log = logging.getLogger("DisBatch")
    was = log.disabled
    log.disabled = True
    yield
    log.disabled = was


# The task-file reader, against disBatch's TaskGenerator.


def disbatch_read(data: bytes) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """disBatch's reading of ``data``: (tasks and barriers in order, PERENGINE commands)."""
    ordered: list[tuple[object, ...]] = []
    per_engine: list[tuple[object, ...]] = []
    for t in disbatch.TaskGenerator(iter(io.BytesIO(data))):
        if t.kind == "N":
            ordered.append(("task", t.taskId, t.taskStreamIndex, t.taskRepIndex, t.taskCmd))
        elif t.kind in "BC":
            ordered.append((t.kind, t.taskId, t.taskStreamIndex, t.taskCmd, t.bKey))
        elif t.kind == "P" and t.taskCmd != b"#ENDLIST":
            when = "START" if " START " in t.taskKey else "STOP"
            per_engine.append((when, t.taskId, t.taskStreamIndex, t.taskCmd))
    return ordered, sorted(per_engine)


def our_read(tf: TaskFile) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    ordered: list[tuple[object, ...]] = []
    for r in tf.records():
        if isinstance(r, Task):
            ordered.append(("task", r.task_id, r.line, r.repeat_index, r.command))
        else:
            ordered.append(("C" if r.check else "B", r.task_id, r.line, r.text, r.key))
    per_engine = [(p.event.value, p.index, p.line, p.command) for p in (*tf.engine_start, *tf.engine_stop)]
    return ordered, sorted(per_engine)


_LEADS = ["#DISBATCH ", "#DISBATCH ", "#DISBATCH ", "#DISBATCH", "#DISBATCH  ", "#disbatch ", "  #", "", ""]
_WORDS = [
    "PREFIX ",
    "Prefix ",
    "PREFIX",
    "SUFFIX ",
    "suffix ",
    "REPEAT ",
    "repeat\t",
    "REPEAT",
    "BARRIER",
    "barrier",
    "BARRIER CHECK",
    "BARRIER CHECK ",
    "BARRIERS",
    "PERENGINE START ",
    "PERENGINE STOP ",
    "PERENGINE START",
    "perengine STOP ",
    "FOO ",
    "",
]
_TOKENS = [
    "",
    " ",
    "  ",
    "\t",
    "0",
    "1",
    "2",
    "3",
    "12",
    "start ",
    "START ",
    "step ",
    "Step ",
    "echo",
    "x",
    "$",
    ";",
    "'",
    "#",
    "CHECK",
    " CHECK",
    "\r",
    "\xff",
    "é",
    "key",
]


@st.composite
def task_file_lines(draw: st.DrawFn) -> bytes:
    lead = draw(st.sampled_from(_LEADS))
    word = draw(st.sampled_from(_WORDS)) if lead.startswith("#") else ""
    rest = "".join(draw(st.lists(st.sampled_from(_TOKENS), max_size=6)))
    return (lead + word + rest).encode("latin-1" if "\xff" in rest else "utf-8")


@settings(max_examples=400)
@given(st.lists(task_file_lines(), max_size=20), st.booleans())
def test_task_files_read_as_disbatch_reads_them(lines: list[bytes], final_newline: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    error: TaskFileError | None = None
    try:
        ours = our_read(parse_taskfile(data, name="Tasks", max_tasks=5000))
    except TaskFileError as e:
        # A misplaced PERENGINE is checked below; too many tasks would only make disBatch slow.
        assume("PERENGINE" in e.reason)
        error = e
    try:
        expected = disbatch_read(data)
    except KeyError:
        # disBatch crashes on 'PERENGINE start' in lower case; TaskSprint accepts it.
        assume(False)
    if error is not None:
        # disBatch logs a misplaced PERENGINE and stops reading there.
        before = b"".join(line + b"\n" for line in data.split(b"\n")[: error.line - 1])
        assert our_read(parse_taskfile(before, name="Tasks")) == expected
    else:
        assert ours == expected


def test_readme_example_reads_as_disbatch_reads_it() -> None:
    data = (
        b"#DISBATCH PREFIX ( cd /path/to/workdir ; source SetupEnv ; myprog \n"
        b"#DISBATCH SUFFIX ) &> task_${DISBATCH_TASKID}.log\n"
        b"-a 0 -b 0 -c 0\n-a 0 -b 0 -c 1\n#DISBATCH REPEAT 5 start 100 step 50 -a 9\n#DISBATCH BARRIER CHECK\n"
    )
    assert our_read(parse_taskfile(data, name="Tasks")) == disbatch_read(data)


def test_after_lines_leave_the_file_as_disbatch_reads_it() -> None:
    # disBatch logs '#DISBATCH AFTER' as an unknown directive and skips it: the same tasks, without the order.
    data = b"echo a\n#DISBATCH REPEAT 2 echo r\n#DISBATCH AFTER 1 2\necho b\n#DISBATCH after 4\necho c\n"
    tf = parse_taskfile(data, name="Tasks")
    assert our_read(tf) == disbatch_read(data)
    assert [r.after for r in tf.records() if isinstance(r, Task)] == [(), (), (), ((0, 3),), ((3, 4),)]


# Status lines, against disBatch's TaskReport.


def disbatch_report(record: StatusRecord) -> object:
    info = disbatch.TaskInfo(
        record.task_id, record.line, record.repeat_index, record.command, "", kind=_KIND_LETTER[record.kind]
    )
    return disbatch.TaskReport(
        info,
        record.node,
        record.pid,
        record.exit_code,
        record.start,
        record.finish,
        record.out_bytes,
        record.out_snippet,
        record.err_bytes,
        record.err_snippet,
    )


@settings(max_examples=300)
@given(records(tuple(_KIND_LETTER)))
def test_status_lines_are_written_as_disbatch_writes_them(record: StatusRecord) -> None:
    assert format_status_line(record) == str(disbatch_report(record))


@settings(max_examples=300)
@given(records(tuple(_KIND_LETTER)))
def test_status_lines_are_read_as_disbatch_reads_them(record: StatusRecord) -> None:
    # disBatch reads a non-UTF-8 command back only when Python quoted it with '.
    assume(not str(disbatch_report(record)).split("\t", 14)[14].startswith('b"'))
    line = format_status_line(record)
    theirs = disbatch.TaskReport(line)
    ours = parse_status_line(line)
    assert ours is not None
    ti = theirs.taskInfo
    assert (ti.kind, ti.taskId, ti.taskStreamIndex, ti.taskRepIndex, ti.taskCmd) == (
        _KIND_LETTER[ours.kind],
        ours.task_id,
        ours.line,
        ours.repeat_index,
        ours.command,
    )
    assert (theirs.host, theirs.pid, theirs.returncode, theirs.start, theirs.end) == (
        ours.node,
        ours.pid,
        ours.exit_code,
        ours.start,
        ours.finish,
    )
    assert (theirs.outbytes, theirs.outdata, theirs.errbytes, theirs.errdata) == (
        ours.out_bytes,
        ours.out_snippet,
        ours.err_bytes,
        ours.err_snippet,
    )


def test_a_dependency_failed_line_reads_in_disbatch_as_a_failed_task() -> None:
    # 'D' (TaskSprint's #DISBATCH AFTER) is not one of disBatch's kinds: it reads the line as a
    # plain task that failed, so its resume reruns the task with -R; ours reruns it without.
    task = Task(task_id=3, line=4, repeat_index=-1, command=b"echo c", after=((0, 1),))
    line = format_status_line(dependency_failed_record(task, node="n", at=5.0))
    assert line.startswith("R  D\t3\t4\t-1\tn\t0\t-1\t")
    theirs = disbatch.TaskReport(line)
    assert (theirs.taskInfo.kind, theirs.returncode, theirs.taskInfo.taskCmd) == ("N", -1, b"echo c")
    ours = parse_status_line(line)
    assert ours is not None and ours.kind is RecordKind.DEPENDENCY_FAILED and ours.exit_code == -1
    assert resume_index([parse_status_file(line.encode() + b"\n")]) == {}


def disbatch_snippet(data: bytes) -> str:
    read_end, write_end = os.pipe()
    # The data fits in the pipe's buffer, so it is all written before disBatch reads.
    assert len(data) < 16384
    os.write(write_end, data)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        collector = disbatch.OutputCollector(pipe, 40, 40)
        collector.stop()
    assert collector.bytes == len(data)
    return collector.data().decode("utf-8", "replace")


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode), st.binary(min_size=4000, max_size=9000))
)
def test_snippets_are_cut_as_disbatch_cuts_them(data: bytes) -> None:
    assert snippet(data) == disbatch_snippet(data)


# Resume, against disBatch's parseStatusFiles and statusTaskFilter.


def disbatch_resume(task_file: bytes, status_files: list[Path], *, retry: bool, force: bool) -> list[object]:
    status = disbatch.parseStatusFiles(*status_files)
    out: list[object] = []
    try:
        for t in disbatch.statusTaskFilter(disbatch.TaskGenerator(iter(io.BytesIO(task_file))), status, retry, force):
            if t.kind == "S":
                out.append(str(t.skipInfo))
            elif t.kind == "N":
                out.append("run")
    except Exception as e:
        if "Recovery status file task mismatch" not in str(e):
            raise
        out.append("mismatch")
    return out


def our_resume(task_file: bytes, status_files: list[Path], *, retry: bool, force: bool) -> list[object]:
    earlier = resume_index(parse_status_file(p.read_bytes()) for p in status_files)
    out: list[object] = []
    for r in parse_taskfile(task_file, name="Tasks").records():
        if isinstance(r, Barrier):
            continue
        try:
            decision = resume_decision(r, earlier, retry=retry, force=force)
        except ResumeMismatch:
            out.append("mismatch")
            break
        out.append("run" if isinstance(decision, Run) else format_status_line(decision.record))
    return out


@st.composite
def resume_cases(draw: st.DrawFn) -> tuple[bytes, list[list[StatusRecord]]]:
    commands = draw(st.lists(st.sampled_from(["a", "b", "c", "#DISBATCH REPEAT 2 r"]), min_size=1, max_size=6))
    task_file = "".join(c + "\n" for c in commands).encode()
    tasks = [r for r in parse_taskfile(task_file, name="Tasks").records() if isinstance(r, Task)]
    runs = []
    for _ in range(draw(st.integers(1, 3))):
        lines = []
        for task in draw(st.lists(st.sampled_from(tasks), max_size=len(tasks) + 2)):
            kind = draw(st.sampled_from([RecordKind.TASK] * 4 + [RecordKind.SKIPPED, RecordKind.PER_ENGINE]))
            code = draw(st.sampled_from([0, 0, 1, 2, -9]))
            if draw(st.integers(0, 9)) == 0:
                task = attrs.evolve(task, command=task.command + b" changed")
            start = draw(st.integers(0, 10**6)) / 1000
            outcome = Outcome(
                node=draw(st.sampled_from(["n1", "n2"])),
                pid=7,
                exit_code=code,
                start=start,
                finish=start + draw(st.integers(0, 5000)) / 1000,
            )
            lines.append(attrs.evolve(outcome.record(task), kind=kind))
        runs.append(lines)
    return task_file, runs


@settings(max_examples=150, deadline=None)
@given(resume_cases(), st.booleans(), st.booleans())
def test_resume_decides_as_disbatch_decides(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[bytes, list[list[StatusRecord]]],
    retry: bool,
    force: bool,
) -> None:
    task_file, runs = case
    directory = tmp_path_factory.mktemp("resume")
    files = []
    for n, lines in enumerate(runs):
        path = directory / f"run{n}_status.txt"
        path.write_text("".join(format_status_line(r) + "\n" for r in lines), encoding="utf-8")
        files.append(path)
    assert our_resume(task_file, files, retry=retry, force=force) == disbatch_resume(
        task_file, files, retry=retry, force=force
    )


# A real disBatch run, field by field.

TASK_FILE = b"".join(
    line + b"\n"
    for line in [
        b"# A task file using every directive.",
        b"#DISBATCH PERENGINE START echo start engine $DISBATCH_ENGINE_RANK",
        b"#DISBATCH PREFIX echo pre $DISBATCH_TASKID_ZP $DISBATCH_STREAM_INDEX_ZP;",
        b"echo plain",
        b"#DISBATCH SUFFIX ; echo post $DISBATCH_REPEAT_INDEX_ZP $DISBATCH_NAMETASKS $DISBATCH_JOBID",
        b"#DISBATCH REPEAT 3 start 5 step 2 seq 1 $DISBATCH_REPEAT_INDEX",
        b"#DISBATCH BARRIER done_key",
        b"#DISBATCH PREFIX ",
        b"#DISBATCH SUFFIX ",
        b"env | grep ^DISBATCH_ | grep -v ^DISBATCH_KVSSTCP_HOST= | sort > env_$DISBATCH_TASKID.txt",
        b"printf 'caf\\xc3\\xa9 \\xff' ; true",
        b"true caf\xe9 in Latin-1",
        b"   # an indented comment",
        b"#DISBATCH FOO unknown directives are skipped",
        b"#DISBATCH BARRIER",
        b"exit 3",
        b"echo to stderr $(seq 1 40) >&2",
        b"#DISBATCH BARRIER CHECK",
        b"never runs: the CHECK barrier ends the run after exit 3",
    ]
)


def run_disbatch(directory: Path, prefix: str, *args: str) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "disbatch", "-s", "localhost:2", "-p", prefix, *args, "Tasks"],
        check=False,
        cwd=directory,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    status = directory / f"{prefix}_status.txt"
    if not status.exists():
        pytest.skip(f"disbatch cannot run here (exit {result.returncode}): {result.stderr[-500:]!r}")
    return status


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("disbatch")
    (directory / "Tasks").write_bytes(TASK_FILE)
    first = run_disbatch(directory, "run1", "--status-header")
    (directory / "Tasks").write_bytes(TASK_FILE + b"echo appended\n")
    second = run_disbatch(directory, "run2", "-r", "run1_status.txt")
    return directory, first, second


def check_fields(ours: str, theirs: str) -> None:
    """Every field equal, but the elapsed time: disBatch computes it from unrounded times."""
    a, b = ours.split("\t", 14), theirs.split("\t", 14)
    assert a[:7] + a[8:] == b[:7] + b[8:]
    assert abs(float(a[7]) - float(b[7])) <= 0.0015


def run_locally(command: bytes, env: dict[str, str], directory: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["/bin/bash", "-c", command],
        env={**os.environ, **env},
        cwd=directory,
        check=False,
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_every_status_field_matches_a_real_disbatch_run(real_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, first, _ = real_run
    lines = first.read_text(encoding="utf-8").splitlines()
    assert lines[0] == STATUS_HEADER
    tf = parse_taskfile(TASK_FILE, name="Tasks")
    env_of: dict[str, Any] = {"job_id": "run1", "taskfile_name": "Tasks", "engine_rank": 0, "cores_per_task": 1}
    seen = set()
    for line in lines[1:]:
        theirs = parse_status_line(line)
        assert theirs is not None
        seen.add((theirs.kind, theirs.task_id))
        if theirs.kind in (RecordKind.BARRIER, RecordKind.CHECK_BARRIER):
            barrier = tf.record(theirs.task_id)
            assert isinstance(barrier, Barrier)
            ours = barrier_record(barrier, node=theirs.node, pid=theirs.pid, start=theirs.start, finish=theirs.finish)
            check_fields(format_status_line(ours), line)
            continue
        task: Task | PerEngine
        if theirs.kind is RecordKind.PER_ENGINE:
            task = tf.engine_start[theirs.task_id]
        else:
            task = tf.record(theirs.task_id)  # type: ignore[assignment]
        # Run the same command with our environment: same output, so same byte counts and snippets.
        env = task_environment(task, slot_rank=-1 if isinstance(task, PerEngine) else 0, **env_of)
        done = run_locally(task.command, env, tmp_path)
        outcome = Outcome(
            node=theirs.node,
            pid=theirs.pid,
            exit_code=done.returncode,
            start=theirs.start,
            finish=theirs.finish,
            out_bytes=len(done.stdout),
            out_snippet=snippet(done.stdout),
            err_bytes=len(done.stderr),
            err_snippet=snippet(done.stderr),
        )
        check_fields(format_status_line(outcome.record(task)), line)
    # Everything up to the CHECK barrier ran, and nothing after it.
    check = next(r for r in tf.records() if isinstance(r, Barrier) and r.check)
    assert seen == {(RecordKind.PER_ENGINE, 0)} | {
        (
            RecordKind.TASK if isinstance(r, Task) else RecordKind.CHECK_BARRIER if r.check else RecordKind.BARRIER,
            r.task_id,
        )
        for r in tf.records()
        if r.task_id <= check.task_id
    }


@pytest.mark.slow
def test_task_environment_matches_a_real_disbatch_run(real_run: tuple[Path, Path, Path]) -> None:
    directory, _, _ = real_run
    tf = parse_taskfile((directory / "Tasks").read_bytes(), name="Tasks")
    task = next(r for r in tf.records() if isinstance(r, Task) and r.command.startswith(b"env "))
    theirs = dict(line.split("=", 1) for line in (directory / f"env_{task.task_id}.txt").read_text().splitlines())
    ours = task_environment(
        task,
        job_id="run1",
        taskfile_name="Tasks",
        engine_rank=0,
        slot_rank=int(theirs["DISBATCH_CYLINDER_RANK"]),
        cores_per_task=1,
    )
    assert ours == theirs


@pytest.mark.slow
def test_resume_matches_a_real_disbatch_run(real_run: tuple[Path, Path, Path]) -> None:
    directory, first, second = real_run
    tf = parse_taskfile((directory / "Tasks").read_bytes(), name="Tasks")
    earlier = resume_index([parse_status_file(first.read_bytes())])
    skipped = {}
    for line in second.read_text(encoding="utf-8").splitlines():
        record = parse_status_line(line)
        assert record is not None
        if record.kind is RecordKind.SKIPPED:
            skipped[record.task_id] = line
    decided = {}
    check = next(r for r in tf.records() if isinstance(r, Barrier) and r.check)
    for r in tf.records():
        if isinstance(r, Task) and r.task_id < check.task_id:
            decision = resume_decision(r, earlier)
            if isinstance(decision, Skip):
                decided[r.task_id] = format_status_line(decision.record)
    # Skipped lines repeat the earlier ones exactly, elapsed recomputed from the rounded times as disBatch does.
    assert decided == skipped
    assert resume_decision(tf.record(tf.id_count - 1), earlier) == Run()  # type: ignore[arg-type]


@pytest.mark.slow
def test_tasksprint_batch_writes_the_status_lines_a_real_disbatch_run_wrote(
    real_run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, first, _ = real_run
    (tmp_path / "Tasks").write_bytes(TASK_FILE)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasksprint.cli",
            "batch",
            "-s",
            "localhost:2",
            "-p",
            "run1",
            "--status-header",
            "Tasks",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stderr.decode()  # the CHECK barrier ends both runs
    ours_lines = (tmp_path / "run1_status.txt").read_text(encoding="utf-8").splitlines()
    theirs_lines = first.read_text(encoding="utf-8").splitlines()
    assert ours_lines[0] == theirs_lines[0] == STATUS_HEADER

    def by_id(lines: list[str]) -> dict[tuple[RecordKind, int], list[str]]:
        out = {}
        for line in lines[1:]:
            record = parse_status_line(line)
            assert record is not None
            fields = line.split("\t", 14)
            # Not compared: node, pid, elapsed, start, finish (where and when it ran).
            out[(record.kind, record.task_id)] = fields[:4] + fields[6:7] + fields[10:]
        return out

    assert by_id(ours_lines) == by_id(theirs_lines)
    # The same environment, but the slot (TaskSprint does not number an engine's slots).
    for env_file in sorted(first.parent.glob("env_*.txt")):
        theirs = [v for v in env_file.read_text().splitlines() if not v.startswith("DISBATCH_CYLINDER_RANK=")]
        assert (tmp_path / env_file.name).read_text().splitlines() == theirs
