"""Starting a replica: the entry point behind ``tasksprint replica`` and ``Coordinator.start()``.

:func:`main` parses the ``tasksprint replica`` arguments, builds the
replica's configuration and application (a user's scheduler, or the
built-in key-value store), runs it until it stops and returns the exit
code.  The command line (:mod:`tasksprint.cli`) and a scheduler script's
``MyCoordinator().start()`` both come here.  Also home of what every
command shares: logging set-up, the cluster secret and the observer named
by ``TASKSPRINT_OBSERVER`` (:func:`load_observer`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from tasksprint import observe, wire
from tasksprint.machine import MAX_SESSIONS

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_USAGE",
    "add_common_arguments",
    "add_http_arguments",
    "add_replica_arguments",
    "cluster_secret",
    "configure_logging",
    "http_endpoint",
    "load_observer",
    "main",
    "run_replica",
]

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Structured logs on stderr (stdout is kept for machine-readable output)."""
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
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


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every networked command takes: secret file and logging."""
    p.add_argument(
        "--secret-file",
        type=Path,
        help="file holding the cluster secret or a client credential; - reads it from stdin "
        "(none: a public secret, loopback only)",
    )
    p.add_argument("--tls-cert", type=Path, help="mutual TLS: this process certificate (PEM), with --tls-key, --tls-ca")
    p.add_argument("--tls-key", type=Path, help="mutual TLS: the private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", type=Path, help="mutual TLS: the CA every peer's certificate must chain to (PEM)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="console", choices=["console", "json"])


def cluster_secret(args: argparse.Namespace) -> bytes:
    """The secret named by ``--secret-file``: a cluster secret or a client credential.

    Without one, the public development secret is used (with a warning)
    only when every address the command uses (``--peers``,
    ``--coordinators``, ``--data-host``, ``--listen``) is a loopback
    address: nobody else can reach such a cluster.  Otherwise, and if the
    file cannot be used, raises :class:`tasksprint.wire.SecretError`.
    """
    if args.secret_file is None:
        remote = [h for h in command_hosts(args) if not is_loopback(h)]
        if remote:
            raise wire.SecretError(
                f"--secret-file is required: {remote[0]} is not a loopback address, and without a secret file "
                "anyone who can reach a port could join the cluster (see docs/security.md)"
            )
        structlog.get_logger("tasksprint").warning(
            "insecure_default_secret", hint="loopback only; pass --secret-file FILE on any network"
        )
        return wire.DEFAULT_SECRET
    return wire.load_secret(args.secret_file)


def configure_tls(args: argparse.Namespace) -> None:
    """Turn on mutual TLS for every connection of this process if ``--tls-cert/--tls-key/--tls-ca`` are given.

    Raises :class:`tasksprint.wire.SecretError` if only some are given or a file cannot be used.
    """
    given = [getattr(args, name, None) for name in ("tls_cert", "tls_key", "tls_ca")]
    if not any(given):
        return
    if not all(given):
        raise wire.SecretError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    wire.use_tls(wire.TLS.from_files(*given))


def command_hosts(args: argparse.Namespace) -> list[str]:
    """Every host a command's arguments name: its peers or coordinators, and what it listens on."""
    hosts = []
    for name in ("peers", "coordinators"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            hosts += [part.strip().rpartition(":")[0].strip("[]") for part in value.split(",")]
    for name in ("data_host", "listen"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            hosts.append(value.rpartition(":")[0].strip("[]") if name == "listen" and ":" in value else value)
    return hosts


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def print_client_credential(args: argparse.Namespace) -> int:
    """``tasksprint client-credential``: the client credential of the cluster secret, on stdout."""
    if args.secret_file is None:
        raise wire.SecretError("--secret-file is required: the cluster secret the credential is derived from")
    secret = wire.load_secret(args.secret_file)
    try:
        sys.stdout.buffer.write(wire.client_credential(secret))
    except ValueError as exc:
        raise wire.SecretError(f"{args.secret_file}: {exc}") from None
    return 0


def load_observer(role: str) -> observe.Observer:
    """The observer ``TASKSPRINT_OBSERVER`` names for a process of ``role`` (the null one without it).

    Raises :class:`tasksprint.observe.ObserverSpecError` if it names no usable factory.
    """
    return observe.from_spec(os.environ.get(observe.OBSERVER_ENV), role)


def add_replica_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tasksprint replica``."""
    p.add_argument("--id", type=int, required=True, help="this replica's index into --peers (0-based)")
    p.add_argument("--peers", required=True, help="HOST:PORT of every replica, comma-separated, same order everywhere")
    p.add_argument("--data", type=Path, required=True, help="data directory (must exist; empty for a new replica)")
    p.add_argument("--cluster", default="default", help="cluster name recorded in the data directory")
    p.add_argument("--scheduler", help="path/to/file.py:Class or module:Class (default: a key-value store)")
    p.add_argument(
        "--election-timeout",
        type=float,
        default=0.15,
        help="seconds (minimum; randomized up to twice; stretched when heartbeats arrive late)",
    )
    p.add_argument("--heartbeat", type=float, default=0.03, help="seconds between leader heartbeats")
    p.add_argument("--tick-interval", type=float, default=0.1, help="seconds between TICK log entries")
    p.add_argument("--snapshot-every", type=int, default=20_000, help="applied slots between snapshots")
    p.add_argument(
        "--hook-report-after",
        type=float,
        default=30.0,
        help="seconds a scheduler hook may run before the replica logs scheduler_hook_slow (default %(default)s)",
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=MAX_SESSIONS,
        help="exactly-once client sessions kept before the least recently used are collected; "
        "give every replica the same value (default %(default)s)",
    )
    p.add_argument(
        "--max-frame",
        type=int,
        default=wire.MAX_FRAME_DEFAULT,
        help="largest frame in bytes sent or accepted after the handshake; a command must fit in one "
        "(default %(default)s; the same on every replica)",
    )
    add_common_arguments(p)
    p.add_argument(
        "--client-timeout",
        type=float,
        default=10.0,
        help="seconds a worker client may be silent before it is declared dead",
    )
    add_http_arguments(p, "--http", "serve the dashboard and /metrics (this replica's and the cluster's) here")


def add_http_arguments(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    """``flag HOST:PORT`` (an HTTP endpoint of a replica or a client) and ``--http-auth-file``."""
    p.add_argument(flag, metavar="HOST:PORT", help=f"{what}; loopback only unless --http-auth-file is given")
    p.add_argument(
        "--http-auth-file",
        type=Path,
        help=f"file with one line user:password that every request to {flag} must carry (HTTP basic)",
    )


def http_endpoint(args: argparse.Namespace, flag: str, role: str, observer: observe.Observer) -> tuple | None:
    """``(host, port, credentials, observer)`` for ``flag`` (None when not given).

    The observer is the one to run with: ``observer`` if it already feeds a
    Prometheus registry, a new :class:`~tasksprint.metrics.PrometheusObserver`
    if it is the null one.  Raises ValueError (a usage error) for a malformed
    address, an unreadable credentials file, a non-loopback address without
    credentials, or another observer named by ``TASKSPRINT_OBSERVER``.
    """
    where = getattr(args, flag.lstrip("-").replace("-", "_"))
    if where is None:
        return None  # before the imports: a process without an endpoint loads no web stack
    from tasksprint.dashboard.server import BindRefused, Credentials, check_bind
    from tasksprint.metrics import PrometheusObserver
    from tasksprint.metrics import observer as prometheus_observer

    host, sep, port = where.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {where!r}: expected HOST:PORT, e.g. 127.0.0.1:8471")
    try:
        credentials = Credentials.from_file(args.http_auth_file) if args.http_auth_file else None
        check_bind(host, credentials)
    except OSError as exc:
        raise ValueError(f"--http-auth-file: {exc}") from exc
    except BindRefused as exc:
        raise ValueError(f"{flag}: {exc}".replace("--auth-file", "--http-auth-file")) from exc
    if observer is observe.NULL or isinstance(observer, observe.NullObserver):
        observer = prometheus_observer(role)
    elif not isinstance(observer, PrometheusObserver):
        raise ValueError(
            f"{flag} serves Prometheus metrics, but {observe.OBSERVER_ENV} names another observer "
            f"({type(observer).__name__}); unset it or name tasksprint.metrics:observer"
        )
    return host, int(port), credentials, observer


def main(argv: list[str], *, scheduler: type | None = None) -> int:
    """Run a replica with the ``tasksprint replica`` arguments ``argv``; returns the exit code.

    ``scheduler`` (a ``Coordinator`` subclass) overrides ``--scheduler``.
    """
    parser = argparse.ArgumentParser(prog="tasksprint replica", description="Run one replica of the coordinator.")
    add_replica_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return run_replica(args, scheduler)
    except wire.SecretError as exc:
        print(f"tasksprint: {exc}", file=sys.stderr)
        return EXIT_USAGE


def run_replica(args: argparse.Namespace, scheduler: type | None = None) -> int:
    """Run the replica described by parsed ``tasksprint replica`` arguments until it stops."""
    from tasksprint.app import KVApp
    from tasksprint.config import ReplicaConfig, parse_peers
    from tasksprint.coordinator.snapshots import SchedulerMismatch
    from tasksprint.paxos.core import PaxosConfig
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
        secret = cluster_secret(args)
        if wire.role_keys(secret).replica is None:
            raise ValueError(
                f"{args.secret_file} is a client credential; a replica needs the cluster secret file it came from"
            )
        config = ReplicaConfig(
            rid=args.id,
            peers=peers,
            data_dir=args.data,
            secret=secret,
            cluster=args.cluster,
            paxos=paxos,
            snapshot_every=args.snapshot_every,
            hook_report_after=args.hook_report_after,
            max_frame=args.max_frame,
            max_sessions=args.max_sessions,
        )
    except ValueError as exc:
        print(f"tasksprint replica: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        observer = load_observer("replica")
        http = http_endpoint(args, "--http", "replica", observer)
    except (observe.ObserverSpecError, ValueError) as exc:
        print(f"tasksprint replica: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if http is not None:
        observer = http[3]
    app = KVApp()
    if args.scheduler is not None or scheduler is not None:
        from tasksprint_sdk.coordinator import SchedulerLoadError

        from tasksprint.coordinator.app import CoordinatorApp

        try:
            app = CoordinatorApp.create(
                args.scheduler if scheduler is None else scheduler,
                client_timeout=args.client_timeout,
                observer=observer,
            )
        except SchedulerLoadError as exc:
            print(f"tasksprint replica: {exc}", file=sys.stderr)
            return EXIT_USAGE
    replica = Replica(config, app, observer=observer, handover_on_sigterm=True)
    tune_gc()
    try:
        trio.run(_serve_replica, replica, http)
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


async def _serve_replica(replica: Any, http: tuple | None) -> None:
    """Run ``replica``; with ``http``, serve the dashboard and ``/metrics`` beside it once it serves."""
    if http is None:
        await replica.run()
        return
    from tasksprint.dashboard.server import serve_dashboard

    host, port, credentials, observer = http
    cfg = replica.config
    async with trio.open_nursery() as nursery:

        async def replica_then_stop(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await replica.run(task_status=task_status)
            nursery.cancel_scope.cancel()  # the replica stopped: so does its web server

        await nursery.start(replica_then_stop)
        bound = await nursery.start(
            lambda task_status: serve_dashboard(
                list(cfg.peers),
                cfg.secret,
                host,
                port,
                credentials=credentials,
                own_metrics=observer.registry,
                task_status=task_status,
            )
        )
        structlog.get_logger("tasksprint.replica").info("http_serving", url=f"http://{host}:{bound}/")


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
