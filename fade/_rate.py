"""Tasks per second over the last minute, kept in a ring of per-second counts.

The broker calls :meth:`Throughput.record` once per loop pass with its running
total; that costs O(1) however many tasks finished. Status tools read
:meth:`Throughput.series` (one count per second, for a plot) and
:meth:`Throughput.rate` (the mean).
"""

from __future__ import annotations

__all__ = ["Throughput"]


class Throughput:
    """Completions per whole second of ``time.monotonic()``, for the last ``window`` seconds."""

    def __init__(self, started: float, window: int = 60) -> None:
        if window < 2:
            raise ValueError("window must be at least 2 seconds")
        self.window = window
        self._started = started
        self._counts = [0] * window
        # The absolute second each slot counts; a slot whose second has passed
        # out of the window is stale and reads as zero.
        self._seconds = [-1] * window
        self._total = 0

    def record(self, now: float, total: int) -> None:
        """``total`` tasks have finished by ``now``: count the new ones in this second."""
        new = total - self._total
        if new <= 0:
            return
        self._total = total
        second = int(now)
        slot = second % self.window
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += new

    def series(self, now: float) -> list[int]:
        """Completions in each of the last ``window`` seconds, oldest first; the last
        entry is the current, unfinished second."""
        newest = int(now)
        out = []
        for second in range(newest - self.window + 1, newest + 1):
            slot = second % self.window
            out.append(self._counts[slot] if self._seconds[slot] == second else 0)
        return out

    def rate(self, now: float) -> float:
        """Mean completions per second over the window (or since start, if that is shorter)."""
        covered = (self.window - 1) + (now - int(now))
        # At least a second: a burst just after start-up is not a rate of thousands.
        span = max(1.0, min(covered, now - self._started))
        return sum(self.series(now)) / span
