"""The leader's records: a candidate's phase-1 tally and a leader's phase-2 pipeline.

:class:`Phase1` gathers the Promises for one ballot and works out which slots
are chosen and which values must be proposed again (the highest-ballot rule);
:class:`Leadership` exists while a replica leads: the slots in flight with
their acknowledgements, the commands waiting for a slot, when each peer was
last heard (check-quorum) and which peers still need the commit index.  The
role that uses them is ``leader.py``.
"""

from __future__ import annotations

from collections import deque

import attrs

from tasksprint.codec import encode
from tasksprint.paxos.messages import (
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


@attrs.define(eq=False)
class Phase1:
    """Promises gathered by a candidate for ``ballot``."""

    ballot: Ballot
    from_slot: int
    _promises: dict[int, Promise] = attrs.Factory(dict)

    def add(self, rid: int, promise: Promise) -> None:
        self._promises[rid] = promise

    def has(self, rid: int) -> bool:
        return rid in self._promises

    @property
    def count(self) -> int:
        return len(self._promises)

    def outcome(self) -> tuple[dict[int, Batch], dict[int, Batch], int]:
        """(chosen slots, values to re-propose, top slot in use) from the promises.

        For a slot reported accepted by several acceptors the value with the
        highest ballot wins: that is the rule that makes Paxos safe.
        """
        chosen: dict[int, Batch] = {}
        best: dict[int, AcceptedValue] = {}
        top = self.from_slot - 1
        for promise in self._promises.values():
            for p in promise.chosen:
                if p.slot >= self.from_slot:
                    chosen[p.slot] = p.value
                    top = max(top, p.slot)
            for a in promise.accepted:
                if a.slot < self.from_slot:
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
    next_heartbeat: float = 0.0
    next_tick: float = 0.0
    # Peers the commit index moved for and no Accept has told yet: heartbeat
    # them at the next tick.
    notify: set[int] = attrs.Factory(set)

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


def _size(item: Command | CommandBlock | Tick) -> int:
    """About how many bytes ``item`` takes in a slot value."""
    if isinstance(item, CommandBlock):
        return len(item.ops) + 64
    if isinstance(item, Tick):
        return 64 if item.data is None else 64 + len(encode(item.data))
    return len(encode(item))
