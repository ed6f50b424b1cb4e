"""The dashboard's server and read model, without a cluster: a scripted poller stands in for the replicas."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from typing import Any

import attrs
import pytest
import trio
from prometheus_client import CollectorRegistry

from tasksprint.api import ReplicaStatus
from tasksprint.dashboard.server import (
    STATIC,
    BindRefused,
    Credentials,
    Dashboard,
    build_app,
    check_bind,
    is_loopback,
    serve_app,
)
from tasksprint.readmodel import History, ReplicaRow, Snapshot, computation_from_reply, replica_from_reply
from tests.monitor_cluster import WAIT_SECONDS, get

STATUS = {
    "state": "running",
    "tasks": {"pending": 1, "running": 1, "done": 2, "failed": 0, "killed": 0, "total": 4},
    "clients": {"live": 1, "dead": 0},
    "live_clients": [{"cid": 1, "name": "w", "addr": "127.0.0.1:9", "slots": 2, "running": 1, "prefetching": 0}],
}


@attrs.define(eq=False)
class ScriptedPoller:
    """Answers polls with the next leader of ``leaders``, and tasks from ``STATUS``."""

    leaders: list[int | None]
    polls: int = 0
    closed: bool = False

    async def poll(self) -> Snapshot:
        leader = self.leaders[min(self.polls, len(self.leaders) - 1)]
        self.polls += 1
        rows = tuple(
            ReplicaRow(
                address=f"127.0.0.1:{i}", up=True, rid=i, role="leader" if i == leader else "follower", leader=leader
            )
            for i in range(3)
        )
        return Snapshot(at=float(self.polls), replicas=rows, leader=leader, **computation_from_reply(STATUS))

    async def task(self, tid: int) -> dict[str, Any] | None:
        return {"tid": tid, "name": "value", "state": "done"} if 1 <= tid <= 4 else None

    async def tasks(self, first: int, count: int) -> list[dict[str, Any]]:
        return [t for t in [await self.task(i) for i in range(first, first + count)] if t]

    async def graph(self) -> dict[str, Any] | None:
        return {
            "tids": [1, 2, 3, 4],
            "names": ["value", "value", "value", "sum"],
            "states": ["done", "done", "running", "pending"],
            "pretasks": [[], [], [], [1, 2, 3]],
            "total": 4,
            "truncated": False,
        }

    async def aclose(self) -> None:
        self.closed = True


def test_replica_and_status_replies_are_read_defensively() -> None:
    typed = ReplicaStatus(rid=1, role="leader", leader=1, ballot="3.1", commit=9, applied=8, peers=())
    row = replica_from_reply("h:1", typed)
    assert (row.rid, row.role, row.leader, row.commit, row.applied, row.up) == (1, "leader", 1, 9, 8, True)
    # A reply missing fields, or with fields of the wrong type, reads as the defaults.
    row = replica_from_reply("h:2", {"rid": 2, "commit": "nine", "leader": True})
    assert (row.rid, row.commit, row.leader, row.role) == (2, 0, None, "")
    comp = computation_from_reply({"state": "running", "tasks": {"done": 3}})
    assert comp["tasks"]["done"] == 3 and comp["tasks"]["total"] == 3 and comp["clients"] == ()


def test_history_counts_leader_changes_and_throughput() -> None:
    history = History(size=3)
    for at, leader, done in [(1.0, 0, 0), (2.0, 0, 4), (3.0, None, 4), (4.0, 2, 10), (5.0, 2, 10)]:
        snap = Snapshot(at=at, replicas=(), leader=leader, state="running", tasks={"done": done, "total": 10})
        history.add(snap)
    assert history.leader_change_count == 2
    assert [leader for _, leader in history.leader_changes] == [0, 2]
    assert [p.throughput for p in history.points] == [0.0, 6.0, 0.0]  # the last three points only


def test_only_loopback_binds_without_credentials() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    with pytest.raises(BindRefused, match="--auth-file"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", Credentials(user="u", password="p"))


def test_the_command_refuses_a_public_address_without_credentials() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tasksprint.cli", "dashboard", "--coordinators", "127.0.0.1:1", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TASKSPRINT_SECRET": "s" * 32, "PATH": ""},
    )
    assert done.returncode == 2, done.stderr
    assert "--auth-file" in done.stderr


def test_every_asset_is_served_by_the_project() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        # No CDN, no external font: every URL in a page or a script is relative to the server.
        assert not re.search(r"(src|href)=[\"'](https?:)?//", text), path.name
        assert "@import" not in text and "url(http" not in text, path.name


async def serving(nursery: trio.Nursery, dashboard: Dashboard, credentials: Credentials | None = None) -> str:
    await nursery.start(dashboard.run)
    app = build_app(dashboard, CollectorRegistry())
    port = await nursery.start(
        lambda task_status: serve_app(app, "127.0.0.1", 0, credentials=credentials, task_status=task_status)
    )
    return f"http://127.0.0.1:{port}"


async def test_pages_api_and_events() -> None:
    poller = ScriptedPoller(leaders=[0, 0, 1])
    dashboard = Dashboard(poller, interval=3600)  # polled by the test below, not by the clock
    async with trio.open_nursery() as nursery:
        url = await serving(nursery, dashboard)
        code, page = await get(url + "/")
        assert code == 200 and "<title>TaskSprint dashboard</title>" in page
        for asset in ("/static/app.js", "/static/style.css"):
            assert (await get(url + asset))[0] == 200
        await dashboard.poll_once()
        await dashboard.poll_once()
        state = json.loads((await get(url + "/api/snapshot"))[1])
        assert state["polls"] == 3
        assert state["snapshot"]["leader"] == 1
        assert [c["leader"] for c in state["history"]["leader_changes"]] == [0, 1]
        assert json.loads((await get(url + "/api/task/2"))[1])["tid"] == 2
        assert (await get(url + "/api/task/99"))[0] == 404
        assert [t["tid"] for t in json.loads((await get(url + "/api/tasks?first=3&count=5"))[1])] == [3, 4]

        # The event stream: the current state at once, then one event per poll.
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(f"GET /events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        received = b""
        with trio.fail_after(WAIT_SECONDS):  # only turns a hang into a failure
            while received.count(b"event: snapshot") < 1:
                received += await stream.receive_some()
            await dashboard.poll_once()
            while received.count(b"event: snapshot") < 2:
                received += await stream.receive_some()
        last = received.rsplit(b"data: ", 1)[1].split(b"\n\n", 1)[0]
        assert json.loads(last)["polls"] == 4
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert poller.closed


async def test_credentials_are_required_when_configured() -> None:
    creds = Credentials(user="ops", password="s3cret")
    dashboard = Dashboard(ScriptedPoller(leaders=[0]), interval=3600)
    async with trio.open_nursery() as nursery:
        url = await serving(nursery, dashboard, creds)
        assert (await get(url + "/api/snapshot"))[0] == 401
        wrong = base64.b64encode(b"ops:wrong").decode()
        assert (await get(url + "/api/snapshot", headers={"Authorization": f"Basic {wrong}"}))[0] == 401
        right = base64.b64encode(b"ops:s3cret").decode()
        assert (await get(url + "/api/snapshot", headers={"Authorization": f"Basic {right}"}))[0] == 200
        nursery.cancel_scope.cancel()


async def test_a_process_serves_its_own_metrics_with_the_clusters() -> None:
    from tasksprint.dashboard.server import serve_dashboard
    from tasksprint.localcluster import free_ports
    from tasksprint.metrics import observer
    from tests.test_metrics import key, samples

    own = observer("replica")
    own.count("node.restart", 3)
    (nobody,) = free_ports(1)  # no replica listens there: it is reported down
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_dashboard(
                [("127.0.0.1", nobody)], b"s" * 32, "127.0.0.1", 0, own_metrics=own.registry, task_status=task_status
            )
        )
        code, body = await get(f"http://127.0.0.1:{port}/metrics")
        nursery.cancel_scope.cancel()
    assert code == 200
    got = samples(body)
    assert got[key("tasksprint_node_restarts_total", role="replica")] == 3
    assert got[key("tasksprint_replica_up", replica="0", address=f"127.0.0.1:{nobody}")] == 0


STATUS_LINES = (
    "ROTTEN HEADER LINE\n"
    "    \t1\t1\t-1\tnode-a\t101\t0\t1.500\t100.000\t101.500\t0\t''\t0\t''\techo one\n"
    "R   \t2\t2\t-1\tnode-b\t102\t3\t0.250\t100.000\t100.250\t0\t''\t5\t'oops\\n'\texit 3\n"
)


async def test_the_graph_and_a_status_file_are_served(tmp_path) -> None:
    status = tmp_path / "run_status.txt"
    status.write_text(STATUS_LINES)
    dashboard = Dashboard(ScriptedPoller(leaders=[0]), interval=3600, status_file=status)
    async with trio.open_nursery() as nursery:
        url = await serving(nursery, dashboard)
        graph = json.loads((await get(url + "/api/graph"))[1])
        assert graph["pretasks"][3] == [1, 2, 3] and graph["states"][2] == "running"
        code, body = await get(url + "/api/status-file")
        assert code == 200, body
        answer = json.loads(body)
        assert [r["task_id"] for r in answer["records"]] == [1, 2]
        assert answer["records"][1]["exit_code"] == 3 and answer["records"][1]["err_snippet"] == "oops\n"
        assert answer["records"][1]["flags"].startswith("R")
        assert answer["counts"] == {"records": 2, "failed": 1, "rejected": 1}
        assert answer["rejected"][0]["line"] == 1  # the unreadable line is named, not fatal
        status.unlink()
        code, body = await get(url + "/api/status-file")
        assert code == 404 and "run_status.txt" in json.loads(body)["error"]
        nursery.cancel_scope.cancel()
    dashboard = Dashboard(ScriptedPoller(leaders=[0]), interval=3600)
    async with trio.open_nursery() as nursery:
        url = await serving(nursery, dashboard)
        code, body = await get(url + "/api/status-file")
        assert code == 404 and "--status-file" in json.loads(body)["error"]
        nursery.cancel_scope.cancel()


def test_only_the_end_of_a_huge_status_file_is_read(tmp_path, monkeypatch) -> None:
    from tasksprint.dashboard import server

    line = "    \t{}\t1\t-1\tn\t1\t0\t0.000\t1.000\t1.000\t0\t''\t0\t''\tcmd\n"
    status = tmp_path / "status"
    status.write_text("".join(line.format(i) for i in range(1, 101)))
    monkeypatch.setattr(server, "STATUS_FILE_MAX", len(line.format(100)) * 10 + 5)
    answer = server.read_status_file(status)
    assert answer["cut"] and answer["counts"]["rejected"] == 0
    assert [r["task_id"] for r in answer["records"]] == list(range(91, 101))
