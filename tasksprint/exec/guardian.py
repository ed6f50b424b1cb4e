"""A small process that kills a client's task groups when the client dies.

A task runs in a cgroup of its own, named ``<client pid>-<random>`` (see
:mod:`tasksprint.exec.cgroup`).  If the client dies without cleaning up
(SIGKILL, a crash, the OOM killer), something else must kill what those
groups still hold.  The kernel's parent-death signal (``PR_SET_PDEATHSIG``)
reaches only a task's main process, and asking for it costs a program
execution per task (``setpriv``) or Python in every forked child.  A guardian
costs one process per client instead and kills whole trees:

* :meth:`Guardian.start` starts it (``python -m tasksprint.exec.guardian``)
  with the read end of a pipe whose write end only the client holds
  (close-on-exec: no task inherits it);
* the guardian blocks reading that pipe.  End of file means the write end is
  closed: the client died, or closed it on purpose (:meth:`Guardian.close`);
* it then kills every process in the client's task groups, round after round
  until each group is empty, removes the groups, and exits.

A task spawned while the client died either joined its group (and is
killed with it) or finds the group gone and ends without running (the join
fails).  The guardian ignores SIGINT and SIGHUP and runs in a session of its
own: a terminal's signals that kill the client do not kill it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tasksprint.exec.cgroup import CgroupLayout, remove_client_groups

__all__ = ["Guardian"]


class Guardian:
    """The guardian of this process's task groups: started, watched, closed by its owner."""

    def __init__(self, layout: CgroupLayout) -> None:
        self._layout = layout
        self._write: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the guardian process; raises ``OSError`` when it cannot be started."""
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            args = [sys.executable, "-m", __name__, str(read), str(os.getpid()), *self._parents()]
            self._proc = subprocess.Popen(
                args,
                pass_fds=(read,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # it says nothing; a pipe the client's reader waits on it must not hold
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        self._write = write

    def _parents(self) -> list[str]:
        return list(dict.fromkeys(self._layout.parents.values()))

    def alive(self) -> bool:
        """Whether the guardian runs: only then does a task die with the client without more ado."""
        return self._proc is not None and self._write is not None and self._proc.poll() is None

    def close(self) -> None:
        """Let the guardian remove what is left of this process's groups and end; wait for it."""
        if self._write is not None:
            os.close(self._write)
            self._write = None
        if self._proc is not None:
            self._proc.wait()
            self._proc = None


def main(argv: list[str]) -> int:
    """The guardian process: ``FD OWNER_PID PARENT...``."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    fd, owner, parents = int(argv[0]), int(argv[1]), argv[2:]
    while os.read(fd, 64):
        pass  # nothing is ever written: only the end of file counts
    remove_client_groups(parents, owner)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
