"""A task's process tree without cgroups: /proc scans and a child subreaper.

When the runner cannot create a cgroup it still has to find every process a
task started, including ones that called ``setsid`` or daemonized (forked
twice so their parent exited).  Two facts make that possible:

* the runner process is made a *child subreaper*
  (``prctl(PR_SET_CHILD_SUBREAPER)``), so an orphaned descendant is
  re-parented to the runner instead of to init;
* every task runs with a unique marker in its environment
  (``TASKSPRINT_TASK_ID`` and ``TASKSPRINT_ATTEMPT``), inherited by its
  descendants.

A task's processes are then the descendants of its main process (by parent
pid) plus the runner's own children that carry the marker or are still in
the session the main process led.  A descendant
that both clears its environment and escapes before a scan sees it cannot be
found this way; cgroups close that hole.  Processes are named by
``(pid, start time)`` so a recycled pid is never killed by mistake.

The runner reaps only the re-parented processes it identified as a task's
(killed by it, or zombies in the task's session), with :func:`os.wait4` on
each pid, after :func:`still_dying` says none of them can still be handed
over; it never waits for "any child", which would steal the exit status of
processes other code started.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1

# Bytes of /proc/PID/environ read when looking for a marker: bounded, as the
# environment is the task's data.
MAX_ENVIRON_BYTES = 1 << 20

# Bound at import: a forked child must not load a library (the loader's
# locks may have been held by another thread at fork time).  The process's
# own global symbols include the C library's prctl; ctypes.util.find_library
# would run ldconfig in a subprocess at every start of every process.
_libc = ctypes.CDLL(None, use_errno=True)
_subreaper_pid: int | None = None


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def become_subreaper() -> None:
    """Make this process a child subreaper (once per process); orphans of its tasks come back to it."""
    global _subreaper_pid
    if _subreaper_pid != os.getpid():
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _subreaper_pid = os.getpid()


def is_subreaper() -> bool:
    """Whether this process made itself a child subreaper (orphans of tasks come back to it)."""
    return _subreaper_pid == os.getpid()


def die_with_parent() -> None:
    """In a freshly forked child: be killed (SIGKILL) when the parent thread exits."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def proc_stat(pid: int) -> tuple[int, int, str, int] | None:
    """(ppid, start time in clock ticks, state, session id) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold ") ".
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]), int(fields[19]), fields[0].decode(), int(fields[3])


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read(MAX_ENVIRON_BYTES)
    except OSError:
        return False
    return marker in data.split(b"\0")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def task_processes(root: tuple[int, int] | None, markers: tuple[bytes, ...]) -> dict[int, int]:
    """The live processes of one task: ``{pid: start time}``.

    ``root`` is the task's main process as ``(pid, start time)`` (None once it
    was reaped); ``markers`` are ``NAME=value`` environment entries that all
    must be present for a child of this process to count as the task's.
    Zombies are left out: they cannot be killed, only reaped.
    """
    me = os.getpid()
    table: dict[int, tuple[int, int, str, int]] = {}
    for pid in _all_pids():
        st = proc_stat(pid)
        if st is not None:
            table[pid] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _start, _state, _sid) in table.items():
        children.setdefault(ppid, []).append(pid)
    seeds = []
    if root is not None and root[0] in table and table[root[0]][1] == root[1]:
        seeds.append(root[0])
    for pid in children.get(me, ()):
        if root is not None and pid == root[0]:
            continue
        # An orphan that kept the task's session, or that carries its markers.
        if (root is not None and table[pid][3] == root[0]) or all(_environ_has(pid, m) for m in markers):
            seeds.append(pid)
    found: dict[int, int] = {}
    stack = list(seeds)
    while stack:
        pid = stack.pop()
        if pid in found or pid == me:
            continue
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, ()))
    return {pid: start for pid, start in found.items() if table[pid][2] != "Z"}


def is_same_process(pid: int, start: int) -> bool:
    """True when ``pid`` still names the process that started at ``start`` (zombies included)."""
    st = proc_stat(pid)
    return st is not None and st[1] == start


def kill_processes(procs: dict[int, int], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to each ``{pid: start time}`` that is still the same process."""
    for pid, start in procs.items():
        if is_same_process(pid, start):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def still_dying(known: dict[int, int]) -> dict[int, int]:
    """Those of ``known`` (``{pid: start time}``, all sent SIGKILL) not yet settled.

    A process is settled once it is a zombie whose parent will not change:
    its parent is this process, or is outside ``known``, or is itself a
    zombie (a parent hands its children over before it becomes one).  Until
    then an orphan may still be on its way to this process, to be reaped.
    """
    stats = {pid: st for pid, start in known.items() if (st := proc_stat(pid)) is not None and st[1] == start}
    me = os.getpid()
    dying = {}
    for pid, st in stats.items():
        parent = stats.get(st[0])
        if st[2] != "Z" or (st[0] != me and parent is not None and parent[2] != "Z"):
            dying[pid] = st[1]
    return dying


def session_orphans(session: int) -> dict[int, int]:
    """Live (not yet zombie) children of this process in ``session``: ``{pid: start time}``.

    The task's main process led ``session``; a child of this process in it
    is an orphan of the task (this process being its subreaper), perhaps
    one that already left its cgroup on its way out.
    """
    me = os.getpid()
    found = {}
    for pid in _all_pids():
        st = proc_stat(pid)
        if st is not None and st[0] == me and st[3] == session and pid != session and st[2] != "Z":
            found[pid] = st[1]
    return found


def reap_adopted(known: dict[int, int], session: int | None = None) -> list[tuple[int, resource.struct_rusage]]:
    """Reap zombie children of this process that belong to one task.

    They are those among ``known`` (``{pid: start time}``, processes a scan
    or a kill attributed to the task) and, when ``session`` is given (the
    task's main pid, which led a new session), those still in that session:
    a zombie's environment cannot be read, but its session can.  The main
    process itself is never reaped here (its own waiter does that), and
    nothing other code started is.  Returns ``(pid, rusage)`` of each one.
    """
    me = os.getpid()
    candidates = dict(known)
    if session is not None:
        for pid in _all_pids():
            st = proc_stat(pid)
            if st is not None and st[0] == me and st[3] == session and pid != session:
                candidates.setdefault(pid, st[1])
    reaped = []
    for pid, start in candidates.items():
        st = proc_stat(pid)
        if st is None or st[0] != me or st[1] != start or st[2] != "Z":
            continue
        try:
            got, _status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if got == pid:
            reaped.append((pid, usage))
    return reaped


def tree_cpu_seconds(procs: dict[int, int]) -> float:
    """User + system CPU of the listed processes and of the children they reaped, summed."""
    ticks = 0
    for pid in procs:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_bytes(procs: dict[int, int]) -> int:
    """Resident memory of the listed processes, summed (shared pages counted once per process)."""
    total = 0
    for pid in procs:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total
