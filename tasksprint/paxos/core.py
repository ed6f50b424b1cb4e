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
accepts; the leader's phase-1 tally and phase-2 pipeline live in
``leader.py``; election timers, the highest round seen and the pre-vote
count in ``election.py`` (a follower that loses its leader asks its peers
before it campaigns, so a replica that was cut off cannot depose a healthy
leader); a wiped replica's way back to voting in ``recovery.py``; the
output buffer that holds replies back until their records are durable in
``output.py``.  This class routes messages and ticks between them and owns
the roles.  A leader that has not heard from a majority within the election
timeout steps down (check-quorum).

Learning: the leader piggybacks its commit index on Accept and Heartbeat.  A
follower marks a slot chosen when the leader's ballot equals the ballot at
which it accepted that slot; for anything else it asks for the chosen
entries (CatchupRequest), or receives a snapshot if those were truncated.

Candidates send Prepare only once their own promise is durable, so a ballot
in use is always known to its candidate (which a wiped replica's recovery
relies on).
"""

from __future__ import annotations

import enum
import random
from typing import Any

import attrs

from tasksprint.paxos.acceptor import Acceptor
from tasksprint.paxos.durable import (
    DurableState,
    MarkInitialized,
    SaveChosen,
    SaveSnapshot,
)
from tasksprint.paxos.election import Election
from tasksprint.paxos.leader import Leadership, Phase1
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
    Proposal,
    RecoverQuery,
    RecoverReply,
    SnapshotInstall,
    Tick,
)
from tasksprint.paxos.output import OutputBuffer, Ready
from tasksprint.paxos.recovery import Recovery, Verdict

__all__ = ["PaxosConfig", "PaxosCore", "Ready", "Role"]  # Ready: see output.py


class Role(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # running phase 1
    LEADER = "leader"
    RECOVERING = "recovering"  # empty data directory: learner only until safe to vote


@attrs.frozen(kw_only=True)
class PaxosConfig:
    """Protocol parameters; times are seconds of the driver's clock."""

    replicas: int
    heartbeat_interval: float = 0.05
    election_timeout: float = 0.3  # minimum; each wait is drawn from [t, 2t)
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
class PaxosCore:
    """One replica's protocol state. See the module docstring for the contract."""

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
    _tick_data: Any = None
    _wall: float = 0.0
    _recovery: Recovery | None = None  # set by restore()
    _output: OutputBuffer = attrs.Factory(OutputBuffer)

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
    def leader_hint(self) -> int | None:
        """Replica id of the leader as far as this replica knows."""
        if self._role is Role.LEADER:
            return self._rid
        if (
            self._leader_ballot is not None
            and self._now - self._election.last_contact < 2 * self._config.election_timeout
        ):
            return self._leader_ballot.rid
        return None

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
                self._maybe_catch_up()
            case Role.RECOVERING:
                if self._rec.query_due(self._now, self._config.heartbeat_interval * 4, self._leader_ballot):
                    self._send_recover_query()
                self._maybe_catch_up()

    def propose(self, item: Command | CommandBlock | Tick) -> bool:
        """Submit a command. False means no leader is known: the caller should retry later.

        Acceptance is no promise: the command may still be lost with a failed
        leader, so clients retry with the same sequence number until they see
        it applied.
        """
        if self._role is Role.LEADER:
            assert self._lead is not None
            self._lead.pending.append(item)
            return True
        if self._role in (Role.FOLLOWER, Role.RECOVERING) and self.leader_hint is not None:
            self._forward.append(item)
            return True
        return False

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
            case RecoverQuery():
                self._on_recover_query(src, msg)
            case RecoverReply():
                self._on_recover_reply(src, msg)
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
        if self._commit < self._leader_commit:
            self._maybe_catch_up()
        if self._role is Role.RECOVERING:
            self._check_recovered()

    # ------------------------------------------------------------------
    # Election

    def _start_prevote(self) -> None:
        round_ = self._election.start_prevote(self._rid, self._acceptor.promised.round, self._now)
        if self._config.replicas == 1:
            self._start_phase1()
            return
        self._broadcast(PreVote(round=round_, commit=self._commit))

    def _on_prevote(self, src: int, msg: PreVote) -> None:
        # Support an election only if we too have lost the leader: a healthy
        # leader is not deposed by a replica that was merely cut off.
        lost = self._role is not Role.LEADER and self._election.is_leader_lost(self._now)
        granted = lost and msg.round > self._acceptor.promised.round
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
        self._reset_election_timer()
        self._output.persist(records)
        self._reply_durable(src, self._promise_for(msg))

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
            recent = sorted((t for t in lead.heard.values()), reverse=True)
            if recent[cfg.quorum - 2] < self._now - cfg.election_timeout:
                self._become_follower()
                self._leader_ballot = None
                return
        if self._now >= lead.next_tick:
            lead.next_tick = self._now + cfg.tick_interval
            lead.pending.append(Tick(now=self._wall, data=self._tick_data))
        if self._now >= lead.next_heartbeat or lead.notify:
            # The regular heartbeat goes to everyone; a commit notice only to
            # the followers no Accept has told.
            self._send_heartbeat(None if self._now >= lead.next_heartbeat else sorted(lead.notify))
            # Accepts or their answers may have been lost: resend to the silent.
            stale = lead.stale(self._now, cfg.heartbeat_interval)
            for dst in range(cfg.replicas):
                need = tuple(p for p in stale if dst not in lead.inflight[p.slot].acks)
                if dst != self._rid and need:
                    self._send(dst, Accept(ballot=lead.ballot, proposals=need, commit=self._commit))

    def _send_heartbeat(self, to: list[int] | None = None) -> None:
        """Heartbeat every peer (the next one is due an interval later), or only those in ``to``."""
        lead = self._lead
        assert lead is not None
        lead.notify.clear()
        beat = Heartbeat(ballot=lead.ballot, commit=self._commit, phase1_top=lead.phase1_top)
        if to is None:
            lead.next_heartbeat = self._now + self._config.heartbeat_interval
            self._broadcast(beat)
        else:
            for dst in to:
                self._send(dst, beat)

    def _proposals_due(self) -> bool:
        """Whether :meth:`_flush_proposals` would send anything (a question: it changes nothing)."""
        if self._role is Role.LEADER:
            lead = self._lead
            return lead is not None and bool(lead.pending) and len(lead.inflight) < self._config.max_inflight
        forwarding = self._forward or (self._carry and self._role is Role.FOLLOWER and self.leader_hint is not None)
        return bool(forwarding) and self._leader_ballot is not None

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
        if self._role is not Role.LEADER or lead is None or not lead.pending:
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
            for dst in peers[: self._config.quorum - 1]:
                self._send(dst, msg)
                lead.notify.discard(dst)  # the Accept carries the commit index
        else:
            lead.notify.clear()  # the Accept carries the commit index to everyone
            self._broadcast(msg)
        reply, records = self._acceptor.on_accept(msg, self._learner.slots, self._learner.log_start)
        self._output.persist(records)
        self._reply_durable(self._rid, reply)

    def _deliver_local(self, msg: Any) -> None:
        """A reply from our own acceptor, released after its fsync."""
        match msg:
            case Promise():
                self._deliver_promise(self._rid, msg)
            case Accepted():
                self._count_accepted(self._rid, msg)
            case _:
                pass

    def _on_accepted(self, src: int, msg: Accepted) -> None:
        if self._lead is not None and msg.ballot == self._lead.ballot:
            self._lead.heard[src] = self._now
        self._count_accepted(src, msg)

    def _count_accepted(self, src: int, msg: Accepted) -> None:
        lead = self._lead
        if self._role is not Role.LEADER or lead is None or msg.ballot != lead.ballot:
            return
        progressed = False
        for slot in msg.slots:
            f = lead.inflight.get(slot)
            if f is None:
                continue
            f.acks.add(src)
            if len(f.acks) >= self._config.quorum:
                del lead.inflight[slot]
                self._learn(slot, f.value)
                progressed = True
        if progressed:
            before = self._commit
            self._advance_commit()
            self._leader_commit = self._commit
            if self._commit > before and not lead.pending:
                # Tell followers at the next tick so they can apply (and answer
                # their clients), unless an Accept carries the commit index
                # first: at one command at a time the client's next command
                # usually does, and a heartbeat per commit (with its acks and
                # the followers' writes) would cost every process CPU.
                lead.notify.update(self._peers())

    def _on_nack(self, src: int, msg: Nack) -> None:
        self._election.saw_round(msg.promised.round)
        mine = self._lead.ballot if self._lead else self._phase1.ballot if self._phase1 else None
        if mine is not None and msg.ballot == mine and msg.promised > mine:
            self._become_follower()

    def _on_heartbeat_ack(self, src: int, msg: HeartbeatAck) -> None:
        if self._lead is not None and msg.ballot == self._lead.ballot:
            self._lead.heard[src] = self._now

    # ------------------------------------------------------------------
    # Follower

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
        self._learn_commit(msg.ballot, msg.commit)

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
