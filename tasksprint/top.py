"""``tasksprint top``: a live terminal view of a cluster and its computation, with rich.

It shows what the dashboard shows (the same
:class:`~tasksprint.readmodel.Poller` snapshots): the replicas with
their role, ballot, commit and applied index, lag and commit latency, up or
down; the computation's state and tasks by state with a progress bar, the
throughput over the last polls; the live worker clients with their CPU,
memory and last contact.  :func:`render` is a pure function of a snapshot
and its history; :func:`watch` redraws what any :class:`Source` gives (the
view ``tasksprint batch --mon`` reuses); :func:`run_top` watches a
:class:`~tasksprint.readmodel.Poller` of the replicas until interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tasksprint.readmodel import TASK_STATES, History, Poller, Snapshot

__all__ = ["Source", "render", "run_top", "watch"]


class Source(Protocol):
    """Where :func:`watch` takes its snapshots: a :class:`~tasksprint.readmodel.Poller`, or a batch run's own."""

    async def poll(self) -> Snapshot:
        """The state now."""
        ...

    async def aclose(self) -> None:
        """Release what the source holds (connections)."""
        ...


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _opt(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(snap: Snapshot, history: History) -> Group:
    """The screen for ``snap`` (and the throughput and leader changes of ``history``)."""
    replicas = Table(title="replicas", title_justify="left", expand=False)
    columns = ("replica", "address", "status", "role", "ballot", "commit", "applied", "lag")
    for col in (*columns, "commit p50/p99 ms", "fsync p50/p99 ms"):
        replicas.add_column(col)
    for i, r in enumerate(snap.replicas):
        rid = str(r.rid if r.rid is not None else i)
        if not r.up:
            replicas.add_row(rid, r.address, Text("down", style="bold red"), *[""] * 7)
            continue
        style = "bold" if r.role == "leader" else ""
        replicas.add_row(
            rid,
            r.address,
            Text("up", style="green"),
            r.role,
            r.ballot,
            str(r.commit),
            str(r.applied),
            str(r.lag),
            f"{_ms(r.commit_p50_ms)}/{_ms(r.commit_p99_ms)}",
            f"{_ms(r.fsync_p50_ms)}/{_ms(r.fsync_p99_ms)}",
            style=style,
        )
    leader = "none" if snap.leader is None else f"replica {snap.leader}"
    header = Text.assemble(
        ("computation: ", "dim"),
        (snap.state or "no coordinator", "bold"),
        ("   leader: ", "dim"),
        (leader, "bold"),
        ("   leader changes seen: ", "dim"),
        str(history.leader_change_count),
    )
    parts: list[Any] = [header, replicas]
    if snap.has_computation:
        total = snap.tasks.get("total", 0)
        done = snap.tasks.get("done", 0)
        points = history.points[-10:]
        rate = sum(p.throughput for p in points) / len(points) if points else 0.0
        counts = "  ".join(f"{s} {snap.tasks.get(s, 0)}" for s in TASK_STATES)
        parts.append(Text(f"tasks: {done}/{total} done   {counts}   {rate:.1f} tasks/s"))
        parts.append(ProgressBar(total=max(total, 1), completed=done, width=60))
        workers = Table(title="workers", title_justify="left")
        columns = ("client", "name", "address", "slots", "tags", "running", "prefetching")
        for col in (*columns, "cpu %", "rss MiB", "heard s ago"):
            workers.add_column(col)
        for c in snap.clients:
            workers.add_row(
                str(c.cid),
                c.name,
                c.addr,
                str(c.slots),
                ",".join(c.tags) or "-",
                str(c.running),
                str(c.prefetching),
                _opt(c.cpu_percent, ".0f"),
                _mib(c.rss_bytes),
                _opt(c.heard_s, ".1f"),
            )
        parts.append(workers)
        parts.append(Text(f"{len(snap.clients)} live, {snap.dead_clients} dead clients", style="dim"))
    return Group(*parts)


async def watch(
    source: Source,
    *,
    interval: float = 1.0,
    once: bool = False,
    console: Console | None = None,
    until: Callable[[Snapshot], bool] | None = None,
) -> int:
    """Redraw the view of ``source``'s snapshots every ``interval`` seconds; returns the exit code.

    Stops when ``until(snapshot)`` holds (the last view stays on screen) or
    when cancelled.  ``once`` prints one view and returns 0 if any replica
    answered, 1 if none did.  ``source`` is closed on the way out.
    """
    console = console or Console(file=sys.stdout)
    history = History()
    try:
        snap = await source.poll()
        history.add(snap)
        if once:
            console.print(render(snap, history))
            return 0 if any(r.up for r in snap.replicas) else 1
        with Live(render(snap, history), console=console, auto_refresh=False, screen=False) as live:
            while until is None or not until(snap):
                await trio.sleep(interval)
                snap = await source.poll()
                history.add(snap)
                live.update(render(snap, history), refresh=True)
        return 0
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()


def run_top(
    addrs: list[tuple[str, int]],
    secret: bytes,
    interval: float = 1.0,
    *,
    once: bool = False,
    console: Console | None = None,
) -> int:
    """Poll the replicas at ``addrs`` and redraw every ``interval`` seconds until Ctrl-C; returns the exit code.

    ``once`` prints one view and returns 0 if any replica answered, 1 if none did.
    """
    return trio.run(lambda: watch(Poller(addrs, secret), interval=interval, once=once, console=console))
