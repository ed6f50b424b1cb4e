"""What every part of a replica's Paxos core shares: its configuration, its role, its fields.

:class:`CoreBase` holds one replica's protocol state (the acceptor, the
learner, the election clocks, the leader's records while it leads or
campaigns, and the output buffer) and the few helpers every role uses: send,
broadcast, hold a reply until its records are durable, learn a chosen value,
and fall back to following.  The roles build on it: the leader's side
(campaign, phase 1, phase 2, heartbeats, proposals) is
:class:`~tasksprint.paxos.leader.LeaderRole`, and
:class:`~tasksprint.paxos.core.PaxosCore` adds the driver's interface, the
follower's side and recovery.  Like everything in ``paxos/``, no I/O.
"""

from __future__ import annotations

import enum
import random
from typing import Any

import attrs

from tasksprint.paxos.acceptor import Acceptor
from tasksprint.paxos.durable import SaveChosen
from tasksprint.paxos.early_learning import EarlyLearner
from tasksprint.paxos.election import Election
from tasksprint.paxos.leadership import Leadership, Phase1
from tasksprint.paxos.learner import Learner
from tasksprint.paxos.messages import Ballot, Batch, Command, CommandBlock, Tick
from tasksprint.paxos.output import OutputBuffer
from tasksprint.paxos.recovery import Recovery

__all__ = ["CoreBase", "PaxosConfig", "Role"]


class Role(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # running phase 1
    LEADER = "leader"
    RECOVERING = "recovering"  # empty data directory: learner only until safe to vote


@attrs.frozen(kw_only=True)
class PaxosConfig:
    """Protocol parameters; times are seconds of the driver's clock."""

    replicas: int
    heartbeat_interval: float = 0.03
    # Minimum; each wait is drawn from [t, 2t).  It grows with the measured
    # gaps between a leader's messages (see election.py), so it can be short.
    election_timeout: float = 0.15
    tick_interval: float = 0.1  # leader TICK entries
    max_inflight: int = 32  # slots in phase 2 at once
    max_batch: int = 2048  # items (commands, blocks, ticks) per slot
    max_batch_bytes: int = 4 * 1024 * 1024  # about this many bytes per slot value, so Accepts stay small frames
    catchup_batch: int = 256  # chosen entries per CatchupReply
    keep_after_snapshot: int = 512  # log entries kept behind a snapshot for lagging peers

    def __attrs_post_init__(self) -> None:
        if self.replicas not in (1, 3, 5, 7):
            raise ValueError(f"replicas must be 1, 3, 5 or 7, got {self.replicas}")
        if not 0 < self.heartbeat_interval < self.election_timeout:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}s) must be positive and below "
                f"election_timeout ({self.election_timeout}s)"
            )
        if self.tick_interval <= 0:
            raise ValueError(f"tick_interval must be positive, got {self.tick_interval}")
        for name in ("max_inflight", "max_batch", "max_batch_bytes", "catchup_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def quorum(self) -> int:
        return self.replicas // 2 + 1


@attrs.define(eq=False)
class CoreBase:
    """One replica's protocol state and the helpers its roles share."""

    _config: PaxosConfig
    _rid: int
    _rng: random.Random
    _now: float = 0.0
    _role: Role = Role.FOLLOWER
    _acceptor: Acceptor = attrs.Factory(Acceptor)
    _learner: Learner = attrs.Factory(Learner)
    # Election and leadership.
    _leader_ballot: Ballot | None = None  # the leader we follow, if any
    _leader_commit: int = 0
    _election: Election = attrs.Factory(
        lambda self: Election(self._config.election_timeout, self._config.quorum, self._rng), takes_self=True
    )
    _phase1: Phase1 | None = None
    _lead: Leadership | None = None
    # Commands a leader had not yet slotted when it re-ran phase 1.
    _carry: list[Command | CommandBlock | Tick] = attrs.Factory(list)
    _forward: list[Command | CommandBlock | Tick] = attrs.Factory(list)
    _catchup_sent: float = -1e9
    # A candidate too far behind to lead asks its promiser for the slots it
    # truncated (see _deliver_promise): that peer's snapshot is taken too.
    _snapshot_peer: int | None = None
    _tick_data: Any = None
    _wall: float = 0.0
    _recovery: Recovery | None = None  # set by restore()
    _output: OutputBuffer = attrs.Factory(OutputBuffer)
    # A follower's and its leader's durable acceptances, paired (three replicas; see early_learning.py).
    _early: EarlyLearner = attrs.Factory(EarlyLearner)

    @property
    def leader_hint(self) -> int | None:
        """Replica id of the leader as far as this replica knows."""
        if self._role is Role.LEADER:
            return self._rid
        if self._leader_ballot is not None and self._now - self._election.last_contact < 2 * self._election.timeout:
            return self._leader_ballot.rid
        return None

    # ------------------------------------------------------------------
    # Helpers

    def _send(self, dst: int, msg: Any) -> None:
        self._output.send(dst, msg)

    def _peers(self) -> list[int]:
        """Every other replica, in id order."""
        return [r for r in range(self._config.replicas) if r != self._rid]

    def _broadcast(self, msg: Any) -> None:
        for dst in self._peers():
            self._output.send(dst, msg)

    def _reply_durable(self, dst: int, msg: Any) -> None:
        """Queue a reply that must not leave before the records queued so far are durable."""
        self._output.reply_durable(dst, msg)

    def _reset_election_timer(self) -> None:
        self._election.reset_timer(self._now)

    def _heard_leader(self, ballot: Ballot) -> None:
        if self._leader_ballot is None or ballot >= self._leader_ballot:
            self._leader_ballot = ballot
        self._election.heard_leader(ballot.round, self._now)

    def _become_follower(self) -> None:
        if self._role is Role.RECOVERING:
            return
        if self._lead is not None:
            self._carry.extend(self._lead.pending)
        if self._leader_ballot is not None and self._leader_ballot.rid == self._rid:
            # We no longer lead with our own ballot: there is no leader we know of
            # (proposals would otherwise be forwarded to ourselves, and lost).
            self._leader_ballot = None
        self._role = Role.FOLLOWER
        self._phase1 = None
        self._lead = None
        self._reset_election_timer()

    def _learn(self, slot: int, value: Batch) -> None:
        """Record that ``value`` is chosen for ``slot``."""
        if self._learner.learn(slot, value):
            self._acceptor.forget(slot)
            self._output.persist((SaveChosen(slot, value),))

    def _advance_commit(self) -> None:
        self._learner.advance_commit()

    @property
    def _commit(self) -> int:
        return self._learner.commit
