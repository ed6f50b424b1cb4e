"""Leader election's clocks and counts: when to campaign, and whether a pre-vote has won.

Theory of operation.  A follower that hears nothing from a leader for a
randomized election timeout (drawn from ``[t, 2t)``) first asks its peers
(PreVote) whether they also lost the leader; only with a majority's support
does it bump its ballot and run phase 1.  A replica that was cut off and
comes back is refused by peers that still hear the leader, so it cannot
depose it.  A new ballot's round is above every round this replica has seen
(in any message or on its own disk), so it outranks them all.

:class:`Election` keeps the timer, the highest round seen and the pre-vote
tally; the core (``PaxosCore``) decides what to send and when roles change.
"""

from __future__ import annotations

import random

import attrs

from tasksprint.paxos.messages import PreVoteReply


@attrs.define(eq=False)
class Election:
    """One replica's election timer, highest round seen and pre-vote tally (times in seconds of the core's clock)."""

    _timeout: float  # the minimum election timeout
    _quorum: int
    _rng: random.Random
    #: The highest ballot round seen anywhere; a new ballot goes above it.
    max_round: int = 0
    #: When a leader (or a candidate this replica promised) was last heard.
    last_contact: float = 0.0
    #: Candidate: when to send Prepare again to those who have not answered.
    retry_at: float = 0.0
    _deadline: float = 0.0
    _prevote_round: int = 0
    _prevotes: set[int] = attrs.Factory(set)

    def reset_timer(self, now: float) -> None:
        """Wait a new randomized election timeout from ``now``."""
        t = self._timeout
        self._deadline = now + t + self._rng.random() * t

    def is_expired(self, now: float) -> bool:
        """Whether the election timeout has passed without news."""
        return now >= self._deadline

    def is_leader_lost(self, now: float) -> bool:
        """Whether no leader was heard for a whole (minimum) election timeout."""
        return now - self.last_contact >= self._timeout

    def saw_round(self, round_: int) -> None:
        self.max_round = max(self.max_round, round_)

    def heard_leader(self, round_: int, now: float) -> None:
        """A message from the leader of a ballot of ``round_``: it is alive, wait again."""
        self.saw_round(round_)
        self.last_contact = now
        self.reset_timer(now)

    def next_round(self, promised_round: int) -> int:
        """The round of this replica's next ballot: above everything seen and promised."""
        return max(self.max_round, promised_round) + 1

    def start_prevote(self, rid: int, promised_round: int, now: float) -> int:
        """Begin a pre-vote (counting our own support); returns the round to ask about."""
        self.reset_timer(now)
        self._prevote_round = self.next_round(promised_round)
        self._prevotes = {rid}
        return self._prevote_round

    def count_prevote(self, src: int, msg: PreVoteReply) -> bool:
        """Count ``src``'s answer to the current pre-vote; True once a majority supports it."""
        if msg.round != self._prevote_round or not msg.granted:
            return False
        self._prevotes.add(src)
        return len(self._prevotes) >= self._quorum
