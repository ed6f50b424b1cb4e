"""``tasksprint batch``: a disBatch task file run on a replicated cluster that outlives its driver.

The command (the *driver*) reads the task file, decides what ``-r`` lets it
skip, writes the run's directory ``<prefix>_tasksprint/`` (the cluster
secret, a scheduler file holding the task file and options, the environment
file every task sources, ``run.json`` with the replicas' addresses and the
processes' pids), starts three replicas (fsync on) and one worker client per
engine, each in a session of its own, and then only reads: it asks the
replicas for the scheduler's status lines and appends them to
``<prefix>_status.txt``, flushed line by line, until the run ends.  Then it
stops the replicas and returns the exit code.

The replicas and clients do not need the driver: if it dies, the run goes
on, and ``tasksprint batch --attach PREFIX`` (or the same command with the
same ``-p PREFIX``) reattaches, rewrites the status file from the log's
first line and finishes the driver's work.  Nothing runs twice: what ran is
decided by the log, not by the driver.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from tasksprint.batch.env import cores_per_task, job_id, run_name, slots_per_engine, taskfile_name
from tasksprint.batch.scheduler import engine_name
from tasksprint.batch.statusfile import (
    STATUS_HEADER,
    ResumeMismatch,
    Skip,
    StatusRecord,
    format_status_line,
    parse_status_file,
    parse_status_line,
    resume_decision,
    resume_index,
)
from tasksprint.batch.taskfile import Task, TaskFileError, parse_taskfile
from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.config import parse_peers
from tasksprint.coordinator.ops import SchedulerAnswer, SchedulerRequest, StatusRequest
from tasksprint.coordinator.replies import ComputationStatus
from tasksprint.localcluster import LocalCluster
from tasksprint.readmodel import Poller
from tasksprint.top import watch

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "NOT_APPLICABLE",
    "Batch",
    "BatchRun",
    "Prepared",
    "UsageError",
    "add_arguments",
    "main",
    "parse_nodes",
    "prepare",
    "slurm_counts",
    "slurm_nodes",
]

EXIT_USAGE = 2
EXIT_FAILED = 1
RUN_DIR_SUFFIX = "_tasksprint"
#: Seconds without an answer from any replica before the driver says so.
SILENCE_WARNING_S = 30.0
MON_INTERVAL_S = 1.0  # how often --mon redraws
COMPUTATION_CHECK_S = 1.0  # how often the driver asks whether the computation itself failed
#: The ssh command that starts engines on other hosts (default ``ssh -o BatchMode=yes``).
SSH_COMMAND_ENV = "TASKSPRINT_SSH_COMMAND"
# Environment variables not passed on to tasks: the shell's own, and ours.
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_SKIP = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "PS1", "BASH_FUNC"})

NOT_APPLICABLE = """\
disBatch options that do not apply here:
  --kvsserver, --taskserver, --taskcommand, --use-address: TaskSprint has no
      KVS server; tasks reach the replicas through the replicated log;
  --mailTo, --mailFreq: no mail;
  -w/--web: use `tasksprint dashboard --coordinators PEERS --secret-file
      <prefix>_tasksprint/secret` (PEERS from <prefix>_tasksprint/run.json);
  -g/--gpu, --fill: deprecated or Slurm-specific in disBatch; not provided;
  --no-retire, --retire-cmd: idle Slurm nodes are not released;
  -C, -l: accepted for compatibility, no effect.
An existing run directory for -p PREFIX, or --attach PREFIX, reattaches to a
run whose driver died: the status file is rewritten from the replicated log.
"""


def parse_nodes(text: str) -> list[tuple[str, int]]:
    """``host:N[,host:N...]`` as (host, cores) pairs; raises ValueError naming the bad item."""
    nodes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, count = item.rpartition(":")
        if not sep or not host or not count.isdigit() or int(count) <= 0:
            raise ValueError(f"node {item!r} is not HOST:CORECOUNT (e.g. localhost:4)")
        nodes.append((host, int(count)))
    return nodes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``tasksprint batch``'s options, with disBatch's names."""
    p.add_argument("taskfile", nargs="?", help='file with tasks, one task per line ("-" for stdin)')
    p.add_argument("-e", "--exit-code", action="store_true", help="when any task fails, exit with non-zero status")
    p.add_argument("-f", "--fail-fast", action="store_true", help="stop at the first failure, killing running tasks")
    p.add_argument("--force-resume", action="store_true", help="with -r, proceed even if task commands differ")
    p.add_argument("--logfile", help="the driver's log file (default: none; warnings go to stderr)")
    p.add_argument(
        "--loglevel", default="INFO", choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"], help="logging level"
    )
    p.add_argument("-p", "--prefix", default=".", help="path for the status file and run directory (default: .)")
    p.add_argument(
        "-r", "--resume-from", action="append", default=[], metavar="STATUSFILE", help="skip tasks it lists as done"
    )
    p.add_argument("-R", "--retry", action="store_true", help="with -r, also rerun tasks that failed")
    p.add_argument("-S", "--startup-only", action="store_true", help="start replicas only; add engines with dbUtil.sh")
    p.add_argument("--status-header", action="store_true", help="add a header line to the status file")
    p.add_argument(
        "--mon",
        action="store_true",
        help="draw the run live on the terminal (replicas, engines, tasks: tasksprint top's view) while it runs",
    )
    p.add_argument("-C", "--context-task-limit", type=int, default=0, metavar="TASK_LIMIT", help="accepted, no effect")
    p.add_argument(
        "-c", "--cpusPerTask", type=float, default=1.0, metavar="N", help="cores per task; may be fractional"
    )
    p.add_argument("-t", "--tasksPerNode", type=int, metavar="N", help="most tasks at once per node")
    p.add_argument("-l", "--label", metavar="COMMAND", help="label of this context")
    p.add_argument("-s", "--ssh-node", action="append", default=[], metavar="HOST:CORECOUNT", help="run on these nodes")
    p.add_argument("--attach", metavar="PREFIX", help="reattach to the run with this prefix whose driver died")
    p.add_argument("--add-engines", metavar="PREFIX", help="add the -s engines to a running run (dbUtil.sh does this)")
    p.add_argument(
        "--replica-host",
        default="127.0.0.1",
        help="address the replicas listen on; give this machine's address when -s names other machines",
    )
    p.add_argument("--replicas", type=int, default=3, choices=[1, 3, 5], help="coordinator replicas (default 3)")


def _prefix(args: argparse.Namespace, name: str) -> str:
    """disBatch's rule: a directory (or '.') gets the default run name in it; anything else is the prefix."""
    path = args.prefix
    if path.endswith("/") or os.path.isdir(path):
        started = datetime.datetime.now()
        return os.path.join(path, run_name(name, started=started, nonce=random.randrange(1000)))
    return path


@attrs.define(eq=False)
class _Cluster(LocalCluster):
    """The run's replicas, listening on ``host`` (loopback unless engines on other machines must reach them)."""

    host: str = "127.0.0.1"

    @property
    def addrs(self) -> list[tuple[str, int]]:
        return [(self.host, p) for p in self.ports]


@attrs.define(eq=False)
class BatchRun:
    """One run's files and processes; ``prefix`` names them all."""

    prefix: str
    replicas: int = 3
    replica_host: str = "127.0.0.1"
    _flags: dict[str, bool] = attrs.Factory(dict)
    cluster: LocalCluster | None = None
    clients: list[subprocess.Popen[bytes]] = attrs.Factory(list)

    @property
    def run_dir(self) -> Path:
        return Path(self.prefix + RUN_DIR_SUFFIX)

    @property
    def status_path(self) -> Path:
        return Path(self.prefix + "_status.txt")

    def info(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "run.json").read_text())

    def start(
        self, config: dict[str, Any], engines: list[tuple[int, str, int]], flags: dict[str, bool] | None = None
    ) -> None:
        """Write the scheduler file and start the replicas and the local engines' clients."""
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=False)
        # Before any client starts: every task sources it.
        _env_file(d / "env.sh")
        (d / "scheduler.py").write_text(
            "from tasksprint.batch.scheduler import BatchScheduler\n\n\n"
            "class Batch(BatchScheduler):\n"
            f"    CONFIG = {config!r}\n"
        )
        self.cluster = _Cluster(d, self.replicas, scheduler=str(d / "scheduler.py") + ":Batch", host=self.replica_host)
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
        if _in_slurm() and host != "localhost":
            # Under Slurm each engine is a job step on its node, in the job's allocation.
            command = ["srun", "--nodes=1", "--ntasks=1", "--overlap", f"--nodelist={host}", *command]
        elif host not in ("localhost", "127.0.0.1", socket.gethostname()):
            # The hosts share the working directory (as disBatch requires).
            ssh = shlex.split(os.environ.get(SSH_COMMAND_ENV, "ssh -o BatchMode=yes"))
            command = [*ssh, host, f"cd {shlex.quote(os.getcwd())} && {shlex.join(command)}"]
        with open(self.run_dir / f"{engine_name(rank)}.log", "ab") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.clients.append(proc)
        return proc

    def stop(self, *, kill_clients: bool = False) -> None:
        """Stop the run's processes and reap what we started.

        The clients of an ended run exit by themselves once they see it ended,
        so they get a grace period first, while the replicas still answer;
        the replicas stop last.  ``kill_clients`` stops the clients at once
        (a run given up before its end).
        """
        info = self.info() if (self.run_dir / "run.json").exists() else {}
        if kill_clients:
            for p in self.clients:
                if p.poll() is None:
                    p.terminate()
        deadline = time.monotonic() + 5.0
        for p in self.clients:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
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
            while any(_ours(pid, self.run_dir) for pid in client_pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            _stop_pids(client_pids, self.run_dir)
            _stop_pids(info.get("replica_pids", []), self.run_dir)
        else:
            self.cluster.stop()


def _ours(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is still a process of this run (its command line names the run directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(run_dir.resolve()).encode() in cmdline or str(run_dir).encode() in cmdline


def _stop_pids(pids: list[int], run_dir: Path) -> None:
    for pid in pids:
        if _ours(pid, run_dir):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    for pid in pids:
        while _ours(pid, run_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _ours(pid, run_dir):
            os.kill(pid, signal.SIGKILL)


async def follow(run: BatchRun, status: TextIO, *, header: bool, poll: float = 0.05) -> dict[str, Any]:
    """Append every status line the scheduler has to ``status`` until the run ended; return the last answer."""
    info = run.info()
    secret = (run.run_dir / "secret").read_bytes().strip()
    addrs = list(parse_peers(info["peers"]))
    channel = ReplicaChannel(addrs, secret)
    written = 0
    if header:
        status.write(STATUS_HEADER + "\n")
        status.flush()
    # Any replica's lines are a prefix of the same list (the log decides their order), so
    # asking a follower is safe; the leader is only the freshest, found once and after failures.
    find_leader = True
    silent_since: float | None = None
    warned = False
    checked_at = trio.current_time()
    try:
        while True:
            try:
                if find_leader:
                    st = await channel.status()
                    if st.leader is not None and st.leader != st.rid:
                        await channel.prefer(st.leader)
                    find_leader = False
                reply = await channel.request(SchedulerRequest(body={"after": written}))
            except ASK_ERRORS:
                await channel.move_on()
                find_leader = True
                silent_since = trio.current_time() if silent_since is None else silent_since
                if not warned and trio.current_time() - silent_since > SILENCE_WARNING_S:
                    warned = True
                    print(
                        f"tasksprint batch: no replica of {run.prefix} answers; still trying (Ctrl-C stops the run)",
                        file=sys.stderr,
                    )
                await trio.sleep(0.1)
                continue
            silent_since = None
            if trio.current_time() - checked_at > COMPUTATION_CHECK_S:
                # A computation that failed (a hook raised, a state that cannot be
                # saved) ends no batch: the scheduler stopped being called.
                checked_at = trio.current_time()
                failed = await _computation_failure(channel)
                if failed is not None:
                    return {"lines": [], "ended": True, "total": written, "failed": 0, "reason": failed}
            if not isinstance(reply, SchedulerAnswer) or not isinstance(reply.value, dict):
                await trio.sleep(poll)
                continue
            answer = reply.value
            lines = answer["lines"]
            if lines:
                status.write("".join(line + "\n" for line in lines))
                status.flush()
                written += len(lines)
            if answer["ended"] and written >= answer["total"]:
                return answer
            if written >= answer["total"]:
                # All there is: ask again after ``poll`` (not at once: each question costs a replica an answer
                # while it is busy applying the completions these lines come from).
                await trio.sleep(poll)
    finally:
        await channel.aclose()


async def _computation_failure(channel: ReplicaChannel) -> str | None:
    """Why the batch's computation failed, or None while it has not (or no replica answers)."""
    try:
        status = await channel.request(StatusRequest())
    except ASK_ERRORS:
        return None
    if isinstance(status, ComputationStatus) and status.state == "failed":
        message = status.failure.message if status.failure is not None else "no reason recorded"
        return f"the batch scheduler failed: {message}"
    return None


_SLURM_COUNT = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def slurm_counts(text: str) -> list[int]:
    """Slurm's compressed per-node counts (``SLURM_JOB_CPUS_PER_NODE``): ``"16(x2),8"`` is [16, 16, 8].

    Raises ValueError naming the item that is not such a count.
    """
    out: list[int] = []
    for item in text.split(","):
        m = _SLURM_COUNT.fullmatch(item.strip())
        if m is None or len(item) > 40:
            raise ValueError(f"{item!r:.60} is not a Slurm count such as 16 or 16(x2)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_nodes(environ: dict[str, str], hostnames: list[str]) -> list[tuple[str, int]]:
    """(node, cores) of a Slurm allocation: ``hostnames`` expanded from ``SLURM_JOB_NODELIST``.

    Cores per node come from ``SLURM_JOB_CPUS_PER_NODE``; ValueError if the two disagree.
    """
    cores = slurm_counts(environ.get("SLURM_JOB_CPUS_PER_NODE", "1"))
    if len(cores) == 1:
        cores *= len(hostnames)
    if len(cores) != len(hostnames):
        raise ValueError(f"SLURM_JOB_CPUS_PER_NODE gives {len(cores)} nodes, SLURM_JOB_NODELIST {len(hostnames)}")
    return list(zip(hostnames, cores, strict=True))


def _in_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_JOB_NODELIST" in os.environ


def _engines(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """(rank, host, slots) of each engine the options (or the environment) name."""
    return [(rank, host, slots) for rank, host, slots, _ in _engine_cores(args)]


def _engine_cores(args: argparse.Namespace) -> list[tuple[int, str, int, int]]:
    nodes: list[tuple[str, int]] = []
    for item in args.ssh_node:
        nodes += parse_nodes(item)
    if not nodes and os.environ.get("DISBATCH_SSH_NODELIST"):
        nodes = parse_nodes(os.environ["DISBATCH_SSH_NODELIST"])
    if not nodes and _in_slurm():
        listed = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        nodes = slurm_nodes(dict(os.environ), listed.stdout.split())
    if not nodes:
        nodes = [("localhost", os.cpu_count() or 1)]
    out: list[tuple[int, str, int, int]] = []
    for rank, (host, cores) in enumerate(nodes):
        slots = slots_per_engine(cores, cpus_per_task=args.cpusPerTask, tasks_per_node=args.tasksPerNode)
        out.append((rank, host, max(1, slots), cores))
    return out


def _env_file(path: Path) -> None:
    lines = [
        f"export {name}={shlex.quote(value)}"
        for name, value in sorted(os.environ.items())
        if _SHELL_NAME.fullmatch(name) and name not in _ENV_SKIP and not name.startswith("TASKSPRINT_")
    ]
    path.write_text("\n".join(lines) + "\n")


def _skips(args: argparse.Namespace, tasks: list[Task]) -> dict[int, str]:
    files = [parse_status_file(Path(p).read_bytes()) for p in args.resume_from]
    earlier = resume_index(files)
    skip = {}
    for task in tasks:
        decision = resume_decision(task, earlier, retry=args.retry, force=args.force_resume)
        if isinstance(decision, Skip):
            skip[task.task_id] = format_status_line(decision.record)
    return skip


@attrs.frozen
class Prepared:
    """A run ready to start: its files and processes, the scheduler's configuration, the engines."""

    run: BatchRun
    config: dict[str, Any]
    engines: list[tuple[int, str, int]]


class UsageError(Exception):
    """Arguments, a task file or a status file that cannot be run; the message says which and why."""


def prepare(args: argparse.Namespace, data: bytes | None = None) -> Prepared:
    """Read the task file (``data``, else the file ``args`` names) and decide what ``-r`` skips.

    Raises :class:`UsageError`; starts nothing.
    """
    if data is None:
        try:
            data = sys.stdin.buffer.read() if args.taskfile == "-" else Path(args.taskfile).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read task file {args.taskfile}: {exc.strerror}") from None
    name = taskfile_name(args.taskfile)
    try:
        taskfile = parse_taskfile(data, name=name)
        with_cores = _engine_cores(args)
        engines = [(rank, host, slots) for rank, host, slots, _ in with_cores]
    except (TaskFileError, ValueError) as exc:
        raise UsageError(f"{args.taskfile}: {exc}") from None
    tasks = [r for r in taskfile.records() if isinstance(r, Task)]
    try:
        skip = _skips(args, tasks)
    except OSError as exc:
        raise UsageError(f"cannot read status file: {exc}") from None
    except ResumeMismatch as exc:
        raise UsageError(str(exc)) from None
    prefix = _prefix(args, name)
    run = BatchRun(prefix, args.replicas, args.replica_host)
    slots = sum(s for _, _, s in engines)
    config = {
        "taskfile": data,
        "name": name,
        "job_id": job_id(prefix),
        "cwd": os.getcwd(),
        "env_file": str((run.run_dir / "env.sh").resolve()),
        "engines": [] if args.startup_only else [rank for rank, _, _ in engines],
        # Under -S the engines come later: size the fail-fast window by this machine.
        "window": (slots or os.cpu_count() or 1) if args.fail_fast else max(slots * 64, 1024),
        "fail_fast": bool(args.fail_fast),
        "skip": skip,
        "driver_node": socket.gethostname(),
        "driver_pid": os.getpid(),
        # Under Slurm, the integer part of -c (as disBatch); else the first engine's cores // its slots.
        "cores_per_task": int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        or cores_per_task(with_cores[0][3], with_cores[0][2]),
    }
    for notice in taskfile.notices:
        _log(args, "warning", f"{name} line {notice.line}: {notice.reason}")
    return Prepared(run, config, [] if args.startup_only else engines)


def _log(args: argparse.Namespace, level: str, message: str) -> None:
    """One line of the driver's log (``--logfile``, at ``--loglevel``); warnings and errors go to stderr too."""
    levels = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    if levels.index(level.upper()) < levels.index(args.loglevel):
        return
    line = f"{datetime.datetime.now().isoformat(timespec='milliseconds')} {level.upper()} {message}"
    if args.logfile:
        with open(args.logfile, "a", encoding="utf-8") as log:
            log.write(line + "\n")
    if level.upper() in ("WARNING", "ERROR", "CRITICAL"):
        print(f"tasksprint batch: {message}", file=sys.stderr)


def main(args: argparse.Namespace, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run ``tasksprint batch`` with parsed ``args``; returns the exit code."""
    if args.add_engines:
        return add_engines(args.add_engines, args, err=err)
    if args.attach:
        return attach(args.attach, header=args.status_header, exit_code=args.exit_code, err=err, mon=args.mon)
    if args.taskfile is None:
        print("tasksprint batch: give a task file (or - for stdin), or --attach PREFIX", file=err)
        return EXIT_USAGE
    try:
        prepared = prepare(args)
    except UsageError as exc:
        print(f"tasksprint batch: {exc}", file=err)
        return EXIT_USAGE
    run = prepared.run
    if run.run_dir.exists():
        _log(args, "info", f"{run.run_dir} exists: reattaching")
        return attach(run.prefix, header=args.status_header, exit_code=args.exit_code, err=err, mon=args.mon)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run.start(prepared.config, prepared.engines, {"status_header": args.status_header, "exit_code": args.exit_code})
        _write_db_util(run, args)
        _log(args, "info", f"started {run.prefix}: engines {prepared.engines}, peers {run.info()['peers']}")
        if args.startup_only:
            print(f"tasksprint batch: started; add engines with {run.prefix}_dbUtil.sh -s HOST:N", file=err, flush=True)
        code = _finish(run, args.status_header, args.exit_code, err, truncate=True, mon=args.mon)
        _log(args, "info", f"finished {run.prefix}: exit code {code}")
        return code
    except KeyboardInterrupt:
        print("tasksprint batch: interrupted; stopping the run", file=err)
        run.stop()
        return 130


def _write_db_util(run: BatchRun, args: argparse.Namespace) -> None:
    path = Path(run.prefix + "_dbUtil.sh")
    path.write_text(
        "#!/bin/sh\n# Adds engines to this run: dbUtil.sh -s HOST:N [-s HOST:N ...]\n"
        f"exec {shlex.quote(sys.executable)} -m tasksprint.cli batch --add-engines "
        f'{shlex.quote(run.prefix)} "$@"\n'
    )
    path.chmod(0o755)


def _finish(run: BatchRun, header: bool, exit_code: bool, err: TextIO, *, truncate: bool, mon: bool = False) -> int:
    with open(run.status_path, "w" if truncate else "a", encoding="utf-8", errors="surrogateescape") as status:
        answer = trio.run(lambda: _follow_and_show(run, status, header=header, mon=mon))
    run.stop()
    if answer.get("reason"):
        print(f"tasksprint batch: run ended early: {answer['reason']}", file=err)
        return EXIT_FAILED
    if exit_code and answer.get("failed"):
        print(f"tasksprint batch: {answer['failed']} task(s) failed", file=err)
        return EXIT_FAILED
    return 0


async def _follow_and_show(run: BatchRun, status: TextIO, *, header: bool, mon: bool) -> dict[str, Any]:
    """:func:`follow`; with ``mon``, the run drawn live beside it (``tasksprint top``'s view)."""
    if not mon:
        return await follow(run, status, header=header)
    info = run.info()
    secret = (run.run_dir / "secret").read_bytes().strip()
    addrs = list(parse_peers(info["peers"]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: watch(Poller(addrs, secret), interval=MON_INTERVAL_S))
        answer = await follow(run, status, header=header)
        nursery.cancel_scope.cancel()
    return answer


def attach(prefix: str, *, header: bool, exit_code: bool, err: TextIO = sys.stderr, mon: bool = False) -> int:
    """Reattach to the run ``prefix`` whose driver died: rebuild the status file from the log, follow it to its end."""
    run = BatchRun(prefix)
    if not (run.run_dir / "run.json").exists():
        print(f"tasksprint batch: no run at {run.run_dir} (run.json is missing)", file=err)
        return EXIT_USAGE
    flags = run.info().get("flags", {})
    header = header or bool(flags.get("status_header"))
    exit_code = exit_code or bool(flags.get("exit_code"))
    return _finish(run, header, exit_code, err, truncate=True, mon=mon)


def add_engines(prefix: str, args: argparse.Namespace, *, err: TextIO = sys.stderr) -> int:
    """Start clients for the ``-s`` engines of ``args`` in the running run ``prefix`` (``<prefix>_dbUtil.sh``).

    They get the next engine ranks; PERENGINE commands run only on the engines the run started with.
    """
    run = BatchRun(prefix)
    if not (run.run_dir / "run.json").exists():
        print(f"tasksprint batch: no run at {run.run_dir} (run.json is missing)", file=err)
        return EXIT_USAGE
    try:
        new = _engines(args) if args.ssh_node or os.environ.get("DISBATCH_SSH_NODELIST") else []
    except ValueError as exc:
        print(f"tasksprint batch: {exc}", file=err)
        return EXIT_USAGE
    if not new:
        print("tasksprint batch: --add-engines needs -s HOST:N (or DISBATCH_SSH_NODELIST)", file=err)
        return EXIT_USAGE
    info = run.info()
    first = len(info["engines"])
    engines = [(first + rank, host, slots) for rank, host, slots in new]
    peers = info["peers"]
    for rank, host, slots in engines:
        proc = run.start_engine(rank, host, slots, peers=peers)
        info["client_pids"].append(proc.pid)
        info["engines"].append([rank, host, slots])
    tmp = run.run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(run.run_dir / "run.json")
    return 0


class Batch:
    """A batch run from Python, like disBatch's ``DisBatcher``: start it, read each task's status record.

    ``tasks`` is the task file's content (a string, bytes, or an iterable of
    lines, directives allowed); ``prefix`` names the run's files as ``-p``
    does; ``options`` are more ``tasksprint batch`` options (``["-s",
    "localhost:4", "--fail-fast"]``).  Use it as a context manager: leaving
    the block stops whatever still runs.  The run's replicas and clients do
    not depend on this object: if the program dies, ``tasksprint batch
    --attach PREFIX`` finishes the run and writes its status file.

    All tasks are given at the start; submitting lines to a running batch
    needs a command sent to the scheduler through the log, which this
    version does not have.
    """

    def __init__(self, tasks: str | bytes | Iterable[str], *, prefix: str, options: Sequence[str] = ()) -> None:
        if isinstance(tasks, str):
            data = tasks.encode("utf-8", "surrogateescape")
        elif isinstance(tasks, bytes):
            data = tasks
        else:
            data = "".join(line if line.endswith("\n") else line + "\n" for line in tasks).encode()
        parser = argparse.ArgumentParser(prog="Batch", exit_on_error=False)
        add_arguments(parser)
        try:
            self._args = parser.parse_args([*options, "-p", prefix, "STREAM"])
        except argparse.ArgumentError as exc:
            raise UsageError(str(exc)) from None
        self._args.taskfile = None
        self._prepared = prepare(self._args, data)
        self.run = self._prepared.run
        self.records: dict[int, StatusRecord] = {}  # task id -> its status record, as they finish
        self._lines: list[str] = []
        self._answer: dict[str, Any] = {}
        self._stopped = False
        self.run.start(self._prepared.config, self._prepared.engines)

    @property
    def status_path(self) -> Path:
        """The status file, written by :meth:`wait`."""
        return self.run.status_path

    def poll(self) -> list[StatusRecord]:
        """The status records that came in since the last call (asks the replicas once)."""
        answer = trio.run(self._ask)
        if answer is None:
            return []
        self._answer = answer
        new = []
        for line in answer["lines"]:
            self._lines.append(line)
            record = parse_status_line(line)
            if record is not None:
                self.records[record.task_id] = record
                new.append(record)
        return new

    async def _ask(self) -> dict[str, Any] | None:
        info = self.run.info()
        secret = (self.run.run_dir / "secret").read_bytes().strip()
        addrs = list(parse_peers(info["peers"]))
        channel = ReplicaChannel(addrs, secret)
        try:
            for _ in addrs:
                try:
                    reply = await channel.request(SchedulerRequest(body={"after": len(self._lines)}))
                except ASK_ERRORS:
                    await channel.move_on()
                    continue
                if isinstance(reply, SchedulerAnswer) and isinstance(reply.value, dict):
                    return reply.value
            return None
        finally:
            await channel.aclose()

    @property
    def ended(self) -> bool:
        """Whether the run ended and every status line was read."""
        return bool(self._answer.get("ended")) and len(self._lines) >= self._answer.get("total", 0)

    def sync_tasks(self, task_ids: Iterable[int], timeout: float | None = None) -> dict[int, StatusRecord]:
        """Wait until the tasks ``task_ids`` finished (disBatch's ``syncTasks``); their records by id.

        Raises TimeoutError after ``timeout`` seconds, KeyError for a task the ended run never finished.
        """
        wanted = list(task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(t in self.records for t in wanted):
            if self.ended:
                missing = [t for t in wanted if t not in self.records]
                raise KeyError(f"the run ended without finishing tasks {missing}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"tasks {[t for t in wanted if t not in self.records]} did not finish in time")
            if not self.poll():
                time.sleep(0.02)
        return {t: self.records[t] for t in wanted}

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the run to end; write the status file, stop the replicas and return the summary.

        The summary has ``failed`` (tasks with a non-zero exit) and ``reason``
        (why the run ended early, or None).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the batch did not end in time")
            if not self.poll():
                time.sleep(0.02)
        with open(self.status_path, "w", encoding="utf-8", errors="surrogateescape") as status:
            if self._args.status_header:
                status.write(STATUS_HEADER + "\n")
            status.write("".join(line + "\n" for line in self._lines))
        self.close()
        return {"failed": self._answer.get("failed", 0), "reason": self._answer.get("reason")}

    def close(self) -> None:
        """Stop the run's processes (what still runs is killed with them)."""
        if not self._stopped:
            self._stopped = True
            self.run.stop(kill_clients=True)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
