"""The metrics and tracing hook: named timing spans, counters and value figures.

Theory of operation
-------------------
``Replica``, ``Client`` and ``NodePool`` take an :class:`Observer` (default
:data:`NULL`, which records nothing) and report through it what their steps
cost: a *span* is a named duration (``storage.write``, ``paxos.step``,
``node.exchange``, ...; :meth:`Observer.timing` for one measured by the
caller), a *count* a named event tally, a *value* a named
quantity that is not a time (``applier.items_per_slot``).  Whoever wants the
figures -- the benchmark probe, ``tasksprint top``, the dashboard -- injects a
:class:`Recorder` and reads :meth:`Recorder.read` whenever it likes.

Cost on the hot path.  The preferred way to time a step is to wrap the
callable once, when the owner is built::

    self._write = observer.timed("storage.write", storage.write)

:data:`NULL` hands back the callable itself, so an unobserved process pays
nothing per call.  Inline blocks use ``with observer.span(name):``, and events
``observer.timing(name, seconds)``, ``observer.count(name)`` and
``observer.value(name, x)``; with :data:`NULL`
each is one attribute lookup and one call of an empty method (a span also
enters and leaves a shared empty context).

This module does no I/O: it reads no clock of its own (a :class:`Recorder`
is given one) and no environment; :func:`from_spec` turns the text of
``TASKSPRINT_OBSERVER`` (``module:factory``), which the command line reads,
into an observer.

Memory is bounded: each name keeps its count, sum, minimum and maximum
exactly, and its distribution in a histogram of logarithmic buckets (about
1,000 at most for the range of a float, a few dozen in practice), whose
quantiles are within :data:`RELATIVE_ERROR` of the true ones.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs

#: The environment variable naming an observer factory, ``module:factory``.
#: The factory is called with the role of the process (``"replica"`` or
#: ``"client"``) and returns an :class:`Observer`.
OBSERVER_ENV = "TASKSPRINT_OBSERVER"

#: Buckets per doubling of the histogram; quantiles are within this relative error.
BUCKETS_PER_DOUBLING = 16
RELATIVE_ERROR = 2 ** (1 / BUCKETS_PER_DOUBLING) - 1

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=Callable[..., Awaitable[Any]])


@runtime_checkable
class Observer(Protocol):
    """What an observed component calls; see the module docstring."""

    def timed(self, name: str, fn: F) -> F:
        """``fn`` itself, or a wrapper of it that records each call's duration as span ``name``."""
        ...

    def timed_async(self, name: str, fn: A) -> A:
        """As :meth:`timed`, for a coroutine function (the span covers the whole await)."""
        ...

    def span(self, name: str) -> Any:
        """A context manager recording the duration of its block as span ``name``."""
        ...

    def timing(self, name: str, seconds: float) -> None:
        """Record one duration of span ``name`` measured by the caller (seconds, >= 0)."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        ...

    def value(self, name: str, x: float) -> None:
        """Record one quantity ``x`` (not a duration) under ``name``."""
        ...


@attrs.frozen(kw_only=True)
class Figures:
    """What one name recorded: exact count, sum, min and max; quantiles from the histogram.

    Spans are in seconds.  A counter has ``count`` events and ``total`` their
    sum of ``n``; its quantiles are None.
    """

    count: int
    total: float
    min: float | None = None
    max: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @property
    def mean(self) -> float | None:
        return None if self.count == 0 else self.total / self.count


@attrs.frozen(kw_only=True)
class Readings:
    """Every name's :class:`Figures`, by kind, as read at one moment."""

    spans: Mapping[str, Figures] = attrs.field(factory=dict)
    counts: Mapping[str, Figures] = attrs.field(factory=dict)
    values: Mapping[str, Figures] = attrs.field(factory=dict)

    def as_dict(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """Plain data (for JSON): ``{"spans": {name: {"count": ..., "p50": ...}}, ...}``."""
        return {
            kind: {name: attrs.asdict(f) for name, f in sorted(getattr(self, kind).items())}
            for kind in ("spans", "counts", "values")
        }


class _NullSpan:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SPAN = _NullSpan()


class NullObserver:
    """Records nothing, at the least cost: wrapped callables come back unwrapped."""

    __slots__ = ()

    def timed(self, name: str, fn: F) -> F:
        return fn

    def timed_async(self, name: str, fn: A) -> A:
        return fn

    def span(self, name: str) -> _NullSpan:
        return _NULL_SPAN

    def timing(self, name: str, seconds: float) -> None:
        return None

    def count(self, name: str, n: int = 1) -> None:
        return None

    def value(self, name: str, x: float) -> None:
        return None

    def read(self) -> Readings:
        return Readings()


#: The default observer of every component.
NULL = NullObserver()


@attrs.define(eq=False)
class Histogram:
    """Exact count/sum/min/max and a bounded log-bucket histogram of non-negative samples."""

    _count: int = 0
    _total: float = 0.0
    _min: float = math.inf
    _max: float = -math.inf
    _zeros: int = 0
    _buckets: dict[int, int] = attrs.Factory(dict)

    def add(self, x: float) -> None:
        if not x >= 0.0 or x == math.inf:  # also refuses NaN
            raise ValueError(f"a recorded figure must be a finite number >= 0, got {x!r}")
        self._count += 1
        self._total += x
        self._min = min(self._min, x)
        self._max = max(self._max, x)
        if x == 0.0:
            self._zeros += 1
        else:
            b = math.floor(math.log2(x) * BUCKETS_PER_DOUBLING)
            self._buckets[b] = self._buckets.get(b, 0) + 1

    def quantile(self, q: float) -> float | None:
        """The nearest-rank ``q`` quantile (0 < q <= 1), within RELATIVE_ERROR; None if empty."""
        if self._count == 0:
            return None
        rank = max(1, math.ceil(q * self._count))
        seen = self._zeros
        if rank <= seen:
            return 0.0
        for b in sorted(self._buckets):
            seen += self._buckets[b]
            if rank <= seen:
                # The bucket's geometric middle, never outside what was seen.
                mid = 2 ** ((b + 0.5) / BUCKETS_PER_DOUBLING)
                return min(self._max, max(self._min, mid))
        return self._max  # unreachable: the buckets hold every non-zero sample

    def figures(self) -> Figures:
        if self._count == 0:
            return Figures(count=0, total=0.0)
        return Figures(
            count=self._count,
            total=self._total,
            min=self._min,
            max=self._max,
            p50=self.quantile(0.5),
            p90=self.quantile(0.9),
            p99=self.quantile(0.99),
        )


class TimedByClock:
    """``timed``, ``timed_async`` and ``span`` written once, over ``now()`` and ``timing()``.

    An observer that records durations subclasses this and supplies
    ``now()`` (its clock, in seconds) and ``timing(name, seconds)``.
    """

    def now(self) -> float:
        raise NotImplementedError

    def timing(self, name: str, seconds: float) -> None:
        raise NotImplementedError

    def timed(self, name: str, fn: F) -> F:
        clock, record = self.now, self.timing

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                record(name, max(0.0, clock() - t0))

        timed_call.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed_call  # type: ignore[return-value]

    def timed_async(self, name: str, fn: A) -> A:
        clock, record = self.now, self.timing

        async def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                record(name, max(0.0, clock() - t0))

        timed_call.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed_call  # type: ignore[return-value]

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = self.now()
        try:
            yield
        finally:
            self.timing(name, max(0.0, self.now() - t0))


@attrs.define(eq=False)
class Recorder(TimedByClock):
    """An :class:`Observer` that keeps figures in memory; read them with :meth:`read`.

    ``clock`` returns seconds (for example ``time.perf_counter``); it is the
    only source of time, so a test can drive a recorder with a fake clock.
    Not thread-safe: use it from the thread of one event loop.
    """

    _clock: Callable[[], float]
    _spans: dict[str, Histogram] = attrs.Factory(dict)
    _counts: dict[str, list[int]] = attrs.Factory(dict)
    _values: dict[str, Histogram] = attrs.Factory(dict)

    def timing(self, name: str, seconds: float) -> None:
        """Record one duration of span ``name`` measured by the caller (seconds, >= 0)."""
        h = self._spans.get(name)
        if h is None:
            h = self._spans[name] = Histogram()
        h.add(seconds)

    def now(self) -> float:
        return self._clock()

    def count(self, name: str, n: int = 1) -> None:
        c = self._counts.get(name)
        if c is None:
            c = self._counts[name] = [0, 0]
        c[0] += 1
        c[1] += n

    def value(self, name: str, x: float) -> None:
        h = self._values.get(name)
        if h is None:
            h = self._values[name] = Histogram()
        h.add(x)

    def read(self) -> Readings:
        """Every figure recorded so far (a copy: later recording does not change it)."""
        return Readings(
            spans={k: h.figures() for k, h in self._spans.items()},
            counts={k: Figures(count=c[0], total=float(c[1])) for k, c in self._counts.items()},
            values={k: h.figures() for k, h in self._values.items()},
        )


class ObserverSpecError(ValueError):
    """``TASKSPRINT_OBSERVER`` does not name a usable observer factory; the message says why."""


def from_spec(spec: str | None, role: str) -> Observer:
    """The observer named by ``spec`` (``module:factory``) for a process of ``role``.

    ``None`` or an empty ``spec`` gives :data:`NULL`.  The factory is called
    as ``factory(role)``.  Raises :class:`ObserverSpecError` if the module
    cannot be imported, the factory is missing, or it returns something that
    is not an :class:`Observer`.
    """
    if not spec:
        return NULL
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ObserverSpecError(f"{OBSERVER_ENV}={spec!r}: expected module:factory, e.g. mypkg.metrics:observer")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ObserverSpecError(
            f"{OBSERVER_ENV}={spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ObserverSpecError(f"{OBSERVER_ENV}={spec!r}: {module_name} has no callable {attr!r}")
    observer = factory(role)
    if not isinstance(observer, Observer):
        raise ObserverSpecError(
            f"{OBSERVER_ENV}={spec!r}: {attr}({role!r}) returned {type(observer).__name__}, "
            "which lacks timed/timed_async/span/timing/count/value"
        )
    return observer
