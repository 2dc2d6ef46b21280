"""The client's future: a ``concurrent.futures.Future`` that knows its executor's I/O side.

::

    Executor.submit --> _Future(io) --> result(): done? return it
                                        |  fast path: read the reply here (fade/fastpath.py)
                                        `- else wait as cf.Future does; on timeout, say why
                                           (ClientIO.why_waiting)

It is separate from fade/client.py because the fast paths (fade/fastpath.py) and the
I/O side complete it too: what they may rely on (``task_id``, ``has_callbacks``,
``complete_here``) is written here once.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from fade import fastpath
from fade.errors import BrokenPoolError

if TYPE_CHECKING:
    from fade.clientio import ClientIO

__all__ = ["_Future", "forked_child_message"]

T = TypeVar("T")
_PENDING = cf._base.PENDING


class _Future(cf.Future[T]):
    """A ``concurrent.futures.Future`` whose ``result()`` may read the reply itself
    (the wait-here fast path, fade/fastpath.py)."""

    def __init__(self, io: ClientIO) -> None:
        if io.fast is None:
            super().__init__()
        else:
            # cf.Future.__init__'s fields (the same from 3.8 to 3.14), with a lighter
            # condition (fastpath.FutureSignal): fewer objects for the garbage collector.
            self._condition = fastpath.FutureSignal()  # type: ignore[assignment]
            self._state = _PENDING
            self._result = None
            self._exception = None
            self._waiters: list[Any] = []
            self._done_callbacks: list[Callable[[cf.Future[T]], object]] = []
        self._io = io
        self.task_id = 0
        self._callbacks_lock = threading.Lock()
        self.has_callbacks = False

    def add_done_callback(self, fn: Callable[[cf.Future[T]], object]) -> None:
        with self._callbacks_lock:
            self.has_callbacks = True
        super().add_done_callback(fn)

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._io.note_cancelled(self)
        return cancelled

    def complete_here(self, ok: bool, value: Any) -> bool:
        """Complete this future in the calling thread, unless it has done-callbacks
        (those run on the I/O thread); False if it has. A callback added while this
        runs waits, then runs at once in the thread that adds it, as on any done future."""
        with self._callbacks_lock:
            if self.has_callbacks:
                return False
            if ok:
                self.set_result(value)
            else:
                self.set_exception(value)
        return True

    def result(self, timeout: float | None = None) -> T:
        if self.done():
            return super().result()
        self._check_can_wait()
        fast = self._io.fast
        wait = timeout
        if fast is not None:
            deadline = math.inf if timeout is None else time.monotonic() + timeout
            fast.wait_here(self, deadline)
            if timeout is not None:
                wait = max(0.0, deadline - time.monotonic())
        try:
            return super().result(wait)
        except cf.TimeoutError:
            if self.done():
                raise
            raise cf.TimeoutError(self._io.why_waiting(timeout, self.task_id)) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._check_can_wait()
        return super().exception(timeout)

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a future cannot be sent to a task: it completes only in the process that "
            "submitted it. Pass its result instead (future.result())"
        )

    def _check_can_wait(self) -> None:
        """Raise rather than wait for ever where this future cannot complete: in a forked
        child (a copy of it, without the I/O thread), or on the I/O thread itself (a
        done-callback: that thread delivers the result it would wait for)."""
        io = self._io
        if io.owner != os.getpid():
            raise BrokenPoolError(
                forked_child_message("future's fade.Executor", io.owner)
                + "; wait for it in that process"
            )
        if threading.get_ident() == io.thread.ident:
            raise RuntimeError(
                "a done-callback waits for a pending future: fade runs done-callbacks on "
                "the executor's I/O thread, the one that delivers results, so the wait "
                "would never end. Wait in a thread of your own, or chain the next step "
                "with add_done_callback on that future"
            )


def forked_child_message(what: str, owner: int) -> str:
    """Why a forked child cannot use its parent's executor or futures, and what to do."""
    return (
        f"this {what} belongs to process {owner}; a forked child (pid {os.getpid()}) has a "
        "copy of it but none of its threads or connections, so it cannot be used here: "
        "create a new fade.Executor in the child"
    )
