"""A network where every delivery is explicit, for scripted tests and the hypothesis state machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cluster import Cluster


class ManualNet:
    """Holds every message in flight; the test decides what arrives, and when.

    ``cluster.now`` is the simulated time; tests move it and call
    ``cluster.tick(r)`` themselves.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.queue: list[tuple[Any, Any, Any]] = []
        self.delivered: list[tuple[Any, Any, Any]] = []  # everything that arrived, in order
        cluster.net = self._send

    def _send(self, src: Any, dst: Any, payload: Any) -> None:
        self.queue.append((src, dst, payload))

    def find(self, kind: type | None = None, src: Any = None, dst: Any = None) -> list[int]:
        """Indexes of queued messages matching the filters."""
        return [
            i
            for i, (s, d, m) in enumerate(self.queue)
            if (kind is None or isinstance(m, kind)) and (src is None or s == src) and (dst is None or d == dst)
        ]

    def peek(self, kind: type | None = None, src: Any = None, dst: Any = None) -> list[Any]:
        return [self.queue[i][2] for i in self.find(kind, src, dst)]

    def deliver_at(self, i: int) -> tuple[Any, Any, Any]:
        src, dst, payload = self.queue.pop(i)
        self.delivered.append((src, dst, payload))
        self.cluster.deliver(src, dst, payload)
        return src, dst, payload

    def deliver(self, kind: type | None = None, src: Any = None, dst: Any = None) -> Any:
        """Deliver the oldest matching message; fail if there is none."""
        found = self.find(kind, src, dst)
        assert found, f"no {kind.__name__ if kind else 'message'} from {src} to {dst} in flight"
        return self.deliver_at(found[0])[2]

    def drop(self, kind: type | None = None, src: Any = None, dst: Any = None) -> int:
        """Lose every matching message; returns how many."""
        found = set(self.find(kind, src, dst))
        self.queue = [m for i, m in enumerate(self.queue) if i not in found]
        return len(found)

    def flush_until(self, done: Callable[[], bool], *, among: set[Any] | None = None, limit: int = 100_000) -> None:
        """Deliver in order (between ``among`` only, if given) until ``done()``; fail if the network runs dry."""
        n = 0
        while not done():
            ok = [i for i, (s, d, _) in enumerate(self.queue) if among is None or (s in among and d in among)]
            assert ok, "nothing left to deliver"
            self.deliver_at(ok[0])
            n += 1
            assert n < limit, "the condition never came true"

    def flush(self, *, among: set[Any] | None = None, limit: int = 100_000) -> int:
        """Deliver in order until nothing is in flight (between ``among`` only, if given)."""
        n = 0
        while True:
            ok = [i for i, (s, d, _) in enumerate(self.queue) if among is None or (s in among and d in among)]
            if not ok:
                return n
            self.deliver_at(ok[0])
            n += 1
            assert n < limit, "messages keep flowing: the cluster does not quiesce"
