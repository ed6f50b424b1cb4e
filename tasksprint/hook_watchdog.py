"""The replica's watchdog over scheduler hooks: a hook that runs too long is reported.

A scheduler hook runs inside the driver pass, on the event loop's thread;
while it runs, the replica answers nobody.  :class:`HookWatchdog` is a thread
that looks at the app every quarter second and logs a call still running
after ``--hook-report-after`` seconds, and keeps it (as
:class:`~tasksprint.api.SlowHook`) for the replica's status, where
``tasksprint status`` shows it.  What it keeps is this replica's own
observation, not replicated state.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tasksprint.api import SlowHook

__all__ = ["HookWatchdog"]


class HookWatchdog:
    """A thread that reports a scheduler hook still running after ``after`` seconds.

    Hooks run inside the driver pass, on the event loop's thread, so while
    one runs the replica answers nobody: this thread is the one that can
    still speak.  It logs ``scheduler_hook_slow`` (hook, slot, task, client,
    seconds) once per call, and ``scheduler_hook_returned`` when a reported
    call ends.  It only reads the app's :meth:`~tasksprint.app.App.hook_running`.
    :attr:`slow` holds the last call it reported, for the replica's status.
    """

    POLL = 0.25  # seconds between looks

    def __init__(self, app: Any, after: float, log_: Any) -> None:
        self._app, self._after, self._log = app, after, log_
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hook-watchdog", daemon=True)
        #: The last call reported, as :class:`~tasksprint.api.SlowHook` (replaced whole,
        #: never changed in place, so the loop thread may read it at any time).
        self.slow: SlowHook | None = None

    def start(self) -> None:
        if self._after > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        seen: tuple[int, dict] | None = None
        since = 0.0
        reported = False
        while not self._stop.wait(self.POLL):
            try:
                running = self._app.hook_running()
            except Exception:  # read while the loop thread changes it: look again later
                continue
            now = time.monotonic()
            if running is None or seen is None or running[0] != seen[0]:
                if reported and seen is not None:
                    self._log.warning("scheduler_hook_returned", seconds=round(now - since, 1), **seen[1])
                    self.slow = _slow_hook(seen[1], now - since, running=False)
                seen, since, reported = running, now, False
                continue
            if reported:
                self.slow = _slow_hook(seen[1], now - since, running=True)
            elif now - since >= self._after:
                reported = True
                self.slow = _slow_hook(seen[1], now - since, running=True)
                self._log.error(
                    "scheduler_hook_slow",
                    seconds=round(now - since, 1),
                    message=(
                        f"scheduler hook {seen[1].get('hook')} (log slot {seen[1].get('slot')}) has not returned "
                        f"after {now - since:.0f}s; every replica waits for it"
                    ),
                    **seen[1],
                )


def _slow_hook(hook: dict, seconds: float, *, running: bool) -> SlowHook | None:
    """The watchdog's record of a slow call of ``hook`` (as ``hook_running`` gives it)."""
    try:
        return SlowHook(
            hook=str(hook.get("hook"))[:64],
            slot=hook.get("slot") if isinstance(hook.get("slot"), int) else 0,
            tid=hook.get("tid") if isinstance(hook.get("tid"), int) else None,
            cid=hook.get("cid") if isinstance(hook.get("cid"), int) else None,
            seconds=round(seconds, 1),
            running=running,
        )
    except (TypeError, ValueError):  # a slot or id out of range: nothing to show
        return None
