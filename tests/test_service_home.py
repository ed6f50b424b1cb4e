"""Finding the service: the state directory, addresses, the secret; and task files for ``new --from-file``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasksprint.credentials import SecretError
from tasksprint.service.commands import specs_from_file
from tasksprint.service.home import (
    SERVER_ENV,
    ServiceNotFound,
    ensure_secret,
    locate,
    parse_addrs,
    write_server_file,
)


def test_secret_is_generated_once_and_private(tmp_path: Path) -> None:
    path = ensure_secret(tmp_path / "state")
    first = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600 and len(first.strip()) == 64
    assert ensure_secret(tmp_path / "state").read_text() == first


def test_locate_prefers_the_flag_then_the_environment_then_the_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    ensure_secret(state)
    monkeypatch.delenv(SERVER_ENV, raising=False)
    with pytest.raises(ServiceNotFound, match="tasksprint server"):
        locate(state=state)
    write_server_file(state, ["127.0.0.1:7001", "127.0.0.1:7002"])
    addrs, secret = locate(state=state)
    assert addrs == [("127.0.0.1", 7001), ("127.0.0.1", 7002)] and secret == (state / "secret").read_bytes().strip()
    monkeypatch.setenv(SERVER_ENV, "h:9")
    assert locate(state=state)[0] == [("h", 9)]
    assert locate("[::1]:5", state=state)[0] == [("::1", 5)]


def test_locate_says_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SERVER_ENV, raising=False)
    state = tmp_path / "state"
    state.mkdir()
    (state / "server.json").write_text("{not json")
    with pytest.raises(ServiceNotFound, match="server.json cannot be read"):
        locate(state=state)
    (state / "server.json").write_text(json.dumps({"replicas": [1, 2]}))
    with pytest.raises(ServiceNotFound, match="does not list"):
        locate(state=state)
    with pytest.raises(ServiceNotFound, match="Copy the server's secret"):
        locate("h:1", state=state)
    with pytest.raises(SecretError):
        locate("h:1", state=state, secret_file=tmp_path / "missing")
    for bad in ("h", "h:", ":5", "h:0", "h:99999", "h:x", "a:1,,b:2"):
        with pytest.raises(ServiceNotFound, match="--server"):
            parse_addrs(bad, "--server")


def test_task_files(tmp_path: Path) -> None:
    good = tmp_path / "tasks.txt"
    good.write_text(
        "# comment\n\n"
        "--require gpu,big --want fast --job j --after 1,2 --env A=b --timeout 5 -- python train.py --lr 1\n"
        "'echo hi > out'\n"
    )
    first, second = specs_from_file(good)
    assert first == {
        "argv": ["python", "train.py", "--lr", "1"],
        "require": ["gpu", "big"],
        "want": ["fast"],
        "after": [1, 2],
        "job": "j",
        "timeout": 5.0,
        "env": {"A": "b"},
    }
    assert second == {"cmd": "echo hi > out"}
    for line, error in (
        ("--retries x echo", "line 1"),
        ("--after one echo", "--after takes task ids"),
        ("--env NOEQUALS echo", "NAME=VALUE"),
        ("--job j", "no command"),
        ("'unclosed", "line 1"),
    ):
        bad = tmp_path / "bad.txt"
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=error):
            specs_from_file(bad)


def test_wait_past_its_timeout_raises_the_documented_timeout_error() -> None:
    import trio

    from tasksprint.service.api import AsyncService

    class NeverDone(AsyncService):
        async def states(self, ids):  # type: ignore[no-untyped-def, override]
            return {i: "running" for i in ids}

    async def main() -> None:
        svc = NeverDone(addrs=[], secret=b"x")
        with pytest.raises(TimeoutError, match=r"not finished after 0.05s"):
            await svc.wait([1, 2], timeout=0.05, poll=0.01)

    trio.run(main)
