"""Tasks that make numpy arrays on the worker (tests/test_shm.py).

Apart from tests/tasks.py because a module's imports, even inside a function, are what
package shipping reads to describe what its tasks need (tests/test_packages.py expects
tests/tasks.py to need no installed distribution).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def ones(size: int) -> Any:
    """A new array of ``size`` bytes of ones, made here."""
    import numpy as np

    return np.ones(size, dtype=np.uint8)


class StallOnce:
    """Pickled after what comes before it in a result: the first time (no ``marker`` file
    yet), writes this process's pid into ``marker`` and sleeps, so that a test can kill the
    worker between writing a result's segment and sending it; afterwards, nothing."""

    def __init__(self, marker: str, seconds: float = 60.0) -> None:
        self.marker = marker
        self.seconds = seconds

    def __reduce__(self) -> Any:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(self.seconds)
        return (StallOnce, (self.marker, 0.0))


def big_then_stall(size: int, marker: str) -> tuple[Any, StallOnce]:
    """A result whose large buffer is written before its pickling stalls (once)."""
    return ones(size), StallOnce(marker)


def stall_then_big(size: int, marker: str) -> tuple[StallOnce, Any]:
    """A result whose pickling signals (once, without sleeping) just before its large
    buffer is written."""
    return StallOnce(marker, 0.0), ones(size)
