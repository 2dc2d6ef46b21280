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
* Package shipping: each task names the environment of installed distributions
  it needs (fade/packages.py); workers that lack one of them, or have another
  version, FETCH its files and run the task with the client's versions.
* Large arguments travel by content (fade/data.py): a buffer of at least
  ``share_threshold`` bytes is named by its hash and kept (not copied) until no
  pending task needs it; each worker host fetches it once, through the same FETCH.
* On one machine, large buffers go through shared memory instead (fade/shm.py): the
  embedded pool's arguments and results, and results from workers on this machine.
* Security: with ``keys`` (or $FADE_KEYS) the socket is a CurveZMQ client that
  talks only to the holder of the broker's secret key.
* Nothing waits forever: a broker that cannot be reached fails pending futures
  with BrokerUnreachableError (``connect_timeout``, ``reconnect_timeout``), so
  ``shutdown`` and interpreter exit end within those bounds.

The future it returns is fade/futures.py's; its arguments are checked in
fade/clientoptions.py.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from fade import defaults as d
from fade import taskenv
from fade.clientoptions import (
    ClientSettings,
    TaskOptions,
    check_options,
    check_setup,
    client_keys,
    executor_setup,
    installed_packages,
    local_code,
    merge_options,
    pool_size,
)
from fade.data import DataShelf
from fade.errors import (
    BrokenPoolError,
    FadeError,
    MessageTooLargeError,
    TaskTerminatedError,
)
from fade.launch import EmbeddedStart
from fade.shipping import install_import_hook

if TYPE_CHECKING:
    import asyncio

    from fade import fastpath, security, shm
    from fade import protocol as p
    from fade import serialization as ser
    from fade.clientio import ClientIO
    from fade.embedded import EmbeddedPool
    from fade.futures import _Future
    from fade.outbox import WorkItem

__all__ = ["Executor"]

# Record the source of local modules as they are imported from now on, so that
# what the workers run is what this process runs (see fade/shipping.py).
install_import_hook()

T = TypeVar("T")


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
        initializer, initargs: a worker process runs ``initializer(*initargs)``
            once, before the first task of this executor that it runs (workers
            are shared: other executors' tasks run in the same processes, and
            see what it did). If it raises, that task fails with
            InitializerError (a ``BrokenExecutor``) and this executor is broken,
            as a standard pool is: the error is logged on the
            ``concurrent.futures`` logger, pending futures fail with it, and
            later submits raise it.
        max_tasks_per_child: a worker process that has run this many tasks of
            this executor leaves the pool and its supervisor starts a fresh one
            (on a remote pool, ``fade-worker``'s). Nothing is lost: the tasks it
            held but had not started go back to the broker. Default: no limit.
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
        ship_packages: ``"auto"`` describes, for each task, the installed
            distributions it needs (those its function and arguments refer to,
            with what they require), so that a worker that lacks one, or has
            another version, fetches the client's files and runs the task with
            exactly the client's versions; a list of distribution names ships
            exactly those, for every task; ``"off"`` ships none (the workers'
            own packages are used). fade, pyzmq and cloudpickle never travel.
        ship_packages_limit: the most bytes of installed distributions that may
            travel to a worker for one task (default 1 GiB); a task over it
            fails with PackageShippingError naming them.
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
        share_threshold: argument buffers (a numpy array's data, any pickle protocol 5
            out-of-band buffer) of at least this many bytes travel by content: each
            worker host fetches each one once and keeps it in its data cache, however
            many tasks name it (default 1 MiB; None: never, except ``fade.share``
            handles). See docs/data.md. Where arguments go through shared memory
            (``shared_memory``), only ``fade.share`` handles travel by content.
        shared_memory: large buffers (2 MiB or more) between this client and
            workers on its machine travel through shared memory (``/dev/shm``).
            Default (None): the embedded pool's arguments and results, and the
            results of a remote pool's workers that run on this machine, unless the
            fast paths are off (``fast_paths``, $FADE_FAST_PATHS). True: a remote
            pool's arguments too (for a pool whose workers share this machine:
            others fetch each such buffer through the broker). False: never.
            See docs/data.md.
        priority, resources: the defaults of this executor's tasks (see
            :meth:`options` and docs/scheduling.md).

    As in the standard pools, the first tasks count as running as soon as they
    are submitted (as many as the pool can run at once: on an embedded pool, its
    ``max_workers`` until the broker reports its capacity; on a remote pool,
    none until it does), so ``shutdown(cancel_futures=True)`` cancels only the
    others; a task that cannot be sent (it cannot be pickled, is too large, or its
    code cannot travel) fails its future rather than raising from ``submit``.
    Where ``ProcessPoolExecutor`` breaks (a worker dies, a task or a result cannot
    be unpickled), the future concerned fails with an error that is also a
    ``BrokenProcessPool`` (see fade.errors), and the pool goes on working.
    CPython's own test_concurrent_futures is the judge (docs/conformance.md).
    """

    def __init__(
        self,
        address: str | int | None = None,
        *,
        max_workers: int | None = None,
        max_attempts: int = 3,
        task_timeout: float | None = None,
        heartbeat_interval: float = d.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = d.HEARTBEAT_LIVENESS,
        ship_code: str = "auto",
        ship_code_limit: int = d.SHIP_CODE_LIMIT,
        ship_packages: str | Sequence[str] = "auto",
        ship_packages_limit: int = d.SHIP_PACKAGES_LIMIT,
        keys: security.KeySource | None = None,
        max_message_size: int = d.DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = d.DEFAULT_CONNECT_TIMEOUT,
        reconnect_timeout: float = d.DEFAULT_RECONNECT_TIMEOUT,
        fast_paths: bool | None = None,
        priority: int = 0,
        resources: dict[str, float] | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        share_threshold: int | None = d.DEFAULT_SHARE_THRESHOLD,
        shared_memory: bool | None = None,
    ) -> None:
        address, max_workers = pool_size(address, max_workers)
        if address is None and taskenv.loading:
            taskenv.check_not_loading_a_task("fade.Executor() started an embedded pool")
        check_setup(initializer, max_tasks_per_child)
        settings = ClientSettings(
            max_attempts, task_timeout, heartbeat_interval, heartbeat_liveness,
            max_message_size, connect_timeout, reconnect_timeout, fast_paths,
        )  # fmt: skip
        check_options(ship_code, ship_code_limit, max_workers, settings)
        # The embedded pool's workers start now, and the rest of the client is imported
        # while they do (fade/launch.py): both are on the way to the first result.
        start = _start_workers(max_workers, settings) if address is None else None
        try:
            _import_the_rest()
            self._setup = executor_setup(initializer, initargs, max_tasks_per_child)
            self._options = merge_options(TaskOptions(), priority, resources, None, None)
            self._packages = packages = installed_packages(ship_packages, ship_packages_limit)
            peer_keys = client_keys(address, keys)
            self._shelf = DataShelf(share_threshold)
            self._segments = _segments(address, shared_memory, fast_paths)
            self._code = local_code(ship_code, ship_code_limit)
            # Last: what raises before here (a bad argument) leaves no pool to stop.
            self._pool, self.address = _pool(start, address)
        except BaseException:
            if start is not None:
                start.abandon()
            raise
        self._max_message_size = max_message_size
        self._shutdown_lock, self._shutdown = threading.Lock(), False
        self._ids = itertools.count(1)
        # Looked up once: submit is the hot path.
        self._track = packages.environment if packages is not None else None
        self._noting = packages is not None and packages.noting
        # Until the broker reports the pool's capacity: on an embedded pool, its size.
        assumed_capacity = start.options.processes if start is not None else 0
        self._io = self._open_io(settings, peer_keys, assumed_capacity)
        self._owner = os.getpid()
        self._io.thread.start()
        _live_executors.add(self)
        # Garbage-collected without a shutdown: shut down then, as the standard pools do
        # (the callback holds what it needs, never the executor).
        self._forgotten = weakref.finalize(self, _forgotten, self._io, self._pool, self._owner)
        self._forgotten.atexit = False  # at exit: _shutdown_at_exit, for live ones

    def _open_io(
        self, settings: ClientSettings, keys: security.PeerKeys | None, assumed_capacity: int
    ) -> ClientIO:
        """The I/O side (not started), over what __init__ has set up."""
        return ClientIO(
            self.address,
            settings,
            pool=self._pool,
            code=self._code,
            packages=self._packages,
            keys=keys,
            assumed_capacity=assumed_capacity,
            shelf=self._shelf,
            segments=self._segments,
        )

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Schedule ``fn(*args, **kwargs)``; raises SerializationError if it cannot be pickled."""
        return self._submit(self._options, fn, args, kwargs)

    def _submit(
        self, options: TaskOptions, fn: Callable[..., T], args: Any, kwargs: Any
    ) -> cf.Future[T]:
        if self._owner != _pid:
            from fade.futures import forked_child_message

            raise RuntimeError(forked_child_message("fade.Executor", self._owner))
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if taskenv.loading:
            taskenv.check_not_loading_a_task("a task was submitted")
        broken = self._io.broken
        if broken is not None:
            kind = type(broken) if isinstance(broken, BrokenPoolError) else BrokenPoolError
            raise kind(str(broken)) from broken
        future: _Future[T] = _Future(self._io)
        try:
            payload, largest, flags, pinned, segs = self._payload(fn, args, kwargs)
        except FadeError as exc:
            # As in the standard pools: a task that cannot be sent fails its future.
            future.set_exception(exc)
            return future
        with self._shutdown_lock:
            if self._shutdown:
                self._release(pinned, segs)
                raise RuntimeError("cannot schedule new futures after shutdown")
            if pinned or segs:
                # Kept until the task is done, however it ends (result, error, cancel),
                # re-runs after a lost worker included.
                shelf, segments = self._shelf, self._segments
                future.add_done_callback(lambda _: _release(shelf, segments, pinned, segs))
            future.task_id = next(self._ids)
            item = WorkItem(future.task_id, future, payload, largest, options, flags=flags)
            self._io.enqueue(item)
        return future

    def _payload(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[p.Payload, int, int, Sequence[bytes], Sequence[bytes]]:
        """The task's payload, the size of its largest part, its SUBMIT flags (it needs
        compiled packages of this platform), the content ids it pinned on the shelf
        (fade/data.py) and the segments it wrote (fade/shm.py); raises FadeError."""
        code = b""
        if self._code is not None:
            code = self._code.version()
            self._code.check_function(fn)
        payload, flags, pinned, segs = ser.dumps_task(
            fn,
            args,
            kwargs,
            code,
            setup=self._setup,
            environment=self._track,
            noting=self._noting,
            shelf=self._shelf,
            segments=self._segments,
        )
        largest = p.largest_part(payload)
        if largest > self._max_message_size:
            self._release(pinned, segs)
            raise MessageTooLargeError(
                f"the task has a {largest}-byte part, more than max_message_size "
                f"({self._max_message_size}); raise it here, on the broker and on the "
                "workers, or send it by content (share_threshold, fade.share)"
            )
        return payload, largest, flags, pinned, segs

    def __reduce__(self) -> NoReturn:
        # Sent to a task (or closed over by its function), it failed with "cannot pickle
        # '_thread.RLock' object", which names nothing the user wrote.
        raise TypeError(
            "a fade.Executor cannot be sent to a task: it holds this process's threads and "
            "sockets. To submit from a task, create an executor there (fade.Executor(address) "
            "for a shared pool); or return what to run next and submit it here"
        )

    @property
    def _broken(self) -> BaseException | bool:
        """As the standard pools' attribute of that name: what broke this executor, or False."""
        return self._io.broken or False

    def options(
        self,
        *,
        priority: int | None = None,
        resources: dict[str, float] | None = None,
        task_timeout: float | None = None,
        max_attempts: int | None = None,
    ) -> ExecutorView:
        """A view of this executor whose tasks run with these options (the others as
        this executor's). It shares the connection and supports ``submit``, ``map`` and
        ``asubmit``; ``submit``'s own keyword arguments stay the function's::

            gpu = ex.options(resources={"gpu": 1}, priority=5)
            futures = [gpu.submit(train, config) for config in configs]

        priority: higher runs first among this client's tasks (-32768 to 32767).
        resources: what each task needs on its worker's host, e.g. {"gpu": 1,
            "mem": 16e9}; it runs only where that is free (docs/scheduling.md).
        """
        return ExecutorView(
            self, merge_options(self._options, priority, resources, task_timeout, max_attempts)
        )

    def terminate(self, future: cf.Future[Any]) -> bool:
        """Stop the task of ``future``, running or not, on its worker (replacing the worker
        process if the task does not stop at once); its future fails with
        TaskTerminatedError. False if the future is done already. ``future.cancel()``
        keeps its standard meaning: it stops only a task that has not started."""
        if not isinstance(future, _Future) or future._io is not self._io:
            raise ValueError("terminate() takes a future of this executor")
        return self._io.terminate(future.task_id, future)

    def _release(self, pinned: Sequence[bytes], segs: Sequence[bytes] = ()) -> None:
        _release(self._shelf, self._segments, pinned, segs)

    def asubmit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """``submit`` for asyncio code: an ``asyncio.Future`` of the running loop to await.

        No thread waits for it: the result reaches the loop through a done-callback.
        Cancelling it stops the task, running or not (as :meth:`terminate`): in asyncio a
        cancel means the work is no longer wanted (a ``wait_for`` timeout, the end of
        ``asyncio.run``). Call it from a coroutine (it raises RuntimeError when no event
        loop is running).
        """
        return _awaitable(self, self._options, fn, args, kwargs)

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

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, terminate: bool = False
    ) -> None:
        """Stop accepting work; with ``wait`` block until every future is done and the
        embedded pool (if any) has stopped. ``cancel_futures`` cancels what has not
        started, as the standard library does; ``terminate`` also stops what runs (its
        futures fail with TaskTerminatedError). In a forked child, only marks it shut
        down: the pool and its I/O thread belong to the parent."""
        with self._shutdown_lock:
            self._shutdown = True
        if os.getpid() != self._owner:
            return
        self._forgotten.detach()
        io = self._io
        if cancel_futures or terminate:
            with io.lock:
                # Tasks marked running as they were submitted run, as in the standard
                # pools (unless terminated below).
                items = io.outbox.drop(lambda item: not item.started or terminate)
                io._started -= sum(item.started for item in items)
            for item in items:
                if not item.future.cancel():
                    io.fail(item, TaskTerminatedError("the task was terminated before it was sent"))
            io.settle_cancelled()  # now: the I/O thread may be about to end
        if terminate:
            with io.baton:
                running = list(io.in_flight.values())
            for item in running:
                io.terminate(item.task_id, item.future)
        io.close_soon()
        if wait:
            _finish(io, self._pool)
        else:
            _finish_in_background(io, self._pool)  # and at interpreter exit
        _live_executors.discard(self)


class ExecutorView(cf.Executor):
    """An executor's tasks with other options (``Executor.options``): same connection,
    same pool. Shutting a view down does nothing: its executor owns the pool."""

    def __init__(self, executor: Executor, options: TaskOptions) -> None:
        self._executor = executor
        self._options = options

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        return self._executor._submit(self._options, fn, args, kwargs)

    def asubmit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """As :meth:`Executor.asubmit`, with this view's options."""
        return _awaitable(self._executor, self._options, fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        from fade._map import map_in_order

        return map_in_order(self, fn, iterables, timeout, chunksize, buffersize, progress)

    def options(self, **changes: Any) -> ExecutorView:
        """A view with these options changed too."""
        o = self._options
        merged = merge_options(
            o,
            changes.pop("priority", None),
            changes.pop("resources", None),
            changes.pop("task_timeout", None),
            changes.pop("max_attempts", None),
        )
        if changes:
            raise TypeError(f"unknown options: {', '.join(changes)}")
        return ExecutorView(self._executor, merged)

    def terminate(self, future: cf.Future[Any]) -> bool:
        return self._executor.terminate(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing: the executor this is a view of owns the pool."""


def _awaitable(
    executor: Executor,
    options: TaskOptions,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> asyncio.Future[T]:
    """A task's future for the running loop; cancelling it stops the task, running or not."""
    import asyncio  # here, not at the top: worker processes never need it

    loop = asyncio.get_running_loop()  # first: no loop, no task
    future = executor._submit(options, fn, args, kwargs)
    awaited = asyncio.wrap_future(future, loop=loop)

    def stop_if_cancelled(awaited: asyncio.Future[T]) -> None:
        # wrap_future has called future.cancel() already: it stops a task not yet started.
        if awaited.cancelled() and not future.done():
            executor.terminate(future)

    awaited.add_done_callback(stop_if_cancelled)
    return awaited


def _segments(
    address: str | None, shared_memory: bool | None, fast_paths: bool | None
) -> shm.ClientSegments | None:
    """This client's shared memory (fade/shm.py), if it is to use any (``shared_memory``)."""
    if not (shared_memory if shared_memory is not None else fastpath.enabled(fast_paths)):
        return None
    shm.sweep()  # what clients killed on this machine left
    return shm.ClientSegments(eager=address is None or bool(shared_memory))


def _start_workers(max_workers: int | None, settings: ClientSettings) -> EmbeddedStart:
    """The embedded pool's workers, started (``max_workers``, default one per core)."""
    return EmbeddedStart(
        max_workers or os.cpu_count() or 1,
        heartbeat_interval=settings.heartbeat_interval,
        heartbeat_liveness=settings.heartbeat_liveness,
    )


def _pool(start: EmbeddedStart | None, address: str | None) -> tuple[EmbeddedPool | None, str]:
    """The embedded pool (of the workers ``start`` started) and its address, or none and
    the broker's ``address``: one of the two is None (``pool_size``)."""
    if start is not None:
        return EmbeddedPool(start), start.address
    assert address is not None
    return None, address


def _import_the_rest() -> None:
    """Import what a running client needs: ZeroMQ, its I/O thread, pickling (0.05-0.1 s,
    which Executor() spends while the embedded pool's workers start; fade/launch.py)."""
    global ClientIO, EmbeddedPool, WorkItem, _Future, fastpath, p, ser, shm
    from fade import fastpath, shm
    from fade import protocol as p
    from fade import serialization as ser
    from fade.clientio import ClientIO
    from fade.embedded import EmbeddedPool
    from fade.futures import _Future
    from fade.outbox import WorkItem


def _release(
    shelf: DataShelf,
    segments: shm.ClientSegments | None,
    pinned: Sequence[bytes],
    segs: Sequence[bytes],
) -> None:
    """Let go of what a task kept: by content on the shelf, in shared memory."""
    if pinned:
        shelf.release(pinned)
    if segs and segments is not None:
        segments.release(segs)


_live_executors: weakref.WeakSet[Executor] = weakref.WeakSet()
#: Shutdowns that did not wait (shutdown(wait=False), an executor garbage-collected):
#: interpreter exit waits for them, as for live executors.
_finishing: set[threading.Thread] = set()


def _finish(io: ClientIO, pool: EmbeddedPool | None, close: bool = False) -> None:
    """Wait for the I/O thread to deliver every pending result and end; stop the pool."""
    if close:
        io.close_soon()
    io.thread.join()
    if pool is not None:
        pool.stop()


def _finish_in_background(io: ClientIO, pool: EmbeddedPool | None, close: bool = False) -> None:
    def finish() -> None:
        _finish(io, pool, close)
        _finishing.discard(threading.current_thread())  # done: nothing to wait for

    thread = threading.Thread(target=finish, name="fade-shutdown", daemon=True)
    _finishing.add(thread)
    thread.start()


def _forgotten(io: ClientIO, pool: EmbeddedPool | None, owner: int) -> None:
    """An executor was garbage-collected without a shutdown: shut it down, not waiting.
    The garbage collector may run this in any thread, the I/O thread holding its lock
    included: everything, close_soon's lock too, happens in another thread."""
    if os.getpid() == owner:
        _finish_in_background(io, pool, close=True)


#: This process's id, kept up to date in forked children: ``submit`` compares it with
#: its executor's owner at no system call's cost.
_pid = os.getpid()


def _forget_in_child() -> None:
    # A forked child shares no thread or pool with its parent's executors: its exit
    # must not shut them down (that would remove the parent's embedded pool), and it
    # cannot submit to them (fade.futures.forked_child_message).
    global _pid
    _pid = os.getpid()
    _live_executors.clear()
    _finishing.clear()


os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _shutdown_at_exit() -> None:
    # As the standard library does: let submitted work finish when the
    # interpreter exits, and leave no embedded pool behind.
    for executor in list(_live_executors):
        executor.shutdown(wait=True)
    for thread in list(_finishing):
        thread.join()
