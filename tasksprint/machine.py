"""The state-machine interface the replicated log applies, with exactly-once sessions.

A replica applies every chosen log slot, in order, to an :class:`Applier`.
The applier skips commands it has already applied (same client id and
sequence number, however often the client retried), passes the rest and
every TICK to the user-level :class:`StateMachine`, and keeps a running
digest of what was applied so replicas can compare notes.

Sessions are collected: an applier holds at most ``max_sessions`` of them;
past that, after a slot, the least recently used ones (by the last command
applied) go, except those the state machine says are in use
(:meth:`StateMachine.sessions_in_use`, e.g. the sessions of live workers).
The choice depends on the log alone, so every replica collects the same
sessions at the same slot, and the snapshot keeps the order.  A command of
a collected session is answered :class:`SessionExpired`, never applied
again; see docs/recovery.md for what a client loses.  It reports
the time each applied item takes in the state machine as span
``machine.apply`` to its :class:`~tasksprint.observe.Observer`.

Everything here is deterministic: no clock, no randomness, no I/O.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Collection
from typing import Any, NamedTuple, Protocol

import attrs

from tasksprint import codec
from tasksprint.observe import NULL, Observer
from tasksprint.paxos.messages import INT_LIMIT, MAX_CLIENT_ID, Batch, Command, CommandBlock, Tick


class StopReplica(Exception):
    """Raised by a state machine for a condition that must stop this replica
    (e.g. it runs different scheduler code than the computation started with)
    rather than be answered as an error result."""


class SnapshotUnavailable(Exception):
    """Raised by :meth:`StateMachine.snapshot` when the state cannot be saved now;
    the message says why.  The replica goes on without compacting its log."""


class BadSnapshot(ValueError):
    """Snapshot bytes that cannot be restored (damaged, or naming something not allowed)."""


class ApplyContext(NamedTuple):
    """Where an item sits in the log. ``client_id``/``seq`` are empty/0 for a TICK.

    A named tuple rather than an attrs class: one is made per applied command.
    """

    slot: int
    index: int  # type: ignore[assignment]  # position inside the slot's batch (shadows tuple.index)
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

    def sessions_in_use(self) -> Collection[str]:
        """Client ids whose sessions must not be collected (a function of the applied state)."""


#: Sessions an applier keeps before it collects the least recently used.
MAX_SESSIONS = 65_536


@codec.message
class SessionExpired:
    """The answer to a command whose client's session was collected.

    The client had answers from that session (its ``first_unacked`` is past
    1, which a client sends only once the log applied one of its commands),
    so the command may have been applied already: it is not applied
    (again), and the client must start over under a new client id.
    """

    client_id: str = attrs.field(validator=codec.text(MAX_CLIENT_ID, min_chars=1))
    # Up to 2**64: a block's seqs run past its first one's range (2**63 - 1) by its length.
    seq: int = attrs.field(validator=codec.int_range(0, 2 * INT_LIMIT))


@attrs.define(eq=False)
class _Session:
    # Every seq <= low has been applied (or was acknowledged and forgotten).
    low: int = 0
    # Results of applied seqs above ``low`` the client may still ask about.
    results: dict[int, Any] = attrs.Factory(dict)
    # The seqs of ``results`` in the order applied, to forget the oldest first
    # (popping the front of a dict itself costs more the more was popped).
    order: collections.deque[int] = attrs.Factory(collections.deque)


class Duplicate:
    """Marker result: the command was applied before and its result forgotten."""

    def __repr__(self) -> str:
        return "DUPLICATE"


DUPLICATE = Duplicate()


@attrs.define(eq=False)
class Applier:
    """Applies chosen slots to a state machine exactly once per command."""

    machine: StateMachine
    # Ordered from least to most recently used (a command moves its session to the end).
    _sessions: dict[str, _Session] = attrs.field(factory=dict)
    max_sessions: int = attrs.field(default=MAX_SESSIONS, kw_only=True)
    _applied: int = 0
    _digest: bytes = b"\0" * 32
    observer: Observer = attrs.field(default=NULL, kw_only=True)
    # The machine's apply and tick, wrapped once as span ``machine.apply`` (themselves when unobserved).
    _machine_apply: Any = attrs.field(init=False, default=None)
    _machine_tick: Any = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._machine_apply = self.observer.timed("machine.apply", self.machine.apply)
        self._machine_tick = self.observer.timed("machine.apply", self.machine.tick)

    @property
    def applied(self) -> int:
        """The last slot applied."""
        return self._applied

    @property
    def digest(self) -> bytes:
        """Running SHA-256 over every applied item and its result."""
        return self._digest

    def apply_slot(self, slot: int, value: Batch) -> list[tuple[Command | CommandBlock, Any]]:
        """Apply one chosen slot; return (command, result) for every command in it.

        For a :class:`CommandBlock` the result is the list of its commands'
        results, in order.  A retried command that was already applied gets
        its earlier result (or :data:`DUPLICATE` if that was forgotten) and
        changes nothing.
        """
        assert slot == self._applied + 1, f"applying slot {slot} after {self._applied}: slots must be applied in order"
        out: list[tuple[Any, Any]] = []
        h = hashlib.sha256(self._digest)
        h.update(slot.to_bytes(8, "big"))
        for i, item in enumerate(value.items):
            if isinstance(item, Tick):
                result = self._machine_tick(item.now, item.data, ApplyContext(slot, i))
                h.update(codec.encode([item, result]))
                continue
            sess = self._session(item.client_id, item.first_unacked)
            if sess is None:
                out.append((item, self._expired(item)))
                continue
            if isinstance(item, CommandBlock):
                results, fresh = self._apply_block(sess, item, slot, i)
                if fresh:
                    h.update(codec.encode([item, fresh]))
                out.append((item, results))
                continue
            result, new = self._apply_one(sess, item.op, slot, i, item.client_id, item.seq)
            if new:
                h.update(codec.encode([item, result]))
            out.append((item, result))
        if len(self._sessions) > self.max_sessions:
            self._collect()
        self._applied = slot
        self._digest = h.digest()
        return out

    @property
    def session_count(self) -> int:
        """Sessions held now."""
        return len(self._sessions)

    def _collect(self) -> None:
        """Forget the least recently used sessions not in use, down to 15/16 of ``max_sessions``.

        Deterministic: the order of ``_sessions`` and the machine's sessions
        in use follow from the log alone.  Collecting a sixteenth at once
        keeps the cost per new session constant.
        """
        keep = set(self.machine.sessions_in_use())
        target = self.max_sessions - self.max_sessions // 16
        excess = len(self._sessions) - target
        for cid in [cid for cid in self._sessions if cid not in keep][:excess]:
            del self._sessions[cid]

    def _expired(self, item: Command | CommandBlock) -> Any:
        """The answer to a command of a session that was collected."""
        if isinstance(item, CommandBlock):
            try:
                count = len(item.op_list())
            except codec.BadMessage:
                count = 0
            return [SessionExpired(client_id=item.client_id, seq=item.first_seq + j) for j in range(count)]
        return SessionExpired(client_id=item.client_id, seq=item.seq)

    def _session(self, client_id: str, first_unacked: int) -> _Session | None:
        """The client's session, now its most recently used; None if it was collected.

        A client id with no session is a new client, unless its
        ``first_unacked`` says it already had answers (past 1): then its
        session was collected, and applying its command could apply it twice.
        """
        sess = self._sessions.pop(client_id, None)
        if sess is None:
            if first_unacked > 1:
                return None
            sess = _Session()
        self._sessions[client_id] = sess
        # The client has its answers for everything below first_unacked,
        # so those were applied and will never be asked about again.
        if first_unacked - 1 > sess.low:
            low = sess.low = first_unacked - 1
            # Seqs are applied in order except for resends: drop from the front.
            # One held back behind a newer seq goes once ``low`` passes that
            # one; lookups test ``low`` first.
            order, results = sess.order, sess.results
            while order and order[0] <= low:
                del results[order.popleft()]
        return sess

    def _apply_one(self, sess: _Session, op: Any, slot: int, i: int, client_id: str, seq: int) -> tuple[Any, bool]:
        """(result, applied now); an earlier result (or DUPLICATE) for a command seen before."""
        if seq <= sess.low or seq in sess.results:
            return sess.results.get(seq, DUPLICATE), False
        try:
            result = self._machine_apply(op, ApplyContext(slot, i, client_id, seq))
        except StopReplica:
            raise
        except Exception as exc:
            # Every replica applies the same command to the same state and
            # fails the same way: answer the error instead of stopping the
            # whole cluster on one bad command.  Only the type's name goes into
            # the answer (and so the digest): an exception's text may hold a
            # repr of the command (unbounded, hash-seed or address dependent).
            result = {"error": f"{type(exc).__name__} while applying the command"}
        sess.results[seq] = result
        sess.order.append(seq)
        return result, True

    def _apply_block(self, sess: _Session, block: CommandBlock, slot: int, i: int) -> tuple[list[Any], list[Any]]:
        """(every command's result, the results of those applied now)."""
        try:
            ops = block.op_list()
        except codec.BadMessage:
            # Replicas check blocks before proposing them, so only a broken
            # peer gets here; every replica skips it alike.
            return [], []
        block.drop_decoded()
        results, fresh = [], []
        seq = block.first_seq
        for op in ops:
            result, new = self._apply_one(sess, op, slot, i, block.client_id, seq)
            results.append(result)
            if new:
                fresh.append(result)
            seq += 1
        return results, fresh

    def snapshot(self) -> bytes:
        sessions = {
            cid: [s.low, sorted((seq, r) for seq, r in s.results.items() if seq > s.low)]
            for cid, s in self._sessions.items()
        }
        return codec.encode([self._applied, self._digest, sessions, self.machine.snapshot()])

    def restore(self, data: bytes) -> None:
        """Replace everything with a :meth:`snapshot`; raises :class:`BadSnapshot` for bytes that are not one."""
        try:
            applied, digest, sessions, inner = codec.decode_untrusted(data)
            parsed = {
                cid: _Session(low, {seq: res for seq, res in results}, collections.deque(seq for seq, _ in results))
                for cid, (low, results) in sessions.items()
            }
            if not (type(applied) is int and applied >= 0 and type(digest) is bytes and len(digest) == 32):
                raise TypeError("bad header")
        except (codec.BadMessage, TypeError, ValueError, AttributeError) as exc:
            raise BadSnapshot(f"not a replica snapshot ({type(exc).__name__})") from None
        self.machine.restore(inner)
        self._applied = applied
        self._digest = digest
        self._sessions = parsed


@attrs.define(eq=False)
class KVMachine:
    """The built-in key-value state machine, for using and testing the log alone.

    Ops: ``["put", key, value]`` -> None, ``["get", key]`` -> value or None,
    ``["cas", key, expected, new]`` -> bool, ``["append", key, item]`` -> new length.
    """

    _data: dict[str, Any] = attrs.field(factory=dict)
    _now: float = 0.0

    def apply(self, op: Any, ctx: ApplyContext) -> Any:
        # Plain tests rather than ``match``: this runs once per command on every replica.
        if type(op) is list and op and type(op[1] if len(op) > 1 else None) is str:
            kind, n = op[0], len(op)
            if kind == "put" and n == 3:
                self._data[op[1]] = op[2]
                return None
            if kind == "get" and n == 2:
                return self._data.get(op[1])
            if kind == "cas" and n == 4:
                if self._data.get(op[1]) == op[2]:
                    self._data[op[1]] = op[3]
                    return True
                return False
            if kind == "append" and n == 3:
                lst = self._data.setdefault(op[1], [])
                lst.append(op[2])
                return len(lst)
        return {"error": f"unknown kv op (a {type(op).__name__})"}

    @property
    def size(self) -> int:
        """How many keys there are."""
        return len(self._data)

    def tick(self, now: float, data: Any, ctx: ApplyContext) -> Any:
        self._now = max(self._now, now)
        return None

    def snapshot(self) -> bytes:
        return codec.encode([self._now, self._data])

    def restore(self, data: bytes) -> None:
        self._now, self._data = codec.decode(data)

    def sessions_in_use(self) -> Collection[str]:
        return ()
