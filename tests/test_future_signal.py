"""fastpath.FutureSignal: a future's condition in one object (issue 18's light futures).

Threads and real futures of a real pool; the standard library's own helpers (cf.wait,
as_completed) are what take the signal's lock from outside.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
import tasks

import fade
from fade.fastpath import FutureSignal

pytestmark = pytest.mark.timeout(60)


def test_wait_times_out_and_gives_the_lock_back() -> None:
    signal = FutureSignal()
    with signal:
        started = time.monotonic()
        assert signal.wait(0.05) is False
        assert time.monotonic() - started >= 0.05
        assert signal.wait(0) is False
    assert signal.acquire(blocking=False)  # released by the with: nobody holds it
    signal.release()


def test_notify_all_wakes_every_waiter_and_the_lock_is_theirs_again() -> None:
    signal = FutureSignal()
    woken: list[bool] = []
    ready = threading.Barrier(4)

    def waiter() -> None:
        ready.wait()
        with signal:
            woken.append(signal.wait(30))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in threads:
        thread.start()
    ready.wait()
    deadline = time.monotonic() + 10
    while True:  # every waiter is asleep once it has let the lock go
        with signal:
            if signal._sleepers is not None and len(signal._sleepers) == 3:
                signal.notify_all()
                break
        assert time.monotonic() < deadline
        time.sleep(0.001)
    for thread in threads:
        thread.join(10)
    assert woken == [True, True, True]


def test_a_future_is_light_with_fast_paths_and_standard_without() -> None:
    with (
        fade.Executor(max_workers=1) as fast,
        fade.Executor(max_workers=1, fast_paths=False) as plain,
    ):
        light = fast.submit(tasks.add, 1, 2)
        standard = plain.submit(tasks.add, 3, 4)
        assert isinstance(light._condition, FutureSignal)
        assert isinstance(standard._condition, threading.Condition)
        assert light.result(timeout=30) == 3 and standard.result(timeout=30) == 7


def test_wait_as_completed_and_timeouts_on_light_futures() -> None:
    with fade.Executor(max_workers=2) as ex:
        slow = ex.submit(tasks.sleep_and_return, 0.5, "slow")
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=0.01)
        done, not_done = cf.wait([slow], timeout=0.01)
        assert not done and not_done == {slow}
        futures = [ex.submit(tasks.add, i, i) for i in range(200)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == [
            2 * i for i in range(200)
        ]
        done, _ = cf.wait([slow, *futures], timeout=30, return_when=cf.ALL_COMPLETED)
        assert len(done) == 201 and slow.result() == "slow"
