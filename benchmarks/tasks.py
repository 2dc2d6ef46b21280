"""Task functions the benchmarks send to workers.

They live in an importable module (never ``__main__``) so that every system pickles them by
reference, the way real user code is shipped, and every worker imports them from ``benchmarks``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["call_chunk", "identity", "noop"]


def noop(x: Any) -> Any:
    """Return ``x``: the cheapest task there is, so the figures measure overhead only."""
    return x


def identity(x: Any) -> Any:
    """Return ``x`` unchanged; used for the 50 MB array round trip."""
    return x


def call_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn(*args)`` for each argument tuple in ``chunk``: one message carries many calls."""
    return [fn(*args) for args in chunk]
