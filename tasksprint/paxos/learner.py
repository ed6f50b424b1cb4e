"""The learner role: the values known chosen, the commit index, and what was handed out to apply.

Theory of operation.  A value is chosen for a slot once a majority of
acceptors accepted it at one ballot; a replica learns that from a leader's
commit index (for slots it accepted at that leader's ballot), from phase 1,
or from a peer's chosen entries (catch-up).  The commit index is the last
slot of the gap-free chosen prefix; slots up to it are handed to the driver
for applying, in order, exactly once (``take_committed``).  After a snapshot
of the applied state the log below it may be truncated, keeping a few
entries for peers that lag a little; a peer that lags more gets the snapshot.

Invariant: ``log_start - 1 <= emitted <= commit``, and every slot from
``log_start`` up to ``commit`` is in the chosen log.
"""

from __future__ import annotations

from collections.abc import Collection

import attrs

from tasksprint.codec import encode
from tasksprint.paxos.durable import DurableState
from tasksprint.paxos.messages import Batch, Proposal


@attrs.define(eq=False)
class Learner:
    """One replica's chosen log (slots >= ``log_start``) and snapshot."""

    _chosen: dict[int, Batch] = attrs.Factory(dict)
    _commit: int = 0
    _emitted: int = 0  # last slot handed to the driver for applying
    _log_start: int = 1
    _snapshot: tuple[int, bytes] | None = None

    @classmethod
    def restore(cls, state: DurableState) -> Learner:
        """The chosen log as storage loaded it."""
        learner = cls()
        if state.snapshot_data is not None:
            learner._snapshot = (state.snapshot_index, state.snapshot_data)
        learner._commit = learner._emitted = state.snapshot_index
        start = min(state.log, default=state.snapshot_index + 1)
        learner._log_start = max(1, min(start, state.snapshot_index + 1))
        for slot, row in sorted(state.log.items()):
            if row.chosen:
                learner._chosen[slot] = row.value
        learner.advance_commit()
        return learner

    # -- questions ----------------------------------------------------------

    @property
    def commit(self) -> int:
        """The last slot of the gap-free chosen prefix."""
        return self._commit

    @property
    def log_start(self) -> int:
        """The first slot still in the log (those below are in the snapshot)."""
        return self._log_start

    @property
    def snapshot(self) -> tuple[int, bytes] | None:
        """The latest snapshot (index, data), if any."""
        return self._snapshot

    @property
    def slots(self) -> Collection[int]:
        """The slots known chosen (a live view)."""
        return self._chosen.keys()

    def value(self, slot: int) -> Batch | None:
        return self._chosen.get(slot)

    def has_committed(self) -> bool:
        """Whether chosen slots wait to be handed out for applying."""
        return self._emitted < self._commit

    def is_empty(self) -> bool:
        """Whether nothing was ever learned (nor truncated)."""
        return not self._chosen and self._commit == 0 and self._log_start == 1

    def chosen_from(self, from_slot: int) -> tuple[Proposal, ...]:
        """Every chosen entry from ``from_slot`` on, in slot order."""
        return tuple(Proposal(slot=s, value=v) for s, v in sorted(self._chosen.items()) if s >= from_slot)

    def entries_from(self, from_slot: int, max_count: int, max_bytes: int) -> list[Proposal]:
        """Consecutive committed entries from ``from_slot`` (at least one if any), within both bounds."""
        entries: list[Proposal] = []
        slot = from_slot
        size = 0  # bytes so far: a reply stays far below the frame cap (a Batch keeps its encoding)
        while slot <= self._commit and len(entries) < max_count:
            value = self._chosen.get(slot)
            if value is None:
                break
            size += len(encode(value))
            if entries and size > max_bytes:
                break
            entries.append(Proposal(slot=slot, value=value))
            slot += 1
        return entries

    # -- changes ------------------------------------------------------------

    def learn(self, slot: int, value: Batch) -> bool:
        """Record that ``value`` is chosen for ``slot``; True if that is news (to persist)."""
        if slot < self._log_start or slot <= self._commit and slot in self._chosen:
            return False
        old = self._chosen.get(slot)
        if old is not None:
            assert old == value, f"slot {slot}: two different values chosen"
            return False
        self._chosen[slot] = value
        return True

    def advance_commit(self) -> None:
        while self._commit + 1 in self._chosen:
            self._commit += 1

    def take_committed(self, snapshot: tuple[int, bytes] | None) -> tuple[tuple[int, Batch], ...]:
        """The chosen slots to apply next, in order (after restoring ``snapshot``, if given)."""
        if snapshot is not None:
            self._emitted = max(self._emitted, snapshot[0])
        committed: list[tuple[int, Batch]] = []
        while self._emitted < self._commit:
            self._emitted += 1
            committed.append((self._emitted, self._chosen[self._emitted]))
        return tuple(committed)

    def compact(self, index: int, data: bytes, keep: int) -> int | None:
        """The state after applying ``index`` was snapshotted: the slot to truncate up to, or None if old news."""
        assert index <= self._emitted, "a snapshot can only cover applied slots"
        if self._snapshot is not None and index <= self._snapshot[0]:
            return None
        self._snapshot = (index, data)
        return max(self._log_start - 1, index - keep)

    def install(self, index: int, data: bytes) -> None:
        """A peer's snapshot after ``index`` replaces everything up to it (the caller truncates)."""
        self._snapshot = (index, data)
        self.truncate(index)
        self._commit = self._emitted = index
        self.advance_commit()

    def truncate(self, upto: int) -> range:
        """Forget slots up to ``upto``; returns the slots that left the log."""
        if upto < self._log_start:
            return range(0)
        for slot in [s for s in self._chosen if s <= upto]:
            del self._chosen[slot]
        gone = range(self._log_start, upto + 1)
        self._log_start = upto + 1
        return gone
