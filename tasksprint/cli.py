"""The ``tasksprint`` command."""

from __future__ import annotations

import argparse
import json
import logging
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

    p = sub.add_parser("status", help="show every replica's view of the cluster")
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
    except wire.SecretError as exc:
        print(f"tasksprint: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _cmd_replica(args: argparse.Namespace, scheduler: Any) -> int:
    from tasksprint.paxos.core import PaxosConfig
    from tasksprint.replica import DivergenceError, KVApp, Replica, ReplicaConfig, parse_peers
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

        app = CoordinatorApp.create(args.scheduler if scheduler is None else type(scheduler))
    replica = Replica(config, app)
    try:
        trio.run(replica.run)
    except StorageError as exc:
        print(f"tasksprint replica: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DivergenceError as exc:
        print(f"tasksprint replica: stopped: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        return 130
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from tasksprint.log_client import LogClient
    from tasksprint.replica import parse_peers

    addrs = list(parse_peers(args.coordinators))
    secret = _secret(args)

    async def collect() -> list[dict]:
        out = []
        client = LogClient(addrs, secret)
        for addr in addrs:
            try:
                st = await client.status(addr)
                out.append({"address": f"{addr[0]}:{addr[1]}", "reachable": True, **_status_dict(st)})
            except (OSError, trio.TooSlowError, wire.BadMessage) as exc:
                out.append({"address": f"{addr[0]}:{addr[1]}", "reachable": False, "error": str(exc)})
        return out

    rows = trio.run(collect)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if r["reachable"]:
                print(
                    f"{r['address']:<22} replica {r['rid']}  {r['role']:<10} leader={r['leader']} "
                    f"ballot={r['ballot'] or '-'} commit={r['commit']} applied={r['applied']}"
                )
            else:
                print(f"{r['address']:<22} unreachable: {r['error']}")
    return 0 if any(r["reachable"] for r in rows) else 1


def _status_dict(st: Any) -> dict:
    return {
        "rid": st.rid,
        "role": st.role,
        "leader": st.leader,
        "ballot": st.ballot,
        "commit": st.commit,
        "applied": st.applied,
        "digest": st.digest,
    }


if __name__ == "__main__":
    sys.exit(main())
