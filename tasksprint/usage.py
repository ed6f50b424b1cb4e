"""What a worker client and its node processes use of the machine: CPU and resident memory.

A client reports these with each view poll (``ViewRequest.cpu`` and
``rss``) so that ``tasksprint status``, the dashboard and ``tasksprint top``
can show each worker's load.  :class:`UsageMeter` reads ``/proc/<pid>/stat``
and ``/proc/<pid>/statm`` of the processes it is given (the client and its
node processes) and turns the CPU time they used between two readings into
a percentage of one CPU.  Where ``/proc`` is missing (not Linux) or a
process is gone, that process counts for nothing; nothing here raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import attrs

__all__ = ["UsageMeter", "proc_cpu_seconds", "proc_rss_bytes"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds process ``pid`` has used; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
        # The command name (field 2) is in parentheses and may hold spaces: split after it.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return None


def proc_rss_bytes(pid: int) -> int | None:
    """Resident memory of process ``pid`` in bytes; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read(4096).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@attrs.define(eq=False)
class UsageMeter:
    """CPU percent and resident bytes of a changing set of processes, between successive readings.

    ``clock`` returns seconds (monotonic).  A process first seen at a reading
    adds its memory at once and its CPU from the next reading on (its CPU
    time before that was spent before this meter could see it).
    """

    clock: Callable[[], float]
    _last: dict[int, float] = attrs.Factory(dict)
    _at: float | None = None

    def read(self, pids: Iterable[int]) -> tuple[float | None, int | None]:
        """``(cpu percent of one CPU since the last reading, resident bytes)``; None for what is unknown."""
        now = self.clock()
        used = 0.0
        rss = 0
        seen_any = False
        current: dict[int, float] = {}
        for pid in dict.fromkeys(pids):
            cpu = proc_cpu_seconds(pid)
            mem = proc_rss_bytes(pid)
            if cpu is None or mem is None:
                continue
            seen_any = True
            current[pid] = cpu
            rss += mem
            before = self._last.get(pid)
            if before is not None:
                used += max(0.0, cpu - before)
        percent = None
        if self._at is not None and now > self._at and seen_any:
            percent = round(100.0 * used / (now - self._at), 1)
        self._last, self._at = current, now
        return percent, (rss if seen_any else None)
