"""One test per protocol claim of the Multi-Paxos core, scripted delivery by delivery.

Each test builds a small cluster from ``tests/sim/`` whose network is a
:class:`~sim.ManualNet`: nothing arrives unless the test delivers it,
time moves only when the test moves it, and the simulator's checker still
watches agreement, validity and exactly-once on every step.  The tests at the
end replay, by hand, the bugs the randomized simulation found.
"""

from __future__ import annotations

import collections
import random

import attrs
import pytest
from sim import Cluster, ManualNet, sim_config

from tasksprint import codec
from tasksprint.machine import DUPLICATE, Applier, KVMachine
from tasksprint.paxos.core import PaxosCore, Role
from tasksprint.paxos.durable import (
    DurableState,
    LogRow,
    MarkInitialized,
    SaveAccepted,
    SaveChosen,
    SavePromise,
)
from tasksprint.paxos.election import Election
from tasksprint.paxos.leadership import Phase1
from tasksprint.paxos.messages import (
    LAST_SLOT,
    NOOP,
    Accept,
    Accepted,
    AcceptedValue,
    Ballot,
    Batch,
    CatchupReply,
    CatchupRequest,
    Command,
    CommandBlock,
    Heartbeat,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    Proposal,
    RecoverQuery,
    RecoverReply,
    SnapshotInstall,
    Tick,
    TimeoutNow,
)
from tasksprint.paxos.output import OutputBuffer, Ready
from tasksprint.paxos.recovery import Recovery, Verdict

ET = 0.3  # election timeout of sim_config
HB = 0.05  # heartbeat interval of sim_config


def make(
    n: int = 3, *, fresh: bool = False, disks: list[DurableState] | None = None, **cfg
) -> tuple[Cluster, ManualNet]:
    """A cluster on a hand-driven network; replicas started, nothing delivered yet."""
    config = attrs.evolve(sim_config(n), **cfg)
    c = Cluster(n, seed=7, fresh=fresh, clients=2, quota=10_000, window=10_000, config=config)
    if disks is not None:
        c.disks = disks
    net = ManualNet(c)
    c.boot()
    return c, net


def run(
    c: Cluster,
    net: ManualNet,
    seconds: float,
    *,
    among: set[int] | None = None,
    ticking: set[int] | None = None,
    dt: float = 0.01,
) -> None:
    """Let time pass: tick the live replicas (or those in ``ticking``) and deliver
    what they say between the replicas in ``among`` (default: all) and the clients.

    Messages to or from replicas outside ``among`` stay in flight.
    """
    live = set(range(c.n)) if among is None else among
    end = c.now + seconds
    while c.now < end - 1e-9:
        c.now = round(c.now + dt, 9)
        for r in sorted(range(c.n) if ticking is None else ticking):
            c.tick(r)
        net.flush(among=live | {cl.cid for cl in c.clients})
        c.check_step()


def elect(c: Cluster, net: ManualNet, r: int, *, among: set[int] | None = None) -> None:
    """Make replica ``r`` leader: everyone's clock moves past an election timeout,
    only ``r``'s pre-votes travel, then everything within ``among`` is delivered."""
    live = set(range(c.n)) if among is None else among
    c.now += 2 * ET + 0.01
    for o in sorted(live - {r}):
        c.tick(o)
        net.drop(PreVote, src=o)  # the others would campaign too; they lose the race
    c.tick(r)
    net.flush(among=live)
    c.check_step()
    assert c.nodes[r].core.role is Role.LEADER, c.nodes[r].core.role


def node(c: Cluster, r: int):
    n = c.nodes[r]
    assert n is not None
    return n


def core(c: Cluster, r: int) -> PaxosCore:
    return node(c, r).core


def leaders(c: Cluster) -> list[int]:
    return [r for r in range(c.n) if c.nodes[r] is not None and core(c, r).role is Role.LEADER]


def submit(c: Cluster, r: int, client: int = 0) -> Command:
    return c.submit(c.clients[client], r)


def applied_items(c: Cluster, r: int) -> list:
    """Every item of every slot replica ``r`` knows chosen, in order."""
    cr = core(c, r)
    out = []
    for slot in range(cr.log_start, cr.commit_index + 1):
        out.extend(cr.chosen_value(slot).items)
    return out


# ----------------------------------------------------------------------
# Election


def test_single_leader_in_quiet_cluster():
    c, net = make(3)
    run(c, net, 3.0)
    assert len(leaders(c)) == 1
    (lead,) = leaders(c)
    ballot = core(c, lead).ballot
    for r in range(3):
        assert core(c, r).leader_hint == lead
        assert core(c, r).ballot == ballot
    # And it stays: nobody campaigns while the leader is heard.
    run(c, net, 3.0)
    assert leaders(c) == [lead] and core(c, lead).ballot == ballot


def test_fresh_cluster_bootstraps():
    c, net = make(3, fresh=True)
    assert all(core(c, r).role is Role.RECOVERING for r in range(3))
    run(c, net, 3.0)
    assert all(c.disks[r].initialized for r in range(3))
    assert len(leaders(c)) == 1
    cmd = submit(c, 1)
    run(c, net, 1.0)
    assert c.checker.acked[(cmd.client_id, cmd.seq)] == 1


def test_a_new_cluster_has_its_first_leader_without_waiting_for_an_election_timeout():
    c, net = make(3, fresh=True)
    start = c.now
    # Only messages travel (no tick, the clock stands still): recovery finds
    # every replica empty, and replica 0 campaigns at once.
    net.flush()
    c.check_step()
    assert c.now == start
    assert leaders(c) == [0]
    assert all(core(c, r).leader_hint == 0 for r in range(3))


def test_in_a_new_cluster_only_replica_0_campaigns_at_once():
    c, net = make(3, fresh=True)
    for src in range(3):
        for dst in range(3):
            if src != dst:
                net.deliver(RecoverQuery, src=src, dst=dst)
    net.flush_until(lambda: all(core(c, r).role is not Role.RECOVERING for r in range(3)))
    prevotes = net.peek(PreVote)
    assert prevotes and all(src == 0 for src, _, m in net.queue if isinstance(m, PreVote))


def test_a_restarted_cluster_waits_for_an_election_timeout():
    """Replicas with data (not a new cluster) campaign only once a timeout passed, replica 0 too."""
    c, net = make(3)
    net.flush()
    assert not net.peek(PreVote) and leaders(c) == []
    elect(c, net, 1)
    run(c, net, 0.3)
    # A wiped replica 0 rejoining a cluster with data does not campaign at once either.
    c.crash(0, wipe=True)
    c.start(0)
    net.flush()
    assert not net.peek(PreVote, src=0)
    assert leaders(c) == [1]


def test_a_recovering_replica_asks_a_peer_again_as_soon_as_its_connection_is_up():
    c, net = make(3, fresh=True)
    (query,) = net.peek(RecoverQuery, src=0, dst=1)
    net.drop(RecoverQuery, src=0, dst=1)  # lost: replica 1 did not listen yet
    core(c, 0).peer_connected(1)
    c.drain(0)
    # The same question, at once and only to that peer (a leader re-runs phase 1 once per question).
    assert net.peek(RecoverQuery, src=0, dst=1) == [query]
    assert [d for s, d, m in net.queue if s == 0 and isinstance(m, RecoverQuery)] == [2, 1]
    net.flush()
    assert leaders(c) == [0]


def test_a_replica_that_votes_sends_nothing_when_a_connection_comes_up():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    net.queue.clear()
    for r in range(3):
        core(c, r).peer_connected((r + 1) % 3)
        c.drain(r)
    assert net.queue == []


def test_fresh_cluster_where_one_replica_campaigned_alone_still_starts():
    """Regression (seed 25): replica 0 found everyone empty and campaigned before
    the others' queries reached it; its promise made them wait for a leader
    above it, and that leader needed their votes: the cluster never started."""
    c, net = make(3, fresh=True)
    # Replica 0 asks and hears "empty" from both; the others' queries to it are slow.
    net.deliver(RecoverQuery, src=0, dst=1)
    net.deliver(RecoverQuery, src=0, dst=2)
    for src in (1, 2):
        net.deliver(RecoverReply, src=src, dst=0)
    assert core(c, 0).role is Role.FOLLOWER
    c.now += 2 * ET
    c.tick(1)
    c.tick(2)
    c.tick(0)
    # Recovering replicas grant no pre-vote (they do not vote at all), so
    # replica 0 campaigns only with a grant made by hand, as an older
    # version's recovering replicas made it.
    # (Replica 0, first candidate of a new cluster, asked at once and again after the timeout.)
    prevote = net.peek(PreVote, src=0)[-1]
    net.drop(PreVote)
    c.deliver(1, 0, PreVoteReply(round=prevote.round, granted=True))
    assert core(c, 0).promised == Ballot(1, 0), "replica 0 campaigns alone"
    run(c, net, 3.0)
    assert all(core(c, r).role is not Role.RECOVERING for r in range(3))
    assert len(leaders(c)) == 1


def test_cut_off_replica_does_not_depose_leader():
    c, net = make(3)
    elect(c, net, 0)
    ballot = core(c, 0).ballot
    # Replica 2 hears nothing for many election timeouts and keeps asking.
    run(c, net, 3.0, among={0, 1})
    assert core(c, 2).role is Role.FOLLOWER
    prevotes = net.peek(PreVote, src=2)
    assert prevotes, "the cut-off replica should have asked for pre-votes"
    net.drop(dst=2)  # what was sent to it while it was away
    assert net.find(src=2) and all(isinstance(m, PreVote) for m in net.peek(src=2))
    # It comes back: the others refuse its pre-votes, and no ballot moves.
    net.flush()
    c.check_step()
    assert leaders(c) == [0]
    assert core(c, 0).ballot == ballot
    assert core(c, 1).promised == ballot and core(c, 0).promised == ballot
    run(c, net, 1.0)
    assert leaders(c) == [0] and core(c, 0).ballot == ballot
    assert core(c, 2).leader_hint == 0


def test_prevote_refused_while_leader_heard():
    c, net = make(3)
    elect(c, net, 0)
    c.tick(1)
    c.deliver(2, 1, PreVote(round=50, commit=0))
    reply = net.peek(PreVoteReply, src=1, dst=2)[-1]
    assert reply.granted is False
    assert core(c, 1).promised == core(c, 0).ballot


def test_leader_without_majority_steps_down():
    c, net = make(3)
    elect(c, net, 0)
    # The leader keeps ticking but hears nobody: it steps down after twice the election timeout.
    run(c, net, ET * 1.9, among={0})
    assert core(c, 0).role is Role.LEADER
    run(c, net, ET * 0.2, among={0})
    assert core(c, 0).role is Role.FOLLOWER
    assert core(c, 0).propose(Tick(now=1.0)) is False


def test_leader_with_majority_stays():
    c, net = make(5)
    elect(c, net, 0)
    run(c, net, ET * 5, among={0, 1, 2})
    assert core(c, 0).role is Role.LEADER


# ----------------------------------------------------------------------
# Durability


def _core_with_disk(n: int = 3, rid: int = 1) -> tuple[PaxosCore, DurableState]:
    disk = DurableState()
    disk.apply([MarkInitialized()])
    return PaxosCore.restore(sim_config(n), rid, disk, rng=random.Random(1), now=0.0), disk


def test_has_ready_only_looks():
    """Asking whether there is output changes nothing: commands proposed before and after
    the question still travel in one slot, made when the driver takes the Ready."""
    disk = DurableState()
    disk.apply([MarkInitialized()])
    cr = PaxosCore.restore(sim_config(1), 0, disk, rng=random.Random(1), now=0.0)
    cr.tick(1.0)  # a lone replica's election timeout passed: it leads at once
    while cr.has_ready():
        rd = cr.ready()
        disk.apply(list(rd.persist))
        cr.advance(rd)
    assert cr.role is Role.LEADER and not cr.has_ready()
    first = Command(client_id="c", seq=1, op=["put", "k", "1"])
    second = Command(client_id="c", seq=2, op=["put", "k", "2"])
    assert cr.propose(first)
    assert cr.has_ready() and cr.has_ready()
    assert cr.propose(second)
    rd = cr.ready()
    accepted = [r for r in rd.persist if isinstance(r, SaveAccepted)]
    assert [r.value.items for r in accepted] == [(first, second)]


def test_promise_waits_for_its_fsync():
    cr, disk = _core_with_disk()
    cr.step(0, Prepare(ballot=Ballot(3, 0), from_slot=1))
    rd = cr.ready()
    assert SavePromise(Ballot(3, 0)) in rd.persist
    assert not any(isinstance(m, Promise) for _, m in rd.messages)
    # Asking again before advance() still gives no Promise: the fsync has not been confirmed.
    assert not any(isinstance(m, Promise) for _, m in cr.ready().messages)
    disk.apply(list(rd.persist))
    cr.advance(rd)
    promises = [(dst, m) for dst, m in cr.ready().messages if isinstance(m, Promise)]
    assert promises == [(0, Promise(ballot=Ballot(3, 0), log_start=1))]


def test_accepted_waits_for_its_fsync():
    cr, disk = _core_with_disk()
    value = Batch(items=(Tick(now=1.0),))
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=1, value=value),), commit=0))
    rd = cr.ready()
    assert SaveAccepted(1, Ballot(3, 0), value) in rd.persist
    assert not any(isinstance(m, Accepted) for _, m in rd.messages)
    cr.advance(rd)
    sent = [m for _, m in cr.ready().messages if isinstance(m, Accepted)]
    assert Accepted(ballot=Ballot(3, 0), slots=(1,)) in sent


def test_pipelined_readies_release_their_replies_in_order():
    # A driver with several writes in flight: advancing the first Ready must
    # not release the reply that waits for the second Ready's record.
    cr, disk = _core_with_disk()
    value = Batch(items=(Tick(now=1.0),))
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=1, value=value),), commit=0))
    first = cr.ready()
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=2, value=value),), commit=0))
    second = cr.ready()
    assert second.number > first.number
    assert SaveAccepted(2, Ballot(3, 0), value) in second.persist

    def accepted_slots() -> list:
        return [m.slots for _, m in cr.ready().messages if isinstance(m, Accepted)]

    cr.advance(first)
    assert accepted_slots() == [(1,)]
    cr.advance(second)
    assert accepted_slots() == [(2,)]


def test_advancing_a_later_ready_releases_the_earlier_ones_too():
    # One transaction may carry several Readies' records (group commit).
    cr, disk = _core_with_disk()
    value = Batch(items=(Tick(now=1.0),))
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=1, value=value),), commit=0))
    cr.ready()
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=2, value=value),), commit=0))
    second = cr.ready()
    cr.advance(second)
    sent = sorted(m.slots for _, m in cr.ready().messages if isinstance(m, Accepted))
    assert sent == [(1,), (2,)]


def test_ready_with_only_chosen_markers_needs_no_fsync():
    cr, disk = _core_with_disk()
    value = Batch(items=(Tick(now=1.0),))
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=1, value=value),), commit=0))
    rd = cr.ready()
    assert rd.sync  # an acceptance: Accepted waits for its fsync
    disk.apply(list(rd.persist))
    cr.advance(rd)
    cr.ready()  # releases the Accepted
    # The commit index arrives: the slot is chosen, nothing waits for that record.
    cr.step(0, Heartbeat(ballot=Ballot(3, 0), commit=1, phase1_top=0))
    rd = cr.ready()
    assert [type(r) for r in rd.persist] == [SaveChosen]
    assert not rd.sync
    assert rd.committed == ((1, value),)


def test_ready_holding_a_reply_is_synced_even_with_only_chosen_markers():
    cr, disk = _core_with_disk()
    value = Batch(items=(Tick(now=1.0),))
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=1, value=value),), commit=0))
    rd = cr.ready()
    disk.apply(list(rd.persist))
    cr.advance(rd)
    cr.ready()
    # The same value again (a resend) plus the commit: the Accepted reply is
    # queued to wait for a record, so the Ready must be synced.
    cr.step(0, Accept(ballot=Ballot(3, 0), proposals=(Proposal(slot=2, value=value),), commit=1))
    rd = cr.ready()
    assert any(type(r) is SaveChosen for r in rd.persist)
    assert rd.sync


def test_candidate_sends_prepare_only_after_its_own_promise_is_durable():
    c, net = make(3)
    c.now = 2 * ET + 0.01
    for r in (1, 2):
        c.tick(r)
        net.drop(PreVote, src=r)
    c.tick(0)
    net.deliver(PreVote, src=0, dst=1)
    # The granting reply starts phase 1; replica 0 dies after sending that
    # Ready's messages and before its records reach the disk.
    c.crash_in_ready[0] = "sent_not_persisted"
    net.deliver(PreVoteReply, src=1, dst=0)
    assert c.nodes[0] is None
    assert not net.peek(Prepare), "a Prepare left before the promise it implies was durable"
    assert c.disks[0].promised.round == 0


def test_restart_keeps_promises_and_acceptances():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.5)
    promised = core(c, 1).promised
    commit = core(c, 1).commit_index
    c.crash(1, power_cut=False)
    c.start(1)
    assert core(c, 1).promised == promised
    assert core(c, 1).commit_index >= commit
    assert node(c, 1).applier.applied == commit
    accepted = {slot: row.ballot for slot, row in c.disks[1].log.items() if row.ballot is not None}
    # A power cut may take the last chosen markers (written without fsync), never a promise
    # or an acceptance; the replica learns the chosen slots again from the leader.
    c.crash(1, power_cut=True)
    c.start(1)
    assert core(c, 1).promised == promised
    assert {s: row.ballot for s, row in c.disks[1].log.items() if row.ballot is not None} == accepted
    run(c, net, 0.5)
    assert core(c, 1).commit_index >= commit


# ----------------------------------------------------------------------
# Phase 1 and phase 2


def _disk(promised: Ballot, rows: dict[int, LogRow]) -> DurableState:
    d = DurableState(promised=promised, log=dict(rows))
    d.apply([MarkInitialized()])
    return d


def test_new_leader_reproposes_highest_accepted_and_fills_holes():
    a, b, cc = (Batch(items=(Tick(now=t, data=("td", 1, t)),)) for t in (1.0, 2.0, 3.0))
    disks = [
        _disk(Ballot(2, 1), {1: LogRow(Ballot(1, 2), a, False)}),
        _disk(Ballot(2, 1), {1: LogRow(Ballot(2, 1), b, False), 3: LogRow(Ballot(2, 1), cc, False)}),
        _disk(Ballot(2, 1), {}),
    ]
    # Replica 0's quorum is itself and replica 1 (whose Promise arrives first).
    c, net = make(3, disks=disks)
    elect(c, net, 0)
    # Slot 1: b (ballot 2.1 beats 1.2); slot 2: a hole, filled with a no-op; slot 3: cc.
    assert [core(c, 0).chosen_value(s) for s in (1, 2, 3)] == [b, NOOP, cc]
    run(c, net, 0.01)  # followers learn the commit index from the next heartbeat
    assert all(core(c, r).commit_index >= 3 for r in range(3))


def test_batching_and_pipelining():
    c, net = make(3, max_batch=3, max_inflight=4)
    elect(c, net, 0)
    start = core(c, 0).commit_index
    first = [submit(c, 0) for _ in range(4)]
    for _ in first:
        net.deliver(dst=0)
    # Pipelining: four slots in phase 2 at once, none chosen yet.
    slots = [p.slot for a in net.peek(Accept, src=0, dst=1) for p in a.proposals]
    assert slots == list(range(start + 1, start + 5))
    assert core(c, 0).commit_index == start
    # The pipeline is full: further commands wait, then travel together.
    more = [submit(c, 0, client=1) for _ in range(9)]
    for _ in more:
        net.deliver(dst=0)
    assert len(net.peek(Accept, src=0, dst=1)) == 4
    net.flush()
    sizes = [len(core(c, 0).chosen_value(s).items) for s in range(start + 5, start + 8)]
    assert sizes == [3, 3, 3], "batching: the waiting commands became full slots"
    for cmd in first + more:
        assert (cmd.client_id, cmd.seq) in c.checker.acked


def test_at_light_load_an_accept_goes_to_a_majority_only_and_the_rest_learn_by_catchup():
    c, net = make(5)
    elect(c, net, 0)
    run(c, net, 0.2)  # everyone answers heartbeats
    net.delivered.clear()
    cmd = submit(c, 0)
    net.deliver(dst=0)
    asked = sorted(d for d in range(1, 5) if net.peek(Accept, src=0, dst=d))
    assert len(asked) == 2, "the leader and two followers are a majority of five"
    net.flush_until(lambda: (cmd.client_id, cmd.seq) in c.checker.acked)
    slot = core(c, 0).commit_index
    others = [d for d in range(1, 5) if d not in asked]
    assert all(core(c, d).commit_index < slot for d in others)
    run(c, net, 3 * HB)  # heartbeats carry the commit index; the others catch up
    assert all(core(c, d).commit_index >= slot for d in others)
    assert any(isinstance(m, CatchupReply) and d in others for s, d, m in net.delivered)
    assert not any(
        isinstance(m, Accept) and d in others and any(p.slot == slot for p in m.proposals) for s, d, m in net.delivered
    )


def test_with_three_replicas_a_follower_learns_a_slot_once_its_and_the_leaders_acceptance_are_durable():
    """Two durable acceptances at one ballot are a quorum of three: the follower
    learns the slot without waiting for the commit index, but not from one half."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    submit(c, 0)
    net.deliver(dst=0)
    [accept] = net.peek(Accept, src=0, dst=1)
    [slot] = [p.slot for p in accept.proposals]
    [echo] = net.peek(Accepted, src=0, dst=1)  # released by the leader's own write
    assert echo.slots == (slot,) and echo.ballot == accept.ballot
    assert not net.peek(Accepted, src=0, dst=2), "only the follower asked gets it"
    net.deliver(Accepted, src=0, dst=1)  # the leader's half first: not enough
    assert core(c, 1).commit_index < slot
    net.deliver(Accept, src=0, dst=1)  # the follower's own acceptance, durable in this pass
    assert core(c, 1).commit_index == slot
    assert core(c, 1).chosen_value(slot) == accept.proposals[0].value
    assert core(c, 0).commit_index < slot, "the leader has not heard the follower yet"
    c.check_step()


def test_a_leaders_acceptance_of_another_ballot_teaches_a_follower_nothing():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    submit(c, 0)
    net.deliver(dst=0)
    [echo] = net.peek(Accepted, src=0, dst=1)
    net.deliver(Accept, src=0, dst=1)
    net.drop(Accepted, src=0, dst=1)
    before = core(c, 1).commit_index
    stale = Ballot(echo.ballot.round - 1, 0)
    c.deliver(0, 1, Accepted(ballot=stale, slots=echo.slots))  # not the ballot the follower accepted at
    c.deliver(2, 1, Accepted(ballot=echo.ballot, slots=echo.slots))  # nor from the ballot's leader
    assert core(c, 1).commit_index == before


def test_a_pre_vote_from_a_replica_that_knows_fewer_chosen_slots_is_refused():
    """Regression (simulator seed 299 of three): a leader whose followers learned slots
    before it did, and compacted them, kept campaigning (it could not lead until it
    caught up) and kept resetting their timers: nobody led again."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    submit(c, 0)
    net.flush()
    known = core(c, 1).commit_index
    assert known > 0
    c.now += 8 * ET  # replica 1 has lost its leader
    c.tick(1)
    net.queue.clear()
    c.deliver(2, 1, PreVote(round=50, commit=known - 1))
    c.deliver(2, 1, PreVote(round=51, commit=known))
    assert [m.granted for m in net.peek(PreVoteReply, src=1, dst=2)] == [False, True]


def test_a_pre_vote_shows_the_round_in_use_and_the_next_pre_vote_goes_above_it():
    """Regression (hypothesis state machine, seed 0): the replica knowing most chosen
    slots asked for pre-votes at a round the other live replica had already promised,
    and refused that replica's pre-votes for knowing fewer: nothing told it of the
    promise, each refused the other for ever, and nobody led."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    c.crash(0)
    net.queue.clear()
    c.now += 8 * ET  # replica 2 has lost its leader
    c.deliver(1, 2, PreVote(round=7, commit=10_000))  # refused or not, round 6 is in use
    net.queue.clear()
    c.tick(2)
    (prevote, _) = net.peek(PreVote, src=2)
    assert prevote.round == 7


def test_with_five_replicas_the_leader_tells_those_that_accepted_at_once():
    """A quorum of five needs more than the follower and the leader: the followers
    that accepted get the commit index right away (their digests confirm the
    leader's answers); the others at the next tick."""
    c, net = make(5)
    elect(c, net, 0)
    run(c, net, 0.2)
    net.delivered.clear()
    cmd = submit(c, 0)
    net.deliver(dst=0)
    assert not net.peek(Accepted, src=0), "no leader acceptances sent with five replicas"
    asked = sorted(d for d in range(1, 5) if net.peek(Accept, src=0, dst=d))
    for d in asked:
        net.deliver(Accept, src=0, dst=d)
    for d in asked:
        net.deliver(Accepted, src=d, dst=0)
    slot = core(c, 0).commit_index
    assert {d for d in range(1, 5) if [m for m in net.peek(Heartbeat, src=0, dst=d) if m.commit == slot]} == set(asked)
    net.flush_until(lambda: (cmd.client_id, cmd.seq) in c.checker.acked)


def test_thrifty_asks_the_lowest_numbered_healthy_follower_and_tells_the_other_at_the_next_tick():
    c, net = make(3)
    elect(c, net, 2)
    run(c, net, 0.2)
    cmd = submit(c, 2)
    net.deliver(dst=2)
    assert net.peek(Accept, src=2, dst=0) and not net.peek(Accept, src=2, dst=1)
    assert core(c, 2).accepting == (0,) and core(c, 0).accepting == ()
    net.flush_until(lambda: (cmd.client_id, cmd.seq) in c.checker.acked)
    slot = core(c, 2).commit_index
    submit(c, 2)  # the next command's Accept goes to replica 0 only
    net.deliver(dst=2)
    net.drop(Heartbeat)
    c.tick(2)  # the next tick, well before the regular heartbeat
    assert [m.commit for m in net.peek(Heartbeat, src=2, dst=1)] == [slot]
    assert not net.peek(Heartbeat, src=2, dst=0)  # the Accept told replica 0
    net.flush()
    assert core(c, 1).commit_index >= slot
    # Replica 0 goes quiet: after two heartbeat intervals replica 1 is asked instead.
    run(c, net, 3 * HB, among={1, 2} | {cl.cid for cl in c.clients})
    submit(c, 2)
    net.deliver(dst=2)
    (new,) = [p.slot for a in net.peek(Accept, src=2, dst=1) for p in a.proposals if p.slot > slot + 1]
    assert not [p for a in net.peek(Accept, src=2, dst=0) for p in a.proposals if p.slot == new]


def test_with_slots_in_flight_an_accept_goes_to_every_follower():
    c, net = make(3, max_batch=1)
    elect(c, net, 0)
    submit(c, 0)
    net.deliver(dst=0)
    assert len([d for d in (1, 2) if net.peek(Accept, src=0, dst=d)]) == 1  # light load
    submit(c, 0, client=1)
    net.deliver(dst=0)  # the first slot is still in flight
    second = core(c, 0).commit_index + 2
    for d in (1, 2):
        assert any(p.slot == second for a in net.peek(Accept, src=0, dst=d) for p in a.proposals)
    assert sorted(core(c, 0).accepting) == [1, 2]


def test_a_slot_its_followers_leave_unanswered_goes_to_every_peer_a_heartbeat_later():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    cmd = submit(c, 0)
    net.deliver(dst=0)
    (asked,) = [d for d in (1, 2) if net.peek(Accept, src=0, dst=d)]
    other = 3 - asked
    net.drop(dst=asked)  # the follower asked is cut off
    run(c, net, 2 * HB, among={0, other} | {cl.cid for cl in c.clients})
    assert c.checker.acked[(cmd.client_id, cmd.seq)] == 1


def test_commit_index_reaches_followers_by_heartbeat():
    c, net = make(3)
    elect(c, net, 0)
    submit(c, 0)
    net.deliver(dst=0)
    net.deliver(Accept, src=0, dst=1)
    net.deliver(Accepted, src=1, dst=0)
    target = core(c, 0).commit_index
    assert core(c, 1).commit_index < target
    net.drop(Accept)  # no later Accept will carry the commit index
    c.now += HB
    c.tick(0)
    net.deliver(Heartbeat, src=0, dst=1)
    assert core(c, 1).commit_index == target
    assert node(c, 1).applier.applied == target


def test_lagging_replica_catches_up():
    c, net = make(3, catchup_batch=4)
    elect(c, net, 0)
    run(c, net, 1.0, among={0, 1})
    net.drop(dst=2)
    net.drop(src=2)
    behind = core(c, 2).commit_index
    assert behind + 5 < core(c, 0).commit_index
    net.delivered.clear()
    run(c, net, 0.5)
    requests = [(s, d, m) for s, d, m in net.delivered if isinstance(m, CatchupRequest)]
    assert requests and requests[0][:2] == (2, 0) and requests[0][2].from_slot == behind + 1
    assert any(isinstance(m, CatchupReply) and d == 2 for s, d, m in net.delivered)
    assert core(c, 2).commit_index >= core(c, 0).commit_index - 2
    assert node(c, 2).applier.digest == c.checker.digests[node(c, 2).applier.applied]


def test_catchup_request_is_answered_with_chosen_entries():
    c, net = make(3, catchup_batch=4)
    elect(c, net, 0)
    run(c, net, 0.5)
    c.deliver(2, 1, CatchupRequest(from_slot=1))
    (reply,) = net.peek(CatchupReply, src=1, dst=2)
    assert [p.slot for p in reply.entries] == [1, 2, 3, 4]
    assert all(p.value == core(c, 1).chosen_value(p.slot) for p in reply.entries)


def test_slot_values_and_catchup_replies_are_bounded_in_bytes():
    bound = 600
    c, net = make(3, max_batch_bytes=bound)
    elect(c, net, 0)
    start = core(c, 0).commit_index
    blocks = [c.submit_block(c.clients[0], 0, 6) for _ in range(8)]
    for _ in blocks:
        net.deliver(dst=0)
    net.flush()
    values = [core(c, 0).chosen_value(s) for s in range(start + 1, core(c, 0).commit_index + 1)]
    held = [v for v in values if any(isinstance(i, CommandBlock) for i in v.items)]
    assert sum(len(v.items) for v in held) == 8
    assert len(held) > 1, "the blocks did not fit one slot value"
    assert all(len(codec.encode(v)) <= bound for v in held), [len(codec.encode(v)) for v in held]
    # A lagging replica asking from the first of them gets about max_batch_bytes per reply.
    c.deliver(2, 1, CatchupRequest(from_slot=start + 1))
    (reply,) = net.peek(CatchupReply, src=1, dst=2)
    assert 1 <= len(reply.entries) < len(values)
    assert sum(len(codec.encode(p.value)) for p in reply.entries) <= bound


def test_replica_behind_log_start_gets_snapshot():
    c, net = make(3, keep_after_snapshot=2)
    elect(c, net, 0)
    c.crash(2)
    run(c, net, 1.0, among={0, 1})
    c.compact(0)
    c.compact(1)
    net.drop(dst=2)
    net.drop(src=2)
    assert core(c, 0).log_start > 1
    net.queue.clear()
    c.start(2)
    run(c, net, 0.5)
    assert node(c, 2).applier.applied >= core(c, 0).log_start - 1
    assert c.disks[2].snapshot_index > 0
    assert core(c, 2).log_start == c.disks[2].snapshot_index + 1
    # It got there by a snapshot, and its state is the others' state.
    assert node(c, 2).applier.digest == c.checker.digests[node(c, 2).applier.applied]


def test_snapshot_install_is_sent_for_truncated_slots():
    c, net = make(3, keep_after_snapshot=1)
    elect(c, net, 0)
    run(c, net, 0.5)
    c.compact(1)
    net.flush()
    c.deliver(2, 1, CatchupRequest(from_slot=1))
    (snap,) = net.peek(SnapshotInstall, src=1, dst=2)
    assert snap.index == c.disks[1].snapshot_index


def test_a_snapshot_from_a_replica_that_is_not_the_leader_is_ignored():
    c, net = make(3, keep_after_snapshot=1)
    elect(c, net, 0)
    run(c, net, 0.5)
    before = core(c, 2).commit_index
    forged = SnapshotInstall(index=before + 50, data=b"anything")
    c.deliver(1, 2, forged)  # replica 1 follows 0 like replica 2: it is not the leader
    net.flush()
    assert core(c, 2).commit_index == before
    assert c.disks[2].snapshot_index == 0
    assert node(c, 2).applier.applied == before


def test_a_candidate_too_far_behind_to_lead_takes_the_snapshot_of_the_promiser_it_asked():
    """Regression (hypothesis state machine, seed 976): a candidate whose promiser had
    truncated slots it never learned stepped down and asked that promiser to catch it
    up, but refused the snapshot that came back (it followed no leader): it stayed
    behind, campaigned again, and nobody led."""
    c, net = make(3, keep_after_snapshot=1)
    elect(c, net, 0)
    c.crash(2)
    run(c, net, 1.0, among={0, 1})
    c.compact(1)
    c.crash(0)
    net.queue.clear()
    c.start(2)
    assert core(c, 1).log_start > 1 and core(c, 2).commit_index == 0
    c.now += 8 * ET  # both have lost the leader
    c.tick(1)
    net.queue.clear()
    c.tick(2)  # replica 2's pre-vote, granted by hand: it campaigns
    (prevote,) = net.peek(PreVote, src=2, dst=1)
    net.queue.clear()
    c.deliver(1, 2, PreVoteReply(round=prevote.round, granted=True))
    assert core(c, 2).role is Role.CANDIDATE
    net.flush(among={1, 2})
    assert core(c, 2).role is Role.FOLLOWER
    assert c.disks[2].snapshot_index == c.disks[1].snapshot_index > 0
    assert core(c, 2).commit_index >= c.disks[1].snapshot_index
    assert node(c, 2).applier.digest == c.checker.digests[node(c, 2).applier.applied]


def test_retried_command_is_applied_once():
    c, net = make(3)
    elect(c, net, 0)
    cmd = submit(c, 1)
    # The request is delivered, then delivered again (the client retried at replica 2).
    req = net.queue[net.find(dst=1)[0]]
    net.queue.append((req[0], 2, req[2]))
    net.queue.append((req[0], 0, req[2]))
    run(c, net, 1.0)
    for r in range(3):
        lst = node(c, r).applier.machine.apply(["get", cmd.op[1]], None)
        assert lst.count(cmd.op[2]) == 1
    # It was proposed three times: the log holds it three times, the state once.
    items = [i for i in applied_items(c, 0) if isinstance(i, Command)]
    assert items.count(cmd) == 3


def test_applier_dedups_and_answers_retries():
    ap = Applier(KVMachine())
    cmd = Command(client_id="a", seq=1, first_unacked=1, op=["append", "k", "x"])
    assert ap.apply_slot(1, Batch(items=(cmd,))) == [(cmd, 1)]
    # The retry gets the first answer and changes nothing.
    assert ap.apply_slot(2, Batch(items=(cmd, cmd))) == [(cmd, 1), (cmd, 1)]
    assert ap.machine.apply(["get", "k"], None) == ["x"]
    # After a snapshot the sessions survive.
    other = Applier(KVMachine())
    other.restore(ap.snapshot())
    assert other.apply_slot(3, Batch(items=(cmd,))) == [(cmd, 1)]
    ap.apply_slot(3, Batch(items=(cmd,)))
    assert other.digest == ap.digest
    assert other.machine.apply(["get", "k"], None) == ["x"]


def test_command_block_is_applied_once_per_command_however_it_is_resent():
    ap = Applier(KVMachine())
    first = CommandBlock.of("a", 1, 1, [["append", "k", 1], ["append", "k", 2], ["append", "k", 3]])
    out = ap.apply_slot(1, Batch(items=(first,)))
    assert out == [(first, [1, 2, 3])]
    # The client resends seqs 2..4 in one block (3 was answered elsewhere, 4 is new).
    again = CommandBlock.of("a", 2, 2, [["append", "k", 2], ["append", "k", 3], ["append", "k", 4]])
    out = ap.apply_slot(2, Batch(items=(again, first)))
    assert out[0] == (again, [2, 3, 4])
    # seq 1 is below first_unacked now: its result is forgotten.
    assert out[1] == (first, [DUPLICATE, 2, 3])
    assert ap.machine.apply(["get", "k"], None) == [1, 2, 3, 4]
    # A block and single commands share one session.
    single = Command(client_id="a", seq=4, first_unacked=2, op=["append", "k", 4])
    assert ap.apply_slot(3, Batch(items=(single,))) == [(single, 4)]
    # Replicas that decoded the block from bytes reach the same digest.
    other = Applier(KVMachine())
    for slot, items in enumerate([(first,), (again, first), (single,)], 1):
        copies = tuple(codec.decode_untrusted(codec.encode(i)) for i in items)
        other.apply_slot(slot, Batch(items=copies))
    assert other.digest == ap.digest


def test_command_block_with_undecodable_ops_is_refused():
    bad = CommandBlock(client_id="a", first_seq=1, ops=b"\xff\x00")
    with pytest.raises(codec.BadMessage):
        bad.op_list()
    empty = CommandBlock(client_id="a", first_seq=1, ops=codec.encode([]))
    with pytest.raises(codec.BadMessage, match="non-empty list"):
        empty.op_list()
    # Applying one anyway (only a broken peer could propose it) skips it on every replica alike.
    ap = Applier(KVMachine())
    assert ap.apply_slot(1, Batch(items=(bad,))) == [(bad, [])]


# ----------------------------------------------------------------------
# TICK


def test_ticks_at_the_configured_interval_carry_the_leaders_clock():
    c, net = make(3, tick_interval=0.1)
    c.clock_offset[0] = 1000.0  # the leader's clock reads 1000 s ahead of the others
    elect(c, net, 0)
    run(c, net, 1.0, dt=0.01)
    ticks = [i for i in applied_items(c, 1) if isinstance(i, Tick)]
    assert 9 <= len(ticks) <= 12
    gaps = [b.now - a.now for a, b in zip(ticks, ticks[1:])]
    assert all(0.1 - 1e-9 <= g <= 0.1 + 0.01 + 1e-9 for g in gaps), gaps
    assert all(t.now > 1000.0 and t.data[1] == 0 for t in ticks)


# ----------------------------------------------------------------------
# Leader change, wiped disks


def test_leader_change_preserves_everything_chosen():
    c, net = make(3)
    elect(c, net, 0)
    cmds = [submit(c, 0) for _ in range(3)]
    run(c, net, 0.5)
    chosen = {s: core(c, 0).chosen_value(s) for s in range(1, core(c, 0).commit_index + 1)}
    # One more slot accepted by replica 1 only, then the leader dies.
    late = submit(c, 0)
    net.deliver(dst=0)
    net.deliver(Accept, src=0, dst=1)
    net.drop(src=0)
    c.crash(0)
    elect(c, net, 2, among={1, 2})
    run(c, net, 0.5, among={1, 2})
    for s, v in chosen.items():
        assert core(c, 2).chosen_value(s) == v
    items = applied_items(c, 2)
    assert all(cmd in items for cmd in cmds)
    assert late in items, "a value a follower accepted must survive the leader change"


def test_wiped_replica_neither_votes_nor_accepts_until_recovered():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.5)
    c.crash(2, wipe=True)
    c.start(2)
    assert core(c, 2).role is Role.RECOVERING
    # While recovering it ignores Prepare and Accept.
    c.deliver(1, 2, Prepare(ballot=Ballot(9, 1), from_slot=1))
    c.deliver(0, 2, Accept(ballot=core(c, 0).ballot, proposals=(), commit=0))
    assert not net.peek(Promise, src=2) and not net.peek(Accepted, src=2)
    assert c.disks[2].promised < Ballot(9, 1)
    run(c, net, 1.0)
    assert core(c, 2).role is Role.FOLLOWER
    assert c.disks[2].initialized
    # The leader re-ran phase 1 above everything the others had promised.
    assert core(c, 2).promised == core(c, 0).ballot
    assert core(c, 2).commit_index >= core(c, 0).commit_index - 2
    # Now it votes and accepts again.
    net.queue.clear()
    c.crash(0)
    elect(c, net, 2, among={1, 2})
    assert core(c, 2).role is Role.LEADER


def test_a_recovering_replica_grants_no_pre_vote():
    """Regression (hypothesis state machine, seed 976): a wiped replica's empty log
    supported any candidate, and so let one too far behind to lead keep campaigning."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.5)
    c.crash(2, wipe=True)
    c.start(2)
    c.crash(0)
    c.now += 8 * ET
    c.tick(2)
    net.queue.clear()
    c.deliver(1, 2, PreVote(round=50, commit=10_000))
    assert core(c, 2).role is Role.RECOVERING
    assert [m.granted for m in net.peek(PreVoteReply, src=2, dst=1)] == [False]


def test_wiped_replica_waits_for_a_leader_above_its_floor():
    """Regression (seed 21): a follower answered the recovery query after
    promising the leader's new ballot, so the floor equalled the leader's
    ballot; the replica never asked again and stayed recovering forever."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.5)
    c.crash(2, wipe=True)
    c.start(2)
    # The leader bumps its ballot on the query; replica 1 promises it before it answers.
    net.deliver(RecoverQuery, src=2, dst=0)
    net.flush(among={0, 1})
    net.flush()
    assert core(c, 2).promised == core(c, 0).ballot  # floor == the leader's ballot
    run(c, net, 1.0)
    assert core(c, 2).role is Role.FOLLOWER


def test_recovery_ignores_answers_to_an_earlier_life():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.3)
    c.crash(2, wipe=True)
    c.start(2)
    (query,) = net.peek(RecoverQuery, src=2, dst=1)
    net.queue.clear()
    c.crash(2, wipe=True)
    c.start(2)
    # An answer to the first life's query says "empty": it must not count now.
    c.deliver(1, 2, RecoverReply(nonce=query.nonce, promised=Ballot(0, -1), empty=True))
    c.deliver(0, 2, RecoverReply(nonce=query.nonce, promised=Ballot(0, -1), empty=True))
    assert core(c, 2).role is Role.RECOVERING


def test_stale_leader_ignores_catchup_reply():
    """Regression: a leader that learned a slot from a (late) CatchupReply put it
    under its commit index, and a follower that had accepted that leader's own,
    different, proposal for the slot then learned the wrong value from it."""
    c, net = make(5, catchup_batch=1000)
    elect(c, net, 1)
    run(c, net, 0.3)
    # Replica 2 falls behind, and asks leader 1 for the missing entries; the request is slow.
    run(c, net, 0.5, among={0, 1, 3, 4})
    net.drop(src=2)
    net.drop(dst=2)
    c.now += HB
    c.tick(1)
    net.deliver(Heartbeat, src=1, dst=2)
    held = net.queue.pop(net.find(CatchupRequest, src=2, dst=1)[0])
    net.drop(dst=2)
    net.drop(src=2)
    net.flush()
    # Leader 1 hands over to replica 2 (as on SIGTERM) and is cut off; replica 2 wins
    # phase 1 with 0 and 3 although it is behind (a pre-vote would not have elected
    # it: its peers know more chosen slots).
    first = core(c, 1).ballot
    c.deliver(1, 2, TimeoutNow(ballot=first))
    net.flush_until(lambda: core(c, 2).role is Role.LEADER, among={0, 2, 3})
    stale = core(c, 2).ballot
    # Its proposals (including one for a new slot) reach replica 3 only.
    top = core(c, 0).commit_index
    c.tick(2)  # its first TICK entry
    # Whichever followers it asked (at light load only a majority), replica 3 gets them all.
    sent = list({id(m): m for m in net.peek(Accept, src=2)}.values())
    mine = [p for a in sent for p in a.proposals]
    for msg in sent:
        c.deliver(2, 3, msg)
    slot = max(p.slot for p in mine)
    assert slot > top
    net.queue = [m for m in net.queue if isinstance(m[2], Prepare) and m[1] == 4]
    net.deliver(Prepare, dst=4)  # replica 4 learns the round; its Promise is lost
    net.queue.clear()
    # Replica 4 leads a higher ballot with 0 and 1, and chooses its own value for that slot.
    # (Its peers know more chosen slots than it does too: it runs phase 1 at once,
    # as on a handover from its old leader 1; replica 3's phase-1 vote is lost.)
    c.now += 2 * ET
    c.tick(4)
    net.drop(PreVote, src=4)
    c.deliver(1, 4, TimeoutNow(ballot=first))
    assert core(c, 4).role is Role.CANDIDATE
    net.drop(dst=3)
    net.drop(dst=2)
    net.flush(among={0, 1, 4})
    assert core(c, 4).role is Role.LEADER and core(c, 4).ballot > stale
    for _ in range(2):  # its proposals are chosen; the next heartbeat tells replica 1
        c.now += HB
        c.tick(4)
        net.flush(among={0, 1, 4})
    theirs = core(c, 1).chosen_value(slot)
    assert theirs is not None and theirs != c.disks[3].log[slot].value
    # The slow request finally reaches replica 1; its answer reaches stale leader 2.
    net.queue.clear()
    c.deliver(*held)
    late = net.deliver(CatchupReply, src=1, dst=2)
    assert slot in [p.slot for p in late.entries], "the late reply carries the slot the leaders disagree on"
    assert core(c, 2).role is Role.LEADER and core(c, 2).commit_index < slot  # it ignored the reply
    # Leader 2 takes a client command and sends it (with its commit index) to replica 3.
    submit(c, 2)
    net.deliver(dst=2)
    accepts = net.peek(Accept, src=2, dst=3)
    assert accepts and all(a.commit < slot for a in accepts)
    for msg in accepts:
        c.deliver(2, 3, msg)  # the checker raises here if 3 learns its own stale value
    assert core(c, 3).chosen_value(slot) is None  # cut off from leader 4, it cannot know the chosen value


def test_new_cluster_needs_every_replica_to_answer():
    """A wiped replica must not conclude "new cluster" from a majority: the
    candidate outside that majority may hold the promise it forgot.  Here
    replica 0 promised ballot 1.4, lost its disk, and heard "empty" from 1, 2
    and 3; had it started, 1.3 and 1.4 would both have chosen a value for slot 1."""
    c, net = make(5, fresh=True)
    net.flush_until(lambda: all(core(c, r).role is Role.FOLLOWER for r in range(5)))
    net.drop(PreVote)  # replica 0's at-once campaign as a new cluster's first candidate: lost
    net.flush()
    assert all(core(c, r).role is Role.FOLLOWER for r in range(5))
    c.now += 2 * ET
    for r in range(4):
        c.tick(r)
        net.drop(PreVote, src=r)
    c.tick(4)
    net.flush_until(lambda: core(c, 4).role is Role.CANDIDATE)
    net.deliver(Prepare, dst=0)
    ghost = net.queue.pop(net.find(Promise, src=0, dst=4)[0])  # replica 0's promise, still on its way
    late_prepare = net.queue.pop(net.find(Prepare, dst=2)[0])
    net.queue.clear()
    c.crash(0, wipe=True)
    c.start(0)
    for r in (1, 2, 3):
        net.deliver(RecoverQuery, src=0, dst=r)
        net.deliver(RecoverReply, src=r, dst=0)
    net.queue.clear()  # replica 4's answer is slow
    # Replica 3 campaigns below 1.4 and chooses its value for slot 1.
    c.now += 2 * ET
    for r in (0, 1, 2):
        c.tick(r)
        net.drop(PreVote, src=r)
    c.tick(3)
    # (Replica 0, recovering, refuses its pre-vote: 3 needs 1's and 2's.)
    net.flush_until(lambda: core(c, 3).role is Role.CANDIDATE, among={0, 1, 2, 3})
    net.deliver(Prepare, src=3, dst=0)
    net.deliver(Prepare, src=3, dst=1)
    net.flush(among={0, 1, 3})
    assert core(c, 3).role is Role.CANDIDATE  # replica 0 does not vote yet: 3 needs 2
    quorum = {1, 2, 3}
    net.deliver(Prepare, src=3, dst=2)
    net.flush(among=quorum)
    assert core(c, 3).role is Role.LEADER
    c.tick(3)
    net.flush(among=quorum)
    # At light load the leader asks only as many followers as a majority
    # needs; a slot they leave unanswered goes to every peer one heartbeat on.
    c.now += HB
    c.tick(3)
    net.flush(among=quorum)
    assert core(c, 3).commit_index >= 1
    # The slow Prepare of 1.4 and the forgotten promise arrive: 1.4 completes phase 1.
    net.queue.clear()
    c.deliver(*late_prepare)
    c.deliver(*ghost)
    net.flush(among={2, 4})
    assert core(c, 4).role is Role.LEADER and core(c, 4).ballot == Ballot(1, 4)
    submit(c, 4)
    net.deliver(dst=4)
    net.flush(among={0, 1, 2, 4})  # the checker raises if 1.4 chooses another value
    assert core(c, 4).commit_index >= 1
    assert core(c, 4).chosen_value(1) == core(c, 3).chosen_value(1) is not None
    run(c, net, 1.0)
    assert core(c, 0).role is Role.FOLLOWER  # once 4 answered too


# ----------------------------------------------------------------------
# The core's parts on their own


def test_output_buffer_holds_a_reply_until_its_ready_and_every_earlier_one_is_durable():
    out = OutputBuffer()
    out.reply_durable(1, "vote-1")
    first = out.take(())
    out.send(2, "heartbeat")
    out.reply_durable(1, "vote-2")
    second = out.take(())
    assert first.sync and second.sync and second.messages == ((2, "heartbeat"),)
    assert "vote-1" not in [m for _, m in first.messages + second.messages]
    assert out.release(Ready((), (), None, (), True, 0)) == []  # nothing durable yet
    # Advancing the later Ready releases both, oldest first.
    assert out.release(second) == [(1, "vote-1"), (1, "vote-2")]
    assert out.release(second) == [] and not out.has_output()


def test_recovery_counts_only_replies_of_this_life_and_needs_everyone_for_a_new_cluster():
    rec = Recovery.for_life(5, 3, random.Random(3))
    query = rec.next_query(0.0)
    old = RecoverReply(nonce=query.nonce - 1, promised=Ballot(9, 1), empty=False)  # a query of an earlier life
    assert rec.on_reply(1, old) is Verdict.NOTHING_YET and rec.floor is None
    empty = RecoverReply(nonce=query.nonce, promised=Ballot(2, 3), empty=True)
    for src in (1, 2, 3):  # a majority of empty replicas is not enough
        assert rec.on_reply(src, empty) is Verdict.NOTHING_YET
    assert rec.on_reply(4, empty) is Verdict.NEW_CLUSTER
    assert rec.highest_promise() == Ballot(2, 3)

    rec = Recovery.for_life(3, 2, random.Random(4))
    query = rec.next_query(0.0)
    assert rec.on_reply(1, RecoverReply(nonce=query.nonce, promised=Ballot(5, 2), empty=False)) is Verdict.NOTHING_YET
    assert rec.on_reply(2, RecoverReply(nonce=query.nonce, promised=Ballot(4, 0), empty=True)) is Verdict.FLOOR_KNOWN
    assert rec.floor == Ballot(5, 2)
    rec.heard_leader(Ballot(5, 2), phase1_top=7)  # not above the floor: no target
    assert not rec.is_complete(Ballot(5, 2), 100)
    rec.heard_leader(Ballot(6, 1), phase1_top=7)
    assert not rec.is_complete(Ballot(6, 1), 6) and rec.is_complete(Ballot(6, 1), 7)


def test_election_counts_a_prevote_only_for_the_current_round_and_only_if_granted():
    el = Election(0.3, 2, random.Random(5))
    el.saw_round(4)
    round_ = el.start_prevote(0, promised_round=2, now=1.0, retry=0.05)
    assert round_ == 5 and el.prevote_retry_at == 1.05
    assert not el.count_prevote(1, PreVoteReply(round=4, granted=True))  # a stale round
    assert not el.count_prevote(1, PreVoteReply(round=5, granted=False))
    assert el.count_prevote(1, PreVoteReply(round=5, granted=True))
    assert not el.is_expired(1.0 + 0.3 - 1e-9) and el.is_expired(1.0 + 0.6)


def test_election_timeout_stretches_with_measured_leader_gaps_and_ignores_outages():
    el = Election(0.15, 2, random.Random(5))
    now = 1.0
    for _ in range(20):  # regular heartbeats every 30 ms: the configured minimum holds
        now += 0.03
        el.heard_leader(3, now)
    assert el.timeout == 0.15
    now += 0.2  # one heartbeat 200 ms late (a retransmission): twice that, from now on
    el.heard_leader(3, now)
    assert el.timeout == pytest.approx(0.4)
    assert not el.is_leader_lost(now + 0.39) and el.is_leader_lost(now + 0.41)
    now += 2.0  # a 2 s outage is not jitter: not counted
    el.heard_leader(3, now)
    assert el.timeout == pytest.approx(0.4)
    now += 0.5  # a gap under a new leader's ballot is a leader change, not counted either
    el.heard_leader(4, now)
    assert el.timeout == pytest.approx(0.4)
    for _ in range(200):  # two windows of regular heartbeats: back to the minimum
        now += 0.03
        el.heard_leader(4, now)
    assert el.timeout == 0.15
    for _ in range(3):  # stretched at most GAP_CAP times
        now += 0.59
        el.heard_leader(4, now)
    assert el.timeout == pytest.approx(0.6)


def test_a_refused_prevote_is_asked_again_every_heartbeat_while_the_leader_is_lost():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.5)
    # The leader dies; replica 1 campaigns first, but replica 2 refuses it once (it heard the leader later).
    c.now += 2 * ET + 1e-3
    c.tick(1)
    first = net.peek(PreVote, src=1, dst=2)
    assert first
    net.drop(PreVote, src=1)
    c.deliver(1, 2, PreVoteReply(round=first[-1].round, granted=False))
    assert core(c, 1).role is Role.FOLLOWER
    c.now += HB
    c.tick(1)
    again = net.peek(PreVote, src=1, dst=2)
    assert again and again[-1].round == first[-1].round  # the same pre-vote, asked again


def test_a_leader_going_away_hands_over_without_an_election_timeout():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    target = core(c, 0).hand_over()
    assert target in (1, 2) and core(c, 0).role is Role.FOLLOWER
    c.drain(0)
    [msg] = net.peek(TimeoutNow, src=0, dst=target)
    assert msg.ballot == core(c, 0).promised
    # No time passes: the follower takes over on the message alone.
    net.flush_until(lambda: core(c, target).role is Role.LEADER, among={0, 1, 2})
    assert core(c, target).ballot > msg.ballot
    assert core(c, 1).hand_over() is None or target == 1  # a follower has nothing to hand over


def test_timeout_now_is_taken_only_from_the_leader_followed_at_its_ballot():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    ballot = core(c, 0).promised
    c.deliver(2, 1, TimeoutNow(ballot=ballot))  # not from the leader
    c.deliver(0, 1, TimeoutNow(ballot=Ballot(ballot.round - 1, 0)))  # an older ballot
    assert core(c, 1).role is Role.FOLLOWER and not net.peek(Prepare, src=1)


# ----------------------------------------------------------------------
# A Promise larger than a frame


def _accepted_only(c: Cluster, net: ManualNet, count: int) -> list[Command]:
    """Replica 0 leads; ``count`` commands are accepted by replicas 1 and 2, never chosen."""
    elect(c, net, 0)
    run(c, net, 0.3)
    cmds = []
    for _ in range(count):
        cmds.append(submit(c, 0))
        net.deliver(dst=0)
        c.tick(0)
        while net.find(Accept, src=0):
            net.deliver(Accept, src=0)
        net.drop(Accepted)  # the leader never hears: nothing more is chosen
    return cmds


def test_a_promise_over_the_frame_cap_arrives_in_parts_and_the_candidate_still_wins():
    """Finding 4: a Promise carrying more accepted values than a frame holds
    used to be dropped at the sender, and no candidate could win a majority."""
    c, net = make(3, max_inflight=64)
    c.frame_cap = 600
    cmds = _accepted_only(c, net, 12)
    whole = core(c, 2)._promise_for(Prepare(ballot=Ballot(9, 1), from_slot=core(c, 1).commit_index + 1))
    assert len(whole.accepted) >= 8 and len(codec.encode(whole)) > c.frame_cap
    net.drop(src=0)
    c.crash(0)
    c.now += 2 * ET + 0.01
    c.tick(2)
    net.drop(PreVote, src=2)
    c.tick(1)
    net.flush_until(lambda: bool(net.find(Promise, src=2, dst=1)), among={1, 2})
    parts = net.peek(Promise, src=2, dst=1)
    assert len(parts) > 1 and all(len(codec.encode(p)) <= c.frame_cap for p in parts)
    # Until the last part is in, replica 1 must not lead: it would miss accepted values.
    for _ in parts[:-1]:
        net.deliver(Promise, src=2, dst=1)
        assert core(c, 1).role is Role.CANDIDATE
    net.deliver(Promise, src=2, dst=1)
    assert core(c, 1).role is Role.LEADER
    run(c, net, 1.0, among={1, 2})
    assert c.oversized_dropped == 0
    items = applied_items(c, 1)
    assert all(cmd in items for cmd in cmds), "every value a majority accepted survives the leader change"


def test_a_candidate_missing_one_part_asks_again_and_wins_on_the_resent_parts():
    c, net = make(3, max_inflight=64)
    c.frame_cap = 600
    cmds = _accepted_only(c, net, 12)
    net.drop(src=0)
    c.crash(0)
    c.now += 2 * ET + 0.01
    c.tick(2)
    net.drop(PreVote, src=2)
    c.tick(1)
    net.flush_until(lambda: bool(net.find(Promise, src=2, dst=1)), among={1, 2})
    lost = net.find(Promise, src=2, dst=1)[1]
    net.queue.pop(lost)  # one middle part is lost
    net.flush(among={1, 2})
    assert core(c, 1).role is Role.CANDIDATE
    run(c, net, 1.0, among={1, 2})  # the Prepare goes again; a fresh set of parts comes back
    assert core(c, 1).role is Role.LEADER or core(c, 2).role is Role.LEADER
    items = applied_items(c, 1)
    assert all(cmd in items for cmd in cmds)


def test_promise_parts_tile_the_slots_and_give_the_outcome_of_the_whole():
    values = {s: Batch(items=(Command(client_id="c", seq=s, op=["append", "k", "v" * 50]),)) for s in range(3, 40)}
    whole = Promise(
        ballot=Ballot(5, 1),
        log_start=1,
        accepted=tuple(AcceptedValue(slot=s, ballot=Ballot(s % 4, 0), value=v) for s, v in values.items() if s % 3),
        chosen=tuple(Proposal(slot=s, value=v) for s, v in values.items() if not s % 3),
    )
    parts = [whole]
    while any(p.halves() for p in parts) and len(parts) < 64:
        parts = [h for p in parts for h in (p.halves() or (p,))]
    assert len(parts) > 8
    spans = sorted((p.span_from, p.span_to) for p in parts)
    assert spans[0][0] == 1 and spans[-1][1] == LAST_SLOT
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:])), "the spans tile the slots"
    for p in parts:
        assert all(p.span_from <= e.slot <= p.span_to for e in (*p.accepted, *p.chosen))
    other = Promise(ballot=Ballot(5, 1), log_start=1)
    reference = Phase1(Ballot(5, 1), from_slot=2)
    reference.add(1, whole)
    reference.add(2, other)
    split = Phase1(Ballot(5, 1), from_slot=2)
    split.add(2, other)
    random.Random(3).shuffle(parts)
    for i, p in enumerate(parts):
        assert not split.has(1) and split.count == 1, "an acceptor counts only once every part is in"
        split.add(1, p)
        assert split.has(1) == (i == len(parts) - 1)
    assert split.outcome() == reference.outcome()


def test_a_promise_part_counts_only_for_the_slots_of_its_span():
    v = Batch(items=(Command(client_id="c", seq=1, op=["append", "k", "v"]),))
    p1 = Phase1(Ballot(5, 1), from_slot=1)
    # A part claiming slots 1-3 that smuggles a value for slot 7: ignored there.
    p1.add(
        1,
        Promise(
            ballot=Ballot(5, 1), log_start=1, span_to=3, accepted=(AcceptedValue(slot=7, ballot=Ballot(4, 0), value=v),)
        ),
    )
    p1.add(1, Promise(ballot=Ballot(5, 1), log_start=1, span_from=4))
    assert p1.has(1)
    assert p1.outcome() == ({}, {}, 0)
    with pytest.raises(ValueError):
        Promise(ballot=Ballot(5, 1), log_start=1, span_from=9, span_to=3)


def test_a_leader_whose_connection_closed_is_replaced_without_an_election_timeout():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    old = core(c, 0).ballot
    c.crash(0)
    # No time passes: the followers see the dead leader's connections close.
    core(c, 1).peer_closed(0)
    core(c, 2).peer_closed(0)
    c.drain(1)
    c.drain(2)
    net.flush_until(lambda: bool(leaders(c)), among={1, 2})
    [new] = leaders(c)
    assert new in (1, 2) and core(c, new).ballot > old
    run(c, net, 0.5, among={1, 2}, ticking={1, 2})
    assert leaders(c) == [new]


def test_a_closed_connection_does_not_depose_a_leader_the_others_still_hear():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    ballot = core(c, 0).ballot
    core(c, 1).peer_closed(0)
    c.drain(1)
    assert net.peek(PreVote, src=1)  # it asks at once ...
    net.flush()
    # ... and replica 2, which hears the leader, refuses: nothing moves.
    assert leaders(c) == [0] and core(c, 1).promised == ballot and core(c, 2).promised == ballot
    run(c, net, 1.0)
    assert leaders(c) == [0] and core(c, 0).ballot == ballot and core(c, 1).leader_hint == 0


def test_a_closed_connection_of_a_peer_that_does_not_lead_changes_nothing():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    for r, other in ((1, 2), (0, 1), (1, 1), (1, 7)):
        core(c, r).peer_closed(other)
        c.drain(r)
    assert not net.peek(PreVote) and leaders(c) == [0]


def test_a_late_prevote_grant_does_not_start_a_campaign_against_a_promised_candidate():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    c.crash(0)
    core(c, 1).peer_closed(0)
    core(c, 2).peer_closed(0)
    c.drain(1)
    c.drain(2)
    # Replica 2 grants replica 1's pre-vote (the grant is slow to arrive) ...
    net.deliver(PreVote, src=1, dst=2)
    assert net.peek(PreVoteReply, src=2, dst=1)[-1].granted
    # ... but its own pre-vote wins first, and replica 1 promises its ballot.
    net.deliver(PreVote, src=2, dst=1)
    net.deliver(PreVoteReply, src=1, dst=2)
    c.drain(2)
    net.flush_until(lambda: bool(net.peek(Prepare, src=2, dst=1)))
    net.deliver(Prepare, src=2, dst=1)
    promised = core(c, 1).promised
    assert promised.rid == 2
    # The grant of replica 1's pre-vote arrives now: 1 does not campaign against the ballot it promised.
    net.deliver(PreVoteReply, src=2, dst=1)
    c.drain(1)
    assert not net.peek(Prepare, src=1) and core(c, 1).promised == promised
    net.flush_until(lambda: core(c, 2).role is Role.LEADER, among={1, 2})
    assert core(c, 2).ballot == promised


def test_a_command_submitted_during_a_fresh_election_is_held_and_committed_by_the_new_leader():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    c.crash(0)
    core(c, 1).peer_closed(0)
    core(c, 2).peer_closed(0)
    c.drain(1)
    c.drain(2)
    assert core(c, 1).electing and core(c, 1).leader_hint is None
    client = c.clients[0]
    cmd = submit(c, 1)
    net.deliver(src=client.cid, dst=1)
    # Held, not refused: no answer went back to the client yet.
    assert cmd.seq in client.outstanding and not net.peek(src=1, dst=client.cid)
    net.flush_until(lambda: bool(leaders(c)), among={1, 2, client.cid})
    # No time passes before the leader is known; the commit reaches replica 1 with the next heartbeat.
    run(c, net, 0.1, among={1, 2}, ticking={1, 2})
    assert cmd.seq not in client.outstanding and not core(c, 1).electing
    assert client.results[cmd.seq] is not None


def test_a_campaign_is_fresh_for_one_election_timeout_only():
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    core(c, 1).peer_closed(0)
    c.drain(1)
    net.drop(PreVote, src=1)  # nobody answers: the campaign goes on
    assert core(c, 1).electing
    c.now += ET
    c.tick(1)
    assert not core(c, 1).electing and core(c, 1).leader_hint is None
    assert core(c, 0).electing is False  # a leader does not hold commands either


def test_a_leader_tick_before_its_tick_due_does_nothing_and_a_commit_makes_it_due_at_once():
    """``tick_due`` lets a replica sleep between a leader's timers; a commit notice is due at once."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    cr = core(c, 0)
    assert not cr.has_ready()
    now = c.clock(0)
    due = cr.tick_due()
    assert now < due <= now + HB, "the next heartbeat at the latest"
    cr.tick(due - 1e-6, ("td", 0, due - 1e-6), wall=due - 1e-6)  # tick data as the cluster's (validity)
    assert not cr.has_ready(), "nothing to do before it"
    cr.tick(due, ("td", 0, due), wall=due)
    assert cr.has_ready()
    c.drain(0)
    run(c, net, 0.05)
    cmd = submit(c, 0)
    net.flush_until(lambda: (cmd.client_id, cmd.seq) in c.checker.acked)
    assert cr.tick_due() <= c.clock(0), "the followers not told of the commit are due a notice"


def test_with_three_replicas_a_follower_that_accepts_gets_no_heartbeats_while_accepts_flow():
    """The follower asked learns each slot by itself (early learning) and hears the leader
    through its Accepts: a heartbeat to it (with its ack) is a wake-up of both processes
    for nothing.  The other follower still gets a commit notice per commit, and everyone
    learns everything."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.2)
    net.delivered.clear()
    for _ in range(50):
        submit(c, 0)
        run(c, net, 0.01)

    def sent(kind: type, dst: int) -> int:
        return sum(1 for s, d, m in net.delivered if isinstance(m, kind) and s == 0 and d == dst)

    asked = max((1, 2), key=lambda d: sent(Accept, d))
    other = 3 - asked
    assert sent(Accept, asked) >= 50 and sent(Heartbeat, asked) == 0
    assert sent(Heartbeat, other) >= 40, "a commit notice at the tick after each commit"
    run(c, net, 3 * HB)
    assert core(c, asked).commit_index == core(c, other).commit_index == core(c, 0).commit_index
    # Quiet again: the regular heartbeat reaches both.
    net.delivered.clear()
    run(c, net, 3 * HB)
    assert sent(Heartbeat, asked) >= 2 and sent(Heartbeat, other) >= 2


def _slots_by_kind(c: Cluster, r: int, first: int) -> collections.Counter:
    cr = core(c, r)
    kinds: collections.Counter = collections.Counter()
    for slot in range(max(first, cr.log_start), cr.commit_index + 1):
        items = cr.chosen_value(slot).items
        ticks = sum(isinstance(i, Tick) for i in items)
        kinds["tick alone" if ticks == len(items) else "tick shared" if ticks else "commands"] += 1
    return kinds


def test_under_load_a_tick_waits_for_a_command_to_share_its_slot_and_when_quiet_goes_alone():
    """A slot costs every replica a round of messages, a write and an apply: under load
    a TICK rides with the next command (waiting at most half a TICK interval)."""
    c, net = make(3)
    elect(c, net, 0)
    run(c, net, 0.5)
    first = core(c, 0).commit_index + 1
    for _ in range(100):  # a command every 20 ms for 2 s
        submit(c, 0)
        run(c, net, 0.02)
    busy = _slots_by_kind(c, 0, first)
    assert busy["tick shared"] >= 5 and busy["tick alone"] <= 1, busy
    first = core(c, 0).commit_index + 1
    run(c, net, 1.0)  # quiet: the TICKs go at once, alone
    quiet = _slots_by_kind(c, 0, first)
    assert quiet["tick alone"] >= 3 and quiet["commands"] == 0, quiet
