"""``tasksprint task put TASK_DIR`` and ``tasksprint result get KEY RESULT_DIR``: kolejka tasks on the service.

Theory of operation
-------------------
``task put`` reads the task directory as ``tasksprint execute`` does
(:func:`tasksprint.execute.read_task`: ``args``, ``limits``, ``stdout``,
``stderr``, ``environment``; an ``image`` is refused unless
``--ignore-image``) and submits it to the service as one command task
(:func:`task_spec_for`): the directory's regular files travel with it as
``files`` (1 MiB in all: they go through the log), the task's ``stdout`` and
``stderr`` files are its ``results``, and it runs in a working directory of
its own on whichever worker takes it.  The key it prints is the task's id.

``result get`` waits for the task (``--no-wait``: says it is not done yet),
asks the service which worker holds its outputs and at which data address
(:meth:`~tasksprint.service.api.AsyncService.worker_addresses`), fetches
its ``files`` output from there over the data port, as a dependent task
does (:class:`~tasksprint.peer_data.PeerFetcher`), and writes the files and
``kolejka_result.json`` (:func:`tasksprint.execute.kolejka_result`) into
``RESULT_DIR``.  What the worker sends is checked as any peer's files are
(:func:`tasksprint.exec.workdir.input_files`: names, base64, total size),
and each file is created, never written through an existing name or link.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import attrs
import trio

from tasksprint import wire
from tasksprint.credentials import SecretError
from tasksprint.exec.files import BadFileName, check_file_name
from tasksprint.exec.spec import MAX_INLINE_FILES_BYTES
from tasksprint.exec.workdir import MAX_WALKED, FilesError, input_files, stage
from tasksprint.execute import RESULT_FILE, TASK_FILE, KolejkaError, kolejka_result, read_task
from tasksprint.object_store import InputError
from tasksprint.peer_data import PeerFetcher
from tasksprint.service.api import AsyncService, ServiceError
from tasksprint.service.home import ServiceNotFound, locate
from tasksprint.service.records import FINISHED
from tasksprint.service.scheduler import MAX_FILES

__all__ = ["GetFailed", "fetch_result_files", "get", "put", "read_task_files", "task_spec_for"]

EXIT_USAGE = 2
#: Seconds ``result get`` looks for the holder among the live workers (a replica may lag behind).
_HOLDER_LOOKUP_S = 10.0


def _glob_escape(name: str) -> str:
    """``name`` as a result pattern that matches only itself (``*``, ``?``, ``[`` taken literally)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def read_task_files(task_dir: Path) -> dict[str, bytes]:
    """The regular files of ``task_dir`` (but its ``kolejka_task.json``), by relative name.

    Raises :class:`KolejkaError` for a symbolic link or anything else that
    is not a regular file or directory, a name a task may not use, too many
    files, or more than :data:`MAX_INLINE_FILES_BYTES` in all.
    """
    out: dict[str, bytes] = {}
    total = 0
    walked = 0
    for root, dirs, names in os.walk(task_dir, followlinks=False, onerror=_walk_error):
        walked += len(dirs) + len(names)
        if walked > MAX_WALKED or len(out) > MAX_FILES:
            raise KolejkaError(f"{task_dir} holds too many files: a task takes at most {MAX_FILES}")
        for entry in sorted(dirs + names):
            path = os.path.join(root, entry)
            rel = os.path.relpath(path, task_dir).replace(os.sep, "/")
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise KolejkaError(f"{path} is not a regular file (a link?): a task sends regular files only")
            if rel == TASK_FILE:
                continue
            try:
                rel = check_file_name(rel)
            except BadFileName as exc:
                raise KolejkaError(f"{path}: {exc}") from None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise KolejkaError(f"cannot read {path}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_INLINE_FILES_BYTES - total + 1)
            total += len(data)
            if total > MAX_INLINE_FILES_BYTES:
                raise KolejkaError(
                    f"the files of {task_dir} hold more than {MAX_INLINE_FILES_BYTES} bytes, "
                    "the most a task put sends (they travel through the service's log)"
                )
            out[rel] = data
    return out


def _walk_error(exc: OSError) -> None:
    raise KolejkaError(f"cannot read the task directory: {exc}")


def task_spec_for(task_dir: Path, *, ignore_image: bool) -> dict[str, Any]:
    """The service's task spec for the kolejka task in ``task_dir``; raises :class:`KolejkaError` saying why not."""
    try:
        raw = json.loads((task_dir / TASK_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise KolejkaError(f"cannot read {task_dir / TASK_FILE}: {exc}") from None
    if isinstance(raw, dict) and raw.get("image") and not ignore_image:
        raise KolejkaError(
            f"the task asks for the image {raw['image']!r:.100}; the service's workers run tasks on their "
            "hosts only: submit it with --ignore-image, or run it with tasksprint execute under docker or podman"
        )
    # The working directory is the worker's; the task gets one of its own there.
    spec = read_task(task_dir, Path("."), ignore_image=True).spec
    declared = raw.get("files") if isinstance(raw, dict) else None
    if declared is not None:
        if not isinstance(declared, (list, dict)):
            raise KolejkaError(f"{TASK_FILE}: 'files' must be a list or an object of file names")
        for name in declared:
            try:
                check_file_name(name)
            except BadFileName as exc:
                raise KolejkaError(f"{TASK_FILE}: 'files': {exc}") from None
    files = read_task_files(task_dir)
    limits = {k: v for k, v in _limits_plain(spec.limits).items() if v is not None}
    outputs = [name for name in (spec.stdout, spec.stderr) if name is not None]
    out: dict[str, Any] = {"argv": list(spec.argv or ()), "name": f"kolejka {task_dir.resolve().name}"[:256]}
    if spec.env:
        out["env"] = dict(spec.env)
    if limits:
        out["limits"] = limits
    if files:
        out["files"] = {name: base64.b64encode(data).decode("ascii") for name, data in sorted(files.items())}
    if outputs:
        out["results"] = [_glob_escape(n) for n in dict.fromkeys(outputs)]
    for key, name in (("stdout", spec.stdout), ("stderr", spec.stderr)):
        if name is not None:
            out[key] = name
    return out


def _limits_plain(limits: Any) -> dict[str, Any]:
    """A :class:`~tasksprint.exec.spec.Limits` as plain data (a core list as a list)."""
    plain = attrs.asdict(limits)
    if plain.get("cpuset") is not None:
        plain["cpuset"] = list(plain["cpuset"])
    return plain


def _service(args: argparse.Namespace) -> AsyncService:
    addrs, secret = locate(args.server, args.state, getattr(args, "secret_file", None))
    return AsyncService(addrs, secret)


def put(args: argparse.Namespace) -> int:
    """``tasksprint task put TASK_DIR``: submit it; print its key. 0 submitted, 1 service failed, 2 bad task."""
    try:
        spec = task_spec_for(args.task_dir, ignore_image=args.ignore_image)
    except KolejkaError as exc:
        print(f"tasksprint task put: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def go() -> list[int]:
        async with _service(args) as svc:
            return await svc.submit_specs([spec])

    try:
        (key,) = trio.run(go)
    except (ServiceNotFound, SecretError) as exc:
        print(f"tasksprint task put: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceError as exc:
        print(f"tasksprint task put: {exc}", file=sys.stderr)
        return 1
    print(key)
    return 0


class GetFailed(Exception):
    """``result get`` cannot write the result; the message says why."""


def _record_of(info: dict[str, Any]) -> dict[str, Any] | None:
    """The run's record as ``kolejka_result`` reads it, from the service's ``info`` (None: it never ran)."""
    if info.get("verdict") is None:
        return None
    usage = info.get("usage") or {}
    return {"exit_code": info.get("exit_code"), "verdict": info["verdict"], "host": info.get("host"), **usage}


async def fetch_result_files(svc: AsyncService, info: dict[str, Any], key: int) -> list[tuple[str, bytes]]:
    """The result files of task ``key`` (``info``: done, or failed with files kept), from the worker that holds them."""
    worker, tid = info.get("worker"), info.get("tid")
    if not isinstance(worker, str) or type(tid) is not int:
        raise GetFailed(f"the service does not say which worker holds task {key}'s result files")
    addr = None
    with trio.move_on_after(_HOLDER_LOOKUP_S):
        while addr is None:
            addr = (await svc.worker_addresses()).get(worker)
            if addr is None:
                await trio.sleep(0.2)
    if addr is None:
        raise GetFailed(f"worker {worker!r}, which held task {key}'s result files, is gone: the files are lost")
    outputs: Any = None
    problem: BaseException | None = None
    # Errors are kept until the nursery is closed: raised inside it they would come out in a group.
    async with trio.open_nursery() as nursery:
        endpoint = wire.Endpoint(secret=svc.secret, role="client", ident=f"result-get-{os.getpid()}")
        try:
            outputs = await PeerFetcher(endpoint, nursery).fetch(addr, tid, None)
        except (LookupError, InputError, *wire.NETWORK_ERRORS) as exc:
            problem = exc
        nursery.cancel_scope.cancel()  # the link's reader
    if problem is not None:
        raise GetFailed(f"cannot fetch task {key}'s result files from worker {worker!r} at {addr}: {problem}")
    try:
        return input_files([outputs], [None])
    except FilesError as exc:
        raise GetFailed(f"worker {worker!r} sent task {key}'s result files malformed: {exc}") from None


def get(args: argparse.Namespace) -> int:
    """``tasksprint result get KEY RESULT_DIR``. 0 written, 1 not done or cannot be fetched, 2 bad key."""
    key_text: str = args.key
    if not (key_text.isascii() and key_text.isdigit() and 0 < len(key_text) <= 18 and int(key_text) > 0):
        print(
            f"tasksprint result get: {key_text[:100]!r} is not a task key (keys are what task put prints)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    key = int(key_text)
    result_dir: Path = args.result_dir

    async def go() -> int:
        async with _service(args) as svc:
            info = await svc.info(key)
            if info is None:
                print(f"tasksprint result get: no task with the key {key}", file=sys.stderr)
                return EXIT_USAGE
            if info["state"] not in FINISHED:
                if args.no_wait:
                    print(f"tasksprint result get: task {key} is {info['state']}: not done yet", file=sys.stderr)
                    return 1
                await svc.wait([key], timeout=args.timeout)
                info = await svc.info(key)
                assert info is not None
            # A failed command's result files (a log it wrote) are kept and fetched too.
            kept = info["state"] == "done" or (info["state"] == "failed" and bool(info.get("result_files")))
            files = await fetch_result_files(svc, info, key) if kept else []
        result_dir.mkdir(parents=True, exist_ok=True)
        there = [name for name, _ in files if os.path.lexists(result_dir / name)]
        if there:
            raise GetFailed(f"{result_dir} already holds {there[0]!r}: give a new or empty result directory")
        stage(result_dir, files)
        error = None if info["state"] == "done" else f"task {key} {info['state']}: {info.get('error')}"
        record = _record_of(info)
        result = kolejka_result(record, error, [name for name, _ in files])
        (result_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        if record is None:
            print(f"tasksprint result get: {error}", file=sys.stderr)
            return 1
        return 0

    try:
        return int(trio.run(go))
    except (trio.TooSlowError, TimeoutError):  # before OSError: TimeoutError is one
        print(f"tasksprint result get: task {key} not done after {args.timeout}s", file=sys.stderr)
        return 1
    except (ServiceNotFound, SecretError) as exc:
        print(f"tasksprint result get: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ServiceError, GetFailed, FilesError, OSError) as exc:
        print(f"tasksprint result get: {exc}", file=sys.stderr)
        return 1
