"""Simulated clients: each submits commands (single or in blocks) and retries them until it sees them applied."""

from __future__ import annotations

from typing import Any

import attrs

from tasksprint.log_client import MAX_BLOCK, consecutive_runs
from tasksprint.paxos.messages import (
    Command,
    CommandBlock,
)


@attrs.define(eq=False)
class Outstanding:
    cmd: Command
    deadline: float
    replica: int


@attrs.define(eq=False)
class Client:
    """Submits ``append`` commands; retries an unanswered one (same seq) at another replica."""

    cid: str
    quota: int  # commands to submit in the whole run
    window: int  # at most this many unanswered at once
    next_seq: int = 1
    outstanding: dict[int, Outstanding] = attrs.Factory(dict)
    results: dict[int, Any] = attrs.Factory(dict)

    @property
    def done(self) -> bool:
        return self.next_seq > self.quota and not self.outstanding

    def can_submit(self) -> bool:
        return self.next_seq <= self.quota and len(self.outstanding) < self.window

    def new_command(self, key: str) -> Command:
        seq = self.next_seq
        self.next_seq += 1
        first = min([*self.outstanding, seq])
        return Command(client_id=self.cid, seq=seq, first_unacked=first, op=["append", key, f"{self.cid}:{seq}"])

    def blocks(self, seqs: list[int]) -> list[CommandBlock]:
        """Outstanding ``seqs`` as CommandBlocks of consecutive seqs, as LogClient sends them."""
        first_unacked = min(self.outstanding)
        runs = consecutive_runs(sorted(seqs), MAX_BLOCK)
        return [
            CommandBlock.of(self.cid, run[0], first_unacked, [self.outstanding[q].cmd.op for q in run]) for run in runs
        ]
