"""What a test's command tasks leave behind: processes carrying its mark, this process's task cgroups."""

from __future__ import annotations

import os

from tasksprint.exec.cgroup import CgroupLayout


def marked_processes(var: str, mark: str) -> list[int]:
    """The live processes whose environment has ``var=mark`` (one being executed may be missed)."""
    needle = f"{var}={mark}".encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found


def own_task_groups(layout: CgroupLayout) -> list[str]:
    """The task cgroups of ``layout`` named for this process (``<pid>-...``), sorted."""
    prefix = f"{os.getpid()}-"
    return sorted(
        os.path.join(parent, name)
        for parent in set(layout.parents.values())
        for name in os.listdir(parent)
        if name.startswith(prefix)
    )
