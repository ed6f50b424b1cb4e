"""Node programs and checks shared by the node process and node pool tests.

The tests start real processes: the Monte Carlo and JavaScript examples,
the SDK-less nodes printed in docs/protocol.md, and throwaway nodes written
into the test's tmp_path. Every test checks that no child process is left,
zombies included.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tasksprint.node_protocol import FailureKind, TaskOutcome, TaskRequest

REPO = Path(__file__).resolve().parent.parent
MONTECARLO = REPO / "examples" / "montecarlo" / "node.py"
JS_EXAMPLE = REPO / "examples" / "js" / "node.js"
PROTOCOL_DOC = REPO / "docs" / "protocol.md"
NODE_JS = shutil.which("node")
needs_node_js = pytest.mark.skipif(
    NODE_JS is None, reason="Node.js (`node`) is not on PATH; the JavaScript nodes cannot run"
)

# Bound on every test; a passing test takes a small fraction of it.
TEST_LIMIT = 60
# Node sleeps meant to outlast the test: only killing the node ends them.
FOREVER = 600

# An SDK-less node that misbehaves on request, to exercise the host's checks.
RAW_NODE = f"""
import json, os, sys, time

def send(text):
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()

send(json.dumps({{"type": "ready", "protocol": 1, "sdk": "raw"}}))
for line in sys.stdin:
    m = json.loads(line)
    if m["type"] == "exit":
        break
    tid, attempt, name = m["id"], m["attempt"], m["name"]
    answer = {{"type": "result", "id": tid, "attempt": attempt, "outputs": {{"args": m["args"]}}}}
    if name == "garbage":
        send("garbage " * 100)
    elif name == "wrong_id":
        send(json.dumps(dict(answer, id=tid + 1)))
    elif name == "wrong_attempt":
        send(json.dumps(dict(answer, attempt=attempt + 1)))
    elif name == "bool_id":
        send(json.dumps(dict(answer, id=True)))
    elif name == "list_outputs":
        send(json.dumps(dict(answer, outputs=[1, 2])))
    elif name == "other_type":
        send(json.dumps(dict(answer, type="progress")))
    elif name == "error_not_string":
        send(json.dumps({{"type": "error", "id": tid, "attempt": attempt, "error": 5}}))
    elif name == "long_line":
        sys.stdout.write("x" * 5000)
        sys.stdout.flush()
        time.sleep({FOREVER})
    elif name == "close_stdout":
        sys.stdout.flush()
        os.close(1)
        time.sleep({FOREVER})
    elif name == "half_then_exit":
        sys.stdout.write("half")
        sys.stdout.flush()
        os._exit(5)
    else:
        send(json.dumps(answer))
"""

# A node with the Python SDK whose tasks crash, hang, and report on themselves.
SDK_NODE = f"""
import os, signal, subprocess, sys, time
from pathlib import Path
from tasksprint_sdk.node import Node

class TestNode(Node):
    def echo(self, *values, **options):
        return {{"values": list(values), "options": options}}

    def pid(self):
        return {{"pid": os.getpid(), "executable": sys.executable}}

    def fail(self):
        raise ValueError("no good")

    def exit_code(self, code):
        os._exit(code)

    def kill_self(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def hang(self, marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep({FOREVER})

    def hang_with_child(self, marker):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep({FOREVER})"])
        Path(marker).write_text(str(child.pid))
        time.sleep({FOREVER})

    def crash_with_child(self, marker):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep({FOREVER})"])
        Path(marker).write_text(str(child.pid))
        os._exit(3)

    def wait_for(self, path):
        while not os.path.exists(path):
            time.sleep(0.01)
        return {{"seen": path}}

    def touch(self, path):
        Path(path).write_text("here")
        return {{"made": path}}

    def log(self, text):
        print(text, file=sys.stderr, flush=True)
        return {{}}

TestNode().start()
"""


def write_node(tmp_path: Path, source: str, name: str = "node.py") -> str:
    """Write a Python node script; returns the node command that runs it."""
    script = tmp_path / name
    script.write_text(source)
    return f"python {shlex.quote(str(script))}"


def request(
    tid: int,
    name: str,
    *args: Any,
    attempt: int = 0,
    timeout: float | None = None,
    inputs: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> TaskRequest:
    return TaskRequest(
        tid=tid, attempt=attempt, name=name, inputs=inputs, args=args, kwargs=kwargs or {}, seed=seed, timeout=timeout
    )


def children() -> set[int]:
    """Process ids whose parent is this process, zombies included."""
    found = set()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # Fields after the command (which may hold spaces): state, ppid, ...
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            found.add(int(entry.name))
    return found


def assert_reaped(pids: set[int]) -> None:
    """Each pid is no longer a child of this process: it exited and was reaped."""
    assert pids
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@contextlib.contextmanager
def no_stray(marker: Path) -> Iterator[None]:
    """Kill the grandchild whose pid ``marker`` holds if it outlives the test (when the test fails)."""
    try:
        yield
    finally:
        if marker.exists() and marker.read_text() and not process_gone(int(marker.read_text())):
            os.kill(int(marker.read_text()), signal.SIGKILL)


async def wait_for_file(path: Path) -> str:
    while not path.exists() or not path.read_text():
        await trio.sleep(0.01)
    return path.read_text()


def failure(outcome: TaskOutcome, kind: FailureKind) -> str:
    assert not outcome.ok and outcome.failure is kind, outcome
    return outcome.error
