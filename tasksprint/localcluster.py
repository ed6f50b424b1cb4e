"""Replica processes on this machine: for ``tasksprint run``, the tests and the benchmarks.

:class:`LocalCluster` starts ``tasksprint replica`` processes on loopback
with free ports, a data directory and a log file each under one base
directory, and can kill (any signal), restart and wipe them.  Always use it as
a context manager: leaving the block kills every process it started.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

HOST = "127.0.0.1"


#: Where the kernel picks the local ports of outgoing connections and of ``bind(0)``.
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return lo, hi


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago on ``host``.

    They are drawn outside the kernel's ephemeral range: a port taken from
    it (as ``bind(0)`` would) may be given, between this call and the
    replica's bind, to an outgoing connection as its local port (clients
    started beside the replicas connect at once), and the replica could not
    listen.  Outside the range only an explicit bind can take it.
    """
    lo, hi = _ephemeral_range()
    below = range(max(1024, lo - 10_000), lo)
    choices = below if len(below) >= 1000 else range(hi + 1, 65536)
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(max(200, 20 * n)):
        if len(ports) == n:
            return ports
        port = rng.choice(choices)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use (or lingering): another one
        ports.append(port)
    if len(ports) == n:
        return ports
    raise OSError(f"found only {len(ports)} of {n} free TCP ports on {host} outside the ephemeral range {lo}-{hi}")


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """``proc.wait(timeout)`` that returns as soon as the process has exited.

    ``Popen.wait`` with a timeout looks for the exit, then sleeps, up to 50 ms
    at a time: each wait of a run's shut-down could end that much after the
    process did.  On Linux a pidfd of the process becomes readable when it
    exits.  Raises :class:`subprocess.TimeoutExpired` as ``Popen.wait`` does.
    """
    deadline = time.monotonic() + timeout
    if proc.returncode is None and hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            pass  # no pidfd here (or reaped meanwhile): Popen.wait below
        else:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll(max(0, int(timeout * 1000) + 1))
            finally:
                os.close(fd)
    # Once the pidfd said so, at once; but the exit may reach this parent a little after the
    # pidfd (a tracer such as strace sees it first): Popen.wait covers the rest of the timeout.
    try:
        return proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise subprocess.TimeoutExpired(proc.args, timeout) from None


@attrs.define(eq=False)
class LocalCluster:
    """``replicas`` replica processes under ``base``; see the module docstring."""

    base: Path
    replicas: int = 3
    scheduler: str | None = None
    extra_args: Sequence[str] = ()
    secret: bytes = attrs.Factory(lambda: os.urandom(24).hex().encode())
    env: dict | None = None
    host: str = HOST  # where the replicas listen (and their peers reach them)
    ports: list[int] = attrs.Factory(list)
    procs: list[subprocess.Popen | None] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.ports = free_ports(self.replicas, self.host)
        self.procs = [None] * self.replicas
        self.secret_file.write_bytes(self.secret + b"\n")
        self.secret_file.chmod(0o600)
        for i in range(self.replicas):
            self.data_dir(i).mkdir(exist_ok=True)

    @property
    def secret_file(self) -> Path:
        return self.base / "secret"

    @property
    def addrs(self) -> list[tuple[str, int]]:
        return [(self.host, p) for p in self.ports]

    @property
    def peers_arg(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.addrs)

    def data_dir(self, i: int) -> Path:
        return self.base / f"replica{i}"

    def log_file(self, i: int) -> Path:
        return self.base / f"replica{i}.log"

    def command(self, i: int) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "tasksprint.cli",
            "replica",
            "--id",
            str(i),
            "--peers",
            self.peers_arg,
            "--data",
            str(self.data_dir(i)),
            "--secret-file",
            str(self.secret_file),
            "--log-format",
            "json",
        ]
        if self.scheduler:
            cmd += ["--scheduler", self.scheduler]
        return cmd + list(self.extra_args)

    def start(self) -> LocalCluster:
        for i in range(self.replicas):
            self.start_replica(i)
        return self

    def start_replica(self, i: int) -> None:
        assert self.procs[i] is None or self.procs[i].poll() is not None, f"replica {i} is running"
        with open(self.log_file(i), "ab") as logf:
            self.procs[i] = subprocess.Popen(
                self.command(i),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def signal(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(sig)

    def kill(self, i: int) -> None:
        """kill -9 replica ``i`` and reap it."""
        p = self.procs[i]
        if p is None:
            return
        if p.poll() is None:
            p.kill()
        p.wait()

    def restart(self, i: int) -> None:
        self.kill(i)
        self.start_replica(i)

    def wipe(self, i: int) -> None:
        """Kill replica ``i`` and empty its data directory (a dead disk replaced)."""
        self.kill(i)
        shutil.rmtree(self.data_dir(i))
        self.data_dir(i).mkdir()

    def alive(self, i: int) -> bool:
        p = self.procs[i]
        return p is not None and p.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate every replica (SIGTERM, then SIGKILL) and reap them."""
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p is None:
                continue
            try:
                wait_exit(p, max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, i: int) -> str:
        try:
            return self.log_file(i).read_text(errors="replace")
        except FileNotFoundError:
            return ""
