"""Placement: which live client runs each task, and when.

Theory of operation
-------------------
A task is *ready* when the outputs of all its pretasks are held by live
clients; it is placed on a client with room: fewer than ``slots + queue``
ready tasks placed there, where ``queue`` is what the client asked for
beyond its slots (0 unless it said so at join; the extra tasks wait in its
node pool, so its nodes never idle for a report round trip).  A task is
*prefetchable* when at least one of its inputs is available and none of its
pretasks is waiting to be placed (each is running somewhere or done with
its outputs held): it may be placed early, into the client's *prefetch
allowance* of ``slots + queue`` tasks on top of its running ones (early
placement stops while ``slots + queue`` tasks wait for inputs there or
``2 * (slots + queue)`` are placed there in all), so the client fetches
each input as its pretask completes (rolling prefetch) while the other
pretasks still run, and starts the task on a node once the last input is
in.  A task none of whose inputs is available yet, whose pretasks all run
on one client with a queue, *follows* them there, in the same allowance:
that client will hold every input and may start it as soon as its own
nodes made them (see ``early`` in :class:`~tasksprint.coordinator.ops.DoneOp`).
Prefetch is never needed for progress: an early placement takes no slot and
its pretasks already hold or need only normal slots, so a computation with
few slots cannot deadlock on it.  Either way placement honours ``require``
tags, prefers ``want`` tags, then the client already holding most bytes of
the task's inputs available so far, then the least loaded client (by tasks
placed on it, prefetching ones included), then the lowest client id.  First
one copy of every placeable task is placed, in task order, then the extra
copies of replicated tasks.  Waiting tasks sit in heaps (ready, early, and
each client's followers), taken from only while a client has room for
them, so a completion costs O(log n) however many tasks wait.

How a placed task counts: it takes one of its client's ``slots`` exactly
while all its inputs are available, and otherwise sits in the client's
``prefetch`` set.  So an early-placed task moves to the slots when its last
input becomes available, even if that puts the client over its ``slots``
(the client then runs it on the next free node, and no new task is placed
there until it is under its slots again); the count never lies about what
the client's nodes have to run.

Everything is iterated in sorted or log order, never in set order, so every
replica places alike.  No I/O here.
"""

from __future__ import annotations

import heapq

import attrs

from tasksprint.coordinator.state import ACTIVE, ClientRecord, CoordinatorState, Entry, TaskRecord, TaskState

__all__ = ["Placement", "early_room", "load", "ready_room"]


@attrs.define(eq=False)
class Placement:
    """Places the tasks of state ``s``, noting what it did in ``fx`` (the current entry)."""

    s: CoordinatorState
    fx: Entry

    def assign(self, task: TaskRecord, client: ClientRecord) -> None:
        """Place a copy of ``task``'s current attempt on ``client``."""
        s = self.s
        task.copies.append(client.cid)
        client.running[task.tid] = None
        if task.missing:
            client.prefetch[task.tid] = None
        s.bump(client.entries, client, task.tid)
        self.fx.effects.append(["prefetch" if task.missing else "place", task.tid, task.attempt, client.cid])
        if task.state is TaskState.PENDING:
            s.set_state(task, TaskState.RUNNING)
            # No longer waiting for placement: its dependents may prefetch.
            for d in dict.fromkeys(task.dependents):
                dep = s.tasks[d]
                if dep.tid not in s.queue and dep.missing and self.maybe_queue(dep):
                    self.fx.woken = True

    def unassign(self, client: ClientRecord, tid: int, *, tell: bool) -> None:
        """Take ``tid`` off ``client``; ``tell`` leaves a kill order in its view."""
        client.running.pop(tid, None)
        client.prefetch.pop(tid, None)
        if tell:
            self.s.bump(client.entries, client, tid)
        else:
            client.entries.pop(tid, None)

    def place(self) -> None:
        # Placing a task can make its dependents prefetchable or followers
        # (none of their pretasks waits for placement any more); they are
        # pushed onto the heaps as it happens, and another round places the
        # followers and the extra copies they bring in the same entry.
        while True:
            self.fx.woken = False
            self._place_round()
            self._place_followers()
            if not self.fx.woken:
                return

    def enqueue(self, tid: int) -> None:
        """Queue ``tid`` for placement, on the heap of its class (ready or early)."""
        s = self.s
        s.queue.add(tid)
        self._push(tid, ready=s.tasks[tid].missing == 0)

    def _push(self, tid: int, *, ready: bool) -> None:
        s = self.s
        if ready:
            if tid not in s.in_ready:
                s.in_ready.add(tid)
                heapq.heappush(s.ready_heap, tid)
        elif tid not in s.in_early:
            s.in_early.add(tid)
            heapq.heappush(s.early_heap, tid)

    def _place_round(self) -> None:
        s = self.s
        live = [s.clients[cid] for cid in s.live]
        # Clients with room for a ready task, and clients with room in their prefetch allowance.
        free = [c for c in live if ready_room(c)]
        early = [c for c in live if early_room(c)]
        ready_heap, early_heap = s.ready_heap, s.early_heap
        # Tasks no client in the pool could take now (tags, copies), back on their heap afterwards.
        skipped: list[tuple[int, bool]] = []
        extras: list[int] = []  # tasks with copies placed that need more (replicas > 1)
        # One copy of every placeable task, in tid order across both heaps,
        # taking from a heap only while some client has room for its class:
        # a completion costs O(log n) however many tasks wait.
        while True:
            r = ready_heap[0] if free and ready_heap else None
            e = early_heap[0] if early and early_heap else None
            if r is None and e is None:
                break
            from_ready = e is None or (r is not None and r < e)
            if from_ready:
                tid = heapq.heappop(ready_heap)
                s.in_ready.discard(tid)
            else:
                tid = heapq.heappop(early_heap)
                s.in_early.discard(tid)
            if tid not in s.queue:
                continue
            task = s.tasks[tid]
            if task.state not in ACTIVE or len(task.copies) >= task.replicas:
                s.queue.discard(tid)
                continue
            if task.copies:
                extras.append(tid)
                continue
            if task.missing == 0:
                if not from_ready:
                    self._push(tid, ready=True)  # its inputs came in while it waited
                    continue
                pool, prefetch = free, False
            elif not self._prefetchable(task):
                # Queued again when an input arrives or a pretask is placed.
                s.queue.discard(tid)
                continue
            elif from_ready:
                self._push(tid, ready=False)  # an input was lost while it waited
                continue
            else:
                pool, prefetch = early, True
            client = self._choose(task, pool, self._local_bytes(task))
            if client is None:
                skipped.append((tid, not prefetch))
                continue
            self.assign(task, client)
            self._take_room(client, pool, prefetch)
            if len(task.copies) < task.replicas:
                extras.append(tid)
            else:
                s.queue.discard(tid)
        # Then the extra copies of replicated tasks, so replicas never starve other tasks.
        for tid in sorted(set(extras)):
            task = s.tasks[tid]
            prefetch = task.missing > 0
            pool = early if prefetch else free
            if pool:
                local = self._local_bytes(task)
                while len(task.copies) < task.replicas:
                    client = self._choose(task, pool, local)
                    if client is None:
                        break
                    self.assign(task, client)
                    self._take_room(client, pool, prefetch)
            if len(task.copies) < task.replicas:
                skipped.append((tid, not prefetch))
            else:
                s.queue.discard(tid)
        for tid, ready in skipped:
            self._push(tid, ready=ready)

    def _take_room(self, client: ClientRecord, pool: list[ClientRecord], prefetch: bool) -> None:
        if client in pool and not (early_room(client) if prefetch else ready_room(client)):
            pool.remove(client)

    def _place_followers(self) -> None:
        """Place each client's followers on it while its prefetch allowance has room."""
        s = self.s
        for cid in s.live:
            client = s.clients[cid]
            while client.follow and early_room(client):
                tid = heapq.heappop(client.follow)
                client.in_follow.discard(tid)
                task = s.tasks[tid]
                if task.copies or tid in s.queue or self._follow_target(task) != cid:
                    continue  # placed meanwhile, or no longer a follower of this client
                self.assign(task, client)
                if len(task.copies) < task.replicas:
                    self.enqueue(tid)
                self.fx.woken = True

    def _placed_or_held(self, task: TaskRecord) -> bool:
        """No pretask of ``task`` waits to be placed: each runs somewhere or its outputs are held."""
        n = len(task.pretasks)
        tasks = self.s.tasks
        # Start at the pretask that blocked last time: a wide fan-in whose
        # pretasks are placed one by one is then checked in linear time overall.
        for k in range(n):
            i = (task.blocker + k) % n
            pre = tasks[task.pretasks[i]]
            if pre.holder is None and pre.state is not TaskState.RUNNING:
                task.blocker = i
                return False
        return True

    def _prefetchable(self, task: TaskRecord) -> bool:
        """Some input is available and no pretask waits to be placed (each runs or is held)."""
        return task.missing < len(task.pretasks) and self._placed_or_held(task)

    def _follow_target(self, task: TaskRecord) -> int | None:
        """The client ``task`` may follow its pretasks to, or None.

        A pending task none of whose inputs is available yet, whose
        pretasks all run (none waits for placement), can be placed early on
        a client with a queue that runs every one of them: that client will
        hold every input, and can start the task as soon as its own nodes
        made them.  The lowest such cid.
        """
        s = self.s
        if task.state is not TaskState.PENDING or task.copies or not task.pretasks:
            return None
        if task.missing != len(task.pretasks) or not self._placed_or_held(task):
            return None
        common: set[int] | None = None
        for p in dict.fromkeys(task.pretasks):
            cids = {cid for cid in s.tasks[p].copies if s.clients[cid].queue > 0}
            common = cids if common is None else common & cids
            if not common:
                return None
        if not common:
            return None
        target = min(common)
        return target if task.require <= s.clients[target].tags else None

    def maybe_queue(self, task: TaskRecord) -> bool:
        """Queue ``task`` for placement if it may be ready or prefetchable, or as a follower.

        Returns whether it was queued either way.
        """
        if task.state not in ACTIVE:
            return False
        if task.missing == 0 or task.missing < len(task.pretasks):
            self.enqueue(task.tid)
            return True
        target = self._follow_target(task)
        if target is None:
            return False
        client = self.s.clients[target]
        if task.tid not in client.in_follow:
            client.in_follow.add(task.tid)
            heapq.heappush(client.follow, task.tid)
        return True

    def _local_bytes(self, task: TaskRecord) -> dict[int, int]:
        """Bytes of ``task``'s inputs held by each client."""
        out: dict[int, int] = {}
        for p, key in zip(task.pretasks, task.prekeys):
            pre = self.s.tasks[p]
            if pre.holder is not None:
                n = sum(pre.sizes.values()) if key is None else pre.sizes.get(key, 0)
                out[pre.holder] = out.get(pre.holder, 0) + n
        return out

    def _choose(self, task: TaskRecord, free: list[ClientRecord], local: dict[int, int]) -> ClientRecord | None:
        best: ClientRecord | None = None
        best_key: tuple[int, int, int, int] | None = None
        for client in free:
            if client.cid in task.copies or not task.require <= client.tags:
                continue
            wanted = sum(1 for t in task.want if t in client.tags) if task.want else 0
            key = (-wanted, -local.get(client.cid, 0), len(client.running) - client.slots, client.cid)
            if best_key is None or key < best_key:
                best, best_key = client, key
        return best


def load(client: ClientRecord) -> int:
    """Tasks counting against ``client``'s slots: placed there with all inputs available."""
    return len(client.running) - len(client.prefetch)


def ready_room(client: ClientRecord) -> bool:
    """Whether ``client`` takes another ready task: fewer than ``slots + queue`` placed there."""
    return load(client) < client.slots + client.queue


def early_room(client: ClientRecord) -> bool:
    """Whether ``client``'s prefetch allowance takes another early placement.

    Fewer than ``slots + queue`` tasks wait for inputs there, and fewer
    than ``2 * (slots + queue)`` are placed there in all: an early-placed
    task moves to the slots when its inputs are in, and must not free
    room for another one beyond that bound.
    """
    room = client.slots + client.queue
    return len(client.prefetch) < room and len(client.running) < 2 * room
