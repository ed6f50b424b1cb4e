"""The queue scheduler's questions: ``status`` pages, ``info``, ``states``, ``job``.

Part of :mod:`tasksprint.service.scheduler`: :class:`QueueQueries` is the
scheduler's read-only side, a base class that reads the fields the
scheduler keeps (declared below) and changes none of them.  A status
filter reads an index the scheduler keeps for it (the tasks the
coordinator holds, the blocked ones, unfinished tasks by tag), so a page
costs the page and a few admission windows, not the queue.
"""

from __future__ import annotations

import itertools
from typing import Any

from tasksprint_sdk.coordinator import Coordinator

from tasksprint.coordinator.specs import USAGE_KEYS
from tasksprint.service.records import FINISHED, Rec

__all__ = ["MAX_PAGE", "QueueQueries"]

#: Most rows a status question returns.
MAX_PAGE = 1_000


class QueueQueries(Coordinator):
    """The questions the queue scheduler answers (see the module docstring)."""

    # Kept by the scheduler (tasksprint.service.scheduler.QueueScheduler).
    recs: dict[int, Rec]
    next_id: int
    jobs: dict[str, list[int]]
    open: dict[int, None]
    admitted: dict[int, None]
    blocked: dict[int, None]
    tagged: dict[str, dict[int, None]]
    tally: dict[str, int]
    compacted: int
    gone: dict[int, str]

    def query(self, args: Any) -> Any:
        if not isinstance(args, dict):
            raise ValueError(f"a question must be a map, got {type(args).__name__}")
        match args.get("q"):
            case "status":
                return self._status(args)
            case "info":
                sid = args.get("id")
                if type(sid) is not int:
                    return None
                if sid in self.recs:
                    return self.info(sid)
                return self._archived_info(sid)
            case "states":
                ids = args.get("ids")
                if not isinstance(ids, list) or len(ids) > MAX_PAGE * 10 or not all(type(i) is int for i in ids):
                    raise ValueError("'ids' must be a list of task ids")
                return {str(i): self._ended_as(i) for i in ids}
            case "job":
                job = args.get("job")
                return list(self.jobs.get(job, ())) if isinstance(job, str) else []
            case other:
                raise ValueError(f"unknown question {other!r:.80}; known: status, info, states, job")

    def _archived_info(self, sid: int) -> dict[str, Any] | None:
        """``info`` of a compacted task, from this replica's history.

        A replica that caught up from another's snapshot may lack it: then
        the answer says ``"history": "missing"`` with what the state knows
        (the id and how it ended), and the client asks another replica.
        """
        state = self._ended_as(sid)
        if state is None:
            return None
        record = self.archived(sid)
        if not isinstance(record, dict) or record.get("id") != sid:
            return {"id": sid, "state": state, "history": "missing"}
        return {**record, "history": "archived"}

    def _state(self, sid: int) -> str:
        rec = self.recs[sid]
        if rec.state == "ready":
            return "pending"
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
        # The smallest pool that holds every match, in submission order.
        total: int | None = None  # known without looking at every task of the pool
        if job is not None:
            pool: Any = self.jobs.get(job, ())
        elif want_state in FINISHED or want_state == "all":
            pool = self.recs
        elif worker is not None or want_state == "running":
            pool = sorted(self.admitted)  # only a task the coordinator holds runs: a few windows
        elif tag is not None:
            pool = self.tagged.get(tag, {})
        elif want_state == "waiting":
            pool = self.blocked
        else:
            pool = self.open
            if want_state == "pending":
                total = self.tally["ready"] + sum(1 for sid in self.admitted if self._state(sid) == "pending")
        rows: list[dict[str, Any]] = []
        matched = 0
        plain = want_state in (None, "all") and tag is None and worker is None
        if plain and job is None:
            # No filter that needs each task's details: page straight through.
            matched = len(pool)
            ids = list(itertools.islice(iter(pool), offset, offset + limit))
            return {"total": matched, "offset": offset, "tasks": [self._row(i) for i in ids], "counts": self.counts()}
        for sid in pool:
            if total is not None and matched >= min(total, offset + limit):
                break  # the page is full and the total known: the rest need not be looked at
            rec = self.recs.get(sid)
            if rec is None:  # compacted: in the history, not listed
                continue
            if want_state not in (None, "all"):
                if want_state in FINISHED or want_state == "waiting":
                    if rec.state != want_state:
                        continue
                elif rec.state not in ("ready", "queued") or self._state(sid) != want_state:
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
        return {"total": matched if total is None else total, "offset": offset, "tasks": rows, "counts": self.counts()}

    def counts(self) -> dict[str, int]:
        """Tasks by scheduler state (``queued`` covers pending and running), and how many were compacted."""
        counts = dict(self.tally)
        counts["queued"] += counts.pop("ready")
        return {**counts, "compacted": self.compacted}

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
        if state == "ready":
            state = "pending"
        elif state == "queued":
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
            "usage": {key: record.get(key) for key in USAGE_KEYS},
            # A failed command's result files, kept by ``worker`` (a done task's are in its outputs).
            "result_files": list(record.get("result_files") or ()) if rec.state == "failed" else None,
        }

    def _ended_as(self, sid: int) -> str | None:
        """The state of task ``sid``, compacted or not; None if there is no such task."""
        rec = self.recs.get(sid)
        if rec is not None:
            return self._state(sid)
        return self.gone.get(sid, "done") if 1 <= sid < self.next_id else None
