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
  has been seeing (none for slow tasks, up to ``MAX_PREFETCH`` for tiny ones).
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
* A result with a frame larger than the limit of any peer on its way back (ours,
  the broker's) is reported as MessageTooLargeError instead of being sent.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from fade import fastpath, security
from fade import protocol as p
from fade import serialization as ser
from fade.codecache import CodeCache, CodeRunner
from fade.errors import (
    CodeShippingError,
    MessageTooLargeError,
    MissingDependencyError,
    SecurityError,
)
from fade.options import WorkerOptions, parse_worker_args
from fade.shipping import uninstall_import_hook
from fade.taskenv import TaskEnvironment
from fade.wakeup import WakePipe
from fade.workerio import MAX_PREFETCH, PREFETCH_HORIZON, Fetch, Job, WorkerIO

__all__ = ["MAX_PREFETCH", "Worker", "main"]

log = logging.getLogger("fade.worker")

#: Seconds to wait for a client to send code before the task fails.
FETCH_TIMEOUT = 60.0


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
        self._inbox: collections.deque[Job] = collections.deque()
        self.jobs = threading.Condition()  # guards _inbox when the fast paths are off
        self._outbox: collections.deque[tuple[p.DoneRecord, p.Payload]] = collections.deque()
        self._lock = threading.Lock()  # guards _current, _outbox, _fetches, _keeper_busy
        self._current: tuple[bytes, float, float] | None = None  # key, started, timeout
        self._keeper_busy = False  # the keeper holds the socket for the running task
        self.io_wanted = threading.Event()  # the running task waits for the socket holder
        self.wake = WakePipe()
        self._drain_requests = 0
        self._functions = ser.FunctionCache()
        self._avg_duration: float | None = None
        self.tasks_done = 0
        self._code = CodeRunner(CodeCache(options.code_cache), self._fetch, self._functions)
        self._task_env = TaskEnvironment(self._code.managed_path)
        self._fetch_ids = itertools.count(1)
        self._fetches: dict[int, Fetch] = {}  # guarded by _lock
        self._fetch_outbox: collections.deque[Fetch] = collections.deque()
        self.host = socket.gethostname()
        self.fast = fastpath.enabled(options.fast_paths)
        self._handlers: dict[int, Any] = {}

    # -- main thread: run tasks --------------------------------------------------------

    def run(self) -> int:
        """Serve tasks until drained or stopped; returns the process exit status."""
        self._handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
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
        return io.exit_status

    def request_drain(self) -> None:
        """Called from a signal handler: start draining (a second call: leave now)."""
        self._drain_requests += 1
        self.wake.wake()

    def _execute(self, job: Job) -> None:
        started = time.monotonic()
        with self._task_env:  # cwd, environment, sys.path, builtins: put back after the task
            try:
                value = self._call(job)
                status, payload = p.Status.OK, self._checked_size(ser.dumps_value(value))
            except ModuleNotFoundError as exc:
                status, payload = p.Status.RAISED, ser.dumps_exception(self._missing(exc))
            except BaseException as exc:  # the task's own failure, SystemExit included
                status, payload = p.Status.RAISED, ser.dumps_exception(exc)
        self._after_task()
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
        if keeper_busy or not self.fast:
            self.wake.wake()  # the keeper is polling the socket: make it act on the result

    def _call(self, job: Job) -> object:
        key = job.record.key
        self._code.ensure(ser.code_version(job.payload), p.key_tag(key), key)
        fn, args, kwargs = ser.loads_call(job.payload, self._functions)
        return fn(*args, **kwargs)

    def _after_task(self) -> None:
        """Undo what a task may have changed that the worker itself relies on."""
        for sig, handler in self._handlers.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)

    def _missing(self, exc: ModuleNotFoundError) -> BaseException:
        """Name the module and this host; the client adds the distribution it came from."""
        if isinstance(exc, MissingDependencyError) or not exc.name:
            return exc
        error = MissingDependencyError(
            f"worker pid {os.getpid()} on host {self.host} cannot import {exc.name!r}",
            module=exc.name,
            host=self.host,
        )
        error.__cause__ = exc
        return error

    def _fetch(self, key: bytes, request: dict[str, object]) -> list[bytes]:
        """Ask the client of task ``key`` for code and wait for the answer (main thread)."""
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
            raise CodeShippingError(f"the client sent no code within {FETCH_TIMEOUT:g}s")
        if fetch.status is p.CodeStatus.GONE:
            raise CodeShippingError("the task's client is gone, so its code cannot be fetched")
        if fetch.status is not p.CodeStatus.OK or fetch.frames is None:
            reason = fetch.frames[0].decode(errors="replace") if fetch.frames else "?"
            raise CodeShippingError(f"the client could not send the code asked for: {reason}")
        return fetch.frames

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
        limits = [self.options.max_message_size, self.broker_max_message_size or sys.maxsize]
        largest = p.largest_part(payload)
        if largest > min(limits):
            raise MessageTooLargeError(
                f"the result has a {largest}-byte frame; the limit on its way back is "
                f"{min(limits)} bytes (--max-message-size of the worker and the broker, "
                "max_message_size of the Executor)"
            )
        return payload

    broker_max_message_size = 0  # set by the link's WELCOME

    # -- used by whichever thread holds the socket -----------------------------------------

    def wanted(self) -> int:
        """How many tasks this worker wants to hold: one to run plus its prefetch."""
        if self.options.prefetch is not None:
            return 1 + self.options.prefetch
        avg = self._avg_duration
        if avg is None:
            return 1
        return 1 + min(MAX_PREFETCH, int(PREFETCH_HORIZON / max(avg, 1e-6)))

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


def _run_child(options: WorkerOptions, keys: security.PeerKeys | None, control_fd: int) -> int:
    # A worker imports shipped code; recording its sources (a client's job) would only
    # cost memory here.
    uninstall_import_hook()
    control = socket.socket(fileno=control_fd) if control_fd >= 0 else None
    worker = Worker(options, keys=keys, control=control)
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
        CodeCache(options.code_cache)  # refuse a cache others could write, before any child starts
    except (CodeShippingError, OSError) as exc:
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
