"""``Executor.map`` with chunks and a bounded window, as in Python 3.14.

Each chunk of ``chunksize`` calls travels as one task. Within a chunk the calls
run in order until one raises; the caller gets every result before it, then the
exception: an exception surfaces exactly when its element is reached.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from fade.progress import ProgressBar, map_description, map_total
from fade.serialization import remote_cause
from fade.tracebacks import RemoteTrace, capture

__all__ = ["map_in_order", "run_chunk"]

T = TypeVar("T")

_ChunkResult = tuple[list[Any], "BaseException | None", "RemoteTrace | None"]


def run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> _ChunkResult:
    """Run on a worker: the results of ``fn`` over ``chunk`` up to the first exception."""
    values = []
    for args in chunk:
        try:
            values.append(fn(*args))
        except Exception as exc:
            return values, exc, capture(exc)
    return values, None, None


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

    def submit(task: Any) -> cf.Future[Any]:
        future: cf.Future[Any]
        if chunksize > 1:
            future = executor.submit(run_chunk, fn, task)
        else:
            future = executor.submit(fn, *task)
        if bar is not None:
            bar.track(future, len(task) if chunksize > 1 else 1)
        return future

    first = calls if buffersize is None else itertools.islice(calls, buffersize)
    futures = collections.deque(submit(task) for task in first)
    return _results(futures, calls, submit, buffersize, end_time, chunked=chunksize > 1, bar=bar)


def _results(
    futures: collections.deque[cf.Future[Any]],
    calls: Iterator[Any],
    submit: Callable[[Any], cf.Future[Any]],
    buffersize: int | None,
    end_time: float | None,
    *,
    chunked: bool,
    bar: ProgressBar | None = None,
) -> Iterator[Any]:
    finished = False
    try:
        while futures:
            if buffersize is not None:
                task = next(calls, None)
                if task is not None:
                    futures.append(submit(task))
            future = futures.popleft()
            if end_time is None:
                result = future.result()
            else:
                result = future.result(end_time - time.monotonic())
            if not chunked:
                yield result
                continue
            values, exc, trace = result
            yield from values
            if exc is not None:
                exc.__cause__ = remote_cause(trace)
                raise exc
        finished = True
    finally:
        for future in futures:
            future.cancel()
        if bar is not None:
            bar.close(all_done=finished)
