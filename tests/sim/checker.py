"""The ground truth: every invariant the simulator checks, fed by the cluster after every step."""

from __future__ import annotations

from typing import Any

import attrs

from tasksprint.paxos.durable import (
    SaveAccepted,
    SaveChosen,
)
from tasksprint.paxos.messages import (
    Ballot,
    Batch,
    Command,
    CommandBlock,
    Tick,
)

from .common import SimFailure


@attrs.define(eq=False)
class Checker:
    """Ground truth and invariant checks, fed by the cluster as things happen."""

    n: int
    quorum: int
    # (slot, ballot) -> (value, acceptors that durably accepted it)
    votes: dict[tuple[int, Ballot], tuple[Batch, set[int]]] = attrs.Factory(dict)
    true_chosen: dict[int, Batch] = attrs.Factory(dict)  # a majority accepted it at one ballot
    learned: dict[int, Batch] = attrs.Factory(dict)  # some replica claimed it chosen
    digests: dict[int, bytes] = attrs.Factory(dict)  # applied slot -> digest after it
    submitted: dict[tuple[str, int], Command] = attrs.Factory(dict)
    acked: dict[tuple[str, int], Any] = attrs.Factory(dict)

    def fail(self, what: str) -> None:
        raise SimFailure(what)

    def _claim(self, where: str, slot: int, value: Batch) -> None:
        known = self.learned.get(slot)
        if known is not None and known != value:
            self.fail(f"agreement: {where} has {value} at slot {slot}, another replica had {known}")
        truth = self.true_chosen.get(slot)
        if truth is not None and truth != value:
            self.fail(f"agreement: {where} has {value} at slot {slot}, but a majority accepted {truth}")
        if known is None:
            self.learned[slot] = value

    def on_persist(self, rid: int, records: tuple) -> None:
        for rec in records:
            match rec:
                case SaveAccepted(slot=s, ballot=b, value=v):
                    entry = self.votes.get((s, b))
                    if entry is None:
                        entry = self.votes[(s, b)] = (v, set())
                    elif entry[0] != v:
                        self.fail(f"ballot {b} carried two values for slot {s}: {entry[0]} and {v}")
                    entry[1].add(rid)
                    if len(entry[1]) >= self.quorum:
                        truth = self.true_chosen.get(s)
                        if truth is None:
                            self._claim(f"a majority at ballot {b}", s, v)
                            self.true_chosen[s] = v
                        elif truth != v:
                            self.fail(f"agreement: two values chosen at slot {s}: {truth} then {v} (ballot {b})")
                case SaveChosen(slot=s, value=v):
                    self._claim(f"replica {rid}'s disk", s, v)
                case _:
                    pass

    def on_wiped(self, rid: int) -> None:
        """Votes on a lost disk no longer count toward a majority.

        (A value chosen while they counted stays chosen: ``true_chosen`` keeps it.)
        """
        for _, voters in self.votes.values():
            voters.discard(rid)

    def on_learned(self, rid: int, slot: int, value: Batch) -> None:
        self._claim(f"replica {rid}", slot, value)

    def on_applied(self, rid: int, slot: int, value: Batch, digest: bytes) -> None:
        self._claim(f"replica {rid}'s applied log", slot, value)
        known = self.digests.get(slot)
        if known is None:
            self.digests[slot] = digest
        elif known != digest:
            self.fail(f"replica {rid}: digest after slot {slot} differs from another replica's")
        for item in value.items:
            if isinstance(item, Command):
                sub = self.submitted.get((item.client_id, item.seq))
                if sub is None or sub != item:
                    self.fail(f"validity: replica {rid} applied {item} at slot {slot}, which no client submitted")
            elif isinstance(item, CommandBlock):
                for j, op in enumerate(item.op_list()):
                    sub = self.submitted.get((item.client_id, item.first_seq + j))
                    if sub is None or sub.op != op:
                        self.fail(
                            f"validity: replica {rid} applied {op} as {item.client_id}:{item.first_seq + j} "
                            f"at slot {slot}, which no client submitted"
                        )
            elif isinstance(item, Tick):
                if not (isinstance(item.data, tuple) and item.data[0] == "td" and item.data[2] == item.now):
                    self.fail(f"validity: replica {rid} applied {item} at slot {slot}, not a TICK a leader made")
            else:
                self.fail(f"validity: replica {rid} applied {item!r} at slot {slot}")

    def on_restored(self, rid: int, index: int, digest: bytes) -> None:
        known = self.digests.get(index)
        if known is not None and known != digest:
            self.fail(f"replica {rid}: snapshot at slot {index} has a digest no replica had there")
