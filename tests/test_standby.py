"""A broker pair (issue 20): a standby broker takes over, with nothing lost or delivered twice.

Real brokers, workers and clients on loopback (and, for the partition, in network
namespaces of the test's own); the brokers' pair moves are read from their logs.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tasks
from conftest import INTERVAL, LIVENESS, make_keys
from pairpool import PairPool

import fade

pytestmark = pytest.mark.timeout(180)

EXPIRY = INTERVAL * LIVENESS


@pytest.fixture(params=["plain", "keys"])
def pair_pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PairPool]:
    """A pair on loopback, with CurveZMQ keys or without; the test starts what it needs."""
    keys = make_keys(tmp_path) if request.param == "keys" else None
    pool = PairPool(tmp_path, INTERVAL, LIVENESS, keys=keys)
    try:
        yield pool
    finally:
        pool.stop()


def executor(pool: PairPool) -> fade.Executor:
    return fade.Executor(
        pool.addresses,
        keys=pool.client_keys(),
        heartbeat_interval=INTERVAL,
        heartbeat_liveness=LIVENESS,
    )


def runs_of(log: Path) -> list[tuple[int, float]]:
    """(task, wall time) of every run, in order (tasks.record_run appends a line each)."""
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines()]
    return [(int(value), float(when)) for value, _, when in lines]


def runs_per_task(log: Path) -> collections.Counter[int]:
    return collections.Counter(task for task, _ in runs_of(log))


class Fault(threading.Thread):
    """Calls ``fault`` once ``at`` tasks have run (as the log says), noting the wall time."""

    def __init__(self, log: Path, at: int, fault: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.log, self.at, self.fault = log, at, fault
        self.when: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            if self.log.exists() and self.log.read_bytes().count(b"\n") >= self.at:
                self.when = time.time()
                self.fault()
                return


def map_with_fault(
    ex: fade.Executor, log: Path, count: int, at: int, fault: Callable[[], object]
) -> tuple[list[int], float]:
    """Map ``count`` tasks of a millisecond; ``fault()`` once ``at`` have run. Returns the
    results and the wall time of the fault."""
    thread = Fault(log, at, fault)
    thread.start()
    try:
        results = list(ex.map(tasks.record_run, [str(log)] * count, range(count), [0.001] * count))
    finally:
        thread.stop.set()
        thread.join()
    assert thread.when is not None, "the map ended before the fault"
    return results, thread.when


def outage(log: Path, since: float) -> float:
    """The longest time no task ran after ``since`` (a wall time), up to the last run."""
    times = [since, *sorted(when for _, when in runs_of(log) if when > since)]
    return max(b - a for a, b in itertools.pairwise(times))


# -- failover -------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_kill_the_active_broker_mid_map(pair_pool: PairPool, tmp_path: Path) -> None:
    """SIGKILL the active broker during a 5,000-task map on 4 workers: the map completes,
    every result correct and delivered once; the backup took over within 2 x expiry."""
    pool = pair_pool
    pool.start_both()
    pool.start_worker(2)
    pool.start_worker(2)
    pool.wait_workers("a", 4)
    log = tmp_path / "runs.txt"
    count = 5000
    with executor(pool) as ex:
        results, killed = map_with_fault(ex, log, count, 1000, lambda: pool.kill("a"))
        assert results == list(range(count))
        assert ex._io.late_results == 0
    runs = runs_per_task(log)
    gap = outage(log, killed)
    assert set(runs) == set(range(count))
    assert pool.transitions("b")[-1] in ("alone -> active (vote)", "passive -> active (vote)")
    # Failover: the expiry, then a pass or two of the loops involved.
    assert gap < 2 * EXPIRY, f"no task ran for {gap:.2f}s after the kill"
    state = pool.state("b")
    assert state is not None and state["pair"]["state"] == "active"
    assert state["pair"]["peer_state"] == "lost"
