"""The worker client: one per machine, runs the tasks the coordinator assigns to it.

Theory of operation
-------------------
The client joins the computation through the replicated log (a ``join``
command; the answer is its client id), then long-polls a replica for its
*view*: the tasks assigned to it and the tasks it must kill, changed since
the version it last saw.  A poll returns within milliseconds of a change and
otherwise after ``poll_wait`` seconds; the polls themselves are what keeps
the client alive in the leader's eyes.

For each assigned task a runner fetches every input as soon as the view says
where it is (rolling prefetch: the coordinator assigns a task once some of
its inputs exist, so inputs move while other pretasks still run), from the
local object store or from the data server of the peer client that holds
it, then runs the task on a free node process of the node pool (a task
waiting for inputs holds no node), keeps its outputs in the object store
(until the view lists them ``released``: every task reading them finished),
and reports completion (only the outputs named in the task's ``keys``
travel to the coordinator) through the log.  A view lists a task once per
assignment; where its inputs are comes after that as holder changes, kept
per input, so a task reading n outputs costs O(n) in views, not O(n) per
change.

Queue
~~~~~
The client accepts ``queue`` tasks beyond its ``slots``; they wait in the
node pool, so a node that finishes starts the next task at once instead of
idling for a report round trip.  By default the queue is sized from the
task and report times it measures (:class:`QueueSizer`) and announced to
the coordinator with a join under the same name.

Reports
~~~~~~~
Completions go to one reporter, which sends all it has in one ``batch``
command, waits for that command's result, and sends the next: the log
commits them in the order they finished here.  While tasks queued here wait
for a slot, a completion waits up to ``report_delay`` for later ones to go in
the same command (fewer log commands per task; no slot idles for it).  That order makes *early
inputs* safe: when a dependent placed here needs an output this client's
own node just made, the runner takes it from the store at once, without
waiting for the commit, and its completion names it (``early``).  The
completion that made the input is queued first, so the log applies it
first; the coordinator accepts the dependent's completion only if that
very attempt here is the committed one, and otherwise starts the task
again (another copy's output won, or the input's report was refused).
Reports are commands with the client's id and a sequence number, so a retry
after a lost answer is applied once.  A peer that cannot serve an input is
reported as ``lost``; the coordinator then recomputes it from its lineage and
the view points the runner to the new holder.
"""

from __future__ import annotations

import collections
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from tasksprint import codec, wire
from tasksprint.channel import ASK_ERRORS, ReplicaChannel
from tasksprint.client_inputs import Attempt, ClientInputs
from tasksprint.client_reports import ClientReports, session_lost
from tasksprint.command_tasks import CommandTasks
from tasksprint.coordinator.ops import (
    DoneOp,
    ErrorCode,
    FailedOp,
    Joined,
    JoinOp,
    Refused,
    ViewRequest,
)
from tasksprint.coordinator.replies import Assignment, ClientView
from tasksprint.coordinator.specs import COMMAND_TASK
from tasksprint.exec.workdir import FILES_KEY
from tasksprint.log_client import LogClient, SessionExpiredError
from tasksprint.node_pool import NodePool
from tasksprint.node_protocol import TaskRequest
from tasksprint.object_store import DEFAULT_SPILL_LIMIT, InputError, ObjectStore, StoreFull
from tasksprint.observe import NullObserver, Observer
from tasksprint.peer_data import PeerFetcher
from tasksprint.queue_sizer import QueueSizer
from tasksprint.usage import UsageMeter

log = structlog.get_logger("tasksprint.client")

#: Largest outputs of one task, encoded: what fits in one message to a peer, with room for its envelope.
MAX_OUTPUTS_BYTES = wire.MAX_FRAME_DEFAULT - 1024 * 1024
USAGE_EVERY = 1.0  # seconds between readings of this client's and its nodes' CPU and memory


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Settings of one worker client; sizes in bytes, times in seconds."""

    coordinators: tuple[tuple[str, int], ...]
    #: How to start a node process; None: this client runs command tasks only.
    node_command: str | None
    secret: bytes
    slots: int = attrs.Factory(lambda: os.cpu_count() or 1)
    have: tuple[str, ...] = ()
    name: str = attrs.Factory(lambda: f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}")
    data_host: str = "127.0.0.1"
    data_port: int = 0
    memory_limit: int = 512 * 1024 * 1024  # object store bytes in memory before spilling
    spill_dir: Path | None = None
    spill_limit: int = DEFAULT_SPILL_LIMIT  # object store bytes on disk at most
    poll_wait: float = 2.0
    node_cwd: Path | None = None
    #: Tasks the coordinator may assign beyond ``slots``, waiting here for a
    #: free node.  None: adapt it to the tasks (see :class:`QueueSizer`).
    queue: int | None = None
    #: Completions reported in one log command at most.
    report_batch: int = 256
    #: Seconds a completion may wait for later ones, to share one log command
    #: with them, while tasks queued here wait for a slot (none waiting: it
    #: goes at once).  0: report as soon as the last report is committed.
    report_delay: float = 0.05
    #: GPUs (CUDA device indices) handed to command tasks one each while they run.
    gpus: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"--slots must be at least 1, got {self.slots}")
        if self.queue is not None and self.queue < 0:
            raise ValueError(f"--queue must be at least 0, got {self.queue}")
        if self.report_batch < 1:
            raise ValueError(f"--report-batch must be at least 1, got {self.report_batch}")
        if not 0 <= self.report_delay <= 10:
            raise ValueError(f"--report-delay must be between 0 and 10 seconds, got {self.report_delay}")
        if not self.coordinators:
            raise ValueError("no coordinators given")


@attrs.define(eq=False)
class Client(ClientInputs, ClientReports):
    """A worker client. ``await client.run()`` works until the computation ends."""

    config: ClientConfig
    observer: Observer = attrs.Factory(NullObserver)
    _store: ObjectStore | None = None
    _pool: NodePool | None = None
    _lc: LogClient | None = None
    _cid: int | None = None
    _runs: dict[int, Attempt] = attrs.Factory(dict)
    _nursery: trio.Nursery | None = None
    # Completions waiting to be reported; one reporter sends them in order,
    # one log command at a time (see _reporter).
    _outbox: list[DoneOp | FailedOp] = attrs.Factory(list)
    _outbox_ready: trio.Event = attrs.Factory(trio.Event)
    # tid -> attempt whose outputs this client's own nodes made (in the store).
    _made: dict[int, int] = attrs.Factory(dict)
    # tid -> (cid, data address) of the client holding its outputs, as the
    # latest view said (None: nowhere yet); each fetcher of an input waits on
    # that input's event in _input_events, set when it moves or is made here.
    _holders: dict[int, tuple[int | None, str | None]] = attrs.Factory(dict)
    _input_events: dict[int, trio.Event] = attrs.Factory(dict)
    # (tid, attempt) this client finished, so a view that lists one again
    # (sent before the completion was committed) does not run it twice.
    _finished: collections.OrderedDict = attrs.Factory(collections.OrderedDict)
    _sizer: QueueSizer | None = None
    _peers: PeerFetcher | None = None
    _commands: CommandTasks | None = None
    # The slots, shared by node tasks and command tasks.
    _slots: trio.CapacityLimiter | None = None
    # When the latest task here completed, while no view has brought tasks since.
    _idle_since: float | None = None
    _log: Any = None
    data_port: int | None = None
    final_state: str | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> str:
        """Serve until the computation finishes or fails; returns its final state."""
        cfg = self.config
        self._log = log.bind(client=cfg.name)
        if cfg.spill_dir is not None:
            Path(cfg.spill_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tasksprint-store-", dir=cfg.spill_dir) as spill:
            self._store = ObjectStore(cfg.memory_limit, Path(spill), cfg.spill_limit)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._peers = PeerFetcher(wire.Endpoint(secret=cfg.secret, role="client", ident=cfg.name), nursery)
                    listeners = await nursery.start(
                        lambda task_status: wire.serve(
                            self._serve_data,
                            cfg.data_host,
                            cfg.data_port,
                            wire.Endpoint(secret=cfg.secret, role="data", ident=cfg.name),
                            task_status=task_status,
                        )
                    )
                    self.data_port = listeners[0].socket.getsockname()[1]
                    self._slots = trio.CapacityLimiter(cfg.slots)
                    self._commands = CommandTasks(
                        cfg.name, work_root=Path(spill), gpus=list(cfg.gpus), observer=self.observer
                    )
                    self._commands.start()
                    if cfg.node_command is not None:
                        self._pool = NodePool(cfg.node_command, cfg.slots, cwd=cfg.node_cwd, observer=self.observer)
                        await self._pool.start(nursery)
                    # The log session id must be new in every process: a restarted
                    # client that reused one would have its first commands taken
                    # for duplicates of the previous life's.
                    session = f"{cfg.name}-{os.urandom(4).hex()}"
                    async with LogClient(list(cfg.coordinators), cfg.secret, client_id=session) as lc:
                        self._lc = lc
                        task_status.started(self)
                        state = await self._work()
                    nursery.cancel_scope.cancel()
            finally:
                if self._commands is not None:
                    self._commands.close()  # no task runs now: the nursery ended
        self.final_state = state
        self._log.info("client_finished", state=state)
        return state

    # ------------------------------------------------------------------

    def _join_op(self, queue: int, holds: tuple[tuple[int, int], ...] = (), *, cid: int | None = None) -> JoinOp:
        cfg = self.config
        return JoinOp(
            client=cfg.name,
            addr=f"{cfg.data_host}:{self.data_port}",
            slots=cfg.slots,
            queue=queue,
            have=cfg.have,
            holds=holds,
            cid=cid,
        )

    def _offers(self) -> tuple[tuple[int, int], ...]:
        """The (tid, attempt) outputs this client's nodes made and its store still keeps."""
        assert self._store is not None
        return tuple(sorted((tid, a) for tid, a in self._made.items() if self._store.has(tid)))

    async def _join(self) -> int:
        with self.observer.span("client.join"):
            return await self._join_log()

    async def _join_log(self) -> int:
        """Join (again); returns the client id.

        The same id as before means the coordinator still has this client
        alive (a view from a replica behind the log said otherwise): then
        the store keeps everything.  A new id is a new incarnation: the
        offered outputs it did not take back are dropped.
        """
        cfg = self.config
        assert self._lc is not None and self._store is not None
        # Outputs kept from a previous incarnation (declared dead, back now)
        # are offered: the coordinator takes back those it has not recomputed.
        offers = self._offers()
        op = self._join_op(self._queue_size(), offers).to_wire()
        not_ready_wait = 0.02
        while True:
            try:
                result = await self._lc.submit(op, deadline=10.0)
            except SessionExpiredError as exc:
                raise session_lost(exc) from None
            except Exception as exc:  # Unavailable: no replica answered
                self._log.warning("coordinators_unreachable", error=str(exc), retry_in="1s")
                await trio.sleep(1.0)
                continue
            if isinstance(result, Refused) and result.code == ErrorCode.NOT_INITIALIZED.value:
                # The replicas are still starting the computation: wait for its first entry.  A new
                # cluster's leader proposes it right after the joins held during its election, so
                # it is usually one entry away: ask again soon, then every 0.2 s as before.
                await trio.sleep(not_ready_wait)
                not_ready_wait = min(2 * not_ready_wait, 0.2)
                continue
            if isinstance(result, Refused) and result.code == ErrorCode.FORBIDDEN.value:
                # Our name belongs to a live client of another session (this
                # client restarted): it is ours once that one is declared dead.
                self._log.warning("name_in_use", error=result.error, retry_in="1s")
                await trio.sleep(1.0)
                continue
            if not isinstance(result, Joined):
                error = result.error if isinstance(result, Refused) else f"unexpected answer {result!r:.200}"
                raise RuntimeError(f"the coordinator refused to let this client join: {error}")
            adopted = set(result.adopted)
            if result.cid != self._cid:
                for tid, _ in offers:
                    if tid not in adopted:
                        self._made.pop(tid, None)
                        self._store.drop(tid)
            self._log.info(
                "joined",
                cid=result.cid,
                slots=cfg.slots,
                have=list(cfg.have),
                offered=len(offers),
                adopted=len(adopted),
            )
            return result.cid

    def _queue_size(self) -> int:
        cfg = self.config
        if cfg.queue is not None:
            return cfg.queue
        if self._sizer is None:
            self._sizer = QueueSizer(cfg.slots, report_delay=cfg.report_delay)
        return self._sizer.current

    async def _resize_queue(self, queue: int) -> None:
        """Tell the coordinator this client's new queue size (a join under the same name)."""
        assert self._sizer is not None
        self._sizer.current = queue
        self._log.info("queue_resized", queue=queue)
        assert self._lc is not None
        try:
            # Only for this incarnation: committed after it was declared dead
            # (a partition delays it), a plain join would start a new
            # incarnation offering none of the outputs in the store, and the
            # rejoin that offers them would find that one alive.
            await self._lc.submit(self._join_op(queue, cid=self._cid).to_wire(), deadline=10.0)
        except Exception as exc:  # Unavailable: the next proposal tries again
            self._log.warning("queue_resize_failed", error=str(exc))

    async def _work(self) -> str:
        cfg = self.config
        channel = ReplicaChannel(cfg.coordinators, cfg.secret, cfg.name)
        self._queue_size()
        self._cid = await self._join()
        assert self._nursery is not None
        self._nursery.start_soon(self._reporter)
        version = 0
        backoff = 0.05
        # A poll that a cut-off replica never answers must give up (and try
        # another replica) well before the coordinator's client timeout: the
        # contact only counts once a replica that reaches the leader has it.
        wait, margin = cfg.poll_wait, 5.0
        meter = UsageMeter(trio.current_time)
        usage_at, cpu, rss = -math.inf, None, None
        while True:
            # What this client and its nodes use, for the status answer: a few
            # /proc reads per process, so at most once a second (a poll per
            # chain step would otherwise pay them every time).
            if trio.current_time() - usage_at >= USAGE_EVERY:
                usage_at = trio.current_time()
                cpu, rss = meter.read([os.getpid(), *(self._pool.pids if self._pool is not None else ())])
            try:
                with self.observer.span("client.view_poll"):
                    view = await channel.request(
                        ViewRequest(cid=self._cid, after=version, wait=wait, cpu=cpu, rss=rss), timeout=wait + margin
                    )
            except ASK_ERRORS as exc:
                if channel.failures >= len(cfg.coordinators):
                    self._log.warning("coordinators_unreachable", error=str(exc), retry_in=f"{backoff:.2f}s")
                await trio.sleep(backoff)
                # Capped low: a client cut off by a partition must find out soon after the heal that it was
                # declared dead, and offer its outputs back before they are recomputed elsewhere.
                backoff = min(backoff * 2, 0.5)
                continue
            backoff = 0.05
            if not isinstance(view, ClientView):
                raise wire.BadMessage(f"expected a ClientView, got {type(view).__name__}")
            limit = view.client_timeout
            if limit > 0:
                wait, margin = min(cfg.poll_wait, limit / 4), min(5.0, limit / 4)
            if view.state in ("finished", "failed"):
                return view.state
            if not view.alive:
                # Declared dead (we were silent too long): our tasks went elsewhere.
                # Or a replica that has not applied our join yet answered: the
                # join (idempotent for a live name) then gives back the same id.
                cid = await self._join()
                if cid == self._cid:
                    self._log.info("view_from_a_replica_behind", cid=cid)
                    await trio.sleep(0.1)
                    continue
                self._log.warning("declared_dead_rejoined", old_cid=self._cid, cid=cid)
                for run in self._runs.values():
                    run.scope.cancel()
                self._runs.clear()
                self._cid = cid
                version = 0
                continue
            version = view.version
            self.observer.value("client.tasks_per_view", len(view.tasks))
            if view.tasks and self._idle_since is not None:
                self.observer.timing("client.assignment_gap", trio.current_time() - self._idle_since)
                self._idle_since = None
            for tid in view.kill:
                self._kill(tid)
            for tid in view.released:
                self._release(tid)
            for task in view.tasks:
                for inp in task.inputs:
                    self._note_holder(inp.tid, inp.cid, inp.addr)
            for moved in view.holders:
                self._note_holder(moved.tid, moved.cid, moved.addr)
            for task in view.tasks:
                self._assign(task)

    def _release(self, tid: int) -> None:
        """Every task reading ``tid``'s outputs has finished: drop them from the store.

        Not while an attempt of ``tid`` runs here: it puts new outputs anyway.
        """
        assert self._store is not None
        if tid in self._runs or tid not in self._made:
            return
        del self._made[tid]
        self._store.drop(tid)
        self._log.debug("outputs_released", tid=tid)

    def _kill(self, tid: int) -> None:
        run = self._runs.pop(tid, None)
        if run is not None:
            run.scope.cancel()  # a command task's process tree dies with it
            if self._pool is not None:
                self._pool.cancel(tid)

    def _assign(self, task: Assignment) -> None:
        if (task.tid, task.attempt) in self._finished:
            return  # listed again before our completion was committed
        run = self._runs.get(task.tid)
        if run is not None and run.task.attempt == task.attempt:
            return  # listed again (inputs move as holder changes)
        if run is not None:
            self._kill(task.tid)
        run = Attempt(task)
        self._runs[task.tid] = run
        assert self._nursery is not None
        self._nursery.start_soon(self._run_task, run)

    async def _run_task(self, run: Attempt) -> None:
        tid, attempt = run.task.tid, run.task.attempt
        op: DoneOp | FailedOp | None = None
        known = sum(1 for i in run.task.inputs if i.cid is not None)
        self._log.debug(
            "task_assigned",
            tid=tid,
            attempt=attempt,
            name=run.task.name,
            inputs=len(run.task.inputs),
            available=known,
        )
        assigned_at = trio.current_time()
        with run.scope:
            try:
                with self.observer.span("client.gather_inputs"):
                    inputs = await self._gather_inputs(run)
            except* InputError as group:
                error = "; ".join(str(e) for e in group.exceptions)
                op = self._failed_op(tid, attempt, error)
            else:
                if inputs:
                    waited = round(trio.current_time() - assigned_at, 3)
                    self._log.debug("task_inputs_ready", tid=tid, attempt=attempt, waited=waited)
                op = await self._execute(run, inputs)
                self._log.debug("task_finished", tid=tid, attempt=attempt, ok=isinstance(op, DoneOp))
            finally:
                if self._runs.get(tid) is run:
                    del self._runs[tid]
        if isinstance(op, FailedOp) and not run.scope.cancelled_caught:
            self._queue_report(tid, attempt, op)

    async def _execute(self, run: Attempt, inputs: list[Any]) -> DoneOp | FailedOp:
        """Run the task on a node or as a command; return the log command reporting how it went."""
        task = run.task
        tid, attempt = task.tid, task.attempt
        assert self._slots is not None and self._commands is not None and self._store is not None
        if task.name == COMMAND_TASK:
            ran = await self._commands.run_in_slot(task, inputs, self._slots)
            ok, outputs, error, seconds = ran.error is None, ran.outputs, ran.error or "", ran.seconds
        elif self._pool is None:
            ok, outputs, seconds = False, {}, 0.0
            error = f"client {self.config.name} runs command tasks only (it was started without a node command)"
        else:
            request = TaskRequest(
                tid=tid,
                attempt=attempt,
                name=task.name,
                inputs=inputs,
                args=task.args,
                kwargs=task.kwargs,
                seed=task.seed,
                timeout=task.timeout,
            )
            try:
                async with self._slots:
                    outcome = await self._pool.run(request)
            except ValueError as exc:  # inputs or arguments a node cannot be given (not JSON)
                ok, outputs, error, seconds = False, {}, str(exc), 0.0
            else:
                ok, outputs, error, seconds = outcome.ok, outcome.outputs or {}, outcome.error or "", outcome.seconds
            if ok and len(codec.encode(outputs)) > MAX_OUTPUTS_BYTES:
                ok, outputs = False, {}
                error = (
                    f"task {tid} ({task.name}) produced outputs larger than {MAX_OUTPUTS_BYTES} bytes encoded, "
                    "more than a peer can fetch in one message"
                )
        self.observer.timing("task.run", max(0.0, seconds))
        if not ok:
            self._log.info("task_failed", tid=tid, attempt=attempt, error=error)
            assert self._cid is not None
            record = self._failed_record(tid, outputs) if task.name == COMMAND_TASK and outputs else None
            return FailedOp(cid=self._cid, tid=tid, attempt=attempt, error=error, record=record)
        if self._sizer is not None:
            self._sizer.task_ran(seconds)
        with self.observer.span("store.put"):
            try:
                sizes = self._store.put(tid, outputs)
            except StoreFull as exc:
                self._log.warning("store_full", tid=tid, attempt=attempt, error=str(exc))
                assert self._cid is not None
                return FailedOp(cid=self._cid, tid=tid, attempt=attempt, error=str(exc))
        values = {k: outputs[k] for k in task.keys if k in outputs}
        assert self._cid is not None
        op = DoneOp(cid=self._cid, tid=tid, attempt=attempt, values=values, sizes=sizes, early=tuple(run.early))
        # Queued for the log before any dependent here can use the outputs
        # (below), so its completion is reported after this one.
        self._queue_report(tid, attempt, op)
        self._made[tid] = attempt
        event = self._input_events.pop(tid, None)
        if event is not None:
            event.set()
        return op

    def _failed_record(self, tid: int, outputs: dict[str, Any]) -> dict[str, Any]:
        """A failed command's record for the log; its result files stay in the object store.

        The files are served from here like a done task's outputs (``tasksprint
        result get``); the record names them (``result_files``) and never
        carries them (they may be megabytes, the log is replicated).
        """
        files = outputs.get(FILES_KEY)
        record = {k: v for k, v in outputs.items() if k != FILES_KEY}
        if not isinstance(files, dict) or not files:
            return record
        assert self._store is not None
        try:
            self._store.put(tid, outputs)
        except StoreFull as exc:
            self._log.warning("store_full", tid=tid, error=str(exc), kept="no result files of the failed task")
            return record
        record["result_files"] = sorted(files)
        return record
