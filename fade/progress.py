"""Progress bars for long maps and for waiting on many futures, drawn by ``tqdm``.

::

    ex.map(fn, items, progress=True)          a bar that counts calls as they finish
    for f in fade.as_completed(fs, progress=True):   a bar over any futures

Both show done/total, the rate and the time left (``tqdm.auto`` picks a
notebook widget under Jupyter, text on a terminal). The bar of a map counts
calls as their futures finish, in any order, not as the caller consumes the
in-order results; a chunk counts as its number of calls. ``tqdm`` is optional:
install the ``progress`` extra (``pip install 'fade[progress]'``).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from fade.errors import MissingExtraError

__all__ = ["ProgressBar", "as_completed"]

T = TypeVar("T")


class ProgressBar:
    """A tqdm bar counting finished tasks; :meth:`close` it when the work is over.

    Raises MissingExtraError if tqdm is not installed.
    """

    def __init__(self, total: int | None, desc: str | None = None) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise MissingExtraError(
                "progress=True needs tqdm: pip install 'fade[progress]'"
            ) from None
        self._bar = tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True, smoothing=0.05)
        # Updates come from the threads where futures complete; close from the caller's.
        self._lock = threading.Lock()
        self._closed = False
        self._tracked = 0

    def update(self, count: int = 1) -> None:
        with self._lock:
            if not self._closed:
                self._bar.update(count)

    def track(self, future: cf.Future[Any], count: int = 1) -> None:
        """Add ``count`` when ``future`` finishes (a cancelled one does not count).

        Call it from one thread. The callback runs where the future completes (for
        fade, the client's I/O thread); tqdm's update is cheap and throttles its
        own redrawing.
        """
        self._tracked += count

        def finished(done: cf.Future[Any]) -> None:
            if not done.cancelled():
                self.update(count)

        future.add_done_callback(finished)

    def close(self, *, all_done: bool = False) -> None:
        """Draw the final state and release the line; later updates are ignored.

        ``all_done``: every tracked future has finished. A waiter can see a result
        before the future's callbacks have run, so the bar is brought up to the
        tracked count here rather than left one short.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if all_done and self._bar.n < self._tracked:
                self._bar.update(self._tracked - self._bar.n)
            self._bar.close()


def map_total(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls ``map`` will make, when every iterable knows its length."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


def map_description(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or "map"


def as_completed(
    fs: Iterable[cf.Future[T]],
    timeout: float | None = None,
    *,
    progress: bool = False,
    desc: str | None = None,
) -> Iterator[cf.Future[T]]:
    """``concurrent.futures.as_completed``, with a progress bar if ``progress``.

    Works with futures of any executor. The bar advances as each future is
    yielded and closes when the iteration ends (completed, broken off, or timed
    out). Raises MissingExtraError at once if ``progress`` and tqdm is missing.
    """
    futures = set(fs)
    if not progress:
        return cf.as_completed(futures, timeout)
    return _counted(cf.as_completed(futures, timeout), ProgressBar(len(futures), desc))


def _counted(futures: Iterator[cf.Future[T]], bar: ProgressBar) -> Iterator[cf.Future[T]]:
    try:
        for future in futures:
            bar.update()
            yield future
    finally:
        bar.close()
