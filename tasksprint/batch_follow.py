"""The batch driver's following of a run: status lines to the status file until the run ends.

:func:`finish` asks the replicas for the scheduler's status lines and appends
them to ``<prefix>_status.txt``, flushed line by line, until the run ends
(with ``--mon``, the run drawn live beside it), then stops the run's
processes and returns the exit code.  Apart from :mod:`tasksprint.batch_command`
so that the driver starts the replicas before it loads trio and the replica
channel: they load while the replicas start.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

import trio

from tasksprint.batch.statusfile import STATUS_HEADER
from tasksprint.batch_retire import Retirer
from tasksprint.batch_run import EXIT_FAILED, BatchRun, this_node
from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.config import parse_peers
from tasksprint.coordinator.ops import SchedulerAnswer, SchedulerRequest, StatusRequest
from tasksprint.coordinator.replies import ComputationStatus
from tasksprint.readmodel import Poller
from tasksprint.top import watch

__all__ = ["finish", "follow", "retirer"]
#: Seconds without an answer from any replica before the driver says so.
SILENCE_WARNING_S = 30.0
MON_INTERVAL_S = 1.0  # how often --mon redraws
COMPUTATION_CHECK_S = 1.0  # how often the driver asks whether the computation itself failed


async def follow(
    run: BatchRun, status: TextIO, *, header: bool, poll: float = 0.05, retirer: Retirer | None = None
) -> dict[str, Any]:
    """Append every status line the scheduler has to ``status`` until the run ended; return the last answer.

    With ``retirer``, engines idle for good are retired as the run goes.
    """
    info = run.info()
    secret = (run.run_dir / "secret").read_bytes().strip()
    addrs = list(parse_peers(info["peers"]))
    channel = ReplicaChannel(addrs, secret)
    written = 0
    if header:
        status.write(STATUS_HEADER + "\n")
        status.flush()
    # Any replica's lines are a prefix of the same list (the log decides their order), so
    # asking a follower is safe; the leader is only the freshest, found once and after failures.
    find_leader = True
    silent_since: float | None = None
    warned = False
    checked_at = trio.current_time()
    try:
        while True:
            try:
                if find_leader:
                    st = await channel.status()
                    if st.leader is not None and st.leader != st.rid:
                        await channel.prefer(st.leader)
                    find_leader = False
                reply = await channel.request(SchedulerRequest(body={"after": written}))
            except ASK_ERRORS:
                lost = run.replicas_lost()
                if lost is not None:
                    return {"lines": [], "ended": True, "total": written, "failed": 0, "reason": lost}
                await channel.move_on()
                find_leader = True
                silent_since = trio.current_time() if silent_since is None else silent_since
                if not warned and trio.current_time() - silent_since > SILENCE_WARNING_S:
                    warned = True
                    print(
                        f"tasksprint batch: no replica of {run.prefix} answers; still trying (Ctrl-C stops the run)",
                        file=sys.stderr,
                    )
                await trio.sleep(0.1)
                continue
            silent_since = None
            if trio.current_time() - checked_at > COMPUTATION_CHECK_S:
                # A computation that failed (a hook raised, a state that cannot be
                # saved) ends no batch: the scheduler stopped being called.
                checked_at = trio.current_time()
                failed = _failure(await _computation_status(channel))
                if failed is not None:
                    return {"lines": [], "ended": True, "total": written, "failed": 0, "reason": failed}
                if retirer is not None and isinstance(reply, SchedulerAnswer) and isinstance(reply.value, dict):
                    await retirer.check(reply.value)
            if not isinstance(reply, SchedulerAnswer) or not isinstance(reply.value, dict):
                await trio.sleep(poll)
                continue
            answer = reply.value
            lines = answer["lines"]
            if lines:
                status.write("".join(line + "\n" for line in lines))
                status.flush()
                written += len(lines)
            if answer["ended"] and written >= answer["total"]:
                return answer
            if written >= answer["total"]:
                # All there is: ask again after ``poll`` (not at once: each question costs a replica an answer
                # while it is busy applying the completions these lines come from).
                await trio.sleep(poll)
    finally:
        await channel.aclose()


async def _computation_failure(channel: ReplicaChannel) -> str | None:
    """Why the batch's computation failed, or None while it has not (or no replica answers)."""
    return _failure(await _computation_status(channel))


async def _computation_status(channel: ReplicaChannel) -> ComputationStatus | None:
    try:
        status = await channel.request(StatusRequest())
    except ASK_ERRORS:
        return None
    return status if isinstance(status, ComputationStatus) else None


def _failure(status: ComputationStatus | None) -> str | None:
    if status is not None and status.state == "failed":
        message = status.failure.message if status.failure is not None else "no reason recorded"
        return f"the batch scheduler failed: {message}"
    return None


def retirer(run: BatchRun, command: str, log: Callable[[str, str], None]) -> Retirer | None:
    """Who retires ``run``'s idle engines with ``command``; None when nothing is retired ("")."""
    if not command:
        return None
    info = run.info()
    return Retirer(
        command=command,
        engine_nodes={int(rank): str(host) for rank, host, _ in info["engines"]},
        keep=list(info.get("replica_hosts") or []),
        driver=this_node(),
        stop_engine=run.stop_engine,
        log=log,
    )


def finish(
    run: BatchRun,
    header: bool,
    exit_code: bool,
    err: TextIO,
    *,
    truncate: bool,
    mon: bool = False,
    retirer: Retirer | None = None,
) -> int:
    with open(run.status_path, "w" if truncate else "a", encoding="utf-8", errors="surrogateescape") as status:
        answer = trio.run(lambda: _follow_and_show(run, status, header=header, mon=mon, retirer=retirer))
    run.stop()
    if answer.get("reason"):
        print(f"tasksprint batch: run ended early: {answer['reason']}", file=err)
        return EXIT_FAILED
    if exit_code and answer.get("failed"):
        print(f"tasksprint batch: {answer['failed']} task(s) failed", file=err)
        return EXIT_FAILED
    return 0


async def _follow_and_show(
    run: BatchRun, status: TextIO, *, header: bool, mon: bool, retirer: Retirer | None = None
) -> dict[str, Any]:
    """:func:`follow`; with ``mon``, the run drawn live beside it (``tasksprint top``'s view)."""
    if not mon:
        return await follow(run, status, header=header, retirer=retirer)
    info = run.info()
    secret = (run.run_dir / "secret").read_bytes().strip()
    addrs = list(parse_peers(info["peers"]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: watch(Poller(addrs, secret), interval=MON_INTERVAL_S))
        answer = await follow(run, status, header=header, retirer=retirer)
        nursery.cancel_scope.cancel()
    return answer
