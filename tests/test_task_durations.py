"""Tasks of a millisecond or two run at the pool's speed, not at the heartbeat's (issue 13, 0).

A map of 100 such tasks on one worker process ideally takes 0.1-0.2 s. When the client's
window (the pool's capacity) refilled only on the I/O thread's heartbeat timer, it took 4-14 s:
each result read by the thread waiting in ``result()`` freed a place in the window, and nothing
sent the next task until the I/O thread's poll timed out (up to the heartbeat interval, 1 s by
default). The bound below is 1 s: 5 to 10 times the ideal time and a quarter of the shortest
stalled run seen, so a busy machine does not fail it and the stall cannot pass it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tasks
from conftest import Pool

import fade
from fade import protocol as p
from fade.options import WorkerOptions
from fade.worker import MAX_PREFETCH, SLOW_TASK, Worker

pytestmark = pytest.mark.timeout(120)

TASKS = 100
BOUND_S = 1.0

KINDS = [
    pytest.param(time.sleep, 0.001, id="sleep-1ms"),
    pytest.param(tasks.spin, 0.001, id="busy-1ms"),
    pytest.param(time.sleep, 0.002, id="sleep-2ms"),
    pytest.param(tasks.spin, 0.002, id="busy-2ms"),
]


def _timed_map(executor: fade.Executor, fn: Callable[[float], Any], seconds: float) -> float:
    """Seconds for ``list(map(fn, [seconds] * TASKS))``, after one task has made the
    client, broker and worker meet."""
    assert executor.submit(tasks.add, 1, 2).result(timeout=30) == 3
    started = time.monotonic()
    results = list(executor.map(fn, [seconds] * TASKS, timeout=60))
    elapsed = time.monotonic() - started
    assert len(results) == TASKS
    return elapsed


@pytest.mark.parametrize(("fn", "seconds"), KINDS)
def test_millisecond_tasks_on_one_tcp_worker(
    pool: Pool, fn: Callable[[float], Any], seconds: float
) -> None:
    """The issue's case: a broker and one ``fade-worker``, every setting at its default."""
    pool.interval, pool.liveness = p.HEARTBEAT_INTERVAL, p.HEARTBEAT_LIVENESS
    pool.start_broker()
    pool.start_worker(1)
    pool.wait_workers(1)
    with fade.Executor(pool.address) as executor:
        elapsed = _timed_map(executor, fn, seconds)
    assert elapsed < BOUND_S, f"{TASKS} tasks of {seconds * 1000:g} ms took {elapsed:.2f}s"


@pytest.mark.parametrize(("fn", "seconds"), KINDS)
def test_millisecond_tasks_on_one_embedded_worker(
    fn: Callable[[float], Any], seconds: float
) -> None:
    with fade.Executor(max_workers=1) as executor:
        elapsed = _timed_map(executor, fn, seconds)
    assert elapsed < BOUND_S, f"{TASKS} tasks of {seconds * 1000:g} ms took {elapsed:.2f}s"


@pytest.mark.parametrize(
    ("average", "wanted"),
    [
        (None, 1),  # nothing seen yet
        (0.00001, 1 + MAX_PREFETCH),
        (0.0006, 1 + 4),  # 2 ms of queued work
        (0.0011, 1 + 2),
        (0.0021, 1 + 1),  # was 1 + 0: idle for a round trip to the broker before each task
        (0.005, 1 + 1),
        (0.019, 1 + 1),
        (SLOW_TASK, 1),  # slow: that round trip no longer matters; nothing waits behind it
        (0.1, 1),
    ],
)
def test_worker_holds_a_queued_task_unless_its_tasks_are_slow(
    tmp_path: Path, average: float | None, wanted: int
) -> None:
    """The credits a worker asks for (one task to run plus its prefetch), by the average
    duration of its tasks: at least one queued task for tasks faster than SLOW_TASK."""
    worker = Worker(WorkerOptions(address="tcp://127.0.0.1:1", code_cache=str(tmp_path)))
    try:
        worker._avg_duration = average
        assert worker.wanted() == wanted
    finally:
        worker.wake.close()


def test_an_idle_pool_burns_no_cpu_after_its_last_task() -> None:
    # The fast paths look for a reply before they sleep (fade.sockets.spin_for_input):
    # once after each task, for a fraction of a millisecond, never while idle.
    psutil = pytest.importorskip("psutil")
    with fade.Executor(max_workers=2) as ex:
        assert list(ex.map(tasks.add, range(50), range(50))) == [2 * i for i in range(50)]
        time.sleep(0.5)  # the pool settles (the workers' keepers go to sleep after 1 s idle)
        processes = [psutil.Process(), *(psutil.Process(pid) for pid in ex._pool.pids)]
        time.sleep(1.5)

        def cpu() -> float:
            return sum(sum(proc.cpu_times()[:2]) for proc in processes)

        before = cpu()
        time.sleep(2.0)
        used = cpu() - before
    assert used < 0.2, f"{used:.2f} s of CPU in 2 s idle"
