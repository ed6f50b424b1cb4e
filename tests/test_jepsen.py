"""Fault injection end to end: ``jepsen/run --scenario all`` with a short fault window.

Runs every nemesis (partitions, kill -9, SIGSTOP, netem, an isolated
client) against a real three-replica cluster in network namespaces and
checks, through the run's JSON report, that every scenario ran and every
checker passed; then that the run left nothing behind: no ``tsj-``
namespace and no process carrying the run's marker.

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
SCENARIOS = ["partition-leader", "partition-halves", "kill-leader", "kill-all", "pause-leader", "netem",
             "isolate-client"]
CHECKERS = ["exactly_once", "replicas_agree", "result_correct", "progress_after_heal", "clients_stay_up", "clean_stop"]


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


def _tsj_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("tsj-")]


def _marked_processes(prefix: str) -> list[str]:
    """Live processes whose environment has TSJ_MARK starting with ``prefix``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            continue
        if any(e.startswith(f"TSJ_MARK={prefix}".encode()) for e in env):
            found.append(entry.name)
    return found


@pytest.mark.skipif(_netns_usable() is not None, reason=str(_netns_usable()))
def test_all_scenarios_pass_and_clean_up(tmp_path: Path) -> None:
    before = set(_tsj_namespaces())
    proc = subprocess.Popen(
        [sys.executable, str(RUN), "--scenario", "all", "--time", str(FAULT_SECONDS), "--seed", "20240601",
         "--report", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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

    # Everything torn down: namespaces, processes (checked before the verdict, so that a
    # failing run still shows whether it cleaned up).
    assert set(_tsj_namespaces()) <= before, f"namespaces left: {sorted(set(_tsj_namespaces()) - before)}"
    assert doc["cleanup"]["namespaces_left"] == []
    assert _marked_processes(f"tsj-{proc.pid}-") == []

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
    assert doc["ok"] is True
    assert proc.returncode == 0, out[-6000:]
