"""Digest comparisons decided by majority: who is confirmed, who is in the minority, what the report says."""

from __future__ import annotations

from tasksprint.digests import DigestTally, Minority, PeerDiverged, Summary, divergence_message

GOOD, BAD, OTHER = b"g" * 32, b"b" * 32, b"o" * 32
INIT9, INIT6 = Summary("init in slot 1", 9), Summary("init in slot 1", 6)


def test_one_replica_confirms_what_it_applies() -> None:
    t = DigestTally(0, 1)
    t.applied(1, GOOD, INIT9)
    assert t.confirmed == 1


def test_a_slot_is_confirmed_once_a_majority_shares_its_digest() -> None:
    t = DigestTally(0, 3)
    assert t.applied(1, GOOD, INIT6) == []
    assert t.confirmed == 0
    assert t.heard(1, 1, GOOD, INIT6) == []
    assert t.confirmed == 1


def test_five_replicas_need_two_peers_to_agree() -> None:
    t = DigestTally(0, 5)
    t.applied(1, GOOD, INIT6)
    t.heard(3, 1, GOOD, INIT6)
    assert t.confirmed == 0
    t.heard(4, 1, GOOD, INIT6)
    assert t.confirmed == 1


def test_a_report_from_a_peer_ahead_is_compared_once_the_slot_is_applied() -> None:
    t = DigestTally(0, 3)
    assert t.heard(1, 2, GOOD, INIT6) == []
    t.applied(1, OTHER, INIT6)
    assert t.confirmed == 0
    assert t.applied(2, GOOD, INIT6) == []
    assert t.confirmed == 2


def test_the_odd_peer_is_reported_and_this_replica_goes_on() -> None:
    t = DigestTally(1, 3)
    t.applied(1, GOOD, INIT6)
    assert t.heard(0, 1, BAD, INIT9) == []  # undecided: replica 2 has not spoken
    assert t.confirmed == 0
    (found,) = t.heard(2, 1, GOOD, INIT6)
    assert isinstance(found, PeerDiverged) and found.peer == 0 and found.majority == (2,)
    assert t.confirmed == 1
    assert t.heard(0, 1, BAD, INIT9) == []  # reported once
    message = divergence_message(1, found)
    assert "the scheduler is not deterministic" in message
    assert "at log slot 1 (last scheduler call: init in slot 1)" in message
    assert "9 tasks started on replica 0, 6 on replicas 1 and 2" in message


def test_a_replica_that_a_majority_disagrees_with_stops() -> None:
    t = DigestTally(0, 3)
    t.applied(1, BAD, INIT9)
    assert t.heard(1, 1, GOOD, INIT6) == []
    (found,) = t.heard(2, 1, GOOD, INIT6)
    assert isinstance(found, Minority) and found.slot == 1
    assert t.confirmed == 0
    assert "9 tasks started on replica 0, 6 on replicas 1 and 2" in divergence_message(0, found)


def test_agreement_up_to_a_slot_survives_a_later_disagreement() -> None:
    t = DigestTally(0, 3)
    for slot in (1, 2, 3):
        t.applied(slot, bytes([slot]) * 32, INIT6)
    t.heard(1, 2, bytes([2]) * 32, INIT6)
    assert t.confirmed == 2
    t.heard(1, 3, BAD, INIT9)
    assert t.confirmed == 2
    (found,) = t.heard(2, 3, bytes([3]) * 32, INIT6)
    assert isinstance(found, PeerDiverged) and found.agreed == 2
    assert "at log slot 3" in divergence_message(0, found)


def test_reports_from_unknown_or_own_ids_are_ignored() -> None:
    t = DigestTally(0, 3)
    t.applied(1, GOOD, INIT6)
    assert t.heard(0, 1, BAD, INIT9) == []
    assert t.heard(7, 1, BAD, INIT9) == []
    assert t.heard(-1, 1, BAD, INIT9) == []
    assert t.confirmed == 0


def test_old_slots_are_forgotten_and_pending_reports_bounded() -> None:
    t = DigestTally(0, 3, keep=4)
    for slot in range(1, 11):
        t.applied(slot, GOOD, INIT6)
    assert t.heard(1, 2, BAD, INIT9) == []  # too old to compare
    for slot in range(100, 5000):
        t.heard(2, slot, GOOD, INIT6)
    assert len(t._pending[2]) <= 1024
