"""Messages between replicas and their users (worker clients, the CLI, load generators).

A user connects to any replica (role ``client`` in the wire handshake) and
sends :class:`Submit`; the replica proposes the command (forwarding it to the
leader if it is not the leader) and answers :class:`Result` once it has
applied it, or :class:`Retry` if it cannot make progress now (no leader
known, recovering, shutting down).  Retrying the same (client id, seq) is
always safe: the state machine applies a command once.

:class:`SubmitBlock` / :class:`BlockResult` do the same for many commands
of one client at once; :class:`~tasksprint.log_client.LogClient` sends
everything as blocks, so concurrent submissions share frames, log items
and fsyncs.
"""

from __future__ import annotations

from typing import Any

import attrs

from tasksprint.codec import int_range, message, text, tuple_of
from tasksprint.paxos.messages import INT_LIMIT, MAX_CLIENT_ID, MAX_RID, Command, CommandBlock

#: Longest query name, error or reason text, and replica status string.
MAX_NAME = 64
MAX_TEXT = 4096

_int = int_range(0, INT_LIMIT - 1)
_str = text(MAX_TEXT)
_client = text(MAX_CLIENT_ID, min_chars=1)
_opt_int = attrs.validators.optional(int_range(-1, MAX_RID))
_opt_num = attrs.validators.optional(attrs.validators.instance_of((int, float)))


def _seconds(_inst: Any, attr: Any, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e12:
        raise ValueError(f"{attr.name} must be a number of seconds from 0 to 1e12")


@message
class Submit:
    command: Command = attrs.field(validator=attrs.validators.instance_of(Command))


@message
class Result:
    client_id: str = attrs.field(validator=_client)
    seq: int = attrs.field(validator=_int)
    result: Any = None
    slot: int = attrs.field(default=0, validator=_int)
    #: The leader as the answering replica knows it, so clients can go there directly.
    leader: int | None = attrs.field(default=None, validator=_opt_int)
    #: The command had been applied before and its result was since forgotten
    #: (the client said it had it); ``result`` is then None.
    duplicate: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


@message
class SubmitBlock:
    """Several commands of one client in one message (see :class:`CommandBlock`)."""

    block: CommandBlock = attrs.field(validator=attrs.validators.instance_of(CommandBlock))


@message
class BlockResult:
    """The answer to a :class:`SubmitBlock`: one result per command, in order.

    ``forgotten`` lists the positions of commands that had been applied
    before and whose results were since forgotten (their ``results`` entry
    is None), like :attr:`Result.duplicate`.
    """

    client_id: str = attrs.field(validator=_client)
    first_seq: int = attrs.field(validator=_int)
    results: tuple = attrs.field(converter=tuple_of())
    slot: int = attrs.field(default=0, validator=_int)
    leader: int | None = attrs.field(default=None, validator=_opt_int)
    forgotten: tuple = attrs.field(default=(), converter=tuple_of(lambda i: isinstance(i, int) and 0 <= i < INT_LIMIT))


@message
class Retry:
    """Not applied now; try again (at ``leader`` if given)."""

    client_id: str = attrs.field(validator=_client)
    seq: int = attrs.field(validator=_int)
    reason: str = attrs.field(validator=_str)
    leader: int | None = attrs.field(default=None, validator=_opt_int)


@message
class SubmitRefused:
    """The command (or block) starting at ``seq`` will never be applied: ``reason`` says why.

    Sent for a command too large for a log entry; sending it again does not help.
    """

    client_id: str = attrs.field(validator=_client)
    seq: int = attrs.field(validator=_int)
    reason: str = attrs.field(validator=_str)


@message
class StatusQuery:
    pass


@message
class SlowHook:
    """A scheduler hook call that ran past the replica's ``--hook-report-after``.

    Seen by this replica's watchdog: a fact of this replica, not replicated
    state (every replica runs the same hook, each times its own call).
    ``running`` is true while it has not returned (``seconds`` so far); a
    replica blocked in a hook answers nobody, so a status usually shows the
    last slow call after it returned.
    """

    hook: str = attrs.field(validator=text(64))
    slot: int = attrs.field(validator=_int)
    tid: int | None = attrs.field(default=None, validator=attrs.validators.optional(_int))
    cid: int | None = attrs.field(default=None, validator=attrs.validators.optional(_int))
    seconds: float = attrs.field(default=0.0, validator=_seconds)
    running: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


@message
class ReplicaStatus:
    rid: int = attrs.field(validator=int_range(0, MAX_RID))
    role: str = attrs.field(validator=_str)
    leader: int | None = attrs.field(validator=_opt_int)
    ballot: str = attrs.field(validator=_str)
    commit: int = attrs.field(validator=_int)
    applied: int = attrs.field(validator=_int)
    peers: tuple = attrs.field(converter=tuple_of(lambda p: isinstance(p, str)))
    digest: str = attrs.field(default="", validator=_str)
    #: While leading: how long the last commands submitted to it took from
    #: arrival to answer (proposed, chosen, applied), in ms; empty otherwise.
    commit_p50_ms: float | None = attrs.field(default=None, validator=_opt_num)
    commit_p99_ms: float | None = attrs.field(default=None, validator=_opt_num)
    commit_samples: int = attrs.field(default=0, validator=_int)
    #: Non-empty once replicas were found to disagree: what differs, for people.
    divergence: str = attrs.field(default="", validator=_str)
    #: How long the last synced writes (promises, accepts) took, in ms.
    fsync_p50_ms: float | None = attrs.field(default=None, validator=_opt_num)
    fsync_p99_ms: float | None = attrs.field(default=None, validator=_opt_num)
    fsync_samples: int = attrs.field(default=0, validator=_int)
    #: Replica-local: the last scheduler hook call this replica's watchdog
    #: reported as slow (see :class:`SlowHook`), or None.
    slow_hook: SlowHook | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(SlowHook))
    )


@message
class Query:
    """A read-only question for the replica's state machine (not logged)."""

    name: str = attrs.field(validator=text(MAX_NAME, min_chars=1))
    args: dict = attrs.field(factory=dict, validator=attrs.validators.instance_of(dict))


@message
class QueryReply:
    name: str = attrs.field(validator=text(MAX_NAME))
    result: Any = None
    error: str = attrs.field(default="", validator=_str)


@message
class PeerDigest:
    """Between replicas: the running digest after applying ``slot``."""

    slot: int = attrs.field(validator=_int)
    digest: bytes = attrs.field(validator=[attrs.validators.instance_of(bytes), attrs.validators.max_len(64)])
    #: For people, should the digests differ: the last scheduler call and tasks started so far.
    last_call: str = attrs.field(default="", validator=[_str, attrs.validators.max_len(200)])
    tasks: int = attrs.field(default=0, validator=_int)


@message
class ClientsSeen:
    """Between replicas: worker clients (by cid) that talked to the sender lately.

    Followers pass these to the leader, which alone decides (in its TICKs)
    which clients have been silent too long.
    """

    cids: tuple = attrs.field(converter=tuple_of(lambda c: isinstance(c, int) and 0 <= c < INT_LIMIT))


@message
class Fetch:
    """Between worker clients: send me task ``tid``'s output ``key`` (all outputs if None)."""

    tid: int = attrs.field(validator=_int)
    key: str | None = attrs.field(default=None, validator=attrs.validators.optional(_str))


@message
class FetchReply:
    tid: int = attrs.field(validator=_int)
    found: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    value: Any = None
    error: str = attrs.field(default="", validator=_str)
