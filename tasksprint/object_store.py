"""The object store of a worker client: task outputs kept where they were made.

A task's outputs stay on the client whose node made them until a dependent
fetches them (locally, or from a peer over the data port, see
:mod:`tasksprint.peer_data`).  They are kept in memory up to a byte budget
and spilled to a file per task above it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

__all__ = ["InputError", "ObjectStore", "select"]


@attrs.define(eq=False)
class ObjectStore:
    """Task outputs kept by this client: in memory, spilled to disk above a size."""

    memory_limit: int
    spill_dir: Path
    _memory: dict[int, dict[str, Any]] = attrs.Factory(dict)
    _sizes: dict[int, int] = attrs.Factory(dict)
    _on_disk: set[int] = attrs.Factory(set)
    _in_memory_bytes: int = 0

    def put(self, tid: int, outputs: dict[str, Any]) -> dict[str, int]:
        """Keep ``outputs`` of task ``tid``; returns the size in bytes of each output."""
        sizes = {k: len(json.dumps(v, separators=(",", ":"))) for k, v in outputs.items()}
        total = sum(sizes.values())
        self.drop(tid)
        if self._in_memory_bytes + total > self.memory_limit:
            path = self.spill_dir / f"{tid}.json"
            path.write_text(json.dumps(outputs))
            self._on_disk.add(tid)
        else:
            self._memory[tid] = outputs
            self._in_memory_bytes += total
        self._sizes[tid] = total
        return sizes

    def has(self, tid: int) -> bool:
        return tid in self._memory or tid in self._on_disk

    def get(self, tid: int) -> dict[str, Any]:
        """All outputs of ``tid``; KeyError if this client does not hold them."""
        if tid in self._memory:
            return self._memory[tid]
        if tid in self._on_disk:
            return json.loads((self.spill_dir / f"{tid}.json").read_text())
        raise KeyError(tid)

    def drop(self, tid: int) -> None:
        if tid in self._memory:
            del self._memory[tid]
            self._in_memory_bytes -= self._sizes.get(tid, 0)
        if tid in self._on_disk:
            self._on_disk.discard(tid)
            (self.spill_dir / f"{tid}.json").unlink(missing_ok=True)
        self._sizes.pop(tid, None)


def select(outputs: dict[str, Any], key: str | None, tid: int) -> Any:
    """The input a dependent receives: output ``key`` of ``tid``, or all outputs if key is None."""
    if key is None:
        return outputs
    if key not in outputs:
        raise KeyError(f"task {tid} has no output {key!r} (it returned {sorted(outputs)})")
    return outputs[key]


@attrs.define(eq=False)
class InputError(Exception):
    """A pretask finished without the output a dependent asked for (a user bug, not a fault)."""
