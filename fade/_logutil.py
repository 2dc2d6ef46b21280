"""A logger wrapper that stops a flood of bad input from flooding the log."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Log at most ``burst`` records per ``period`` seconds; count and report the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._window_start = time.monotonic()
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._period:
            if self._suppressed:
                self._logger.warning("... %d similar messages suppressed", self._suppressed)
            self._window_start, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count <= self._burst:
            self._logger.warning(msg, *args)
        else:
            self._suppressed += 1
