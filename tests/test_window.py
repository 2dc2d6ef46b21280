"""The client window: how many of a client's tasks may be at the broker (fade/window.py).

A window of exactly the pool's capacity covers the workers' round trip to the broker,
not the client's: with short tasks the broker had nothing to send when a worker asked
(a worker running 0.5 ms tasks found none waiting at 98% of its starts), and a client a
few milliseconds from its broker ran 2 ms tasks at 0.42 of the pool's speed
(``benchmarks/durations.py --client-delay``). The window adds what the pool gets
through in HORIZON seconds at the rate results come back; slow tasks add nothing.
"""

from __future__ import annotations

import threading
import time

import pytest
import tasks
from conftest import Pool

import fade
from fade.window import HORIZON, MAX_EXTRA, RATE_PERIOD, Window

pytestmark = pytest.mark.timeout(120)


# -- the arithmetic, no sockets --------------------------------------------------------------


def _burst(window: Window, per_second: float, seconds: float, start: float = 100.0) -> float:
    """Results at ``per_second`` for ``seconds``, from a burst started at ``start``."""
    window.sending(0, start)
    step = 0.001
    now = start
    while now < start + seconds:
        now += step
        window.results(round(per_second * step), now)
    return now


def test_a_window_is_the_capacity_until_results_come() -> None:
    window = Window()
    assert window.size() == 0  # no worker yet
    window.capacity = 6
    assert window.size() == 6
    window.sending(0, 100.0)
    assert window.size() == 6


def test_fast_results_widen_the_window_by_the_horizon() -> None:
    window = Window()
    window.capacity = 6
    _burst(window, 2000, 4 * RATE_PERIOD)
    assert window.rate == pytest.approx(2000, rel=0.05)
    assert window.size() == pytest.approx(6 + 2000 * HORIZON, abs=5)


def test_slow_results_add_nothing() -> None:
    window = Window()
    window.capacity = 2
    _burst(window, 4, 10 * RATE_PERIOD)  # tasks of 0.5 s on two workers
    assert window.size() == 2


def test_a_burst_after_an_idle_spell_starts_from_the_capacity() -> None:
    """The rate of earlier (fast) tasks says nothing of the next ones, which may be slow:
    tasks at the broker can no longer be cancelled."""
    window = Window()
    window.capacity = 4
    end = _burst(window, 5000, 4 * RATE_PERIOD)
    assert window.size() > 100
    window.sending(0, end + 1.0)  # nothing was out: a new burst
    assert window.size() == 4


def test_the_horizon_adds_at_most_max_extra() -> None:
    window = Window()
    window.capacity = 8
    _burst(window, 10_000_000, 4 * RATE_PERIOD)
    assert window.size() == 8 + MAX_EXTRA


def test_the_horizon_never_takes_the_window_past_the_brokers_quota() -> None:
    window = Window()
    window.capacity, window.quota = 132, 300
    _burst(window, 20_000, 4 * RATE_PERIOD)
    assert window.size() == 300
    window.quota = 100  # a quota below the capacity: the capacity, as ever
    assert window.size() == 132


def test_no_capacity_is_no_window_whatever_the_rate() -> None:
    window = Window()
    window.capacity = 4
    _burst(window, 5000, 4 * RATE_PERIOD)
    window.capacity = 0  # the last worker left
    assert window.size() == 0


# -- on a real pool -------------------------------------------------------------------------


def _most_out(executor: fade.Executor, fn: object, args: list[float]) -> tuple[int, int]:
    """Run a map, watching the client: (most tasks at the broker at once, the capacity)."""
    io = executor._io  # type: ignore[attr-defined]
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, len(io.in_flight))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert len(list(executor.map(fn, args, timeout=60))) == len(args)
    finally:
        done.set()
        watcher.join(timeout=5)
    return most, io.capacity


def test_short_tasks_keep_more_than_the_capacity_at_the_broker(pool: Pool) -> None:
    pool.start_broker()
    pool.start_worker(1)
    pool.wait_workers(1)
    with fade.Executor(pool.address) as executor:
        assert executor.submit(tasks.add, 1, 2).result(timeout=30) == 3
        most, capacity = _most_out(executor, time.sleep, [0.0005] * 2000)
    assert most > capacity + 5, f"at most {most} tasks out, capacity {capacity}"


def test_slow_tasks_keep_no_more_than_the_capacity_at_the_broker(pool: Pool) -> None:
    pool.start_broker()
    pool.start_worker(1)
    pool.wait_workers(1)
    with fade.Executor(pool.address) as executor:
        # The worker learns its tasks are slow (it then asks for one at a time)
        list(executor.map(time.sleep, [0.1] * 4, timeout=30))
        most, capacity = _most_out(executor, time.sleep, [0.1] * 12)
    assert 0 < most <= capacity, f"at most {most} tasks out, capacity {capacity}"


def test_a_client_never_sends_past_the_brokers_quota(pool: Pool) -> None:
    # With --max-client-tasks 300 and two workers (capacity 132), the window's extra
    # for fast tasks took the client past the quota: 8,817 of 20,000 tasks failed with
    # QuotaExceededError. The broker announces its quota; the window stops there.
    pool.start_broker("--max-client-tasks", "300")
    pool.start_worker(2)
    pool.wait_workers(2)
    with fade.Executor(pool.address) as executor:
        assert executor.submit(tasks.add, 1, 2).result(timeout=30) == 3
        most, _ = _most_out(executor, tasks.add, [1.0] * 10_000)
    assert most <= 300, most
