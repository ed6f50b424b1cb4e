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
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import attrs

from tasksprint.batch.env import cores_per_task, job_id, run_name, slots_per_engine, taskfile_name
from tasksprint.batch.slurm import DEFAULT_RETIRE_COMMAND, replica_hosts, slurm_counts, slurm_nodes, slurm_slots
from tasksprint.batch.statusfile import (
    ResumeMismatch,
    Skip,
    format_status_line,
    parse_status_file,
    resume_decision,
    resume_index,
)
from tasksprint.batch.taskfile import Task, TaskFileError, parse_taskfile
from tasksprint.batch_run import ENDED, EXIT_FAILED, BatchRun, in_slurm, slurm_addresses, slurm_hostnames, this_node

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "NOT_APPLICABLE",
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

NOT_APPLICABLE = """\
disBatch options that do not apply here:
  --kvsserver, --taskserver, --taskcommand, --use-address: TaskSprint has no
      KVS server; tasks reach the replicas through the replicated log;
  --mailTo, --mailFreq: no mail;
  -w/--web: use `tasksprint dashboard --coordinators PEERS --secret-file
      <prefix>_tasksprint/secret` (PEERS from <prefix>_tasksprint/run.json);
  -g/--gpu, --fill: deprecated or Slurm-specific in disBatch; not provided;
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
        "-c",
        "--cpusPerTask",
        type=float,
        metavar="N",
        help="cores per task; may be fractional (default 1; under Slurm the job's -c)",
    )
    p.add_argument(
        "-t",
        "--tasksPerNode",
        type=int,
        metavar="N",
        help="most tasks at once per node (default: cores // -c; under Slurm, the job's tasks on the node)",
    )
    p.add_argument("-l", "--label", metavar="COMMAND", help="label of this context")
    p.add_argument("-s", "--ssh-node", action="append", default=[], metavar="HOST:CORECOUNT", help="run on these nodes")
    p.add_argument("--attach", metavar="PREFIX", help="reattach to the run with this prefix whose driver died")
    p.add_argument(
        "--open",
        action="store_true",
        help="keep taking task lines after the file (--submit PREFIX) until --close PREFIX; then end",
    )
    p.add_argument("--submit", metavar="PREFIX", help="submit task lines from stdin to the open run PREFIX")
    p.add_argument("--close", metavar="PREFIX", help="tell the open run PREFIX that no more lines come")
    p.add_argument("--add-engines", metavar="PREFIX", help="add the -s engines to a running run (dbUtil.sh does this)")
    p.add_argument(
        "--replica-host",
        help="address the replicas listen on (default: loopback; under Slurm, spread over up to three "
        "allocated nodes); give this machine's address when -s names other machines",
    )
    p.add_argument(
        "--no-retire",
        dest="retire_cmd",
        action="store_const",
        const="",
        help="do not release idle nodes (e.g. when running as part of a larger Slurm job)",
    )
    p.add_argument(
        "--retire-cmd",
        metavar="COMMAND",
        help="shell command run when engines are retired (environment: NODES retired now, RETCODES, ACTIVE, "
        "RETIRED, DRIVER_NODE); default under Slurm: scontrol update shrinking the job to the nodes in use",
    )
    p.add_argument("--replicas", type=int, default=3, choices=[1, 3, 5], help="coordinator replicas (default 3)")


def _prefix(args: argparse.Namespace, name: str) -> str:
    """disBatch's rule: a directory (or '.') gets the default run name in it; anything else is the prefix."""
    path = args.prefix
    if path.endswith("/") or os.path.isdir(path):
        started = datetime.datetime.now()
        return os.path.join(path, run_name(name, started=started, nonce=random.randrange(1000)))
    return path


def _engines(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """(rank, host, slots) of each engine the options (or the environment) name."""
    return [(rank, host, slots) for rank, host, slots, _ in _engine_cores(args)]


def _engine_cores(args: argparse.Namespace) -> list[tuple[int, str, int, int]]:
    nodes: list[tuple[str, int]] = []
    for item in args.ssh_node:
        nodes += parse_nodes(item)
    if not nodes and os.environ.get("DISBATCH_SSH_NODELIST"):
        nodes = parse_nodes(os.environ["DISBATCH_SSH_NODELIST"])
    slots: list[int] = []
    if not nodes and in_slurm():
        nodes = slurm_nodes(dict(os.environ), slurm_hostnames(os.environ["SLURM_JOB_NODELIST"]))
        slots = slurm_slots(
            dict(os.environ),
            [cores for _, cores in nodes],
            cpus_per_task=args.cpusPerTask,
            tasks_per_node=args.tasksPerNode,
        )
    if not nodes:
        nodes = [("localhost", os.cpu_count() or 1)]
    if not slots:
        cpus = 1.0 if args.cpusPerTask is None else args.cpusPerTask
        slots = [slots_per_engine(c, cpus_per_task=cpus, tasks_per_node=args.tasksPerNode) for _, c in nodes]
    return [(rank, host, max(1, n), cores) for rank, ((host, cores), n) in enumerate(zip(nodes, slots, strict=True))]


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
    run = BatchRun(prefix, args.replicas, args.replica_host or "127.0.0.1")
    if in_slurm() and args.replica_host is None and not args.ssh_node and not os.environ.get("DISBATCH_SSH_NODELIST"):
        # Under Slurm the replicas go on up to three of the allocated nodes (the engines' nodes).
        run.replica_hosts = replica_hosts([host for _, host, _ in engines], args.replicas, this_node())
        run.node_addrs = slurm_addresses(run.replica_hosts)
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
        "open": bool(args.open),
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
        _configure_logging(args)
        return add_engines(args.add_engines, args, err=err)
    if args.attach:
        _configure_logging(args)
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
        _configure_logging(args)
        return attach(run.prefix, header=args.status_header, exit_code=args.exit_code, err=err, mon=args.mon)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        flags = {"status_header": args.status_header, "exit_code": args.exit_code, "retire_cmd": _retire_command(args)}
        run.start(prepared.config, prepared.engines, flags)
        _write_db_util(run, args)
        _log(args, "info", f"started {run.prefix}: engines {prepared.engines}, peers {run.info()['peers']}")
        if args.startup_only:
            print(f"tasksprint batch: started; add engines with {run.prefix}_dbUtil.sh -s HOST:N", file=err, flush=True)
        # Only now, while the replicas start: trio, the replica channel and the log set-up.
        _configure_logging(args)
        from tasksprint import batch_follow

        retirer = batch_follow.retirer(run, flags["retire_cmd"], lambda level, message: _log(args, level, message))
        code = batch_follow.finish(
            run, args.status_header, args.exit_code, err, truncate=True, mon=args.mon, retirer=retirer
        )
        _log(args, "info", f"finished {run.prefix}: exit code {code}")
        return code
    except KeyboardInterrupt:
        print("tasksprint batch: interrupted; stopping the run", file=err)
        run.stop()
        return 130


def _configure_logging(args: argparse.Namespace) -> None:
    """The structured logs of the modules the driver uses to follow a run (the command line leaves them to us).

    A new run calls it once its replicas are started: the import is not on
    the way to their start.
    """
    from tasksprint import launch

    launch.configure_logging(args.log_level, args.log_format)


def _retire_command(args: argparse.Namespace) -> str:
    """The command that releases retired engines' nodes ("" for none): ``--retire-cmd``, else disBatch's under Slurm."""
    if args.retire_cmd is not None:
        return str(args.retire_cmd)
    if in_slurm() and not args.ssh_node and not os.environ.get("DISBATCH_SSH_NODELIST"):
        return DEFAULT_RETIRE_COMMAND
    return ""


def _write_db_util(run: BatchRun, args: argparse.Namespace) -> None:
    path = Path(run.prefix + "_dbUtil.sh")
    path.write_text(
        "#!/bin/sh\n# Adds engines to this run: dbUtil.sh -s HOST:N [-s HOST:N ...]\n"
        f"exec {shlex.quote(sys.executable)} -m tasksprint.cli batch --add-engines "
        f'{shlex.quote(run.prefix)} "$@"\n'
    )
    path.chmod(0o755)


def attach(prefix: str, *, header: bool, exit_code: bool, err: TextIO = sys.stderr, mon: bool = False) -> int:
    """Reattach to the run ``prefix`` whose driver died: rebuild the status file from the log, follow it to its end."""
    run = BatchRun(prefix)
    if not (run.run_dir / "run.json").exists():
        print(f"tasksprint batch: no run at {run.run_dir} (run.json is missing)", file=err)
        return EXIT_USAGE
    flags = run.info().get("flags", {})
    header = header or bool(flags.get("status_header"))
    exit_code = exit_code or bool(flags.get("exit_code"))

    def log(level: str, message: str) -> None:
        if level != "info":
            print(f"tasksprint batch: {message}", file=err)

    from tasksprint import batch_follow

    retirer = batch_follow.retirer(run, str(flags.get("retire_cmd") or ""), log)
    return batch_follow.finish(run, header, exit_code, err, truncate=True, mon=mon, retirer=retirer)


def add_engines(prefix: str, args: argparse.Namespace, *, err: TextIO = sys.stderr) -> int:
    """Start clients for the ``-s`` engines of ``args`` in the running run ``prefix`` (``<prefix>_dbUtil.sh``).

    They get the next engine ranks; PERENGINE commands run only on the engines the run started with.
    Submitted with sbatch (no ``-s``), the engines are the job's nodes, started there with srun, and
    this command lasts as long as they do: the job's allocation is theirs until the run ends.
    """
    run = BatchRun(prefix)
    if not (run.run_dir / "run.json").exists():
        print(f"tasksprint batch: no run at {run.run_dir} (run.json is missing)", file=err)
        return EXIT_USAGE
    try:
        listed = bool(args.ssh_node or os.environ.get("DISBATCH_SSH_NODELIST"))
        new = _engines(args) if listed or in_slurm() else []
    except ValueError as exc:
        print(f"tasksprint batch: {exc}", file=err)
        return EXIT_USAGE
    if not new:
        print("tasksprint batch: --add-engines needs -s HOST:N (or DISBATCH_SSH_NODELIST, or a Slurm job)", file=err)
        return EXIT_USAGE
    info = run.info()
    first = len(info["engines"])
    engines = [(first + rank, host, slots) for rank, host, slots in new]
    peers = info["peers"]
    procs = []
    for rank, host, slots in engines:
        procs.append(run.start_engine(rank, host, slots, peers=peers))
        info["client_pids"].append(procs[-1].pid)
        info["engines"].append([rank, host, slots])
    tmp = run.run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(run.run_dir / "run.json")
    if in_slurm() and not listed:
        # The clients exit once the run ended; the job ends with them, not before.
        print(f"tasksprint batch: engines {[e[:2] for e in engines]} joined {prefix}; until the run ends", file=err)
        _wait_for_end(run, procs)
    return 0


#: Seconds the added engines' clients get to exit by themselves once the run ended (as the driver gives its own).
CLIENT_GRACE_S = 5.0


def _wait_for_end(run: BatchRun, procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait for the added engines' clients; once the driver has ended the run, give them its grace, then stop them.

    A client that joined exits when it sees the run end; one that never reached
    the replicas (they stopped first) would try them for ever.
    """
    ended = run.run_dir / ENDED
    while any(p.poll() is None for p in procs):
        if ended.exists():
            deadline = time.monotonic() + CLIENT_GRACE_S
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return
        time.sleep(0.2)
