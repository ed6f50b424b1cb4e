"""The task-file language: one test per rule of tasksprint.batch.taskfile, then hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasksprint.batch.taskfile import (
    Barrier,
    EngineEvent,
    PerEngine,
    Repeat,
    Task,
    TaskFile,
    TaskFileError,
    TaskFileReader,
    parse_taskfile,
    read_taskfile,
)


def parse(text: str | bytes, **kwargs: int) -> TaskFile:
    return parse_taskfile(text, name="Tasks", **kwargs)


def commands(tf: TaskFile) -> list[bytes]:
    return [r.command for r in tf.records() if isinstance(r, Task)]


def test_each_line_is_a_task_numbered_from_zero_with_its_line_from_one() -> None:
    tf = parse("echo a\necho b\n")
    assert list(tf.records()) == [
        Task(task_id=0, line=1, repeat_index=-1, command=b"echo a"),
        Task(task_id=1, line=2, repeat_index=-1, command=b"echo b"),
    ]
    assert tf.id_count == 2
    assert tf.name == "Tasks"


def test_empty_file_has_no_tasks() -> None:
    for text in ("", "\n", "# only a comment\n\n   \n"):
        tf = parse(text)
        assert list(tf.records()) == []
        assert tf.id_count == 0
        assert tf.engine_start == tf.engine_stop == ()


def test_comments_and_blank_lines_are_skipped_but_counted_as_lines() -> None:
    tf = parse("# c\n\n   \t\n  # indented\necho x\n#disbatch prefix lower case is a comment\necho y\n")
    assert [(t.task_id, t.line, t.command) for t in tf.records()] == [(0, 5, b"echo x"), (1, 7, b"echo y")]


def test_last_line_without_newline_is_a_task() -> None:
    assert commands(parse("echo a\necho b")) == [b"echo a", b"echo b"]


def test_carriage_returns_split_a_line_into_tasks_sharing_its_line_number() -> None:
    tf = parse(b"echo a\rsecond\r\nthird\n")
    assert [(t.task_id, t.line, t.command) for t in tf.records()] == [
        (0, 1, b"echo a"),
        (1, 1, b"second"),
        (2, 2, b"third"),
    ]


def test_prefix_and_suffix_wrap_later_tasks_and_each_replaces_the_previous() -> None:
    tf = parse(
        "echo plain\n"
        "#DISBATCH PREFIX ( cd /w ; \n"
        "#DISBATCH SUFFIX ) &> log_${DISBATCH_TASKID}\n"
        "run 1\n"
        "#DISBATCH PREFIX time \n"
        "run 2\n"
        "#DISBATCH SUFFIX \n"
        "run 3\n"
    )
    assert commands(tf) == [
        b"echo plain",
        b"( cd /w ; run 1) &> log_${DISBATCH_TASKID}",
        b"time run 2) &> log_${DISBATCH_TASKID}",
        b"time run 3",
    ]


def test_prefix_keyword_is_case_insensitive_but_needs_its_space() -> None:
    tf = parse("#DISBATCH prefix A \n#DISBATCH PREFIX\ntask\n")
    # '#DISBATCH PREFIX' with nothing after it is not a PREFIX: the earlier one stays.
    assert commands(tf) == [b"A task"]
    assert [n.line for n in tf.notices] == [2]


def test_repeat_numbers_every_task_and_its_repeat_index() -> None:
    tf = parse("first\n#DISBATCH REPEAT 3 start 5 step 2 echo $DISBATCH_REPEAT_INDEX\nlast\n")
    assert list(tf.records()) == [
        Task(task_id=0, line=1, repeat_index=-1, command=b"first"),
        Task(task_id=1, line=2, repeat_index=5, command=b"echo $DISBATCH_REPEAT_INDEX"),
        Task(task_id=2, line=2, repeat_index=7, command=b"echo $DISBATCH_REPEAT_INDEX"),
        Task(task_id=3, line=2, repeat_index=9, command=b"echo $DISBATCH_REPEAT_INDEX"),
        Task(task_id=4, line=3, repeat_index=-1, command=b"last"),
    ]
    assert tf.entries[1] == Repeat(first_id=1, line=2, count=3, start=5, step=2, command=b"echo $DISBATCH_REPEAT_INDEX")


def test_repeat_defaults_and_optional_parts() -> None:
    tf = parse(
        "#DISBATCH PREFIX p \n"
        "#DISBATCH REPEAT 2\n"  # no command: the prefix and suffix alone
        "#DISBATCH repeat 2 STEP 10 x\n"  # keywords in any case; step without start
        "#DISBATCH REPEAT 2 start 3\n"
        "#DISBATCH REPEAT 1 step 2 start 5\n"  # start after step is part of the command
        "#DISBATCH REPEAT 0 never\n"
    )
    assert [(t.task_id, t.repeat_index, t.command) for t in tf.records()] == [
        (0, 0, b"p "),
        (1, 1, b"p "),
        (2, 0, b"p x"),
        (3, 10, b"p x"),
        (4, 3, b"p "),
        (5, 4, b"p "),
        (6, 0, b"p start 5"),
    ]
    assert tf.id_count == 7


def test_malformed_repeat_is_an_unknown_directive() -> None:
    tf = parse("#DISBATCH REPEAT x echo\n#DISBATCH REPEAT 3start\nok\n")
    assert commands(tf) == [b"ok"]
    assert [n.line for n in tf.notices] == [1, 2]


def test_barriers_take_a_task_id_and_keep_their_text() -> None:
    tf = parse(
        "a\n#DISBATCH BARRIER\nb\n#DISBATCH BARRIER CHECK\nc\n#DISBATCH BARRIER CHECK done_key\n"
        "#DISBATCH BARRIER key only\n"
    )
    assert list(tf.records()) == [
        Task(task_id=0, line=1, repeat_index=-1, command=b"a"),
        Barrier(task_id=1, line=2, check=False, key=None, text=b"#DISBATCH BARRIER"),
        Task(task_id=2, line=3, repeat_index=-1, command=b"b"),
        Barrier(task_id=3, line=4, check=True, key=None, text=b"#DISBATCH BARRIER CHECK"),
        Task(task_id=4, line=5, repeat_index=-1, command=b"c"),
        Barrier(task_id=5, line=6, check=True, key=b"done_key", text=b"#DISBATCH BARRIER CHECK done_key"),
        Barrier(task_id=6, line=7, check=False, key=b"key only", text=b"#DISBATCH BARRIER key only"),
    ]


def test_barrier_words_are_case_sensitive_and_prefix_free() -> None:
    tf = parse("#DISBATCH barrier\n#DISBATCH BARRIERS\n#DISBATCH BARRIER CHECKED\n#DISBATCH BARRIER  CHECK\n")
    assert tf.notices[0].line == 1
    assert list(tf.records()) == [
        Barrier(task_id=0, line=2, check=False, key=None, text=b"#DISBATCH BARRIERS"),
        Barrier(task_id=1, line=3, check=True, key=None, text=b"#DISBATCH BARRIER CHECKED"),
        Barrier(task_id=2, line=4, check=False, key=b" CHECK", text=b"#DISBATCH BARRIER  CHECK"),
    ]


def test_perengine_commands_are_numbered_apart_and_get_the_prefix() -> None:
    tf = parse(
        "#DISBATCH PERENGINE START echo s0\n"
        "#DISBATCH PREFIX P; \n"
        "#DISBATCH PERENGINE STOP echo t0\n"
        "#DISBATCH perengine start echo s1\n"
        "task\n"
    )
    assert tf.engine_start == (
        PerEngine(event=EngineEvent.START, index=0, line=1, command=b"echo s0"),
        PerEngine(event=EngineEvent.START, index=1, line=4, command=b"P; echo s1"),
    )
    assert tf.engine_stop == (PerEngine(event=EngineEvent.STOP, index=0, line=3, command=b"P; echo t0"),)
    assert list(tf.records()) == [Task(task_id=0, line=5, repeat_index=-1, command=b"P; task")]


@pytest.mark.parametrize(
    "before",
    ["echo task\n", "#DISBATCH BARRIER\n", "#DISBATCH REPEAT 0\n", "#DISBATCH UNKNOWN\n", "#DISBATCHX\n"],
)
def test_perengine_after_the_first_task_or_directive_is_an_error_naming_its_line(before: str) -> None:
    text = "# comment\n#DISBATCH PREFIX x \n" + before + "\n#DISBATCH PERENGINE STOP echo bye\n"
    with pytest.raises(TaskFileError) as e:
        parse(text)
    assert e.value.line == 5
    assert "PERENGINE" in e.value.reason
    assert "line 5" in str(e.value)


def test_unknown_directives_are_skipped_with_a_notice_and_near_misses_are_tasks() -> None:
    tf = parse("#DISBATCH FOO bar\n#DISBATCH  PREFIX two spaces\n#DISBATCHX\n#DISBATCH\n")
    assert [(n.line, n.text) for n in tf.notices] == [(1, b"#DISBATCH FOO bar"), (2, b"#DISBATCH  PREFIX two spaces")]
    # bash reads these as comments, but disBatch runs them as tasks, so they are tasks.
    assert commands(tf) == [b"#DISBATCHX", b"#DISBATCH"]


def test_record_by_task_id_matches_iteration() -> None:
    tf = parse("a\n#DISBATCH REPEAT 4 start 1 b\n#DISBATCH BARRIER\n#DISBATCH REPEAT 2 c\nd\n")
    records = list(tf.records())
    assert [tf.record(i) for i in range(tf.id_count)] == records
    for bad in (-1, tf.id_count):
        with pytest.raises(IndexError):
            tf.record(bad)


def test_str_input_is_read_as_utf8_and_non_utf8_bytes_are_kept() -> None:
    assert commands(parse("echo é\n")) == ["echo é".encode()]
    assert commands(parse(b"echo \xff\xfe\n")) == [b"echo \xff\xfe"]


def test_streaming_reader_returns_what_each_item_adds() -> None:
    reader = TaskFileReader("STREAM")
    assert reader.feed("#DISBATCH PERENGINE START setup") == [
        PerEngine(event=EngineEvent.START, index=0, line=1, command=b"setup")
    ]
    assert not reader.engine_lists_closed
    assert reader.feed("#DISBATCH PREFIX p ") == []
    assert reader.feed("one\ntwo") == [
        Task(task_id=0, line=3, repeat_index=-1, command=b"p one"),
        Task(task_id=1, line=3, repeat_index=-1, command=b"p two"),
    ]
    assert reader.engine_lists_closed
    assert reader.feed("#DISBATCH REPEAT 2") == [Repeat(first_id=2, line=4, count=2, start=0, step=1, command=b"p ")]
    assert reader.id_count == 4
    with pytest.raises(TaskFileError):
        reader.feed("#DISBATCH PERENGINE STOP late")
    # A reader that failed stays failed: later items would be numbered against a broken file.
    with pytest.raises(TaskFileError):
        reader.feed("more")
    with pytest.raises(TaskFileError):
        reader.result()


_PIECES = st.sampled_from(
    [
        "echo a",
        "",
        "# c",
        "  #x",
        "#DISBATCH PREFIX p ",
        "#DISBATCH SUFFIX  s",
        "#DISBATCH PREFIX ",
        "#DISBATCH REPEAT 3 r",
        "#DISBATCH REPEAT 2 start 4 step 3",
        "#DISBATCH BARRIER",
        "#DISBATCH BARRIER CHECK k",
        "#DISBATCH NOPE",
        "a\rb",
        "x\r",
        "#DISBATCH PERENGINE START s",
        "#DISBATCH PERENGINE STOP t",
    ]
)


@given(st.lists(_PIECES, max_size=25))
def test_streaming_and_whole_file_reads_agree(pieces: list[str]) -> None:
    text = "".join(p + "\n" for p in pieces)
    try:
        whole = parse(text)
    except TaskFileError as e:
        reader = TaskFileReader("Tasks")
        with pytest.raises(TaskFileError) as streamed:
            for p in pieces:
                reader.feed(p)
        assert streamed.value.line == e.line
        return
    reader = TaskFileReader("Tasks")
    added = [entry for p in pieces for entry in reader.feed(p)]
    assert reader.result() == whole
    assert [a for a in added if not isinstance(a, PerEngine)] == list(whole.entries)
    per_engine = [a for a in added if isinstance(a, PerEngine)]
    assert tuple(p for p in per_engine if p.event is EngineEvent.START) == whole.engine_start
    assert tuple(p for p in per_engine if p.event is EngineEvent.STOP) == whole.engine_stop


# Hostile input: a typed error or work bounded by the input's size, never a hang or a crash.


def test_huge_repeat_costs_nothing_to_read_and_is_refused_past_the_limit() -> None:
    tf = parse("#DISBATCH REPEAT 1000000 start 7 echo\n", max_tasks=1_000_000)
    assert tf.id_count == 1_000_000
    assert tf.record(999_999).repeat_index == 1_000_006
    with pytest.raises(TaskFileError) as e:
        parse("ok\n#DISBATCH REPEAT 1000000000000 echo\n")
    assert e.value.line == 2
    with pytest.raises(TaskFileError) as e:
        parse("#DISBATCH REPEAT 3\nx\n", max_tasks=3)
    assert e.value.line == 2


def test_repeat_with_a_line_of_digits_is_a_typed_error() -> None:
    with pytest.raises(TaskFileError) as e:
        parse("#DISBATCH REPEAT " + "9" * 100_000 + " echo\n")
    assert e.value.line == 1


def test_ten_megabyte_lines_are_read_in_linear_time() -> None:
    big = "x" * 10_000_000
    tabs = "\t" * 1_000_000
    tf = parse(f"echo {big}\n#DISBATCH PREFIX {big}\n#DISBATCH REPEAT 9{tabs}z\n#DISBATCH REPEAT 1 {big}\n")
    assert [len(c) for c in commands(tf)] == [10_000_005, 20_000_000]
    assert [n.line for n in tf.notices] == [3]
    tf = parse("#DISBATCH REPEAT 2 " + " " * 10_000_000 + "\n")
    assert tf.id_count == 2


def test_nul_byte_in_a_command_is_a_typed_error_but_harmless_in_a_comment() -> None:
    assert commands(parse(b"# a \0 in a comment\nok\n")) == [b"ok"]
    for text in (b"ok\necho \0\n", b"#DISBATCH PREFIX \0\nx\n", b"#DISBATCH REPEAT 2 a\0b\n"):
        with pytest.raises(TaskFileError) as e:
            parse(text)
        assert "NUL" in e.value.reason


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_read_or_fail_with_the_typed_error(data: bytes) -> None:
    try:
        tf = parse(data, max_tasks=10_000)
    except TaskFileError as e:
        assert e.line >= 1
        return
    assert [tf.record(i) for i in range(tf.id_count)] == list(tf.records())


# #DISBATCH AFTER (TaskSprint's extension) and lines submitted to a running batch.


def afters(tf: TaskFile) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    return [(r.task_id, r.after) for r in tf.records() if isinstance(r, Task)]


def test_after_names_earlier_lines_and_applies_to_the_next_task_only() -> None:
    tf = parse("echo a\n# c\necho b\n#DISBATCH AFTER 1\necho c\necho d\n#DISBATCH AFTER 3,5\necho e\n")
    assert afters(tf) == [(0, ()), (1, ()), (2, ((0, 1),)), (3, ()), (4, ((1, 3),))]


def test_after_ranges_cover_repeats_and_barriers_between_and_several_afters_add_up() -> None:
    text = "echo a\n#DISBATCH REPEAT 3 echo r\n#DISBATCH BARRIER\necho b\n#DISBATCH AFTER 1-2\n#DISBATCH AFTER 4\n"
    tf = parse(text + "#DISBATCH REPEAT 2 echo s\n")
    # Line 1 is task 0, line 2 tasks 1-3, the barrier (line 3) 4, line 4 task 5.
    assert [(r.first_id, r.after) for r in tf.entries if isinstance(r, Repeat)] == [(1, ()), (6, ((0, 4), (5, 6)))]
    assert tf.record(7) == Task(task_id=7, line=7, repeat_index=1, command=b"echo s", after=((0, 4), (5, 6)))
    # A range over the barrier takes its id too (it is met before any later task starts): one range.
    tf = parse(text.replace("AFTER 1-2", "AFTER 2-3") + "echo t\n")
    assert tf.record(6).after == ((1, 6),)


def test_after_waits_for_a_task_line_across_comments_and_a_zero_repeat() -> None:
    tf = parse("echo a\n#DISBATCH AFTER 1\n# note\n#DISBATCH REPEAT 0 echo none\necho b\n")
    assert afters(tf) == [(0, ()), (1, ((0, 1),))]


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        ("#DISBATCH AFTER 2", "no task was made on that line"),  # a comment
        ("#DISBATCH AFTER 3", "no task was made on that line"),  # a barrier
        ("#DISBATCH AFTER 4", "name earlier lines"),  # itself
        ("#DISBATCH AFTER 9", "name earlier lines"),
        ("#DISBATCH AFTER 0", "name earlier lines"),
        ("#DISBATCH AFTER 1-x", "not a line number"),
        ("#DISBATCH AFTER 3-1", "name earlier lines"),
        ("#DISBATCH AFTER " + "9" * 40, "not a line number"),
        ("#DISBATCH AFTER  ", "names no line"),
    ],
)
def test_after_naming_no_earlier_task_is_an_error_naming_its_line(after: str, reason: str) -> None:
    with pytest.raises(TaskFileError, match=reason) as info:
        parse(f"echo a\n# c\n#DISBATCH BARRIER\n{after}\necho b\n")
    assert info.value.line == 4


def test_submitted_lines_continue_the_file_and_a_refused_line_changes_nothing() -> None:
    reader = read_taskfile("#DISBATCH PERENGINE START echo hi\necho a\n", name="Tasks")
    reader.close_engine_lists()
    assert reader.submit("#DISBATCH AFTER 2") == []
    for bad, reason in [
        ("#DISBATCH PERENGINE STOP echo bye", "PERENGINE"),
        ("echo \0", "NUL"),
        ("echo a\necho b", "line end"),
        ("#DISBATCH AFTER 4", "name earlier lines"),
    ]:
        with pytest.raises(TaskFileError, match=reason) as info:
            reader.submit(bad)
        assert info.value.line == 4
    (task,) = reader.submit("echo b")
    assert task == Task(task_id=1, line=4, repeat_index=-1, command=b"echo b", after=((0, 1),))
    assert reader.record(1) == task and reader.record(0).command == b"echo a"
    assert reader.engine_start[0].command == b"echo hi" and reader.engine_stop == ()
    with pytest.raises(IndexError):
        reader.record(2)
