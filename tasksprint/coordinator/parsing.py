"""The strict parsers of what enters the coordinator: a log command's op, a question's name and arguments.

Theory of operation
-------------------
An operation travels through the log and is stored as a plain CBOR map
with an ``"op"`` field; a question arrives as a
:class:`~tasksprint.api.Query` name and a map of arguments.  Both come
from clients, so both are hostile: :func:`parse_op` and :func:`parse_query`
turn them into the frozen values of :mod:`~tasksprint.coordinator.ops`, or
raise :class:`~tasksprint.coordinator.ops.BadOp` (whose ``refused`` is the
answer), never another exception, at a bounded cost.  Every replica parses
each operation once, as it enters the machine, so the error texts must be
the same on every replica: they name a bad value by its type and size only
(:func:`~tasksprint.coordinator.ops.described`).
"""

from __future__ import annotations

from typing import Any

from tasksprint.coordinator.ops import (
    GRAPH_MAX,
    BadOp,
    BatchOp,
    CancelOp,
    CommandOp,
    DoneOp,
    ErrorCode,
    FailedOp,
    GraphRequest,
    InfoRequest,
    InitOp,
    JoinOp,
    LostOp,
    Op,
    Refused,
    ReportOp,
    Request,
    SchedulerRequest,
    StatusRequest,
    ViewRequest,
    WorkerOp,
    described,
    is_int,
)

__all__ = ["MAX_HOLDS", "MAX_WAIT", "parse_op", "parse_query"]


def _int(raw: dict[str, Any], op: str, key: str, *, minimum: int | None = None, default: int | None = None) -> int:
    if default is not None and key not in raw:
        return default
    v = raw.get(key)
    if not is_int(v) or (minimum is not None and v < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise BadOp(f"{op}: field {key!r} must be an int{bound}, got {described(v)}")
    return v


def _str(raw: dict[str, Any], op: str, key: str) -> str:
    v = raw.get(key)
    if not isinstance(v, str):
        raise BadOp(f"{op}: field {key!r} must be a string, got {described(v)}")
    return v


def parse_op(raw: Any) -> Op:
    """The typed operation of ``raw`` (a log command's op), or raise :class:`BadOp`."""
    if isinstance(raw, (InitOp, JoinOp, DoneOp, FailedOp, LostOp, CancelOp, BatchOp, CommandOp, WorkerOp)):
        return raw
    name = raw.get("op") if isinstance(raw, dict) else None
    match name:
        case "init":
            return InitOp(seed=_int(raw, "init", "seed"), code_digest=_str(raw, "init", "code_digest"))
        case "join":
            return _parse_join(raw)
        case "done" | "failed" | "lost":
            return _parse_report(raw)
        case "cancel":
            return CancelOp(tid=_int(raw, "cancel", "tid"))
        case "batch":
            ops = raw.get("ops")
            if not isinstance(ops, list):
                raise BadOp(f"batch: field 'ops' must be a list of done/failed/lost ops, got {described(ops)}")
            return BatchOp(ops=tuple(_parse_batched(sub) for sub in ops))
        case "command":
            if "body" not in raw:
                raise BadOp("command: field 'body' is missing")
            return CommandOp(body=raw["body"])
        case "worker":
            return _parse_worker(raw)
        case _:
            raise BadOp(f"unknown coordinator op {described(raw)}")


#: At most this many outputs offered by one join (a bound on the cost of applying it).
MAX_HOLDS = 1_000_000


def _parse_join(raw: dict[str, Any]) -> JoinOp:
    client = _str(raw, "join", "client")
    addr = _str(raw, "join", "addr")
    host, _, port = addr.rpartition(":")
    if not host or len(addr) > 300 or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise BadOp("join: field 'addr' must be HOST:PORT with a port from 1 to 65535")
    slots = _int(raw, "join", "slots", minimum=0)
    queue = _int(raw, "join", "queue", minimum=0, default=0)
    have = raw.get("have", [])
    if not isinstance(have, list) or not all(isinstance(t, str) for t in have):
        raise BadOp(f"join: field 'have' must be a list of tag strings, got {described(have)}")
    holds = raw.get("holds", [])
    if not isinstance(holds, list) or len(holds) > MAX_HOLDS:
        raise BadOp(f"join: field 'holds' must be a list of at most {MAX_HOLDS} pairs, got {described(holds)}")
    for h in holds:
        if not (isinstance(h, list) and len(h) == 2 and is_int(h[0]) and is_int(h[1])):
            raise BadOp(f"join: field 'holds' must list [tid, attempt] pairs, got {described(h)} in it")
    pairs = tuple((h[0], h[1]) for h in holds)
    cid = None if raw.get("cid") is None else _int(raw, "join", "cid", minimum=0)
    if cid is not None and pairs:
        raise BadOp("join: an update of incarnation 'cid' offers no 'holds' (only a new incarnation does)")
    return JoinOp(client=client, addr=addr, slots=slots, queue=queue, have=tuple(have), holds=pairs, cid=cid)


def _tags(raw: dict[str, Any], op: str, key: str) -> tuple[str, ...]:
    v = raw.get(key, [])
    if not isinstance(v, list) or len(v) > 256 or not all(isinstance(t, str) and 0 < len(t) <= 128 for t in v):
        raise BadOp(f"{op}: field {key!r} must be a list of at most 256 non-empty tag strings, got {described(v)}")
    return tuple(v)


def _parse_worker(raw: dict[str, Any]) -> WorkerOp:
    drain = raw.get("drain", False)
    if not isinstance(drain, bool):
        raise BadOp(f"worker: field 'drain' must be a bool, got {described(drain)}")
    return WorkerOp(
        client=_str(raw, "worker", "client"),
        add=_tags(raw, "worker", "add"),
        remove=_tags(raw, "worker", "remove"),
        drain=drain,
    )


def _parse_report(raw: dict[str, Any]) -> ReportOp:
    name = raw["op"]
    cid = _int(raw, name, "cid")
    tid = _int(raw, name, "tid")
    if name == "lost":
        key = raw.get("key")
        if key is not None and not isinstance(key, str):
            raise BadOp(f"lost: field 'key' must be an output key string or None, got {described(key)}")
        return LostOp(cid=cid, tid=tid, key=key)
    attempt = _int(raw, name, "attempt")
    if name == "failed":
        record = raw.get("record")
        if record is not None and (not isinstance(record, dict) or not all(isinstance(k, str) for k in record)):
            raise BadOp(f"failed: field 'record' must be a map with string keys or absent, got {described(record)}")
        return FailedOp(cid=cid, tid=tid, attempt=attempt, error=_str(raw, "failed", "error"), record=record)
    values = raw.get("values", {})
    sizes = raw.get("sizes", {})
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise BadOp(f"done: field 'values' must be a dict with string keys, got {described(values)}")
    if not isinstance(sizes, dict) or not all(isinstance(k, str) and is_int(v) and v >= 0 for k, v in sizes.items()):
        raise BadOp(f"done: field 'sizes' must map output keys to byte counts, got {described(sizes)}")
    early = raw.get("early", [])
    if not isinstance(early, list) or not all(
        isinstance(e, list) and len(e) == 2 and is_int(e[0]) and is_int(e[1]) for e in early
    ):
        raise BadOp(f"done: field 'early' must list [pretask tid, attempt] pairs of this task, got {described(early)}")
    return DoneOp(
        cid=cid, tid=tid, attempt=attempt, values=values, sizes=sizes, early=tuple((e[0], e[1]) for e in early)
    )


def _parse_batched(sub: Any) -> ReportOp | Refused:
    if not isinstance(sub, dict) or sub.get("op") not in ("done", "failed", "lost"):
        return BadOp(f"batch: only done, failed and lost ops can be batched, got {described(sub)}").refused
    try:
        return _parse_report(sub)
    except BadOp as exc:
        return exc.refused


#: Longest a view query may ask to wait, in seconds (a replica answers sooner anyway).
MAX_WAIT = 3600


def parse_query(name: Any, args: Any) -> Request:
    """The typed question of a :class:`~tasksprint.api.Query`, or raise :class:`BadOp`."""
    if not isinstance(args, dict):
        raise BadOp(f"query {described(name)}: arguments must be a map, got {type(args).__name__}")
    match name:
        case "view":
            wait = args.get("wait", 0)
            # Compared, never converted first: float(2**1100) raises OverflowError.
            if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT:
                raise BadOp(f"view: field 'wait' must be a number of seconds from 0 to {MAX_WAIT}")
            cpu = args.get("cpu")
            if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not (0 <= cpu < 1e6)):
                raise BadOp(f"view: field 'cpu' must be a CPU percentage >= 0, got {described(cpu)}")
            return ViewRequest(
                cid=_int(args, "view", "cid"),
                after=_int(args, "view", "after", minimum=0, default=0),
                wait=float(wait),
                cpu=None if cpu is None else float(cpu),
                rss=_int(args, "view", "rss", minimum=0) if args.get("rss") is not None else None,
            )
        case "status":
            return StatusRequest()
        case "info":
            return InfoRequest(tid=_int(args, "info", "tid"))
        case "scheduler":
            return SchedulerRequest(body=args.get("args"))
        case "graph":
            count = _int(args, "graph", "count", minimum=1, default=GRAPH_MAX)
            if count > GRAPH_MAX:
                raise BadOp(f"graph: field 'count' must be at most {GRAPH_MAX}, got {count}")
            return GraphRequest(first=_int(args, "graph", "first", minimum=1, default=1), count=count)
        case _:
            raise BadOp(f"unknown query {name!r:.100}; known: view, status, info, scheduler, graph", ErrorCode.UNKNOWN)
