"""The ``tasksprint`` command: parses the command line and dispatches to the module doing the work.

``replica`` runs :mod:`tasksprint.launch`, ``client`` a
:class:`~tasksprint.client.Client`, ``run`` :func:`tasksprint.run.run_local`;
``status``, ``info`` and ``cancel`` ask the replicas through a
:class:`~tasksprint.channel.ReplicaChannel` (cancel through the log).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from tasksprint import launch, wire
from tasksprint.launch import EXIT_USAGE, add_common_arguments, cluster_secret, configure_logging, load_observer
from tasksprint.observe import ObserverSpecError

__all__ = ["build_parser", "configure_logging", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tasksprint", description="Fault-tolerant distributed computation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replica", help="run one replica of the replicated coordinator")
    launch.add_replica_arguments(p)

    p = sub.add_parser("client", help="run a worker client: node processes, task runner, data server")
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
    p.add_argument("--name", help="unique client name (default: host-pid-random)")
    p.add_argument("--data-host", default="127.0.0.1", help="address peers use to fetch outputs from this client")
    p.add_argument("--data-port", type=int, default=0, help="port of the data server (default: any free port)")
    p.add_argument(
        "--memory-limit", type=int, default=512, help="MiB of outputs kept in memory before spilling to disk"
    )
    p.add_argument("--spill-dir", type=Path, help="where spilled outputs go (default: the system temp dir)")
    add_common_arguments(p)

    p = sub.add_parser("run", help="run a computation on a local cluster started for it")
    p.add_argument("scheduler", help="path/to/file.py:Class or module:Class")
    p.add_argument("--node", required=True, help='command that starts a node, e.g. "python node.py"')
    p.add_argument("--replicas", type=int, default=3, choices=[1, 3, 5])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--slots", type=int, help="node processes per client (default: CPU count)")
    p.add_argument("--data", type=Path, help="keep data directories and logs here (default: a temporary dir)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"])

    p = sub.add_parser("status", help="show the replicas and the computation's progress")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common_arguments(p)

    p = sub.add_parser("info", help="show everything about one task")
    p.add_argument("task", type=int, help="task id")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common_arguments(p)

    p = sub.add_parser("cancel", help="kill a task and every task that depends on it")
    p.add_argument("task", type=int, help="task id")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common_arguments(p)

    p = sub.add_parser("execute", help="run a kolejka task directory on a local cluster, as kolejka-worker does")
    p.add_argument("task_dir", type=Path, help="directory holding kolejka_task.json")
    p.add_argument("result_dir", type=Path, help="where kolejka_result.json and the result files go")
    p.add_argument("--ignore-image", action="store_true", help="run a task that names an image on the host")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"])
    _add_monitor_parsers(sub)
    return parser


def _add_monitor_parsers(sub: Any) -> None:
    """The read-only monitors: ``dashboard`` (web) and ``top`` (terminal)."""
    p = sub.add_parser("dashboard", help="serve a read-only web dashboard (and /metrics) of a cluster")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8470",
        metavar="HOST:PORT",
        help="where to serve (default %(default)s; a non-loopback address needs --auth-file)",
    )
    p.add_argument("--auth-file", type=Path, help="file with one line user:password that every request must carry")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls of the replicas")
    add_common_arguments(p)

    p = sub.add_parser("top", help="a live terminal view of a cluster and its computation")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls of the replicas")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    add_common_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        match args.command:
            case "replica":
                return launch.run_replica(args)
            case "status":
                return _cmd_status(args)
            case "client":
                return _cmd_client(args)
            case "run":
                return _cmd_run(args)
            case "info":
                return _cmd_info(args)
            case "cancel":
                return _cmd_cancel(args)
            case "execute":
                from tasksprint.execute import execute

                return execute(args.task_dir, args.result_dir, ignore_image=args.ignore_image, timeout=args.timeout)
            case "dashboard":
                return _cmd_dashboard(args)
            case "top":
                return _cmd_top(args)
    except wire.SecretError as exc:
        print(f"tasksprint: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _cmd_status(args: argparse.Namespace) -> int:
    from tasksprint.api import ReplicaStatus
    from tasksprint.channel import ASK_ERRORS, ReplicaChannel, Unreachable
    from tasksprint.config import parse_peers
    from tasksprint.coordinator.ops import StatusRequest
    from tasksprint.coordinator.replies import ComputationStatus
    from tasksprint.run import failure_report, progress_line

    channel = ReplicaChannel(parse_peers(args.coordinators), cluster_secret(args))

    async def collect() -> tuple[list[tuple[str, ReplicaStatus | str]], ComputationStatus | None]:
        replicas: list[tuple[str, ReplicaStatus | str]] = []  # (address, its status or why it did not answer)
        for host, port in channel.addrs:
            try:
                replicas.append((f"{host}:{port}", await channel.status((host, port))))
            except ASK_ERRORS as exc:
                replicas.append((f"{host}:{port}", str(exc)))
        try:
            computation = await channel.ask_any(StatusRequest())
        except Unreachable:
            computation = None  # no replica answered, or no coordinator runs
        finally:
            await channel.aclose()
        return replicas, computation

    replicas, computation = trio.run(collect)
    answered = [st for _, st in replicas if isinstance(st, ReplicaStatus)]
    if args.json:
        rows = [
            {"address": address, "reachable": True, **_status_dict(st)}
            if isinstance(st, ReplicaStatus)
            else {"address": address, "reachable": False, "error": st}
            for address, st in replicas
        ]
        plain = None if computation is None else attrs.asdict(computation)
        print(json.dumps({"replicas": rows, "computation": plain}, indent=2))
    else:
        for address, st in replicas:
            if not isinstance(st, ReplicaStatus):
                print(f"{address:<22} unreachable: {st}")
                continue
            latency = ""
            if st.commit_samples:
                latency = (
                    f" commit latency p50={st.commit_p50_ms:.2f}ms p99={st.commit_p99_ms:.2f}ms"
                    f" (last {st.commit_samples})"
                )
            print(
                f"{address:<22} replica {st.rid}  {st.role:<10} leader={st.leader} "
                f"ballot={st.ballot or '-'} commit={st.commit} applied={st.applied}{latency}"
            )
        if computation is not None:
            leader = next((st.leader for st in answered if st.leader is not None), None)
            print(progress_line(computation, leader))
            if computation.result is not None:
                print("result: " + json.dumps(attrs.asdict(computation.result)))
            if computation.failure is not None:
                print(failure_report(computation))
    return 0 if answered else 1


def _ask_any(args: argparse.Namespace, request: Any) -> Any:
    """The first replica's answer to ``request``; None if no replica answers (or no coordinator runs)."""
    from tasksprint.channel import ReplicaChannel, Unreachable
    from tasksprint.config import parse_peers

    channel = ReplicaChannel(parse_peers(args.coordinators), cluster_secret(args))

    async def ask() -> Any:
        try:
            return await channel.ask_any(request)
        except Unreachable:
            return None
        finally:
            await channel.aclose()

    return trio.run(ask)


def _cmd_client(args: argparse.Namespace) -> int:
    from tasksprint.client import Client, ClientConfig
    from tasksprint.config import parse_peers
    from tasksprint.node_process import NodeStartError

    try:
        config = ClientConfig(
            coordinators=parse_peers(args.coordinators),
            node_command=args.node,
            secret=cluster_secret(args),
            slots=args.slots,
            queue=args.queue,
            report_batch=args.report_batch,
            have=tuple(args.have),
            data_host=args.data_host,
            data_port=args.data_port,
            memory_limit=args.memory_limit * 1024 * 1024,
            spill_dir=args.spill_dir,
            **({"name": args.name} if args.name else {}),
        )
    except ValueError as exc:
        print(f"tasksprint client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Loaded here so that a bad TASKSPRINT_OBSERVER stops the client before it joins.
        observer = load_observer("client")
    except ObserverSpecError as exc:
        print(f"tasksprint client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.spill_dir is not None:
        try:
            args.spill_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"tasksprint client: cannot use --spill-dir {args.spill_dir}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        state = trio.run(_client_until_signalled, Client(config, observer=observer))
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        starts, rest = group.split(NodeStartError)
        if starts is None or rest is not None:
            raise
        for exc in starts.exceptions:
            print(f"tasksprint client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NodeStartError as exc:
        print(f"tasksprint client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if state == "finished" else 1


async def _client_until_signalled(client: Any) -> str:
    """Run a worker client; SIGTERM stops it cleanly (node processes and spilled outputs go too)."""
    state = "terminated"
    async with trio.open_nursery() as nursery:

        async def on_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    structlog.get_logger("tasksprint.client").info("terminating", signal="SIGTERM")
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_sigterm)
        state = await client.run()
        nursery.cancel_scope.cancel()
    return state


def _cmd_run(args: argparse.Namespace) -> int:
    from tasksprint.run import run_local

    return run_local(
        args.scheduler,
        args.node,
        replicas=args.replicas,
        clients=args.clients,
        slots=args.slots,
        data=args.data,
        timeout=args.timeout,
    )


def _cmd_info(args: argparse.Namespace) -> int:
    from tasksprint.coordinator.ops import InfoRequest

    info = _ask_any(args, InfoRequest(tid=args.task))
    if info is None:
        print(f"tasksprint info: no task {args.task} (or no replica answered)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(attrs.asdict(info), indent=2))
    else:
        for field in attrs.fields(type(info)):
            value = getattr(info, field.name)
            print(f"{field.name:>12}: {list(value) if isinstance(value, tuple) else value}")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from tasksprint.config import parse_peers
    from tasksprint.coordinator.ops import Cancelled, CancelOp, Refused
    from tasksprint.log_client import LogClient, Unavailable

    addrs = list(parse_peers(args.coordinators))
    secret = cluster_secret(args)

    async def cancel() -> Any:
        async with LogClient(addrs, secret) as client:
            return await client.submit(CancelOp(tid=args.task).to_wire(), deadline=15.0)

    try:
        result = trio.run(cancel)
    except Unavailable as exc:
        print(f"tasksprint cancel: {exc}", file=sys.stderr)
        return 1
    ok = isinstance(result, Cancelled)
    if args.json:
        # The answer's fields, and whether the cancel was accepted.
        print(json.dumps({"ok": ok, **(attrs.asdict(result) if attrs.has(type(result)) else {})}))
    elif ok:
        print(f"killed: {', '.join(map(str, result.killed)) or 'nothing (already finished)'}")
    else:
        error = result.error if isinstance(result, Refused) else repr(result)
        print(f"tasksprint cancel: {error}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from tasksprint.config import parse_peers
    from tasksprint.dashboard.server import BindRefused, Credentials, check_bind, serve_dashboard

    host, _, port = args.listen.rpartition(":")
    try:
        credentials = Credentials.from_file(args.auth_file) if args.auth_file else None
        addrs = list(parse_peers(args.coordinators))
        listen_port = int(port)
    except (OSError, ValueError) as exc:
        print(f"tasksprint dashboard: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host = host.strip("[]") or "127.0.0.1"
    try:
        check_bind(host, credentials)
    except BindRefused as exc:
        print(f"tasksprint dashboard: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: serve_dashboard(
                    addrs,
                    cluster_secret(args),
                    host,
                    listen_port,
                    interval=args.interval,
                    credentials=credentials,
                    task_status=task_status,
                )
            )
            print(f"dashboard at http://{args.listen.rpartition(':')[0] or host}:{bound}/", file=sys.stderr, flush=True)

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        return 130
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from tasksprint.config import parse_peers
    from tasksprint.top import run_top

    try:
        return run_top(list(parse_peers(args.coordinators)), cluster_secret(args), args.interval, once=args.once)
    except KeyboardInterrupt:
        return 0


def _status_dict(st: Any) -> dict:
    return {
        "rid": st.rid,
        "role": st.role,
        "leader": st.leader,
        "ballot": st.ballot,
        "commit": st.commit,
        "applied": st.applied,
        "digest": st.digest,
        "commit_p50_ms": st.commit_p50_ms,
        "commit_p99_ms": st.commit_p99_ms,
        "commit_samples": st.commit_samples,
    }


if __name__ == "__main__":
    sys.exit(main())
