"""A Multi-Paxos replica as a pure state machine: messages and ticks in, Ready out.

Theory of operation
-------------------
Every replica is an acceptor, a learner and a potential leader.  The core
never does I/O: the driver feeds it ``step(src, msg)``, ``tick(now)`` and
``propose(item)``, then drains ``ready()``:

1. ``ready.persist``: records to make durable in one transaction (fsync);
2. ``ready.messages``: (destination, message) pairs; these never depend on
   ``ready.persist`` so they may be sent while the fsync runs;
3. ``ready.snapshot`` (restore the state machine to it) and then
   ``ready.committed``: chosen slots to apply, in order.  These are chosen,
   i.e. durable on a majority, so a driver may apply them (and answer its
   clients) before its own fsync of ``ready.persist`` completes; after a
   crash it simply learns them again;
4. ``advance(ready)``: tells the core the records are durable.  Only then are
   the acceptor's replies that depend on them (Promise, Accepted,
   RecoverReply) released into the next Ready.  A reply can therefore never
   overtake the fsync that makes it true.

A driver may take further Readies before advancing earlier ones (several
writes in flight, merged into one fsync by a writer that finds them
queued), as long as it makes them durable in the order it took them and
advances them in that order: ``advance(ready)`` releases the replies held
by that Ready and by every earlier one.

Parts, one module each: the acceptor (``acceptor.py``) promises and
accepts; the leader's side (pre-vote, phase 1, phase 2, heartbeats,
forwarding of proposals) is ``leader.py``, over its records in
``leadership.py``; election timers, the highest round seen and the pre-vote
count are in ``election.py`` (a follower that loses its leader asks its
peers before it campaigns, so a replica that was cut off cannot depose a
healthy leader); the chosen log in ``learner.py``; a wiped replica's way back
to voting in ``recovery.py``; the output buffer that holds replies back until
their records are durable in ``output.py``.  The state the roles share is
``base.py``.  This class is the driver's interface, routes messages and ticks
to the roles, and holds the follower's side and recovery.

Learning: the leader piggybacks its commit index on Accept and Heartbeat.  A
follower marks a slot chosen when the leader's ballot equals the ballot at
which it accepted that slot; for anything else it asks for the chosen
entries (CatchupRequest), or receives a snapshot if those were truncated.
With three replicas a follower learns sooner, from its own durable
acceptance and the leader's (``early_learning.py``), so it may know more
chosen slots than its leader; pre-votes go only to candidates that know at
least as many (``LeaderRole._on_prevote``).

Candidates send Prepare only once their own promise is durable, so a ballot
in use is always known to its candidate (which a wiped replica's recovery
relies on).
"""

from __future__ import annotations

import math
import random
from typing import Any

import attrs

from tasksprint.paxos.acceptor import Acceptor
from tasksprint.paxos.base import PaxosConfig, Role
from tasksprint.paxos.durable import DurableState, MarkInitialized, SaveSnapshot
from tasksprint.paxos.leader import LeaderRole
from tasksprint.paxos.learner import Learner
from tasksprint.paxos.messages import (
    ZERO_BALLOT,
    Accept,
    Accepted,
    Ballot,
    Batch,
    CatchupReply,
    CatchupRequest,
    Command,
    CommandBlock,
    Forward,
    Heartbeat,
    HeartbeatAck,
    Nack,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    RecoverQuery,
    RecoverReply,
    SnapshotInstall,
    Tick,
    TimeoutNow,
)
from tasksprint.paxos.output import Ready
from tasksprint.paxos.recovery import Recovery, Verdict

#: The replica of a new cluster (every replica found empty) that campaigns as soon as it knows so.
FIRST_CANDIDATE = 0

# PaxosConfig and Role live in base.py, Ready in output.py; the driver takes them from here.
__all__ = ["PaxosConfig", "PaxosCore", "Ready", "Role"]


@attrs.define(eq=False)
class PaxosCore(LeaderRole):
    """One replica's protocol core: the driver's interface, the follower and recovery.

    See the module docstring for the contract; the fields are in :class:`~tasksprint.paxos.base.CoreBase`.
    """

    # ------------------------------------------------------------------
    # Construction

    @classmethod
    def restore(
        cls, config: PaxosConfig, rid: int, state: DurableState, *, rng: random.Random, now: float
    ) -> PaxosCore:
        """Build a replica from what its storage loaded (empty for a new or wiped disk)."""
        if not 0 <= rid < config.replicas:
            raise ValueError(f"replica id {rid} out of range for {config.replicas} replicas")
        core = cls(config, rid, rng, now)
        core._acceptor = Acceptor(state.promised)
        core._election.max_round = state.promised.round
        core._recovery = Recovery.for_life(config.replicas, config.quorum, rng)
        core._learner = Learner.restore(state)
        core._output.snapshot = core._learner.snapshot
        for slot, row in sorted(state.log.items()):
            if not row.chosen and row.ballot is not None:
                core._acceptor.load(slot, row.ballot, row.value)
            if row.ballot is not None:
                core._election.saw_round(row.ballot.round)
        core._reset_election_timer()
        if not state.initialized:
            core._role = Role.RECOVERING
            core._send_recover_query()
        return core

    # ------------------------------------------------------------------
    # Introspection

    @property
    def rid(self) -> int:
        return self._rid

    @property
    def role(self) -> Role:
        return self._role

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def log_start(self) -> int:
        return self._learner.log_start

    @property
    def promised(self) -> Ballot:
        return self._acceptor.promised

    @property
    def ballot(self) -> Ballot | None:
        """The ballot this replica leads or follows, if any."""
        if self._lead is not None:
            return self._lead.ballot
        return self._leader_ballot

    @property
    def electing(self) -> bool:
        """Whether this replica, without a leader, began campaigning less than an election timeout ago.

        A new leader is then expected soon: the driver holds the commands
        its clients submit meanwhile and proposes them once a leader is
        known, instead of sending the clients elsewhere.
        """
        return self._role in (Role.FOLLOWER, Role.CANDIDATE) and self._election.is_fresh_campaign(self._now)

    def chosen_value(self, slot: int) -> Batch | None:
        return self._learner.value(slot)

    # ------------------------------------------------------------------
    # Inputs

    def tick(self, now: float, tick_data: Any = None, wall: float | None = None) -> None:
        """Advance the clock.

        ``now`` drives timeouts (a monotonic clock); the next TICK the leader
        proposes carries ``wall`` (or ``now`` if not given) and ``tick_data``.
        """
        if now > self._now:
            self._now = now
        self._tick_data = tick_data
        self._wall = now if wall is None else wall
        match self._role:
            case Role.LEADER:
                self._leader_tick()
            case Role.CANDIDATE:
                self._candidate_tick()
            case Role.FOLLOWER:
                if self._election.is_expired(self._now):
                    self._start_prevote()
                elif self._now >= self._election.prevote_retry_at and self._election.is_leader_lost(self._now):
                    self._retry_prevote()
                self._maybe_catch_up()
            case Role.RECOVERING:
                if self._rec.query_due(self._now, self._config.heartbeat_interval * 4, self._leader_ballot):
                    self._send_recover_query()
                self._maybe_catch_up()

    def tick_due(self) -> float:
        """The clock time before which :meth:`tick` has nothing to do, so a driver may sleep until then.

        Known for a leader: its next heartbeat, its next TICK entry, a commit
        notice waiting (due at once) and check-quorum.  For the other roles
        it is the time of the last tick (their timers are left to the
        driver's own pace).  Only a question: ticking earlier is harmless.
        """
        if self._role is Role.LEADER and self._lead is not None:
            return self._leader_tick_due()
        return self._now

    def propose(self, item: Command | CommandBlock | Tick) -> bool:
        """Submit a command. False means no leader is known: the caller should retry later.

        Acceptance is no promise: the command may still be lost with a failed
        leader, so clients retry with the same sequence number until they see
        it applied.
        """
        if self._role is Role.LEADER:
            assert self._lead is not None
            self._lead.pending.append(item)
            if not isinstance(item, Tick):
                self._lead.last_command = self._now
            return True
        if self._role in (Role.FOLLOWER, Role.RECOVERING) and self.leader_hint is not None:
            self._forward.append(item)
            return True
        return False

    def hand_over(self) -> int | None:
        """This replica is going away: if it leads, ask a follower to take over at once.

        The follower heard from most recently gets ``TimeoutNow`` and runs
        phase 1 without waiting for an election timeout or a pre-vote; this
        replica stops leading (its pending commands are forwarded to the new
        leader once known).  Safety is phase 1's as always: the new leader
        learns every accepted value from a majority.  Returns the follower
        asked, or None if this replica does not lead.
        """
        if self._role is not Role.LEADER or self._lead is None or self._config.replicas == 1:
            return None
        lead = self._lead
        target = max(self._peers(), key=lambda r: (lead.heard.get(r, -math.inf), -r))
        self._send(target, TimeoutNow(ballot=lead.ballot))
        self._become_follower()
        return target

    def peer_closed(self, src: int) -> None:
        """The driver saw replica ``src`` close its connection to us (its process exited or restarted).

        If ``src`` is the leader this replica follows, the leader is lost
        now: the pre-vote starts at once instead of after an election
        timeout.  Nothing else changes: peers grant the pre-vote only if
        they too lost the leader (a connection that closed while the leader
        lives does not depose it), and a leader that speaks again is
        followed again.  A partition or a stalled host closes nothing, so
        the election timeout still covers those.
        """
        if not 0 <= src < self._config.replicas or src == self._rid:
            return
        leader = self._leader_ballot
        if self._role is not Role.FOLLOWER or leader is None or leader.rid != src:
            return
        self._election.lose_leader(self._now)
        self._start_prevote()

    def peer_connected(self, dst: int) -> None:
        """The driver's connection to replica ``dst`` is up (again).

        A recovering replica sends ``dst`` its current recovery query at once
        instead of at its next retry: what it sent before the connection was up
        was lost, and a new cluster starts only once every replica answered.
        The same query, not a new one: a leader re-runs phase 1 once per query.
        """
        if self._role is Role.RECOVERING and 0 <= dst < self._config.replicas and dst != self._rid:
            self._send(dst, self._rec.current_query(self._now))

    def compact(self, index: int, data: bytes) -> None:
        """The driver took a snapshot of the state after applying slot ``index``."""
        truncate = self._learner.compact(index, data, self._config.keep_after_snapshot)
        if truncate is None:
            return
        self._output.persist((SaveSnapshot(index, data, truncate),))
        self._truncate(truncate)

    def step(self, src: int, msg: Any) -> None:
        """Handle one message from replica ``src``."""
        if not 0 <= src < self._config.replicas or src == self._rid:
            return
        match msg:
            case PreVote():
                self._on_prevote(src, msg)
            case PreVoteReply():
                self._on_prevote_reply(src, msg)
            case Prepare():
                self._on_prepare(src, msg)
            case Promise():
                self._on_promise(src, msg)
            case Accept():
                self._on_accept(src, msg)
            case Accepted() if self._role is Role.FOLLOWER:
                self._on_leader_accepted(src, msg)
            case Accepted():
                self._on_accepted(src, msg)
            case Nack():
                self._on_nack(src, msg)
            case Heartbeat():
                self._on_heartbeat(src, msg)
            case HeartbeatAck():
                self._on_heartbeat_ack(src, msg)
            case CatchupRequest():
                self._on_catchup_request(src, msg)
            case CatchupReply():
                self._on_catchup_reply(src, msg)
            case SnapshotInstall():
                self._on_snapshot(src, msg)
            case Forward():
                if self._role is Role.LEADER:
                    assert self._lead is not None
                    self._lead.pending.extend(msg.items)
                    self._lead.last_command = self._now
            case RecoverQuery():
                self._on_recover_query(src, msg)
            case RecoverReply():
                self._on_recover_reply(src, msg)
            case TimeoutNow():
                self._on_timeout_now(src, msg)
            case _:
                pass  # not a peer message; the driver logs such things

    # ------------------------------------------------------------------
    # Output

    def has_ready(self) -> bool:
        """Whether :meth:`ready` has anything for the driver.  Only looks: changes nothing."""
        return self._output.has_output() or self._learner.has_committed() or self._proposals_due()

    def ready(self) -> Ready:
        """Collect everything the driver must do now. Call ``advance`` after doing it."""
        self._flush_proposals()
        return self._output.take(self._learner.take_committed(self._output.snapshot))

    def advance(self, ready: Ready) -> None:
        """``ready.persist`` and every earlier Ready's records are durable: release their replies."""
        for dst, msg in self._output.release(ready):
            if dst == self._rid:
                self._deliver_local(msg)
            else:
                self._output.send(dst, msg)

    # ------------------------------------------------------------------
    # Helpers

    def _truncate(self, upto: int) -> None:
        for slot in self._learner.truncate(upto):
            self._acceptor.forget(slot)

    def _maybe_catch_up(self) -> None:
        """Ask the leader for chosen entries we lack, at most once per heartbeat interval."""
        if self._leader_commit <= self._commit or self._leader_ballot is None:
            return
        if self._now - self._catchup_sent < self._config.heartbeat_interval:
            return
        self._catchup_sent = self._now
        self._send(self._leader_ballot.rid, CatchupRequest(from_slot=self._commit + 1))

    def _learn_commit(self, ballot: Ballot, commit: int) -> None:
        """The leader of ``ballot`` says slots up to ``commit`` are chosen."""
        if commit > self._leader_commit:
            self._leader_commit = commit
        slot = self._commit + 1
        while slot <= commit:
            if self._learner.value(slot) is None:
                acc = self._acceptor.accepted_at(slot)
                if acc is None or acc[0] != ballot:
                    break  # a gap we cannot fill from our own acceptances
                self._learn(slot, acc[1])
            slot += 1
        self._advance_commit()
        if self._early:
            self._early.forget_upto(self._commit)
        if self._commit < self._leader_commit:
            self._maybe_catch_up()
        if self._role is Role.RECOVERING:
            self._check_recovered()

    # ------------------------------------------------------------------
    # Follower

    def _on_prepare(self, src: int, msg: Prepare) -> None:
        if self._role is Role.RECOVERING:
            return  # we may have forgotten promises: no vote until recovered
        self._election.saw_round(msg.ballot.round)
        granted, records = self._acceptor.on_prepare(msg)
        if not granted:
            self._send(src, Nack(ballot=msg.ballot, promised=self._acceptor.promised))
            return
        if (
            self._lead is not None
            and msg.ballot > self._lead.ballot
            or (self._phase1 is not None and msg.ballot > self._phase1.ballot)
        ):
            self._become_follower()
        # Give the candidate time to finish before we compete with it.
        self._election.last_contact = self._now
        # A pre-vote of ours still out is stale now: a late grant must not
        # start a campaign against the candidate we just promised.
        self._election.cancel_prevote()
        self._reset_election_timer()
        self._output.persist(records)
        self._reply_durable(src, self._promise_for(msg))

    def _accept_leader(self, src: int, ballot: Ballot) -> bool:
        """A message from a would-be leader: follow it if its ballot is current."""
        if ballot < self._acceptor.promised:
            self._send(src, Nack(ballot=ballot, promised=self._acceptor.promised))
            return False
        if self._role in (Role.LEADER, Role.CANDIDATE):
            mine = self._lead.ballot if self._lead else self._phase1.ballot if self._phase1 else ZERO_BALLOT
            if ballot <= mine:
                return False
            self._become_follower()
        self._heard_leader(ballot)
        return True

    def _on_accept(self, src: int, msg: Accept) -> None:
        if self._role is Role.RECOVERING:
            if msg.ballot >= (self._leader_ballot or ZERO_BALLOT):
                self._heard_leader(msg.ballot)
            return
        if not self._accept_leader(src, msg.ballot):
            return
        reply, records = self._acceptor.on_accept(msg, self._learner.slots, self._learner.log_start)
        self._output.persist(records)
        self._reply_durable(src, reply)
        if self._config.quorum == 2 and isinstance(reply, Accepted):
            self._reply_durable(self._rid, reply)  # our acceptance, durable: see _learn_paired
        self._learn_commit(msg.ballot, msg.commit)

    def _on_leader_accepted(self, src: int, msg: Accepted) -> None:
        """The leader we follow durably accepted its own proposals (three replicas, see early_learning.py)."""
        if self._config.quorum != 2 or msg.ballot != self._leader_ballot or src != msg.ballot.rid:
            return
        self._learn_paired(msg.ballot, self._early.leaders(msg.ballot, msg.slots))

    def _on_heartbeat(self, src: int, msg: Heartbeat) -> None:
        if self._role is Role.RECOVERING:
            if self._leader_ballot is None or msg.ballot >= self._leader_ballot:
                self._heard_leader(msg.ballot)
                self._rec.heard_leader(msg.ballot, msg.phase1_top)
                self._learn_commit(msg.ballot, msg.commit)
            return
        if not self._accept_leader(src, msg.ballot):
            return
        self._learn_commit(msg.ballot, msg.commit)
        self._send(src, HeartbeatAck(ballot=msg.ballot, commit=self._commit))

    def _on_catchup_request(self, src: int, msg: CatchupRequest) -> None:
        if msg.from_slot < self._learner.log_start:
            snap = self._learner.snapshot
            if snap is not None:
                self._send(src, SnapshotInstall(index=snap[0], data=snap[1]))
            return
        entries = self._learner.entries_from(msg.from_slot, self._config.catchup_batch, self._config.max_batch_bytes)
        if entries:
            self._send(src, CatchupReply(entries=tuple(entries), commit=self._commit))

    def _on_catchup_reply(self, src: int, msg: CatchupReply) -> None:
        if self._role in (Role.LEADER, Role.CANDIDATE):
            # Only followers ask; this answers a request from before we ran
            # phase 1.  A leader must not take it: a slot it learns this way
            # may hold another value than its own proposal there (chosen by a
            # higher ballot it has not heard of yet), and followers that
            # accepted that proposal would read our commit index as "chosen".
            return
        for p in msg.entries:
            if p.slot > self._commit:
                self._learn(p.slot, p.value)
        self._advance_commit()
        self._leader_commit = max(self._leader_commit, msg.commit)
        if self._commit < self._leader_commit and self._leader_ballot is not None:
            self._catchup_sent = self._now
            self._send(src, CatchupRequest(from_slot=self._commit + 1))
        if self._role is Role.RECOVERING:
            self._check_recovered()

    def _on_snapshot(self, src: int, msg: SnapshotInstall) -> None:
        if msg.index <= self._commit or self._role in (Role.LEADER, Role.CANDIDATE):
            return  # see _on_catchup_reply
        leader = None if self._leader_ballot is None else self._leader_ballot.rid
        if src != leader and src != self._snapshot_peer:
            # A snapshot replaces the whole state unchecked: take it only from
            # a peer we asked (the leader we follow, or the promiser that
            # showed our campaign was too far behind), not from any peer ahead.
            return
        self._snapshot_peer = None
        self._output.snapshot = (msg.index, msg.data)
        self._output.persist((SaveSnapshot(msg.index, msg.data, msg.index),))
        for slot in range(self._learner.log_start, msg.index + 1):
            self._acceptor.forget(slot)
        self._learner.install(msg.index, msg.data)
        if self._commit < self._leader_commit:
            self._catchup_sent = self._now
            self._send(src, CatchupRequest(from_slot=self._commit + 1))
        if self._role is Role.RECOVERING:
            self._check_recovered()

    # ------------------------------------------------------------------
    # Recovery of a replica with an empty data directory

    @property
    def _rec(self) -> Recovery:
        assert self._recovery is not None, "a core is built by restore()"
        return self._recovery

    def _send_recover_query(self) -> None:
        query = self._rec.next_query(self._now)
        if self._config.replicas == 1:
            self._finish_recovery()
            return
        self._broadcast(query)

    def _is_clean(self) -> bool:
        """Whether this replica never accepted anything nor learned anything chosen.

        Promises do not count: a new cluster in which some replicas finished
        recovery and campaigned (promising ballots) before the others asked
        must still let the others in, or the others wait forever for a leader
        that needs their votes.  The promised ballot travels in the reply and
        becomes the asker's floor, which is all a forgotten promise needs.
        """
        return self._learner.is_empty() and self._acceptor.accepted_from(1) == ()

    def _on_recover_query(self, src: int, msg: RecoverQuery) -> None:
        clean = self._is_clean()
        self._reply_durable(src, RecoverReply(nonce=msg.nonce, promised=self._acceptor.promised, empty=clean))
        # A recovering replica needs a leader whose phase 1 started after its
        # query; re-running phase 1 with a higher ballot gives it one.
        if self._role is Role.LEADER and not clean and self._rec.note_rerun_request(src, msg.nonce):
            self._start_phase1()

    def _on_recover_reply(self, src: int, msg: RecoverReply) -> None:
        if self._role is not Role.RECOVERING:
            return
        verdict = self._rec.on_reply(src, msg)
        if verdict is Verdict.NOTHING_YET:
            return
        floor = self._rec.highest_promise()
        self._election.saw_round(floor.round)
        # Never promise below a ballot some candidate already campaigns with.
        self._output.persist(self._acceptor.raise_floor(floor))
        if verdict is Verdict.NEW_CLUSTER:
            self._finish_recovery()
            self._election.no_leader_yet()
            if self._rid == FIRST_CANDIDATE:
                # A new cluster has no leader to wait for: its first candidate asks at once
                # instead of after an election timeout (the others keep theirs, so that it
                # runs alone); pre-vote and phase 1 guard it as any campaign.
                self._start_prevote()

    def _check_recovered(self) -> None:
        if self._rec.is_complete(self._leader_ballot, self._commit):
            assert self._leader_ballot is not None
            self._output.persist(self._acceptor.raise_floor(self._leader_ballot))
            self._finish_recovery()

    def _finish_recovery(self) -> None:
        self._output.persist((MarkInitialized(),))
        self._role = Role.FOLLOWER
        self._rec.finish()
        self._reset_election_timer()
