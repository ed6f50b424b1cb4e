"""The built-in queue scheduler of ``tasksprint server``: command tasks submitted at any time.

Theory of operation
-------------------
:class:`QueueScheduler` is a plain :class:`~tasksprint_sdk.coordinator.Coordinator`
(standard library and the SDK only, like any user's scheduler), so every
replica runs it in lockstep and it doubles as an example of the SDK's
``command``, ``query`` and ``task_killed`` hooks.  It never calls
``finish``: the service runs until it is stopped.

Tasks come in through the log as commands (:meth:`QueueScheduler.command`):
``{"do": "submit", "tasks": [spec, ...]}``, or in the compact form a bulk
submission takes, ``{"do": "submit", "specs": [spec, ...], "each": [i,
...]}`` (distinct specs, then per task the index of its spec: each
distinct spec is checked once and shared by its tasks); ``{"do":
"cancel", "ids": [...]}`` / ``{"do": "cancel", "job": name}``; and
``{"do": "configure", "retention": s, "window": n}``.  A submission's
answer is ``{"first": id, "count": n}``: its tasks got the ids ``first``
to ``first + n - 1``.  Specs are checked by :mod:`tasksprint.service.specs`
(what a spec may hold is documented there).  A whole submission is checked
before any task of it is recorded, so it is taken or refused as one.

Admission: a task whose ``after`` tasks are done is *ready*; it becomes a
coordinator task (``start_task``) only when fewer than ``window`` tasks
with the same required tags are in the coordinator (started, not ended).
The coordinator's per-task record and work are what a million waiting
tasks cannot afford; here a waiting task is a small :class:`Rec`.  Tasks
requiring a tag no worker has fill only their own class's window.

Ids: the scheduler numbers tasks itself (``id``, from 1), because a task
whose ``after`` tasks are not done yet is *held* here and handed to the
coordinator (``start_task``) only when they are; the coordinator's task id
(``tid``) is known from then on.  Dependencies are the scheduler's, not the
coordinator's pretasks: a done task's record is in the log, so a dependent
never needs its outputs and a worker leaving never makes a finished task
run again.

States: ``waiting`` (held for its ``after`` tasks), ``pending`` (ready or
started, no worker yet), ``running``, ``done``, ``failed``, ``cancelled``.  A task
that fails for good, or is cancelled, cancels every task that depends on
it, transitively; running ones are killed on their workers.

Questions (:meth:`QueueScheduler.query`, read-only, any replica):
``{"q": "status", ...filters, "offset", "limit"}``, ``{"q": "info", "id"}``,
``{"q": "states", "ids": [...]}`` and ``{"q": "job", "job": name}``.
"""

from __future__ import annotations

import base64
import collections
import math
from typing import Any

from tasksprint.service.queries import QueueQueries
from tasksprint.service.records import FINISHED, Rec, Spec, admission_key, pack, task_tags, unpack
from tasksprint.service.specs import MAX_FILES, SpecError, check_spec

__all__ = ["MAX_BATCH", "MAX_FILES", "QueueScheduler", "SpecError", "check_spec"]

#: Most tasks one submit command may carry (a command is one log entry).
MAX_BATCH = 20_000
#: Default most tasks of one admission class (required tags) held by the coordinator at once.
DEFAULT_WINDOW = 4_096
MAX_WINDOW = 1_000_000
#: Seconds a finished task stays in the replicated state (then only in the replicas' history).
DEFAULT_RETENTION = 3600.0
#: Most tasks compacted in one event (a command or a hook).
MAX_COMPACT = 5_000


class QueueScheduler(QueueQueries):
    """The service's scheduler: a replicated queue of command tasks (see the module docstring)."""

    def __init__(self) -> None:
        self.recs: dict[int, Rec] = {}
        self.next_id = 1
        self.by_tid: dict[int, int] = {}
        self.dependents: dict[int, list[int]] = {}
        self.jobs: dict[str, list[int]] = {}
        self.open: dict[int, None] = {}  # unfinished ids, in submission order
        # Indexes for status filters (rebuilt on restore, not saved): the ids the
        # coordinator holds (only those can run), those waiting for the tasks
        # they run after, and unfinished ids by tag.
        self.admitted: dict[int, None] = {}
        self.blocked: dict[int, None] = {}
        self.tagged: dict[str, dict[int, None]] = {}
        self.retention = DEFAULT_RETENTION
        self.window = DEFAULT_WINDOW
        # Ids that ended with a record in the coordinator, in the order they ended (so by end time).
        self.ended: collections.deque[int] = collections.deque()
        self.compacted = 0
        self.gone: dict[int, str] = {}  # compacted tasks that did not succeed: how they ended
        self.tally = {"waiting": 0, "ready": 0, "queued": 0, "done": 0, "failed": 0, "cancelled": 0}
        # Admission: ready ids not yet handed to the coordinator, and how many it holds, by required tags.
        self.ready: dict[tuple[str, ...], collections.deque[int]] = {}
        self.started: dict[tuple[str, ...], int] = {}
        self.short: dict[tuple[str, ...], None] = {}  # classes that may have room and ready ids

    # ---------------------------------------------------------- snapshots

    def __getstate__(self) -> dict[str, Any]:
        """The state with its per-task containers packed into one JSON text (see :func:`records.pack`)."""
        return pack(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(unpack(state))

    # ----------------------------------------------------------- commands

    def command(self, body: Any) -> Any:
        if not isinstance(body, dict):
            return {"error": f"a command must be a map, got {type(body).__name__}"}
        match body.get("do"):
            case "submit":
                answer = self._submit(body)
            case "cancel":
                answer = self._cancel_command(body)
            case "configure":
                answer = self._configure(body)
            case other:
                return {"error": f"unknown command {other!r:.80}; known: submit, cancel, configure"}
        self._settle()
        return answer

    def _settle(self) -> None:
        self._admit()
        self._compact()

    def _configure(self, body: dict[str, Any]) -> dict[str, Any]:
        retention: Any = body.get("retention", self.retention)
        if type(retention) not in (int, float) or not (math.isfinite(retention) and retention >= 0):
            return {"error": f"'retention' must be a number of seconds >= 0, got {retention!r:.80}"}
        window: Any = body.get("window", self.window)
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            return {"error": f"'window' must be an int from 1 to {MAX_WINDOW}, got {window!r:.80}"}
        self.retention = float(retention)
        if window > self.window:
            self.short.update(dict.fromkeys(self.ready))
        self.window = window
        return {"retention": self.retention, "window": self.window}

    def _compact(self) -> None:
        """Archive the tasks that ended more than ``retention`` seconds ago and drop them from the state.

        Each one's ``info`` answer goes to the replicas' durable history
        (``archive``), where the ``info`` question reads it; the state keeps
        only how a task that did not succeed ended (``gone``), so ``states``
        and a later ``--after`` still know.  At most ``MAX_COMPACT`` per
        event, so one command never pauses the service for long; a backlog
        goes in the events that follow.
        """
        horizon = self.now - self.retention
        for _ in range(MAX_COMPACT):
            if not self.ended:
                return
            sid = self.ended[0]
            rec = self.recs[sid]
            if rec.finished is not None and rec.finished > horizon:
                return
            self.ended.popleft()
            self.archive(sid, self.info(sid))
            if rec.tid is not None:
                if self.task_info(rec.tid) is not None:
                    self.forget_task(rec.tid)
                self.by_tid.pop(rec.tid, None)
            del self.recs[sid]
            self.dependents.pop(sid, None)
            if rec.state != "done":
                self.gone[sid] = rec.state
            self.compacted += 1

    def _specs(self, body: dict[str, Any]) -> tuple[list[Spec], list[int]] | str:
        """The submission's distinct specs, checked, and which one each task uses; or what is wrong.

        Two forms: ``tasks`` (a spec per task) or ``specs`` (distinct specs)
        with ``each`` (per task, the index of its spec), the compact form a
        bulk submission of few distinct commands takes.
        """
        if "specs" in body:
            raw, each = body.get("specs"), body.get("each")
            if not isinstance(each, list) or not each or len(each) > MAX_BATCH:
                return f"'each' must be a list of 1 to {MAX_BATCH} spec indexes"
            if not isinstance(raw, list) or not raw or len(raw) > len(each):
                return "'specs' must be a list of 1 to len(each) task specs"
            n = len(raw)
            if not all(type(i) is int and 0 <= i < n for i in each):
                return f"'each' must hold indexes into 'specs' (0 to {n - 1})"
        else:
            raw = body.get("tasks")
            if not isinstance(raw, list) or not raw or len(raw) > MAX_BATCH:
                return f"'tasks' must be a list of 1 to {MAX_BATCH} task specs"
            each = list(range(len(raw)))
        first: dict[int, int] = {}  # spec index -> the first task using it
        for pos, i in enumerate(each):
            first.setdefault(i, pos)
        specs = []
        for i, one in enumerate(raw):
            pos = first.get(i, len(each))
            try:
                spec = Spec(check_spec(one))
            except SpecError as exc:
                return f"task {pos + 1} of {len(each)}: {exc}"
            # An id not yet handed out would make a task wait forever.
            bad = [a for a in spec.after if a >= self.next_id + pos]
            if bad:
                return f"task {pos + 1} of {len(each)}: 'after' names unknown task id(s) {bad[:10]}"
            specs.append(spec)
        return specs, each

    def _submit(self, body: dict[str, Any]) -> dict[str, Any]:
        checked = self._specs(body)
        if isinstance(checked, str):
            return {"error": checked}
        specs, each = checked
        first = self.next_id
        now = self.now
        recs, opened, tally = self.recs, self.open, self.tally
        tags = [task_tags(spec.run) for spec in specs]  # once per distinct spec, not per task
        for i in each:
            spec = specs[i]
            sid = self.next_id
            self.next_id += 1
            rec = Rec(spec, now)
            recs[sid] = rec
            opened[sid] = None
            for tag in tags[i]:
                self.tagged.setdefault(tag, {})[sid] = None
            tally["waiting"] += 1
            if rec.job is not None:
                self.jobs.setdefault(rec.job, []).append(sid)
            if not rec.after:
                self._make_ready(sid, rec)
                continue
            doomed = None
            for a in rec.after:
                pre = recs.get(a)
                ended = pre.state if pre is not None else self.gone.get(a, "done")  # compacted: ended
                if ended in ("failed", "cancelled"):
                    doomed = doomed or a
                elif ended != "done":
                    rec.blocking += 1
                    self.dependents.setdefault(a, []).append(sid)
            if doomed is not None:
                self._end(sid, "cancelled", f"task {doomed}, which it runs after, did not succeed")
            elif rec.blocking == 0:
                self._make_ready(sid, rec)
            else:
                self.blocked[sid] = None
        return {"first": first, "count": len(each)}

    def _make_ready(self, sid: int, rec: Rec) -> None:
        """Queue ``sid`` for admission: it becomes a coordinator task when its class has room."""
        assert rec.spec is not None
        self._set(rec, "ready")
        self.blocked.pop(sid, None)
        key = admission_key(rec.spec)
        queue = self.ready.get(key)
        if queue is None:
            queue = self.ready[key] = collections.deque()
        queue.append(sid)
        self.short[key] = None

    def _admit(self) -> None:
        """Hand ready tasks to the coordinator while their class holds fewer than ``window`` of them.

        The coordinator's records are large and its per-task work is costly,
        so it only holds what workers may soon take; the rest waits here,
        in a few bytes each.
        """
        while self.short:
            key = next(iter(self.short))
            del self.short[key]
            queue = self.ready.get(key)
            room = self.window - self.started.get(key, 0)
            while queue and room > 0:
                sid = queue.popleft()
                if self.recs[sid].state == "ready" and self._start(sid, key):  # not cancelled meanwhile
                    room -= 1
            if not queue:
                self.ready.pop(key, None)

    def _start(self, sid: int, key: tuple[str, ...]) -> bool:
        """Hand ``sid`` to the coordinator; False if the coordinator refused it (then it failed)."""
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
            return False
        rec.tid = tid
        self._set(rec, "queued")
        self.admitted[sid] = None
        self.by_tid[tid] = sid
        self.started[key] = self.started.get(key, 0) + 1
        return True

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
            unknown = [i for i in ids if not 1 <= i < self.next_id]
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
            rec = self.recs.get(sid)
            if rec is None:  # compacted: it ended long ago
                continue
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
        self.open.pop(sid, None)
        self.admitted.pop(sid, None)
        self.blocked.pop(sid, None)
        for tag in task_tags(rec.spec):
            tagged = self.tagged.get(tag)
            if tagged is not None:
                tagged.pop(sid, None)
                if not tagged:
                    del self.tagged[tag]
        if rec.tid is not None:
            self.ended.append(sid)
            assert rec.spec is not None
            key = admission_key(rec.spec)
            self.started[key] -= 1
            if key in self.ready:
                self.short[key] = None

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
                self._make_ready(d, dep)
        self._settle()

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
        self._settle()

    def task_killed(self, tid: int) -> None:
        sid = self.by_tid.get(tid)
        if sid is None or self.recs[sid].state in FINISHED:
            return
        self._cancel_tree(sid, "cancelled", f"task {sid}, which it runs after, was cancelled")
        self._settle()

    def _set(self, rec: Rec, state: str) -> None:
        self.tally[rec.state] -= 1
        self.tally[state] += 1
        rec.state = state
