"""Releasing a batch's idle engines (``--retire-cmd``; under Slurm by default), as disBatch does.

Once no batch task will start any more, an engine with nothing running or
placed there can never get work again (the batch scheduler's query answer
says which engines are busy, read from one state): :class:`Retirer` stops
its client and runs
the retire command (a shell command) with disBatch's environment: ``NODES``
(retired now), ``RETCODES``, ``ACTIVE``, ``RETIRED``, ``DRIVER_NODE``.
Under Slurm the default command is disBatch's ``scontrol update`` that
shrinks the job to the nodes still in use; a node with a replica or the
driver stays in use.  The default command is not run when it would keep
every node the job still has (a resize that changes nothing may still bar
the next one: a Slurm without an accounting database refuses a job's
second resize).  The decisions are :mod:`tasksprint.batch.slurm`'s.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

from tasksprint.batch.slurm import DEFAULT_RETIRE_COMMAND, engines_to_retire, kept_nodes, retire_environment

__all__ = ["RETIRE_TIMEOUT_S", "Retirer"]

#: The longest a retire command may run before it is given up (and logged).
RETIRE_TIMEOUT_S = 60.0


@attrs.define(eq=False)
class Retirer:
    """Retires idle engines of one run; see the module docstring.

    ``stop_engine(rank)`` stops that engine's client and returns its exit
    code; ``log(level, message)`` writes the driver's log.
    """

    command: str
    engine_nodes: Mapping[int, str]
    keep: Sequence[str]  # the replicas' nodes
    driver: str
    stop_engine: Callable[[int], int]
    log: Callable[[str, str], None]
    retired: list[int] = attrs.Factory(list)
    # The nodes the job holds, as far as the default command changed them (None: all it started with).
    held: set[str] | None = None

    async def check(self, answer: Mapping[str, Any]) -> list[int]:
        """Retire the engines idle for good, as the batch scheduler's query ``answer`` shows them."""
        ranks = engines_to_retire(answer.get("retire"), self.engine_nodes, self.retired)
        if not ranks:
            return []
        codes = [await trio.to_thread.run_sync(self.stop_engine, r) for r in ranks]
        self.retired += ranks
        live = [r for r in self.engine_nodes if r not in self.retired]
        env = retire_environment(
            [self.engine_nodes[r] for r in ranks], codes, self.engine_nodes, live, self.keep, self.driver
        )
        if self.command == DEFAULT_RETIRE_COMMAND:
            keep = kept_nodes(env)
            held = self.held if self.held is not None else {*self.engine_nodes.values(), *self.keep}
            if keep >= held:
                self.log("info", f"retired engines {ranks}: the job keeps all its nodes, no scontrol update")
                return ranks
        self.log("info", f"retiring engines {ranks}: {self.command!r} with {sorted(env.items())}")
        try:
            done = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    ["/bin/sh", "-c", self.command],
                    env={**os.environ, **env},
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=RETIRE_TIMEOUT_S,
                    check=False,
                )
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.log("warning", f"the retire command failed: {exc}")
            return ranks
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip()[:500]
            self.log("warning", f"the retire command exited with {done.returncode}: {detail}")
        else:
            self.log("info", f"retired engines {ranks}")
            if self.command == DEFAULT_RETIRE_COMMAND:
                self.held = kept_nodes(env)
        return ranks
