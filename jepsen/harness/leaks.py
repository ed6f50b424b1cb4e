"""Finding processes and network namespaces a run left behind (Linux ``/proc``).

One detector for both suites: the pytest suite's leak fixture
(``tests/conftest.py``) and the fault-injection harness's teardown use it.

A process is *ours* if it descends from a given process (its parent chain
leads there) or if its environment carries a marker variable set before it
was started: a process started in a new session whose parent died is
re-parented to init, and only the marker still finds it.  Zombies (exited,
not yet reaped) are not counted: they hold no resources but a pid.

A network namespace of a fault-injection run is named ``tsj-<pid>-<short>``
after the harness process that made it; one whose harness is gone is stale.

Standard library only; reads ``/proc`` and ``/run/netns``, never runs ``ip``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

PROC = Path("/proc")
NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "tsj-"


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, or None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may itself contain spaces or parentheses.
    fields = stat.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[1])
    except (IndexError, ValueError):
        return None


def _pids() -> list[int]:
    try:
        return [int(e.name) for e in os.scandir(PROC) if e.name.isdigit()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    st = _state_and_parent(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(root: int | None = None) -> set[int]:
    """Live processes whose parent chain leads to ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    live = set()
    for pid in _pids():
        st = _state_and_parent(pid)
        if st is None:
            continue
        children.setdefault(st[1], []).append(pid)
        if st[0] not in ("Z", "X"):
            live.add(pid)
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found & live


def marked(name: str, value: str, *, prefix: bool = False) -> set[int]:
    """Live processes whose environment has ``name=value`` (or a value starting with it, with ``prefix``).

    This process is never included.
    """
    needle = f"{name}={value}".encode()
    me = os.getpid()
    found = set()
    for pid in _pids():
        if pid == me:
            continue
        try:
            env = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (any(e.startswith(needle) for e in env) if prefix else needle in env) and alive(pid):
            found.add(pid)
    return found


def has_children() -> bool:
    """Whether this process has a child right now (live or zombie), from any of its threads.

    True when the kernel does not say (no ``/proc/self/task/*/children``).
    """
    try:
        tasks = os.listdir(PROC / "self" / "task")
        return any((PROC / "self" / "task" / t / "children").read_text().strip() for t in tasks)
    except OSError:
        return True


def describe(pid: int) -> str:
    """``pid: command line`` of a process, for a report."""
    try:
        cmd = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "(gone)"
    return f"{pid}: {cmd}"


def kill(pids: set[int] | list[int]) -> None:
    """SIGKILL each of ``pids`` (after SIGCONT, for one that was stopped); gone ones are skipped."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                break


def namespaces(prefix: str = NETNS_PREFIX) -> set[str]:
    """Named network namespaces (``ip netns`` ones) starting with ``prefix``."""
    try:
        return {n for n in os.listdir(NETNS_DIR) if n.startswith(prefix)}
    except OSError:
        return set()


def namespace_owner(name: str) -> int | None:
    """The harness pid in a namespace name ``tsj-<pid>-...``, or None if it does not follow the rule."""
    if not name.startswith(NETNS_PREFIX):
        return None
    pid = name[len(NETNS_PREFIX) :].partition("-")[0]
    return int(pid) if pid.isdigit() else None


def stale_namespaces(prefix: str = NETNS_PREFIX) -> set[str]:
    """Namespaces named by the rule whose harness process is gone (never this process's own)."""
    me = os.getpid()
    out = set()
    for name in namespaces(prefix):
        owner = namespace_owner(name)
        if owner is not None and owner != me and not (PROC / str(owner)).exists():
            out.add(name)
    return out
