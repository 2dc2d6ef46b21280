"""One behaviour suite, run against fade (embedded and TCP) and ProcessPoolExecutor.

Where ProcessPoolExecutor cannot do what fade does (lambdas, buffersize before
Python 3.14), the test says so and runs for fade only.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import gc
import io
import itertools
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import tasks
from conftest import make_executor, wait_for

import fade

pytestmark = pytest.mark.timeout(60)


def _fade_only(executor: cf.Executor, why: str) -> None:
    if not isinstance(executor, fade.Executor):
        pytest.skip(f"ProcessPoolExecutor: {why}")


def test_submit_returns_a_real_future(executor: cf.Executor) -> None:
    future = executor.submit(tasks.add, 2, b=3)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=30) == 5


def test_kwargs_named_fn_and_self(executor: cf.Executor) -> None:
    assert executor.submit(tasks.takes_fn_and_self, fn=1, self=2).result(timeout=30) == 3


def test_map_keeps_order(executor: cf.Executor) -> None:
    assert list(executor.map(tasks.square, range(200))) == [x * x for x in range(200)]


def test_map_several_iterables_of_unequal_length(executor: cf.Executor) -> None:
    assert list(executor.map(tasks.add, range(10), range(100, 104))) == [100, 102, 104, 106]


@pytest.mark.parametrize("chunksize", [1, 7, 100])
def test_map_chunksize(executor: cf.Executor, chunksize: int) -> None:
    result = list(executor.map(tasks.square, range(250), chunksize=chunksize))
    assert result == [x * x for x in range(250)]


def test_map_rejects_bad_chunksize(executor: cf.Executor) -> None:
    with pytest.raises(ValueError):
        executor.map(tasks.square, range(3), chunksize=0)


def test_map_timeout(executor: cf.Executor) -> None:
    executor.submit(tasks.add, 0, 0).result(timeout=30)  # the pool is up and warm
    results = executor.map(tasks.sleep_and_return, [0.0, 3.0], timeout=1.5)
    assert next(results) is None
    with pytest.raises(cf.TimeoutError):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_exception_surfaces_at_its_element(executor: cf.Executor, chunksize: int) -> None:
    if chunksize > 1:
        _fade_only(executor, "raises at the start of the failing chunk, not at the element")
    results = executor.map(tasks.fail_on, range(10), itertools.repeat(4), chunksize=chunksize)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="bad value 4"):
        next(results)


def test_map_buffersize_bounds_work_in_flight(executor: cf.Executor) -> None:
    if sys.version_info < (3, 14):
        _fade_only(executor, "has buffersize only from Python 3.14")
    pulled = itertools.count()

    def endless() -> itertools.count[int]:
        for x in itertools.count():
            next(pulled)
            yield x

    results = executor.map(tasks.square, endless(), buffersize=4)  # type: ignore[call-arg]
    first = list(itertools.islice(results, 50))
    assert first == [x * x for x in range(50)]
    # Only what was yielded plus the buffer has been pulled from the iterator.
    assert next(pulled) <= 50 + 4 + 1


def test_map_buffersize_validates(executor: cf.Executor) -> None:
    if sys.version_info < (3, 14):
        _fade_only(executor, "has buffersize only from Python 3.14")
    with pytest.raises(ValueError):
        executor.map(tasks.square, range(3), buffersize=0)  # type: ignore[call-arg]


def test_exception_keeps_type_message_and_remote_traceback(executor: cf.Executor) -> None:
    future = executor.submit(tasks.fail_on, 3, 3)
    with pytest.raises(ValueError, match="bad value 3") as info:
        future.result(timeout=30)
    assert info.value.__cause__ is not None
    assert "fail_on" in str(info.value.__cause__)


def test_cancel_queued_future_never_runs(executor: cf.Executor, tmp_path: Path) -> None:
    log = tmp_path / "ran.txt"
    # Enough long tasks to fill every worker and whatever the executor keeps in flight.
    blockers = [executor.submit(tasks.sleep_and_return, 0.5) for _ in range(8)]
    queued = [executor.submit(tasks.record, str(log), i) for i in range(10)]
    assert all(f.cancel() for f in queued)
    assert all(f.cancelled() for f in queued)
    cf.wait(blockers, timeout=30)
    after = executor.submit(tasks.add, 1, 1)
    assert after.result(timeout=30) == 2
    assert not log.exists(), "a cancelled task ran"


def test_cancelled_futures_count_as_done_for_wait_and_as_completed(executor: cf.Executor) -> None:
    # fade dropped a cancelled task from its queue without telling the future's waiters:
    # wait() and as_completed() never counted it done (the standard pools do, once they
    # get to it, here when the blockers end).
    blockers = [executor.submit(tasks.sleep_and_return, 1.0) for _ in range(4)]
    queued = [executor.submit(tasks.sleep_and_return, 1.0) for _ in range(500)]
    cancelled = [f for f in queued if f.cancel()]
    assert len(cancelled) > 400
    done, not_done = cf.wait(cancelled, timeout=20)
    assert not not_done and done == set(cancelled)
    assert set(cf.as_completed(cancelled, timeout=20)) == set(cancelled)
    last = cancelled[-1]
    assert cf.wait([last], timeout=20).done == {last}
    cf.wait(blockers, timeout=30)
    assert executor.submit(tasks.add, 1, 1).result(timeout=30) == 2


@pytest.mark.parametrize("wait", [True, False])
def test_futures_shutdown_cancels_count_as_done_for_wait(executor: cf.Executor, wait: bool) -> None:
    _fade_only(executor, "shutdown(cancel_futures=True) leaves their waiters waiting")
    blockers = [executor.submit(tasks.sleep_and_return, 0.5) for _ in range(4)]
    queued = [executor.submit(tasks.sleep_and_return, 0.5) for _ in range(200)]
    executor.shutdown(wait=wait, cancel_futures=True)
    cancelled = [f for f in queued if f.cancelled()]
    assert len(cancelled) > 150
    assert cf.wait(cancelled, timeout=10).done == set(cancelled)
    assert cf.wait(blockers, timeout=30).done == set(blockers)


def test_shutdown_cancel_futures(executor: cf.Executor, tmp_path: Path) -> None:
    log = tmp_path / "ran.txt"
    blockers = [executor.submit(tasks.sleep_and_return, 0.3) for _ in range(8)]
    queued = [executor.submit(tasks.record, str(log), i) for i in range(20)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in blockers)
    assert any(f.cancelled() for f in queued)
    ran = log.read_text().split("\n") if log.exists() else []
    assert len([line for line in ran if line]) == sum(not f.cancelled() for f in queued)


def test_submit_after_shutdown_raises(executor: cf.Executor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(tasks.add, 1, 2)


def test_context_manager_waits_for_work(executor: cf.Executor) -> None:
    with executor as ex:
        futures = [ex.submit(tasks.sleep_and_return, 0.05, i) for i in range(6)]
    assert [f.result(timeout=0) for f in futures] == list(range(6))


def test_as_completed_and_wait(executor: cf.Executor) -> None:
    futures = [executor.submit(tasks.sleep_and_return, 0.01 * (i % 3), i) for i in range(30)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == list(range(30))
    done, not_done = cf.wait(futures, timeout=30)
    assert len(done) == 30 and not not_done
    slow = executor.submit(tasks.sleep_and_return, 0.3, "slow")
    fast = executor.submit(tasks.add, 1, 1)
    done, _ = cf.wait([slow, fast], timeout=30, return_when=cf.FIRST_COMPLETED)
    assert fast in done or slow in done


def test_done_callbacks_run_once(executor: cf.Executor) -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def callback(future: cf.Future[int]) -> None:
        with lock:
            calls.append(future.result())

    futures = [executor.submit(tasks.square, i) for i in range(50)]
    for f in futures:
        f.add_done_callback(callback)
    cf.wait(futures, timeout=30)
    deadline = time.monotonic() + 5
    while len(calls) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(calls) == sorted(x * x for x in range(50))


def test_callbacks_never_run_in_a_thread_waiting_for_a_result(executor: cf.Executor) -> None:
    """A thread blocked in result() holds what it holds (here, a lock the callback
    takes): a callback run in that thread would deadlock instead of waiting its turn.
    Nor do other futures' callbacks run there while it waits. (On a future already
    done, add_done_callback runs the callback at once in the caller's thread, as the
    standard library says; the tasks take a few milliseconds so that this is rare,
    and such calls are told apart.)"""
    lock = threading.Lock()
    ran_in: list[str] = []
    adding = threading.local()

    def callback(future: cf.Future[object]) -> None:
        if getattr(adding, "now", False):
            ran_in.append("at add_done_callback")
            return
        with lock:
            ran_in.append(threading.current_thread().name)

    def add_callback(future: cf.Future[object]) -> None:
        adding.now = True
        try:
            future.add_done_callback(callback)
        finally:
            adding.now = False

    def wait_for_callbacks(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(ran_in) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ran_in) == count

    me = threading.current_thread().name
    for i in range(20):
        with lock:
            future = executor.submit(tasks.sleep_and_return, 0.003, i)
            add_callback(future)
            assert future.result(timeout=30) == i
        wait_for_callbacks(6 * i + 1)
        others = [executor.submit(tasks.add, i, j) for j in range(5)]
        for other in others:
            add_callback(other)
        assert executor.submit(tasks.sleep_and_return, 0.003, i).result(timeout=30) == i
        wait_for_callbacks(6 * i + 6)
    assert me not in ran_in


def test_tasks_queued_behind_a_long_task_go_to_a_free_worker(executor: cf.Executor) -> None:
    # After short tasks a worker holds some queued behind the one it runs (a prefetch):
    # 60 of them waited 3 s behind a 3 s task while the other worker stood idle.
    list(executor.map(tasks.stamp, range(2000)))  # short tasks: prefetching workers
    start = time.monotonic()
    futures = [executor.submit(tasks.stamp, i) for i in range(300)]
    long = executor.submit(tasks.sleep_and_return, 3.0, "long")
    futures += [executor.submit(tasks.stamp, i) for i in range(300)]
    last = max(f.result(timeout=60) for f in futures) - start
    assert long.result(timeout=60) == "long"
    assert time.monotonic() - start >= 3.0
    assert last < 1.5, f"the last short task finished {last:.2f}s in"


def test_result_timeout_is_honoured(executor: cf.Executor) -> None:
    executor.submit(tasks.add, 0, 0).result(timeout=30)  # the pool is up and warm
    future = executor.submit(tasks.sleep_and_return, 3.0, "late")
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.3)
    waited = time.monotonic() - started
    assert 0.3 <= waited < 2.0
    assert future.result(timeout=30) == "late"


def test_ten_thousand_small_tasks(executor: cf.Executor) -> None:
    futures = [executor.submit(tasks.add, i, 1) for i in range(10_000)]
    assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(10_000)]


def test_fifty_megabyte_array_argument_and_result(executor: cf.Executor) -> None:
    arr = np.arange(50 * 2**20 // 8, dtype=np.float64)
    result = executor.submit(tasks.array_roundtrip, arr).result(timeout=60)
    assert result.shape == arr.shape
    assert np.array_equal(result, arr * 2)
    result += 1  # results are ordinary writable arrays


def test_large_arrays_there_and_back_many_at_once(executor: cf.Executor) -> None:
    # Sizes either side of the shared-memory threshold (fade/shm.py), several tasks naming
    # the same buffer at once, arrays inside containers, and a task that writes into its
    # argument: the caller's array never changes.
    arrays = [np.full(n, i, dtype=np.uint8) for i, n in enumerate((70_000, 300_000, 3 * 2**20))]
    futures = [executor.submit(tasks.identity, {"k": a, "t": (a, 1)}) for a in arrays * 3]
    for a, future in zip(arrays * 3, futures):
        back = future.result(timeout=60)
        assert np.array_equal(back["k"], a) and np.array_equal(back["t"][0], a)
    sums = [executor.submit(tasks.scribble_and_sum, {"a": a}) for a in arrays * 2]
    assert [f.result(timeout=60) for f in sums] == [float(a.sum() + a.size) for a in arrays * 2]
    assert [int(a[0]) for a in arrays] == [0, 1, 2]


def test_closures_and_lambdas(executor: cf.Executor) -> None:
    _fade_only(executor, "cannot pickle lambdas or closures")
    offset = 10

    def shifted(x: int) -> int:
        return x + offset

    assert executor.submit(lambda x: x * 3, 5).result(timeout=30) == 15
    assert list(executor.map(shifted, range(5))) == [10, 11, 12, 13, 14]


def test_submit_from_many_threads(executor: cf.Executor) -> None:
    results: dict[int, list[int]] = {}

    def client(n: int) -> None:
        futures = [executor.submit(tasks.add, n * 1000, i) for i in range(200)]
        results[n] = [f.result(timeout=60) for f in futures]

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {n: [n * 1000 + i for i in range(200)] for n in range(8)}


def test_unpicklable_result_fails_that_future_only(executor: cf.Executor) -> None:
    with pytest.raises(Exception, match="refuses to be pickled"):
        executor.submit(tasks.return_unpicklable).result(timeout=30)
    assert executor.submit(tasks.add, 2, 2).result(timeout=30) == 4


# -- what CPython's test_concurrent_futures asks of a process pool ---------------------------------


def test_unpicklable_argument_is_a_pickling_error(executor: cf.Executor) -> None:
    with pytest.raises(pickle.PicklingError):
        executor.submit(tasks.identity, tasks.ErrorAtPickle()).result(timeout=30)


def test_unpicklable_result_is_a_pickling_error(executor: cf.Executor) -> None:
    with pytest.raises(pickle.PicklingError):
        executor.submit(tasks.return_instance, tasks.ErrorAtPickle).result(timeout=30)


@pytest.mark.parametrize("bad", ["ErrorAtUnpickle", "ExitAtUnpickle"])
def test_task_that_cannot_be_unpickled_on_a_worker_is_a_broken_process_pool(
    executor: cf.Executor, bad: str
) -> None:
    with pytest.raises(BrokenProcessPool):
        executor.submit(tasks.identity, getattr(tasks, bad)()).result(timeout=60)
    if isinstance(executor, fade.Executor):  # only that future failed
        assert executor.submit(tasks.add, 1, 2).result(timeout=30) == 3


@pytest.mark.parametrize("bad", ["ErrorAtUnpickle", "ExitAtUnpickle"])
def test_result_that_cannot_be_unpickled_here_is_a_broken_process_pool(
    executor: cf.Executor, bad: str
) -> None:
    with pytest.raises(BrokenProcessPool):
        executor.submit(tasks.return_instance, getattr(tasks, bad)).result(timeout=60)
    if isinstance(executor, fade.Executor):  # only that future failed
        assert executor.submit(tasks.add, 1, 2).result(timeout=30) == 3


def test_task_that_kills_its_worker_is_a_broken_process_pool(executor: cf.Executor) -> None:
    with pytest.raises(BrokenProcessPool):
        executor.submit(tasks.die).result(timeout=60)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_keeps_no_reference_to_what_it_yielded(executor: cf.Executor, chunksize: int) -> None:
    """bpo-14406: the caller may be the only owner of a result."""
    for box in executor.map(tasks.make_box, range(10), chunksize=chunksize):
        ref = weakref.ref(box)
        del box
        # As CPython's own test (test_free_reference): the thread that delivered the
        # result may hold it for a moment after waking the caller, never longer.
        deadline = time.monotonic() + 5
        while ref() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert ref() is None


def test_remote_traceback_shows_the_source_line(executor: cf.Executor) -> None:
    with pytest.raises(RuntimeError) as info:
        executor.submit(tasks.raise_with_comment).result(timeout=30)
    error = info.value
    assert error.args == (123,)
    line = "raise RuntimeError(123)  # some comment"
    assert line in error.__cause__.tb  # type: ignore[union-attr]
    with contextlib.redirect_stderr(io.StringIO()) as printed:
        sys.excepthook(type(error), error, error.__traceback__)
    assert line in printed.getvalue()


def test_initializer_runs_once_in_each_worker_process(
    executor_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    log = tmp_path / "initialized.txt"
    ex = make_executor(
        executor_kind, request, initializer=tasks.init, initargs=("initialized", str(log))
    )
    try:
        results = list(ex.map(tasks.init_status_and_pid, range(40)))
    finally:
        ex.shutdown(wait=True)
    assert {status for status, _ in results} == {"initialized"}
    initialized = [int(pid) for pid in log.read_text().split()]
    assert len(initialized) == len(set(initialized)), "an initializer ran twice in one process"
    assert {pid for _, pid in results} <= set(initialized)


def test_failing_initializer_breaks_the_executor(
    executor_kind: str, request: pytest.FixtureRequest
) -> None:
    ex = make_executor(executor_kind, request, initializer=tasks.init_fail)
    try:
        with pytest.raises(cf.BrokenExecutor):  # at submit if already broken, else here
            ex.submit(tasks.add, 1, 2).result(timeout=30)

        def submit_raises() -> bool:
            try:
                ex.submit(tasks.add, 1, 2)
            except cf.BrokenExecutor:
                return True
            return False

        wait_for(submit_raises, 10, "submit() to raise BrokenExecutor")
    finally:
        ex.shutdown(wait=True)


def test_max_tasks_per_child_replaces_worker_processes(
    executor_kind: str, request: pytest.FixtureRequest
) -> None:
    ex = make_executor(executor_kind, request, max_tasks_per_child=2)
    try:
        pids = collections.Counter(ex.submit(tasks.pid).result(timeout=30) for _ in range(6))
    finally:
        ex.shutdown(wait=True)
    assert max(pids.values()) <= 2 and len(pids) >= 3


def test_max_tasks_per_child_loses_nothing_in_a_burst(
    executor_kind: str, request: pytest.FixtureRequest
) -> None:
    if executor_kind == "processpool":
        pytest.skip("ProcessPoolExecutor: hangs here until python/cpython#115634's fix (2025)")
    ex = make_executor(executor_kind, request, max_tasks_per_child=2)
    try:
        # The processes that retire hand back what they held.
        results = list(ex.map(tasks.init_status_and_pid, range(20)))
    finally:
        ex.shutdown(wait=True)
    per_process = collections.Counter(pid for _, pid in results)
    assert len(results) == 20 and max(per_process.values()) <= 2


def test_shutdown_cancel_futures_lets_the_first_tasks_run(
    executor_kind: str, request: pytest.FixtureRequest
) -> None:
    """CPython's test_cancel_futures: on a fresh pool, shutdown(cancel_futures=True) right
    after 50 submits cancels most but not all of them; the others finish."""
    ex = make_executor(executor_kind, request)
    if executor_kind.startswith("tcp"):
        # A client of a remote pool knows what the pool can run from the broker's first
        # message; before it, no task counts as running (see the Executor's docstring).
        ex.submit(tasks.add, 0, 0).result(timeout=30)
    futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    assert len(cancelled) > 20
    assert others, "no task ran"
    for future in others:
        assert future.done() and future.exception() is None


@pytest.mark.parametrize("kind", ["embedded", "tcp", "processpool"])
def test_an_executor_nobody_refers_to_finishes_its_work_and_stops(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # As ProcessPoolExecutor does: once garbage-collected, an executor shuts down (its
    # futures still complete). Its I/O thread and embedded pool lived on until the
    # interpreter exited: re-running "ex = fade.Executor()" in a notebook cell added a
    # pool each time.
    import psutil

    if kind == "tcp":
        request.getfixturevalue("tcp_pool")  # its broker and workers: started before
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    threads = threading.active_count()

    def submit_and_forget() -> tuple[cf.Future[str], weakref.ref[cf.Executor]]:
        executor = make_executor(kind, request)
        return executor.submit(tasks.sleep_and_return, 0.5, "done"), weakref.ref(executor)

    future, executor = submit_and_forget()
    gc.collect()
    assert executor() is None
    assert future.result(timeout=30) == "done"

    def stopped() -> bool:
        started = {child.pid for child in me.children()} - before
        return threading.active_count() <= threads and not started

    wait_for(stopped, 30, "the forgotten executor's threads and worker processes to end")


# -- at interpreter exit (CPython's suite runs these in child interpreters) ----------------


EXIT_SCRIPTS = {
    # test_interpreter_shutdown: pending work is done at exit.
    "pending work is done": (
        """
        t = EXECUTOR
        t.submit(tasks.sleep_and_print, 1.0, "apple")
        """,
        "apple",
    ),
    # test_submit_after_interpreter_shutdown: the executor is shut down before later
    # atexit functions run.
    "submit from atexit raises": (
        """
        import atexit

        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise

        t = EXECUTOR
        """,
        "runtime-error",
    ),
    # An executor nobody shut down and nobody refers to any more: its work is done too.
    "an abandoned executor's work is done": (
        """
        import gc

        def submit_and_forget():
            EXECUTOR.submit(tasks.sleep_and_print, 1.0, "apple")

        submit_and_forget()
        gc.collect()
        """,
        "apple",
    ),
    # test_hang_gh83386: shutdown(wait=False) with work running does not hang at exit.
    "shutdown(wait=False) does not hang": (
        """
        t = EXECUTOR
        t.submit(tasks.sleep_and_print, 1.0, "apple")
        t.shutdown(wait=False)
        """,
        "apple",
    ),
}


@pytest.mark.parametrize("case", list(EXIT_SCRIPTS))
@pytest.mark.parametrize("kind", ["embedded", "processpool"])
def test_at_interpreter_exit(kind: str, case: str, tmp_path: Path) -> None:
    """The pool lives in the script's process (and prints to its stdout): embedded only."""
    if kind == "processpool" and "wait=False" in case:
        pytest.skip("ProcessPoolExecutor: hangs here (python/cpython#83386)")
    constructor = {
        "embedded": "fade.Executor(2)",
        "processpool": "concurrent.futures.ProcessPoolExecutor(2)",
    }[kind]
    body, expected = EXIT_SCRIPTS[case]
    script = tmp_path / "script.py"
    script.write_text(
        "import concurrent.futures, fade, tasks\n"
        + textwrap.dedent(body).replace("EXECUTOR", constructor)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == expected
    if "atexit" in body:
        assert "RuntimeError: cannot schedule new futures" in out.stderr
    else:
        assert out.stderr == ""
