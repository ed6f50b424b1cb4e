"""What the processes of a cluster load at start-up: only what they use.

A local cluster starts four Python processes at once on a machine with few
cores, so each module a replica or a worker client imports without using it
delays the whole cluster's start.  Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WEB = ("hypercorn", "prometheus_client", "starlette", "tasksprint.dashboard.server")


def _loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {modules!r} if m in sys.modules]))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout.splitlines()[-1])


_ENDPOINT = """
from tasksprint import cli, launch, observe
args = cli.build_parser({command!r}).parse_args({argv!r})
http = launch.http_endpoint(args, {flag!r}, {command!r}, observe.NULL)
assert (http is None) == ({served!r} is None), http
"""

_COMMANDS = {
    "replica": (["replica", "--id", "0", "--peers", "127.0.0.1:9", "--data", "d"], "--http"),
    "client": (["client", "--coordinators", "127.0.0.1:9"], "--metrics"),
}


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_without_an_http_endpoint_the_web_server_is_not_loaded(command: str) -> None:
    argv, flag = _COMMANDS[command]
    code = _ENDPOINT.format(command=command, argv=argv, flag=flag, served=None)
    assert _loaded_after(code, WEB) == []


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_with_an_http_endpoint_the_web_server_is_loaded(command: str) -> None:
    argv, flag = _COMMANDS[command]
    argv = [*argv, flag, "127.0.0.1:0"]
    code = _ENDPOINT.format(command=command, argv=argv, flag=flag, served="127.0.0.1:0")
    assert _loaded_after(code, WEB) == list(WEB)


FOLLOWING = ("trio", "structlog", "tasksprint.channel")

_PREPARED = """
from tasksprint import batch_command, batch_run, cli
args = cli.build_parser("batch").parse_args(["batch", "-s", "localhost:2", "Tasks"])
prepared = batch_command.prepare(args, b"true\\n")
assert isinstance(prepared.run, batch_run.BatchRun)
"""


def test_a_batch_driver_has_what_starts_its_replicas_without_trio_and_the_channel() -> None:
    """It loads those while the replicas start (they are for following the run)."""
    assert _loaded_after(_PREPARED, FOLLOWING) == []


def test_following_a_batch_loads_them() -> None:
    assert _loaded_after(_PREPARED + "from tasksprint import batch_follow\n", FOLLOWING) == list(FOLLOWING)
