"""The client: :class:`Executor`, a drop-in ``concurrent.futures.Executor``.

::

    Executor.submit(fn, *args) --pickle--> ClientIO (fade/clientio.py) ==> broker ==> workers
    Future <------------------------------ result or exception <========= RESULT

* ``submit`` pickles at once (a bad argument raises there) and returns a real
  ``concurrent.futures.Future``; the I/O thread (or, for a lone task, the caller's
  thread: fade/fastpath.py) sends it; the result completes the future.
* Flow control: at most the pool's capacity of tasks is at the broker; the rest
  wait here, still PENDING, so ``cancel()`` on them succeeds and they never run.
* Code shipping: each task names the version of the client's local code
  (fade/shipping.py); workers that lack it FETCH it, and the I/O thread answers.
* Security: with ``keys`` (or $FADE_KEYS) the socket is a CurveZMQ client that
  talks only to the holder of the broker's secret key.
* Nothing waits forever: a broker that cannot be reached fails pending futures
  with BrokerUnreachableError (``connect_timeout``, ``reconnect_timeout``), so
  ``shutdown`` and interpreter exit end within those bounds.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncio

from fade import protocol as p
from fade import security
from fade import serialization as ser
from fade.clientio import ClientIO, WorkItem
from fade.embedded import EmbeddedPool
from fade.errors import BrokenPoolError, MessageTooLargeError
from fade.link import DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_TIMEOUT, check_address
from fade.shipping import DEFAULT_MAX_BYTES, LocalCode, install_import_hook
from fade.sockets import DEFAULT_MAX_MESSAGE_SIZE

__all__ = ["Executor"]

# Record the source of local modules as they are imported from now on, so that
# what the workers run is what this process runs (see fade/shipping.py).
install_import_hook()

T = TypeVar("T")


class _Future(cf.Future[T]):
    """A ``concurrent.futures.Future`` whose ``result()`` may read the reply itself
    (the wait-here fast path, fade/fastpath.py)."""

    def __init__(self, io: ClientIO) -> None:
        super().__init__()
        self._io = io
        self._callbacks_lock = threading.Lock()
        self.has_callbacks = False

    def add_done_callback(self, fn: Callable[[cf.Future[T]], object]) -> None:
        with self._callbacks_lock:
            self.has_callbacks = True
        super().add_done_callback(fn)

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
            raise cf.TimeoutError(self._io.why_waiting(timeout)) from None


class Executor(cf.Executor):
    """Run calls on a fade pool: an embedded one (no address) or a broker at ``address``.

    Behaves like ``concurrent.futures.ProcessPoolExecutor``: ``submit`` returns a
    real ``concurrent.futures.Future``; ``map`` yields results in order.

    Args:
        address: a broker endpoint such as ``"tcp://head:5555"`` (``ipc://PATH`` too),
            or a broker pair's two, comma-separated (``"tcp://a:5555,tcp://b:5555"``:
            the client moves to whichever serves, docs/reliability.md). None starts
            an embedded broker and ``max_workers`` worker processes on this machine;
            an int is taken as ``max_workers``, as ``ThreadPoolExecutor(4)`` does. A
            malformed address raises ValueError.
        max_workers: worker processes of the embedded pool (default: one per
            core). Ignored with an address.
        max_attempts: how many times a task may lose its worker (crash, kill,
            lost heartbeats) before its future fails with WorkerLostError.
        task_timeout: seconds a task may run; past that its worker process is
            replaced and the future fails with TaskTimeoutError.
        heartbeat_interval, heartbeat_liveness: failure detection takes
            interval x liveness seconds; these apply until the broker answers,
            after which everyone follows the broker's settings.
        ship_code: ``"auto"`` sends the client's local modules (those not
            installed in its Python environment) to the workers, following
            edits and reloads; ``"pin"`` freezes them as they are at the first
            submit; ``"off"`` sends none (workers must have the code).
        ship_code_limit: the most bytes of local code and data to ship.
        keys: with an address, the path of this client's key file (made by
            ``fade-keys add client NAME``); default: $FADE_KEYS, else no keys.
        max_message_size: the largest frame (a pickle, or one large buffer such
            as a numpy array's data) sent or accepted, in bytes; default 1 GiB.
            A task or result over any peer's limit fails its own future with
            MessageTooLargeError.
        connect_timeout: seconds to wait for a broker never reached before pending
            futures fail with BrokerUnreachableError (default 10).
        reconnect_timeout: seconds to wait for a broker that stopped answering (a
            restart) before pending futures fail the same way (default 30). While
            it stays unreachable, new tasks fail at once; once it answers, they run.
        fast_paths: False sends and reads everything on the I/O thread (see
            fade/fastpath.py); default: on, unless $FADE_FAST_PATHS is "0".
    """

    def __init__(
        self,
        address: str | int | None = None,
        *,
        max_workers: int | None = None,
        max_attempts: int = 3,
        task_timeout: float | None = None,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        ship_code: str = "auto",
        ship_code_limit: int = DEFAULT_MAX_BYTES,
        keys: security.KeySource | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        fast_paths: bool | None = None,
    ) -> None:
        if isinstance(address, int) and not isinstance(address, bool):
            # Executor(4), as ThreadPoolExecutor(4): the embedded pool's size.
            if max_workers is not None:
                raise TypeError("max_workers given twice (positionally and by keyword)")
            address, max_workers = None, address
        if address is not None:
            address = check_address(address)
        _check_options(
            ship_code, max_workers, max_attempts, task_timeout, heartbeat_interval,
            heartbeat_liveness, max_message_size, connect_timeout, reconnect_timeout,
        )  # fmt: skip
        if address is None and keys is not None:
            raise ValueError("keys are for a broker at an address; the embedded pool needs none")
        # $FADE_KEYS is for remote pools only: the embedded one talks over a private ipc socket.
        peer_keys = security.resolve_peer_keys(keys, "client") if address is not None else None
        self._max_message_size = max_message_size
        self._pool: EmbeddedPool | None = None
        if address is None:
            self._pool = EmbeddedPool(
                max_workers or os.cpu_count() or 1,
                heartbeat_interval=heartbeat_interval,
                heartbeat_liveness=heartbeat_liveness,
            )
            address = self._pool.address
        self.address: str = address
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._ids = itertools.count(1)
        self._code = (
            None
            if ship_code == "off"
            else LocalCode(pinned=ship_code == "pin", max_bytes=ship_code_limit)
        )
        self._io = ClientIO(
            address,
            heartbeat_interval=heartbeat_interval,
            heartbeat_liveness=heartbeat_liveness,
            max_attempts=max_attempts,
            task_timeout=task_timeout,
            pool=self._pool,
            code=self._code,
            keys=peer_keys,
            max_message_size=max_message_size,
            connect_timeout=connect_timeout,
            reconnect_timeout=reconnect_timeout,
            fast_paths=fast_paths,
        )
        self._owner = os.getpid()
        self._io.thread.start()
        _live_executors.add(self)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Schedule ``fn(*args, **kwargs)``; raises SerializationError if it cannot be pickled."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._io.broken is not None:
            raise BrokenPoolError(str(self._io.broken))
        code = b""
        if self._code is not None:
            code = self._code.version()
            self._code.check_function(fn)
        payload = ser.dumps_call(fn, args, kwargs, code)
        largest = p.largest_part(payload)
        if largest > self._max_message_size:
            raise MessageTooLargeError(
                f"the task has a {largest}-byte part, more than max_message_size "
                f"({self._max_message_size}); raise it here, on the broker and on the workers"
            )
        future: cf.Future[T] = _Future(self._io)
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._io.enqueue(WorkItem(next(self._ids), future, payload, largest))
        return future

    def asubmit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """``submit`` for asyncio code: an ``asyncio.Future`` of the running loop to await.

        No thread waits for it: the result reaches the loop through a done-callback.
        Cancelling it cancels the task if it has not left this process yet. Call it
        from a coroutine (it raises RuntimeError when no event loop is running).
        """
        import asyncio  # here, not at the top: worker processes never need it

        loop = asyncio.get_running_loop()
        return asyncio.wrap_future(self.submit(fn, *args, **kwargs), loop=loop)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """Like ``Executor.map`` (Python 3.14): results in order, ``chunksize`` calls per
        task, at most ``buffersize`` tasks in flight. ``progress=True`` draws a progress
        bar (done/total, rate, time left) with tqdm, the ``progress`` extra."""
        from fade._map import map_in_order

        return map_in_order(self, fn, iterables, timeout, chunksize, buffersize, progress)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``wait`` block until every future is done and the
        embedded pool (if any) has stopped. In a forked child, only marks it shut down:
        the pool and its I/O thread belong to the parent."""
        with self._shutdown_lock:
            self._shutdown = True
        if os.getpid() != self._owner:
            return
        io = self._io
        if cancel_futures:
            with io.lock:
                items = list(io.outbox)
                io.outbox.clear()
            for item in items:
                item.future.cancel()
        io.close_soon()
        if wait:
            io.thread.join()
            self._stop_pool()
        else:
            threading.Thread(target=self._finish_later, name="fade-shutdown", daemon=True).start()
            return  # still finished at interpreter exit, as the standard library does
        _live_executors.discard(self)

    def _finish_later(self) -> None:
        self._io.thread.join()
        self._stop_pool()

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.stop()


def _check_options(
    ship_code: str,
    max_workers: int | None,
    max_attempts: int,
    task_timeout: float | None,
    heartbeat_interval: float,
    heartbeat_liveness: int,
    max_message_size: int,
    connect_timeout: float,
    reconnect_timeout: float,
) -> None:
    if ship_code not in ("auto", "pin", "off"):
        raise ValueError("ship_code must be 'auto', 'pin' or 'off'")
    if max_workers is not None and max_workers < 1:
        raise ValueError("max_workers must be greater than 0")
    if not 1 <= max_attempts <= 65535:
        raise ValueError("max_attempts must be between 1 and 65535")
    if task_timeout is not None and task_timeout <= 0:
        raise ValueError("task_timeout must be positive (or None for no limit)")
    if heartbeat_interval <= 0 or heartbeat_liveness < 1:
        raise ValueError("heartbeat_interval must be > 0 and heartbeat_liveness >= 1")
    if max_message_size < 1:
        raise ValueError("max_message_size must be at least 1 byte")
    if connect_timeout <= 0 or reconnect_timeout <= 0:
        raise ValueError("connect_timeout and reconnect_timeout must be positive")


_live_executors: weakref.WeakSet[Executor] = weakref.WeakSet()


def _forget_in_child() -> None:
    # A forked child shares no thread or pool with its parent's executors: its exit
    # must not shut them down (that would remove the parent's embedded pool).
    _live_executors.clear()


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _shutdown_at_exit() -> None:
    # As the standard library does: let submitted work finish when the
    # interpreter exits, and leave no embedded pool behind.
    for executor in list(_live_executors):
        executor.shutdown(wait=True)
