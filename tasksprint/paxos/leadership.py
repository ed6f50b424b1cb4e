"""The leader's records: a candidate's phase-1 tally and a leader's phase-2 pipeline.

:class:`Phase1` gathers the Promises for one ballot and works out which slots
are chosen and which values must be proposed again (the highest-ballot rule);
:class:`Leadership` exists while a replica leads: the slots in flight with
their acknowledgements, the commands waiting for a slot, when each peer was
last heard (check-quorum) and which peers still need the commit index.  The
role that uses them is ``leader.py``.
"""

from __future__ import annotations

import math
from collections import deque

import attrs

from tasksprint.codec import encode
from tasksprint.paxos.messages import (
    LAST_SLOT,
    NOOP,
    AcceptedValue,
    Ballot,
    Batch,
    Command,
    CommandBlock,
    Promise,
    Proposal,
    Tick,
)

#: Promise parts a candidate keeps from one acceptor; beyond this it starts
#: over with that acceptor's newest part (its retried Prepare gets a fresh set).
MAX_PROMISE_PARTS = 4096


@attrs.define(eq=False)
class Phase1:
    """Promises gathered by a candidate for ``ballot``.

    A Promise may arrive in parts (see :class:`~tasksprint.paxos.messages.Promise`):
    an acceptor counts only once the spans of its parts cover every slot from
    ``from_slot`` on.  Parts of different answers of the same acceptor (a
    Prepare sent again) may be mixed: each is a true report, made after the
    promise, for the slots of its span, and the highest-ballot rule below
    holds per slot.
    """

    ballot: Ballot
    from_slot: int
    _parts: dict[int, list[Promise]] = attrs.Factory(dict)
    _complete: set[int] = attrs.Factory(set)

    def add(self, rid: int, promise: Promise) -> None:
        """Record ``promise`` (whole or a part) from acceptor ``rid``."""
        if rid in self._complete:
            return
        parts = self._parts.setdefault(rid, [])
        if len(parts) >= MAX_PROMISE_PARTS:
            parts.clear()
        parts.append(promise)
        if _covers(parts, self.from_slot):
            self._complete.add(rid)

    def has(self, rid: int) -> bool:
        """Whether acceptor ``rid``'s whole answer is here."""
        return rid in self._complete

    @property
    def count(self) -> int:
        """Acceptors whose whole answer is here."""
        return len(self._complete)

    def outcome(self) -> tuple[dict[int, Batch], dict[int, Batch], int]:
        """(chosen slots, values to re-propose, top slot in use) from the promises.

        For a slot reported accepted by several acceptors the value with the
        highest ballot wins: that is the rule that makes Paxos safe.  Only the
        acceptors whose answer is whole count, and a part counts only for the
        slots of its span.
        """
        chosen: dict[int, Batch] = {}
        best: dict[int, AcceptedValue] = {}
        top = self.from_slot - 1
        promises = [part for rid in sorted(self._complete) for part in self._parts[rid]]
        for promise in promises:
            lo = max(self.from_slot, promise.span_from)
            for p in promise.chosen:
                if lo <= p.slot <= promise.span_to:
                    chosen[p.slot] = p.value
                    top = max(top, p.slot)
            for a in promise.accepted:
                if not lo <= a.slot <= promise.span_to:
                    continue
                top = max(top, a.slot)
                cur = best.get(a.slot)
                if cur is None or a.ballot > cur.ballot:
                    best[a.slot] = a
        repropose: dict[int, Batch] = {}
        for slot in range(self.from_slot, top + 1):
            if slot in chosen:
                continue
            a = best.get(slot)
            repropose[slot] = a.value if a is not None else NOOP
        return chosen, repropose, top


@attrs.define(eq=False)
class InFlight:
    """A slot in phase 2: its value, who accepted it, when it was last sent."""

    value: Batch
    sent_at: float
    acks: set[int] = attrs.Factory(set)
    # Peers sent the leader's own acceptance of it (three replicas): once they
    # accept it too they know it is chosen, without a commit notice.
    paired: frozenset[int] = frozenset()


@attrs.define(eq=False)
class Leadership:
    """State that exists only while this replica leads with ``ballot``."""

    ballot: Ballot
    next_slot: int
    phase1_top: int
    inflight: dict[int, InFlight] = attrs.Factory(dict)
    pending: deque[Command | CommandBlock | Tick] = attrs.Factory(deque)
    # Last time each peer answered anything at this ballot (check-quorum).
    heard: dict[int, float] = attrs.Factory(dict)
    # When each peer was last sent an Accept or a Heartbeat at this ballot:
    # the regular heartbeat skips a peer told within its interval.
    told: dict[int, float] = attrs.Factory(dict)
    next_heartbeat: float = 0.0
    next_tick: float = 0.0
    # When a command (not a TICK) last joined ``pending``, and until when a
    # TICK alone in ``pending`` waits for one to share its slot.
    last_command: float = -math.inf
    tick_hold_until: float = -math.inf
    # Peers the commit index moved for and no Accept has told yet: heartbeat
    # them at the next tick.
    notify: set[int] = attrs.Factory(set)
    # The peers the latest Accept went to: a majority's worth at light load
    # (a thrifty Accept), every peer otherwise.
    asked: tuple[int, ...] = ()

    def open_slot(self, value: Batch, now: float) -> int:
        slot = self.next_slot
        self.next_slot += 1
        self.inflight[slot] = InFlight(value, now)
        return slot

    def add_slot(self, slot: int, value: Batch, now: float) -> None:
        """Re-propose ``value`` in an existing slot (after phase 1)."""
        assert slot < self.next_slot, "re-proposals are for slots phase 1 found in use"
        self.inflight[slot] = InFlight(value, now)

    def take_batch(self, max_items: int, max_bytes: int) -> Batch | None:
        """The next slot value: pending items, at most ``max_items`` and about ``max_bytes``.

        The byte bound keeps an Accept far below the frame cap; an item bigger
        than it goes alone.
        """
        if not self.pending:
            return None
        items: list[Command | CommandBlock | Tick] = []
        size = 0
        while self.pending and len(items) < max_items:
            size += _size(self.pending[0])
            if items and size > max_bytes:
                break
            items.append(self.pending.popleft())
        return Batch(items=tuple(items))

    def stale(self, now: float, age: float) -> list[Proposal]:
        """Slots in flight for longer than ``age``: to send again (messages may be lost)."""
        out = []
        for slot, f in sorted(self.inflight.items()):
            if now - f.sent_at >= age:
                f.sent_at = now
                out.append(Proposal(slot=slot, value=f.value))
        return out


def _covers(parts: list[Promise], from_slot: int) -> bool:
    """Whether the spans of ``parts`` cover every slot from ``from_slot`` on."""
    need = from_slot  # the lowest slot not covered yet
    for part in sorted(parts, key=lambda p: p.span_from):
        if part.span_from > need:
            return False
        need = max(need, part.span_to + 1)
        if need > LAST_SLOT:
            return True
    return False


def _size(item: Command | CommandBlock | Tick) -> int:
    """About how many bytes ``item`` takes in a slot value."""
    if isinstance(item, CommandBlock):
        return len(item.ops) + 64
    if isinstance(item, Tick):
        return 64 if item.data is None else 64 + len(encode(item.data))
    return len(encode(item))
