"""A joblib backend that runs ``joblib.Parallel`` work (and scikit-learn's ``n_jobs``) on fade.

Importing this module registers the backend under the name ``"fade"``::

    import joblib
    import fade.joblib_backend  # noqa: F401  (registers "fade")

    with joblib.parallel_config(backend="fade"):                           # embedded pool
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)
    with joblib.parallel_config(backend="fade", address="tcp://head:5555"):  # a running pool
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)

The flow of one ``Parallel`` call::

    joblib (main thread)          FadeBackend                      fade.Executor     workers
    batch of calls --submit-->  window: n_jobs in flight --submit-->  task  ------->  batch()
                                 the rest wait here
    BatchCompletionCallBack <-- callback thread <--done-callback---  future <-------  results
      (result, next batch)       (never the client's I/O thread)

* One fade task per joblib batch. joblib's auto-batching (``AutoBatchingMixin``)
  grows a batch until it lasts about ``MIN_IDEAL_BATCH_DURATION``, so thousands
  of tiny calls travel as a few hundred tasks.
* ``n_jobs`` means what joblib says: at most ``n_jobs`` batches run at once;
  ``-1`` is the pool's size (its worker processes), ``-2`` one less, and so on;
  ``None`` inside a ``parallel_config(backend="fade")`` block is ``-1`` (the
  whole pool, as dask's backend does); an explicit ``n_jobs=1`` runs the calls
  here, one after another, as joblib does for every backend.
* An exception raised by a call reaches the caller with its original type and
  message, the worker's traceback as its ``__cause__``; the calls not yet sent
  are then cancelled (``abort_everything``). Calls already on a worker finish
  there and their results are dropped: fade does not kill a running task.
* joblib's completion callbacks do real work (they pickle and send the next
  batch), so they run on a thread of this module and never on the client's I/O
  thread, whose heartbeats must not wait for them.
* Nested ``Parallel`` calls inside a task run sequentially on that worker:
  every worker already has a core of its own, and a worker waiting for tasks
  that need a free worker could deadlock a busy pool.

Where the pool comes from (keyword arguments of ``parallel_config``):

* nothing: an embedded pool (``max_workers`` processes, default one per core),
  started on first use and kept for later calls, like joblib's own worker
  processes; it ends at interpreter exit or with :func:`shutdown`;
* ``address=``: a client of the broker there, likewise shared and kept;
* ``executor=``: a :class:`fade.Executor` you made and will shut down yourself.

Other keyword arguments (``max_attempts``, ``task_timeout``, heartbeats) are
passed to :class:`fade.Executor`.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from joblib import register_parallel_backend
from joblib.parallel import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)

from fade.client import Executor
from fade.errors import NoWorkersError
from fade.worker import MAX_PREFETCH

__all__ = ["FadeBackend", "count_workers", "register", "shutdown"]

log = logging.getLogger("fade.joblib")

#: Seconds every probe task holds its worker, so that each idle worker gets one.
PROBE_WINDOW = 0.2
#: Seconds to wait past the window for probe answers (busy workers answer late).
PROBE_GRACE = 1.0
#: Probe tasks sent in a first round; rounds grow while every probe met a new worker.
#: More than twice what one worker may hold (its prefetch and the one it runs), so a
#: worker that has credit when the round arrives cannot take it all before the
#: others, whose credit may be a moment late, get theirs.
PROBE_TASKS = 4 * (1 + MAX_PREFETCH)
MAX_PROBE_TASKS = 4096
#: How long a counted pool size is trusted.
SIZE_TTL = 30.0


def register() -> None:
    """Register the ``"fade"`` backend with joblib (done when this module is imported)."""
    register_parallel_backend("fade", FadeBackend)


# -- the pools behind the backend -----------------------------------------------------------

_shared_lock = threading.Lock()
_shared: dict[tuple[Any, ...], Executor] = {}
#: Known or counted worker processes per executor: (size, monotonic time counted).
_sizes: weakref.WeakKeyDictionary[Executor, tuple[int, float]] = weakref.WeakKeyDictionary()


def _shared_executor(
    address: str | None, max_workers: int | None, options: dict[str, Any]
) -> Executor:
    """The executor every backend with these arguments uses, started on first use."""
    key = (address, max_workers, tuple(sorted(options.items())))
    with _shared_lock:
        executor = _shared.get(key)
        if executor is None:
            executor = Executor(address, max_workers=max_workers, **options)
            _shared[key] = executor
            if address is None:
                # Its worker processes are ours to know: no need to count them.
                _sizes[executor] = (max_workers or os.cpu_count() or 1, float("inf"))
        return executor


def shutdown() -> None:
    """End the embedded pools and broker clients the backend started (idempotent).

    A later ``Parallel`` call on the backend starts new ones.
    """
    with _shared_lock:
        executors = list(_shared.values())
        _shared.clear()
    for executor in executors:
        executor.shutdown(wait=True, cancel_futures=True)


def _hold_until(deadline: float) -> tuple[str, int]:
    """A probe task: keep this worker busy until ``deadline`` (wall clock), say who it is."""
    delay = min(deadline - time.time(), PROBE_WINDOW)
    if delay > 0:
        time.sleep(delay)
    return socket.gethostname(), os.getpid()


def count_workers(executor: Executor, timeout: float) -> int:
    """Count the worker processes of the pool behind ``executor`` that take work now.

    The broker gives a task to every worker holding nothing before it gives a
    second one to anybody, and a worker holds at most ``1 + MAX_PREFETCH``
    tasks; each probe task holds its worker for up to ``PROBE_WINDOW``. So a
    round of ``PROBE_TASKS`` cannot be drained by a few workers before the
    others take some: every idle worker answers at least once. A worker busy
    with long tasks may be missed. Raises :class:`NoWorkersError` when no
    worker answers within ``timeout`` seconds.
    """
    first = executor.submit(_hold_until, 0.0)
    try:
        first.result(timeout)
    except cf.TimeoutError:
        first.cancel()
        raise NoWorkersError(
            f"no fade worker answered within {timeout}s at {executor.address}: none is "
            f"connected, or all are busy; start fade-worker processes for that broker "
            f"or raise wait_for_workers_timeout"
        ) from None
    probes = PROBE_TASKS
    while True:
        deadline = time.time() + PROBE_WINDOW
        futures = [executor.submit(_hold_until, deadline) for _ in range(probes)]
        done, late = cf.wait(futures, timeout=PROBE_WINDOW + PROBE_GRACE)
        for future in late:
            future.cancel()
        seen = {f.result() for f in done if not f.cancelled() and f.exception() is None}
        if len(seen) < probes or probes >= MAX_PROBE_TASKS:
            return max(1, len(seen))
        probes *= 4


def _pool_size(executor: Executor, timeout: float) -> int:
    known = _sizes.get(executor)
    if known is not None and time.monotonic() - known[1] < SIZE_TTL:
        return known[0]
    size = count_workers(executor, timeout)
    _sizes[executor] = (size, time.monotonic())
    return size


# -- joblib's callbacks, off the client's I/O thread ------------------------------------------


class _CallbackThread:
    """One daemon thread that runs the backend's completion work in order.

    A future's done-callbacks run on the thread that completes it: fade's
    client I/O thread. joblib's callback pickles and submits the next batch,
    which must not hold up that thread's heartbeats, so it is posted here.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def post(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fade-joblib-callbacks", daemon=True
                )
                self._thread.start()
        self._queue.put(work)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            try:
                work()
            except BaseException:
                log.exception("a joblib completion callback failed")


_callbacks = _CallbackThread()


# -- the backend --------------------------------------------------------------------------------

_Entry = tuple[Callable[[], Any], "cf.Future[Any]", "Callable[[Any], Any] | None"]


class FadeBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``ParallelBackendBase`` on a fade pool; see the module docstring.

    Args:
        address: a broker endpoint; None for an embedded pool.
        executor: a :class:`fade.Executor` to use instead (you shut it down).
        max_workers: worker processes of the embedded pool (default: one per core).
        wait_for_workers_timeout: seconds to wait for a first worker when the
            pool's size must be counted (``n_jobs`` < 0 on a broker's pool).
        **executor_options: passed to :class:`fade.Executor`.
    """

    default_n_jobs = -1
    supports_retrieve_callback = True
    uses_threads = False
    supports_sharedmem = False
    # As dask's backend: a fade task costs far less than a batch this long, and
    # shorter upper batches leave fewer stragglers at the end of a call.
    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0

    def __init__(
        self,
        address: str | None = None,
        *,
        executor: Executor | None = None,
        max_workers: int | None = None,
        wait_for_workers_timeout: float = 30.0,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **executor_options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if executor is not None and (address or max_workers or executor_options):
            raise ValueError("pass either executor= or the options to make one, not both")
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be greater than 0")
        self._given = executor
        self._address = address
        self._max_workers = max_workers
        self._options = executor_options
        self._wait = wait_for_workers_timeout
        self._lock = threading.Lock()
        self._limit = 1
        # joblib's handle of each batch in flight -> its fade task (None until sent).
        self._in_flight: dict[cf.Future[Any], cf.Future[Any] | None] = {}
        self._waiting: collections.deque[_Entry] = collections.deque()

    @property
    def executor(self) -> Executor:
        """The fade executor this backend submits to (the shared one is started here)."""
        if self._given is not None:
            return self._given
        return _shared_executor(self._address, self._max_workers, self._options)

    # -- sizing -----------------------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` > 0 as given; -1 the pool's worker processes, -2 one less...;
        None the backend's default (-1)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        return max(self._pool_size() + 1 + n_jobs, 1)

    def _pool_size(self) -> int:
        if self._given is None and self._address is None:
            return self._max_workers or os.cpu_count() or 1
        return _pool_size(self.executor, self._wait)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
        """Called by ``Parallel`` before each call: set the window to ``n_jobs``.

        joblib's own keyword arguments (``prefer``, ``max_nbytes``...) mean
        nothing to a pool of processes on other hosts and are ignored.
        """
        if n_jobs == 1:
            # joblib's meaning of n_jobs=1 for every backend: a plain loop, here.
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        limit = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        with self._lock:
            self._limit = limit
        self.executor  # noqa: B018  (start the pool now, not inside the first callback)
        return limit

    def get_nested_backend(self) -> tuple[Any, int | None]:
        """Calls nested inside a task run sequentially on its worker."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    # -- running batches ----------------------------------------------------------------------

    def submit(
        self, func: Callable[[], Any], callback: Callable[[Any], Any] | None = None
    ) -> cf.Future[Any]:
        """Run one joblib batch as one fade task; at most ``n_jobs`` are in flight.

        Returns a future of the batch's results; ``callback`` is called with it
        (on this module's callback thread) once it is done.
        """
        handle: cf.Future[Any] = cf.Future()
        entry: _Entry = (func, handle, callback)
        with self._lock:
            if len(self._in_flight) >= self._limit:
                self._waiting.append(entry)
                return handle
            self._in_flight[handle] = None
        self._start(entry)
        return handle

    # joblib before 1.5 calls apply_async.
    apply_async = submit

    def _start(self, entry: _Entry) -> None:
        func, handle, callback = entry
        try:
            task = self.executor.submit(func)
        except Exception as exc:  # a batch that cannot be pickled, a broken pool
            _settle(handle, exc)
            _callbacks.post(lambda: self._finish(handle, callback))
            return
        with self._lock:
            if handle in self._in_flight:
                self._in_flight[handle] = task
        if handle.cancelled():  # aborted while it was being sent
            task.cancel()
        task.add_done_callback(
            lambda done: _callbacks.post(lambda: self._complete(done, handle, callback))
        )

    def _complete(
        self, task: cf.Future[Any], handle: cf.Future[Any], callback: Callable[[Any], Any] | None
    ) -> None:
        if task.cancelled():
            handle.cancel()
        else:
            error = task.exception()
            _settle(handle, error if error is not None else _Value(task.result()))
        self._finish(handle, callback)

    def _finish(self, handle: cf.Future[Any], callback: Callable[[Any], Any] | None) -> None:
        """A batch is done: start a waiting one, then tell joblib (which may submit more)."""
        with self._lock:
            self._in_flight.pop(handle, None)
            following = self._waiting.popleft() if self._waiting else None
            if following is not None:
                self._in_flight[following[1]] = None
        if following is not None:
            self._start(following)
        if callback is not None and not handle.cancelled():
            callback(handle)

    def retrieve_result_callback(self, out: cf.Future[Any]) -> Any:
        """The batch's results, or its call's exception (original type, remote traceback)."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A call failed: cancel every batch not yet on a worker.

        Batches already on a worker finish there; joblib ignores their results.
        The pool is left ready either way (it is shared, or it is the caller's).
        """
        with self._lock:
            handles = [entry[1] for entry in self._waiting]
            self._waiting.clear()
            handles += self._in_flight
            tasks = [task for task in self._in_flight.values() if task is not None]
            self._in_flight.clear()
        for handle in handles:
            handle.cancel()
        for task in tasks:
            task.cancel()  # succeeds for tasks still waiting in the client

    def terminate(self) -> None:
        """End of a ``Parallel`` call: keep the pool for the next one, forget the batch sizes."""
        self.reset_batch_stats()


class _Value:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _settle(handle: cf.Future[Any], outcome: BaseException | _Value) -> None:
    """Give joblib's handle its outcome, unless an abort cancelled it first."""
    try:
        if isinstance(outcome, _Value):
            handle.set_result(outcome.value)
        else:
            handle.set_exception(outcome)
    except cf.InvalidStateError:
        pass


register()
