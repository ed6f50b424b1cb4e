"""Lineage: what happens to tasks whose inputs or outputs come and go.

Theory of operation
-------------------
Every task counts its ``missing`` inputs: pretask outputs not held by a live
client.  When a task's outputs appear (its completion) or disappear (their
holder died, or a client could not fetch them), :meth:`Lineage.outputs_changed`
adjusts each dependent's count, moves placed dependents between their
client's slots and prefetch set, queues them for placement, and bumps the
holder-change rows of the clients running them, so their views say where the
input is now.  Lost outputs go on ``recheck``; after the entry,
:meth:`Lineage.recompute_lost` runs again every task whose lost outputs an
unfinished task needs, and, transitively, the lost inputs of those.
:meth:`Lineage.kill` ends a task and its transitive dependents.

A client declared dead keeps its object store; when it joins again under
the same name it offers the ``(tid, attempt)`` outputs it holds, and
:meth:`Lineage.readopt` takes back each one that is the committed completion
(the very client name and attempt in ``made_by`` / ``made_attempt``) and
whose outputs no live client holds yet: the task is done again, held by the
new incarnation, a recompute of it in progress is cancelled, and so,
transitively, is any recompute of its inputs that nothing active needs any
more (:meth:`Lineage.drop_unneeded`).  No I/O here.
"""

from __future__ import annotations

import collections
import heapq

import attrs

from tasksprint.coordinator.placement import Placement
from tasksprint.coordinator.specs import TaskSpec, task_seed
from tasksprint.coordinator.state import ACTIVE, ClientRecord, CoordinatorState, Entry, TaskRecord, TaskState

__all__ = ["MAX_GRACE", "Lineage"]

#: The longest wait (seconds of log time) for a dead client's outputs that a TICK may ask for.
MAX_GRACE = 3600.0


#: Why an offered output is not re-adopted (the keys of ``readopt``'s ``refused`` counts).
REFUSALS = {
    "unknown": "no such task (forgotten)",
    "other_attempt": "the committed completion is another attempt (recomputed since, or never committed)",
    "other_maker": "another client name made the committed completion",
    "held": "a live client holds the outputs (a recompute finished, or already re-adopted)",
    "maker_alive": "the incarnation that made it is still live",
    "finished": "failed or killed since",
}


def _refusal(s: CoordinatorState, client: ClientRecord, task: TaskRecord | None, attempt: int) -> str | None:
    """Why ``client`` may not re-adopt ``attempt`` of ``task``, or None if it may."""
    if task is None:
        return "unknown"
    if task.made_by is None or task.made_attempt != attempt:
        return "other_attempt"
    old = s.clients[task.made_by]
    if old.name != client.name:
        return "other_maker"
    if task.holder is not None:
        return "held"
    if old.alive:
        return "maker_alive"
    if task.state is TaskState.DONE or (task.state in ACTIVE and task.reported):
        return None
    return "finished"  # failed or killed since: its dependents are gone


@attrs.define(eq=False)
class Lineage:
    """Keeps the tasks of state ``s`` consistent with where outputs are, noting actions in ``fx``."""

    s: CoordinatorState
    fx: Entry
    placement: Placement

    def add(self, spec: TaskSpec) -> TaskRecord:
        """Record a new task; count its missing inputs and ask for lost ones again."""
        s = self.s
        assert s.seed is not None
        tid = s.next_tid
        s.next_tid += 1
        task = TaskRecord(
            tid=tid,
            name=spec.name,
            args=spec.args,
            kwargs=spec.kwargs,
            pretasks=spec.pretasks,
            prekeys=spec.prekeys,
            keys=spec.keys,
            require=spec.require,
            want=spec.want,
            replicas=spec.replicas,
            retries=spec.retries,
            timeout=spec.timeout,
            seed=task_seed(s.seed, tid),
        )
        s.tasks[tid] = task
        s.counts[TaskState.PENDING] += 1
        for p in task.pretasks:
            pre = s.tasks[p]
            pre.dependents.append(tid)
            if pre.holder is None:
                task.missing += 1
                if pre.state is TaskState.DONE:
                    s.recheck.add(p)  # a lost output is needed again
        return task

    def client_died(self, client: ClientRecord, grace: float = 0.0) -> None:
        """Mark ``client`` dead: its copies are placed again, its outputs lost.

        The lost outputs are not recomputed for ``grace`` seconds of log time
        (see :meth:`end_wait`): the client may come back and offer them.
        """
        s = self.s
        client.alive = False
        del s.live[client.cid]
        self.fx.effects.append(["dead", client.cid])
        for tid in sorted(client.running):
            task = s.tasks[tid]
            task.copies.remove(client.cid)
            if not task.copies and task.state is TaskState.RUNNING:
                # A new attempt number, so a late report from the dead
                # client cannot be mistaken for the new placement's.
                task.attempt += 1
                s.set_state(task, TaskState.PENDING)
                self.fx.effects.append(["replace", tid, task.attempt])
            self.placement.enqueue(tid)
        client.running.clear()
        client.prefetch.clear()
        client.entries.clear()
        client.holders.clear()
        client.follow.clear()
        client.in_follow.clear()
        for tid in sorted(client.holds):
            self.lose_outputs(s.tasks[tid])
            if grace > 0:
                s.awaiting.pop(tid, None)
                s.awaiting[tid] = s.now + grace

    def end_wait(self, name: str | None = None) -> None:
        """Stop waiting for outputs whose grace is over, or (``name``) whose maker's name joined again.

        A client that joined again offered what it still had; what it did
        not offer will not come back.  Either way, those still needed are
        recomputed after this entry (:meth:`recompute_lost`).
        """
        s = self.s
        if name is None:
            due = []
            for tid, deadline in s.awaiting.items():
                if deadline > s.now:
                    break
                due.append(tid)
        else:
            due = [tid for tid in s.awaiting if self._maker(tid).name == name]
        for tid in due:
            del s.awaiting[tid]
            s.recheck.add(tid)

    def _maker(self, tid: int) -> ClientRecord:
        made_by = self.s.tasks[tid].made_by
        assert made_by is not None
        return self.s.clients[made_by]

    def void_copy(self, client: ClientRecord, task: TaskRecord) -> None:
        """Forget ``client``'s copy of ``task``'s attempt; a new attempt if it was the last copy."""
        self.placement.unassign(client, task.tid, tell=False)
        task.copies.remove(client.cid)
        self.fx.effects.append(["void", task.tid, task.attempt, client.cid])
        if task.copies:
            self.placement.enqueue(task.tid)
        else:
            task.attempt += 1
            self.s.set_state(task, TaskState.PENDING)
            self.placement.maybe_queue(task)

    def bump_dependents(self, task: TaskRecord) -> None:
        # Running dependents read this task's outputs: their clients' views
        # must show the new holder (or that there is none for now).  The
        # view carries it as a holder change, not by listing every dependent
        # again with all its inputs (a reduce over n maps would cost O(n) per
        # map completion, O(n^2) in all).
        s = self.s
        told: set[int] = set()
        for d in dict.fromkeys(task.dependents):
            dep = s.tasks[d]
            if dep.state is TaskState.RUNNING:
                for cid in dep.copies:
                    if cid not in told:
                        told.add(cid)
                        client = s.clients[cid]
                        s.bump(client.holders, client, task.tid)

    def outputs_changed(self, task: TaskRecord, *, available: bool) -> None:
        s = self.s
        for d in task.dependents:
            dep = s.tasks[d]
            dep.missing += -1 if available else 1
            assert dep.missing >= 0, f"task {d} has a negative count of missing inputs"
            if available:
                if dep.missing == 0:
                    # All inputs are in: from now on it takes one of the slots.
                    for cid in dep.copies:
                        s.clients[cid].prefetch.pop(d, None)
                self.placement.maybe_queue(dep)
            elif dep.missing == 1:
                # An input it had is gone: it waits again, without a slot.
                for cid in dep.copies:
                    s.clients[cid].prefetch[d] = None
        self.bump_dependents(task)

    def lose_outputs(self, task: TaskRecord) -> None:
        s = self.s
        assert task.holder is not None
        s.clients[task.holder].holds.pop(task.tid, None)
        task.holder = None
        self.fx.effects.append(["lost", task.tid])
        self.outputs_changed(task, available=False)
        s.recheck.add(task.tid)

    def release_consumed(self) -> None:
        """Release the held outputs that every task reading them has finished with.

        A done task with readers, none of them pending or running, has had
        its outputs fetched by all of them: they leave their holder (which
        is told in its view to drop them) and the task stays done without a
        holder, like one whose holder died after its readers finished.  A
        reader started later, or a reader recomputed, recomputes it from
        lineage.  Tasks no task reads keep their outputs (a final result,
        or one fetched by people, e.g. ``tasksprint result get``).
        """
        s = self.s
        candidates = sorted(s.release_check)
        s.release_check.clear()
        for tid in candidates:
            task = s.tasks.get(tid)
            if task is None or task.state is not TaskState.DONE or task.holder is None or not task.dependents:
                continue
            if any(s.tasks[d].state in ACTIVE for d in task.dependents):
                continue
            client = s.clients[task.holder]
            client.holds.pop(tid, None)
            task.holder = None
            s.bump(client.released, client, tid)
            s.outputs_released += 1
            self.fx.effects.append(["release", tid, client.cid])
            self.outputs_changed(task, available=False)

    def kill(self, tid: int) -> list[int]:
        """Kill ``tid`` and its transitive dependents that are still pending or running."""
        s = self.s
        killed: list[int] = []
        seen = {tid}
        frontier = collections.deque([tid])
        while frontier:
            task = s.tasks[frontier.popleft()]
            if task.state in ACTIVE:
                for cid in task.copies:
                    self.placement.unassign(s.clients[cid], task.tid, tell=True)
                task.copies = []
                s.set_state(task, TaskState.KILLED)
                s.queue.discard(task.tid)
                killed.append(task.tid)
                self.fx.effects.append(["kill", task.tid])
            for d in task.dependents:
                if d not in seen:
                    seen.add(d)
                    frontier.append(d)
        return killed

    def forget(self, tid: int) -> None:
        """Drop finished task ``tid`` from the state; raises ``ValueError`` if it is active or read by a task."""
        s = self.s
        task = s.tasks[tid]
        if task.state in ACTIVE:
            raise ValueError(
                f"forget_task({tid}): the task is {task.state.value}; only finished tasks can be forgotten"
            )
        if any(d in s.tasks for d in task.dependents):
            raise ValueError(f"forget_task({tid}): tasks that read its outputs are still on record; forget them first")
        for p in dict.fromkeys(task.pretasks):
            pre = s.tasks.get(p)
            if pre is not None:
                pre.dependents = [d for d in pre.dependents if d != tid]
        if task.holder is not None:
            s.clients[task.holder].holds.pop(tid, None)
        for client in s.clients.values():
            client.holders.pop(tid, None)
            client.released.pop(tid, None)
            if tid in client.in_follow:
                client.in_follow.discard(tid)
                client.follow.remove(tid)
                heapq.heapify(client.follow)
        s.queue.discard(tid)
        s.recheck.discard(tid)
        s.awaiting.pop(tid, None)
        s.counts[task.state] -= 1
        s.forgotten += 1
        del s.tasks[tid]
        self.fx.effects.append(["forget", tid])

    def recompute_lost(self) -> int:
        """Run again every task whose lost outputs an unfinished task needs (lineage); returns how many."""
        s = self.s
        started = 0
        while s.recheck:
            batch = sorted(s.recheck)
            s.recheck.clear()
            for tid in batch:
                task = s.tasks[tid]
                if task.state is not TaskState.DONE or task.holder is not None:
                    continue
                if not any(s.tasks[d].state in ACTIVE for d in task.dependents):
                    continue
                if tid in s.awaiting:
                    continue  # its maker may bring it back: its readers wait (end_wait)
                task.attempt += 1
                task.failures = 0
                started += 1
                s.set_state(task, TaskState.PENDING)
                self.fx.effects.append(["recompute", tid, task.attempt])
                self.placement.maybe_queue(task)
                # Its own inputs may be gone too: then they are needed now.
                for p in task.pretasks:
                    pre = s.tasks[p]
                    if pre.state is TaskState.DONE and pre.holder is None:
                        s.recheck.add(p)
        return started

    def readopt(
        self, client: ClientRecord, offers: tuple[tuple[int, int], ...], refused: dict[str, int] | None = None
    ) -> list[int]:
        """Take back the outputs a returning client (new incarnation ``client``) still holds.

        An offer ``(tid, attempt)`` counts only if it is the task's committed
        completion (made by a dead incarnation of this client name, attempt
        ``attempt``) and no live client holds the task's outputs: a recompute
        that completed elsewhere wins, and an output of any other attempt is
        never accepted.  Offers are taken in tid order.  Returns the tids
        adopted; counts the others in ``refused`` by reason (see :data:`REFUSALS`).
        """
        s = self.s
        adopted: list[int] = []
        why = refused if refused is not None else {}
        for tid, attempt in sorted(set(offers)):
            task = s.tasks.get(tid)
            reason = _refusal(s, client, task, attempt)
            if reason is not None:
                why[reason] = why.get(reason, 0) + 1
                continue
            assert task is not None
            if task.state in ACTIVE:
                self._cancel_recompute(task)
            task.holder = task.made_by = client.cid
            client.holds[tid] = None
            s.awaiting.pop(tid, None)
            self.fx.effects.append(["readopt", tid, attempt, client.cid])
            s.readopted += 1
            self.outputs_changed(task, available=True)
            adopted.append(tid)
        self.drop_unneeded(adopted)
        return adopted

    def _cancel_recompute(self, task: TaskRecord) -> None:
        """Stop the recompute of ``task`` (done once, its outputs back or not needed): done again."""
        s = self.s
        for cid in task.copies:
            self.placement.unassign(s.clients[cid], task.tid, tell=True)
        task.copies = []
        s.queue.discard(task.tid)
        s.set_state(task, TaskState.DONE)
        self.fx.effects.append(["uncompute", task.tid, task.attempt])

    def drop_unneeded(self, tids: list[int]) -> None:
        """Cancel recomputes of the inputs of ``tids`` (transitively) that no active task needs any more.

        A recompute (a task done once, active again) whose dependents are all
        finished goes back to done without outputs, as it was before the
        recompute started; a later need recomputes it again (:meth:`recompute_lost`).
        """
        s = self.s
        # An input is looked at again each time one of its readers is
        # cancelled: it may be read by tasks of several depths (an input of
        # both a re-adopted task and of a recompute cancelled later), and
        # is unneeded only once the last of them is.  Each task is
        # cancelled at most once, so this costs O(pretask entries of the
        # tasks cancelled).
        frontier = sorted({p for tid in tids for p in s.tasks[tid].pretasks})
        while frontier:
            nxt: set[int] = set()
            for tid in frontier:
                task = s.tasks[tid]
                if not (task.state in ACTIVE and task.reported and task.holder is None):
                    continue
                if any(s.tasks[d].state in ACTIVE for d in task.dependents):
                    continue
                self._cancel_recompute(task)
                nxt.update(task.pretasks)
            frontier = sorted(nxt)
