"""The acceptor role: promises and acceptances, the only state Paxos safety rests on.

An acceptor never answers before the state its answer reveals is durable.
It does not send anything itself: each handler returns the records to persist
and the reply, and the core releases the reply only after the driver has
made those records durable (see ``PaxosCore.advance``).
"""

from __future__ import annotations

from collections.abc import Collection

import attrs

from tasksprint.paxos.durable import Record, SaveAccepted, SavePromise
from tasksprint.paxos.messages import (
    ZERO_BALLOT,
    Accept,
    Accepted,
    AcceptedValue,
    Ballot,
    Batch,
    Nack,
    Prepare,
)


@attrs.define(eq=False)
class Acceptor:
    """Promised ballot and accepted values of the slots not yet known chosen."""

    _promised: Ballot = ZERO_BALLOT
    # slot -> (ballot, value); slots known chosen are dropped by the core.
    _accepted: dict[int, tuple[Ballot, Batch]] = attrs.Factory(dict)

    @property
    def promised(self) -> Ballot:
        return self._promised

    def accepted_at(self, slot: int) -> tuple[Ballot, Batch] | None:
        return self._accepted.get(slot)

    def accepted_from(self, from_slot: int) -> tuple[AcceptedValue, ...]:
        return tuple(
            AcceptedValue(slot=s, ballot=b, value=v) for s, (b, v) in sorted(self._accepted.items()) if s >= from_slot
        )

    def load(self, slot: int, ballot: Ballot, value: Batch) -> None:
        """Restore an acceptance read back from disk."""
        self._accepted[slot] = (ballot, value)

    def forget(self, slot: int) -> None:
        """The slot is chosen (or truncated); its acceptance no longer matters."""
        self._accepted.pop(slot, None)

    def raise_floor(self, ballot: Ballot) -> list[Record]:
        """Refuse every ballot below ``ballot`` from now on (used by recovery)."""
        if ballot > self._promised:
            self._promised = ballot
            return [SavePromise(ballot)]
        return []

    def on_prepare(self, msg: Prepare) -> tuple[bool, list[Record]]:
        """Phase 1b. Returns (granted, records to persist before the Promise goes out).

        A repeated Prepare of the ballot already promised is granted again, so
        a candidate whose Promise was lost can still complete phase 1.
        """
        if msg.ballot < self._promised:
            return False, []
        return True, self.raise_floor(msg.ballot)

    def on_accept(self, msg: Accept, chosen: Collection[int], log_start: int) -> tuple[Accepted | Nack, list[Record]]:
        """Phase 2b for every proposal in ``msg``.

        Slots already known chosen or truncated are acknowledged without
        rewriting them: a chosen slot's value never changes, so any leader
        proposing there proposes that same value.
        """
        if msg.ballot < self._promised:
            return Nack(ballot=msg.ballot, promised=self._promised), []
        records = self.raise_floor(msg.ballot)
        for p in msg.proposals:
            if p.slot < log_start or p.slot in chosen:
                continue
            self._accepted[p.slot] = (msg.ballot, p.value)
            records.append(SaveAccepted(p.slot, msg.ballot, p.value))
        return Accepted(ballot=msg.ballot, slots=tuple(p.slot for p in msg.proposals)), records
