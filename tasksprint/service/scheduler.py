"""The built-in queue scheduler of ``tasksprint server``: command tasks submitted at any time.

Theory of operation
-------------------
:class:`QueueScheduler` is a plain :class:`~tasksprint_sdk.coordinator.Coordinator`
(standard library and the SDK only, like any user's scheduler), so every
replica runs it in lockstep and it doubles as an example of the SDK's
``command``, ``query`` and ``task_killed`` hooks.  It never calls
``finish``: the service runs until it is stopped.

Tasks come in through the log as commands (:meth:`QueueScheduler.command`):
``{"do": "submit", "tasks": [spec, ...]}`` and ``{"do": "cancel", "ids":
[...]}`` / ``{"do": "cancel", "job": name}``.  A spec is a command task:
``cmd`` (a bash line) or ``argv``, and ``require``, ``want``, ``after``,
``name``, ``job``, ``retries``, ``timeout``, ``limits``, ``cwd``, ``env``,
and for a task that brings and keeps files ``files`` (name -> base64 text:
input files, written into the task's own working directory), ``results``
(names or globs of files kept after the run, failed or not, fetched from the
worker that ran it), ``stdout`` and ``stderr`` (files the output goes to).
File names are checked here as well as where the task starts: relative,
no ``..``, no control characters, bounded.  A whole submission is checked before any task of it is recorded, so it is
taken or refused as one.

Ids: the scheduler numbers tasks itself (``id``, from 1), because a task
whose ``after`` tasks are not done yet is *held* here and handed to the
coordinator (``start_task``) only when they are; the coordinator's task id
(``tid``) is known from then on.  Dependencies are the scheduler's, not the
coordinator's pretasks: a done task's record is in the log, so a dependent
never needs its outputs and a worker leaving never makes a finished task
run again.

States: ``waiting`` (held for its ``after`` tasks), ``pending`` (started,
no worker yet), ``running``, ``done``, ``failed``, ``cancelled``.  A task
that fails for good, or is cancelled, cancels every task that depends on
it, transitively; running ones are killed on their workers.

Questions (:meth:`QueueScheduler.query`, read-only, any replica):
``{"q": "status", ...filters, "offset", "limit"}``, ``{"q": "info", "id"}``,
``{"q": "states", "ids": [...]}`` and ``{"q": "job", "job": name}``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import itertools
import math
from typing import Any

from tasksprint_sdk.coordinator import Coordinator

__all__ = ["MAX_BATCH", "QueueScheduler", "SpecError", "check_spec"]

#: Most tasks one submit command may carry (a command is one log entry).
MAX_BATCH = 2_000
#: Seconds a finished task's full record stays in the coordinator's state (then only its summary).
DEFAULT_RETENTION = 3600.0
#: Most rows a status question returns.
MAX_PAGE = 1_000

FINISHED = ("done", "failed", "cancelled")
_SPEC_KEYS = frozenset(
    [
        "cmd",
        "argv",
        "require",
        "want",
        "after",
        "name",
        "job",
        "retries",
        "timeout",
        "limits",
        "cwd",
        "env",
        "files",
        "results",
        "stdout",
        "stderr",
    ]
)
_LIMIT_KEYS = frozenset(["memory_bytes", "cpus", "cpuset", "pids", "wall_time_s", "cpu_time_s", "output_bytes"])
_MAX_TAGS = 64
_MAX_TEXT = 4096
#: The figures of a command's record that ``info`` shows under ``usage``.
_USAGE = (
    "signal",
    "elapsed_s",
    "user_cpu_s",
    "system_cpu_s",
    "peak_memory_bytes",
    "limits_hit",
    "enforcement",
)
#: Most input files and result patterns one task may name.
MAX_FILES = 10_000
#: Most bytes of content a task's input files may hold (they travel in the log, as base64 text).
MAX_FILES_BYTES = 1024 * 1024
MAX_FILES_TEXT = 4 * ((MAX_FILES_BYTES + 2) // 3)


class SpecError(ValueError):
    """A submitted task spec that cannot be taken; the message names the field."""


def _tags(spec: dict[str, Any], key: str) -> list[str]:
    v = spec.get(key, [])
    if (
        not isinstance(v, list)
        or len(v) > _MAX_TAGS
        or not all(isinstance(t, str) and 0 < len(t) <= 128 and t.strip() == t for t in v)
    ):
        raise SpecError(f"{key!r} must be a list of at most {_MAX_TAGS} tag strings, got {v!r:.120}")
    return list(dict.fromkeys(v))


def _opt_text(spec: dict[str, Any], key: str) -> str | None:
    v = spec.get(key)
    if v is not None and (not isinstance(v, str) or len(v) > _MAX_TEXT):
        raise SpecError(f"{key!r} must be a string of at most {_MAX_TEXT} characters, got {v!r:.120}")
    return v


def _file_name(name: Any, what: str) -> str:
    """``name`` if it is a relative file name without ``..`` (the runner checks it again); else SpecError."""
    if not isinstance(name, str) or not name or len(name) > _MAX_TEXT:
        raise SpecError(f"{what} must be a non-empty string of at most {_MAX_TEXT} characters, got {name!r:.120}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise SpecError(f"{what} {name!r:.120} holds a control character")
    if name.startswith("/"):
        raise SpecError(f"{what} {name!r:.120} is absolute: name it relative to the task's working directory")
    if ".." in name.split("/"):
        raise SpecError(f"{what} {name!r:.120} contains '..': a task's files stay inside its working directory")
    return name


def _files(files: Any) -> dict[str, str]:
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise SpecError(f"'files' must map at most {MAX_FILES} file names to base64 text, got {type(files).__name__}")
    text_total = content_total = 0
    for name, text in files.items():
        _file_name(name, "'files' name")
        if not isinstance(text, str):
            raise SpecError(f"'files' {name!r:.120}: the content must be base64 text, got {type(text).__name__}")
        # Each file's padding aside, the text is bounded before any of it is decoded.
        text_total += len(text)
        if text_total > MAX_FILES_TEXT + 4 * len(files):
            raise SpecError(f"'files' hold more than {MAX_FILES_BYTES} bytes of content")
        try:
            content_total += len(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise SpecError(f"'files' {name!r:.120}: the content is not base64") from None
        if content_total > MAX_FILES_BYTES:
            raise SpecError(f"'files' hold more than {MAX_FILES_BYTES} bytes of content")
    return dict(files)


def check_spec(spec: Any) -> dict[str, Any]:
    """A submitted task spec, checked and normalized; raises :class:`SpecError` naming what is wrong.

    The coordinator checks the limits again when the task starts.
    """
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise SpecError(f"a task spec must be a map with string keys, got {type(spec).__name__}")
    unknown = sorted(k for k in spec if k not in _SPEC_KEYS)
    if unknown:
        raise SpecError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_SPEC_KEYS))}")
    out: dict[str, Any] = {}
    cmd, argv = spec.get("cmd"), spec.get("argv")
    if (cmd is None) == (argv is None):
        raise SpecError("give exactly one of 'cmd' (a bash command line) and 'argv' (a program and its arguments)")
    if cmd is not None:
        if not isinstance(cmd, str) or not cmd.strip() or len(cmd) > 65536:
            raise SpecError(f"'cmd' must be a non-empty string of at most 65536 characters, got {cmd!r:.120}")
        out["cmd"] = cmd
    else:
        if (
            not isinstance(argv, list)
            or not argv
            or len(argv) > 4096
            or not all(isinstance(a, str) and len(a) <= 65536 for a in argv)
        ):
            raise SpecError(f"'argv' must be a non-empty list of strings, got {argv!r:.120}")
        out["argv"] = list(argv)
    for key in ("require", "want"):
        tags = _tags(spec, key)
        if tags:
            out[key] = tags
    after = spec.get("after", [])
    if not isinstance(after, list) or len(after) > 10_000 or not all(type(a) is int and a >= 1 for a in after):
        raise SpecError(f"'after' must be a list of task ids, got {after!r:.120}")
    if after:
        out["after"] = list(dict.fromkeys(after))
    for key in ("name", "job", "cwd"):
        v = _opt_text(spec, key)
        if v is not None:
            out[key] = v
    retries = spec.get("retries", 0)
    if type(retries) is not int or not 0 <= retries <= 100:
        raise SpecError(f"'retries' must be an int from 0 to 100, got {retries!r:.120}")
    if retries:
        out["retries"] = retries
    timeout = spec.get("timeout")
    if timeout is not None:
        if type(timeout) not in (int, float) or not (math.isfinite(timeout) and timeout > 0):
            raise SpecError(f"'timeout' must be a positive number of seconds, got {timeout!r:.120}")
        out["timeout"] = float(timeout)
    env = spec.get("env")
    if env is not None:
        if (
            not isinstance(env, dict)
            or len(env) > 1024
            or not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items())
        ):
            raise SpecError(f"'env' must map variable names to strings, got {env!r:.120}")
        out["env"] = dict(env)
    limits = spec.get("limits")
    if limits is not None:
        if not isinstance(limits, dict) or not all(k in _LIMIT_KEYS for k in limits):
            raise SpecError(
                f"'limits' must be a map with keys among {', '.join(sorted(_LIMIT_KEYS))}, got {limits!r:.120}"
            )
        out["limits"] = dict(limits)
    if spec.get("files") is not None:
        out["files"] = _files(spec["files"])
    results = spec.get("results")
    if results is not None:
        if not isinstance(results, list) or len(results) > MAX_FILES:
            raise SpecError(f"'results' must be a list of at most {MAX_FILES} names or globs, got {results!r:.120}")
        out["results"] = [_file_name(r, "'results' entry") for r in results]
    for key in ("stdout", "stderr"):
        if spec.get(key) is not None:
            out[key] = _file_name(spec[key], repr(key))
    if ("files" in out or "results" in out) and "cwd" in out:
        raise SpecError("a task with 'files' or 'results' runs in a working directory of its own: leave 'cwd' unset")
    return out


class Rec:
    """One submitted task, as small as it can be: a service keeps millions."""

    __slots__ = (
        "after",
        "blocking",
        "finished",
        "job",
        "name",
        "record",
        "spec",
        "state",
        "submitted",
        "tid",
        "why",
        "worker",
    )

    def __init__(self, spec: dict[str, Any], now: float) -> None:
        self.job: str | None = spec.pop("job", None)
        self.name: str | None = spec.pop("name", None)
        self.after: tuple[int, ...] = tuple(spec.pop("after", ()))
        self.spec: dict[str, Any] | None = spec  # until it starts; then the coordinator has it
        self.state = "waiting"
        self.tid: int | None = None
        self.blocking = 0  # after tasks not done yet
        self.submitted = now
        self.finished: float | None = None
        self.why: str | None = None  # why it failed or was cancelled
        self.record: dict[str, Any] | None = None  # a failed command's record (a done one's is the coordinator's)
        self.worker: str | None = None  # the worker that ran it to success

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in Rec.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for k, v in zip(Rec.__slots__, state, strict=True):
            setattr(self, k, v)


class QueueScheduler(Coordinator):
    """The service's scheduler: a replicated queue of command tasks (see the module docstring)."""

    def __init__(self) -> None:
        self.recs: dict[int, Rec] = {}
        self.next_id = 1
        self.by_tid: dict[int, int] = {}
        self.dependents: dict[int, list[int]] = {}
        self.jobs: dict[str, list[int]] = {}
        self.open: dict[int, None] = {}  # unfinished ids, in submission order
        self.retention = DEFAULT_RETENTION
        # Ids that ended with a record in the coordinator, in the order they ended (so by end time).
        self.ended: collections.deque[int] = collections.deque()
        self.compacted = 0
        self.tally = {"waiting": 0, "queued": 0, "done": 0, "failed": 0, "cancelled": 0}

    # ----------------------------------------------------------- commands

    def command(self, body: Any) -> Any:
        if not isinstance(body, dict):
            return {"error": f"a command must be a map, got {type(body).__name__}"}
        match body.get("do"):
            case "submit":
                answer = self._submit(body.get("tasks"))
            case "cancel":
                answer = self._cancel_command(body)
            case "configure":
                answer = self._configure(body)
            case other:
                return {"error": f"unknown command {other!r:.80}; known: submit, cancel, configure"}
        self._compact()
        return answer

    def _configure(self, body: dict[str, Any]) -> dict[str, Any]:
        retention: Any = body.get("retention")
        if type(retention) not in (int, float) or not (math.isfinite(retention) and retention >= 0):
            return {"error": f"'retention' must be a number of seconds >= 0, got {retention!r:.80}"}
        self.retention = float(retention)
        return {"retention": self.retention}

    def _compact(self) -> None:
        """Forget the coordinator's records of tasks that ended more than ``retention`` seconds ago.

        What ``info`` shows of such a task stays here, in a few fields.
        """
        horizon = self.now - self.retention
        while self.ended:
            rec = self.recs[self.ended[0]]
            if rec.finished is not None and rec.finished > horizon:
                return
            self.ended.popleft()
            tid = rec.tid
            if tid is None or tid not in self.by_tid:
                continue
            info = self.task_info(tid)
            values = (info or {}).get("values") or rec.record or {}
            rec.record = {k: values.get(k) for k in ("exit_code", "started", "finished", "verdict", "host")}
            if values.get("result_files"):
                rec.record["result_files"] = values["result_files"]
            if info is not None:
                command = info["kwargs"].get("command") or {}
                rec.record["command"] = command.get("cmd") or " ".join(command.get("argv") or ())
            del self.by_tid[tid]
            if info is not None:
                self.forget_task(tid)
            self.compacted += 1

    def _submit(self, tasks: Any) -> dict[str, Any]:
        if not isinstance(tasks, list) or not tasks or len(tasks) > MAX_BATCH:
            return {"error": f"'tasks' must be a list of 1 to {MAX_BATCH} task specs"}
        specs = []
        for i, raw in enumerate(tasks):
            try:
                spec = check_spec(raw)
            except SpecError as exc:
                return {"error": f"task {i + 1} of {len(tasks)}: {exc}"}
            # An id not yet handed out would make a task wait forever.
            bad = [a for a in spec.get("after", ()) if a >= self.next_id + i]
            if bad:
                return {"error": f"task {i + 1} of {len(tasks)}: 'after' names unknown task id(s) {bad[:10]}"}
            specs.append(spec)
        ids = []
        for spec in specs:
            sid = self.next_id
            self.next_id += 1
            rec = Rec(spec, self.now)
            self.tally["waiting"] += 1
            self.recs[sid] = rec
            self.open[sid] = None
            if rec.job is not None:
                self.jobs.setdefault(rec.job, []).append(sid)
            ids.append(sid)
            doomed = None
            for a in rec.after:
                pre = self.recs[a]
                if pre.state in ("failed", "cancelled"):
                    doomed = doomed or a
                elif pre.state != "done":
                    rec.blocking += 1
                    self.dependents.setdefault(a, []).append(sid)
            if doomed is not None:
                self._end(sid, "cancelled", f"task {doomed}, which it runs after, did not succeed")
            elif rec.blocking == 0:
                self._start(sid)
        return {"ids": ids}

    def _start(self, sid: int) -> None:
        rec = self.recs[sid]
        spec = rec.spec
        assert spec is not None
        try:
            tid = self.start_task(
                cmd=spec.get("cmd"),
                argv=spec.get("argv"),
                require=spec.get("require", ()),
                want=spec.get("want", ()),
                retries=spec.get("retries", 0),
                timeout=spec.get("timeout"),
                cwd=spec.get("cwd"),
                env=spec.get("env"),
                limits=spec.get("limits"),
                stdout=spec.get("stdout"),
                stderr=spec.get("stderr"),
                files={k: base64.b64decode(v) for k, v in spec["files"].items()} if "files" in spec else None,
                results=spec.get("results"),
            )
        except (TypeError, ValueError) as exc:
            # Checked at submission; the coordinator's own checks (limits) may still refuse it.
            self._end(sid, "failed", f"cannot start: {exc}")
            self._cancel_dependents(sid, f"task {sid}, which it runs after, failed")
            return
        rec.spec = None
        rec.tid = tid
        self._set(rec, "queued")
        self.by_tid[tid] = sid

    def _cancel_command(self, body: dict[str, Any]) -> dict[str, Any]:
        if "job" in body:
            job = body["job"]
            if not isinstance(job, str):
                return {"error": f"'job' must be a string, got {job!r:.80}"}
            ids = list(self.jobs.get(job, ()))
            if not ids:
                return {"error": f"no job named {job!r:.80}"}
        else:
            given = body.get("ids")
            if (
                not isinstance(given, list)
                or not given
                or not all(type(i) is int for i in given)
                or len(given) > MAX_BATCH
            ):
                return {"error": "'ids' must be a non-empty list of task ids"}
            ids = list(given)
            unknown = [i for i in ids if i not in self.recs]
            if unknown:
                return {"error": f"unknown task id(s) {unknown[:10]}"}
        cancelled: list[int] = []
        for sid in ids:
            cancelled += self._cancel_tree(sid, "cancelled", f"task {sid}, which it runs after, was cancelled")
        return {"cancelled": cancelled}

    def _cancel_tree(self, root: int, why_root: str, why_others: str) -> list[int]:
        """Cancel ``root`` (if unfinished) and every unfinished task that runs after it, transitively."""
        out: list[int] = []
        seen = {root}
        frontier = collections.deque([root])
        while frontier:
            sid = frontier.popleft()
            rec = self.recs[sid]
            if rec.state not in FINISHED:
                if rec.tid is not None:
                    self.kill_task(rec.tid)  # kills it on its worker if it runs
                self._end(sid, "cancelled", why_root if sid == root else why_others)
                out.append(sid)
            for d in self.dependents.get(sid, ()):
                if d not in seen:
                    seen.add(d)
                    frontier.append(d)
        return out

    def _cancel_dependents(self, sid: int, reason: str) -> None:
        for d in list(self.dependents.get(sid, ())):
            self._cancel_tree(d, reason, reason)

    def _end(self, sid: int, state: str, why: str | None) -> None:
        rec = self.recs[sid]
        self._set(rec, state)
        rec.why = why
        rec.finished = self.now
        rec.spec = None
        self.open.pop(sid, None)
        if rec.tid is not None:
            self.ended.append(sid)

    # -------------------------------------------------------------- hooks

    def task_done(self, tid: int, values: dict[str, Any]) -> None:
        sid = self.by_tid.get(tid)
        if sid is None or self.recs[sid].state in FINISHED:
            return
        info = self.task_info(tid)
        self._end(sid, "done", None)
        if info is not None and info.get("holder_worker") is not None:
            self.recs[sid].worker = info["holder_worker"]
        for d in self.dependents.pop(sid, ()):
            dep = self.recs[d]
            dep.blocking -= 1
            if dep.blocking == 0 and dep.state == "waiting":
                self._start(d)
        self._compact()

    def task_failed(self, tid: int, error: str, record: dict[str, Any] | None = None) -> None:
        sid = self.by_tid.get(tid)
        if sid is None or self.recs[sid].state in FINISHED:
            return
        self._end(sid, "failed", error)
        self.recs[sid].record = record
        if record is not None and record.get("result_files") and isinstance(record.get("worker"), str):
            self.recs[sid].worker = record["worker"]  # it keeps the failed run's result files
        self._cancel_dependents(sid, f"task {sid}, which it runs after, failed")
        self.dependents.pop(sid, None)
        self._compact()

    def task_killed(self, tid: int) -> None:
        sid = self.by_tid.get(tid)
        if sid is None or self.recs[sid].state in FINISHED:
            return
        self._cancel_tree(sid, "cancelled", f"task {sid}, which it runs after, was cancelled")
        self._compact()

    # ----------------------------------------------------------- questions

    def query(self, args: Any) -> Any:
        if not isinstance(args, dict):
            raise ValueError(f"a question must be a map, got {type(args).__name__}")
        match args.get("q"):
            case "status":
                return self._status(args)
            case "info":
                sid = args.get("id")
                if type(sid) is not int or sid not in self.recs:
                    return None
                return self.info(sid)
            case "states":
                ids = args.get("ids")
                if not isinstance(ids, list) or len(ids) > MAX_PAGE * 10 or not all(type(i) is int for i in ids):
                    raise ValueError("'ids' must be a list of task ids")
                return {str(i): (self._state(i) if i in self.recs else None) for i in ids}
            case "job":
                job = args.get("job")
                return list(self.jobs.get(job, ())) if isinstance(job, str) else []
            case other:
                raise ValueError(f"unknown question {other!r:.80}; known: status, info, states, job")

    def _state(self, sid: int) -> str:
        rec = self.recs[sid]
        if rec.state != "queued":
            return rec.state
        assert rec.tid is not None
        info = self.task_info(rec.tid)
        return "running" if info is not None and info["state"] == "running" else "pending"

    def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        offset, limit = args.get("offset", 0), args.get("limit", 50)
        if type(offset) is not int or offset < 0 or type(limit) is not int or not 0 < limit <= MAX_PAGE:
            raise ValueError(f"'offset' must be an int >= 0 and 'limit' from 1 to {MAX_PAGE}")
        want_state, tag, job, worker = (args.get(k) for k in ("state", "tag", "job", "worker"))
        for key, v in (("state", want_state), ("tag", tag), ("job", job), ("worker", worker)):
            if v is not None and not isinstance(v, str):
                raise ValueError(f"filter {key!r} must be a string")
        if job is not None:
            pool: Any = self.jobs.get(job, ())
        elif want_state in FINISHED or want_state == "all":
            pool = self.recs
        else:
            pool = self.open
        rows: list[dict[str, Any]] = []
        matched = 0
        plain = want_state in (None, "all") and tag is None and worker is None
        if plain and job is None:
            # No filter that needs each task's details: page straight through.
            matched = len(pool)
            ids = list(itertools.islice(iter(pool), offset, offset + limit))
            return {"total": matched, "offset": offset, "tasks": [self._row(i) for i in ids], "counts": self.counts()}
        for sid in pool:
            rec = self.recs[sid]
            if want_state not in (None, "all"):
                if want_state in FINISHED or want_state == "waiting":
                    if rec.state != want_state:
                        continue
                elif rec.state != "queued" or self._state(sid) != want_state:
                    continue
            if tag is not None or worker is not None:
                row = self._row(sid)
                if tag is not None and tag not in row["require"] and tag not in row["want"]:
                    continue
                if worker is not None and worker not in row["workers"]:
                    continue
            if offset <= matched < offset + limit:
                rows.append(self._row(sid))
            matched += 1
        return {"total": matched, "offset": offset, "tasks": rows, "counts": self.counts()}

    def counts(self) -> dict[str, int]:
        """Tasks by scheduler state (``queued`` covers pending and running), and how many were compacted."""
        return {**self.tally, "compacted": self.compacted}

    def _set(self, rec: Rec, state: str) -> None:
        self.tally[rec.state] -= 1
        self.tally[state] += 1
        rec.state = state

    def _row(self, sid: int) -> dict[str, Any]:
        rec = self.recs[sid]
        info = self.task_info(rec.tid) if rec.tid is not None else None
        spec = rec.spec or {}
        if info is not None:
            command = info["kwargs"].get("command") or {}
            spec = {
                "cmd": command.get("cmd"),
                "argv": command.get("argv"),
                "require": info["require"],
                "want": info["want"],
            }
        state = rec.state
        if state == "queued":
            state = "running" if info is not None and info["state"] == "running" else "pending"
        command = spec.get("cmd") if spec.get("cmd") is not None else " ".join(spec.get("argv") or ())
        if info is None and rec.record is not None and "command" in rec.record:
            command = rec.record["command"]  # compacted
        return {
            "id": sid,
            "state": state,
            "workers": list(info["workers"]) if info is not None else [],
            "require": list(spec.get("require") or ()),
            "want": list(spec.get("want") or ()),
            "command": command,
            "job": rec.job,
            "name": rec.name,
        }

    def info(self, sid: int) -> dict[str, Any]:
        """Everything known about task ``sid``, as plain data (the ``info`` question's answer)."""
        rec = self.recs[sid]
        row = self._row(sid)
        info = self.task_info(rec.tid) if rec.tid is not None else None
        record: dict[str, Any] = rec.record or {}
        if info is not None and info["values"] is not None:
            record = info["values"]
        return {
            **row,
            "worker": row["workers"][-1] if row["workers"] else rec.worker,
            "host": record.get("host"),
            "after": list(rec.after),
            "tid": rec.tid,
            "submitted": rec.submitted,
            "start": record.get("started"),
            "finish": record.get("finished"),
            "ended": rec.finished,
            "exit_code": record.get("exit_code"),
            "verdict": record.get("verdict"),
            "attempt": info["attempt"] if info is not None else None,
            "error": rec.why or (info["error"] if info is not None else None),
            "stdout": record.get("stdout"),
            "stderr": record.get("stderr"),
            "usage": {key: record.get(key) for key in _USAGE},
            # A failed command's result files, kept by ``worker`` (a done task's are in its outputs).
            "result_files": list(record.get("result_files") or ()) if rec.state == "failed" else None,
        }
