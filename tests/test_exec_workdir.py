"""A command task's own working directory: files staged in, results collected, hostile input refused."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from tasksprint.coordinator.specs import command_from_kwargs, command_kwargs
from tasksprint.exec.spec import MAX_INLINE_FILES_BYTES, CommandSpec
from tasksprint.exec.workdir import FilesError, collect, encode_files, input_files, stage


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_staged_files_are_collected_by_their_patterns(tmp_path: Path) -> None:
    stage(tmp_path, [("in/a.txt", b"A"), ("b.bin", b"\x00\xff")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("x")
    (tmp_path / "out" / "y.log").write_text("y")
    os.symlink("/etc/hostname", tmp_path / "out" / "link.txt")  # a link is never a result
    got = collect(tmp_path, ("out/*.txt", "b.bin"))
    assert got == {"b.bin": b"\x00\xff", "out/x.txt": b"x"}
    assert encode_files(got) == {"b.bin": b64(b"\x00\xff"), "out/x.txt": b64(b"x")}


def test_results_over_the_bound_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"z" * 101)
    with pytest.raises(FilesError, match="hold 101 bytes, more than the 100"):
        collect(tmp_path, ("big",), max_bytes=100)


def test_staging_never_writes_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(outside, work / "f")
    with pytest.raises(FilesError, match="cannot stage the input file 'f'"):
        stage(work, [("f", b"data")])
    assert not outside.exists()


def test_input_files_come_from_whole_outputs_or_the_files_output() -> None:
    whole = {"verdict": "ok", "files": {"a.txt": b64(b"1")}}
    only = {"b.txt": b64(b"2")}
    assert input_files([whole, only, {"x": 1}], [None, "files", "x"]) == [("a.txt", b"1"), ("b.txt", b"2")]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([{"files": {"../etc/passwd": b64(b"x")}}], "contains '..'"),
        ([{"files": {"/abs": b64(b"x")}}], "is absolute"),
        ([{"files": {"a": "not base64!"}}], "is not base64"),
        ([{"files": {"a": 5}}], "is not base64 text"),
        ([{"files": ["a"]}], "must be a map"),
        ([{"files": {"a": b64(b"1")}}, {"files": {"a": b64(b"2")}}], "two pretasks give the input file 'a'"),
    ],
    ids=["dotdot", "absolute", "bad-base64", "not-text", "not-a-map", "twice"],
)
def test_hostile_input_files_are_refused(inputs: list, expected: str) -> None:
    with pytest.raises(FilesError, match=expected):
        input_files(inputs, [None] * len(inputs))


def test_a_spec_carries_its_files_through_the_log_as_plain_data() -> None:
    spec = CommandSpec(cmd="cat in.txt > out.txt", files={"in.txt": "hi", "d/raw": b"\x00"}, results=["out.txt"])
    plain = command_kwargs(spec)
    assert plain["command"]["files"] == {"d/raw": b64(b"\x00"), "in.txt": b64(b"hi")}
    assert command_from_kwargs(plain) == spec


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"files": {"../x": "a"}}, "contains '..'"),
        ({"results": ["/tmp/*"]}, "is absolute"),
        ({"files": {"a": "x" * (MAX_INLINE_FILES_BYTES + 1)}}, "at most"),
        ({"results": ["a"], "cwd": "/tmp"}, "leave cwd unset"),
    ],
    ids=["dotdot", "absolute", "too-big", "cwd"],
)
def test_a_spec_with_bad_files_is_refused(fields: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        CommandSpec(cmd="true", **fields)
