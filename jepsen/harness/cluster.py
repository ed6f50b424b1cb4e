"""TaskSprint replica and client processes, each in its own namespace.

Every process is started with ``ip netns exec`` (which execs, so the pid we
hold is the tasksprint process itself) in a new session, so that a signal
to its process group reaches the node processes a client started, and
carries ``TSJ_MARK=<run id>`` in its environment so that :func:`leftovers`
can find anything that escaped.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from jepsen.harness import leaks
from jepsen.harness.net import Network

MARK_ENV = "TSJ_MARK"
REPLICA_PORT = 7000
ELECTION_TIMEOUT = 0.3  # tasksprint's default; randomized up to twice this


def leftovers(mark: str) -> list[int]:
    """Live processes whose environment carries ``TSJ_MARK=mark``."""
    return sorted(leaks.marked(MARK_ENV, mark))


class Proc:
    """One tasksprint process we started (and may restart)."""

    def __init__(self, short: str, cmd: list[str], log: Path, env: dict[str, str], net: Network) -> None:
        self.short = short
        self.cmd = cmd
        self.log = log
        self.env = env
        self.net = net
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self.stopped = False  # SIGSTOPped by a nemesis
        self.wrap: list[str] = []  # prefix of the running command (e.g. `env LD_PRELOAD=... FAKETIME=...`)

    def start(self, wrap: list[str] | None = None) -> None:
        """Start the process; ``wrap`` prefixes its command line for this start only."""
        assert not self.alive()
        self.wrap = list(wrap or [])
        cmd = self.wrap + self.cmd
        with open(self.log, "ab") as logf:
            logf.write(f"\n=== jepsen: start #{self.starts} at {time.time():.3f}: {shlex.join(cmd)}\n".encode())
            logf.flush()
            self.popen = subprocess.Popen(
                self.net.exec_prefix(self.short) + cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.starts += 1
        self.stopped = False

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: int, group: bool = False) -> bool:
        if not self.alive():
            return False
        try:
            if group:
                os.killpg(self.popen.pid, sig)
            else:
                os.kill(self.popen.pid, sig)
        except ProcessLookupError:
            return False
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False
        return True

    def kill9(self) -> None:
        """kill -9 the process (and its group) and reap it."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self.stopped = False

    def stop(self, grace: float = 3.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGCONT)
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (node processes) goes too.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Cluster:
    """Replicas r0..rN-1 and clients c0..cM-1 of one scenario."""

    def __init__(
        self,
        net: Network,
        rundir: Path,
        python: str,
        scheduler: str,
        node_script: Path,
        replicas: int,
        clients: int,
        slots: int,
        client_timeout: float,
        mark: str,
    ) -> None:
        self.net = net
        self.rundir = rundir
        self.secret_file = rundir / "secret"
        self.secret_file.write_bytes(os.urandom(24).hex().encode() + b"\n")
        self.secret_file.chmod(0o600)
        self.secret = self.secret_file.read_bytes().strip()
        env = dict(os.environ)
        env[MARK_ENV] = mark
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        self.python = python
        self.replica_names = [f"r{i}" for i in range(replicas)]
        self.client_names = [f"c{i}" for i in range(clients)]
        self.addrs = [(net.addrs[r], REPLICA_PORT) for r in self.replica_names]
        self.peers = ",".join(f"{h}:{p}" for h, p in self.addrs)
        self.replicas: list[Proc] = []
        self.clients: list[Proc] = []
        # Helper processes a nemesis started (packet-queue handlers): stopped with the cluster.
        self.aux: list[subprocess.Popen] = []
        for i, r in enumerate(self.replica_names):
            data = rundir / f"{r}-data"
            data.mkdir()
            cmd = [
                python,
                "-m",
                "tasksprint.cli",
                "replica",
                "--id",
                str(i),
                "--peers",
                self.peers,
                "--data",
                str(data),
                "--secret-file",
                str(self.secret_file),
                "--scheduler",
                scheduler,
                "--client-timeout",
                str(client_timeout),
                "--log-format",
                "json",
            ]
            self.replicas.append(Proc(r, cmd, rundir / f"{r}.log", env, net))
        # Spilled outputs stay in the run directory: a client killed with
        # SIGKILL cannot remove its own.
        spill = rundir / "spill"
        spill.mkdir(exist_ok=True)
        for c in self.client_names:
            node = shlex.join([python, str(node_script), c])
            cmd = [
                python,
                "-m",
                "tasksprint.cli",
                "client",
                "--coordinators",
                self.peers,
                "--node",
                node,
                "--slots",
                str(slots),
                "--secret-file",
                str(self.secret_file),
                "--data-host",
                net.addrs[c],
                "--log-format",
                "json",
                "--spill-dir",
                str(spill),
            ]
            # No --name: a restarted client must join as a new client (see README, known bugs).
            self.clients.append(Proc(c, cmd, rundir / f"{c}.log", env, net))

    def start(self) -> None:
        for p in self.replicas:
            p.start()
        for p in self.clients:
            p.start()

    def cli(self, *args: str) -> list[str]:
        """A ``tasksprint`` command line run from the harness's own namespace."""
        return [
            self.python,
            "-m",
            "tasksprint.cli",
            *args,
            "--coordinators",
            self.peers,
            "--secret-file",
            str(self.secret_file),
        ]

    def stop(self) -> None:
        for a in self.aux:
            if a.poll() is None:
                try:
                    os.killpg(a.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            a.wait()
        self.aux = []
        for p in self.clients + self.replicas:
            try:
                p.stop()
            except Exception as exc:
                print(f"jepsen: stopping {p.short}: {exc}", file=sys.stderr)
