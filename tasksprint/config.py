"""Configuration values and their parsing: peer lists, one replica's settings.

Shared by the replica and by every command that talks to a cluster (client,
``status``, ``info``, ``cancel``), so none of them imports the replica's
driver to read an address list.  No I/O here.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from tasksprint import framing
from tasksprint.machine import MAX_SESSIONS
from tasksprint.paxos.core import PaxosConfig


def parse_peers(text: str) -> tuple[tuple[str, int], ...]:
    """``"h1:p1,h2:p2,h3:p3"`` -> ((h1, p1), ...); raises ValueError with the bad part named."""
    peers = []
    for part in text.split(","):
        part = part.strip()
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad peer address {part!r}: expected HOST:PORT")
        peers.append((host, int(port)))
    if len(peers) not in (1, 3, 5, 7):
        raise ValueError(f"{len(peers)} peers given: a cluster has 3 or 5 replicas (1 for a toy)")
    if len(set(peers)) != len(peers):
        raise ValueError("the same address appears twice in --peers")
    return tuple(peers)


@attrs.frozen(kw_only=True)
class ReplicaConfig:
    """Everything one replica process needs; validated at construction."""

    rid: int
    peers: tuple[tuple[str, int], ...]
    data_dir: Path
    secret: bytes
    cluster: str = "default"
    fsync: bool = True
    hook_report_after: float = 30.0  # seconds a scheduler hook may run before it is reported
    paxos: PaxosConfig | None = None
    snapshot_every: int = 20_000  # applied slots between snapshots
    digest_every: int = 1  # slots applied since the last digest report before a driver pass sends one
    #: Seconds between clock readings fed to a candidate's core; the shortest
    #: wait between a leader's (which ticks when its core has something due).
    tick_every: float = 0.005
    #: The same for a follower (or a replica recovering), and the longest wait
    #: between a leader's ticks: a follower's timers are the election timeout
    #: (150 ms or more) and once-per-heartbeat requests, and every tick costs
    #: the process a timer wake-up (about 0.1 ms of CPU).
    follower_tick_every: float = 0.02
    max_frame: int = framing.MAX_FRAME_DEFAULT
    #: Exactly-once sessions kept before the least recently used are collected.
    #: Part of the replicated state's rules: the same on every replica.
    max_sessions: int = MAX_SESSIONS

    def __attrs_post_init__(self) -> None:
        if not 16 <= self.max_sessions < 2**31:
            raise ValueError(f"--max-sessions must be from 16 to 2147483647, got {self.max_sessions}")
        if not 0 <= self.rid < len(self.peers):
            raise ValueError(f"--id {self.rid} does not index into the {len(self.peers)} peers given")
        if not 256 * 1024 <= self.max_frame < 2**32:
            raise ValueError(f"--max-frame must be from 262144 to 4294967295 bytes, got {self.max_frame}")
        if self.paxos is not None and self.paxos.replicas != len(self.peers):
            raise ValueError("paxos.replicas must equal the number of peers")

    @property
    def paxos_config(self) -> PaxosConfig:
        return self.paxos or PaxosConfig(replicas=len(self.peers))
