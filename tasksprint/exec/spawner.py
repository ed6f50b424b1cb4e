"""Starting a task: the shell that puts it in its cgroup, and a thread of its own to start it on.

:func:`spawn_argv` is the argv that starts a task in its cgroup without
running Python in the forked child (see its docstring).

``subprocess.Popen`` returns once the child executed its program; on a
loaded machine that takes milliseconds, during which a trio event loop that
called it would stop: no other slot's task would be seen to end or be let
through its gate.  :func:`spawn` runs the ``Popen`` call on one long-lived
thread instead and waits for it without blocking the loop.  The thread lives
as long as the process, which matters where no guardian runs: a child's
parent-death signal (``PR_SET_PDEATHSIG``, asked for by ``setpriv`` in the
wrapper) is tied to the *thread* that forked it, and worker threads come
and go.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable

import trio

from tasksprint.exec.group import TaskGroup
from tasksprint.exec.spec import CommandSpec

__all__ = ["spawn", "spawn_argv"]

#: The PATH of a task whose environment names none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


_lock = threading.Lock()
_jobs: queue.SimpleQueue[Callable[[], None]] | None = None


def _serve(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        jobs.get()()


def _queue() -> queue.SimpleQueue[Callable[[], None]]:
    global _jobs
    with _lock:
        if _jobs is None:
            jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(jobs,), name="tasksprint-spawner", daemon=True).start()
            _jobs = jobs
        return _jobs


async def spawn(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """``start()`` run on the spawner thread: the process it started, or its exception raised here.

    Not cancellable: a process once started must be owned by its caller, to
    be killed and reaped.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    got: list[subprocess.Popen[bytes]] = []
    failed: list[BaseException] = []

    def job() -> None:
        try:
            got.append(start())
        except BaseException as exc:  # handed to the caller, whatever it is
            failed.append(exc)
        token.run_sync_soon(done.set)

    _queue().put(job)
    with trio.CancelScope(shield=True):
        await done.wait()
    if failed:
        raise failed[0]
    return got[0]


# The shell script that joins a cgroup and sets the CPU-time rlimit before
# it executes the task: "$@" is the cgroup.procs files, "--", the task's argv.
_JOIN_SCRIPT = (
    '{gate_arg}for f do [ "$f" = -- ] && break; '
    'echo 0 > "$f" || { echo "tasksprint: cannot join the task group through $f" >&2; exit 126; }; shift; done; '
    # dash exports PWD; the task's environment is the runner's alone.
    'shift; unset PWD; {rlimit}{gate}exec "$@"{stdin}'
)
# A task spawned ahead of its slot: its stdin is the gate, a pipe from the
# runner, and the wrapper's first argument the task's real stdin.  It waits
# for the line "go" before it executes the task; end of file (the runner gave
# up on the task, or died) ends the wrapper instead.
_GATE_ARG = "stdin_file=$1; shift; "
_GATE = 'IFS= read -r go && [ "$go" = go ] || exit 125; '
_GATE_STDIN = ' <"$stdin_file"'
# The same for a ``cmd`` task, run by the task's own bash: the join, then the
# command in the same shell, on the same line (so $LINENO counts as in
# ``bash -c CMD``).  The wrapper's variables are unset, and ``: bash`` leaves
# $_ and $? as a fresh ``bash -c`` has them.
_BASH_JOIN_SCRIPT = (
    '{gate_arg}for f do [ "$f" = -- ] && break; '
    'echo 0 > "$f" || { echo "tasksprint: cannot join the task group through $f" >&2; exit 126; }; shift; done; '
    "shift; {rlimit}{gate}{stdin}unset f go stdin_file; : bash; "
)
_BASH_GATE_STDIN = 'exec <"$stdin_file" || exit 126; '
# Variables bash acts on before it runs its -c string: BASH_ENV names a file
# it sources first (that would run outside the cgroup and before the gate),
# SHELLOPTS and BASHOPTS set options the join would run under.  A task that
# sets one is started by sh, which then executes its bash.  (Exported
# functions, BASH_FUNC_<name>%%, which could stand in for the builtins the
# join calls, cannot be set: a spec's env names are shell variable names.)
_BASH_STARTUP_NAMES = ("BASH_ENV", "SHELLOPTS", "BASHOPTS")


@functools.cache
def _spawn_tools() -> tuple[str | None, str | None]:
    """Absolute paths of ``setpriv`` (util-linux) and ``sh``, each None when missing."""
    path = os.environ.get("PATH") or DEFAULT_PATH
    return shutil.which("setpriv", path=path), shutil.which("sh", path=path)


def spawn_argv(
    group: TaskGroup,
    spec: CommandSpec,
    argv: tuple[str, ...],
    *,
    env: dict[str, str] | None = None,
    gated_stdin: str | None = None,
    guarded: bool = False,
) -> tuple[str, ...] | None:
    """The argv that starts ``argv`` in a cgroup without running Python in the child, or None.

    Forking this (large) process with a ``preexec_fn`` copies its page
    tables and runs Python in the child: about 20 ms a task.  Without one,
    the child is spawned with ``vfork`` and a shell does the rest before the
    task's first instruction: it writes to the group's ``cgroup.procs`` files
    (so the task and everything it starts are in the cgroup) and sets the
    CPU-time rlimit.  For a ``cmd`` task (``argv`` is ``bash -c CMD``) that
    shell is the task's own bash, which then runs CMD itself: one program
    execution, as ``bash -c CMD`` alone; unless the task's ``env`` sets a
    variable bash acts on at start-up (:data:`_BASH_STARTUP_NAMES`).  Any
    other task gets ``sh``, which executes it.

    With ``gated_stdin`` (the path of the task's stdin) the child's stdin is
    a gate: the shell waits for the line ``go`` on it (and ends at end of
    file) before it runs the task with that file as stdin.  ``guarded``: a
    :class:`~tasksprint.exec.guardian.Guardian` kills the group if this
    process dies; without one ``setpriv --pdeathsig KILL`` starts the chain,
    so that at least the main process dies with this one.  None for a group
    that is no cgroup, or when a program needed is missing: the runner then
    uses the ``preexec_fn``.
    """
    files = getattr(group, "procs_files", None)
    setpriv, sh = _spawn_tools()
    if files is None or (not guarded and setpriv is None):
        return None
    rlimit = ""
    if spec.limits.cpu_time_s is not None:
        soft = max(1, math.ceil(spec.limits.cpu_time_s))  # as child_rlimits does
        rlimit = f"ulimit -S -t {soft} && ulimit -H -t {soft + 1} || exit 126; "
    gated = gated_stdin is not None
    first = (gated_stdin,) if gated_stdin is not None else ()
    prefix = () if guarded else (setpriv, "--pdeathsig", "KILL", "--")
    bash_startup = env is not None and any(name in env for name in _BASH_STARTUP_NAMES)
    if spec.cmd is not None and argv == spec.program_argv and not bash_startup:
        script = (
            _BASH_JOIN_SCRIPT.replace("{rlimit}", rlimit)
            .replace("{gate_arg}", _GATE_ARG if gated else "")
            .replace("{gate}", _GATE if gated else "")
            .replace("{stdin}", _BASH_GATE_STDIN if gated else "")
        )
        bash, _, cmd = argv
        return (*prefix, bash, "-c", script + cmd, "bash", *first, *files, "--")
    if sh is None:
        return None
    script = (
        _JOIN_SCRIPT.replace("{rlimit}", rlimit)
        .replace("{gate_arg}", _GATE_ARG if gated else "")
        .replace("{gate}", _GATE if gated else "")
        .replace("{stdin}", _GATE_STDIN if gated else "")
    )
    return (*prefix, sh, "-c", script, "sh", *first, *files, "--", *argv)
