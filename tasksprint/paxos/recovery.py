"""Recovery of a replica with an empty data directory: when it may vote again.

Theory of operation.  A replica whose data directory holds no initialized
state may have forgotten promises it made.  It neither votes nor accepts
until it has (1) learned from a majority of the other replicas the highest
ballot B they promised (its *floor*), (2) seen a leader with a ballot above B
finish phase 1, and (3) caught up its chosen log to that leader's phase-1 top
slot (its *target*).  Every value its forgotten votes could have helped
choose is then in its chosen log (docs/architecture.md gives the argument).
It keeps asking (RecoverQuery) until such a leader shows up, since its
question is what makes the leader run phase 1 again.  If instead *every*
other replica answers that it never accepted nor learned anything, the
cluster is new: the replica promises the highest ballot they report and
starts at once.  A majority would not do: a candidate outside it could hold
a promise the asking replica forgot.

:class:`Recovery` holds the asking replica's side (queries, replies, floor,
target) and the leader's memory of which queries it already answered with a
new phase 1.  It decides; the core acts (persists the floor, changes role).
"""

from __future__ import annotations

import enum
import random

import attrs

from tasksprint.paxos.messages import Ballot, RecoverQuery, RecoverReply


class Verdict(enum.Enum):
    """What a RecoverReply taught the recovering replica."""

    NOTHING_YET = "nothing_yet"
    NEW_CLUSTER = "new_cluster"  # every other replica is empty: start now, above the floor
    FLOOR_KNOWN = "floor_known"  # a majority answered: the floor is known, wait for a leader above it


@attrs.define(eq=False)
class Recovery:
    """One replica's recovery state (idle unless it started with an empty data directory)."""

    _replicas: int
    _quorum: int
    _nonce: int = 0
    # Nonces above this one were drawn in this life: their replies describe
    # the others after our disk was lost, whichever query they answer.
    _nonce_base: int = 0
    _replies: dict[int, RecoverReply] = attrs.Factory(dict)
    _floor: Ballot | None = None
    _target: int | None = None
    _query_at: float = -1e9
    # Leader side: queries (replica, nonce) already answered with a new phase 1.
    _bumped_for: set[tuple[int, int]] = attrs.Factory(set)

    @classmethod
    def for_life(cls, replicas: int, quorum: int, rng: random.Random) -> Recovery:
        """A fresh state for one life of the process.

        Nonces must not repeat across lives: a reply to a query sent before a
        crash (and a wipe) must never count as describing the cluster after it.
        """
        base = rng.getrandbits(48) << 16
        return cls(replicas, quorum, nonce=base, nonce_base=base)

    @property
    def floor(self) -> Ballot | None:
        """The highest ballot a majority reported promising, once known."""
        return self._floor

    def next_query(self, now: float) -> RecoverQuery:
        """A new query to broadcast (its replies count once they arrive)."""
        # Also sent again once the floor is known, while no leader above it
        # shows up: the query is what asks the leader for a fresh phase 1,
        # and that request, or the leader's new ballot, can be lost or
        # overtaken.  Replies already collected stay valid: every query of
        # this life was sent after the disk was lost.
        self._query_at = now
        self._nonce += 1
        return RecoverQuery(nonce=self._nonce)

    def current_query(self, now: float) -> RecoverQuery:
        """The query last broadcast (a new one if none was), to send again to a peer that may have missed it."""
        if self._nonce == self._nonce_base:
            return self.next_query(now)
        return RecoverQuery(nonce=self._nonce)

    def query_due(self, now: float, interval: float, leader: Ballot | None) -> bool:
        """Whether to ask again: no leader above the floor is known and ``interval`` has passed."""
        waiting = self._floor is None or leader is None or leader <= self._floor
        return waiting and now - self._query_at >= interval

    def on_reply(self, src: int, msg: RecoverReply) -> Verdict:
        """Count replica ``src``'s answer; after NEW_CLUSTER or FLOOR_KNOWN, :attr:`floor`-based steps follow."""
        if self._floor is not None:
            return Verdict.NOTHING_YET
        if not self._nonce_base < msg.nonce <= self._nonce:
            return Verdict.NOTHING_YET  # answers a query of an earlier life
        self._replies[src] = msg
        replies = list(self._replies.values())
        if all(r.empty for r in replies):
            # The cluster is new only if *every* other replica says it never
            # accepted or learned anything: then no value our forgotten votes
            # helped choose can exist (its leader accepted it too).  A
            # majority is not enough: a candidate outside it may hold our
            # forgotten promise, and complete phase 1 with it while we vote
            # for a lower ballot; with everyone's answer the floor covers it.
            if len(replies) == self._replicas - 1:
                return Verdict.NEW_CLUSTER
            return Verdict.NOTHING_YET
        if len(replies) < self._quorum:
            return Verdict.NOTHING_YET
        self._floor = self.highest_promise()
        return Verdict.FLOOR_KNOWN

    def highest_promise(self) -> Ballot:
        """The highest ballot promised among the replies so far (at least one)."""
        return max(r.promised for r in self._replies.values())

    def heard_leader(self, ballot: Ballot, phase1_top: int) -> None:
        """A heartbeat of ``ballot``: a leader above the floor sets the slot to catch up to."""
        self._target = phase1_top if self._floor is not None and ballot > self._floor else None

    def is_complete(self, leader: Ballot | None, commit: int) -> bool:
        """Whether a leader above the floor finished phase 1 and our chosen log reaches its top slot."""
        return (
            self._floor is not None
            and self._target is not None
            and leader is not None
            and leader > self._floor
            and commit >= self._target
        )

    def finish(self) -> None:
        """The replica votes again; nothing of this life's recovery matters any more."""
        self._floor = None
        self._target = None

    def note_rerun_request(self, src: int, nonce: int) -> bool:
        """Leader side: record that query ``nonce`` of ``src`` asks for a new phase 1; True the first time only."""
        if (src, nonce) in self._bumped_for:
            return False
        self._bumped_for.add((src, nonce))
        return True
