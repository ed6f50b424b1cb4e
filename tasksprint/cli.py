"""The ``tasksprint`` command: parses the command line and dispatches to the module doing the work.

``replica`` runs :func:`tasksprint.launch.run_replica`, ``execute``
:func:`tasksprint.execute.execute`, every other command a function of
:mod:`tasksprint.commands`.  This module does nothing else: the import
contracts keep trio and the network out of it.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tasksprint.credentials import SecretError

__all__ = ["build_parser", "configure_logging", "main"]


def _launch() -> Any:
    """:mod:`tasksprint.launch` (structlog, trio and the network come with it), loaded when a command needs it.

    ``tasksprint batch`` starts its replicas before it loads them: they load
    while the replicas start.
    """
    from tasksprint import launch

    return launch


def _commands() -> Any:
    """:mod:`tasksprint.commands`, loaded by the commands it runs."""
    from tasksprint import commands

    return commands


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """See :func:`tasksprint.launch.add_common_arguments`."""
    _launch().add_common_arguments(p)


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """See :func:`tasksprint.launch.configure_logging`."""
    _launch().configure_logging(level, fmt)


class _Subcommands:
    """Every subcommand is registered (``--help`` lists them all); only the one run gets its arguments.

    Building a command's arguments may import the modules that do its work
    (the service's, batch mode's): a replica or a worker client, which start
    by the hundred in a test run, then never load them.
    """

    def __init__(self, sub: Any, wanted: str | None) -> None:
        self._sub, self._wanted = sub, wanted

    def add(self, name: str, arguments: Callable[[argparse.ArgumentParser], None], **kwargs: Any) -> None:
        p = self._sub.add_parser(name, **kwargs)
        if self._wanted is None or self._wanted == name:
            arguments(p)


def _service() -> Any:
    """The service's commands (loaded by the commands that use them)."""
    from tasksprint.service import commands

    return commands


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only that subcommand's arguments are built."""
    parser = argparse.ArgumentParser(prog="tasksprint", description="Fault-tolerant distributed computation.")
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True), command)
    sub.add(
        "replica", lambda p: _launch().add_replica_arguments(p), help="run one replica of the replicated coordinator"
    )
    sub.add(
        "client-credential",
        add_common_arguments,
        help="print the client credential of a cluster secret: what worker machines and users hold "
        "(it cannot act as a replica; see docs/security.md)",
    )
    sub.add("client", _client_arguments, help="run a worker client: node processes, task runner, data server")
    sub.add("run", _run_arguments, help="run a computation on a local cluster started for it")
    sub.add("status", _status_arguments, help="list the service's tasks, or show a computation's replicas and progress")
    sub.add("info", _info_arguments, help="show everything about one task")
    sub.add("cancel", _cancel_arguments, help="kill tasks and every task that depends on them")
    _add_service_parsers(sub)
    sub.add(
        "execute", _execute_arguments, help="run a kolejka task directory on a local cluster, as kolejka-worker does"
    )
    _add_monitor_parsers(sub)
    _add_kolejka_parsers(sub)
    sub.add(
        "batch",
        _batch_arguments,
        help="run a disBatch task file (disBatch's options); survives losing its driver",
        description="Run a disBatch task file: one bash command per line, N at a time, with a status file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--node", help='command that starts a node, e.g. "python node.py" (none: command tasks only)')
    p.add_argument(
        "--slots", type=int, default=os.cpu_count() or 1, help="node processes, i.e. tasks at once (default: CPU count)"
    )
    p.add_argument(
        "--have", action="append", default=[], metavar="TAG", help="a resource tag this machine offers (repeatable)"
    )
    p.add_argument(
        "--queue",
        type=int,
        help="tasks the coordinator may assign beyond --slots, waiting here for a "
        "free node (default: sized from measured task and report times; 0: none)",
    )
    p.add_argument(
        "--report-batch",
        type=int,
        default=256,
        help="most completions reported in one log command (default %(default)s)",
    )
    p.add_argument(
        "--report-delay",
        type=float,
        default=0.05,
        help="seconds a completion may wait to share a log command with later ones, "
        "while tasks queued here wait for a slot (default %(default)s; 0: never)",
    )
    p.add_argument("--name", help="unique client name (default: host-pid-random)")
    p.add_argument("--data-host", default="127.0.0.1", help="address peers use to fetch outputs from this client")
    p.add_argument("--data-port", type=int, default=0, help="port of the data server (default: any free port)")
    p.add_argument(
        "--memory-limit", type=int, default=512, help="MiB of outputs kept in memory before spilling to disk"
    )
    p.add_argument("--spill-dir", type=Path, help="where spilled outputs go (default: the system temp dir)")
    p.add_argument("--spill-limit", type=int, default=16384, help="MiB of outputs spilled to disk at most")
    _launch().add_http_arguments(p, "--metrics", "serve this client's Prometheus metrics at /metrics here")
    add_common_arguments(p)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scheduler", help="path/to/file.py:Class or module:Class")
    p.add_argument("--node", required=True, help='command that starts a node, e.g. "python node.py"')
    p.add_argument("--replicas", type=int, default=3, choices=[1, 3, 5])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--slots", type=int, help="node processes per client (default: CPU count)")
    p.add_argument("--data", type=Path, help="keep data directories and logs here (default: a temporary dir)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument(
        "--hook-report-after", type=float, default=30.0, help="seconds before a scheduler hook that runs on is reported"
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"])


COORDINATORS = "HOST:PORT of a computation's replicas, comma-separated (default: the service, as --server)"


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinators", help=COORDINATORS)
    p.add_argument("--json", action="store_true", help="print JSON")
    _service().add_service_arguments(p)
    p.add_argument("--in-state", dest="state_filter", metavar="STATE", help="only tasks in STATE (or all)")
    p.add_argument("--tag", help="only tasks that require or want TAG")
    p.add_argument("--job", help="only the tasks of JOB")
    p.add_argument("--worker", help="only tasks running on WORKER")
    p.add_argument("--offset", type=int, default=0, help="skip this many tasks (paging)")
    p.add_argument("--limit", type=int, default=50, help="list at most this many (default %(default)s)")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    add_common_arguments(p)


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", type=int, help="task id")
    p.add_argument("--coordinators", help=COORDINATORS)
    p.add_argument("--json", action="store_true", help="print JSON")
    _service().add_service_arguments(p)
    add_common_arguments(p)


def _cancel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tasks", type=int, nargs="*", help="task ids")
    p.add_argument("--job", help="cancel every task of this service job")
    p.add_argument("--coordinators", help=COORDINATORS)
    p.add_argument("--json", action="store_true", help="print JSON")
    _service().add_service_arguments(p)
    add_common_arguments(p)


def _execute_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_dir", type=Path, help="directory holding kolejka_task.json")
    p.add_argument("result_dir", type=Path, help="where kolejka_result.json and the result files go")
    p.add_argument("--ignore-image", action="store_true", help="run a task that names an image on the host")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"])


def _batch_arguments(p: argparse.ArgumentParser) -> None:
    from tasksprint import batch_command

    p.epilog = batch_command.NOT_APPLICABLE
    batch_command.add_arguments(p)
    p.set_defaults(log_level="warning", log_format="console")


def _add_service_parsers(sub: _Subcommands) -> None:
    """The long-running service: ``server``, ``worker``, ``new``, ``wait``, ``logs``, ``tags``, ``drain``."""

    def server(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state", type=Path, help="state directory: secret, data, address (default: ~/.tasksprint)")
        p.add_argument("--host", default="127.0.0.1", help="address the local replicas listen on (default %(default)s)")
        p.add_argument("--peers", help="HOST:PORT of every replica across machines, comma-separated (with --id)")
        p.add_argument("--id", type=int, help="this machine's index into --peers")
        p.add_argument(
            "--retention",
            type=float,
            help="seconds finished tasks keep their full record (default 3600; then a summary)",
        )
        add_common_arguments(p)

    def worker(p: argparse.ArgumentParser) -> None:
        p.add_argument("--have", nargs="+", default=[], metavar="TAG", help="resource tags this worker offers")
        p.add_argument("--name", help="unique worker name (default: host-pid-random)")
        p.add_argument("--slots", type=int, help="tasks at once (default: from cores and memory)")
        p.add_argument("--gpus", help="GPU indices to hand out, comma-separated (default: detected; '' for none)")
        p.add_argument("--data-host", default="127.0.0.1", help="address other workers reach this one at")
        _service().add_service_arguments(p)
        add_common_arguments(p)

    def new(p: argparse.ArgumentParser) -> None:
        p.add_argument("--from-file", type=Path, help="submit one task per line ([options] command...), in bulk")
        _service().add_service_arguments(p)
        add_common_arguments(p)
        _service().add_new_arguments(p)

    def wait(p: argparse.ArgumentParser) -> None:
        p.add_argument("tasks", type=int, nargs="*", help="task ids")
        p.add_argument("--job", help="every task of this job")
        p.add_argument("--timeout", type=float, help="give up after this many seconds")
        _service().add_service_arguments(p)
        add_common_arguments(p)

    def one_task(p: argparse.ArgumentParser) -> None:
        p.add_argument("task", type=int, help="task id")
        _service().add_service_arguments(p)
        add_common_arguments(p)

    def tags(p: argparse.ArgumentParser) -> None:
        p.add_argument("worker", help="worker name")
        p.add_argument("changes", nargs="*", metavar="+TAG|-TAG", help="tags to add (+) or remove (-)")
        _service().add_service_arguments(p)
        add_common_arguments(p)

    def one_worker(p: argparse.ArgumentParser) -> None:
        p.add_argument("worker", help="worker name")
        _service().add_service_arguments(p)
        add_common_arguments(p)

    sub.add("server", server, help="run the task service (three local replicas, or one of --peers)")
    sub.add("worker", worker, help="run command tasks from the service on this machine")
    sub.add("new", new, help="submit a command task; prints its id")
    sub.add("wait", wait, help="wait for tasks to finish; exit code 0 only if all succeeded")
    sub.add("logs", one_task, help="a task's output (stdout, then stderr on stderr)")
    sub.add("tags", tags, help="change a worker's tags: tasksprint tags WORKER +gpu -cpu")
    sub.add("drain", one_worker, help="let a worker finish what it runs and give it nothing more")


def _add_kolejka_parsers(sub: _Subcommands) -> None:
    """kolejka's client commands against the service: ``task put`` and ``result get``."""

    def task(p: argparse.ArgumentParser) -> None:
        p.add_argument("task_action", choices=["put"], help="put: submit a kolejka task directory; prints its key")
        p.add_argument("task_dir", type=Path, help="directory holding kolejka_task.json")
        p.add_argument("--ignore-image", action="store_true", help="run a task that names an image on a worker's host")
        _service().add_service_arguments(p)
        add_common_arguments(p)

    def result(p: argparse.ArgumentParser) -> None:
        p.add_argument("result_action", choices=["get"], help="get: wait for the task, write its result")
        p.add_argument("key", help="the key task put printed")
        p.add_argument("result_dir", type=Path, help="where kolejka_result.json and the result files go")
        p.add_argument("--no-wait", action="store_true", help="do not wait: say so if the task is not done")
        p.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
        _service().add_service_arguments(p)
        add_common_arguments(p)

    sub.add("task", task, help="kolejka tasks on the service: task put TASK_DIR")
    sub.add("result", result, help="kolejka results from the service: result get KEY RESULT_DIR")


def _add_monitor_parsers(sub: _Subcommands) -> None:
    """The read-only monitors: ``dashboard`` (web) and ``top`` (terminal)."""

    def dashboard(p: argparse.ArgumentParser) -> None:
        p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
        p.add_argument(
            "--listen",
            default="127.0.0.1:8470",
            metavar="HOST:PORT",
            help="where to serve (default %(default)s; a non-loopback address needs --auth-file)",
        )
        p.add_argument("--auth-file", type=Path, help="file with one line user:password that every request must carry")
        p.add_argument("--interval", type=float, default=1.0, help="seconds between polls of the replicas")
        p.add_argument(
            "--status-file", type=Path, help="a batch run's status file, shown as a table (read at each view)"
        )
        add_common_arguments(p)

    def top(p: argparse.ArgumentParser) -> None:
        p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
        p.add_argument("--interval", type=float, default=1.0, help="seconds between polls of the replicas")
        p.add_argument("--once", action="store_true", help="print one view and exit")
        add_common_arguments(p)

    sub.add("dashboard", dashboard, help="serve a read-only web dashboard (and /metrics) of a cluster")
    sub.add("top", top, help="a live terminal view of a cluster and its computation")


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (None: none, or only options such as --help)."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `tasksprint tags WORKER +gpu -cpu`: a -TAG is a tag to remove, not an option.
        if args.command != "tags" or not all(e.startswith("-") and not e.startswith("--") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.changes += extra
    # A new batch sets its logs up once its replicas are started (see batch_command); it has no TLS options.
    new_batch = args.command == "batch" and not (args.submit or args.close)
    if not new_batch:
        configure_logging(args.log_level, args.log_format)
    try:
        if not new_batch:
            _launch().configure_tls(args)
        match args.command:
            case "replica":
                return _launch().run_replica(args)
            case "status":
                done = _service().maybe_status(args)
                return _commands().status(args) if done is None else done
            case "client":
                return _commands().client(args)
            case "run":
                return _commands().run(args)
            case "info":
                done = _service().maybe_info(args)
                return _commands().info(args) if done is None else done
            case "cancel":
                done = _service().maybe_cancel(args)
                return _commands().cancel(args) if done is None else done
            case "server" | "worker" | "new" | "wait" | "logs" | "tags" | "drain":
                return int(getattr(_service(), args.command)(args))
            case "execute":
                from tasksprint.execute import execute

                return execute(args.task_dir, args.result_dir, ignore_image=args.ignore_image, timeout=args.timeout)
            case "task" | "result":
                from tasksprint.service import kolejka

                return kolejka.put(args) if args.command == "task" else kolejka.get(args)
            case "dashboard":
                return _commands().dashboard(args)
            case "top":
                return _commands().top(args)
            case "batch":
                if args.submit or args.close:
                    from tasksprint import batch_api

                    return batch_api.submit_command(args)
                from tasksprint import batch_command

                return batch_command.main(args)
            case "client-credential":
                return _launch().print_client_credential(args)
    except SecretError as exc:
        print(f"tasksprint: {exc}", file=sys.stderr)
        return int(_launch().EXIT_USAGE)
    return int(_launch().EXIT_USAGE)


def _exit(code: int) -> NoReturn:
    """End this process with ``code``, without the interpreter's last full garbage collection.

    Every object still alive is freed by the exit anyway; collecting them
    first costs each process of a cluster tens of milliseconds at the end of
    every run, on the path from the last task to the command's return.
    Files are closed, the replica's storage too, by the commands themselves;
    exit handlers and the flush of stdout and stderr still run.
    """
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
