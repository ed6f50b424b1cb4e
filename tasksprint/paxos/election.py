"""Leader election's clocks and counts: when to campaign, and whether a pre-vote has won.

Theory of operation.  A follower that hears nothing from a leader for a
randomized election timeout (drawn from ``[t, 2t)``) first asks its peers
(PreVote) whether they also lost the leader; only with a majority's support
does it bump its ballot and run phase 1.  A replica that was cut off and
comes back is refused by peers that still hear the leader, so it cannot
depose it.  A new ballot's round is above every round this replica has seen
(in any message or on its own disk), so it outranks them all.

The minimum ``t`` adapts to the network: it is the configured minimum or
:data:`GAP_FACTOR` times the longest gap between two messages of the same
leader seen in the last two windows of :data:`GAP_WINDOW` seconds, whichever
is larger.  On a quiet loopback the gaps are the heartbeat interval and the
configured minimum holds (fast failover); when heartbeats arrive late
(delay, loss and TCP retransmission, a stalled host) the timeout grows with
the measured gaps (up to :data:`GAP_CAP` times the configured minimum;
longer gaps are outages and not counted), so slow links do not start elections.  A gap that spans
a change of leader is not a heartbeat gap and is not counted.  A pre-vote
that has not won is asked again every ``retry`` seconds while the leader
stays lost, so one early refusal does not cost a whole new timeout.

A leader's process that exits closes its connections; a follower that sees
its leader's connection close counts the leader lost at once
(:meth:`Election.lose_leader`) and asks for the pre-vote without waiting for
the timeout.  The pre-vote guard stays: peers grant it only if they too lost
the leader.  A pre-vote still out when this replica promises another
candidate's ballot is dropped (:meth:`Election.cancel_prevote`): with every
follower campaigning at the same moment, a late grant must not start a
second campaign against the candidate just promised.

:class:`Election` keeps the timer, the highest round seen and the pre-vote
tally; the core (``PaxosCore``) decides what to send and when roles change.
"""

from __future__ import annotations

import math
import random

import attrs

from tasksprint.paxos.messages import PreVoteReply

GAP_FACTOR = 2.0  # the timeout is at least this many times the longest recent leader gap
GAP_WINDOW = 2.0  # seconds per window of gap measurements (the last two windows count)
GAP_CAP = 4.0  # the timeout stretches to at most this many times the configured one; longer gaps are outages


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
    #: When this replica began campaigning since it last heard a leader (inf: it is not campaigning).
    campaign_since: float = math.inf
    #: Candidate: when to send Prepare again to those who have not answered.
    retry_at: float = 0.0
    #: Follower with a pre-vote out: when to ask again (inf: none out).
    prevote_retry_at: float = math.inf
    _deadline: float = 0.0
    _prevote_round: int = 0
    _prevotes: set[int] = attrs.Factory(set)
    # Longest leader gap in the current and the previous window, the current
    # window's start, and the round of the leader last heard (gaps across a
    # change of leader are not counted).
    _gap_now: float = 0.0
    _gap_prev: float = 0.0
    _gap_since: float = 0.0
    _heard_round: int = 0

    @property
    def timeout(self) -> float:
        """The current minimum election timeout: configured, or stretched by the measured gaps."""
        stretched = min(GAP_FACTOR * max(self._gap_now, self._gap_prev), GAP_CAP * self._timeout)
        return max(self._timeout, stretched)

    def note_gap(self, gap: float, now: float) -> None:
        """A gap of ``gap`` seconds between two messages of one leader (or, at a leader, of one follower).

        A gap over ``GAP_CAP`` timeouts is an outage (a partition, a paused
        process), not the network's jitter: it is not counted.
        """
        if gap > GAP_CAP * self._timeout:
            return
        if now - self._gap_since >= GAP_WINDOW:
            # A window with no message at all leaves nothing to remember.
            self._gap_prev = self._gap_now if now - self._gap_since < 2 * GAP_WINDOW else 0.0
            self._gap_now = 0.0
            self._gap_since = now
        self._gap_now = max(self._gap_now, gap)

    def reset_timer(self, now: float) -> None:
        """Wait a new randomized election timeout from ``now``."""
        t = self.timeout
        self._deadline = now + t + self._rng.random() * t

    def is_expired(self, now: float) -> bool:
        """Whether the election timeout has passed without news."""
        return now >= self._deadline

    def is_leader_lost(self, now: float) -> bool:
        """Whether no leader was heard for a whole (minimum) election timeout."""
        return now - self.last_contact >= self.timeout

    def lose_leader(self, now: float) -> None:
        """The leader is gone for sure (its process closed its connection): lost from now on, no timeout to wait."""
        self.last_contact = -math.inf
        self._deadline = now

    def no_leader_yet(self) -> None:
        """A new cluster: no leader was ever heard, so the leader counts as lost (pre-votes are granted) at once.

        The timer is left alone: only the first candidate skips it (see ``PaxosCore``).
        """
        self.last_contact = -math.inf

    def is_fresh_campaign(self, now: float) -> bool:
        """Whether this replica began campaigning less than a (minimum) election timeout ago."""
        return math.isfinite(self.campaign_since) and now - self.campaign_since < self.timeout

    def saw_round(self, round_: int) -> None:
        self.max_round = max(self.max_round, round_)

    def heard_leader(self, round_: int, now: float) -> None:
        """A message from the leader of a ballot of ``round_``: it is alive, wait again."""
        self.saw_round(round_)
        if round_ == self._heard_round and self.last_contact > 0:
            self.note_gap(now - self.last_contact, now)
        self._heard_round = round_
        self.last_contact = now
        self.campaign_since = math.inf
        self.prevote_retry_at = math.inf
        self.reset_timer(now)

    def next_round(self, promised_round: int) -> int:
        """The round of this replica's next ballot: above everything seen and promised."""
        return max(self.max_round, promised_round) + 1

    def start_prevote(self, rid: int, promised_round: int, now: float, retry: float) -> int:
        """Begin a pre-vote (counting our own support); returns the round to ask about."""
        self.reset_timer(now)
        if self.campaign_since == math.inf:
            self.campaign_since = now
        self._prevote_round = self.next_round(promised_round)
        self._prevotes = {rid}
        self.prevote_retry_at = now + retry
        return self._prevote_round

    def retry_prevote(self, now: float, retry: float) -> int:
        """Ask again for the pre-vote still out; returns its round."""
        self.prevote_retry_at = now + retry
        return self._prevote_round

    def cancel_prevote(self) -> None:
        """Drop the pre-vote out (we promised another candidate): late grants no longer start a campaign."""
        self._prevote_round = 0
        self._prevotes = set()
        self.prevote_retry_at = math.inf

    def count_prevote(self, src: int, msg: PreVoteReply) -> bool:
        """Count ``src``'s answer to the current pre-vote; True once a majority supports it."""
        if msg.round != self._prevote_round or not msg.granted or not self._prevotes:
            return False
        self._prevotes.add(src)
        return len(self._prevotes) >= self._quorum
