"""Task functions the benchmarks send to workers.

They live in an importable module (never ``__main__``) so that every system pickles them by
reference, the way real user code is shipped, and every worker imports them from ``benchmarks``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["call_chunk", "identity", "noop", "record_run"]


def noop(x: Any) -> Any:
    """Return ``x``: the cheapest task there is, so the figures measure overhead only."""
    return x


def identity(x: Any) -> Any:
    """Return ``x`` unchanged; used for the 50 MB array round trip."""
    return x


def call_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn(*args)`` for each argument tuple in ``chunk``: one message carries many calls."""
    return [fn(*args) for args in chunk]


def record_run(path: str, value: Any, seconds: float = 0.0) -> Any:
    """Sleep ``seconds``, append "value pid wall-time" to ``path``, return ``value``: each line
    is one run, so a failover's re-runs can be counted and its outage timed."""
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{value} {os.getpid()} {time.time():.6f}\n")
    return value
