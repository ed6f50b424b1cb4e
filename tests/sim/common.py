"""The simulator's vocabulary: the keys clients write, its two errors, its small Paxos limits, a disk read back."""

from __future__ import annotations

from tasksprint.paxos.core import PaxosConfig
from tasksprint.paxos.durable import (
    DurableState,
)

KEYS = ("k0", "k1", "k2")


class SimFailure(AssertionError):
    """An invariant broke. The message names the seed that replays it."""


class Crashed(Exception):
    """A replica crashed inside a driver pass, where the simulator told it to (``crash_in_ready``)."""


def sim_config(n: int) -> PaxosConfig:
    """Small limits so batching, pipelining, catch-up and snapshots all happen in short runs."""
    return PaxosConfig(
        replicas=n,
        heartbeat_interval=0.05,
        election_timeout=0.3,
        tick_interval=0.1,
        max_inflight=4,
        max_batch=3,
        catchup_batch=4,
        keep_after_snapshot=3,
    )


def load(disk: DurableState) -> DurableState:
    """What a restarted replica reads back: a copy, so nothing is shared with the disk."""
    return DurableState(
        promised=disk.promised,
        log=dict(disk.log),
        snapshot_index=disk.snapshot_index,
        snapshot_data=disk.snapshot_data,
        initialized=disk.initialized,
    )
