"""``Executor.map`` with chunks and a bounded window, as in Python 3.14.

Each chunk of ``chunksize`` calls travels as one task. Within a chunk the calls
run in order until one raises; the caller gets every result before it, then the
exception: an exception surfaces exactly when its element is reached. Such a
chunk ends as a raised task (the broker counts it so): the worker raises a
:class:`ChunkError` that carries the results before the exception.

As in the standard library, the iterator keeps no reference to a result it has
yielded (bpo-14406), and a future whose wait timed out is cancelled.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import cloudpickle

from fade import errors  # errors.ResultDecodeError: imported when met
from fade.progress import ProgressBar, map_description, map_total
from fade.serialization import remote_cause
from fade.tracebacks import RemoteTrace, capture

__all__ = ["ChunkError", "map_in_order", "run_chunk"]

T = TypeVar("T")


class ChunkError(Exception):
    """Raised on a worker when a call of a chunk raised: the results of the calls before
    it, the exception and its traceback (in the user's paths, fade/tracebacks.py).
    Never reaches the caller of ``map``."""

    def __init__(self, values: list[Any], error: BaseException, trace: RemoteTrace) -> None:
        super().__init__(values, error, trace)
        self.values = values
        self.error = error
        self.trace = trace

    def __str__(self) -> str:
        return f"call {len(self.values) + 1} of a chunk raised {self.error!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        error = self.error
        try:
            cloudpickle.dumps(error, protocol=5)
        except Exception as why:  # as for a task's own exception: say what it was
            error = errors.ResultDecodeError(
                f"the task raised {type(error).__qualname__}: {error}, "
                f"which cannot be pickled ({type(why).__name__}: {why})"
            )
        return (ChunkError, (self.values, error, self.trace))


def run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """Run on a worker: the results of ``fn`` over ``chunk``; if a call raises, ChunkError
    with the results before it."""
    values = []
    for args in chunk:
        try:
            values.append(fn(*args))
        except Exception as exc:
            raise ChunkError(values, exc, capture(exc)) from None
    return values


def _validate(chunksize: int, buffersize: int | None) -> None:
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None:
        if not isinstance(buffersize, int) or isinstance(buffersize, bool):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")


def map_in_order(
    executor: cf.Executor,
    fn: Callable[..., T],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int,
    buffersize: int | None,
    progress: bool = False,
) -> Iterator[T]:
    """Submit the calls now (or the first ``buffersize`` of them) and return an iterator
    over their results in order; with ``progress``, a bar counts calls as they finish."""
    _validate(chunksize, buffersize)
    bar = ProgressBar(map_total(iterables), map_description(fn)) if progress else None
    end_time = None if timeout is None else timeout + time.monotonic()
    args = zip(*iterables)
    calls: Iterator[Any] = args
    if chunksize > 1:
        calls = iter(lambda: list(itertools.islice(args, chunksize)), [])

    # One callable for every chunk: when fn pickles by reference, so does it, and its
    # pickle is made once per map (fade/serialization.py), not again in every chunk's
    # arguments; the worker's function cache keeps it too.
    run_chunk_of_fn = functools.partial(run_chunk, fn)

    def submit(task: Any) -> cf.Future[Any]:
        future: cf.Future[Any]
        if chunksize > 1:
            future = executor.submit(run_chunk_of_fn, task)
        else:
            future = executor.submit(fn, *task)
        if bar is not None:
            bar.track(future, len(task) if chunksize > 1 else 1)
        return future

    first = calls if buffersize is None else itertools.islice(calls, buffersize)
    futures = collections.deque(submit(task) for task in first)
    return _results(futures, calls, submit, buffersize, end_time, chunksize=chunksize, bar=bar)


def _results(
    futures: collections.deque[cf.Future[Any]],
    calls: Iterator[Any],
    submit: Callable[[Any], cf.Future[Any]],
    buffersize: int | None,
    end_time: float | None,
    *,
    chunksize: int,
    bar: ProgressBar | None = None,
) -> Iterator[Any]:
    # No local variable may hold a result (or its future) across a yield: the caller
    # may be the only owner of what it was given.
    finished = False
    try:
        while futures:
            if buffersize is not None:
                task = next(calls, None)
                if task is not None:
                    futures.append(submit(task))
            timeout = None if end_time is None else end_time - time.monotonic()
            if chunksize == 1:
                yield _result_or_cancel(futures.popleft(), timeout)
                continue
            values, error = _chunk_or_cancel(futures.popleft(), timeout, chunksize)
            values.reverse()
            while values:
                yield values.pop()
            if error is not None:
                try:
                    raise error
                finally:
                    error = None  # no cycle through this frame's traceback
        finished = True
    finally:
        for future in futures:
            future.cancel()
        if bar is not None:
            bar.close(all_done=finished)


def _result_or_cancel(future: cf.Future[Any], timeout: float | None) -> Any:
    """The future's result; a future that is not done by ``timeout`` is cancelled."""
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break the cycle through a raised exception's traceback


def _chunk_or_cancel(
    future: cf.Future[Any], timeout: float | None, chunksize: int
) -> tuple[list[Any], BaseException | None]:
    """A chunk's results, and the exception of the call that raised, if one did (with
    the worker's traceback as its ``__cause__``, as for a task's own exception)."""
    try:
        return _result_or_cancel(future, timeout), None
    except ChunkError as carrier:
        error = carrier.error
        error.__cause__ = remote_cause(carrier.trace)
        return carrier.values, error
    except errors.MessageTooLargeError as exc:
        # The limit was met by a chunk, not by one call: say what the caller can change.
        raise errors.MessageTooLargeError(
            f"{exc} (the task is a chunk of up to {chunksize} calls of map(chunksize="
            f"{chunksize}): a smaller chunksize sends fewer calls, and their results, per task)"
        ) from exc
