"""What a replica keeps on disk, as values the core emits and storage applies.

The core never writes anything itself: each :class:`~tasksprint.paxos.core.Ready`
carries a list of these records, and the driver must make all of them durable
(one transaction, one fsync) before it calls ``advance``.  Replies that depend
on them are held back by the core until then.
"""

from __future__ import annotations

from typing import Any

import attrs

from tasksprint.paxos.messages import ZERO_BALLOT, Ballot, Batch


@attrs.frozen
class SavePromise:
    """The acceptor's promised ballot (it only grows)."""

    ballot: Ballot


@attrs.frozen
class SaveAccepted:
    """The acceptor accepted ``value`` for ``slot`` at ``ballot`` (replaces an older acceptance)."""

    slot: int
    ballot: Ballot
    value: Batch


@attrs.frozen
class SaveChosen:
    """``value`` is chosen for ``slot``; it never changes again."""

    slot: int
    value: Batch


@attrs.frozen
class SaveSnapshot:
    """The applied state after slot ``index``; log rows at or below ``truncate_upto`` may go."""

    index: int
    data: bytes
    truncate_upto: int


@attrs.frozen
class MarkInitialized:
    """This replica's acceptor state is complete (fresh cluster, or recovery after a wiped
    disk has finished). A data directory without it is never trusted to vote."""


Record = SavePromise | SaveAccepted | SaveChosen | SaveSnapshot | MarkInitialized


@attrs.frozen
class LogRow:
    """One slot as loaded from disk: the acceptance (if any) and whether it is chosen."""

    ballot: Ballot | None
    value: Batch
    chosen: bool


@attrs.define
class DurableState:
    """Everything a restarted replica reads back."""

    promised: Ballot = ZERO_BALLOT
    log: dict[int, LogRow] = attrs.Factory(dict)
    snapshot_index: int = 0
    snapshot_data: bytes | None = None
    initialized: bool = False

    def apply(self, records: list[Record]) -> None:
        """Apply records in order: the in-memory twin of what storage writes to disk."""
        for rec in records:
            match rec:
                case SavePromise(ballot=b):
                    assert b >= self.promised, "promised ballot must never decrease"
                    self.promised = b
                case SaveAccepted(slot=s, ballot=b, value=v):
                    row = self.log.get(s)
                    if row is None or not row.chosen:
                        self.log[s] = LogRow(b, v, False)
                case SaveChosen(slot=s, value=v):
                    row = self.log.get(s)
                    assert row is None or not row.chosen or row.value == v, f"slot {s} chosen twice"
                    self.log[s] = LogRow(row.ballot if row else None, v, True)
                case SaveSnapshot(index=i, data=d, truncate_upto=t):
                    if i >= self.snapshot_index:
                        self.snapshot_index, self.snapshot_data = i, d
                    for s in [s for s in self.log if s <= t]:
                        del self.log[s]
                case MarkInitialized():
                    self.initialized = True
                case _:
                    raise TypeError(f"not a durable record: {rec!r}")

    @property
    def empty(self) -> bool:
        return not self.initialized and self.promised == ZERO_BALLOT and not self.log and self.snapshot_index == 0


def describe(record: Any) -> str:
    return type(record).__name__
