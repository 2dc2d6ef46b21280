"""A worker process: the main thread runs tasks; the socket is served by whichever thread
holds it.

::

    broker ==TASK==> [main thread: holds the socket between tasks] --> runs fn
    broker <==DONE== [ sends the result itself as soon as a task ends] <-- pickles it

    while a task runs longer than TAKEOVER (or waits for code), or always when the fast
    paths are off (fade/fastpath.py):
    broker <=HEARTBEAT=> [keeper thread: holds the socket] <--results, code requests-- main

* The broker link (connect, HELLO, heartbeats, reconnection, the broker's settings)
  is fade/link.py, shared with the client.
* Credits: the worker asks for as many tasks as it wants to hold: one to run
  plus a prefetch sized to cover a round trip to the broker for the tasks it
  has been seeing (none for slow tasks, up to ``MAX_PREFETCH`` for tiny ones); a
  task that runs far longer than those hands the prefetched ones back, for a free
  worker, and the worker asks for none until it ends (``Worker.hand_back_due``).
* The keeper heartbeats for a long task, and enforces ``task_timeout`` by
  reporting TaskTimeoutError, handing back what has not started, and ending the
  process (its supervisor starts a fresh one and ends the process group, so
  whatever the task started ends too).
* The process moves SERVING -> DRAINING -> LEAVING (fade/lifecycle.py): a drain
  request (SIGTERM/SIGINT, or DRAIN on the supervisor's control socket, which a
  task cannot ignore) sends DRAIN, hands back unstarted tasks and finishes the
  running one; a second request, or the supervisor's end, hands back even the
  running one and leaves at once. The process ends with ``os._exit``: threads a
  task left running cannot keep it alive.
* After each task, the working directory, ``os.environ``, ``sys.path``, ``builtins``
  and the worker's own signal handlers are put back as they were before it
  (fade/taskenv.py): the next task may be another client's.
* Code shipping: before a task runs, the code version it names is made active
  (fade/codecache.py); a version this host lacks is fetched from the task's
  client through the broker, the main thread waiting while the keeper serves.
* Package shipping: a task whose installed distributions differ from this
  process's runs in an environment process that has the client's versions
  (fade/environments.py), the main thread waiting for it as for a task of its own.
* Data by content: the buffers a task names by content id come mapped from the
  host's data cache, or are fetched from its client the same way, once per host
  (fade/datafetch.py, fade/datacache.py).
* A result with a frame larger than the limit of any peer on its way back (ours,
  the broker's) is reported as MessageTooLargeError instead of being sent.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback

from fade import fastpath, security, taskenv
from fade import protocol as p
from fade import serialization as ser
from fade._logutil import RateLimitedLog
from fade.codecache import CodeCache, CodeRunner
from fade.data import DataRef
from fade.datacache import FILE_SYSTEM_FAILURES, DataCache
from fade.datafetch import DataFetcher
from fade.environments import Environments
from fade.errors import (
    CodeShippingError,
    FadeError,
    MessageTooLargeError,
    MissingDependencyError,
    SecurityError,
    SharedDataError,
    TaskTerminatedError,
)
from fade.initializer import EXIT_RETIRED, Setups
from fade.options import WorkerOptions, parse_worker_args
from fade.resources import DEVICE_RESOURCES, device_env, host_devices
from fade.shipping import uninstall_import_hook
from fade.shm import SegmentRef
from fade.shmworker import WorkerSegments
from fade.taskenv import TaskEnvironment, end_forked_child, fork_with_pythons_signals
from fade.wakeup import WakePipe
from fade.workerio import MAX_PREFETCH, PREFETCH_HORIZON, SLOW_TASK, Fetch, Job, WorkerIO

__all__ = ["MAX_PREFETCH", "SLOW_TASK", "Worker", "main"]

log = logging.getLogger("fade.worker")

#: A running task that has lasted this long, and this many times the worker's average,
#: sends the tasks prefetched behind it back to the broker (Worker.hand_back_due).
HAND_BACK_AFTER = 0.04
HAND_BACK_FACTOR = 10
#: Seconds to wait for a client to send code before the task fails.
FETCH_TIMEOUT = 60.0
#: The signal that interrupts a task asked to stop, and how long it has to end before its
#: process is replaced.
STOP_SIGNAL = signal.SIGUSR1
STOP_GRACE = 1.0
#: Seconds between stop signals to a task that has not ended: a signal that arrives just
#: before the task enters a blocking call (while its thread waits for the GIL, say) does
#: not interrupt that call; Python runs the handler only when the call returns.
STOP_RESIGNAL = 0.1
#: How long a task asked to stop while fade still loads it (its code, its packages, its
#: arguments) may take to load: its stop takes effect as its code starts, and a load
#: that takes longer than this is stuck (an argument whose unpickling hangs), so its
#: process is replaced.
LOAD_GRACE = 10.0


class _Stopped(BaseException):
    """Raised in a task's code when its client asked to stop it (not an Exception, so that
    the task's own ``except Exception`` does not swallow it)."""


class Worker:
    """One worker process. :meth:`run` blocks until the worker has left the pool."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        keys: security.PeerKeys | None = None,
        control: socket.socket | None = None,
    ) -> None:
        self.options = options
        self.keys = keys
        self.identity = options.identity or security.peer_identity(b"W", keys)
        self.control = control  # the supervisor's end of our control pair
        self._pid = os.getpid()  # a process a task forks is not this worker
        self._init_queues()
        self._functions = ser.FunctionCache()
        self._avg_duration: float | None = None
        self.tasks_done = 0
        self._code = CodeRunner(
            CodeCache(options.code_cache), self._fetch, self._functions, self._frame_limit
        )
        self._task_env = TaskEnvironment(self._code.managed_path)
        self._declines = RateLimitedLog(log, burst=3, period=60.0)  # _shipping_failed
        self._setups = Setups()  # initializer and max_tasks_per_child (fade/initializer.py)
        self.retired = False
        self._job: Job | None = None
        self.fast = fastpath.enabled(options.fast_paths)
        self._init_data(options)
        self._fetch_ids = itertools.count(1)
        self._fetches: dict[int, Fetch] = {}  # guarded by _lock
        self._fetch_outbox: collections.deque[Fetch] = collections.deque()
        self.host = socket.gethostname()
        self.environments = Environments(
            self._code.cache.root,
            options.package_cache_size,
            self._fetch,
            self.host,
            options.log_level,
        )
        self.devices = {name: host_devices(name) for name in DEVICE_RESOURCES}
        self.stopping: tuple[bytes, float] | None = None  # the task asked to stop, when
        self._stop_signalled = 0.0  # when the stop signal was last sent
        self._code_started = 0.0  # when the running task's code started (_call)
        self._interruptible = False

    def _init_queues(self) -> None:
        """What the main thread and the socket holder share, and its locks."""
        self._inbox: collections.deque[Job] = collections.deque()
        self.jobs = threading.Condition()  # guards _inbox when the fast paths are off
        self._outbox: collections.deque[tuple[p.DoneRecord, p.Payload]] = collections.deque()
        self._lock = threading.Lock()  # guards _current, _outbox, _fetches, _keeper_busy
        self._current: tuple[bytes, float, float] | None = None  # key, started, timeout
        self._keeper_busy = False  # the keeper holds the socket for the running task
        self.io_wanted = threading.Event()  # the running task waits for the socket holder
        self.wake = WakePipe()
        self._drain_requests = 0

    def _init_data(self, options: WorkerOptions) -> None:
        """Task data by content (fade/datacache.py) and through shared memory."""
        self._resolve = self._resolve_data  # one bound method, not one per task
        self._data = DataFetcher(
            DataCache(options.data_cache_dir, options.data_cache),
            functools.partial(self._fetch, what="data", error=SharedDataError),
            self._frame_limit,
        )
        # Large buffers through shared memory with clients on this host (fade/shm.py).
        self._segments = WorkerSegments(
            functools.partial(self._fetch, what="shared memory", error=SharedDataError),
            self._frame_limit,
            enabled=self.fast,
        )
        self._resolve_segments = self._mapped_segments  # one bound method, not one per task
        self._write_result = self._result_segment if self.fast else None

    # -- main thread: run tasks --------------------------------------------------------

    def run(self) -> int:
        """Serve tasks until drained or stopped; returns the process exit status."""
        signal.signal(STOP_SIGNAL, self._on_stop_signal)
        # Ours, which a task may take over too: put back after each, with the others.
        self._task_env.keep_handlers(signal.SIGTERM, signal.SIGINT, STOP_SIGNAL)
        io = WorkerIO(self)
        keeper = threading.Thread(target=io.keep, name="fade-worker-keeper", daemon=True)
        try:
            with io.baton:
                io.connect()
            keeper.start()
            while (job := io.next_job()) is not None:
                self._execute(job)
        except Exception:
            log.exception("worker failed")
            io.exit_status = 1
        finally:
            io.stop()
        keeper.join(timeout=5)
        return EXIT_RETIRED if self.retired and io.exit_status == 0 else io.exit_status

    def request_drain(self) -> None:
        """Called from a signal handler: start draining (a second call: leave now)."""
        self._drain_requests += 1
        self.wake.wake()

    def _execute(self, job: Job) -> None:
        started = time.monotonic()
        self._job = job  # for _resolve, if the task names data by content
        # cwd, environment, sys.path, builtins, signal handlers: put back after the task
        with self._task_env:
            try:
                elsewhere = self.environments.run(job.record.key, job.payload, self._data_inline)
                if elsewhere is None:
                    value = self._call(job)
                    result = ser.dumps_value(value, self._write_result)
                    # Let go of the value (and the task's mapped arguments it may hold)
                    # before the result can leave: its client may reuse their slots then.
                    del value
                    status, payload = p.Status.OK, self._checked_size(result)
                else:  # it ran in an environment process: its outcome is pickled already
                    status, payload = elsewhere
                    if status is p.Status.OK:
                        payload = self._checked_size(payload)
                    else:
                        payload = self._checked_exception(None, payload)
            except ModuleNotFoundError as exc:
                status, payload = p.Status.RAISED, ser.dumps_exception(self._missing(exc))
            except _Stopped:
                status, payload = p.Status.RAISED, ser.dumps_exception(self.terminated())
            except CodeShippingError as exc:
                status, payload = self._shipping_failed(exc)
            except BaseException as exc:  # the task's own failure, SystemExit included
                payload = self._checked_exception(exc, ser.dumps_exception(exc))
                status = p.Status.RAISED
            finally:
                self._job = None  # the payload's frames must not outlive the task
        duration = time.monotonic() - started
        with self._lock:
            if self._current is None:  # the keeper already reported a timeout
                return
            self._current = None
            self._outbox.append((p.DoneRecord(job.record.key, status), payload))
            keeper_busy = self._keeper_busy
        self.tasks_done += 1
        avg = self._avg_duration
        self._avg_duration = duration if avg is None else 0.8 * avg + 0.2 * duration
        if self._setups.after(job.payload):
            self._retire()
        if keeper_busy or not self.fast:
            self.wake.wake()  # the keeper is polling the socket: make it act on the result

    def _retire(self) -> None:
        """max_tasks_per_child: drain (the results go out, the rest goes back), then exit
        with EXIT_RETIRED; the supervisor starts a fresh process."""
        log.info("retiring after max_tasks_per_child tasks of one executor")
        self.retired = True
        self._drain_requests = max(self._drain_requests, 1)

    def _call(self, job: Job) -> object:
        key = job.record.key
        taskenv.loading = threading.get_ident()  # no pool from the code it imports
        try:
            self._code.ensure(ser.code_version(job.payload), p.key_tag(key), key)
            self._setups.before(job.payload)
            fn, args, kwargs = ser.loads_call(
                job.payload, self._functions, self._resolve, self._resolve_segments
            )
        except BaseException as exc:
            if os.getpid() != self._pid:  # the initializer or an unpickling forked
                end_forked_child(exc)
            raise
        finally:
            taskenv.loading = 0
        if os.getpid() != self._pid:  # ... and its child came back: never the task
            end_forked_child(None)
        if job.record.devices:
            os.environ.update(device_env(job.record.devices, self.devices))
        try:
            self._code_started = time.monotonic()
            self._interruptible = True  # a stop signal raises in the task's code only
            # A stop that came while the task loaded (its signal did nothing then) takes
            # effect now, not when its grace runs out and the process is replaced.
            stopping = self.stopping
            if stopping is not None and stopping[0] == key:
                raise _Stopped
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:
                if os.getpid() != self._pid:  # a process the task forked came back
                    end_forked_child(exc)
                raise
            if os.getpid() != self._pid:
                end_forked_child(None)
            return value
        finally:
            self._interruptible = False

    def _resolve_data(self, refs: list[DataRef]) -> list[memoryview]:
        """The buffers a task names by content (from the host's cache, or fetched)."""
        job = self._job
        assert job is not None
        return self._data.resolve(job.record.scope, job.record.key, refs)

    def _mapped_segments(self, refs: list[SegmentRef]) -> list[memoryview]:
        """The buffers a task has in shared memory (mapped, or fetched if not on this host)."""
        job = self._job
        assert job is not None
        return self._segments.resolve(job.record.key, refs)

    def _result_segment(self, raw: memoryview) -> bytes | None:
        """Where a large buffer of the running task's result goes in shared memory, if it
        does (fade/shm.py)."""
        job = self._job
        return None if job is None else self._segments.write(job.record.key, raw)

    def _data_inline(self, payload: p.Payload) -> p.Payload:
        """The task's payload with its data by content (and in shared memory) as plain
        frames: for a task that runs in an environment process (fade/environments.py),
        which has no data cache."""
        return ser.with_data_inline(payload, self._resolve, self._resolve_segments)

    # -- stopping a running task (Executor.terminate) -------------------------------------

    def stop_running(self, key: bytes) -> bool:
        """Called by the socket holder for a STOP: interrupt the running task if it is
        ``key`` (a signal to the main thread, which raises in the task); False if it is
        not running."""
        with self._lock:
            current = self._current
            if current is None or current[0] != key:
                return False
            self.stopping = (key, time.monotonic())
        self.signal_stop()
        return True

    def signal_stop(self) -> None:
        """Interrupt the main thread with the stop signal (again, STOP_RESIGNAL later,
        while the task asked to stop runs on: see resignal_due)."""
        self._stop_signalled = time.monotonic()
        signal.pthread_kill(threading.main_thread().ident or 0, STOP_SIGNAL)

    def resignal_due(self) -> float | None:
        """When to send the stop signal again (the task asked to stop runs its code);
        None: not now."""
        stopping, current = self.stopping, self._current
        if stopping is None or current is None or current[0] != stopping[0]:
            return None  # not asked, or that task has ended
        if not self._interruptible:
            return None  # still loading: the stop takes effect as its code starts
        return self._stop_signalled + STOP_RESIGNAL

    def stop_deadline(self) -> float | None:
        """When a task asked to stop has not ended in time (its process is then replaced):
        STOP_GRACE after the stop or after its code started, whichever is later; while
        fade still loads it, LOAD_GRACE after the stop (the stop takes effect as its code
        starts). None: no stop asked."""
        stopping = self.stopping
        if stopping is None:
            return None
        asked = stopping[1]
        if self._interruptible:
            return max(asked, self._code_started) + STOP_GRACE
        return asked + LOAD_GRACE

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        stopping, current = self.stopping, self._current
        if not self._interruptible or stopping is None or current is None:
            return
        if current[0] == stopping[0]:
            raise _Stopped  # in the task's code, wherever it is

    def terminated(self) -> TaskTerminatedError:
        return TaskTerminatedError(
            f"the task was terminated on request, on worker pid {os.getpid()} on {self.host}"
        )

    def _shipping_failed(self, exc: CodeShippingError) -> tuple[p.Status, p.Payload]:
        """The task's code or packages could not be made ready here. When this host's
        file system is the cause (a full cache disk), the task is declined: another
        worker may have room, and the broker sends it there (or fails it with this, if
        none can take it). Anything else is the task's failure, as raised."""
        payload = ser.dumps_exception(exc)
        cause = exc.__cause__
        if not isinstance(cause, OSError) or cause.errno not in FILE_SYSTEM_FAILURES:
            return p.Status.RAISED, payload
        self._declines.warning("%s; handing the task back for another worker", exc)
        return p.Status.DECLINED, payload

    def _missing(self, exc: ModuleNotFoundError) -> BaseException:
        """Name the module and this host; the client adds the distribution it came from."""
        return MissingDependencyError.on_host(exc, self.host)

    def _fetch(
        self,
        key: bytes,
        request: dict[str, object],
        *,
        what: str = "code",
        error: type[FadeError] = CodeShippingError,
    ) -> list[bytes]:
        """Ask the client of task ``key`` for ``what`` (code, or data by content) and wait
        for the answer (main thread); failures raise ``error``."""
        fetch = Fetch(next(self._fetch_ids), key, p.pack_request(request), threading.Event())
        with self._lock:
            self._fetches[fetch.request_id] = fetch
            self._fetch_outbox.append(fetch)
        self.io_wanted.set()  # the keeper takes the socket now, not after TAKEOVER
        self.wake.wake()
        answered = fetch.answered.wait(FETCH_TIMEOUT)
        with self._lock:
            self._fetches.pop(fetch.request_id, None)
        if not answered:
            raise error(f"the client sent no {what} within {FETCH_TIMEOUT:g}s")
        if fetch.status is p.CodeStatus.GONE:
            raise error(f"the task's client is gone, so its {what} cannot be fetched")
        if fetch.status is not p.CodeStatus.OK or fetch.frames is None:
            reason = fetch.frames[0].decode(errors="replace") if fetch.frames else "?"
            raise error(f"the client could not send the {what} asked for: {reason}")
        return fetch.frames

    def _frame_limit(self) -> int:
        """The smallest frame limit between the broker and us (0: none said)."""
        limits = [x for x in (self.options.max_message_size, self.broker_max_message_size) if x]
        return min(limits) if limits else 0

    def ask_again(self) -> None:
        """Send every code request not answered yet once more (called by the socket holder
        after a reconnection: the broker that had them may be gone)."""
        with self._lock:
            waiting = [f for f in self._fetches.values() if not f.answered.is_set()]
            self._fetch_outbox.extend(f for f in waiting if f not in self._fetch_outbox)

    def answer_fetch(self, request_id: int, status: p.CodeStatus, frames: list[bytes]) -> None:
        """Called by the socket holder when CODE arrives."""
        with self._lock:
            fetch = self._fetches.get(request_id)
        if fetch is not None:
            fetch.status, fetch.frames = status, frames
            fetch.answered.set()

    def _checked_size(self, payload: p.Payload) -> p.Payload:
        """The result, or MessageTooLargeError if a peer on the way would refuse a part."""
        limit = self._return_limit()
        largest = p.largest_part(payload)
        if largest > limit:
            raise MessageTooLargeError(
                f"the result has a {largest}-byte frame; the limit on its way back is "
                f"{limit} bytes ({RETURN_LIMITS})"
            )
        return payload

    def _checked_exception(self, exc: BaseException | None, payload: p.Payload) -> p.Payload:
        """The raised exception's payload, or a MessageTooLargeError naming it (type, the
        start of its message, where it was raised) if a peer on the way would refuse
        it: the broker drops a connection that sends it a frame over its limit, and the
        task's future would never hear of it again."""
        limit = self._return_limit()
        largest = p.largest_part(payload)
        if largest <= limit:
            return payload
        return ser.dumps_exception(_oversized_exception(exc, largest, limit))

    def _return_limit(self) -> int:
        return min(self.options.max_message_size, self.broker_max_message_size or sys.maxsize)

    broker_max_message_size = 0  # set by the link's WELCOME

    # -- used by whichever thread holds the socket -----------------------------------------

    def wanted(self) -> int:
        """How many tasks this worker wants to hold: one to run plus its prefetch (none
        behind a task that outlasts its kind, :meth:`hand_back_due`)."""
        if self.options.prefetch is not None:
            return 1 + self.options.prefetch
        avg = self._avg_duration
        if avg is None or avg >= SLOW_TASK:
            return 1
        due = self.hand_back_due()
        if due is not None and time.monotonic() >= due:
            return 1
        return 1 + min(MAX_PREFETCH, math.ceil(PREFETCH_HORIZON / max(avg, 1e-6)))

    def hand_back_due(self) -> float | None:
        """When the running task will have run so much longer than this worker's tasks
        do that the tasks prefetched behind it go back to the broker, for a worker that
        is free (they waited here for it: 60 tiny tasks behind a 3 s one finished 3 s
        late while the other worker stood idle). None: no task runs, or the prefetch
        was set by hand (``--prefetch``)."""
        current = self._current
        if current is None or self.options.prefetch is not None:
            return None
        avg = self._avg_duration or 0.0
        return current[1] + max(HAND_BACK_AFTER, HAND_BACK_FACTOR * avg)

    def holding(self) -> list[bytes]:
        """Keys of every task this worker still owes the broker an answer for."""
        with self._lock:
            keys = [record.key for record, _ in self._outbox]
            current = self._current
        if current is not None:
            keys.append(current[0])
        return keys + [job.record.key for job in self._inbox]

    def held(self) -> int:
        return len(self._inbox) + (1 if self._current is not None else 0)


# -- command line -------------------------------------------------------------------------


#: What limits the frames a task's outcome may have on its way back, for error messages.
RETURN_LIMITS = "--max-message-size of the worker and the broker, max_message_size of the Executor"
#: Characters of an oversized exception's message kept in the error that replaces it.
SHOWN_MESSAGE = 500


def _oversized_exception(
    exc: BaseException | None, largest: int, limit: int
) -> MessageTooLargeError:
    """What stands in for a raised exception too large to travel back."""
    what = "an exception"
    if exc is not None:
        message = str(exc)
        if len(message) > SHOWN_MESSAGE:
            message = f"{message[:SHOWN_MESSAGE]}... ({len(message)} characters)"
        what = f"{type(exc).__qualname__}: {message}"
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            last = frames[-1]
            what += f" (in {last.name}, {last.filename}:{last.lineno})"
    return MessageTooLargeError(
        f"the task raised {what}; pickled, it has a {largest}-byte frame, and the limit on "
        f"its way back is {limit} bytes ({RETURN_LIMITS})"
    )


def _run_child(options: WorkerOptions, keys: security.PeerKeys | None, control_fd: int) -> int:
    # A worker imports shipped code; recording its sources (a client's job) would only
    # cost memory here.
    uninstall_import_hook()
    control = socket.socket(fileno=control_fd) if control_fd >= 0 else None
    worker = Worker(options, keys=keys, control=control)
    fork_with_pythons_signals((signal.SIGINT, signal.SIGTERM, STOP_SIGNAL))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.request_drain())
    return worker.run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fade-worker``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    control_fd = _pop_control_fd(argv)
    options = parse_worker_args(argv)
    role = "fade-worker" if options.child else "fade-supervisor"
    logging.basicConfig(
        level=options.log_level.upper(),
        format=f"%(asctime)s {role}[{os.getpid()}@{socket.gethostname()}] "
        "%(levelname)s %(message)s",
    )
    try:
        keys = security.resolve_peer_keys(options.keys, "worker")
    except SecurityError as exc:
        print(f"fade-worker: {exc}", file=sys.stderr)
        return 2
    if keys is not None:
        options = options.with_keys(str(keys.path))  # the children read the same file
    try:
        # Refuse caches others could write, before any child starts.
        CodeCache(options.code_cache)
        DataCache(options.data_cache_dir, options.data_cache)
    except (CodeShippingError, SharedDataError, OSError) as exc:
        print(f"fade-worker: {exc}", file=sys.stderr)
        return 2
    if options.child:
        status = _run_child(options, keys, control_fd)
        # Threads a task left running must not keep this process alive.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    from fade.supervisor import Supervisor

    return Supervisor(options, keys).run()


def _pop_control_fd(argv: list[str]) -> int:
    """The supervisor's control socket (a private option, not in --help)."""
    if "--control-fd" in argv:
        at = argv.index("--control-fd")
        value = argv[at + 1] if at + 1 < len(argv) else ""
        del argv[at : at + 2]
        if value.isdigit():
            return int(value)
    return -1


if __name__ == "__main__":
    sys.exit(main())
