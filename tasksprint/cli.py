"""The ``tasksprint`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from tasksprint import wire

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Structured logs on stderr (stdout is kept for machine-readable output)."""
    renderer = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secret-file", type=Path, help="file holding the cluster secret (default: an insecure development secret)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"])


def _secret(args: argparse.Namespace) -> bytes:
    if args.secret_file is None:
        structlog.get_logger("tasksprint").warning(
            "insecure_default_secret", hint="pass --secret-file FILE on any machine others can reach"
        )
        return wire.DEFAULT_SECRET
    return wire.load_secret(args.secret_file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tasksprint", description="Fault-tolerant distributed computation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replica", help="run one replica of the replicated coordinator")
    p.add_argument("--id", type=int, required=True, help="this replica's index into --peers (0-based)")
    p.add_argument("--peers", required=True, help="HOST:PORT of every replica, comma-separated, same order everywhere")
    p.add_argument("--data", type=Path, required=True, help="data directory (must exist; empty for a new replica)")
    p.add_argument("--cluster", default="default", help="cluster name recorded in the data directory")
    p.add_argument("--scheduler", help="path/to/file.py:Class or module:Class (default: a key-value store)")
    p.add_argument("--election-timeout", type=float, default=0.3, help="seconds (minimum; randomized up to twice)")
    p.add_argument("--heartbeat", type=float, default=0.05, help="seconds between leader heartbeats")
    p.add_argument("--tick-interval", type=float, default=0.1, help="seconds between TICK log entries")
    p.add_argument("--snapshot-every", type=int, default=20_000, help="applied slots between snapshots")
    _add_common(p)

    p.add_argument("--client-timeout", type=float, default=10.0, help="seconds a worker client may be silent before it is declared dead")

    p = sub.add_parser("client", help="run a worker client: node processes, task runner, data server")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--node", required=True, help='command that starts a node, e.g. "python node.py"')
    p.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="node processes, i.e. tasks at once (default: CPU count)")
    p.add_argument("--have", action="append", default=[], metavar="TAG", help="a resource tag this machine offers (repeatable)")
    p.add_argument("--queue", type=int, help="tasks the coordinator may assign beyond --slots, waiting here for a "
                   "free node (default: sized from measured task and report times; 0: none)")
    p.add_argument("--report-batch", type=int, default=256, help="most completions reported in one log command (default %(default)s)")
    p.add_argument("--name", help="unique client name (default: host-pid-random)")
    p.add_argument("--data-host", default="127.0.0.1", help="address peers use to fetch outputs from this client")
    p.add_argument("--data-port", type=int, default=0, help="port of the data server (default: any free port)")
    p.add_argument("--memory-limit", type=int, default=512, help="MiB of outputs kept in memory before spilling to disk")
    p.add_argument("--spill-dir", type=Path, help="where spilled outputs go (default: the system temp dir)")
    _add_common(p)

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
    _add_common(p)

    p = sub.add_parser("info", help="show everything about one task")
    p.add_argument("task", type=int, help="task id")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)

    p = sub.add_parser("cancel", help="kill a task and every task that depends on it")
    p.add_argument("task", type=int, help="task id")
    p.add_argument("--coordinators", required=True, help="HOST:PORT of the replicas, comma-separated")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)
    return parser


def main(argv: list[str] | None = None, *, scheduler: Any = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        match args.command:
            case "replica":
                return _cmd_replica(args, scheduler)
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
    except wire.SecretError as exc:
        print(f"tasksprint: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _cmd_replica(args: argparse.Namespace, scheduler: Any) -> int:
    from tasksprint.paxos.core import PaxosConfig
    from tasksprint.coordinator_machine import SchedulerMismatch
    from tasksprint.app import KVApp
    from tasksprint.config import ReplicaConfig, parse_peers
    from tasksprint.replica import DivergenceError, ListenError, Replica, tune_gc
    from tasksprint.storage import StorageError

    try:
        peers = parse_peers(args.peers)
        paxos = PaxosConfig(
            replicas=len(peers),
            heartbeat_interval=args.heartbeat,
            election_timeout=args.election_timeout,
            tick_interval=args.tick_interval,
        )
        config = ReplicaConfig(
            rid=args.id,
            peers=peers,
            data_dir=args.data,
            secret=_secret(args),
            cluster=args.cluster,
            paxos=paxos,
            snapshot_every=args.snapshot_every,
        )
    except ValueError as exc:
        print(f"tasksprint replica: {exc}", file=sys.stderr)
        return EXIT_USAGE
    app = KVApp()
    if args.scheduler is not None or scheduler is not None:
        from tasksprint.coordinator_app import CoordinatorApp

        from tasksprint_sdk.coordinator import SchedulerLoadError

        try:
            app = CoordinatorApp.create(
                args.scheduler if scheduler is None else type(scheduler), client_timeout=args.client_timeout
            )
        except SchedulerLoadError as exc:
            print(f"tasksprint replica: {exc}", file=sys.stderr)
            return EXIT_USAGE
    replica = Replica(config, app)
    tune_gc()
    try:
        trio.run(replica.run)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # Errors from inside the replica's nursery arrive wrapped in groups.
        known = _first_of(exc, (StorageError, ListenError, DivergenceError, SchedulerMismatch))
        if known is None:
            raise
        if isinstance(known, (DivergenceError, SchedulerMismatch)):
            print(f"tasksprint replica: stopped: {known}", file=sys.stderr)
            return EXIT_DIVERGED
        print(f"tasksprint replica: {known}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _first_of(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    """The first exception of one of ``types`` in ``exc`` or, recursively, in its groups."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_of(inner, types)
            if found is not None:
                return found
    return None


def _cmd_status(args: argparse.Namespace) -> int:
    from tasksprint.log_client import LogClient
    from tasksprint.config import parse_peers

    addrs = list(parse_peers(args.coordinators))
    secret = _secret(args)

    async def collect() -> list[dict]:
        out = []
        client = LogClient(addrs, secret)
        for addr in addrs:
            try:
                st = await client.status(addr)
                out.append({"address": f"{addr[0]}:{addr[1]}", "reachable": True, **_status_dict(st)})
            except wire.NETWORK_ERRORS as exc:
                out.append({"address": f"{addr[0]}:{addr[1]}", "reachable": False, "error": str(exc)})
        return out

    rows = trio.run(collect)
    computation = _query_any(addrs, secret, "status", {})
    if args.json:
        print(json.dumps({"replicas": rows, "computation": computation}, indent=2))
    else:
        for r in rows:
            if r["reachable"]:
                latency = ""
                if r["commit_samples"]:
                    latency = (
                        f" commit latency p50={r['commit_p50_ms']:.2f}ms p99={r['commit_p99_ms']:.2f}ms"
                        f" (last {r['commit_samples']})"
                    )
                print(
                    f"{r['address']:<22} replica {r['rid']}  {r['role']:<10} leader={r['leader']} "
                    f"ballot={r['ballot'] or '-'} commit={r['commit']} applied={r['applied']}{latency}"
                )
            else:
                print(f"{r['address']:<22} unreachable: {r['error']}")
        if computation is not None:
            from tasksprint.run import _progress_line

            leader = next((r["leader"] for r in rows if r.get("leader") is not None), None)
            print(_progress_line(computation, leader))
            if computation.get("result") is not None:
                print("result: " + json.dumps(computation["result"]))
            if computation.get("failure"):
                from tasksprint.run import failure_report

                print(failure_report(computation))
    return 0 if any(r["reachable"] for r in rows) else 1


def _query_any(addrs: list, secret: bytes, name: str, query_args: dict) -> Any:
    """Ask the replicas one after the other; None if no replica answers (or no coordinator runs)."""
    from tasksprint.log_client import LogClient

    async def ask() -> Any:
        client = LogClient(addrs, secret)
        for addr in addrs:
            try:
                return await client.query(name, query_args, addr=addr)
            except (*wire.NETWORK_ERRORS, RuntimeError):
                continue
        return None

    return trio.run(ask)


def _cmd_client(args: argparse.Namespace) -> int:
    from tasksprint.client import Client, ClientConfig
    from tasksprint.node_process import NodeStartError
    from tasksprint.config import parse_peers

    try:
        config = ClientConfig(
            coordinators=parse_peers(args.coordinators),
            node_command=args.node,
            secret=_secret(args),
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
    if args.spill_dir is not None:
        try:
            args.spill_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"tasksprint client: cannot use --spill-dir {args.spill_dir}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        state = trio.run(_client_until_signalled, Client(config))
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
    from tasksprint.config import parse_peers

    info = _query_any(list(parse_peers(args.coordinators)), _secret(args), "info", {"tid": args.task})
    if info is None:
        print(f"tasksprint info: no task {args.task} (or no replica answered)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from tasksprint.log_client import LogClient, Unavailable
    from tasksprint.config import parse_peers

    addrs = list(parse_peers(args.coordinators))
    secret = _secret(args)

    async def cancel() -> Any:
        async with LogClient(addrs, secret) as client:
            return await client.submit({"op": "cancel", "tid": args.task}, deadline=15.0)

    try:
        result = trio.run(cancel)
    except Unavailable as exc:
        print(f"tasksprint cancel: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    elif result.get("ok"):
        print(f"killed: {', '.join(map(str, result.get('killed', []))) or 'nothing (already finished)'}")
    else:
        print(f"tasksprint cancel: {result.get('error')}", file=sys.stderr)
        return 1
    return 0 if result.get("ok") else 1


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
