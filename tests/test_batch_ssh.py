"""``tasksprint batch -s HOST:N`` starting its engine over OpenSSH, against an sshd this test starts.

The sshd listens on a loopback address other than 127.0.0.1 (so the engine
is not taken for this machine), with a host key and an authorized key made
for the test; skipped where sshd is not installed or cannot run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasksprint.batch.statusfile import RecordKind, parse_status_file
from tasksprint.localcluster import free_ports

SSHD = "/usr/sbin/sshd"
SSH_HOST = "127.0.0.2"
RUN_TIMEOUT = 180.0


@pytest.fixture
def sshd(tmp_path: Path):
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None or os.geteuid() != 0:
        pytest.skip("needs root, sshd and ssh-keygen (tests/setup-system.sh installs openssh-server)")
    keys = tmp_path / "keys"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "user")], check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = free_ports(1, SSH_HOST)[0]
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress {SSH_HOST}\nHostKey {keys / 'host'}\nPidFile {keys / 'pid'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPasswordAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nAcceptEnv TASKSPRINT_TEST_MARK\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=open(keys / "sshd.log", "wb"))
    ssh = (
        f"ssh -p {port} -i {keys / 'user'} -o BatchMode=yes -o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o SendEnv=TASKSPRINT_TEST_MARK"
    )
    deadline = time.monotonic() + 30
    while subprocess.run([*ssh.split(), SSH_HOST, "true"], capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.skip(f"sshd did not start: {(keys / 'sshd.log').read_text()[-500:]}")
        time.sleep(0.1)
    try:
        yield ssh, keys / "sshd.log"
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_engine_over_ssh_runs_the_tasks(tmp_path: Path, sshd: tuple[str, Path]) -> None:
    ssh, sshd_log = sshd
    logins_before = sshd_log.read_text().count("Accepted publickey")
    work = tmp_path / "work"
    work.mkdir()
    (work / "Tasks").write_text("echo $DISBATCH_ENGINE_RANK > engine.$DISBATCH_TASKID\ntrue\ntrue\n")
    env = dict(os.environ, TASKSPRINT_SSH_COMMAND=ssh)
    r = subprocess.run(
        [sys.executable, "-m", "tasksprint.cli", "batch", "-s", f"{SSH_HOST}:2", "-p", "ssh", "Tasks"],
        cwd=work,
        env=env,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr.decode() + (work / "ssh_tasksprint" / "engine0.log").read_text()
    records = parse_status_file((work / "ssh_status.txt").read_bytes()).records
    assert sorted(rec.task_id for rec in records) == [0, 1, 2]
    assert all(rec.kind is RecordKind.TASK and rec.exit_code == 0 for rec in records)
    assert (work / "engine.0").read_text() == "0\n"
    # The engine was started through this sshd: one more login than the fixture's own.
    assert sshd_log.read_text().count("Accepted publickey") == logins_before + 1
