"""Starting wrapped tasks on a thread of its own, so the event loop does not wait for them.

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

import queue
import subprocess
import threading
from collections.abc import Callable

import trio

__all__ = ["spawn"]

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
