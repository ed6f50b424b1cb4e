"""``tasksprint run``: a whole computation on this machine in one command.

Starts ``replicas`` replica processes (fsync on) with the user's scheduler and
``clients`` worker client processes running the user's node, shows progress
on stderr, prints the values given to ``finish`` as JSON on stdout, stops
everything and returns the exit code: 0 when the computation finished, 1
when it failed (with the report on stderr), 2 on bad arguments, 130 on Ctrl-C,
143 on SIGTERM (as ``timeout``, systemd and ``scancel`` send): either way
every replica, client and node it started is stopped.

It fails, saying why, as soon as it knows the computation cannot end well:
the scheduler spec names no loadable class, a majority of the replicas
exited (their own last words are quoted), the replicas found the scheduler
not deterministic, or every worker client exited (with the error each one
logged last, e.g. a node command that could not start).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.coordinator.ops import StatusRequest
from tasksprint.coordinator.replies import ComputationStatus
from tasksprint.credentials import STDIN_PATH
from tasksprint.handshake import client_credential
from tasksprint.localcluster import LocalCluster, wait_exit


class RunFailed(Exception):
    """The computation cannot end well; the message says why, for people."""


def last_hook_event(log: Path) -> dict[str, Any] | None:
    """The last ``scheduler_hook_slow`` or ``scheduler_hook_returned`` event in a replica's JSON ``log``."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        if '"scheduler_hook_' in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                return event
    return None


def last_words(log: Path, *, lines: int = 200) -> str:
    """The last error a replica or client process wrote to ``log`` (JSON or plain lines), or ""."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    # Plain lines are a process's own farewell ("tasksprint replica: stopped:
    # ...") and what its nodes wrote to stderr ("python3: can't open file
    # ..."): the last few distinct ones, oldest first.
    plain: list[str] = []
    for line in reversed(tail):
        text = line.strip()
        if text and not text.startswith("{") and text not in plain:
            plain.insert(0, text[:500])
            if len(plain) == 3:
                break
    if plain:
        return "; ".join(plain)
    for line in reversed(tail):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("level") in ("error", "critical"):
            detail = [str(event.get("event", ""))]
            for key in ("error", "detail", "message", "stderr", "reason"):
                if event.get(key):
                    detail.append(f"{key}: {event[key]}")
            return "; ".join(detail)[:2000]
    return ""


@attrs.define(eq=False)
class LocalRun:
    scheduler: str
    node: str
    replicas: int = 3
    clients: int = 2
    slots: int | None = None
    data: Path | None = None
    progress: TextIO | None = sys.stderr
    timeout: float | None = None
    hook_report_after: float = 30.0  # seconds before a replica reports a hook that runs on
    _tmp: str | None = None
    _reported: set[str] = attrs.Factory(set)  # slow-hook messages already shown
    keep: bool = False  # keep a temporary base directory (its logs explain a failure)
    cluster: LocalCluster | None = None
    client_procs: list[subprocess.Popen] = attrs.Factory(list)

    def base(self) -> Path:
        if self.data is not None:
            return self.data
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="tasksprint-run-")
        return Path(self._tmp)

    def start(self) -> None:
        base = self.base()
        base.mkdir(parents=True, exist_ok=True)
        self.cluster = LocalCluster(
            base,
            self.replicas,
            scheduler=self.scheduler,
            extra_args=["--hook-report-after", str(self.hook_report_after)],
        )
        self.cluster.start()
        for i in range(self.clients):
            self.start_client(i)

    def client_command(self, i: int) -> list[str]:
        assert self.cluster is not None
        cmd = [
            sys.executable,
            "-m",
            "tasksprint.cli",
            "client",
            "--coordinators",
            self.cluster.peers_arg,
            "--node",
            self.node,
            # On standard input (start_client writes it): the nodes a client
            # starts can read its command line and environment.
            "--secret-file",
            STDIN_PATH,
            "--name",
            f"client{i}",
            "--log-format",
            "json",
            # Inside the run's directory: a client killed with SIGKILL cannot
            # remove its spill directory, the run's clean-up does.
            "--spill-dir",
            str(self.base() / "spill"),
        ]
        if self.slots is not None:
            cmd += ["--slots", str(self.slots)]
        return cmd

    def start_client(self, i: int, extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """Start worker client ``client{i}`` (``extra_args`` added to its command line), handing it its credential."""
        log_path = self.base() / f"client{i}.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                [*self.client_command(i), *extra_args],
                stdin=subprocess.PIPE,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert proc.stdin is not None and self.cluster is not None
        try:
            # The client credential, not the cluster secret: as on a real
            # cluster, workers can talk to the replicas, never act as one.
            proc.stdin.write(client_credential(self.cluster.secret))
            proc.stdin.close()
        except OSError:
            pass  # the client died at once; its exit is noticed like any other
        if i < len(self.client_procs):
            self.client_procs[i] = proc
        else:
            self.client_procs.append(proc)
        return proc

    def stop(self, grace: float = 5.0) -> None:
        """Stop clients and replicas. Clients of an ended computation exit by
        themselves; give them ``grace`` seconds before SIGTERM."""
        deadline = time.monotonic() + grace
        for p in self.client_procs:
            try:
                wait_exit(p, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.client_procs:
            if p.poll() is None:
                p.terminate()
        for p in self.client_procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.cluster is not None:
            self.cluster.stop()
        if self._tmp is not None and not self.keep:
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def wait_status(self) -> ComputationStatus:
        """Poll the replicas until the computation ends; return its final status."""
        assert self.cluster is not None
        channel = ReplicaChannel(self.cluster.addrs, self.cluster.secret)
        try:
            return await self._poll_status(channel)
        finally:
            await channel.aclose()

    async def _poll_status(self, channel: ReplicaChannel) -> ComputationStatus:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        last_line = ""
        bar = progress_bar(self.progress)  # None unless progress goes to a terminal
        try:
            return await self._poll_loop(channel, deadline, last_line, bar)
        finally:
            if bar is not None:
                bar.close()

    async def _poll_loop(
        self, channel: ReplicaChannel, deadline: float | None, last_line: str, bar: ProgressBar | None
    ) -> ComputationStatus:
        while True:
            try:
                st = await channel.status()
                status: ComputationStatus = await channel.request(StatusRequest())
            except ASK_ERRORS:
                self.report_slow_hooks()
                if self.client_procs and all(p.poll() is not None for p in self.client_procs):
                    final = await self._ended_elsewhere(channel)
                    if final is not None:
                        return final
                self.check_processes()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the computation did not end within {self.timeout}s") from None
                await channel.move_on()
                await trio.sleep(0.2)
                continue
            if st.leader is not None and st.leader != st.rid:
                await channel.prefer(st.leader)  # read from the leader: it is the most up to date
            line = progress_line(status, st.leader)
            if bar is not None:
                bar.update(status, st.leader)
            elif self.progress is not None and line != last_line:
                print(line, file=self.progress, flush=True)
                last_line = line
            if st.divergence:
                raise RunFailed(st.divergence)
            if status.ended:
                self.check_divergence()
                return status
            if self.client_procs and all(p.poll() is not None for p in self.client_procs):
                # Clients leave once the computation ended; the replica asked
                # may be a little behind the one they heard it from.
                final = await self._ended_elsewhere(channel)
                if final is not None:
                    return final
            self.check_processes()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the computation did not end within {self.timeout}s")
            await trio.sleep(0.2)

    async def _ended_elsewhere(self, channel: ReplicaChannel, patience: float = 5.0) -> ComputationStatus | None:
        """The final status from any replica that has it within ``patience`` seconds, else None.

        Raises :class:`RunFailed` if a replica asked reports a divergence: a
        majority may finish the computation without the replica that
        differed (see :mod:`tasksprint.digests`), and a scheduler that is not
        deterministic fails the run all the same, saying so.
        """
        assert self.cluster is not None
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            for i in range(len(self.cluster.addrs)):
                try:
                    await channel.prefer(i)
                    st = await channel.status(timeout=1.0)
                    status: ComputationStatus = await channel.request(StatusRequest(), timeout=1.0)
                except ASK_ERRORS:
                    continue
                if st.divergence:
                    raise RunFailed(st.divergence)
                if status.ended:
                    self.check_divergence()
                    return status
            await trio.sleep(0.2)
        return None

    def check_divergence(self) -> None:
        """Raise :class:`RunFailed` if a replica stopped itself because the scheduler is not deterministic.

        The majority may have finished the computation without it; the run
        fails all the same, quoting the stopped replica's reason.
        """
        cluster = self.cluster
        if cluster is None:
            return
        for i, p in enumerate(cluster.procs):
            if p is not None and p.poll() is not None:
                words = last_words(cluster.log_file(i))
                if "not deterministic" in words:
                    raise RunFailed(f"replica {i} stopped (exit code {p.returncode}): {words}")

    def report_slow_hooks(self) -> None:
        """Show, once each, the hooks the replicas report as running on (their event loops are blocked)."""
        cluster = self.cluster
        if cluster is None or self.progress is None:
            return
        for i in range(len(cluster.procs)):
            event = last_hook_event(cluster.log_file(i))
            if event is not None and event.get("event") == "scheduler_hook_slow":
                line = f"replica {i}: {event.get('message', 'a scheduler hook has not returned')}"
                if line not in self._reported:
                    self._reported.add(line)
                    print(line, file=self.progress, flush=True)

    def check_processes(self) -> None:
        """Raise :class:`RunFailed` if the processes the computation needs are gone, quoting why they went."""
        cluster = self.cluster
        if cluster is not None:
            gone = [i for i, p in enumerate(cluster.procs) if p is not None and p.poll() is not None]
            if len(gone) > len(cluster.procs) // 2 or any(
                "not deterministic" in last_words(cluster.log_file(i)) for i in gone
            ):
                why = "\n".join(
                    f"  replica {i} (exit code {cluster.procs[i].returncode}): "  # type: ignore[union-attr]
                    f"{last_words(cluster.log_file(i)) or 'no error logged'}"
                    for i in gone
                )
                raise RunFailed(f"replicas stopped before the computation ended:\n{why}")
        if self.client_procs and all(p.poll() is not None for p in self.client_procs):
            why = "\n".join(
                f"  client{i} (exit code {p.returncode}): "
                f"{last_words(self.base() / f'client{i}.log') or 'no error logged'}"
                for i, p in enumerate(self.client_procs)
            )
            raise RunFailed(f"every worker client exited before the computation ended:\n{why}")


def progress_line(status: ComputationStatus, leader: int | None) -> str:
    """One line saying how far the computation (a ``status`` answer) is."""
    t, clients = status.tasks, status.clients
    return (
        f"[{status.state}] tasks: {t.get('done', 0)} done, {t.get('running', 0)} running, "
        f"{t.get('pending', 0)} pending, {t.get('failed', 0)} failed, {t.get('killed', 0)} killed / {t['total']}"
        f" | clients: {clients.live} live, {clients.dead} dead | leader: replica {leader}"
    )


@attrs.define(eq=False)
class ProgressBar:
    """Tasks done of total, rate and ETA, redrawn in place on a terminal (rich)."""

    stream: TextIO
    _progress: Any = None
    _task: Any = None

    def __attrs_post_init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        # On a narrow terminal only the bar and the detail (cut at its end)
        # give way: the counts, the rate and the ETA keep their width.
        fixed = Column(no_wrap=True)
        self._progress = Progress(
            TextColumn("[bold]{task.fields[state]}", table_column=fixed),
            BarColumn(bar_width=20),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[rate]} tasks/s", table_column=Column(no_wrap=True)),
            TextColumn("ETA", table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=Console(file=self.stream),
            auto_refresh=False,
        )
        self._task = self._progress.add_task("tasks", total=None, state="waiting", rate="-", detail="")
        self._progress.start()

    def update(self, status: ComputationStatus, leader: int | None) -> None:
        """Redraw for a ``status`` answer."""
        t = status.tasks
        self._progress.update(
            self._task,
            total=t["total"] or None,
            completed=t.get("done", 0),
            state=status.state,
            detail=f"leader: replica {leader} | {t.get('running', 0)} running, {t.get('failed', 0)} failed",
        )
        speed = self._progress.tasks[0].speed
        self._progress.update(self._task, rate="-" if speed is None else f"{speed:.1f}", refresh=True)

    def close(self) -> None:
        self._progress.stop()


def progress_bar(stream: TextIO | None) -> ProgressBar | None:
    """A :class:`ProgressBar` on ``stream`` if it is a terminal; None (plain lines) otherwise."""
    isatty = getattr(stream, "isatty", None)
    if stream is None or isatty is None or not isatty():
        return None
    return ProgressBar(stream)


def failure_report(status: ComputationStatus) -> str:
    """What a failed computation's ``status`` answer says went wrong, for people."""
    f = status.failure
    lines = ["the computation failed:"]
    if f is None:
        return lines[0]
    if f.message:
        lines.append(f"  {f.message}")
    for key in ("kind", "hook", "tid", "cid", "slot", "error"):
        if getattr(f, key) is not None:
            lines.append(f"  {key}: {getattr(f, key)}")
    return "\n".join(lines)


def run_local(
    scheduler: str,
    node: str,
    *,
    replicas: int = 3,
    clients: int = 2,
    slots: int | None = None,
    data: Path | None = None,
    timeout: float | None = None,
    hook_report_after: float = 30.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run a computation on a local cluster; see the module docstring."""
    from tasksprint_sdk.coordinator import SchedulerLoadError, load_scheduler

    try:
        # Here, at once: a replica that cannot load it would only say so in its log.
        load_scheduler(scheduler)
    except SchedulerLoadError as exc:
        print(f"tasksprint run: {exc}", file=err)
        return 2
    run = LocalRun(scheduler, node, replicas, clients, slots, data, err, timeout, hook_report_after)
    # Ctrl-C must reach us even when started from a shell that ignores SIGINT
    # in background jobs: we are the one who cleans up the processes.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # SIGTERM (timeout, systemd, scancel) stops everything as Ctrl-C does:
    # it is turned into SIGINT, which trio delivers as KeyboardInterrupt.
    terminated = []

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(signum)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)
    status: ComputationStatus | None = None
    try:
        run.start()
        status = trio.run(run.wait_status)
    except KeyboardInterrupt:
        # A second signal must not cut the clean-up short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("terminated" if terminated else "interrupted", "; stopping the cluster", sep="", file=err)
        run.stop(grace=0)
        return 143 if terminated else 130
    except (TimeoutError, RunFailed) as exc:
        print(f"tasksprint run: {exc}", file=err)
    finally:
        # A failed run keeps its temporary directory: the logs explain it.
        run.keep = status is None or not status.finished
        run.stop()
        if run.data is not None or run.keep:
            print(f"logs and data directories: {run.base()}", file=err)
    if status is None:
        return 1
    if status.finished:
        result = None if status.result is None else attrs.asdict(status.result)
        print(json.dumps(result), file=out, flush=True)
        return 0
    print(failure_report(status), file=err)
    return 1
