"""What a command task runs, the limits it runs under, and the record of one run.

All three are messages (:func:`tasksprint.codec.message`), so a scheduler can
put a :class:`CommandSpec` in the log and a client can report a
:class:`CommandRecord` back through it.  A spec may come from a user's task
file, so its validators are strict and bounded: a bad spec fails at
construction with an error saying what to change, never later in a client.

The ``parse_*`` functions read kolejka's unit strings (``"64M"``, ``"1G"``,
``"1s"``, ``"500ms"``, ``"1"``, ``"16"``); they are pure and raise
:class:`ValueError` naming the bad text.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable
from typing import Any

import attrs

from tasksprint.codec import message
from tasksprint.exec.files import check_file_name, check_file_names

# Bounds on a spec's size: a spec is data from a user and travels in the log.
MAX_COMMAND_BYTES = 128 * 1024
MAX_ARGV_ITEMS = 4096
MAX_ENV_ITEMS = 1024
MAX_PATH_CHARS = 4096
# Bytes of captured output kept at each end of the stream (disBatch keeps 80).
SNIPPET_BYTES = 80
#: Bytes of input files a spec may carry itself (they travel in the log).
MAX_INLINE_FILES_BYTES = 1024 * 1024
#: Bytes of result files one run may keep: with their encoding they fit in one
#: message to a peer (the frame cap is 64 MiB).
MAX_RESULT_BYTES = 32 * 1024 * 1024

#: Environment variables the runner sets itself; a spec may not override them.
RESERVED_ENV_PREFIX = "TASKSPRINT_"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------
# kolejka's units

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*\Z", re.IGNORECASE)
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TIME = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ns|us|ms|s|m|h|d)?\s*\Z", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``"64M"``, ``"1G"``, ``"512k"``, ``"100"`` or ``"2GiB"``.

    Suffixes are binary (``k`` = 1024) and case-insensitive; a bare number is
    bytes.  Raises :class:`ValueError` for anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: write a number of bytes with an optional k, M, G or T suffix, like '64M'"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_time(text: str | float) -> float:
    """Seconds in a duration such as ``"1s"``, ``"500ms"``, ``"2m"``, ``"1h"`` or ``"1.5"``.

    A bare number is seconds.  Raises :class:`ValueError` for anything else.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool) and math.isfinite(text) and text >= 0:
        return float(text)
    match = _TIME.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number with an optional unit ms, s, m or h, like '500ms'"
        )
    return float(match.group(1)) * _TIME_UNITS[(match.group(2) or "").lower()]


def parse_count(text: str | int) -> int:
    """A whole count such as ``"16"`` (kolejka's ``pids``).  Raises :class:`ValueError`."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if isinstance(text, str) and re.fullmatch(r"\s*[0-9]+\s*", text):
        return int(text)
    raise ValueError(f"{text!r} is not a count: write a whole number, like '16'")


def parse_cpus(text: str | float) -> float:
    """A CPU quota such as ``"1"`` or ``"0.5"`` (kolejka's ``cpus``).  Raises :class:`ValueError`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and math.isfinite(text) and text > 0:
        return float(text)
    if isinstance(text, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*", text) and float(text) > 0:
        return float(text)
    raise ValueError(f"{text!r} is not a CPU quota: write a positive number of CPUs, like '1' or '0.5'")


# --------------------------------------------------------------------------
# Validators


def _optional_positive_int(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{attr.name} must be a positive whole number or None, got {value!r}")


def _optional_positive_float(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0
    ):
        raise ValueError(f"{attr.name} must be a positive number or None, got {value!r}")


def _to_cores(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"cpuset must be a list of core numbers, got {type(value).__name__}")
    return tuple(value)


def _cores(_inst: Any, attr: attrs.Attribute[Any], value: tuple[int, ...] | None) -> None:
    if value is None:
        return
    if not value or len(value) > 4096:
        raise ValueError("cpuset must name between 1 and 4096 cores (or be None to run on any)")
    for core in value:
        if not isinstance(core, int) or isinstance(core, bool) or not 0 <= core < 65536:
            raise ValueError(f"cpuset holds core numbers 0..65535, got {core!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"cpuset names a core twice: {list(value)}")


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{what} may not contain a NUL character")
    if len(value.encode("utf-8", "surrogateescape")) > limit:
        raise ValueError(f"{what} is longer than {limit} bytes")
    return value


def _optional_path(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _text(value, attr.name, MAX_PATH_CHARS)
        if not value:
            raise ValueError(f"{attr.name} may not be empty: give a file name or None")


def _to_env(value: Any) -> tuple[tuple[str, str], ...]:
    """Environment additions as sorted (name, value) pairs, from a mapping or pairs."""
    items = value.items() if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple, type({}.items()))):
        raise TypeError(f"env must be a mapping of names to values, got {type(value).__name__}")
    pairs = []
    item: Any
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise TypeError(f"env entries are (name, value) pairs, got {item!r:.80}")
        pairs.append((item[0], item[1]))
    return tuple(sorted(pairs))


def _env(_inst: Any, _attr: attrs.Attribute[Any], value: tuple[tuple[str, str], ...]) -> None:
    if len(value) > MAX_ENV_ITEMS:
        raise ValueError(f"env has {len(value)} entries; at most {MAX_ENV_ITEMS} are allowed")
    names = set()
    for name, val in value:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"env name {name!r:.80} is not a shell variable name (letters, digits, _)")
        if name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"env may not set {name}: names starting with {RESERVED_ENV_PREFIX} are set by the runner")
        if name in names:
            raise ValueError(f"env sets {name} twice")
        names.add(name)
        _text(val, f"env {name}", MAX_COMMAND_BYTES)


def _to_files(value: Any) -> tuple[tuple[str, bytes], ...]:
    """Input files as sorted (name, content) pairs, from a mapping of names to bytes or text."""
    if isinstance(value, dict):
        value = tuple(value.items())
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"files must map file names to their contents, got {type(value).__name__}")
    pairs = []
    item: Any
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise TypeError(f"files entries are (name, content) pairs, got {type(item).__name__}")
        name, content = item
        if isinstance(content, str):
            content = content.encode("utf-8")
        if not isinstance(content, bytes):
            raise TypeError(f"the content of file {name!r:.80} must be bytes or text, got {type(content).__name__}")
        pairs.append((check_file_name(name), content))
    return tuple(sorted(pairs))


def _files(_inst: Any, _attr: attrs.Attribute[Any], value: tuple[tuple[str, bytes], ...]) -> None:
    names = [name for name, _ in value]
    if len(set(names)) != len(names):
        raise ValueError("files names a file twice")
    total = sum(len(content) for _, content in value)
    if total > MAX_INLINE_FILES_BYTES:
        raise ValueError(
            f"files hold {total} bytes; at most {MAX_INLINE_FILES_BYTES} travel with a task "
            "(larger inputs come from a pretask's result files)"
        )


def _to_results(value: Any) -> tuple[str, ...]:
    return check_file_names(value) if value else ()


def _to_argv(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"argv must be a list of strings, got {type(value).__name__}")
    return tuple(value)


# --------------------------------------------------------------------------
# Values


@message
class Limits:
    """Per-task limits; ``None`` means unlimited.  Each field carries its unit.

    ``cpus`` is a CPU-time quota (1.5 = one and a half CPUs' worth per second);
    ``cpuset`` pins the task to the listed cores.  ``output_bytes`` bounds
    stdout and stderr together.
    """

    memory_bytes: int | None = attrs.field(default=None, validator=_optional_positive_int)
    cpus: float | None = attrs.field(default=None, validator=_optional_positive_float)
    cpuset: tuple[int, ...] | None = attrs.field(default=None, converter=_to_cores, validator=_cores)
    pids: int | None = attrs.field(default=None, validator=_optional_positive_int)
    wall_time_s: float | None = attrs.field(default=None, validator=_optional_positive_float)
    cpu_time_s: float | None = attrs.field(default=None, validator=_optional_positive_float)
    output_bytes: int | None = attrs.field(default=None, validator=_optional_positive_int)

    @classmethod
    def from_kolejka(cls, limits: dict[str, Any]) -> Limits:
        """Limits from kolejka's ``limits`` object (``memory``, ``cpus``, ``pids``, ``time``, ...).

        Raises :class:`ValueError` naming an unknown key or a bad value.
        """
        known = {"memory", "cpus", "pids", "time", "cpu_time", "output"}
        unknown = sorted(set(limits) - known)
        if unknown:
            raise ValueError(f"unknown limits {unknown}: kolejka limits are {sorted(known)}")

        def read(key: str, parse: Callable[[Any], Any]) -> Any:
            return None if limits.get(key) is None else parse(limits[key])

        return cls(
            memory_bytes=read("memory", parse_size),
            cpus=read("cpus", parse_cpus),
            pids=read("pids", parse_count),
            wall_time_s=read("time", parse_time),
            cpu_time_s=read("cpu_time", parse_time),
            output_bytes=read("output", parse_size),
        )


@message
class CommandSpec:
    """One command task: exactly one of ``cmd`` (run as ``bash -c``) or ``argv`` (no shell).

    ``cwd`` is the working directory (the client's own when None); ``stdin``
    names a file read as standard input (``/dev/null`` when None);
    ``stdout`` / ``stderr`` name files the output goes to, relative to ``cwd``,
    or None to capture it (the record keeps its size and an 80-byte head and
    tail).  ``env`` adds variables over the runner's small base environment.
    ``sandbox`` runs the task under bubblewrap (read-only root, private
    ``/tmp``, writable ``cwd``), without network unless ``network`` is set;
    a task without sandbox always has the client's network.

    ``files`` are input files the spec carries (name -> content, at most
    :data:`MAX_INLINE_FILES_BYTES` in all); ``results`` are names or globs
    of files kept after a successful run (at most :data:`MAX_RESULT_BYTES`
    in all), which dependents receive as input files.  A task with either
    runs in a fresh working directory of its own, so it takes no ``cwd``.
    File names are relative, without ``..`` (:mod:`tasksprint.exec.files`).
    """

    cmd: str | None = attrs.field(default=None)
    argv: tuple[str, ...] | None = attrs.field(default=None, converter=_to_argv)
    cwd: str | None = attrs.field(default=None, validator=_optional_path)
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_to_env, validator=_env)
    stdin: str | None = attrs.field(default=None, validator=_optional_path)
    stdout: str | None = attrs.field(default=None, validator=_optional_path)
    stderr: str | None = attrs.field(default=None, validator=_optional_path)
    limits: Limits = attrs.field(factory=Limits, validator=attrs.validators.instance_of(Limits))
    sandbox: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    network: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    files: tuple[tuple[str, bytes], ...] = attrs.field(default=(), converter=_to_files, validator=_files)
    results: tuple[str, ...] = attrs.field(default=(), converter=_to_results)

    @property
    def own_workdir(self) -> bool:
        """Whether the task runs in a fresh working directory of its own (it has files or results)."""
        return bool(self.files or self.results)

    def __attrs_post_init__(self) -> None:
        if self.own_workdir and self.cwd is not None:
            raise ValueError("a task with files or results runs in a working directory of its own: leave cwd unset")
        if (self.cmd is None) == (self.argv is None):
            raise ValueError("a command task takes exactly one of cmd (a bash command line) or argv (a list, no shell)")
        if self.cmd is not None:
            _text(self.cmd, "cmd", MAX_COMMAND_BYTES)
            if not self.cmd.strip():
                raise ValueError("cmd is empty: give a bash command line")
        if self.argv is not None:
            if not self.argv or len(self.argv) > MAX_ARGV_ITEMS:
                raise ValueError(f"argv must hold between 1 and {MAX_ARGV_ITEMS} strings")
            for n, item in enumerate(self.argv):
                _text(item, f"argv[{n}]", MAX_COMMAND_BYTES)
            if not self.argv[0]:
                raise ValueError("argv[0] is empty: it names the program to run")
        if self.network and not self.sandbox:
            raise ValueError("network=True only matters in a sandbox: set sandbox=True too, or leave network unset")
        if self.stdout is not None and self.stdout == self.stderr:
            raise ValueError("stdout and stderr name the same file; give two names")

    @property
    def program_argv(self) -> tuple[str, ...]:
        """The argv that is executed: ``("bash", "-c", cmd)`` or the spec's own argv."""
        if self.cmd is not None:
            return ("bash", "-c", self.cmd)
        assert self.argv is not None
        return self.argv


class Verdict(enum.StrEnum):
    """How a run ended.  A limit's verdict names the limit, distinct from exit and signal."""

    OK = "ok"  # exit code 0
    EXIT = "exit"  # non-zero exit code
    SIGNAL = "signal"  # killed by a signal nobody in the runner sent
    MEMORY = "memory"
    PIDS = "pids"
    TIME = "time"  # wall-clock limit
    CPU_TIME = "cpu_time"
    OUTPUT = "output"
    START_FAILED = "start_failed"  # the program could not be started (missing, not executable, bad cwd)
    CANCELLED = "cancelled"


class Enforcement(enum.StrEnum):
    """What enforced a run's limits and held its process tree."""

    CGROUP_V2 = "cgroup_v2"
    CGROUP_V1 = "cgroup_v1"
    RLIMIT = "rlimit"  # setrlimit, wall-clock timers and a /proc scan of the tree


def _opt_bytes(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bytes) or len(value) > SNIPPET_BYTES:
        raise ValueError(f"{attr.name} must be at most {SNIPPET_BYTES} bytes")


@message
class OutputSummary:
    """What a run wrote to one stream: its size, and for captured output its head and tail.

    ``size_bytes`` counts what the task wrote until the stream closed or the
    output limit cut it (``cut``); ``head`` / ``tail`` are the first and last
    80 bytes, which overlap when the output is shorter than 160 bytes
    (``tail`` is empty when everything fits in ``head``).
    """

    size_bytes: int = attrs.field(validator=attrs.validators.ge(0))
    cut: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    head: bytes = attrs.field(default=b"", validator=_opt_bytes)
    tail: bytes = attrs.field(default=b"", validator=_opt_bytes)


def _to_enum(kind: type[enum.StrEnum]) -> Any:
    def convert(value: Any) -> Any:
        return kind(value)

    return convert


def _to_enums(kind: type[enum.StrEnum]) -> Any:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list of {kind.__name__} names")
        return tuple(kind(v) for v in value)

    return convert


_opt_int = attrs.validators.optional(attrs.validators.instance_of(int))
_num = attrs.validators.instance_of((int, float))


@message
class CommandRecord:
    """The record of one run.

    Exactly one of ``exit_code`` and ``signal`` is set once a process ran
    (neither for ``start_failed``).  ``verdict`` says why it ended;
    ``limits_hit`` lists every limit that fired (a pids limit may fire in a
    run that the time limit ended).  ``unenforced`` names requested limits
    the enforcement in use could not apply.  Times are seconds: ``started``
    and ``finished`` since the epoch, CPU times summed over the tree where
    the enforcement can see it.  ``detail`` explains a start failure.
    """

    verdict: Verdict = attrs.field(converter=_to_enum(Verdict))
    exit_code: int | None = attrs.field(default=None, validator=_opt_int)
    signal: int | None = attrs.field(default=None, validator=_opt_int)
    started: float = attrs.field(default=0.0, validator=_num)
    finished: float = attrs.field(default=0.0, validator=_num)
    elapsed_s: float = attrs.field(default=0.0, validator=_num)
    peak_memory_bytes: int | None = attrs.field(default=None, validator=_opt_int)
    user_cpu_s: float = attrs.field(default=0.0, validator=_num)
    system_cpu_s: float = attrs.field(default=0.0, validator=_num)
    pid: int | None = attrs.field(default=None, validator=_opt_int)
    host: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    enforcement: Enforcement = attrs.field(default=Enforcement.RLIMIT, converter=_to_enum(Enforcement))
    limits_hit: tuple[Verdict, ...] = attrs.field(default=(), converter=_to_enums(Verdict))
    unenforced: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    stdout: OutputSummary | None = None
    stderr: OutputSummary | None = None
    detail: str = attrs.field(default="", validator=attrs.validators.instance_of(str))

    @property
    def is_ok(self) -> bool:
        """True when the command exited with code 0 and no limit ended it."""
        return self.verdict is Verdict.OK
