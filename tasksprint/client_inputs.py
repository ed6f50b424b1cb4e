"""The worker client's inputs: fetched from its store or a peer's, and served to peers.

Part of :mod:`tasksprint.client`.  A task's runner fetches every input as
soon as the client's view says where it is (rolling prefetch), from this
client's object store or from the data server of the peer client holding
it; an output this client's own node just made is taken *early*, before
the log commits it (the completion that made it is reported first; see
:mod:`tasksprint.client_reports`).  A peer that cannot serve an input three
times is reported ``lost``: the coordinator recomputes it from lineage and
the view moves the runner on.  :class:`ClientInputs` is a base class of
:class:`~tasksprint.client.Client` and works on its fields, declared below.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs
import trio

from tasksprint import wire
from tasksprint.coordinator.ops import BatchOp, DoneOp, FailedOp, LostOp
from tasksprint.coordinator.replies import Assignment
from tasksprint.object_store import InputError, ObjectStore, select
from tasksprint.observe import NullObserver, Observer
from tasksprint.peer_data import PeerFetcher, serve_data

__all__ = ["Attempt", "ClientInputs"]


@attrs.define(eq=False)
class Attempt:
    """One assigned task attempt, running here."""

    task: Assignment
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    # Inputs taken from this client's store before the log said so: (tid, attempt) pairs.
    early: list[tuple[int, int]] = attrs.Factory(list)


class ClientInputs:
    """Fetching a task's inputs, and serving this client's outputs (see the module docstring)."""

    # The client's fields (tasksprint.client.Client).
    observer: Observer
    _store: ObjectStore | None
    _cid: int | None
    _made: dict[int, int]
    _holders: dict[int, tuple[int | None, str | None]]
    _input_events: dict[int, trio.Event]
    _peers: PeerFetcher | None
    _log: Any

    if TYPE_CHECKING:  # defined by another base of Client, or by Client

        async def _report(self, op: DoneOp | FailedOp | LostOp | BatchOp) -> Any: ...

    async def _gather_inputs(self, run: Attempt) -> list[Any]:
        n = len(run.task.inputs)
        values: list[Any] = [None] * n
        if n == 0:
            return values

        async def one(i: int) -> None:
            values[i] = await self._fetch_input(run, i)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        return values

    async def _fetch_input(self, run: Attempt, i: int) -> Any:
        """Input ``i`` of the task, fetched as soon as the view says where it is."""
        ptid, key = run.task.inputs[i].tid, run.task.inputs[i].key
        failures = 0
        assert self._store is not None
        while True:
            holder, addr = self._holders.get(ptid, (None, None))
            if holder is None:
                made = self._made.get(ptid)
                if made is not None and self._store.has(ptid):
                    # Made by our own nodes and queued for the log ahead of
                    # this task's report: use it now (the coordinator checks
                    # that this very output is the one committed).
                    try:
                        value = select(self._store.get(ptid), key, ptid)
                    except KeyError as exc:
                        raise InputError(str(exc.args[0])) from None
                    run.early.append((ptid, made))
                    return value
                await self._input_changed(ptid).wait()
                continue
            if holder == self._cid and self._store.has(ptid):
                try:
                    return select(self._store.get(ptid), key, ptid)
                except KeyError as exc:
                    raise InputError(str(exc.args[0])) from None
            try:
                return await self._fetch_remote(addr, ptid, key)
            except (*wire.NETWORK_ERRORS, LookupError) as exc:
                failures += 1
                self._log.info("fetch_failed", tid=ptid, holder=holder, addr=addr, error=str(exc), attempt=failures)
                if failures >= 3:
                    # Tell the coordinator; it recomputes the output and the view moves on.
                    changed = self._input_changed(ptid)
                    assert self._cid is not None
                    await self._report(LostOp(cid=self._cid, tid=ptid, key=key))
                    failures = 0
                    with trio.move_on_after(5.0):
                        await changed.wait()
                else:
                    await trio.sleep(0.1 * failures)

    def _input_changed(self, tid: int) -> trio.Event:
        """An event set when task ``tid``'s outputs move (a view) or are made here."""
        event = self._input_events.get(tid)
        if event is None:
            event = self._input_events[tid] = trio.Event()
        return event

    def _note_holder(self, tid: int, cid: int | None, addr: str | None) -> None:
        if self._holders.get(tid) != (cid, addr):
            self._holders[tid] = (cid, addr)
            event = self._input_events.pop(tid, None)
            if event is not None:
                event.set()

    async def _fetch_remote(self, addr: str, tid: int, key: str | None) -> Any:
        assert self._peers is not None
        with self.observer.span("fetch"):
            value = await self._peers.fetch(addr, tid, key)
        if not isinstance(self.observer, NullObserver):
            # Counted as the object store sizes outputs: compact JSON.
            self.observer.count("fetch.bytes", len(json.dumps(value, separators=(",", ":"), default=repr)))
        return value

    async def _serve_data(self, conn: wire.Connection) -> None:
        """Answer peers' Fetch requests from the object store."""
        assert self._store is not None
        await serve_data(self._store, conn)
