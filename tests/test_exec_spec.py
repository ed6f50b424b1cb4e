"""The command runner's values: kolejka's units, spec validation, records in the codec.

Pure tests: no process is started.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasksprint.codec import decode_untrusted, encode
from tasksprint.exec.runner import BASE_ENV_NAMES, TaskEnv, build_env, task_cpus
from tasksprint.exec.spec import (
    SNIPPET_BYTES,
    CommandRecord,
    CommandSpec,
    Enforcement,
    Limits,
    OutputSummary,
    Verdict,
    parse_count,
    parse_cpus,
    parse_size,
    parse_time,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("512k", 512 << 10),
        ("100", 100),
        ("2GiB", 2 << 30),
        ("1.5M", 3 << 19),
        ("10b", 10),
        (" 3 m ", 3 << 20),
        (7, 7),
    ],
)
def test_parse_size_reads_kolejka_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5", 1.5),
        ("10", 10.0),
        ("250us", 250e-6),
        (3, 3.0),
    ],
)
def test_parse_time_reads_kolejka_durations(text: str, seconds: float) -> None:
    assert parse_time(text) == pytest.approx(seconds)


def test_parse_count_and_cpus_read_kolejka_numbers() -> None:
    assert parse_count("16") == 16
    assert parse_cpus("1") == 1.0
    assert parse_cpus("0.5") == 0.5


@pytest.mark.parametrize("bad", ["", "M", "-1", "1X", "1e3", "1 M B", None, True, -5, "inf"])
def test_parse_size_refuses_garbage_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "s", "-1s", "1y", "1 sec", None, float("nan"), -1.0])
def test_parse_time_refuses_garbage_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_time(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["1.5", "-1", "x", True])
def test_parse_count_refuses_garbage(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a count"):
        parse_count(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0", "-1", "x", 0, float("inf")])
def test_parse_cpus_refuses_garbage(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a CPU quota"):
        parse_cpus(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "k", "M", "G"]))
def test_parse_size_of_a_whole_number_and_suffix(n: int, suffix: str) -> None:
    assert parse_size(f"{n}{suffix}") == n * {"": 1, "k": 1024, "M": 1024**2, "G": 1024**3}[suffix]


def test_limits_from_kolejka_task() -> None:
    limits = Limits.from_kolejka({"memory": "64M", "cpus": "1", "pids": "16", "time": "1s"})
    assert limits == Limits(memory_bytes=64 << 20, cpus=1.0, pids=16, wall_time_s=1.0)


def test_limits_from_kolejka_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown limits \\['network'\\]"):
        Limits.from_kolejka({"network": "yes"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_bytes": 0},
        {"memory_bytes": -1},
        {"memory_bytes": 1.5},
        {"pids": True},
        {"cpus": 0},
        {"cpus": float("nan")},
        {"wall_time_s": -1},
        {"output_bytes": 0},
        {"cpuset": []},
        {"cpuset": [0, 0]},
        {"cpuset": [-1]},
        {"cpuset": "0-3"},
    ],
)
def test_limits_refuse_bad_values(kwargs: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        Limits(**kwargs)


def test_spec_takes_exactly_one_of_cmd_and_argv() -> None:
    with pytest.raises(ValueError, match="exactly one of cmd"):
        CommandSpec()
    with pytest.raises(ValueError, match="exactly one of cmd"):
        CommandSpec(cmd="true", argv=["true"])
    assert CommandSpec(cmd="echo hi").program_argv == ("bash", "-c", "echo hi")
    assert CommandSpec(argv=["echo", "hi"]).program_argv == ("echo", "hi")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cmd": "   "}, "cmd is empty"),
        ({"cmd": "a\0b"}, "NUL"),
        ({"argv": []}, "argv must hold"),
        ({"argv": [""]}, "argv\\[0\\] is empty"),
        ({"argv": ["ls", 3]}, "argv\\[1\\] must be a string"),
        ({"argv": "ls -l"}, "argv must be a list"),
        ({"cmd": "x" * (200 * 1024)}, "longer than"),
        ({"cmd": "true", "env": {"1X": "v"}}, "not a shell variable name"),
        ({"cmd": "true", "env": {"TASKSPRINT_TASK_ID": "v"}}, "set by the runner"),
        ({"cmd": "true", "env": {"A": 1}}, "env A must be a string"),
        ({"cmd": "true", "stdout": "out", "stderr": "out"}, "same file"),
        ({"cmd": "true", "stdin": ""}, "may not be empty"),
    ],
)
def test_spec_validation_says_what_to_fix(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        CommandSpec(**kwargs)


def test_spec_env_is_order_independent_and_hashable() -> None:
    a = CommandSpec(cmd="true", env={"B": "2", "A": "1"})
    b = CommandSpec(cmd="true", env=[("A", "1"), ("B", "2")])
    assert a == b and hash(a) == hash(b)


def test_spec_and_record_travel_through_the_codec() -> None:
    spec = CommandSpec(
        argv=["sort", "-n"],
        cwd="/tmp",
        env={"A": "1"},
        stdin="in.txt",
        stdout="out.txt",
        limits=Limits(memory_bytes=1 << 20, cpuset=[0, 1], wall_time_s=2.5),
    )
    assert decode_untrusted(encode(spec)) == spec
    record = CommandRecord(
        verdict=Verdict.MEMORY,
        signal=9,
        enforcement=Enforcement.CGROUP_V1,
        limits_hit=(Verdict.MEMORY, Verdict.PIDS),
        unenforced=("cpus",),
        stdout=OutputSummary(size_bytes=3, head=b"abc"),
        host="h",
        pid=7,
    )
    again = decode_untrusted(encode(record))
    assert again == record
    assert again.verdict is Verdict.MEMORY and again.enforcement is Enforcement.CGROUP_V1


def test_output_summary_bounds_its_snippets() -> None:
    with pytest.raises(ValueError):
        OutputSummary(size_bytes=100, head=b"x" * (SNIPPET_BYTES + 1))


def test_environment_passes_only_the_base_and_the_task_variables() -> None:
    client_env = {
        "PATH": "/bin",
        "HOME": "/home/u",
        "CLUSTER_SECRET": "s3cr3t",
        "AWS_SECRET_ACCESS_KEY": "k",
        "LD_PRELOAD": "/evil.so",
    }
    spec = CommandSpec(cmd="true", env={"EXTRA": "1", "PATH": "/opt/bin"})
    env = build_env(spec, TaskEnv(task_id="7", attempt=2, client="c9", cpus=1.5), client_env)
    assert env == {
        "PATH": "/opt/bin",
        "HOME": "/home/u",
        "LANG": "C.UTF-8",
        "TASKSPRINT_TASK_ID": "7",
        "TASKSPRINT_ATTEMPT": "2",
        "TASKSPRINT_CLIENT": "c9",
        "TASKSPRINT_CPUS": "1.5",
        "EXTRA": "1",
    }
    assert set(env) - {
        "TASKSPRINT_TASK_ID",
        "TASKSPRINT_ATTEMPT",
        "TASKSPRINT_CLIENT",
        "TASKSPRINT_CPUS",
        "EXTRA",
    } <= set(BASE_ENV_NAMES)


def test_task_cpus_is_what_the_task_was_given() -> None:
    env = TaskEnv(task_id="1", attempt=0, client="c")
    assert task_cpus(CommandSpec(cmd="true", limits=Limits(cpus=0.5)), env) == 0.5
    assert task_cpus(CommandSpec(cmd="true", limits=Limits(cpuset=[0, 1, 2])), env) == 3.0
    assert task_cpus(CommandSpec(cmd="true"), TaskEnv(task_id="1", attempt=0, client="c", cpus=4.0)) == 4.0


def test_network_is_a_sandbox_option() -> None:
    with pytest.raises(ValueError, match="set sandbox=True too"):
        CommandSpec(cmd="true", network=True)
    assert CommandSpec(cmd="true", sandbox=True, network=True).network


def test_sandbox_argv_isolates_all_but_the_working_directory() -> None:
    from tasksprint.exec.sandbox import sandbox_argv

    argv = sandbox_argv(("bash", "-c", "make"), bwrap="/usr/bin/bwrap", cwd="/tmp/w", network=False)
    assert argv[0] == "/usr/bin/bwrap" and argv[-4:] == ("--", "bash", "-c", "make")
    joined = " ".join(argv)
    assert "--ro-bind / /" in joined and "--bind /tmp/w /tmp/w" in joined and "--unshare-net" in joined
    assert joined.index("--tmpfs /tmp") < joined.index("--bind /tmp/w")  # the working directory stays visible
    assert "--unshare-net" not in sandbox_argv(("true",), bwrap="bwrap", cwd="/w", network=True)
