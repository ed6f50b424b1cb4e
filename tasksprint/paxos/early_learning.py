"""How a follower of a three-replica cluster learns a slot is chosen without waiting for the commit index.

Theory of operation
-------------------
With three replicas a quorum is two acceptors.  When a leader's acceptance of
its own proposal is durable, it sends that ``Accepted`` to the followers it
asked, too (the same reply it counts for itself, released by the same
fsync).  A follower holding both its own durable acceptance of a slot at
ballot ``b`` and the ``Accepted`` of ``b``'s leader for that slot knows two
acceptors accepted the same value at the same ballot: the value is chosen
(Paxos needs nothing more), so it learns and applies it at once.  Otherwise
it would learn it from the commit index of the leader's next Accept or
heartbeat, a round trip later, and its report of the state it reached (the
digest a leader waits for before answering anyone, see
:mod:`tasksprint.digests`) would come a round trip later too.

The tally here only pairs the two halves; the core checks the acceptor still
holds the slot at that ballot before learning it.  Both tables hold slots not
yet known chosen, at most :data:`LIMIT` each (the oldest go first: a slot
missed here is learned from the commit index as before).  No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from tasksprint.paxos.messages import Ballot

__all__ = ["LIMIT", "EarlyLearner"]

LIMIT = 4096  # slots remembered per side


@attrs.define(eq=False)
class EarlyLearner:
    """Durable acceptances of this follower and of its leader, paired by slot and ballot."""

    _mine: dict[int, Ballot] = attrs.Factory(dict)
    _leader: dict[int, Ballot] = attrs.Factory(dict)

    def mine(self, ballot: Ballot, slots: Iterable[int]) -> list[int]:
        """This replica's acceptance of ``slots`` at ``ballot`` is durable: the slots the leader's matches."""
        return self._pair(self._mine, self._leader, ballot, slots)

    def leaders(self, ballot: Ballot, slots: Iterable[int]) -> list[int]:
        """The leader of ``ballot`` durably accepted ``slots``: the slots our own acceptance matches."""
        return self._pair(self._leader, self._mine, ballot, slots)

    def forget_upto(self, slot: int) -> None:
        """Slots up to ``slot`` are known chosen: nothing to pair there any more."""
        for table in (self._mine, self._leader):
            while table:
                first = next(iter(table))
                if first > slot:
                    break
                del table[first]

    def __len__(self) -> int:
        return len(self._mine) + len(self._leader)

    @staticmethod
    def _pair(own: dict[int, Ballot], other: dict[int, Ballot], ballot: Ballot, slots: Iterable[int]) -> list[int]:
        paired = []
        for slot in slots:
            if other.get(slot) == ballot:
                del other[slot]
                own.pop(slot, None)
                paired.append(slot)
            else:
                own.pop(slot, None)  # re-inserted last: the tables stay in arrival order
                own[slot] = ballot
                while len(own) > LIMIT:
                    del own[next(iter(own))]
        return paired
