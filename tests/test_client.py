"""Pieces of the worker client that can be tested without a cluster.

The whole client runs in tests/test_cluster_e2e.py and tests/test_examples.py;
here: the queue sizing rule, how completions wait to share a report, and
the pipelined data connection to a peer.
"""

from __future__ import annotations

import trio
import trio.testing

from tasksprint import wire
from tasksprint.api import Fetch, FetchReply
from tasksprint.client import Client, ClientConfig
from tasksprint.command_tasks import CommandTasks
from tasksprint.coordinator.ops import DoneOp
from tasksprint.peer_data import PeerLink
from tasksprint.queue_sizer import QueueSizer

SECRET = b"test-secret-for-peer-links"


# ------------------------------------------------------------ queue sizing


def sized(task_s: float, report_s: float, slots: int = 2, samples: int = 10) -> QueueSizer:
    sizer = QueueSizer(slots)
    for _ in range(samples):
        sizer.task_ran(task_s)
        sizer.reported(report_s)
    return sizer


def test_queue_covers_a_report_round_trip_for_short_tasks() -> None:
    # 5 ms tasks, 20 ms round trip: 2 slots x 2 x 20 / 5 = 16 tasks queued.
    assert sized(0.005, 0.020).proposal() == 16
    # Bounded: at most max_per_slot per slot.
    assert sized(0.00001, 0.020).proposal() == 2 * QueueSizer(2).max_per_slot


def test_tasks_much_longer_than_a_round_trip_get_no_queue() -> None:
    # Nothing queued: work stays balanced between clients.
    assert sized(2.0, 0.020).proposal() is None  # already 0
    sizer = sized(0.001, 0.020)
    sizer.current = sizer.proposal()
    for _ in range(200):
        sizer.task_ran(2.0)
    assert sizer.proposal() == 0


def test_queue_proposals_wait_for_samples_and_ignore_small_changes() -> None:
    assert sized(0.005, 0.020, samples=1).proposal() is None  # fewer samples than slots
    sizer = sized(0.005, 0.020)
    sizer.current = 16
    sizer.reported(0.030)  # 16 -> 17: within a factor of two, not worth a log entry
    assert sizer.proposal() is None
    for _ in range(40):
        sizer.reported(0.050)
    assert sizer.proposal() == 40  # 2 x 2 x ~50 ms / 5 ms


def test_the_queue_also_covers_the_wait_to_share_a_report() -> None:
    # 5 ms tasks, 20 ms round trip, completions waiting up to 50 ms: 2 x 2 x 70 / 5 = 56.
    sizer = QueueSizer(2, report_delay=0.050)
    for _ in range(10):
        sizer.task_ran(0.005)
        sizer.reported(0.020)
    assert sizer.proposal() == 56
    # Tasks much longer than both still get none.
    sizer = QueueSizer(2, report_delay=0.050)
    for _ in range(10):
        sizer.task_ran(5.0)
        sizer.reported(0.020)
    assert sizer.proposal() is None


# ------------------------------------------------------- coalesced reports


def client(report_batch: int = 256, report_delay: float = 0.05) -> Client:
    config = ClientConfig(
        coordinators=(("127.0.0.1", 9),),
        node_command=None,
        secret=SECRET,
        slots=1,
        report_batch=report_batch,
        report_delay=report_delay,
    )
    c = Client(config)
    c._slots = trio.CapacityLimiter(1)
    c._commands = CommandTasks("c")
    return c


def done(tid: int) -> DoneOp:
    return DoneOp(cid=1, tid=tid, attempt=1)


async def hold_slot(c: Client, nursery: trio.Nursery, waiting: int) -> trio.Event:
    """Take the client's only slot and queue ``waiting`` tasks behind it; set the event to let them all go."""
    assert c._slots is not None
    release = trio.Event()

    async def task() -> None:
        assert c._slots is not None
        async with c._slots:
            await release.wait()

    for _ in range(1 + waiting):
        nursery.start_soon(task)
    await trio.testing.wait_all_tasks_blocked()
    return release


async def test_a_completion_goes_at_once_when_no_task_waits_for_a_slot(autojump_clock) -> None:  # noqa: ARG001 (pytest-trio's fixture: virtual time)
    c = client()
    c._outbox.append(done(1))
    async with trio.open_nursery() as nursery:
        release = await hold_slot(c, nursery, waiting=0)
        start = trio.current_time()
        await c._coalesce(start + 0.05)
        assert trio.current_time() == start  # no wait: a slot may soon idle for want of the next task
        release.set()


async def test_completions_wait_for_later_ones_while_tasks_wait_for_a_slot(autojump_clock) -> None:  # noqa: ARG001
    c = client()
    c._outbox.append(done(1))
    async with trio.open_nursery() as nursery:
        release = await hold_slot(c, nursery, waiting=2)
        start = trio.current_time()

        async def later() -> None:
            await trio.sleep(0.01)
            c._outbox.append(done(2))
            c._outbox_ready.set()

        nursery.start_soon(later)
        await c._coalesce(start + 0.05)
        # Waited to the deadline, collecting the completion that came meanwhile.
        assert trio.current_time() == start + 0.05
        assert [op.tid for op in c._outbox] == [1, 2]
        release.set()


async def test_a_full_batch_or_an_emptied_queue_ends_the_wait(autojump_clock) -> None:  # noqa: ARG001
    c = client(report_batch=2)
    c._outbox.append(done(1))
    async with trio.open_nursery() as nursery:
        release = await hold_slot(c, nursery, waiting=1)
        start = trio.current_time()

        async def later() -> None:
            await trio.sleep(0.01)
            c._outbox.append(done(2))
            c._outbox_ready.set()

        nursery.start_soon(later)
        await c._coalesce(start + 0.05)
        assert trio.current_time() == start + 0.01  # the batch is full: no reason to wait on
        release.set()
    c = client()
    c._outbox.append(done(1))
    async with trio.open_nursery() as nursery:
        release = await hold_slot(c, nursery, waiting=1)
        start = trio.current_time()

        async def slot_taken() -> None:
            await trio.sleep(0.02)
            release.set()  # the queued task gets the slot: nothing waits any more
            await trio.testing.wait_all_tasks_blocked()
            c._outbox.append(done(2))
            c._outbox_ready.set()

        nursery.start_soon(slot_taken)
        await c._coalesce(start + 0.05)
        assert trio.current_time() == start + 0.02


async def test_no_delay_means_no_wait(autojump_clock) -> None:  # noqa: ARG001
    c = client(report_delay=0.0)
    c._outbox.append(done(1))
    async with trio.open_nursery() as nursery:
        release = await hold_slot(c, nursery, waiting=3)
        start = trio.current_time()
        await c._coalesce(start)
        assert trio.current_time() == start
        release.set()


def test_a_report_delay_out_of_bounds_is_refused() -> None:
    for bad in (-0.01, 11.0):
        try:
            client(report_delay=bad)
        except ValueError as exc:
            assert "--report-delay" in str(exc)
        else:
            raise AssertionError(f"report_delay={bad} was accepted")


# ------------------------------------------------------- pipelined fetches


async def data_server(nursery: trio.Nursery, answer) -> int:
    """A data port answering each Fetch in order with ``answer(fetch)``; returns its port."""

    async def handler(conn: wire.Connection) -> None:
        while True:
            try:
                msg = await conn.receive()
            except wire.ConnectionClosed:
                return
            reply = await answer(msg)
            if reply is None:
                await conn.aclose()
                return
            await conn.send(reply)

    listeners = await nursery.start(
        lambda task_status: wire.serve(
            handler, "127.0.0.1", 0, wire.Endpoint(secret=SECRET, role="data", ident="peer"), task_status=task_status
        )
    )
    return listeners[0].socket.getsockname()[1]


async def test_many_fetches_share_one_connection_and_each_gets_its_own_reply() -> None:
    connections = 0

    async def answer(msg: Fetch) -> FetchReply:
        await trio.sleep(0.001 * (msg.tid % 3))  # replies take different times, order must still hold
        return FetchReply(tid=msg.tid, found=True, value={"tid": msg.tid, "key": msg.key})

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await data_server(nursery, answer)
            conn = await wire.connect(
                "127.0.0.1", port, wire.Endpoint(secret=SECRET, role="client", ident="me"), expect=None
            )
            connections += 1
            link = PeerLink(conn)
            nursery.start_soon(link.read)
            got: dict[int, object] = {}

            async def one(tid: int) -> None:
                reply = await link.fetch(Fetch(tid=tid, key=f"k{tid}"))
                got[tid] = reply.value

            async with trio.open_nursery() as fetchers:
                for tid in range(200):
                    fetchers.start_soon(one, tid)
            assert got == {tid: {"tid": tid, "key": f"k{tid}"} for tid in range(200)}
            assert connections == 1 and not link.waiting and link.error is None

            # A fetcher that gives up does not disturb the others.
            with trio.move_on_after(0):
                await link.fetch(Fetch(tid=5, key=None))
            assert (await link.fetch(Fetch(tid=7, key=None))).value == {"tid": 7, "key": None}
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_a_broken_connection_fails_every_waiting_fetch_and_refuses_new_ones() -> None:
    release = trio.Event()

    async def answer(msg: Fetch) -> FetchReply | None:
        if msg.tid == 3:
            await release.wait()
            return None  # the peer goes away with requests outstanding
        return FetchReply(tid=msg.tid, found=True, value=msg.tid)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await data_server(nursery, answer)
            conn = await wire.connect(
                "127.0.0.1", port, wire.Endpoint(secret=SECRET, role="client", ident="me"), expect=None
            )
            link = PeerLink(conn)
            nursery.start_soon(link.read)
            errors: list[BaseException] = []
            results: list[int] = []

            async def one(tid: int) -> None:
                try:
                    results.append((await link.fetch(Fetch(tid=tid))).value)
                except wire.NETWORK_ERRORS as exc:
                    errors.append(exc)

            async with trio.open_nursery() as fetchers:
                for tid in range(6):
                    fetchers.start_soon(one, tid)
                    await trio.sleep(0.01)  # sent in this order
                release.set()
            assert sorted(results) == [0, 1, 2]
            assert len(errors) == 3 and link.error is not None and not link.waiting
            try:
                await link.fetch(Fetch(tid=9))
            except wire.NETWORK_ERRORS:
                pass
            else:
                raise AssertionError("a broken link accepted a fetch")
            nursery.cancel_scope.cancel()


def test_a_slow_first_task_does_not_hold_the_queue_down() -> None:
    # A node's first task is slow (imports); the next ones are not.
    sizer = QueueSizer(2)
    sizer.task_ran(0.100)
    for _ in range(19):
        sizer.task_ran(0.001)
    sizer.reported(0.010)
    # The mean of 20 samples is ~6 ms: the queue is 2 x 2 x 10 / 6 ~ 7, not 2 x 2 x 10 / 100 = 0.
    assert sizer.proposal() == 7


def test_unusable_spill_dir_is_refused_before_starting(tmp_path) -> None:
    import subprocess
    import sys

    secret = tmp_path / "secret"
    secret.write_text("a-secret-of-thirty-two-characters!\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasksprint.cli",
            "client",
            "--coordinators",
            "127.0.0.1:9",
            "--node",
            "true",
            "--secret-file",
            str(secret),
            "--spill-dir",
            str(blocker / "spill"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"cannot use --spill-dir {blocker / 'spill'}" in done.stderr


# ------------------------------------------------------- join before the computation starts


class _NotYetThenJoined:
    """A log client that answers NOT_INITIALIZED ``refusals`` times, then Joined; it notes when each join came."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.asked_at: list[float] = []

    async def submit(self, op: object, deadline: float) -> object:
        from tasksprint.coordinator.ops import ErrorCode, Joined, Refused

        self.asked_at.append(trio.current_time())
        if len(self.asked_at) <= self.refusals:
            return Refused(code=ErrorCode.NOT_INITIALIZED.value, error="not initialized yet")
        return Joined(cid=7)


async def test_a_join_before_the_computation_started_is_asked_again_soon_then_every_fifth_of_a_second(
    autojump_clock: trio.testing.MockClock, tmp_path
) -> None:
    import structlog

    from tasksprint.object_store import ObjectStore

    c = client()
    c._store = ObjectStore(1 << 20, tmp_path)
    c._log = structlog.get_logger("test")
    lc = _NotYetThenJoined(refusals=6)
    c._lc = lc  # type: ignore[assignment]
    assert await c._join_log() == 7
    waits = [round(b - a, 6) for a, b in zip(lc.asked_at, lc.asked_at[1:], strict=False)]
    assert waits == [0.02, 0.04, 0.08, 0.16, 0.2, 0.2]
