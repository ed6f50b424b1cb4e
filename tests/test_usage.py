"""A client's usage report: CPU percent and resident memory of itself and its node processes."""

from __future__ import annotations

import os
import subprocess
import sys

from tasksprint.usage import UsageMeter, proc_cpu_seconds, proc_rss_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_process_cpu_and_memory_are_read_and_a_missing_one_counts_for_nothing() -> None:
    me = os.getpid()
    assert proc_cpu_seconds(me) is not None and proc_cpu_seconds(me) >= 0
    assert proc_rss_bytes(me) is not None and proc_rss_bytes(me) > 0
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(done.stdout)  # reaped: no /proc entry
    assert proc_cpu_seconds(gone) is None and proc_rss_bytes(gone) is None
    meter = UsageMeter(FakeClock())
    assert meter.read([gone]) == (None, None)


def test_the_meter_turns_cpu_time_between_readings_into_a_percentage() -> None:
    clock = FakeClock()
    meter = UsageMeter(clock)
    cpu, rss = meter.read([os.getpid()])
    assert cpu is None and rss is not None and rss > 0  # no CPU figure before a second reading
    before = proc_cpu_seconds(os.getpid())
    assert before is not None
    while (proc_cpu_seconds(os.getpid()) or 0) - before < 0.05:  # burn some CPU
        sum(range(10_000))
    used = (proc_cpu_seconds(os.getpid()) or 0) - before
    clock.now = 10.0
    cpu, rss = meter.read([os.getpid(), os.getpid()])  # a pid given twice counts once
    assert cpu is not None and rss is not None
    # The CPU used over the 10 s the fake clock says passed, within one clock tick either side.
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert 100 * (used - 2 * tick) / 10 <= cpu <= 100 * (used + 2 * tick) / 10 + 0.1
