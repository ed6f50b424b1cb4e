"""Fault injection end to end: ``jepsen/run --scenario all`` with a short fault window.

Runs every nemesis (partitions, the 5-replica majorities ring and bridge,
kill -9 of the leader / a minority / everyone, SIGSTOP, a skewed clock,
packet delay/loss/duplication/reordering, an isolated client, and a mix of
them) against a real cluster in network namespaces, with ``tasksprint
status`` and ``tasksprint cancel`` running alongside, and checks, through
the run's JSON report, that every scenario ran, every checker passed and
each fault really took effect; then that the run left nothing behind: no
``tsj-`` namespace and no process carrying the run's marker.

Needs root and ``ip netns``; skipped otherwise.  The whole run takes a few
minutes (JEPSEN_TEST_TIME seconds of faults per scenario, default 8).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "jepsen" / "run"
FAULT_SECONDS = float(os.environ.get("JEPSEN_TEST_TIME", "8"))
GUARD_SECONDS = 900
SCENARIOS = [
    "partition-leader",
    "partition-halves",
    "majorities-ring",
    "bridge",
    "kill-leader",
    "kill-minority",
    "kill-all",
    "pause-leader",
    "clock-skew",
    "netem",
    "isolate-client",
    "mixed",
]
# Seconds a fault's recovery may take before the run counts it as never recovered.
RECOVERY_LIVENESS_SECONDS = 120
FIVE_REPLICAS = {"majorities-ring", "bridge"}
CHECKERS = [
    "exactly_once",
    "replicas_agree",
    "result_correct",
    "progress_after_heal",
    "recovery_bounded",
    "clients_stay_up",
    "cancels",
    "clean_stop",
]


def _netns_usable() -> str | None:
    """Why this machine cannot run the harness, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, iptables, tc)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(_netns_usable() is not None, reason=str(_netns_usable()))
def test_all_scenarios_pass_and_clean_up(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(RUN),
            "--scenario",
            "all",
            "--time",
            str(FAULT_SECONDS),
            "--seed",
            "20240601",
            # Here the bound only asks that every fault is recovered from (the
            # done count gets back to its pre-fault level) within the run: no
            # timing target in a test. Evidence runs pass a tight bound.
            "--max-recovery",
            str(RECOVERY_LIVENESS_SECONDS),
            "--report",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # The run directory (logs, data directories) goes under tmp_path too, not the system's temp dir.
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        out, _ = proc.communicate(timeout=GUARD_SECONDS)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the harness tears down on SIGTERM
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"jepsen/run did not finish within {GUARD_SECONDS}s:\n{out[-6000:]}")
    reports = list(tmp_path.glob("jepsen-all-*.json"))
    assert len(reports) == 1, f"no report written:\n{out[-6000:]}"
    doc = json.loads(reports[0].read_text())

    # The harness's own account of its teardown (checked before the verdict, so that a failing
    # run still shows whether it cleaned up); leftover processes and namespaces are also found
    # by the shared no_leaks fixture after the test.
    assert doc["cleanup"]["namespaces_left"] == []

    listed = [s["scenario"] for s in doc["scenarios"]]
    assert listed == SCENARIOS, out[-6000:]
    failed = {
        s["scenario"]: {name: c for name, c in s["checkers"].items() if not c["ok"]}
        for s in doc["scenarios"]
        if not s["ok"]
    }
    assert not failed, f"checkers failed: {json.dumps(failed, default=str)[:6000]}\n{out[-4000:]}"
    for s in doc["scenarios"]:
        assert sorted(s["checkers"]) == sorted(CHECKERS)
        assert any(f["event"] == "start" for f in s["faults"]), f"{s['scenario']}: no fault injected"
        assert s["operations"]["total"] > 0
        assert s["replicas"] == (5 if s["scenario"] in FIVE_REPLICAS else 3)
    by_name = {s["scenario"]: s for s in doc["scenarios"]}
    _check_faults_took_effect(by_name)
    # The cancel stream ran and some cancel was acknowledged as killing a running task.
    assert sum(s["checkers"]["cancels"]["acknowledged_kills"] for s in doc["scenarios"]) > 0
    assert doc["ok"] is True
    assert proc.returncode == 0, out[-6000:]


def _starts(scenario: dict) -> list[dict]:
    """Start events, with a mixed scenario's parts flattened."""
    out = []
    for f in scenario["faults"]:
        if f["event"] == "start":
            out.extend(f.get("parts", [f]))
    return out


def _check_faults_took_effect(by_name: dict[str, dict]) -> None:
    for start in _starts(by_name["majorities-ring"]):
        # Each replica sees itself and its two ring neighbours, and no two see the same majority.
        views = [tuple(v) for v in start["sees"].values()]
        assert all(len(v) == 3 for v in views) and len(set(views)) == 5, start
    for start in _starts(by_name["bridge"]):
        assert len(start["a"]) == len(start["b"]) == 2 and start["bridge"] not in start["a"] + start["b"], start
    for start in _starts(by_name["kill-minority"]):
        assert len(start["killed"]) == 1, start
    for start in _starts(by_name["clock-skew"]):
        # libfaketime took effect: a process started the same way reads a wall clock off by the offset.
        # The bounds come from the real instants before and after it ran (span d); its clock also ran at
        # `rate` for at most d before the reading; 0.1 s for the rounding of the spec.
        offset_text, rate_text = start["faketime"].split()
        offset, rate = float(offset_text.rstrip("s")), float(rate_text.lstrip("x"))
        assert start["measured"] is not None, start
        low, high = start["measured"]["wall_offset_bounds"]
        d = high - low
        assert low - max(0.0, rate - 1) * d - 0.1 <= offset <= high + max(0.0, 1 - rate) * d + 0.1, start
    for start in _starts(by_name["netem"]):
        assert start["mode"] in ("netem", "nfqueue", "iptables-loss"), start
    for stop in (f for f in by_name["netem"]["faults"] if f["event"] == "stop"):
        if stop["mode"] == "nfqueue":
            # The userspace queue saw the replicas' traffic and delayed it.
            assert all(c is not None and c["packets"] > 0 and c["delayed"] > 0 for c in stop["packets"].values()), stop
