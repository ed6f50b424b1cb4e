"""Which applied slots a majority of replicas agrees on, and who is wrong when they disagree.

Theory of operation
-------------------
Every replica keeps a running digest of what it applied (see
:class:`~tasksprint.machine.Applier`): the digest after slot ``s`` covers
every slot up to ``s``.  After each driver pass a replica tells its peers its
digest after the last slot it applied (a small ``PeerDigest`` that leaves
with the pass's other messages), with a short summary of its state for
people.  A :class:`DigestTally` remembers this replica's own digest for the
latest ``keep`` slots and compares each peer's report with its own at the
same slot, now or once it has applied that slot.

* Equal digests at slot ``s`` mean the two replicas agree on every slot up
  to ``s``.  ``confirmed`` is the highest slot that a majority of the
  replicas (this one included) is known to agree on: a replica answers
  questions about its state only once it is confirmed, so nobody acts on a
  state a non-deterministic scheduler made on one replica alone.
* Different digests at ``s``: if a majority agrees with this replica at
  ``s`` or later, the peer is the odd one out (:class:`PeerDiverged`; it
  will find out and stop itself).  If a majority disagrees with this replica,
  this replica is in the minority (:class:`Minority`) and must stop.  Until
  one or the other is known, nothing past the last agreed slot is confirmed.

Nothing here does I/O, reads a clock, or depends on set order.
"""

from __future__ import annotations

import collections

import attrs

__all__ = ["DigestTally", "Disagreement", "Minority", "PeerDiverged", "Summary", "divergence_message"]

KEEP = 4096  # own digests kept per replica: peers' reports older than this are not compared
PENDING = 1024  # reports kept per peer that is ahead of this replica


@attrs.frozen
class Summary:
    """What a replica's state looks like after a slot, for people: the last scheduler call, tasks started."""

    last_call: str = ""
    tasks: int = 0


@attrs.frozen
class Disagreement:
    """Replica ``peer`` reported another digest than ours for ``slot``; ``agreed`` is the last slot we shared."""

    peer: int
    slot: int
    agreed: int
    mine: Summary
    theirs: Summary


@attrs.frozen
class PeerDiverged(Disagreement):
    """The peer is in the minority: a majority shares our digest at ``slot`` or later."""

    majority: tuple[int, ...] = ()


@attrs.frozen
class Minority(Disagreement):
    """This replica is in the minority: a majority of the replicas disagrees with it."""

    others: tuple[tuple[int, Summary], ...] = ()


@attrs.define(eq=False)
class DigestTally:
    """One replica's view of which slots the replicas agree on (see the module docstring)."""

    rid: int
    replicas: int
    keep: int = KEEP
    _mine: collections.OrderedDict[int, tuple[bytes, Summary]] = attrs.Factory(collections.OrderedDict)
    _pending: dict[int, collections.deque[tuple[int, bytes, Summary]]] = attrs.Factory(dict)
    _agreed: dict[int, int] = attrs.Factory(dict)  # peer -> highest slot with equal digests
    _differs: dict[int, Disagreement] = attrs.Factory(dict)  # peer -> the first disagreement seen
    _decided: set[int] = attrs.Factory(set)  # peers already reported as diverged
    _applied: int = 0
    _confirmed: int = 0

    @property
    def confirmed(self) -> int:
        """The highest applied slot a majority of the replicas, this one included, agrees on."""
        return self._applied if self.replicas == 1 else self._confirmed

    @property
    def majority(self) -> int:
        return self.replicas // 2 + 1

    def summary_of(self, slot: int) -> Summary:
        """This replica's summary after ``slot`` (an empty one if it is not kept)."""
        kept = self._mine.get(slot)
        return kept[1] if kept is not None else Summary()

    def restart_at(self, slot: int, digest: bytes, summary: Summary) -> None:
        """The state was replaced (a snapshot) with the one after ``slot``: forget older slots."""
        self._mine.clear()
        self._applied = slot
        self._confirmed = min(self._confirmed, slot)
        self._mine[slot] = (digest, summary)

    def applied(self, slot: int, digest: bytes, summary: Summary) -> list[Disagreement]:
        """This replica applied ``slot``; returns disagreements found with reports that waited for it."""
        self._applied = slot
        self._mine[slot] = (digest, summary)
        while len(self._mine) > self.keep:
            self._mine.popitem(last=False)
        found: list[Disagreement] = []
        for peer in sorted(self._pending):
            queue = self._pending[peer]
            while queue and queue[0][0] <= slot:
                s, d, summ = queue.popleft()
                found += self._compare(peer, s, d, summ)
        return found

    def heard(self, peer: int, slot: int, digest: bytes, summary: Summary) -> list[Disagreement]:
        """Replica ``peer`` reported its digest after ``slot``; returns any disagreement this decides."""
        if peer == self.rid or not 0 <= peer < self.replicas:
            return []
        if slot > self._applied:
            queue = self._pending.setdefault(peer, collections.deque(maxlen=PENDING))
            if not queue or queue[-1][0] < slot:
                queue.append((slot, digest, summary))
            return []
        return self._compare(peer, slot, digest, summary)

    def _compare(self, peer: int, slot: int, digest: bytes, summary: Summary) -> list[Disagreement]:
        mine = self._mine.get(slot)
        if mine is None:
            return []  # older than what we keep
        if mine[0] == digest:
            if slot > self._agreed.get(peer, 0):
                self._agreed[peer] = slot
                self._update_confirmed()
            return self._decide()
        if peer not in self._differs:
            self._differs[peer] = Disagreement(peer, slot, self._agreed.get(peer, 0), mine[1], summary)
        return self._decide()

    def _update_confirmed(self) -> None:
        # The (majority - 1)-th highest slot agreed with a peer: with this
        # replica, that many replicas share every slot up to it.
        agreed = sorted(self._agreed.values(), reverse=True)
        need = self.majority - 1
        if len(agreed) >= need:
            self._confirmed = max(self._confirmed, min(agreed[need - 1], self._applied))

    def _decide(self) -> list[Disagreement]:
        out: list[Disagreement] = []
        if len(self._differs) >= self.majority:
            first = min(self._differs.values(), key=lambda d: (d.slot, d.peer))
            others = tuple(sorted((d.peer, d.theirs) for d in self._differs.values()))
            return [Minority(first.peer, first.slot, first.agreed, first.mine, first.theirs, others)]
        for peer in sorted(self._differs):
            if peer in self._decided:
                continue
            d = self._differs[peer]
            with_me = tuple(sorted(p for p, s in self._agreed.items() if s >= d.slot))
            if 1 + len(with_me) >= self.majority:
                self._decided.add(peer)
                out.append(PeerDiverged(d.peer, d.slot, d.agreed, d.mine, d.theirs, with_me))
        return out


def divergence_message(rid: int, d: Disagreement) -> str:
    """Say plainly, for people, that the state machine is not deterministic and where.

    E.g. "... (last scheduler call: init in slot 1): 9 tasks started on
    replica 0, 6 on replicas 1 and 2".
    """
    groups: dict[int, list[int]] = {}
    if isinstance(d, Minority):
        groups.setdefault(d.mine.tasks, []).append(rid)
        for peer, summ in d.others:
            groups.setdefault(summ.tasks, []).append(peer)
    elif isinstance(d, PeerDiverged):
        groups.setdefault(d.mine.tasks, []).extend([rid, *d.majority])
        groups.setdefault(d.theirs.tasks, []).append(d.peer)
    else:
        groups.setdefault(d.mine.tasks, []).append(rid)
        groups.setdefault(d.theirs.tasks, []).append(d.peer)
    parts: list[str] = []
    for tasks, rids in sorted(groups.items(), key=lambda kv: min(kv[1])):
        what = f"{tasks} tasks started" if not parts else str(tasks)
        parts.append(f"{what} on {_replicas(sorted(set(rids)))}")
    where = f"between log slots {d.agreed + 1} and {d.slot}" if d.agreed + 1 < d.slot else f"at log slot {d.slot}"
    last = f" (last scheduler call: {d.mine.last_call})" if d.mine.last_call else ""
    counts = f": {', '.join(parts)}" if len(groups) > 1 else ""
    return (
        f"the scheduler is not deterministic: replicas applied the same log but reached different states "
        f"{where}{last}{counts}. See the determinism rules in docs/tutorial.md"
    )


def _replicas(rids: list[int]) -> str:
    if len(rids) == 1:
        return f"replica {rids[0]}"
    return "replicas " + ", ".join(str(r) for r in rids[:-1]) + f" and {rids[-1]}"
