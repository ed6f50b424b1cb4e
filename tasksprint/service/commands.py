"""What the service's commands do: ``server``, ``worker``, ``new``, ``wait``, ``logs``, ``tags``, ``drain``,
and ``status`` / ``info`` / ``cancel`` when the replicas run the service.

Each function takes the arguments :mod:`tasksprint.cli` parsed and returns
the exit code.  ``status``, ``info`` and ``cancel`` also serve ``tasksprint
run`` computations: :func:`maybe_status` (and the others) answer for a
service and return None when the replicas run a computation, so
:mod:`tasksprint.commands` carries on as before.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from tasksprint.credentials import SecretError
from tasksprint.service.api import NotAService, Service, ServiceError, task_spec
from tasksprint.service.home import ServiceNotFound, locate, parse_addrs, state_dir

__all__ = [
    "add_new_arguments",
    "add_service_arguments",
    "detect_gpus",
    "detect_slots",
    "drain",
    "logs",
    "maybe_cancel",
    "maybe_info",
    "maybe_status",
    "new",
    "server",
    "tags",
    "wait",
    "worker",
]

EXIT_USAGE = 2


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    """``--server`` and ``--state``: how a command finds the service."""
    p.add_argument(
        "--server",
        help="HOST:PORT of the service's replicas, comma-separated (default: $TASKSPRINT_SERVER, or --state)",
    )
    p.add_argument("--state", type=Path, help="the service's state directory (default: ~/.tasksprint)")


def add_new_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one task, for ``tasksprint new`` and each line of ``--from-file``."""
    p.add_argument(
        "--require", action="append", default=[], metavar="TAG[,TAG]", help="tags a worker must have (repeatable)"
    )
    p.add_argument(
        "--want", action="append", default=[], metavar="TAG[,TAG]", help="tags a worker should have, if one does"
    )
    p.add_argument(
        "--after", action="append", default=[], metavar="TID[,TID]", help="tasks that must succeed first (repeatable)"
    )
    p.add_argument("--name", help="a name for people")
    p.add_argument("--job", help="the job the task belongs to (cancel --job, status --job)")
    p.add_argument("--retries", type=int, default=0, help="attempts after a failed one (default 0)")
    p.add_argument("--timeout", type=float, help="seconds each attempt may run")
    p.add_argument("--memory", type=int, metavar="BYTES", help="memory limit")
    p.add_argument("--cpus", type=float, help="CPU limit (cores)")
    p.add_argument("--pids", type=int, help="most processes")
    p.add_argument("--cpu-time", type=float, metavar="SECONDS", help="CPU time limit")
    p.add_argument("--output-bytes", type=int, help="most bytes of output kept")
    p.add_argument("--cwd", help="working directory on the worker")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable")
    p.add_argument(
        "task_command",
        metavar="CMD",
        nargs=argparse.REMAINDER,
        help="the command: one argument is a bash command line, several are a program and its arguments",
    )


def _spec(args: argparse.Namespace, where: str) -> dict[str, Any]:
    command = list(args.task_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError(f"{where}: no command given")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{where}: --env {item!r} is not NAME=VALUE")
        env[name] = value
    limits = {
        key: value
        for key, value in (
            ("memory_bytes", args.memory),
            ("cpus", args.cpus),
            ("pids", args.pids),
            ("cpu_time_s", args.cpu_time),
            ("output_bytes", args.output_bytes),
        )
        if value is not None
    }
    one = len(command) == 1
    try:
        after = [int(t) for item in args.after for t in item.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{where}: --after takes task ids, got {' '.join(args.after)!r}") from None
    return task_spec(
        command[0] if one else None,
        argv=None if one else command,
        require=[t for item in args.require for t in item.split(",") if t],
        want=[t for item in args.want for t in item.split(",") if t],
        after=after,
        name=args.name,
        job=args.job,
        retries=args.retries,
        timeout=args.timeout,
        limits=limits or None,
        cwd=args.cwd,
        env=env or None,
    )


class _LineParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit
        raise ValueError(message)


def specs_from_file(path: Path) -> list[dict[str, Any]]:
    """One task per non-empty, non-comment line (``[options] command...``); raises ValueError naming the line."""
    parser = _LineParser(prog="line", add_help=False)
    add_new_arguments(parser)
    specs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path} line {n}"
            try:
                specs.append(_spec(parser.parse_args(shlex.split(line)), where))
            except ValueError as exc:
                raise ValueError(exc if str(exc).startswith(where) else f"{where}: {exc}") from None
    return specs


def _connect(args: argparse.Namespace) -> Service:
    addrs, secret = locate(args.server, args.state, getattr(args, "secret_file", None))
    return Service(addrs, secret)


def _fail(what: str, exc: BaseException) -> int:
    print(f"tasksprint {what}: {exc}", file=sys.stderr)
    return 1 if isinstance(exc, ServiceError) else EXIT_USAGE


# ---------------------------------------------------------------- server


def server(args: argparse.Namespace) -> int:
    from tasksprint.service.server import serve_local, serve_one

    state = state_dir(args.state)
    try:
        if args.peers:
            if args.id is None:
                raise ServiceNotFound("--peers needs --id: this machine's index into the list")
            return serve_one(state, args.peers, args.id)
        return serve_local(state, args.host, retention=args.retention)
    except (ServiceNotFound, OSError) as exc:
        return _fail("server", exc)


# ---------------------------------------------------------------- worker


def detect_slots() -> int:
    """Tasks at once: one per core, at most one per 256 MiB of memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        by_memory = max(1, pages // (256 * 1024 * 1024))
    except (ValueError, OSError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def detect_gpus() -> list[str]:
    """The NVIDIA GPUs this machine has (their indices), from the driver's /proc entries."""
    root = Path("/proc/driver/nvidia/gpus")
    try:
        return [str(i) for i, _ in enumerate(sorted(root.iterdir()))]
    except OSError:
        return []


def worker(args: argparse.Namespace) -> int:
    from tasksprint.client import Client, ClientConfig

    try:
        addrs, secret = locate(args.server, args.state, args.secret_file)
        gpus = detect_gpus() if args.gpus is None else [g for g in args.gpus.split(",") if g]
        have = list(dict.fromkeys(args.have + (["gpu"] if gpus and "gpu" not in args.have else [])))
        config = ClientConfig(
            coordinators=tuple(addrs),
            node_command=None,
            secret=secret,
            slots=args.slots or detect_slots(),
            have=tuple(have),
            gpus=tuple(gpus),
            data_host=args.data_host,
            **({"name": args.name} if args.name else {}),
        )
    except (ServiceNotFound, SecretError, ValueError) as exc:
        return _fail("worker", exc)
    print(
        f"tasksprint worker {config.name}: {config.slots} slots, tags {' '.join(have) or '-'}"
        + (f", GPUs {','.join(gpus)}" if gpus else ""),
        file=sys.stderr,
        flush=True,
    )

    async def until_signalled() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signal)
            await Client(config).run()
            nursery.cancel_scope.cancel()

    trio.run(until_signalled)
    return 0


# ------------------------------------------------------------------- new


def new(args: argparse.Namespace) -> int:
    try:
        if args.from_file is not None:
            if args.task_command:
                raise ValueError("give a command or --from-file, not both")
            specs = specs_from_file(args.from_file)
        else:
            specs = [_spec(args, "new")]
        ids = _connect(args).submit_specs(specs)
    except (ValueError, OSError, ServiceNotFound, SecretError, ServiceError) as exc:
        return _fail("new", exc)
    for tid in ids:
        print(tid)
    return 0


# ----------------------------------------------------- status, info, cancel


def _locate_for(args: argparse.Namespace) -> Service:
    if getattr(args, "coordinators", None):
        from tasksprint.launch import cluster_secret

        return Service(parse_addrs(args.coordinators, "--coordinators"), cluster_secret(args))
    svc = _connect(args)
    # Should the replicas run a computation, its commands carry on with these.
    args.coordinators = ",".join(f"{h}:{p}" for h, p in svc.addrs)
    if args.secret_file is None:
        args.secret_file = state_dir(args.state) / "secret"
    return svc


def _row_line(row: dict[str, Any]) -> str:
    tags = " ".join([*row["require"], *(f"~{t}" for t in row["want"])]) or "-"
    workers = ",".join(row["workers"]) or "-"
    return f"{row['id']:>8}  {row['state']:<9}  {workers:<16}  {tags:<16}  {row['command']}"


def _status_text(page: dict[str, Any]) -> str:
    counts = page["counts"]
    lines = [
        f"{page['total']} task(s) listed; waiting {counts['waiting']}, queued {counts['queued']}, "
        f"done {counts['done']}, failed {counts['failed']}, cancelled {counts['cancelled']}",
        f"{'ID':>8}  {'STATE':<9}  {'WORKER':<16}  {'TAGS':<16}  COMMAND",
    ]
    lines += [_row_line(r) for r in page["tasks"]]
    shown = page["offset"] + len(page["tasks"])
    if shown < page["total"]:
        lines.append(f"... {page['total'] - shown} more (--offset {shown})")
    return "\n".join(lines)


def maybe_status(args: argparse.Namespace) -> int | None:
    """``tasksprint status`` for a service; None if the replicas run a computation."""
    try:
        svc = _locate_for(args)
        filters = {
            "state": args.state_filter,
            "tag": args.tag,
            "job": args.job,
            "worker": args.worker,
            "offset": args.offset,
            "limit": args.limit,
        }
        while True:
            page = svc.status(**filters)
            if args.json:
                print(json.dumps(page, indent=2))
            else:
                if args.watch:
                    print("\x1b[H\x1b[2J", end="")
                print(_status_text(page), flush=True)
            if not args.watch:
                return 0
            time.sleep(args.interval)
    except NotAService:
        return None
    except KeyboardInterrupt:
        return 0
    except (ServiceNotFound, SecretError, ServiceError) as exc:
        if not getattr(args, "coordinators", None):
            return _fail("status", exc)
        return None


def maybe_info(args: argparse.Namespace) -> int | None:
    """``tasksprint info`` for a service; None if the replicas run a computation."""
    try:
        info = _locate_for(args).info(args.task)
    except NotAService:
        return None
    except (ServiceNotFound, SecretError, ServiceError) as exc:
        return None if getattr(args, "coordinators", None) else _fail("info", exc)
    if info is None:
        print(f"tasksprint info: no task {args.task}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    order = ["id", "name", "job", "state", "worker", "command", "require", "want", "after", "exit_code", "verdict"]
    for key in order + sorted(k for k in info if k not in order):
        value = info[key]
        if key in ("stdout", "stderr"):
            value = None if value is None else f"{value['size_bytes']} bytes"
        print(f"{key:>10}: {value}")
    return 0


def maybe_cancel(args: argparse.Namespace) -> int | None:
    """``tasksprint cancel`` for a service; None if the replicas run a computation."""
    if not args.tasks and args.job is None:
        print("tasksprint cancel: give task ids or --job NAME", file=sys.stderr)
        return EXIT_USAGE
    try:
        cancelled = _locate_for(args).cancel(args.tasks, job=args.job)
    except NotAService:
        return None
    except (ServiceNotFound, SecretError, ServiceError) as exc:
        if getattr(args, "coordinators", None) and not isinstance(exc, ServiceError):
            return None
        return _fail("cancel", exc)
    if args.json:
        print(json.dumps({"ok": True, "cancelled": cancelled}))
    else:
        print(f"cancelled: {', '.join(map(str, cancelled)) or 'nothing (already finished)'}")
    return 0


# --------------------------------------------------- wait, logs, tags, drain


def wait(args: argparse.Namespace) -> int:
    try:
        svc = _connect(args)
        ids = list(args.tasks)
        if args.job is not None:
            ids += svc._run(lambda s: s.job(args.job))
        if not ids:
            raise ValueError("give task ids or --job NAME")
        final = svc._run(lambda s: s.wait(ids, timeout=args.timeout))
    except TimeoutError:
        print(f"tasksprint wait: not finished after {args.timeout}s", file=sys.stderr)
        return 1
    except (ValueError, ServiceNotFound, SecretError, ServiceError) as exc:
        return _fail("wait", exc)
    for tid in ids:
        print(f"{tid} {final[tid]}")
    return 0 if all(final[t] == "done" for t in ids) else 1


def logs(args: argparse.Namespace) -> int:
    try:
        info = _connect(args).info(args.task)
    except (ServiceNotFound, SecretError, ServiceError) as exc:
        return _fail("logs", exc)
    if info is None:
        print(f"tasksprint logs: no task {args.task}", file=sys.stderr)
        return 1
    if info["stdout"] is None and info["stderr"] is None:
        print(f"tasksprint logs: task {args.task} is {info['state']}: no output recorded yet", file=sys.stderr)
        return 1
    for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        summary = info[stream]
        if summary is None:
            continue
        out.write(summary["head"])
        if summary["cut"]:
            out.write(f"\n[... {summary['size_bytes']} bytes in all; the middle is not kept ...]\n")
            out.write(summary["tail"])
        out.flush()
    return 0


def tags(args: argparse.Namespace) -> int:
    add = [c[1:] for c in args.changes if c.startswith("+")]
    remove = [c[1:] for c in args.changes if c.startswith("-")]
    bad = [c for c in args.changes if c[:1] not in ("+", "-") or len(c) < 2] or ([] if args.changes else ["(none)"])
    if bad:
        print(f"tasksprint tags: {bad[0]!r}: write +TAG to add a tag, -TAG to remove one", file=sys.stderr)
        return EXIT_USAGE
    try:
        now = _connect(args).tags(args.worker, add, remove)
    except (ServiceNotFound, SecretError, ServiceError) as exc:
        return _fail("tags", exc)
    print(" ".join(now))
    return 0


def drain(args: argparse.Namespace) -> int:
    try:
        _connect(args).drain(args.worker)
    except (ServiceNotFound, SecretError, ServiceError) as exc:
        return _fail("drain", exc)
    print(f"{args.worker}: drained (finishes what it runs, takes nothing more)")
    return 0
