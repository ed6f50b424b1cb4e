#!/usr/bin/env python3
"""Phase timers inside TaskSprint's processes, for ``bench/tasks.py --probe``.

``python probe.py replica ARGS...`` and ``python probe.py client ARGS...``
run ``tasksprint replica`` / ``tasksprint client`` exactly as the ``-m
tasksprint.cli`` command would, with timers wrapped around the steps a task
goes through.  When the process ends (the client when the computation ends,
a replica on SIGINT) it writes its figures as JSON to
``$TASKSPRINT_PROBE_DIR/<role>-<pid>.json``; :func:`summarize` turns the
files of one run into a few lines.

What is timed (milliseconds; count, mean, p50, p90, max, total seconds):

replica
    ``storage.write`` (one SQLite transaction + fsync, on the event loop),
    ``applier.apply_slot`` (one chosen slot, with the digest) and the items
    per slot, ``machine.apply[op]`` / ``machine.tick`` (the state machine per
    log op, settling included), ``machine.settle`` / ``machine.place``,
    ``machine.view`` (building one client's view) and the tasks per view,
    ``query.view`` answered at once and ``query.view parked`` (NotYet),
    ``paxos.step`` / ``paxos.ready`` / ``paxos.advance`` / ``paxos.tick``,
    ``codec.encode`` / ``codec.decode``, ``submit->applied`` (a command from
    its Submit arriving to its slot being applied, on the replica it was
    submitted to), ``applied->view answered`` (a parked view long-poll from
    the apply that woke it to its answer), the CPU seconds of the process.
client
    ``client.view poll`` (one view long-poll round trip) and the tasks per
    view, ``client.gather_inputs``, ``node.exchange`` (the node round trip:
    JSON over a pipe, the node's work), ``node idle between tasks`` (per
    node process), ``store.put``, ``client.report`` (a completion from
    submit to its Result: the commit latency the client sees), ``node
    done->next assignment`` (from the latest node completion to the next view
    that brings work: the coordination cost of one chain step), the CPU
    seconds of the process.

The wrappers cost about a microsecond per call, small next to what they time.

What-if experiments
-------------------
``$TASKSPRINT_PROBE_WHATIF`` (comma-separated; ``bench/tasks.py --what-if``)
changes one thing in the running processes, to measure what a fix would buy
before anyone writes it.  None of them is a proposal to ship as it is:

``no-fsync``
    replicas open their storage with ``fsync=False`` (an upper bound on what
    cheaper durability could give; not safe).
``early-views``
    a replica answers parked view long-polls right after applying a slot,
    instead of after the fsync of the records that follow it.
``poll-leader``
    a client long-polls its views from the replica its log client found to
    be the leader, instead of always the first address it was given.
``prefetch=K``
    a client announces ``K x slots`` slots when it joins while keeping
    ``slots`` node processes, so the coordinator assigns up to K times as
    many tasks as it can run and the extra ones wait in the node pool.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import resource
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

_samples: dict[str, list[float]] = defaultdict(list)
_values: dict[str, list[float]] = defaultdict(list)
_MAX_SAMPLES = 500_000
_clock = time.perf_counter
_started = _clock()
_role = "process"


_busy = {"cpu0": None, "wall0": None, "cpu1": None, "wall1": None}


def _working() -> None:
    """Mark task work in this process: CPU is counted from the first mark to the last."""
    cpu, wall = time.process_time(), _clock()
    if _busy["cpu0"] is None:
        _busy["cpu0"], _busy["wall0"] = cpu, wall
    _busy["cpu1"], _busy["wall1"] = cpu, wall


def _note(name: str, seconds: float) -> None:
    lst = _samples[name]
    if len(lst) < _MAX_SAMPLES:
        lst.append(seconds)


def _value(name: str, v: float) -> None:
    lst = _values[name]
    if len(lst) < _MAX_SAMPLES:
        lst.append(v)


def _timed(owner: Any, attr: str, name: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = _clock()
        try:
            return fn(*a, **kw)
        finally:
            _note(name, _clock() - t)

    setattr(owner, attr, wrapper)


def _timed_async(owner: Any, attr: str, name: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    async def wrapper(*a: Any, **kw: Any) -> Any:
        t = _clock()
        try:
            return await fn(*a, **kw)
        finally:
            _note(name, _clock() - t)

    setattr(owner, attr, wrapper)


def whatif() -> dict[str, str]:
    """The experiments asked for in ``$TASKSPRINT_PROBE_WHATIF``."""
    out = {}
    for part in os.environ.get("TASKSPRINT_PROBE_WHATIF", "").split(","):
        if part.strip():
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip() or "1"
    return out


def _whatif_replica(w: dict[str, str]) -> None:
    from tasksprint import replica, storage

    if "no-fsync" in w:
        open_ = storage.Storage.open.__func__

        def open_without_fsync(cls: Any, *a: Any, **kw: Any) -> Any:
            kw["fsync"] = False
            return open_(cls, *a, **kw)

        storage.Storage.open = classmethod(open_without_fsync)
    if "early-views" in w:
        apply = replica.Replica._apply

        def apply_then_answer(self: Any, slot: int, batch: Any) -> None:
            apply(self, slot, batch)
            if self._parked:
                self._retry_parked(time.monotonic())

        replica.Replica._apply = apply_then_answer


def _whatif_client(w: dict[str, str]) -> None:
    import attrs

    from tasksprint import client

    if "prefetch" in w:
        k = int(w["prefetch"])
        join = client.Client._join

        async def join_with_more_slots(self: Any) -> int:
            real = self.config
            self.config = attrs.evolve(real, slots=real.slots * k)
            try:
                return await join(self)
            finally:
                self.config = real

        client.Client._join = join_with_more_slots
    if "poll-leader" in w:
        ask = client._QueryChannel.ask
        work = client.Client._work
        current: dict[str, Any] = {}

        async def work_noted(self: Any) -> str:
            current["client"] = self
            return await work(self)

        async def ask_leader(self: Any, name: str, args: dict, *, timeout: float) -> Any:
            c = current.get("client")
            lc = getattr(c, "_lc", None)
            target = getattr(lc, "_target", None)
            if target is not None and target != self._i:
                if self._conn is not None:
                    await self._conn.aclose()
                    self._conn = None
                self._i = target
            return await ask(self, name, args, timeout=timeout)

        client.Client._work = work_noted
        client._QueryChannel.ask = ask_leader


def _install_replica() -> None:
    from tasksprint import app, codec, machine, replica, storage
    from tasksprint.coordinator import app as coordinator_app
    from tasksprint.coordinator import machine as coordinator_machine
    from tasksprint.api import Submit

    try:
        from tasksprint.api import SubmitBlock
    except ImportError:  # a log layer without blocks
        SubmitBlock = Submit
    from tasksprint.paxos import core

    _timed(storage.Storage, "write", "storage.write")
    for name in ("step", "ready", "advance", "tick", "propose"):
        _timed(core.PaxosCore, name, f"paxos.{name}")
    _timed(codec, "encode", "codec.encode")
    _timed(codec, "decode_untrusted", "codec.decode")
    CM = coordinator_machine.CoordinatorMachine
    _timed(CM, "_settle", "machine.settle")
    _timed(CM, "_place", "machine.place")
    _timed(CM, "tick", "machine.tick")

    apply = CM.apply

    def machine_apply(self: Any, op: Any, ctx: Any) -> Any:
        t = _clock()
        try:
            return apply(self, op, ctx)
        finally:
            kind = op.get("op") if isinstance(op, dict) else "?"
            _note(f"machine.apply[{kind}]", _clock() - t)
            if kind in ("done", "batch", "join"):
                _working()

    CM.apply = machine_apply

    view = CM.view

    def machine_view(self: Any, cid: int, after_version: int = 0) -> Any:
        t = _clock()
        out = view(self, cid, after_version)
        _note("machine.view", _clock() - t)
        _value("tasks per view (replica)", len(out["tasks"]))
        return out

    CM.view = machine_view

    query = coordinator_app.CoordinatorApp.query

    def app_query(self: Any, name: str, args: dict) -> Any:
        t = _clock()
        try:
            out = query(self, name, args)
        except app.NotYet:
            _note(f"query.{name} parked", _clock() - t)
            raise
        _note(f"query.{name}", _clock() - t)
        return out

    coordinator_app.CoordinatorApp.query = app_query

    submitted: dict[tuple[str, int], float] = {}
    state = {"last_apply": None}
    handle = replica.Replica._handle_client_message

    def handle_client_message(self: Any, msg: Any, box: Any, mine: list) -> None:
        if isinstance(msg, Submit):
            key = (msg.command.client_id, msg.command.seq)
            submitted.setdefault(key, _clock())
        elif isinstance(msg, SubmitBlock):
            key = (msg.block.client_id, msg.block.first_seq)
            submitted.setdefault(key, _clock())
        return handle(self, msg, box, mine)

    replica.Replica._handle_client_message = handle_client_message

    apply_slot = machine.Applier.apply_slot

    def applier_apply_slot(self: Any, slot: int, value: Any) -> Any:
        t = _clock()
        out = apply_slot(self, slot, value)
        end = _clock()
        _note("applier.apply_slot", end - t)
        _value("items per slot", len(value.items))
        for cmd, _result in out:
            seq = cmd.seq if hasattr(cmd, "seq") else cmd.first_seq  # a Command or a CommandBlock
            t0 = submitted.pop((cmd.client_id, seq), None)
            if t0 is not None:
                _note("submit->applied", end - t0)
        if state["last_apply"] is None:
            state["last_apply"] = end
        return out

    machine.Applier.apply_slot = applier_apply_slot

    retry = replica.Replica._retry_parked

    def retry_parked(self: Any, now: float) -> None:
        parked = len(self._parked)
        t = _clock()
        retry(self, now)
        end = _clock()
        _note("replica.retry_parked", end - t)
        answered = parked - len(self._parked)
        if answered and state["last_apply"] is not None:
            for _ in range(answered):
                _note("applied->view answered", end - state["last_apply"])
        state["last_apply"] = None

    replica.Replica._retry_parked = retry_parked


def _install_client() -> None:
    from tasksprint import client, node_pool, node_process

    _timed_async(node_pool.NodePool, "run", "node.run (pool, incl. waiting for a node)")
    node_run = node_process.NodeProcess.run
    last_end: dict[int, float] = {}
    node_done = {"last": None}

    async def node_process_run(self: Any, task: Any) -> Any:
        _working()
        t = _clock()
        prev = last_end.get(id(self))
        if prev is not None:
            _note("node idle between tasks", t - prev)
        try:
            return await node_run(self, task)
        finally:
            end = _clock()
            _note("node.exchange", end - t)
            last_end[id(self)] = end
            node_done["last"] = end
            _working()

    node_process.NodeProcess.run = node_process_run
    _timed_async(client.Client, "_gather_inputs", "client.gather_inputs")
    _timed(client.ObjectStore, "put", "store.put")

    report = client.Client._report

    async def client_report(self: Any, op: dict) -> None:
        t = _clock()
        try:
            return await report(self, op)
        finally:
            end = _clock()
            _note(f"client.report[{op.get('op')}]", end - t)

    client.Client._report = client_report

    ask = client._QueryChannel.ask

    async def channel_ask(self: Any, name: str, args: dict, *, timeout: float) -> Any:
        t = _clock()
        out = await ask(self, name, args, timeout=timeout)
        end = _clock()
        _note(f"client.{name} poll", end - t)
        if name == "view" and isinstance(out, dict):
            n = len(out.get("tasks", ()))
            _value("tasks per view (client)", n)
            if n and node_done["last"] is not None:
                _note("node done->next assignment", end - node_done["last"])
                node_done["last"] = None
        return out

    client._QueryChannel.ask = channel_ask


def _stats(xs: list[float], scale: float) -> dict[str, float]:
    xs = sorted(xs)
    n = len(xs)
    return {
        "count": n,
        "mean": scale * sum(xs) / n,
        "p50": scale * xs[n // 2],
        "p90": scale * xs[min(n - 1, (n * 9) // 10)],
        "max": scale * xs[-1],
        "total_s": sum(xs),
    }


def _dump() -> None:
    directory = os.environ.get("TASKSPRINT_PROBE_DIR")
    if not directory:
        return
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "role": _role,
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        "wall_s": _clock() - _started,
        "cpu_user_s": ru.ru_utime,
        "cpu_sys_s": ru.ru_stime,
        # From the first task event to the last (replica: the join that starts
        # the tasks to the last completion applied; client: first to last node run).
        "busy_cpu_s": None if _busy["cpu0"] is None else _busy["cpu1"] - _busy["cpu0"],
        "busy_wall_s": None if _busy["wall0"] is None else _busy["wall1"] - _busy["wall0"],
        "timers_ms": {k: _stats(v, 1000.0) for k, v in _samples.items() if v},
        "values": {k: _stats(v, 1.0) for k, v in _values.items() if v},
    }
    ident = ""
    if "--id" in sys.argv:
        ident = "-" + sys.argv[sys.argv.index("--id") + 1]
    if "--name" in sys.argv:
        ident = "-" + sys.argv[sys.argv.index("--name") + 1]
    path = Path(directory) / f"{_role}{ident}-{os.getpid()}.json"
    path.write_text(json.dumps(out, indent=1))


def summarize(directory: Path) -> dict[str, Any]:
    """The probe files of one run: per process, and as printable lines."""
    procs = []
    for f in sorted(Path(directory).glob("*.json")):
        try:
            procs.append(json.loads(f.read_text()))
        except ValueError:
            continue
    # The busiest replica (most apply work answered submits) is the leader.
    def weight(p: dict) -> float:
        return p["timers_ms"].get("submit->applied", {}).get("count", 0)

    replicas = [p for p in procs if p["role"] == "replica"]
    leader = max(replicas, key=weight) if replicas else None
    lines = []
    for p in sorted(procs, key=lambda p: (p["role"], p["argv"])):
        name = p["role"]
        if "--id" in p["argv"]:
            name += " " + p["argv"][p["argv"].index("--id") + 1]
        if "--name" in p["argv"]:
            name += " " + p["argv"][p["argv"].index("--name") + 1]
        if p is leader:
            name += " (leader)"
        busy = ""
        if p.get("busy_cpu_s") is not None:
            busy = f"; {p['busy_cpu_s']:.2f}s of it during the {p['busy_wall_s']:.1f}s of task work"
        lines.append(f"{name}: CPU {p['cpu_user_s'] + p['cpu_sys_s']:.2f}s over {p['wall_s']:.1f}s alive{busy}")
        if p["role"] == "replica" and p is not leader:
            keys = ["storage.write", "applier.apply_slot", "paxos.step"]
            if "query.view" in p["timers_ms"]:  # the replica the clients poll
                keys += ["query.view", "query.view parked", "applied->view answered"]
        else:
            keys = sorted(p["timers_ms"])
        for k in keys:
            s = p["timers_ms"].get(k)
            if s:
                lines.append(
                    f"  {k:<28} n={s['count']:<7} mean {s['mean']:8.3f} ms  p50 {s['p50']:8.3f}  "
                    f"p90 {s['p90']:8.3f}  max {s['max']:8.2f}  total {s['total_s']:7.2f}s"
                )
        if p["role"] != "replica" or p is leader:
            for k, s in sorted(p["values"].items()):
                lines.append(f"  {k:<28} n={s['count']:<7} mean {s['mean']:8.2f}     p50 {s['p50']:6.0f}  max {s['max']:6.0f}")
    return {"processes": procs, "lines": lines}


def main() -> int:
    global _role
    if len(sys.argv) < 2 or sys.argv[1] not in ("replica", "client"):
        print("usage: probe.py replica|client ARGS... (as for tasksprint replica/client)", file=sys.stderr)
        return 2
    _role = sys.argv[1]
    # The figures are written on the way out, which SIGINT must trigger even
    # when this process was started with SIGINT ignored (from a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    w = whatif()
    if _role == "replica":
        _whatif_replica(w)
        _install_replica()
    else:
        _whatif_client(w)
        _install_client()
    atexit.register(_dump)
    from tasksprint import cli

    try:
        return cli.main(sys.argv[1:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
