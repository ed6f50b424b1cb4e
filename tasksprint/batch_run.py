"""A batch run's files and processes: the run directory, its replicas and its engines' clients.

``<prefix>_tasksprint/`` holds the cluster secret, the scheduler file (the
task file and options), the environment file every task sources, and
``run.json`` (the replicas' addresses, the processes' pids, the engines,
the options a reattaching driver must honour).  Replicas and clients run in
sessions of their own, so the driver's death does not stop them.  Engines
on other hosts start over ssh; under Slurm, engines and replicas on other
nodes start as job steps (srun) of the job's allocation, and listen on
their node's address as Slurm knows it (``NodeAddr``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from tasksprint.batch.scheduler import engine_name
from tasksprint.batch.slurm import node_addresses, same_host
from tasksprint.localcluster import LocalCluster, wait_exit

__all__ = [
    "EXIT_FAILED",
    "RUN_DIR_SUFFIX",
    "SSH_COMMAND_ENV",
    "BatchRun",
    "env_file",
    "in_slurm",
    "ours",
    "slurm_addresses",
    "slurm_hostnames",
    "stop_pids",
    "this_node",
]

RUN_DIR_SUFFIX = "_tasksprint"
#: The ssh command that starts engines on other hosts (default ``ssh -o BatchMode=yes``).
SSH_COMMAND_ENV = "TASKSPRINT_SSH_COMMAND"
# Environment variables not passed on to tasks: the shell's own, and ours.
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_SKIP = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "PS1", "BASH_FUNC"})
# Under Slurm, the variables that describe the driver's node and job step, not the job: a task's differ.
_SLURM_NODE_VARS = frozenset(
    {
        "SLURMD_NODENAME",
        "SLURM_NODEID",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_GTIDS",
        "SLURM_TASK_PID",
        "SLURM_CPUS_ON_NODE",
        "SLURM_TOPOLOGY_ADDR",
        "SLURM_TOPOLOGY_ADDR_PATTERN",
        "SLURM_LAUNCH_NODE_IPADDR",
        "SLURM_SRUN_COMM_HOST",
        "SLURM_SRUN_COMM_PORT",
    }
)


@attrs.define(eq=False)
class _Cluster(LocalCluster):
    """The run's replicas, listening on ``host`` (loopback unless engines on other machines must reach them).

    With ``hosts`` (under Slurm), replica ``i`` runs on node ``hosts[i]``, started there with srun,
    and listens on that node's address (``addresses``, else its name).
    """

    host: str = "127.0.0.1"
    hosts: list[str] = attrs.Factory(list)
    addresses: dict[str, str] = attrs.Factory(dict)

    @property
    def addrs(self) -> list[tuple[str, int]]:
        if not self.hosts:
            return [(self.host, p) for p in self.ports]
        return [(self.addresses.get(self.hosts[i], self.hosts[i]), p) for i, p in enumerate(self.ports)]

    def command(self, i: int) -> list[str]:
        command = super().command(i)
        if self.hosts and not same_host(self.hosts[i], this_node()):
            return [*_srun(self.hosts[i], f"{self.base.name}.replica{i}"), *command]
        return command

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the replicas; those in job steps of their own are asked with SIGTERM first (see :func:`stop_steps`)."""
        stepped = {i: p for i, p in enumerate(self.procs) if p is not None and p.poll() is None and _is_step(p)}
        if stepped:
            stop_steps([f"{self.base.name}.replica{i}" for i in stepped])
            deadline = time.monotonic() + timeout
            for p in stepped.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    wait_exit(p, max(0.01, deadline - time.monotonic()))
        super().stop(timeout)


def _srun(node: str, name: str) -> list[str]:
    """A job step named ``name`` of one task on ``node``, inside the job's allocation, beside the others."""
    return ["srun", "--nodes=1", "--ntasks=1", "--overlap", f"--nodelist={node}", f"--job-name={name}"]


def _is_step(proc: subprocess.Popen[bytes]) -> bool:
    args = proc.args
    return isinstance(args, list) and bool(args) and args[0] == "srun"


def stop_steps(names: list[str]) -> None:
    """Send SIGTERM to this job's steps named ``names``, so that what runs there ends as it does on a signal.

    (srun, sent SIGTERM itself, has Slurm kill its step instead.)  Best effort:
    the caller still waits for srun and ends it if it did not end.
    """
    if not names or not in_slurm():
        return
    try:
        listed = subprocess.run(
            ["squeue", "-h", "--steps", "-j", os.environ["SLURM_JOB_ID"], "-o", "%i %j"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        wanted = set(names)
        steps = [f[0] for f in (line.split() for line in listed.stdout.splitlines()) if len(f) == 2 and f[1] in wanted]
        if steps:
            subprocess.run(["scancel", "--signal=TERM", *steps], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return


#: The exit code of a batch that failed (a task failed with -e, or the run ended early).
EXIT_FAILED = 1

#: Written in the run directory when the driver stops the run.
ENDED = "ended"


@attrs.define(eq=False)
class BatchRun:
    """One run's files and processes; ``prefix`` names them all."""

    prefix: str
    replicas: int = 3
    replica_host: str = "127.0.0.1"
    replica_hosts: list[str] = attrs.Factory(list)  # one node per replica (under Slurm), else empty
    node_addrs: dict[str, str] = attrs.Factory(dict)  # where those nodes listen (NodeAddr), by name
    _flags: dict[str, Any] = attrs.Factory(dict)
    cluster: LocalCluster | None = None
    clients: list[subprocess.Popen[bytes]] = attrs.Factory(list)
    engine_procs: dict[int, subprocess.Popen[bytes]] = attrs.Factory(dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.prefix + RUN_DIR_SUFFIX)

    @property
    def status_path(self) -> Path:
        return Path(self.prefix + "_status.txt")

    def info(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "run.json").read_text())

    def start(
        self, config: dict[str, Any], engines: list[tuple[int, str, int]], flags: dict[str, Any] | None = None
    ) -> None:
        """Write the scheduler file and start the replicas and the local engines' clients."""
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=False)
        # Before any client starts: every task sources it.
        env_file(d / "env.sh", {rank: host for rank, host, _ in engines} if in_slurm() else None)
        (d / "scheduler.py").write_text(
            "from tasksprint.batch.scheduler import BatchScheduler\n\n\n"
            "class Batch(BatchScheduler):\n"
            f"    CONFIG = {config!r}\n"
        )
        self.cluster = _Cluster(
            d,
            self.replicas,
            scheduler=str(d / "scheduler.py") + ":Batch",
            host=self.replica_host,
            hosts=self.replica_hosts,
            addresses=self.node_addrs,
        )
        self._flags = dict(flags or {})
        self.cluster.start()
        self._write_info(engines)
        for rank, host, slots in engines:
            self.start_engine(rank, host, slots)
        self._write_info(engines)

    def _write_info(self, engines: list[tuple[int, str, int]]) -> None:
        assert self.cluster is not None
        info = {
            "peers": self.cluster.peers_arg,
            "replica_pids": [p.pid for p in self.cluster.procs if p is not None],
            "client_pids": [p.pid for p in self.clients],
            "engines": [list(e) for e in engines],
            "replica_hosts": self.replica_hosts,
            # The options a reattaching driver must honour as the first one did.
            "flags": self._flags,
        }
        tmp = self.run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.run_dir / "run.json")

    def client_command(self, rank: int, slots: int, peers: str | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tasksprint.cli",
            "client",
            "--coordinators",
            peers if peers is not None else self.info()["peers"],
            "--secret-file",
            str((self.run_dir / "secret").resolve()),
            "--name",
            engine_name(rank),
            "--have",
            engine_name(rank),
            "--slots",
            str(slots),
            "--log-format",
            "json",
            "--spill-dir",
            str((self.run_dir / "spill").resolve()),
        ]

    def start_engine(self, rank: int, host: str, slots: int, peers: str | None = None) -> subprocess.Popen[bytes]:
        """A worker client for engine ``rank`` on ``host`` (over ssh unless it is this machine)."""
        command = self.client_command(rank, slots, peers)
        if in_slurm() and host != "localhost":
            # Under Slurm each engine is a job step on its node, in the job's allocation.
            command = [*_srun(host, f"{self.run_dir.name}.{engine_name(rank)}"), *command]
        elif host not in ("localhost", "127.0.0.1", socket.gethostname()):
            # The hosts share the working directory (as disBatch requires).
            ssh = shlex.split(os.environ.get(SSH_COMMAND_ENV, "ssh -o BatchMode=yes"))
            command = [*ssh, host, f"cd {shlex.quote(os.getcwd())} && {shlex.join(command)}"]
        with open(self.run_dir / f"{engine_name(rank)}.log", "ab") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.clients.append(proc)
        self.engine_procs[rank] = proc
        return proc

    def replicas_lost(self) -> str | None:
        """Why the run cannot go on, when a majority of the replicas this driver started have exited; else None.

        (A reattached driver started none: it cannot tell and keeps asking.)
        """
        if self.cluster is None:
            return None
        gone = [i for i, p in enumerate(self.cluster.procs) if p is not None and p.poll() is not None]
        if len(gone) <= len(self.cluster.procs) // 2:
            return None
        log = self.cluster.log_file(gone[0])
        try:
            with open(log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                last = f.read().decode(errors="replace").strip().splitlines()[-1:]
        except OSError:
            last = []
        return (
            f"{len(gone)} of {len(self.cluster.procs)} replicas exited; {log} ends: {(last or ['(nothing)'])[0][-300:]}"
        )

    def stop_engine(self, rank: int) -> int:
        """Stop engine ``rank``'s client (retired: it has nothing more to do); its exit code."""
        proc = self.engine_procs.get(rank)
        if proc is None:
            # Reattached: the client is not our child; run.json lists its pid in engine order.
            info = self.info()
            ranks = [e[0] for e in info["engines"]]
            if rank in ranks and ranks.index(rank) < len(info["client_pids"]):
                stop_pids([info["client_pids"][ranks.index(rank)]], self.run_dir)
            return 0
        if proc.poll() is None and _is_step(proc):
            stop_steps([f"{self.run_dir.name}.{engine_name(rank)}"])
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self, *, kill_clients: bool = False) -> None:
        """Stop the run's processes and reap what we started.

        The clients of an ended run exit by themselves once they see it ended,
        so they get a grace period first, while the replicas still answer;
        the replicas stop last.  ``kill_clients`` stops the clients at once
        (a run given up before its end).
        """
        info = self.info() if (self.run_dir / "run.json").exists() else {}
        if self.run_dir.is_dir():
            # Engines added later (``--add-engines``) wait for this: a client that
            # never reached the replicas would otherwise wait for them for ever.
            (self.run_dir / ENDED).touch()
        if kill_clients:
            for p in self.clients:
                if p.poll() is None:
                    p.terminate()
        deadline = time.monotonic() + 5.0
        for p in self.clients:
            try:
                wait_exit(p, max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(2.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.cluster is None:
            # Reattached: the clients are not our children; the same grace, then the same end.
            client_pids = info.get("client_pids", [])
            while any(ours(pid, self.run_dir) for pid in client_pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            stop_pids(client_pids, self.run_dir)
            replica_pids = info.get("replica_pids", [])
            # Replicas in job steps on other nodes: SIGTERM through Slurm (srun's pid here is only srun's).
            hosts = info.get("replica_hosts") or []
            stepped = [i for i, h in enumerate(hosts) if not same_host(h, this_node()) and i < len(replica_pids)]
            if stepped:
                stop_steps([f"{self.run_dir.name}.replica{i}" for i in stepped])
                deadline = time.monotonic() + 5.0
                while any(ours(replica_pids[i], self.run_dir) for i in stepped) and time.monotonic() < deadline:
                    time.sleep(0.02)
            stop_pids(replica_pids, self.run_dir)
        else:
            self.cluster.stop()


def ours(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is still a process of this run (its command line names the run directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(run_dir.resolve()).encode() in cmdline or str(run_dir).encode() in cmdline


def stop_pids(pids: list[int], run_dir: Path) -> None:
    for pid in pids:
        if ours(pid, run_dir):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    for pid in pids:
        while ours(pid, run_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        if ours(pid, run_dir):
            os.kill(pid, signal.SIGKILL)


def in_slurm() -> bool:
    """Whether this runs inside a Slurm job (its allocation is where engines go)."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_JOB_NODELIST" in os.environ


def this_node() -> str:
    """This machine's name as the allocation names it: Slurm's node name in a job, else the host name."""
    return (os.environ.get("SLURMD_NODENAME") if in_slurm() else None) or socket.gethostname()


def slurm_hostnames(nodelist: str) -> list[str]:
    """A Slurm node list (``n[1-4],gpu7``) expanded by ``scontrol show hostnames``; ValueError if it cannot."""
    try:
        listed = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ValueError(f"scontrol cannot expand SLURM_JOB_NODELIST {nodelist!r:.80}: {exc}") from None
    return listed.stdout.split()


def slurm_addresses(nodes: list[str]) -> dict[str, str]:
    """Where ``nodes`` listen (``NodeAddr``), by name; {} when scontrol does not say (names are used then)."""
    if not nodes:
        return {}
    try:
        shown = subprocess.run(
            ["scontrol", "show", "node", "-o", ",".join(dict.fromkeys(nodes))],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return node_addresses(shown.stdout) if shown.returncode == 0 else {}


def env_file(path: Path, slurm_nodes: dict[int, str] | None = None) -> None:
    """The environment this command runs in, as a shell file every task sources (as disBatch passes it on).

    Under Slurm (``slurm_nodes``: each engine's node) the driver's own node and
    step variables are left out, and a task gets ``SLURMD_NODENAME`` of its
    engine's node, as a task of a disBatch engine started with srun there does.
    """
    lines = [
        f"export {name}={shlex.quote(value)}"
        for name, value in sorted(os.environ.items())
        if _SHELL_NAME.fullmatch(name)
        and name not in _ENV_SKIP
        and not name.startswith("TASKSPRINT_")
        and not (slurm_nodes is not None and (name in _SLURM_NODE_VARS or name.startswith("SLURM_STEP")))
    ]
    if slurm_nodes:
        lines.append('case "${TASKSPRINT_CLIENT-}" in')
        lines += [
            f"{engine_name(r)}) export SLURMD_NODENAME={shlex.quote(n)} ;;" for r, n in sorted(slurm_nodes.items())
        ]
        lines.append("esac")
    path.write_text("\n".join(lines) + "\n")
