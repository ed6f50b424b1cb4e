"""One node process started, run and stopped directly, without a pool.

See tests/nodes.py for the node programs; every test checks that no child
process is left, zombies included.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from nodes import FOREVER, SDK_NODE, TEST_LIMIT, assert_reaped, children, request, write_node

from tasksprint.exec.cgroup import detect_cgroups
from tasksprint.node_process import NodeProcess, NodeStartError, NodeState


async def test_node_process_directly(tmp_path: Path) -> None:
    with trio.fail_after(TEST_LIMIT):
        node = await NodeProcess.start(write_node(tmp_path, SDK_NODE))
        try:
            assert node.sdk == "python" and node.state is NodeState.IDLE and node.alive
            outcome = await node.run(request(1, "echo", 2))
            assert outcome.outputs == {"values": [2], "options": {}}
            assert node.state is NodeState.IDLE
        finally:
            await node.aclose()
        assert node.state is NodeState.DEAD and not node.alive
        with pytest.raises(RuntimeError, match="idle node"):
            await node.run(request(2, "echo"))
    assert_reaped({node.pid})


START_FAILURES = {
    "garbage": (
        "print('hello there', flush=True)\nimport time; time.sleep(%d)" % FOREVER,
        "wrote 'hello there' instead of the ready line",
    ),
    "exits": ("import sys; sys.exit(4)", "exited with code 4 before it was ready"),
    "protocol": (
        "import json; print(json.dumps({'type': 'ready', 'protocol': 2}), flush=True)\n"
        "import time; time.sleep(%d)" % FOREVER,
        "speaks node protocol 2, but this client speaks protocol 1",
    ),
    "silent": ("import time; time.sleep(%d)" % FOREVER, "did not write the ready line"),
}


@pytest.mark.parametrize("case", sorted(START_FAILURES))
async def test_node_that_does_not_get_ready_is_a_start_error(tmp_path: Path, case: str) -> None:
    source, expected = START_FAILURES[case]
    command = write_node(tmp_path, source)
    # Only the silent node needs the start timeout to run out, and it never writes anything,
    # however long it is given; every other node answers (or exits) in its own time.
    start_timeout = 0.5 if case == "silent" else TEST_LIMIT
    before = children()
    with trio.fail_after(2 * TEST_LIMIT):
        with pytest.raises(NodeStartError) as raised:
            await NodeProcess.start(command, start_timeout=start_timeout, exit_grace=TEST_LIMIT)
    message = str(raised.value)
    assert message.startswith(f"node command {command!r} ")
    assert expected in message
    # Whether it was killed before or after it got going, the node is gone and reaped.
    assert children() <= before


async def test_missing_command_is_a_start_error() -> None:
    command = "tasksprint-no-such-node-command --flag"
    with pytest.raises(NodeStartError, match=r"cannot start node command 'tasksprint-no-such-node-command --flag'"):
        await NodeProcess.start(command)
    for bad in ("", "python 'unbalanced"):
        with pytest.raises(NodeStartError):
            await NodeProcess.start(bad)


def _own_groups() -> list[str]:
    layout = detect_cgroups() if os.geteuid() == 0 else None
    if layout is None:
        return []
    prefix = f"{os.getpid()}-"
    return [name for parent in set(layout.parents.values()) for name in os.listdir(parent) if name.startswith(prefix)]


async def test_a_start_cancelled_before_the_process_runs_leaves_no_group(tmp_path: Path) -> None:
    """Regression: a pool closing while it started a node left that node's (empty) cgroup behind."""
    before = _own_groups()
    with trio.CancelScope() as scope:
        scope.cancel()
        await NodeProcess.start(write_node(tmp_path, SDK_NODE))
    assert scope.cancelled_caught
    assert _own_groups() == before
