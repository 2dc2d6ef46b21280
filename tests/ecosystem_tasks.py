"""Functions the joblib, asyncio and example tests run on workers (importable there by name)."""

from __future__ import annotations

import os
import time
from typing import Any

import joblib


def square(x: int) -> int:
    return x * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def pid(_: Any = None) -> int:
    return os.getpid()


def fail_first_else_sleep(x: int, seconds: float) -> int:
    """Element 0 raises at once; every other one sleeps ``seconds``."""
    if x == 0:
        raise KeyError("the first call fails")
    time.sleep(seconds)
    return x


def nested_sum(n: int) -> tuple[int, str, int]:
    """A task that runs its own joblib.Parallel: (the sum, the nested backend, its pid)."""
    backend, _ = joblib.parallel.get_active_backend()
    values = joblib.Parallel(n_jobs=-1)(joblib.delayed(square)(i) for i in range(n))
    return sum(values), type(backend).__name__, os.getpid()


def wait_for_path(path: str, value: Any, timeout: float = 60.0) -> Any:
    """Block until ``path`` exists (a gate the test opens), then return ``value``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return value


def add(a: int, b: int = 0) -> int:
    return a + b
