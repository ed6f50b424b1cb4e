"""What each ``tasksprint`` command does, once :mod:`tasksprint.cli` has parsed it.

Each function takes the parsed arguments and returns the exit code.
``status``, ``info`` and ``cancel`` ask the replicas through a
:class:`~tasksprint.channel.ReplicaChannel` (cancel through the log, with a
:class:`~tasksprint.log_client.LogClient`); ``client`` runs a worker
:class:`~tasksprint.client.Client` until the computation ends or SIGTERM;
``run`` a whole computation on this machine (:func:`tasksprint.run.run_local`);
``dashboard`` and ``top`` the read-only monitors.  ``replica`` is
:func:`tasksprint.launch.run_replica`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import attrs
import structlog
import trio

from tasksprint.launch import EXIT_USAGE, cluster_secret, http_endpoint, load_observer
from tasksprint.observe import ObserverSpecError

__all__ = ["cancel", "client", "dashboard", "info", "run", "status", "top"]


def status(args: argparse.Namespace) -> int:
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
            if st.fsync_samples:
                latency += f" fsync p50={st.fsync_p50_ms:.2f}ms p99={st.fsync_p99_ms:.2f}ms"
            print(
                f"{address:<22} replica {st.rid}  {st.role:<10} leader={st.leader} "
                f"ballot={st.ballot or '-'} commit={st.commit} applied={st.applied}{latency}"
            )
            slow = _slow_hook_line(st)
            if slow is not None:
                print(slow)
        for divergence in sorted({st.divergence for st in answered if st.divergence}):
            print(f"replicas disagree: {divergence}")
        if computation is not None:
            leader = next((st.leader for st in answered if st.leader is not None), None)
            print(progress_line(computation, leader))
            for c in computation.live_clients:
                print(_client_line(c))
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


def client(args: argparse.Namespace) -> int:
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
            report_delay=args.report_delay,
            have=tuple(args.have),
            data_host=args.data_host,
            data_port=args.data_port,
            memory_limit=args.memory_limit * 1024 * 1024,
            spill_dir=args.spill_dir,
            spill_limit=args.spill_limit * 1024 * 1024,
            **({"name": args.name} if args.name else {}),
        )
    except ValueError as exc:
        print(f"tasksprint client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Loaded here so that a bad TASKSPRINT_OBSERVER stops the client before it joins.
        observer = load_observer("client")
        http = http_endpoint(args, "--metrics", "client", observer)
    except (ObserverSpecError, ValueError) as exc:
        print(f"tasksprint client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if http is not None:
        observer = http[3]
    if args.spill_dir is not None:
        try:
            args.spill_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"tasksprint client: cannot use --spill-dir {args.spill_dir}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        state = trio.run(_client_until_signalled, Client(config, observer=observer), http)
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


async def _client_until_signalled(client: Any, http: tuple | None = None) -> str:
    """Run a worker client; SIGTERM stops it cleanly (node processes and spilled outputs go too).

    With ``http`` (from :func:`~tasksprint.launch.http_endpoint`), its
    metrics are served at ``/metrics`` there while it runs.
    """
    state = "terminated"
    async with trio.open_nursery() as nursery:
        if http is not None:
            from tasksprint.dashboard.server import serve_metrics

            host, port, credentials, observer = http
            bound = await nursery.start(
                lambda task_status: serve_metrics(
                    host, port, observer.registry, credentials=credentials, task_status=task_status
                )
            )
            structlog.get_logger("tasksprint.client").info("metrics_serving", url=f"http://{host}:{bound}/metrics")

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


def run(args: argparse.Namespace) -> int:
    from tasksprint.run import run_local

    return run_local(
        args.scheduler,
        args.node,
        replicas=args.replicas,
        clients=args.clients,
        slots=args.slots,
        data=args.data,
        timeout=args.timeout,
        hook_report_after=args.hook_report_after,
    )


def info(args: argparse.Namespace) -> int:
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


def cancel(args: argparse.Namespace) -> int:
    from tasksprint.config import parse_peers
    from tasksprint.coordinator.ops import Cancelled, CancelOp, Refused
    from tasksprint.log_client import LogClient, Unavailable

    addrs = list(parse_peers(args.coordinators))
    secret = cluster_secret(args)

    if len(args.tasks) != 1 or args.job is not None:
        print("tasksprint cancel: a computation's tasks are cancelled one id at a time", file=sys.stderr)
        return EXIT_USAGE

    async def cancel() -> Any:
        async with LogClient(addrs, secret) as client:
            return await client.submit(CancelOp(tid=args.tasks[0]).to_wire(), deadline=15.0)

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


def dashboard(args: argparse.Namespace) -> int:
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
                    status_file=args.status_file,
                    task_status=task_status,
                )
            )
            print(f"dashboard at http://{args.listen.rpartition(':')[0] or host}:{bound}/", file=sys.stderr, flush=True)

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        return 130
    return 0


def top(args: argparse.Namespace) -> int:
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
        "divergence": st.divergence,
        "fsync_p50_ms": st.fsync_p50_ms,
        "fsync_p99_ms": st.fsync_p99_ms,
        "fsync_samples": st.fsync_samples,
        # Replica-local (this replica's watchdog), not replicated state.
        "slow_hook": None if st.slow_hook is None else attrs.asdict(st.slow_hook),
    }


def _slow_hook_line(st: Any) -> str | None:
    """The replica's last slow scheduler hook call, for people; None if there was none."""
    hook = st.slow_hook
    if hook is None:
        return None
    what = hook.hook
    if hook.tid is not None:
        what += f"(tid={hook.tid})"
    elif hook.cid is not None:
        what += f"(cid={hook.cid})"
    state = f"still running after {hook.seconds:.1f}s" if hook.running else f"returned after {hook.seconds:.1f}s"
    return f"  slow scheduler hook (seen by this replica): {what} in log slot {hook.slot}, {state}"


def _client_line(c: Any) -> str:
    """One live client of a status answer: load, reported usage, last heard from."""
    usage = ""
    if c.cpu_percent is not None:
        usage += f" cpu={c.cpu_percent:.0f}%"
    if c.rss_bytes is not None:
        usage += f" rss={c.rss_bytes / 2**20:.0f}MiB"
    if c.heard_s is not None:
        usage += f" heard {c.heard_s:.1f}s ago"
    tags = f" tags={','.join(c.tags)}" if c.tags else ""
    return f"  client {c.cid} {c.name} slots={c.slots}{tags} running={c.running}{usage}"
