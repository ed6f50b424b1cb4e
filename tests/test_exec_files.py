"""Names of a task's files: relative, inside the working directory, bounded (pure tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasksprint.exec.files import BadFileName, check_file_name, check_file_names, check_file_pattern, match_results


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("out.txt", "out.txt"),
        ("./out//a.txt", "out/a.txt"),
        ("dir/sub/", "dir/sub"),
        ("a..b", "a..b"),
        ("..hidden", "..hidden"),
        ("sp ace", "sp ace"),
    ],
)
def test_good_names_are_normalized(name: str, normal: str) -> None:
    assert check_file_name(name) == normal


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("..", "'..'"),
        ("a/../../b", "'..'"),
        ("a/..", "'..'"),
        ("", "empty"),
        (".", "working directory itself"),
        ("./", "working directory itself"),
        ("a\nb", "control character"),
        ("x" * 300, "longer than 255"),
        ("a/" * 3000, "longer than 4096"),
        (7, "must be a string"),
    ],
)
def test_bad_names_are_refused_saying_why(name: object, why: str) -> None:
    with pytest.raises(BadFileName, match=why):
        check_file_name(name)


def test_patterns_follow_the_same_rules() -> None:
    assert check_file_pattern("out/*.txt") == "out/*.txt"
    with pytest.raises(BadFileName, match="'..'"):
        check_file_pattern("../*")
    with pytest.raises(BadFileName, match="absolute"):
        check_file_pattern("/tmp/*")


def test_a_list_of_names_refuses_duplicates_after_normalizing() -> None:
    assert check_file_names(["a", "b/c"]) == ("a", "b/c")
    with pytest.raises(BadFileName, match="listed twice"):
        check_file_names(["a", "./a"])
    with pytest.raises(BadFileName, match="must be a list"):
        check_file_names("a")


@given(st.lists(st.sampled_from(["a", "..", ".", "", "b", "c.txt"]), min_size=1, max_size=6))
def test_an_accepted_name_never_leaves_the_directory(parts: list[str]) -> None:
    try:
        name = check_file_name("/".join(parts))
    except BadFileName:
        return
    assert not name.startswith("/") and ".." not in name.split("/")


def test_match_results_selects_per_path_part() -> None:
    present = ["out/a.txt", "out/b.log", "out/sub/c.txt", "top.txt"]
    assert match_results(present, ("out/*.txt", "*.txt")) == ["out/a.txt", "top.txt"]
    assert match_results(present, ("out/*/*",)) == ["out/sub/c.txt"]
