"""The leader (proposer) role: pre-vote, phase 1 once for all open slots, then pipelined phase 2.

Theory of operation.  A follower that lost its leader first asks its peers
(PreVote, see ``election.py``); with a majority's support it picks a ballot
higher than any it has seen and sends one Prepare covering every slot from
its first unknown one on, once its own promise is durable.  A majority of
Promises tells it, for each open slot, the value accepted at the highest
ballot (which it must re-propose, since it may have been chosen) and which
slots are already chosen.  Open slots nobody reported below the highest
reported one are holes, filled with no-ops so the log can be applied in order.
After that the leader assigns new slots to batches of client commands and
keeps up to ``max_inflight`` slots in phase 2 at once; a slot is chosen when a
majority (the leader's own acceptor included) has accepted it.  A slot that is
the only one in flight is sent to just enough followers for a majority
(:meth:`LeaderRole._send_accepts`); the others learn it from the commit index,
which the leader piggybacks on Accept and Heartbeat.  A leader that has not
heard from a majority within twice the election timeout steps down (check-quorum).
Followers forward the commands proposed to them to the leader they know.

The records this role keeps (the phase-1 tally, the phase-2 pipeline) are in
``leadership.py``; the state it shares with the other roles is in ``base.py``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from tasksprint.paxos.base import CoreBase, Role
from tasksprint.paxos.leadership import Leadership, Phase1
from tasksprint.paxos.messages import (
    Accept,
    Accepted,
    Ballot,
    CatchupRequest,
    Forward,
    Heartbeat,
    HeartbeatAck,
    Nack,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    Proposal,
    Tick,
    TimeoutNow,
)

__all__ = ["LeaderRole"]


@attrs.define(eq=False)
class LeaderRole(CoreBase):
    """A replica's leader side: campaigning, phase 1, phase 2 and heartbeats."""

    # ------------------------------------------------------------------
    # Campaign

    def _start_prevote(self) -> None:
        hb = self._config.heartbeat_interval
        round_ = self._election.start_prevote(self._rid, self._acceptor.promised.round, self._now, hb)
        if self._config.replicas == 1:
            self._start_phase1()
            return
        self._broadcast(PreVote(round=round_, commit=self._commit))

    def _on_timeout_now(self, src: int, msg: TimeoutNow) -> None:
        # Only the leader we follow, at its ballot, can hand over to us.
        if self._role is Role.FOLLOWER and self._leader_ballot == msg.ballot and msg.ballot.rid == src:
            self._start_phase1()

    def _retry_prevote(self) -> None:
        """The pre-vote has not won yet and no leader spoke: ask those who refused again."""
        round_ = self._election.retry_prevote(self._now, self._config.heartbeat_interval)
        self._broadcast(PreVote(round=round_, commit=self._commit))

    def _on_prevote(self, src: int, msg: PreVote) -> None:
        # Support an election only if we too have lost the leader: a healthy
        # leader is not deposed by a replica that was merely cut off.  And
        # only a candidate that knows at least as much chosen as we do: one
        # further behind (a leader whose followers learned slots before it
        # did, see early_learning.py, then compacted them) could not lead
        # until it caught up, yet its campaigns would keep resetting our
        # timers; refused, it lets the replica that knows most campaign, and
        # every majority holds one that the others support.
        # A recovering replica does not vote at all (see recovery.py): its
        # empty log would support any candidate, however far behind.
        #
        # The candidate's round shows a round in use below it (the one it
        # promised, or saw): our next pre-vote goes above that.  Otherwise a
        # candidate that knows more chosen slots, asking at a round we are
        # past, and we, refused by it for knowing fewer, would each refuse
        # the other for ever (nothing else tells it of our promise).
        self._election.saw_round(msg.round - 1)
        voter = self._role in (Role.FOLLOWER, Role.CANDIDATE)
        lost = voter and self._election.is_leader_lost(self._now)
        granted = lost and msg.round > self._acceptor.promised.round and msg.commit >= self._commit
        self._send(src, PreVoteReply(round=msg.round, granted=granted))

    def _on_prevote_reply(self, src: int, msg: PreVoteReply) -> None:
        if self._role is Role.FOLLOWER and self._election.count_prevote(src, msg):
            self._start_phase1()

    def _start_phase1(self) -> None:
        round_ = self._election.next_round(self._acceptor.promised.round)
        ballot = Ballot(round_, self._rid)
        self._election.max_round = round_
        if self._lead is not None:
            self._carry.extend(self._lead.pending)
        self._role = Role.CANDIDATE
        self._lead = None
        self._election.prevote_retry_at = math.inf
        self._phase1 = Phase1(ballot, self._commit + 1)
        self._election.retry_at = self._now + self._config.heartbeat_interval
        self._reset_election_timer()
        prepare = Prepare(ballot=ballot, from_slot=self._commit + 1)
        # Our own promise goes through the same durable path as anyone's.
        granted, records = self._acceptor.on_prepare(prepare)
        assert granted, "a fresh ballot above everything seen must be grantable"
        self._output.persist(records)
        self._reply_durable(self._rid, self._promise_for(prepare))
        # The Prepare waits for that promise to be durable too.  Otherwise a
        # crash before the fsync forgets the ballot while others promised it,
        # and a wiped replica's recovery (which learns the ballots in use from
        # the others' promises) could miss it: see _on_recover_reply.
        for dst in self._peers():
            self._reply_durable(dst, prepare)

    def _promise_for(self, prepare: Prepare) -> Promise:
        return Promise(
            ballot=prepare.ballot,
            log_start=self._learner.log_start,
            accepted=self._acceptor.accepted_from(prepare.from_slot),
            chosen=self._learner.chosen_from(prepare.from_slot),
        )

    def _candidate_tick(self) -> None:
        assert self._phase1 is not None
        if self._election.is_expired(self._now):
            self._become_follower()  # try again, after a new pre-vote
            self._start_prevote()
            return
        # Prepare or Promise may have been lost: ask again those who have not
        # answered (once our own promise, and so the first Prepare, is out).
        if self._now >= self._election.retry_at and self._phase1.has(self._rid):
            self._election.retry_at = self._now + self._config.heartbeat_interval
            prepare = Prepare(ballot=self._phase1.ballot, from_slot=self._phase1.from_slot)
            for dst in range(self._config.replicas):
                if dst != self._rid and not self._phase1.has(dst):
                    self._send(dst, prepare)

    def _on_promise(self, src: int, msg: Promise) -> None:
        self._deliver_promise(src, msg)

    def _deliver_promise(self, src: int, msg: Promise) -> None:
        p1 = self._phase1
        if self._role is not Role.CANDIDATE or p1 is None or msg.ballot != p1.ballot:
            return
        if msg.log_start > p1.from_slot:
            # The promiser truncated slots we never learned: we are too far
            # behind to lead. Catch up from it and let someone else lead.
            self._become_follower()
            self._snapshot_peer = src
            self._send(src, CatchupRequest(from_slot=self._commit + 1))
            return
        p1.add(src, msg)
        if p1.count >= self._config.quorum:
            self._become_leader(p1)

    def _become_leader(self, p1: Phase1) -> None:
        chosen, repropose, top = p1.outcome()
        for slot, value in sorted(chosen.items()):
            self._learn(slot, value)
        self._advance_commit()
        self._role = Role.LEADER
        self._election.campaign_since = math.inf
        self._phase1 = None
        self._leader_ballot = p1.ballot
        self._leader_commit = self._commit
        lead = Leadership(ballot=p1.ballot, next_slot=max(top, self._commit) + 1, phase1_top=top)
        lead.heard = {r: self._now for r in self._peers()}
        lead.next_tick = self._now
        lead.pending.extend(self._carry)
        self._carry = []
        self._lead = lead
        proposals = []
        for slot, value in sorted(repropose.items()):
            if self._learner.value(slot) is not None:
                continue
            lead.add_slot(slot, value, self._now)
            proposals.append(Proposal(slot=slot, value=value))
        if proposals:
            self._send_accepts(proposals)
        self._send_heartbeat()

    # ------------------------------------------------------------------
    # Leader

    def _leader_tick(self) -> None:
        lead = self._lead
        assert lead is not None
        cfg = self._config
        # Check-quorum: step down if a majority has gone quiet.
        if cfg.replicas > 1:
            # Over twice the (measured) election timeout: followers elect a
            # new leader within it, so a cut-off leader has stepped down by then.
            if self._quorum_heard_at() < self._now - 2 * self._election.timeout:
                self._become_follower()
                self._leader_ballot = None
                return
        if self._now >= lead.next_tick:
            lead.next_tick = self._now + cfg.tick_interval
            lead.pending.append(Tick(now=self._wall, data=self._tick_data))
            # Under load (a command within the last interval) the TICK waits
            # up to half an interval for the next command and shares its
            # slot: a slot costs every replica a round of messages, a write
            # and an apply, and TICKs alone were a third of a busy log's.
            busy = self._now - lead.last_command < cfg.tick_interval
            lead.tick_hold_until = self._now + cfg.tick_interval / 2 if busy else self._now
        if self._now >= lead.next_heartbeat or lead.notify:
            # The regular heartbeat goes to everyone; a commit notice only to
            # the followers no Accept has told.
            self._send_heartbeat(None if self._now >= lead.next_heartbeat else sorted(lead.notify))
            # Accepts or their answers may have been lost: resend to the silent.
            stale = lead.stale(self._now, cfg.heartbeat_interval)
            for dst in range(cfg.replicas):
                need = tuple(p for p in stale if dst not in lead.inflight[p.slot].acks)
                if dst != self._rid and need:
                    self._tell(dst, Accept(ballot=lead.ballot, proposals=need, commit=self._commit))

    def _leader_tick_due(self) -> float:
        """When a tick of this leader next has something to do (see ``PaxosCore.tick_due``)."""
        lead = self._lead
        assert lead is not None
        cfg = self._config
        if lead.notify:
            return self._now
        due = min(lead.next_heartbeat, lead.next_tick)
        if self._tick_held():
            due = min(due, lead.tick_hold_until)
        if cfg.replicas > 1:
            due = min(due, self._quorum_heard_at() + 2 * self._election.timeout)  # check-quorum
        return due

    def _quorum_heard_at(self) -> float:
        """When this leader last heard from enough followers to make a majority with itself."""
        lead = self._lead
        assert lead is not None
        return sorted(lead.heard.values(), reverse=True)[self._config.quorum - 2]

    def _send_heartbeat(self, to: list[int] | None = None) -> None:
        """The regular heartbeat (the next one is due an interval later), or one to those in ``to``.

        The regular one goes to every peer but those an Accept or a Heartbeat
        told, and that answered, within the last interval (as Raft's leader
        sends an empty AppendEntries only to a follower it sent nothing for
        that long): under load Accepts and commit notices reach the followers
        many times an interval, and a heartbeat and its ack each cost both
        processes a wake-up.  A peer still hears from the leader at least
        every two intervals, well within an election timeout; one that does
        not answer (a replica recovering, which learns the leader's phase-1
        top from heartbeats only) gets every heartbeat.
        """
        lead = self._lead
        assert lead is not None
        beat = Heartbeat(ballot=lead.ballot, commit=self._commit, phase1_top=lead.phase1_top)
        if to is None:
            interval = self._config.heartbeat_interval
            since = self._now - interval
            to = [
                dst
                for dst in self._peers()
                if dst in lead.notify
                or lead.told.get(dst, -math.inf) <= since
                or lead.heard.get(dst, -math.inf) <= since
            ]
            lead.notify.clear()
            lead.next_heartbeat = self._now + interval
        else:
            lead.notify.difference_update(to)
        for dst in to:
            self._tell(dst, beat)

    def _tell(self, dst: int, msg: Accept | Heartbeat) -> None:
        """Send a leader's message carrying the ballot and the commit index; note when ``dst`` was told."""
        lead = self._lead
        assert lead is not None
        lead.told[dst] = self._now
        self._send(dst, msg)

    def _proposals_due(self) -> bool:
        """Whether :meth:`_flush_proposals` would send anything (a question: it changes nothing)."""
        if self._role is Role.LEADER:
            lead = self._lead
            return (
                lead is not None
                and bool(lead.pending)
                and len(lead.inflight) < self._config.max_inflight
                and not self._tick_held()
            )
        forwarding = self._forward or (self._carry and self._role is Role.FOLLOWER and self.leader_hint is not None)
        return bool(forwarding) and self._leader_ballot is not None

    def _tick_held(self) -> bool:
        """Whether ``pending`` holds only TICKs waiting for a command to share their slot."""
        lead = self._lead
        return (
            lead is not None
            and self._now < lead.tick_hold_until
            and all(isinstance(item, Tick) for item in lead.pending)
        )

    def _flush_proposals(self) -> None:
        """Turn pending commands into new slots while the pipeline has room."""
        if self._carry and self._role is Role.FOLLOWER and self.leader_hint is not None:
            self._forward.extend(self._carry)
            self._carry = []
        if self._forward:
            if self._leader_ballot is not None and self._role is not Role.LEADER:
                self._send(self._leader_ballot.rid, Forward(items=tuple(self._forward)))
            self._forward = []
        lead = self._lead
        if self._role is not Role.LEADER or lead is None or not lead.pending or self._tick_held():
            return
        proposals = []
        while lead.pending and len(lead.inflight) < self._config.max_inflight:
            batch = lead.take_batch(self._config.max_batch, self._config.max_batch_bytes)
            assert batch is not None
            slot = lead.open_slot(batch, self._now)
            proposals.append(Proposal(slot=slot, value=batch))
        if proposals:
            self._send_accepts(proposals, thrifty=True)

    def _send_accepts(self, proposals: list[Proposal], *, thrifty: bool = False) -> None:
        lead = self._lead
        assert lead is not None
        msg = Accept(ballot=lead.ballot, proposals=tuple(proposals), commit=self._commit)
        if thrifty and len(lead.inflight) == len(proposals):
            # Light load (nothing else in flight): ask only as many followers
            # as a majority needs, the lowest-numbered of those heard from
            # within two heartbeat intervals (the same ones every time, so
            # the others' logs lag evenly and replica 0, where clients send
            # their queries first, is current).  The others would compete
            # for the CPUs and disk of a small deployment without shortening
            # the commit.  Their commit notice stays pending, so a heartbeat
            # at the next tick tells them (only them) the commit index and
            # they catch up (no fsync: a chosen value is durable on a
            # majority).  Slots the followers asked leave unanswered for a
            # heartbeat interval go to every peer (see _leader_tick).
            recent = self._now - 2 * self._config.heartbeat_interval
            peers = sorted(self._peers(), key=lambda r: (lead.heard.get(r, 0.0) < recent, r))
            asked = peers[: self._config.quorum - 1]
            for dst in asked:
                self._tell(dst, msg)
                lead.notify.discard(dst)  # the Accept carries the commit index
        else:
            lead.notify.clear()  # the Accept carries the commit index to everyone
            asked = self._peers()
            for dst in asked:
                self._tell(dst, msg)
        lead.asked = tuple(asked)
        reply, records = self._acceptor.on_accept(msg, self._learner.slots, self._learner.log_start)
        self._output.persist(records)
        self._reply_durable(self._rid, reply)
        if self._config.quorum == 2 and isinstance(reply, Accepted):
            # Released by the same fsync: with their own acceptance, the
            # followers asked know the slots are chosen (early_learning.py).
            for dst in asked:
                self._reply_durable(dst, reply)
            for p in proposals:
                f = lead.inflight.get(p.slot)
                if f is not None:
                    f.paired = frozenset(asked)

    @property
    def accepting(self) -> tuple[int, ...]:
        """The peers this leader's latest Accept went to (none unless leading).

        At light load that is a majority's worth of followers (a thrifty
        Accept): the others hear of the new slots only from the heartbeat at
        the next tick, and catch up after it.
        """
        return () if self._lead is None or self._role is not Role.LEADER else self._lead.asked

    def _deliver_local(self, msg: Any) -> None:
        """A reply from our own acceptor, released after its fsync."""
        match msg:
            case Promise():
                self._deliver_promise(self._rid, msg)
            case Accepted() if self._role is Role.LEADER:
                self._count_accepted(self._rid, msg)
            case Accepted():
                self._learn_paired(msg.ballot, self._early.mine(msg.ballot, msg.slots))
            case _:
                pass

    def _learn_paired(self, ballot: Ballot, slots: list[int]) -> None:
        """Two acceptors (this one and ``ballot``'s leader) durably accepted ``slots`` at ``ballot``: chosen."""
        learned = False
        for slot in slots:
            acc = self._acceptor.accepted_at(slot)
            if acc is not None and acc[0] == ballot and self._learner.value(slot) is None:
                self._learn(slot, acc[1])
                learned = True
        if learned:
            self._advance_commit()
            self._early.forget_upto(self._commit)

    def _on_accepted(self, src: int, msg: Accepted) -> None:
        if self._lead is not None and msg.ballot == self._lead.ballot:
            self._heard_follower(src)
        self._count_accepted(src, msg)

    def _heard_follower(self, src: int) -> None:
        """Follower ``src`` answered at our ballot: alive (check-quorum); its gap feeds the timeout."""
        lead = self._lead
        assert lead is not None
        last = lead.heard.get(src)
        if last is not None:
            self._election.note_gap(self._now - last, self._now)
        lead.heard[src] = self._now

    def _count_accepted(self, src: int, msg: Accepted) -> None:
        lead = self._lead
        if self._role is not Role.LEADER or lead is None or msg.ballot != lead.ballot:
            return
        progressed = 0
        accepted: set[int] = set()
        learners: set[int] | None = None  # peers that learn every slot chosen here by themselves
        for slot in msg.slots:
            f = lead.inflight.get(slot)
            if f is None:
                continue
            f.acks.add(src)
            if len(f.acks) >= self._config.quorum:
                del lead.inflight[slot]
                self._learn(slot, f.value)
                accepted |= f.acks
                progressed += 1
                learners = (f.acks & f.paired) if learners is None else learners & f.acks & f.paired
        if progressed:
            before = self._commit
            self._advance_commit()
            self._leader_commit = self._commit
            if self._commit > before and not lead.pending:
                # Tell followers at the next tick so they can apply (and answer
                # their clients), unless an Accept carries the commit index
                # first: at one command at a time the client's next command
                # usually does, and a heartbeat per commit (with its acks and
                # the followers' writes) would cost every process CPU.  Not
                # those that hold the leader's acceptance and their own of
                # every slot committed here: they know (early_learning.py).
                if learners and self._commit - before == progressed:
                    lead.notify.update(p for p in self._peers() if p not in learners)
                else:
                    lead.notify.update(self._peers())
                if self._config.quorum > 2:
                    # Except to those that accepted: their digests of the
                    # state after these slots are what this replica's
                    # answers wait for (with three replicas the follower
                    # learned the slots already, see early_learning.py).
                    self._send_heartbeat(sorted(accepted - {self._rid}))

    def _on_nack(self, src: int, msg: Nack) -> None:
        self._election.saw_round(msg.promised.round)
        mine = self._lead.ballot if self._lead else self._phase1.ballot if self._phase1 else None
        if mine is not None and msg.ballot == mine and msg.promised > mine:
            self._become_follower()

    def _on_heartbeat_ack(self, src: int, msg: HeartbeatAck) -> None:
        if self._lead is not None and msg.ballot == self._lead.ballot:
            self._heard_follower(src)
