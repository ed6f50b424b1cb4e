"""The state-machine interface the replicated log applies, with exactly-once sessions.

A replica applies every chosen log slot, in order, to an :class:`Applier`.
The applier skips commands it has already applied (same client id and
sequence number, however often the client retried), passes the rest and
every TICK to the user-level :class:`StateMachine`, and keeps a running
digest of what was applied so replicas can compare notes.

Everything here is deterministic: no clock, no randomness, no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import attrs

from tasksprint import codec
from tasksprint.paxos.messages import Batch, Command, Tick


class StopReplica(Exception):
    """Raised by a state machine for a condition that must stop this replica
    (e.g. it runs different scheduler code than the computation started with)
    rather than be answered as an error result."""


@attrs.frozen
class ApplyContext:
    """Where an item sits in the log. ``client_id``/``seq`` are empty/0 for a TICK."""

    slot: int
    index: int  # position inside the slot's batch
    client_id: str = ""
    seq: int = 0


class StateMachine(Protocol):
    """What the replica drives. Must be deterministic: same calls, same results."""

    def apply(self, op: Any, ctx: ApplyContext) -> Any:
        """Apply one client command; the return value goes back to the client."""

    def tick(self, now: float, data: Any, ctx: ApplyContext) -> Any:
        """Apply a TICK: ``now`` is the leader's clock reading."""

    def snapshot(self) -> bytes:
        """The whole state, as bytes :meth:`restore` accepts."""

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot."""


@attrs.define(eq=False)
class _Session:
    # Every seq <= low has been applied (or was acknowledged and forgotten).
    low: int = 0
    # Results of applied seqs above ``low`` the client may still ask about.
    results: dict[int, Any] = attrs.Factory(dict)


class Duplicate:
    """Marker result: the command was applied before and its result forgotten."""

    def __repr__(self) -> str:
        return "DUPLICATE"


DUPLICATE = Duplicate()


@attrs.define(eq=False)
class Applier:
    """Applies chosen slots to a state machine exactly once per command."""

    machine: StateMachine
    _sessions: dict[str, _Session] = attrs.field(factory=dict)
    _applied: int = 0
    _digest: bytes = b"\0" * 32

    @property
    def applied(self) -> int:
        """The last slot applied."""
        return self._applied

    @property
    def digest(self) -> bytes:
        """Running SHA-256 over every applied item and its result."""
        return self._digest

    def apply_slot(self, slot: int, value: Batch) -> list[tuple[Command, Any]]:
        """Apply one chosen slot; return (command, result) for every command in it.

        A retried command that was already applied gets its earlier result
        (or :data:`DUPLICATE` if that was forgotten) and changes nothing.
        """
        assert slot == self._applied + 1, f"applying slot {slot} after {self._applied}: slots must be applied in order"
        out: list[tuple[Command, Any]] = []
        h = hashlib.sha256(self._digest)
        h.update(slot.to_bytes(8, "big"))
        for i, item in enumerate(value.items):
            if isinstance(item, Tick):
                result = self.machine.tick(item.now, item.data, ApplyContext(slot, i))
                h.update(codec.encode([item, result]))
                continue
            sess = self._sessions.setdefault(item.client_id, _Session())
            # The client has its answers for everything below first_unacked,
            # so those were applied and will never be asked about again.
            if item.first_unacked - 1 > sess.low:
                sess.low = item.first_unacked - 1
                for seq in [s for s in sess.results if s <= sess.low]:
                    del sess.results[seq]
            if item.seq <= sess.low or item.seq in sess.results:
                out.append((item, sess.results.get(item.seq, DUPLICATE)))
                continue
            try:
                result = self.machine.apply(item.op, ApplyContext(slot, i, item.client_id, item.seq))
            except StopReplica:
                raise
            except Exception as exc:
                # Every replica applies the same command to the same state and
                # fails the same way: answer the error instead of stopping the
                # whole cluster on one bad command.
                result = {"error": f"{type(exc).__name__}: {exc}"}
            sess.results[item.seq] = result
            h.update(codec.encode([item, result]))
            out.append((item, result))
        self._applied = slot
        self._digest = h.digest()
        return out

    def snapshot(self) -> bytes:
        sessions = {cid: [s.low, sorted(s.results.items())] for cid, s in self._sessions.items()}
        return codec.encode([self._applied, self._digest, sessions, self.machine.snapshot()])

    def restore(self, data: bytes) -> None:
        applied, digest, sessions, inner = codec.decode(data)
        self.machine.restore(inner)
        self._applied = applied
        self._digest = digest
        self._sessions = {
            cid: _Session(low, {seq: res for seq, res in results}) for cid, (low, results) in sessions.items()
        }


@attrs.define(eq=False)
class KVMachine:
    """The built-in key-value state machine, for using and testing the log alone.

    Ops: ``["put", key, value]`` -> None, ``["get", key]`` -> value or None,
    ``["cas", key, expected, new]`` -> bool, ``["append", key, item]`` -> new length.
    """

    _data: dict[str, Any] = attrs.field(factory=dict)
    _now: float = 0.0

    def apply(self, op: Any, ctx: ApplyContext) -> Any:
        match op:
            case ["put", str(key), value]:
                self._data[key] = value
                return None
            case ["get", str(key)]:
                return self._data.get(key)
            case ["cas", str(key), expected, new]:
                if self._data.get(key) == expected:
                    self._data[key] = new
                    return True
                return False
            case ["append", str(key), item]:
                lst = self._data.setdefault(key, [])
                lst.append(item)
                return len(lst)
            case _:
                return {"error": f"unknown kv op {op!r}"}

    def tick(self, now: float, data: Any, ctx: ApplyContext) -> Any:
        self._now = max(self._now, now)
        return None

    def snapshot(self) -> bytes:
        return codec.encode([self._now, self._data])

    def restore(self, data: bytes) -> None:
        self._now, self._data = codec.decode(data)
