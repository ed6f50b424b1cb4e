"""Read models over the coordinator state: a client's view, the status, one task's info.

Theory of operation
-------------------
Queries are answered from a replica's applied state, without the log, so
they never change it (:func:`view` only reads).  A client learns its work
through :func:`view`: each client keeps a per-task change version, and one
per input whose holder changed, each ordered by version
(:meth:`~tasksprint.coordinator.state.CoordinatorState.bump`), so a view
after version V touches only what changed for that client since V: a task
is listed once per assignment, later moves of its inputs as holder changes.
:func:`status` is the computation at a glance, :func:`task_info`
everything about one task.  No I/O here.
"""

from __future__ import annotations

from typing import Any

from tasksprint.codec import trusted
from tasksprint.coordinator.placement import load
from tasksprint.coordinator.replies import Assignment, ClientView, HolderChange, InputLocation
from tasksprint.coordinator.state import CoordinatorState, RunState, TaskRecord

__all__ = ["client_version", "last_hook", "status", "task_info", "view"]


def view(s: CoordinatorState, cid: int, after_version: int, client_timeout: float) -> ClientView:
    """What client ``cid`` must do, changed since ``after_version`` (0: everything).

    Pass the answer's ``version`` as ``after_version`` next time.  An
    input's ``cid``/``addr`` is the live client holding that pretask's
    outputs, or None while they are not available.
    """
    client = s.clients.get(cid)
    # client_timeout: how long this client may be silent; it keeps its polls well inside it.
    if client is None or not client.alive:
        return trusted(
            ClientView,
            version=s.version,
            state=s.run_state.value,
            alive=False,
            client_timeout=client_timeout,
            tasks=(),
            kill=(),
            holders=(),
            released=(),
        )
    tasks: list[Assignment] = []
    kill: list[int] = []
    entries = client.entries
    for tid in reversed(entries):
        if entries[tid] <= after_version:
            break
        if tid in client.running:
            tasks.append(_assignment(s, s.tasks[tid]))
        elif after_version > 0:  # a client starting afresh runs nothing to kill
            kill.append(tid)
    holders: list[HolderChange] = []
    for tid in reversed(client.holders):
        if client.holders[tid] <= after_version:
            break
        holder = s.tasks[tid].holder
        addr = s.clients[holder].addr if holder is not None else None
        holders.append(trusted(HolderChange, tid=tid, cid=holder, addr=addr))
    released: list[int] = []
    for tid in reversed(client.released):
        if client.released[tid] <= after_version:
            break
        if s.tasks[tid].holder != cid:  # not made here again since
            released.append(tid)
    # Built with codec.trusted: every value comes from the checked state, so
    # the validators (which guard the client's decoder) need not run here.
    return trusted(
        ClientView,
        version=s.version,
        state=s.run_state.value,
        alive=True,
        client_timeout=client_timeout,
        tasks=tuple(sorted(tasks, key=lambda t: t.tid)),
        kill=tuple(sorted(kill)),
        holders=tuple(sorted(holders, key=lambda h: h.tid)),
        released=tuple(sorted(released)),
    )


def client_version(s: CoordinatorState, cid: int) -> int:
    """The version of the last change to client ``cid``'s view (0 if none or unknown)."""
    client = s.clients.get(cid)
    return 0 if client is None else client.last_change


def _assignment(s: CoordinatorState, task: TaskRecord) -> Assignment:
    inputs = []
    for p, key in zip(task.pretasks, task.prekeys):
        holder = s.tasks[p].holder
        addr = s.clients[holder].addr if holder is not None else None
        inputs.append(trusted(InputLocation, tid=p, key=key, cid=holder, addr=addr))
    return trusted(
        Assignment,
        tid=task.tid,
        attempt=task.attempt,
        name=task.name,
        args=list(task.args),
        kwargs=dict(task.kwargs),
        seed=task.seed,
        timeout=task.timeout,
        keys=task.keys,
        inputs=tuple(inputs),
    )


def status(s: CoordinatorState) -> dict[str, Any]:
    """The computation at a glance.

    Returns ``{"state", "finished": bool, "result": {"values", "tasks":
    [{"tid", "values"}]} | None, "failure": {"kind", "hook", "tid", "cid",
    "slot", "error", "message"} | None, "tasks": {state: count, "total",
    "completed", "recomputed", "readopted"},
    "clients": {"live", "dead"}, "live_clients": [{"cid", "name",
    "addr", "slots", "tags", "running", "prefetching"}], "now", "seed", "version",
    "last_hook"}``.  A client's ``running`` counts the tasks taking its
    slots (all inputs available), ``prefetching`` those placed there that
    still wait for an input; both are ``running`` in the task counts.
    ``completed`` (tasks done at least once), ``recomputed`` (completions of
    tasks done before, redone from lineage) and ``readopted`` (outputs taken
    back from a returning client) only grow.
    """
    counts = {state.value: n for state, n in s.counts.items()}
    counts["total"] = len(s.tasks)
    counts["completed"], counts["recomputed"], counts["readopted"] = s.completed, s.recomputed, s.readopted
    return {
        "state": s.run_state.value,
        "finished": s.run_state is RunState.FINISHED,
        "result": s.result,
        "failure": None if s.failure is None else dict(s.failure),
        "tasks": counts,
        "clients": {"live": len(s.live), "dead": len(s.clients) - len(s.live)},
        "live_clients": [
            {
                "cid": c.cid,
                "name": c.name,
                "addr": c.addr,
                "slots": c.slots,
                "tags": sorted(c.tags),
                "running": load(c),
                "prefetching": len(c.prefetch),
            }
            for c in (s.clients[cid] for cid in s.live)
        ],
        "now": s.now,
        "seed": s.seed,
        "version": s.version,
        "last_hook": last_hook(s),
    }


def task_info(s: CoordinatorState, tid: int) -> dict[str, Any] | None:
    """Everything known about task ``tid``, or None if there is no such task."""
    task = s.tasks.get(tid)
    if task is None:
        return None
    return {
        "tid": task.tid,
        "name": task.name,
        "state": task.state.value,
        "attempt": task.attempt,
        "failures": task.failures,
        "args": list(task.args),
        "kwargs": dict(task.kwargs),
        "pretasks": list(task.pretasks),
        "prekeys": list(task.prekeys),
        "keys": list(task.keys),
        "require": sorted(task.require),
        "want": list(task.want),
        "replicas": task.replicas,
        "retries": task.retries,
        "timeout": task.timeout,
        "clients": list(task.copies),
        # Of those, the clients where it waits for inputs (placed early).
        "prefetching": [cid for cid in task.copies if task.tid in s.clients[cid].prefetch],
        "holder": task.holder,
        "values": None if task.values is None else dict(task.values),
        "sizes": dict(task.sizes),
        "error": task.error,
        "dependents": list(dict.fromkeys(task.dependents)),
    }


def last_hook(s: CoordinatorState) -> dict[str, Any] | None:
    """The last hook called: ``{"hook", "tid", "cid", "slot"}``, or None."""
    return None if s.last_hook is None else dict(s.last_hook)


def graph(s: CoordinatorState, first: int, count: int) -> dict[str, Any]:
    """Tasks ``first`` .. ``first + count - 1`` that exist, as columns.

    Returns ``{"first", "total", "tids", "names", "states", "pretasks"}``.

    ``pretasks[i]`` are the distinct tasks task ``tids[i]`` reads, in order.
    """
    tids, names, states, pretasks = [], [], [], []
    for tid in range(first, first + count):
        task = s.tasks.get(tid)
        if task is None:
            continue
        tids.append(tid)
        names.append(task.name)
        states.append(task.state.value)
        pretasks.append(list(dict.fromkeys(task.pretasks)))
    return {"first": first, "total": len(s.tasks), "tids": tids, "names": names, "states": states, "pretasks": pretasks}
