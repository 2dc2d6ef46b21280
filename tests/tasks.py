"""Functions the tests run on workers (importable there by name through PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def add(a: int, b: int = 0) -> int:
    return a + b


def square(x: int) -> int:
    return x * x


def identity(x: Any) -> Any:
    return x


def pid() -> int:
    return os.getpid()


def sleep_and_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def takes_fn_and_self(*, fn: int, self: int) -> int:
    return fn + self


def record(path: str, value: Any) -> Any:
    """Append a line to ``path`` (to count how often a task really ran), return value."""
    with open(path, "a") as f:
        f.write(f"{value} {os.getpid()}\n")
    return value


def record_then_sleep(path: str, value: Any, seconds: float) -> Any:
    record(path, value)
    time.sleep(seconds)
    return value


def slow_where_marked(x: int, seconds: float) -> tuple[int, int]:
    """Sleep ``seconds`` on a worker started with FADE_TEST_SLOW=1; return (x, pid)."""
    if os.environ.get("FADE_TEST_SLOW"):
        time.sleep(seconds)
    return x, os.getpid()


def die(code: int = 13) -> None:
    os._exit(code)


def die_if_first(marker: str, value: Any) -> Any:
    """Kill the worker the first time (creating ``marker``); succeed on a re-run."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os._exit(7)
    return value


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def return_unpicklable() -> Unpicklable:
    return Unpicklable()


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("boom")
        self.lock = __import__("threading").Lock()


def raise_unpicklable() -> None:
    raise UnpicklableError()


class BadRebuild(Exception):
    """Pickles fine on the worker, but cannot be rebuilt (its __init__ needs two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)


def raise_bad_rebuild() -> None:
    raise BadRebuild(1, 2)


def array_roundtrip(arr: Any) -> Any:
    return arr * 2


def fail_or_die(x: int, poison: int) -> int:
    """Return x, except that element ``poison`` kills its worker every time."""
    if x == poison:
        os._exit(9)
    return x


def record_then_raise(path: str) -> None:
    record(path, "raise")
    raise ValueError("raised on purpose")


def spin(seconds: float) -> int:
    """Busy-loop in pure Python (holding the GIL between switches) for ``seconds``."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def pid_after(x: int, seconds: float) -> tuple[int, int]:
    """Sleep, then return (x, the worker's pid)."""
    time.sleep(seconds)
    return x, os.getpid()


def bytes_of_size(size: int) -> bytes:
    return b"z" * size


# -- what the standard library's own suite (test_concurrent_futures) throws at a pool --------


class ErrorAtPickle:
    """Raises pickle.PicklingError when pickled."""

    def __reduce__(self) -> Any:
        import pickle

        raise pickle.PicklingError("error in pickle")


def raise_unpickling_error() -> None:
    import pickle

    raise pickle.UnpicklingError("error in unpickle")


class ErrorAtUnpickle:
    """Pickles, but raises pickle.UnpicklingError where it is unpickled."""

    def __reduce__(self) -> Any:
        return raise_unpickling_error, ()


class ExitAtUnpickle:
    """Pickles, but calls sys.exit(1) where it is unpickled."""

    def __reduce__(self) -> Any:
        import sys

        return sys.exit, (1,)


def return_instance(cls: type) -> Any:
    return cls()


class Box:
    """A plain object, to watch with a weak reference."""


def make_box(_: Any) -> Box:
    return Box()


INIT_STATUS = "uninitialized"


def init(value: str, log: str | None = None) -> None:
    """An initializer: sets INIT_STATUS; with ``log``, appends this process's pid to it."""
    global INIT_STATUS
    INIT_STATUS = value
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")


def init_status() -> str:
    return INIT_STATUS


def init_fail() -> None:
    raise ValueError("error in initializer")


def init_status_and_pid(_: Any = None) -> tuple[str, int]:
    return INIT_STATUS, os.getpid()


def sleep_and_print(seconds: float, message: str) -> None:
    import sys

    time.sleep(seconds)
    print(message)
    sys.stdout.flush()


def raise_with_comment() -> None:
    raise RuntimeError(123)  # some comment
