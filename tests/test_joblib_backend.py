"""joblib and scikit-learn on fade: results, batching, n_jobs, errors and aborts."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ecosystem_tasks as et
import joblib
import numpy as np
import pytest
from conftest import INTERVAL, LIVENESS, Pool
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import fade
import fade.joblib_backend as fjb

pytestmark = pytest.mark.timeout(180)


class CountingExecutor(fade.Executor):
    """A fade.Executor that counts the tasks it is given and the most it held at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = 0
        self.most_in_flight = 0
        self._in_flight = 0
        self._count_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        with self._count_lock:
            self.tasks += 1
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: cf.Future[Any]) -> None:
        with self._count_lock:
            self._in_flight -= 1


@pytest.fixture(params=["embedded", "tcp"])
def counting(request: pytest.FixtureRequest) -> Iterator[CountingExecutor]:
    """A counting executor on an embedded pool of 2, or on a broker with 2 fade-workers."""
    timing = {"heartbeat_interval": INTERVAL, "heartbeat_liveness": LIVENESS}
    if request.param == "embedded":
        ex = CountingExecutor(max_workers=2, **timing)
    else:
        pool: Pool = request.getfixturevalue("tcp_pool")
        ex = CountingExecutor(pool.address, **timing)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(autouse=True)
def _end_shared_pools() -> Iterator[None]:
    yield
    fjb.shutdown()


def _grid_search(n_jobs: int) -> GridSearchCV:
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": [0.01, 0.1, 1.0]}
    return GridSearchCV(SVC(), grid, cv=5, n_jobs=n_jobs).fit(X, y)


def test_grid_search_on_fade_equals_local(counting: CountingExecutor) -> None:
    local = _grid_search(n_jobs=1)
    with joblib.parallel_config(backend="fade", executor=counting):
        remote = _grid_search(n_jobs=-1)
    assert counting.tasks > 0, "the search did not run on fade"
    assert remote.best_params_ == local.best_params_
    assert remote.best_score_ == local.best_score_
    compared = [key for key in local.cv_results_ if "test_score" in key]
    assert len(compared) == 5 + 3  # the five splits, their mean, std and rank
    for key in compared:
        assert np.array_equal(remote.cv_results_[key], local.cv_results_[key]), key
    assert remote.cv_results_["params"] == local.cv_results_["params"]


def test_10000_small_calls_are_batched(counting: CountingExecutor) -> None:
    n = 10_000
    with joblib.parallel_config(backend="fade", executor=counting):
        parallel = joblib.Parallel(n_jobs=2)  # takes its backend from the config here
        results = parallel(joblib.delayed(et.square)(i) for i in range(n))
    assert results == [i * i for i in range(n)]
    # One fade task per joblib batch, and joblib's auto-batching made them few.
    assert counting.tasks == parallel.n_dispatched_batches
    assert parallel.n_dispatched_tasks == n
    assert counting.tasks <= n // 10, f"{counting.tasks} fade tasks for {n} calls"
    # n_jobs=2: never more than two batches on the pool at once.
    assert counting.most_in_flight <= 2


def test_exception_in_one_call_reaches_the_caller(counting: CountingExecutor) -> None:
    with joblib.parallel_config(backend="fade", executor=counting):
        with pytest.raises(ValueError, match=r"^bad value 5000$") as info:
            joblib.Parallel(n_jobs=-1)(joblib.delayed(et.fail_on)(i, 5000) for i in range(10_000))
        assert isinstance(info.value.__cause__, fade.RemoteTraceback)
        assert "fail_on" in str(info.value.__cause__)
        # The pool is still good for the next call.
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(et.square)(i) for i in range(5)) == [
            0,
            1,
            4,
            9,
            16,
        ]


def test_failure_aborts_the_batches_not_yet_sent(counting: CountingExecutor) -> None:
    n, seconds = 40, 0.5
    started = time.monotonic()
    with (
        joblib.parallel_config(backend="fade", executor=counting),
        pytest.raises(KeyError, match="the first call fails"),
    ):
        joblib.Parallel(n_jobs=2, batch_size=1)(
            joblib.delayed(et.fail_first_else_sleep)(i, seconds) for i in range(n)
        )
    elapsed = time.monotonic() - started
    # joblib dispatches 2 x n_jobs = 4 batches ahead; the window sends two, a third
    # when the first one fails, and the abort cancels the fourth before it is sent.
    assert counting.tasks <= 3, f"{counting.tasks} tasks sent"
    # Running them all would take n * seconds / 2 = 10 s.
    assert elapsed < 6, f"the error took {elapsed:.1f}s to arrive"


def test_n_jobs_means_what_joblib_says(tcp_pool: Pool) -> None:
    config = joblib.parallel_config(
        backend="fade",
        address=tcp_pool.address,
        heartbeat_interval=INTERVAL,
        heartbeat_liveness=LIVENESS,
    )
    with config:
        # -1: the pool's two worker processes, counted by asking the pool.
        assert joblib.effective_n_jobs(-1) == 2
        assert joblib.effective_n_jobs(-2) == 1
        assert joblib.effective_n_jobs(-5) == 1
        assert joblib.effective_n_jobs(7) == 7
        with pytest.raises(ValueError, match="n_jobs == 0"):
            joblib.effective_n_jobs(0)
        pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(et.pid)(i) for i in range(50))
        assert set(pids) <= set(tcp_pool.worker_pids())
        # n_jobs=1 is a plain loop in this process, as with every joblib backend.
        here = joblib.Parallel(n_jobs=1)(joblib.delayed(et.pid)(i) for i in range(3))
        assert here == [os.getpid()] * 3


def test_default_is_an_embedded_pool_kept_between_calls() -> None:
    with joblib.parallel_backend("fade", max_workers=2):
        assert joblib.effective_n_jobs(-1) == 2
        first = set(joblib.Parallel()(joblib.delayed(et.pid)(i) for i in range(20)))
        second = set(joblib.Parallel()(joblib.delayed(et.pid)(i) for i in range(20)))
    assert os.getpid() not in first
    # The same worker processes served both calls: the pool is not restarted.
    assert len(first | second) <= 2
    fjb.shutdown()  # ends its processes (the leftover check would fail otherwise)


def test_nested_parallel_runs_sequentially_on_the_worker(counting: CountingExecutor) -> None:
    with joblib.parallel_config(backend="fade", executor=counting):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(et.nested_sum)(n) for n in range(6))
    assert [total for total, _, _ in out] == [sum(i * i for i in range(n)) for n in range(6)]
    assert {backend for _, backend, _ in out} == {"SequentialBackend"}
    assert os.getpid() not in {worker for _, _, worker in out}


def test_a_batch_that_cannot_be_pickled_fails_the_call(counting: CountingExecutor) -> None:
    with (
        joblib.parallel_config(backend="fade", executor=counting),
        pytest.raises(fade.SerializationError, match="cannot pickle"),
    ):
        joblib.Parallel(n_jobs=2)(joblib.delayed(et.square)(threading.Lock()) for _ in range(3))


def test_a_pool_without_workers_says_so(pool: Pool) -> None:
    pool.start_broker()
    with (
        joblib.parallel_config(
            backend="fade",
            address=pool.address,
            wait_for_workers_timeout=1.0,
            heartbeat_interval=INTERVAL,
            heartbeat_liveness=LIVENESS,
        ),
        pytest.raises(fade.NoWorkersError, match=r"no fade worker answered within 1\.0s"),
    ):
        joblib.effective_n_jobs(-1)


def test_generator_output_in_completion_order(counting: CountingExecutor) -> None:
    with joblib.parallel_config(backend="fade", executor=counting):
        out = joblib.Parallel(n_jobs=2, return_as="generator_unordered")(
            joblib.delayed(et.square)(i) for i in range(100)
        )
        assert sorted(out) == [i * i for i in range(100)]


def test_pool_is_counted_after_tiny_tasks_filled_the_prefetch(counting: CountingExecutor) -> None:
    # After tiny tasks each worker holds credit for dozens of tasks: a round of
    # probes must still reach both workers, not be drained by the first one.
    for _ in range(5):
        assert list(counting.map(et.square, range(300))) == [i * i for i in range(300)]
        assert fjb.count_workers(counting, timeout=30) == 2
