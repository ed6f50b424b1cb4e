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

__all__ = ["DEFAULT_SPILL_LIMIT", "InputError", "ObjectStore", "StoreFull", "select"]

# One encoder for every size: json.dumps with options builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))

#: Bytes of outputs a client spills to disk at most, by default.
DEFAULT_SPILL_LIMIT = 16 * 1024**3


class StoreFull(Exception):
    """A task's outputs cannot be kept: the spill limit is reached or the disk refused them."""


@attrs.define(eq=False)
class ObjectStore:
    """Task outputs kept by this client: in memory, spilled to disk above a size, up to ``spill_limit``."""

    memory_limit: int
    spill_dir: Path
    spill_limit: int = DEFAULT_SPILL_LIMIT
    _memory: dict[int, dict[str, Any]] = attrs.Factory(dict)
    _sizes: dict[int, int] = attrs.Factory(dict)
    _on_disk: set[int] = attrs.Factory(set)
    _in_memory_bytes: int = 0
    _on_disk_bytes: int = 0

    def put(self, tid: int, outputs: dict[str, Any]) -> dict[str, int]:
        """Keep ``outputs`` of task ``tid``; returns the size in bytes of each output.

        Raises :class:`StoreFull`, saying why, when they neither fit in
        memory nor within the spill limit, or the spill file cannot be
        written (the store is unchanged then, but for ``tid``'s old outputs).
        """
        sizes = {k: len(_COMPACT.encode(v)) for k, v in outputs.items()}
        total = sum(sizes.values())
        self.drop(tid)
        if self._in_memory_bytes + total > self.memory_limit:
            if self._on_disk_bytes + total > self.spill_limit:
                raise StoreFull(
                    f"task {tid}'s outputs ({total} bytes) do not fit: {self._in_memory_bytes} bytes are kept "
                    f"in memory (limit {self.memory_limit}) and {self._on_disk_bytes} on disk "
                    f"(spill limit {self.spill_limit})"
                )
            path = self.spill_dir / f"{tid}.json"
            try:
                path.write_text(json.dumps(outputs))
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise StoreFull(f"cannot spill task {tid}'s outputs to {path}: {exc.strerror or exc}") from None
            self._on_disk.add(tid)
            self._on_disk_bytes += total
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
            try:
                return json.loads((self.spill_dir / f"{tid}.json").read_text())
            except (OSError, ValueError):
                raise KeyError(tid) from None  # the spill file is gone or damaged: not held
        raise KeyError(tid)

    def drop(self, tid: int) -> None:
        if tid in self._memory:
            del self._memory[tid]
            self._in_memory_bytes -= self._sizes.get(tid, 0)
        if tid in self._on_disk:
            self._on_disk.discard(tid)
            self._on_disk_bytes -= self._sizes.get(tid, 0)
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
