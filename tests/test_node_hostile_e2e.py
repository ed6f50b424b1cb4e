"""A node's bad answers end its tasks, not its client: real replicas and a client.

One client with one slot runs a node that answers with NaN, with JSON
nested 200,000 deep, and with an integer past 64 bits; each of those tasks
fails with a reason naming what was wrong, and the same client then runs a
good task and its dependent.  The client started by the run reads the
secret from standard input: the secret file's path is neither in its
command line nor in its environment, which its nodes can read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_cluster_e2e import (  # noqa: F401 (computation is a fixture)
    GUARD_SECONDS,
    computation,
    finished_values,
    node_command,
    outcome,
    write_scheduler,
)

pytestmark = pytest.mark.slow

BAD_NODE = """
import json, sys
print(json.dumps({"type": "ready", "protocol": 1}), flush=True)
for line in sys.stdin:
    m = json.loads(line)
    if m["type"] == "exit":
        break
    head = '{"type": "result", "id": %d, "attempt": %d, "outputs": ' % (m["id"], m["attempt"])
    outputs = {
        "nan": '{"x": NaN}',
        "deep": '{"x": ' + "[" * 200000 + "]" * 200000 + "}",
        "huge": '{"x": ' + str(2**70) + "}",
        "ok": '{"v": 20}',
        "plus": json.dumps({"v": sum(i["v"] for i in m["inputs"]) + 1}),
    }[m["name"]]
    sys.stdout.write(head + outputs + "}\\n")
    sys.stdout.flush()
"""


async def test_bad_node_answers_fail_their_tasks_and_the_client_goes_on(computation, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    spec = write_scheduler(
        tmp_path,
        "Hostile",
        """
        class Hostile(Coordinator):
            def init(self, seed):
                self.failed = {}
                self.names = {}
                for name in ("nan", "deep", "huge"):
                    self.names[self.start_task(name, retries=0)] = name
                self.ok = self.start_task("ok", keys=["v"])
                self.plus = self.start_task("plus", pretasks=[self.ok], keys=["v"])
                self.value = None

            def task_failed(self, tid, error, record=None):
                self.failed[self.names[tid]] = error
                self.check()

            def task_done(self, tid, values):
                if tid == self.plus:
                    self.value = values["v"]
                self.check()

            def check(self):
                if len(self.failed) == 3 and self.value is not None:
                    self.finish(values={"failed": self.failed, "value": self.value})
        """,
    )
    node = tmp_path / "bad_node.py"
    node.write_text(BAD_NODE)
    with trio.fail_after(GUARD_SECONDS):
        run = await computation(spec, node_command(node), clients=1, slots=1)
        client = run.client_procs[0]
        assert run.cluster is not None
        secret_path = str(run.cluster.secret_file).encode()
        assert secret_path not in Path(f"/proc/{client.pid}/cmdline").read_bytes()
        assert secret_path not in Path(f"/proc/{client.pid}/environ").read_bytes()
        got = finished_values(await outcome(run), run)
        # A client of an ended computation leaves by itself with exit code 0, so by
        # now it may be gone: what it must not have done is crash (a non-zero exit).
        assert client.poll() in (None, 0), f"the client crashed on its node's bad answers: {client.returncode}"
    failed = got["failed"]
    assert "NaN is not JSON" in failed["nan"], failed
    assert "nested too deeply to parse" in failed["deep"], failed
    assert "integer outside 64 bits" in failed["huge"], failed
    assert got["value"] == 21
