"""Checkers: each returns {"ok": bool, ...evidence}."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import attrs

from jepsen.harness.monitor import probe_replicas
from jepsen.workload.scheduler import expected_totals
from tasksprint.coordinator.replies import ComputationStatus

RECOVERY_BOUND = 30.0
MAX_RECOVERY = 5.0  # default of --max-recovery: seconds from a heal back to the pre-fault done count


def exactly_once(comp: ComputationStatus | None) -> dict[str, Any]:
    """Every started task completed exactly once, except decoys that were killed.

    ``task_done`` tids: none twice, none unknown, each completion's ``rec``
    names its own tid; every leaf and total done; every decoy either done or
    killed (by a command-line cancel, or by the scheduler at finish); the
    replica's task counts agree (done + killed = started).
    """
    values = _values(comp)
    if values is None:
        return {"ok": False, "error": "no result (computation did not finish)"}
    started, done, records = values["started"], values["done"], values["records"]
    decoys = values.get("decoys", [])
    killed = set(values.get("decoys_open_at_finish", [])) | set(values.get("decoys_cancelled", []))
    dup = sorted(t for t, n in Counter(done).items() if n > 1)
    missing = sorted(set(started) - set(decoys) - set(done))
    decoys_unaccounted = sorted(set(decoys) - set(done) - killed)
    decoys_done_and_killed = sorted(killed & set(done))
    unknown = sorted(set(done) - set(started))
    bad_records = [r for t, r in zip(done, records) if not (isinstance(r, list) and len(r) == 3 and r[0] == t)]
    counts = comp.tasks if comp is not None else {}
    # Tasks completed at least once: the "done" state count leaves out a task
    # done before whose lost output was being recomputed when the computation
    # finished (a recompute nothing needed any more); its completion counted once.
    completed = counts.get("completed", counts.get("done", 0))
    count_ok = (
        completed == len(set(done))
        and counts.get("total") == len(started)
        and completed + counts.get("killed", 0) == len(started)
    )
    attempts = Counter(r[1] for r in records if isinstance(r, list))
    return {
        "ok": not (dup or missing or unknown or bad_records or decoys_unaccounted or decoys_done_and_killed)
        and count_ok,
        "started": len(started),
        "done": len(done),
        "duplicated": dup,
        "missing": missing,
        "unknown": unknown,
        "bad_records": bad_records[:10],
        "task_counts": counts,
        "decoys": len(decoys),
        "decoys_killed": len(killed),
        "decoys_unaccounted": decoys_unaccounted,
        "decoys_done_and_killed": decoys_done_and_killed,
        "completions_by_client": dict(Counter(r[2] for r in records if isinstance(r, list))),
        "completions_by_attempt": {str(k): v for k, v in sorted(attempts.items())},
    }


def cancels(comp: ComputationStatus | None, ops: list[dict], attempted: set[int]) -> dict[str, Any]:
    """Command-line cancels took effect exactly where they said they did.

    * an acknowledged cancel that reported killing decoy d: d never completed
      and was not still active when the scheduler finished (no acknowledged
      command lost, whatever leader changes happened in between);
    * an acknowledged cancel killed only the decoy it named (nothing depends on a decoy);
    * every decoy found already killed at finish was the target of some
      cancel (acknowledged or not): nothing else kills a decoy.
    """
    values = _values(comp)
    if values is None:
        return {"ok": False, "error": "no result (computation did not finish)"}
    done = set(values["done"])
    open_at_finish = set(values.get("decoys_open_at_finish", []))
    cancelled = set(values.get("decoys_cancelled", []))
    acked = [o for o in ops if o["op"].startswith("cancel") and o.get("ok")]
    acked_killed = {t for o in acked for t in (o.get("killed") or [])}
    lost = sorted((acked_killed & done) | (acked_killed & open_at_finish))
    overkill = sorted({t for o in acked for t in (o.get("killed") or []) if t != o["tid"]})
    spurious = sorted(cancelled - attempted)
    return {
        "ok": not lost and not overkill and not spurious,
        "attempted": len(attempted),
        "acknowledged": len(acked),
        "acknowledged_kills": len(acked_killed),
        "acknowledged_too_late": len([o for o in acked if not o.get("killed")]),
        "unacknowledged": len([o for o in ops if o["op"].startswith("cancel") and not o.get("ok")]),
        "decoys_cancelled": len(cancelled),
        "decoys_open_at_finish": len(open_at_finish),
        "acknowledged_kill_lost": lost,
        "killed_other_tasks": overkill,
        "killed_without_cancel": spurious,
    }


def result_correct(comp: ComputationStatus | None, seed: int, width: int) -> dict[str, Any]:
    """The final totals equal what the seed alone gives."""
    if comp is None:
        return {"ok": False, "error": "no computation status"}
    if comp.state != "finished":
        failure = None if comp.failure is None else attrs.asdict(comp.failure)
        return {"ok": False, "state": comp.state, "failure": failure}
    values = _values(comp)
    waves = values["waves"]
    expected = expected_totals(seed, waves, width)
    return {
        "ok": waves >= 1 and values["totals"] == expected,
        "waves": waves,
        "final": values["totals"][-1] if values["totals"] else None,
        "expected_final": expected[-1] if expected else None,
    }


def converge(addrs, secret, timeout: float = 30.0) -> dict[str, Any]:
    """Poll every replica until all report the same applied index and digest.

    Also: any two replicas ever seen at the same applied index with different
    digests is a violation, however they end up.
    """
    seen: dict[int, dict[str, set]] = {}
    deadline = time.monotonic() + timeout
    rounds = 0
    last: list = []
    while time.monotonic() < deadline:
        rounds += 1
        statuses = probe_replicas(addrs, secret)
        last = statuses
        for s in statuses:
            if s is not None and s["digest"]:
                seen.setdefault(s["applied"], {}).setdefault(s["digest"], set()).add(s["rid"])
        if all(s is not None for s in statuses) and len({(s["applied"], s["digest"]) for s in statuses}) == 1:
            break
        time.sleep(0.02)
    conflicts = {a: {d: sorted(r) for d, r in ds.items()} for a, ds in seen.items() if len(ds) > 1}
    agreed = all(s is not None for s in last) and len({(s["applied"], s["digest"]) for s in last}) == 1
    return {
        "ok": agreed and not conflicts,
        "converged": agreed,
        "rounds": rounds,
        "conflicts": conflicts,
        "final": [None if s is None else {k: s[k] for k in ("rid", "role", "applied", "digest")} for s in last],
    }


def recovery(progress: list[tuple], heal_times: list[float], bound: float = RECOVERY_BOUND) -> dict:
    """Seconds from each heal until the done count passes the highest seen before the heal
    (or the computation ends).

    The highest, not the last: a sample may come from a replica that lags
    behind (the leader did not answer in time), and its lower count must not
    pass for progress once the leader answers again.
    """
    per_fault = []
    for h in heal_times:
        before = [p for p in progress if p[0] <= h]
        if before and before[-1][2] in ("finished", "failed"):
            per_fault.append({"heal": h, "recovery": 0.0, "note": "finished before the heal"})
            continue
        base = max((p[1] for p in before), default=0)
        after = next((p for p in progress if p[0] > h and (p[1] > base or p[2] in ("finished", "failed"))), None)
        per_fault.append({"heal": h, "recovery": None if after is None else round(after[0] - h, 3)})
    last = per_fault[-1] if per_fault else None
    ok = last is not None and last["recovery"] is not None and last["recovery"] <= bound
    return {
        "ok": ok,
        "bound": bound,
        "after_last_heal": None if last is None else last["recovery"],
        "max": max((f["recovery"] for f in per_fault if f["recovery"] is not None), default=None),
        "per_fault": per_fault,
    }


def per_fault_recovery(progress: list[tuple], faults: list[dict], max_recovery: float = MAX_RECOVERY) -> dict:
    """For each fault: seconds from its heal to the first new completion and to the pre-fault done count.

    ``progress`` samples are ``(t, done, state, replica, completions,
    recomputed)``; completions and recomputed only grow.  The pre-fault done
    count is the highest seen up to the fault's start; a first new completion
    is a sample whose completion count passes the highest seen up to the
    heal.  ``recomputed`` is the number of completions of tasks done before
    (work redone from lineage) from the fault's start to the next fault's
    start (or the end).  Fails if any time back to the pre-fault done count
    exceeds ``max_recovery`` or never comes.
    """
    ended = ("finished", "failed")
    starts = {f["n"]: f["t"] for f in faults if f["event"] == "start"}
    heals = [(f["n"], f["t"]) for f in faults if f["event"] == "stop"]
    start_times = sorted(starts.values())

    def col(p: tuple, i: int) -> int:
        return p[i] if len(p) > i else 0

    rows = []
    for n, heal in heals:
        start = starts.get(n, heal)
        nxt = next((s for s in start_times if s > heal), float("inf"))
        before_heal = [p for p in progress if p[0] <= heal]
        before_start = [p for p in progress if p[0] <= start]
        prefault = max((p[1] for p in before_start), default=0)
        events = max((col(p, 4) for p in before_heal), default=0)
        row: dict[str, Any] = {"fault": n, "start": start, "heal": heal, "prefault_done": prefault}
        if before_heal and before_heal[-1][2] in ended:
            rows.append({**row, "first_completion": 0.0, "back_to_prefault": 0.0, "recomputed": 0, "note": "ended"})
            continue
        after = [p for p in progress if p[0] > heal]
        first = next((p for p in after if col(p, 4) > events or p[2] in ended), None)
        back = next((p for p in after if p[1] >= prefault or p[2] in ended), None)
        redone_from = max((col(p, 5) for p in before_start), default=0)
        window = [p for p in progress if p[0] <= nxt]
        redone_to = max((col(p, 5) for p in window), default=redone_from)
        row["first_completion"] = None if first is None else round(first[0] - heal, 3)
        row["back_to_prefault"] = None if back is None else round(back[0] - heal, 3)
        row["recomputed"] = max(0, redone_to - redone_from)
        if back is not None and back[0] > nxt:
            row["note"] = "the next fault started first"
        rows.append(row)
    slow = [r for r in rows if r["back_to_prefault"] is None or r["back_to_prefault"] > max_recovery]
    times = [r["back_to_prefault"] for r in rows if r["back_to_prefault"] is not None]
    firsts = [r["first_completion"] for r in rows if r["first_completion"] is not None]
    return {
        "ok": not slow,
        "max_recovery": max_recovery,
        "max_back_to_prefault": max(times, default=None),
        "max_first_completion": max(firsts, default=None),
        "recomputed": sum(r["recomputed"] for r in rows),
        "too_slow": [r["fault"] for r in slow],
        "per_fault": rows,
    }


def clients_stay_up(exits: list[dict]) -> dict[str, Any]:
    """No worker client process died on its own (rc != 0) while the computation ran.

    The harness restarts such a client so the other checkers still mean
    something, but a fault elsewhere (a replica killed, a partition) must not
    take a worker down.
    """
    bad = [e for e in exits if e["proc"].startswith("c") and e["rc"] != 0]
    return {"ok": not bad, "unexpected_client_exits": bad}


def _values(comp: ComputationStatus | None) -> dict | None:
    if comp is None or comp.result is None:
        return None
    return comp.result.values
