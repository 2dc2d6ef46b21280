"""What the benchmarks measure, and how they measure it on any ``concurrent.futures.Executor``.

    runner ──> target.first_result()          start to first result (timed from before opening)
           ──> for (name, step) in target.steps(sizes):
                 submit    N x submit(noop, i), then wait for all          -> tasks/s
                 map       list(map(noop, range(N), chunksize=1 | 100))    -> tasks/s
                 latency   M x submit(noop, i).result(), one at a time     -> median, p99 in µs
                 big       K x submit(identity, 50 MB float64).result()    -> MB/s, there and back

A *target* is whatever the runner measures: ``ExecutorTarget`` wraps an Executor; raw pyzmq brings
its own (``rawzmq.RawTarget``). Every wait is bounded by a ``Deadline``, so a wedged system raises
``TimeoutError`` instead of hanging the harness.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from benchmarks.tasks import identity, noop

__all__ = [
    "BIG_ARRAY_MB",
    "METRICS",
    "SIZES",
    "WORKERS",
    "Deadline",
    "ExecutorTarget",
    "Metric",
    "Sizes",
    "Step",
    "Target",
    "big_array",
    "big_mbps",
    "check_big",
    "latency_summary",
    "rate",
]

BIG_ARRAY_MB = 50
WORKERS = 2  # worker processes per system
SLOW_CALL_S = 0.1  # a sequential no-op call slower than this is reported as a stall


@dataclass(frozen=True, slots=True)
class Metric:
    """One row of the results table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("submit_tps", "submit", "tasks/s", True),
    Metric("map_c1_tps", "map chunksize=1", "tasks/s", True),
    Metric("map_c100_tps", "map chunksize=100", "tasks/s", True),
    Metric("lat_median_us", "latency median", "µs", False),
    Metric("lat_p99_us", "latency p99", "µs", False),
    Metric("big_mbps", f"{BIG_ARRAY_MB} MB round trip", "MB/s", True),
    Metric("startup_s", "start to first result", "s", False),
)


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each step does."""

    tasks: int  # N: tasks per throughput step
    calls: int  # M: sequential round trips for latency
    big_round_trips: int  # K: 50 MB round trips
    warmup_calls: int
    #: R: runs of each throughput step; the median is reported. One map of 20,000 no-ops
    #: in chunks of 100 takes about 20 ms, and a single run's ratio to another system's
    #: swung from 1.1x to 2.1x between runs on this shared machine.
    repeats: int = 1

    def scaled(self, factor: float) -> Sizes:
        """N and M times ``factor`` (rounded to hundreds, at least 100), for a system too slow
        per task to do the full count in reasonable time; a rate needs no particular count."""

        def scale(count: int) -> int:
            return count if factor == 1 else max(100, int(round(count * factor, -2)))

        return replace(self, tasks=scale(self.tasks), calls=scale(self.calls))


SIZES: dict[str, Sizes] = {
    "smoke": Sizes(tasks=2_000, calls=200, big_round_trips=2, warmup_calls=20),
    "full": Sizes(tasks=20_000, calls=2_000, big_round_trips=5, warmup_calls=200, repeats=5),
}


class Deadline:
    """A point in ``time.monotonic()`` time after which every wait gives up."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises ``TimeoutError`` once the deadline has passed."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("benchmark deadline passed")
        return left


Step = tuple[str, Callable[[Deadline], dict[str, float]]]


class Target(Protocol):
    """Something the runner can measure."""

    def first_result(self, deadline: Deadline) -> None:
        """Run one no-op task and wait for its result."""

    def steps(self, sizes: Sizes) -> list[Step]:
        """The measurement steps, in the order they should run."""


def rate(count: int, started: float) -> float:
    """Items per second since ``started`` (a ``time.perf_counter()`` reading)."""
    return count / (time.perf_counter() - started)


def latency_summary(samples: list[float]) -> dict[str, float]:
    """Median and nearest-rank p99 of round-trip times given in seconds, reported in µs."""
    ordered = sorted(samples)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {"lat_median_us": statistics.median(ordered) * 1e6, "lat_p99_us": p99 * 1e6}


def big_array() -> np.ndarray:
    """A 50 MB float64 array (MB = 10**6 bytes)."""
    return np.arange(BIG_ARRAY_MB * 1_000_000 // 8, dtype=np.float64)


def check_big(result: Any, sent: np.ndarray) -> None:
    """Cheap sanity check that the array came back whole."""
    if not isinstance(result, np.ndarray) or result.shape != sent.shape or result[-1] != sent[-1]:
        raise AssertionError(f"50 MB round trip returned {type(result).__name__}, not the array")


def big_mbps(round_trips: int, started: float) -> float:
    """MB/s counting each round trip twice (there and back)."""
    return 2 * BIG_ARRAY_MB * round_trips / (time.perf_counter() - started)


class ExecutorTarget:
    """Measures a ``concurrent.futures.Executor`` through its public API only."""

    def __init__(self, executor: cf.Executor) -> None:
        self.executor = executor

    def first_result(self, deadline: Deadline) -> None:
        self.executor.submit(noop, 0).result(timeout=deadline.remaining())

    def steps(self, sizes: Sizes) -> list[Step]:
        return [
            ("warm-up", lambda d: self._warm_up(sizes, d)),
            ("submit", lambda d: {"submit_tps": self._submit(sizes.tasks, d)}),
            ("map chunksize=1", lambda d: {"map_c1_tps": self._map(sizes.tasks, 1, d)}),
            ("map chunksize=100", lambda d: {"map_c100_tps": self._map(sizes.tasks, 100, d)}),
            ("latency", lambda d: self._latency(sizes, d)),
            ("50 MB", lambda d: {"big_mbps": self._big(sizes.big_round_trips, d)}),
        ]

    def _warm_up(self, sizes: Sizes, deadline: Deadline) -> dict[str, float]:
        """Bring every worker up and every code path warm; measures nothing."""
        _wait_all([self.executor.submit(noop, i) for i in range(4 * WORKERS)], deadline)
        for i in range(sizes.warmup_calls):
            self.executor.submit(noop, i).result(timeout=deadline.remaining())
        return {}

    def _submit(self, n: int, deadline: Deadline) -> float:
        started = time.perf_counter()
        _wait_all([self.executor.submit(noop, i) for i in range(n)], deadline)
        return rate(n, started)

    def _map(self, n: int, chunksize: int, deadline: Deadline) -> float:
        started = time.perf_counter()
        results = self.executor.map(
            noop, range(n), timeout=deadline.remaining(), chunksize=chunksize
        )
        _check_count(results, n)
        return rate(n, started)

    def _latency(self, sizes: Sizes, deadline: Deadline) -> dict[str, float]:
        samples: list[float] = []
        for i in range(sizes.calls):
            started = time.perf_counter()
            try:
                self.executor.submit(noop, i).result(timeout=deadline.remaining())
            except TimeoutError:
                raise TimeoutError(_stalled(samples, sizes.calls)) from None
            samples.append(time.perf_counter() - started)
        return latency_summary(samples)

    def _big(self, round_trips: int, deadline: Deadline) -> float:
        array = big_array()
        self.executor.submit(identity, array).result(timeout=deadline.remaining())  # warm-up
        started = time.perf_counter()
        for _ in range(round_trips):
            check_big(self.executor.submit(identity, array).result(deadline.remaining()), array)
        return big_mbps(round_trips, started)


def _stalled(samples: list[float], calls: int) -> str:
    """Why the latency step ran out of time: how far it got, and how many calls were slow."""
    slow = [t for t in samples if t > SLOW_CALL_S]
    detail = f", the slowest {max(slow):.2f} s" if slow else ""
    return (
        f"call {len(samples) + 1} of {calls} had no result by the deadline; "
        f"{len(slow)} of the {len(samples)} calls before it took over {SLOW_CALL_S} s{detail}"
    )


def _wait_all(futures: list[cf.Future[Any]], deadline: Deadline) -> None:
    """Wait for every future; re-raise the first task error; ``TimeoutError`` past the deadline."""
    _, not_done = cf.wait(futures, timeout=deadline.remaining())
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {len(futures)} tasks unfinished at the deadline")
    for future in futures:
        future.result()


def _check_count(results: Iterable[Any], expected: int) -> None:
    got = sum(1 for _ in results)
    if got != expected:
        raise AssertionError(f"map returned {got} results, expected {expected}")
