"""Stand-ins for a replica driver's I/O (applier, mailboxes, disk, background writer), and Node, a running replica."""

from __future__ import annotations

import collections
from typing import Any

import attrs

from tasksprint.driver import ReplicaDriver
from tasksprint.machine import Applier
from tasksprint.paxos.core import PaxosCore
from tasksprint.paxos.durable import SaveSnapshot
from tasksprint.paxos.messages import (
    Batch,
)

from .common import Crashed


@attrs.define(eq=False)
class CheckedApplier(Applier):
    """An Applier that shows the cluster every slot it applies and every snapshot it restores."""

    cluster: Any = None
    rid: int = 0

    def apply_slot(self, slot: int, value: Batch) -> list:
        if slot != self.applied + 1:
            self.cluster.checker.fail(f"replica {self.rid} applies slot {slot} after slot {self.applied}")
        results = super().apply_slot(slot, value)
        self.cluster.on_applied(self, slot, value, results)
        return results

    def restore(self, data: bytes) -> None:
        before = self.applied
        super().restore(data)
        if self.applied < before:
            self.cluster.checker.fail(
                f"replica {self.rid} was told to go back from slot {before} to snapshot {self.applied}"
            )
        self.cluster.checker.on_restored(self.rid, self.applied, self.digest)


@attrs.define(eq=False)
class Link:
    """Replica ``src``'s mailbox for ``dst`` (a replica id or a client id): what is pushed enters the network."""

    cluster: Any
    src: int
    dst: int | str

    def push(self, msg: Any) -> None:
        self.cluster.send(self.src, self.dst, msg)

    def flush(self) -> None:
        pass  # pushed messages are on their way already


@attrs.define(eq=False)
class SimDisk:
    """What replica ``rid``'s driver writes in its own thread: durable at once (or crashes, if told to)."""

    cluster: Any
    rid: int

    def write(self, records: Any, *, sync: bool = True) -> None:
        c = self.cluster
        point = c.crash_in_ready.get(self.rid)
        if records and point == "sent_not_persisted":
            del c.crash_in_ready[self.rid]
            raise Crashed(point)
        c.persist(self.rid, tuple(records), sync)
        if records and point == "persisted":
            del c.crash_in_ready[self.rid]
            raise Crashed(point)


@attrs.define(eq=False)
class SimWriter:
    """Replica ``rid``'s background writer: writes complete, in order, when the simulation says (``fsync_done``)."""

    cluster: Any
    rid: int
    life: int

    def submit(self, records: Any, sync: bool) -> None:
        node = self.cluster.nodes[self.rid]
        applied = node.applier.applied
        if node.in_pass and any(isinstance(r, SaveSnapshot) for r in records):
            # A snapshot received from the leader is installed when the driver takes its Ready,
            # before this write of it is submitted: what it applied then is not on the disk yet.
            applied = min(applied, node.pass_start_applied)
        node.pending.append((tuple(records), sync, applied))
        self.cluster.on_fsync_started(self.rid, self.life)


@attrs.define(eq=False)
class Node:
    """A running replica: everything here is lost in a crash (the disk is not here)."""

    rid: int
    life: int
    driver: ReplicaDriver = attrs.field(init=False)
    # Writes handed to the background writer and not yet complete, oldest
    # first: (records, sync, applied index when submitted).
    pending: collections.deque = attrs.Factory(collections.deque)
    clients: dict[str, Link] = attrs.Factory(dict)  # mailboxes for answers, by client id
    woken: bool = False  # the driver asked for another pass
    in_pass: bool = False
    pass_start_applied: int = 0  # applied index when the current pass began
    commit_seen: int = 0  # learned slots up to here were checked
    applied_seen: int = 0

    @property
    def core(self) -> PaxosCore:
        return self.driver.core

    @property
    def applier(self) -> Applier:
        return self.driver.applier

    def wake(self) -> None:
        self.woken = True
