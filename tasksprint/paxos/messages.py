"""Values and messages of the Multi-Paxos protocol.

All are frozen attrs classes registered with :mod:`tasksprint.codec`, so the
same objects are sent over the wire, written to disk and fed to the
simulator.  Validators are cheap type checks: a message that passes them may
still be nonsense, and the core treats it with suspicion (stale ballots,
slots out of range) rather than trusting it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from tasksprint.codec import (
    BadMessage,
    decode_untrusted,
    encode,
    message,
    register,
    tuple_of,
)

_bool = attrs.validators.instance_of(bool)


#: Every counter on the wire (slot, round, seq, commit index, nonce) is below
#: this: it fits SQLite's signed 64-bit integers, and a peer cannot make a
#: replica compute with numbers of unbounded size.
INT_LIMIT = 2**63

#: Highest replica id a ballot may name (clusters have at most 7 replicas;
#: the core and the replica check ids against their own peer list too).
MAX_RID = 255

#: Longest client id (characters) a command may carry.
MAX_CLIENT_ID = 256


def _nonneg(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < INT_LIMIT:
        raise ValueError(f"{attr.name} must be an int from 0 to 2**63-1, got {_short(value)}")


def _slot(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < INT_LIMIT:
        raise ValueError(f"{attr.name} must be a slot number from 1 to 2**63-1, got {_short(value)}")


def _nonce(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise ValueError(f"{attr.name} must be an int from 0 to 2**64-1, got {_short(value)}")


def _rid(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    # -1 is ZERO_BALLOT's replica id.
    if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= MAX_RID:
        raise ValueError(f"{attr.name} must be a replica id from -1 to {MAX_RID}, got {_short(value)}")


def _client_id(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CLIENT_ID:
        raise ValueError(f"{attr.name} must be a str of 1 to {MAX_CLIENT_ID} characters")


def _finite(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not -INT_LIMIT < value < INT_LIMIT:
        raise ValueError(f"{attr.name} must be a finite number, got {_short(value)}")
    if value != value:  # NaN
        raise ValueError(f"{attr.name} must be a finite number, got nan")


def _is_slot(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < INT_LIMIT


def _short(value: Any) -> str:
    """A bounded description of a value that failed a check (never the repr of a huge one)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if -INT_LIMIT < value < INT_LIMIT else f"an int of {value.bit_length()} bits"
    if isinstance(value, (float, bool)) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


@register
@attrs.frozen(order=True)
class Ballot:
    """A ballot number: (round, replica id), ordered lexicographically."""

    round: int = attrs.field(validator=_nonneg)
    rid: int = attrs.field(validator=_rid)

    def __str__(self) -> str:
        return f"{self.round}.{self.rid}"


#: The ballot nobody has promised or used; smaller than every real ballot.
ZERO_BALLOT = Ballot(0, -1)


def _ballot(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Ballot):
        raise TypeError(f"{attr.name} must be a Ballot, got {type(value).__name__}")


# --------------------------------------------------------------------------
# Log values


@message
class Command:
    """A client command.

    ``(client_id, seq)`` identifies it for exactly-once application;
    ``first_unacked`` is the client's lowest sequence number still waiting for
    an answer, so replicas may forget the results of older ones.
    """

    client_id: str = attrs.field(validator=_client_id)
    seq: int = attrs.field(validator=_nonneg)
    first_unacked: int = attrs.field(default=0, validator=_nonneg)
    op: Any = None

    @property
    def request_key(self) -> tuple[str, str, int]:
        """What the submitter waits for: the key of its answer (a block has its own)."""
        return ("command", self.client_id, self.seq)


@message
class Tick:
    """The leader's clock reading, the only time the state machine sees.

    ``data`` carries what the driver attached (the coordinator puts the
    clients it considers expired there); the core treats it as opaque.
    """

    now: float = attrs.field(validator=_finite)
    data: Any = None


@message
class CommandBlock:
    """Consecutive commands of one client: seqs ``first_seq``, ``first_seq + 1``, ...

    ``ops`` is the CBOR encoding of the list of operations, encoded once by
    the client and carried as bytes through the network, the log and the
    disk; each replica decodes it once, when it checks or applies the block.
    Each command in it is applied exactly once, like a :class:`Command` with
    the same (client id, seq), however the client split or merged its
    blocks when it resent them.
    """

    client_id: str = attrs.field(validator=_client_id)
    first_seq: int = attrs.field(validator=_slot)
    first_unacked: int = attrs.field(default=0, validator=_nonneg)
    ops: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    _decoded: Any = attrs.field(init=False, default=None, eq=False, repr=False)

    @classmethod
    def of(cls, client_id: str, first_seq: int, first_unacked: int, ops: list[Any]) -> CommandBlock:
        block = cls(client_id=client_id, first_seq=first_seq, first_unacked=first_unacked, ops=encode(ops))
        object.__setattr__(block, "_decoded", list(ops))
        return block

    @property
    def request_key(self) -> tuple[str, str, int]:
        """What the submitter waits for: the key of its answer (see :attr:`Command.request_key`)."""
        return ("block", self.client_id, self.first_seq)

    def op_list(self) -> list[Any]:
        """The operations, decoded once; raises BadMessage if ``ops`` is not a non-empty CBOR list."""
        if self._decoded is None:
            ops = decode_untrusted(self.ops)
            if not isinstance(ops, list) or not ops:
                raise BadMessage(f"block {self.client_id}/{self.first_seq}: ops must be a non-empty list")
            object.__setattr__(self, "_decoded", ops)
        decoded: list[Any] = self._decoded
        return decoded

    def drop_decoded(self) -> None:
        """Forget the decoded operations (applied blocks stay in the log as bytes only).

        A chosen block lives on in the log until the next snapshot; keeping
        its thousands of small lists alive would make every full garbage
        collection walk them.  :meth:`op_list` decodes again if asked.
        """
        object.__setattr__(self, "_decoded", None)


def _command_or_tick(value: Any) -> bool:
    return isinstance(value, (Command, CommandBlock, Tick))


@message
class Batch:
    """The value of one log slot: commands applied in order. Empty is a no-op.

    Its CBOR encoding is computed once and kept (``_cbor``): the same value
    goes to every peer, to the disk, and into Accepts sent again.
    """

    items: tuple[Any, ...] = attrs.field(default=(), converter=tuple_of(_command_or_tick))
    _cbor: bytes | None = attrs.field(init=False, default=None, eq=False, repr=False)


NOOP = Batch(items=())


def _batch(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Batch):
        raise TypeError(f"{attr.name} must be a Batch, got {type(value).__name__}")


@message
class Proposal:
    """A value proposed for a slot (in Accept) or known chosen (in Promise, Catchup)."""

    slot: int = attrs.field(validator=_slot)
    value: Batch = attrs.field(validator=_batch)


@message
class AcceptedValue:
    """What an acceptor accepted for a slot, reported in a Promise."""

    slot: int = attrs.field(validator=_slot)
    ballot: Ballot = attrs.field(validator=_ballot)
    value: Batch = attrs.field(validator=_batch)


def _is(cls: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, cls)


# --------------------------------------------------------------------------
# Messages between replicas


@message
class PreVote:
    """Would you support an election? Sent before bumping any ballot, so a
    replica that was cut off cannot depose a healthy leader."""

    round: int = attrs.field(validator=_nonneg)
    commit: int = attrs.field(validator=_nonneg)


@message
class PreVoteReply:
    round: int = attrs.field(validator=_nonneg)
    granted: bool = attrs.field(validator=_bool)


@message
class Prepare:
    """Phase 1a for every slot from ``from_slot`` on."""

    ballot: Ballot = attrs.field(validator=_ballot)
    from_slot: int = attrs.field(validator=_slot)


#: Highest slot number; a Promise part whose ``span_to`` is this speaks for every slot from ``span_from`` on.
LAST_SLOT = INT_LIMIT - 1


def _span_to(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    _slot(inst, attr, value)
    if value < inst.span_from:
        raise ValueError(f"span_to ({value}) must not be below span_from ({_short(inst.span_from)})")


@message
class Promise:
    """Phase 1b. ``log_start`` is the first slot the acceptor still holds; if it
    is past the candidate's ``from_slot`` the candidate is too far behind to
    lead and must catch up first.

    A Promise speaks for the slots ``span_from`` to ``span_to``: for each of
    them it reports what the acceptor accepted (``accepted``) or knows chosen
    (``chosen``), and a slot of the span it does not name holds nothing.  A
    whole Promise spans every slot; one too large for a frame is sent as
    parts whose spans tile that range (:meth:`halves`), each a true answer
    for its own slots.  The candidate counts an acceptor towards its majority
    only once the parts it holds from it cover every slot from its
    ``from_slot`` on (see ``leadership.Phase1``), so it decides with the same
    information a whole Promise gives.
    """

    ballot: Ballot = attrs.field(validator=_ballot)
    log_start: int = attrs.field(validator=_slot)
    accepted: tuple[Any, ...] = attrs.field(default=(), converter=tuple_of(_is(AcceptedValue)))
    chosen: tuple[Any, ...] = attrs.field(default=(), converter=tuple_of(_is(Proposal)))
    span_from: int = attrs.field(default=1, validator=_slot)
    span_to: int = attrs.field(default=LAST_SLOT, validator=_span_to)

    def halves(self) -> tuple[Promise, Promise] | None:
        """Two Promises whose spans split this one's, each with the slots of its span, or None.

        None when the Promise names fewer than two slots: it cannot shrink.
        """
        slots = sorted({a.slot for a in self.accepted} | {p.slot for p in self.chosen})
        if len(slots) < 2:
            return None
        mid = slots[len(slots) // 2]  # first slot of the upper half; above slots[0] >= 1
        lower = Promise(
            ballot=self.ballot,
            log_start=self.log_start,
            accepted=tuple(a for a in self.accepted if a.slot < mid),
            chosen=tuple(p for p in self.chosen if p.slot < mid),
            span_from=min(self.span_from, mid - 1),
            span_to=mid - 1,
        )
        upper = Promise(
            ballot=self.ballot,
            log_start=self.log_start,
            accepted=tuple(a for a in self.accepted if a.slot >= mid),
            chosen=tuple(p for p in self.chosen if p.slot >= mid),
            span_from=mid,
            span_to=max(self.span_to, mid),
        )
        return lower, upper


@message
class Accept:
    """Phase 2a for several slots at once; ``commit`` piggybacks the leader's commit index.

    Keeps its encoding (``_cbor``): one Accept goes to every follower.
    """

    ballot: Ballot = attrs.field(validator=_ballot)
    proposals: tuple[Any, ...] = attrs.field(converter=tuple_of(_is(Proposal)))
    commit: int = attrs.field(validator=_nonneg)
    _cbor: bytes | None = attrs.field(init=False, default=None, eq=False, repr=False)


@message
class Accepted:
    """Phase 2b: the acceptor accepted (and persisted) these slots at ``ballot``."""

    ballot: Ballot = attrs.field(validator=_ballot)
    slots: tuple[Any, ...] = attrs.field(converter=tuple_of(_is_slot))


@message
class Nack:
    """Refusal of ``ballot`` because the sender promised ``promised``."""

    ballot: Ballot = attrs.field(validator=_ballot)
    promised: Ballot = attrs.field(validator=_ballot)


@message
class Heartbeat:
    """Leader liveness and commit index. ``phase1_top`` is the highest slot the
    leader's phase 1 found in use (recovering replicas wait for it)."""

    ballot: Ballot = attrs.field(validator=_ballot)
    commit: int = attrs.field(validator=_nonneg)
    phase1_top: int = attrs.field(validator=_nonneg)


@message
class HeartbeatAck:
    ballot: Ballot = attrs.field(validator=_ballot)
    commit: int = attrs.field(validator=_nonneg)


@message
class CatchupRequest:
    """Send me chosen entries from ``from_slot`` on."""

    from_slot: int = attrs.field(validator=_slot)


@message
class CatchupReply:
    """Chosen entries, contiguous from the requested slot."""

    entries: tuple[Any, ...] = attrs.field(converter=tuple_of(_is(Proposal)))
    commit: int = attrs.field(validator=_nonneg)


@message
class SnapshotInstall:
    """The applied state at ``index`` for a replica too far behind for entries."""

    index: int = attrs.field(validator=_nonneg)
    data: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))


@message
class Forward:
    """Commands a non-leader passes to the leader it knows."""

    items: tuple[Any, ...] = attrs.field(converter=tuple_of(_command_or_tick))


@message
class RecoverQuery:
    """From a replica whose data directory is empty: what have you promised?"""

    nonce: int = attrs.field(validator=_nonce)


@message
class RecoverReply:
    nonce: int = attrs.field(validator=_nonce)
    promised: Ballot = attrs.field(validator=_ballot)
    #: True if the sender has never accepted nor learned anything (promises do not count).
    empty: bool = attrs.field(validator=_bool)


@message
class TimeoutNow:
    """From the leader of ``ballot``, which is going away: start phase 1 now, without a pre-vote."""

    ballot: Ballot = attrs.field(validator=_ballot)


#: Every message a replica may receive from another replica.
PEER_MESSAGES = (
    PreVote,
    PreVoteReply,
    Prepare,
    Promise,
    Accept,
    Accepted,
    Nack,
    Heartbeat,
    HeartbeatAck,
    CatchupRequest,
    CatchupReply,
    SnapshotInstall,
    Forward,
    RecoverQuery,
    RecoverReply,
    TimeoutNow,
)
