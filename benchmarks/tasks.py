"""Task functions the benchmarks send to workers.

They live in an importable module (never ``__main__``) so that every system pickles them by
reference, the way real user code is shipped, and every worker imports them from ``benchmarks``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["call_chunk", "identity", "noop", "pid_after", "record_run", "spin"]


def noop(x: Any) -> Any:
    """Return ``x``: the cheapest task there is, so the figures measure overhead only."""
    return x


def identity(x: Any) -> Any:
    """Return ``x`` unchanged; used for the 50 MB array round trip."""
    return x


def call_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn(*args)`` for each argument tuple in ``chunk``: one message carries many calls."""
    return [fn(*args) for args in chunk]


def spin(seconds: float) -> None:
    """Keep the CPU busy for ``seconds`` of wall-clock time: a CPU-bound task of a known
    duration (its length does not grow when another process takes the core meanwhile)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def pid_after(seconds: float) -> int:
    """Sleep ``seconds``, then return the worker's pid: which processes are serving."""
    time.sleep(seconds)
    return os.getpid()


def record_run(path: str, value: Any, seconds: float = 0.0) -> Any:
    """Sleep ``seconds``, append "value pid wall-time" to ``path``, return ``value``: each line
    is one run, so a failover's re-runs can be counted and its outage timed."""
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{value} {os.getpid()} {time.time():.6f}\n")
    return value
