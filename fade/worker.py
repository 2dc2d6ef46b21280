"""A worker process: one thread runs tasks and talks to the broker; a keeper covers long tasks.

::

    broker ==TASK==> [main thread: owns the DEALER socket between tasks] --> runs fn
    broker <==DONE== [  sends the result itself as soon as a task ends ] <-- pickles it

    while a task runs longer than TAKEOVER (or waits for code):
    broker <=HEARTBEAT=> [keeper thread: borrows the socket under a lock]

* A short task costs no thread hand-off: the thread that received it runs it and
  sends its result, as the ZeroMQ guide's workers do. The socket migrates between
  the two threads only under ``_WorkerIO.socket_lock`` (a full memory barrier, which
  is what ZeroMQ asks of a socket that changes threads); the thread that holds the
  lock is the only one that touches the socket.
* The keeper takes the socket once a task has run for TAKEOVER, so a long task never
  looks like a dead worker; it also enforces ``task_timeout`` by reporting
  TaskTimeoutError, handing back what has not started, and ending the process (its
  supervisor starts a fresh one). When the task ends the main thread wakes the
  keeper through a pipe and takes the socket back.
* Credits: the worker asks for as many tasks as it wants to hold: one to run
  plus a prefetch sized to cover a round trip to the broker for the tasks it
  has been seeing (none for slow tasks, up to ``MAX_PREFETCH`` for tiny ones).
* SIGTERM/SIGINT drain: DRAIN is sent, unstarted tasks are handed back, the
  running one finishes, then DISCONNECT. A second signal hands back even the
  running one and leaves at once.
* Code shipping: before a task runs, the code version it names is made active
  (see fade/codecache.py); a version this host lacks is fetched from the
  task's client through the broker, the main thread waiting while the keeper
  holds the socket.
* If the broker is silent for interval x liveness the worker opens a new
  socket and says HELLO again, keeping what it holds (the broker may have
  restarted).

* With keys (``--keys FILE`` or $FADE_KEYS) the socket is a CurveZMQ client
  that talks only to the holder of the broker's secret key. A result with a
  frame larger than ``max_message_size`` (ours or the broker's) is reported as
  MessageTooLargeError instead of being sent.

``fade-worker ADDRESS --processes N`` runs a :class:`~fade.supervisor.Supervisor`
that keeps N such processes alive.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from fade import protocol as p
from fade import security
from fade import serialization as ser
from fade._env import default_address
from fade._logutil import RateLimitedLog
from fade._version import __version__
from fade.codecache import CodeCache, CodeRunner
from fade.errors import (
    CodeShippingError,
    MessageTooLargeError,
    MissingDependencyError,
    ProtocolError,
    SecurityError,
    TaskTimeoutError,
)
from fade.initializer import EXIT_RETIRED, Setups
from fade.shipping import uninstall_import_hook
from fade.sockets import (
    DEFAULT_MAX_MESSAGE_SIZE,
    connect_dealer,
    has_input,
    parse_size,
    recv_frames,
    send_frames,
)

__all__ = ["Worker", "main"]

log = logging.getLogger("fade.worker")

#: Tasks a worker may hold beyond the one it runs.
MAX_PREFETCH = 64
#: Seconds of queued work a worker tries to keep at hand.
PREFETCH_HORIZON = 0.002
#: Seconds a task runs before the keeper thread takes the socket to heartbeat for it.
TAKEOVER = 0.01
#: Between back-to-back tasks, results wait at most this long to share one DONE.
RESULT_DELAY = 0.001
#: Seconds without a task after which the keeper stops checking and sleeps until woken.
KEEPER_NAP = 1.0
#: Seconds between the checks no task waits for: the parent process, failed handshakes.
CHECK_INTERVAL = 0.1
#: Exit status of a worker that ended itself after a task timed out.
EXIT_TIMEOUT = 75
#: Seconds to wait for a client to send code before the task fails.
FETCH_TIMEOUT = 60.0


_EMPTY = p.Payload(b"")


@dataclass(slots=True)
class _Fetch:
    """A code request from the main thread, answered through the I/O thread."""

    request_id: int
    client: bytes
    request: bytes
    answered: threading.Event
    status: p.CodeStatus = p.CodeStatus.MISSING
    frames: list[bytes] | None = None


@dataclass(slots=True)
class _Job:
    record: p.TaskRecord
    payload: p.Payload


class Worker:
    """One worker process. :meth:`run` blocks until the worker has left the pool."""

    def __init__(
        self,
        address: str = p.DEFAULT_ADDRESS,
        *,
        identity: bytes | None = None,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        prefetch: int | None = None,
        parent_pid: int | None = None,
        code_cache: str | None = None,
        keys: security.PeerKeys | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.address = address
        self.keys = keys
        self.max_message_size = max_message_size
        self.broker_max_message_size = 0  # 0 until a WELCOME says
        self.identity = identity or security.peer_identity(b"W", keys)
        self.interval = heartbeat_interval
        self.liveness = heartbeat_liveness
        self._fixed_prefetch = prefetch
        self._parent_pid = parent_pid
        self._inbox: collections.deque[_Job] = collections.deque()  # the socket holder's
        self._outbox: collections.deque[tuple[p.DoneRecord, p.Payload]] = collections.deque()
        self._lock = threading.Lock()  # guards _current, _outbox, _fetches, _keeper_busy
        self._current: tuple[bytes, float, float] | None = None  # key, started, timeout
        self._keeper_busy = False  # the keeper holds the socket for the running task
        self.io_wanted = threading.Event()  # the running task waits for the socket holder
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._drain_requests = 0
        self._functions = ser.FunctionCache()
        self._avg_duration: float | None = None
        self._bad_input = RateLimitedLog(log)
        self.tasks_done = 0
        self._code = CodeRunner(CodeCache(code_cache), self._fetch)
        self._setups = Setups()  # initializer and max_tasks_per_child (fade/initializer.py)
        self.retired = False
        self._fetch_ids = itertools.count(1)
        self._fetches: dict[int, _Fetch] = {}  # guarded by _lock
        self._fetch_outbox: collections.deque[_Fetch] = collections.deque()
        self.host = socket.gethostname()

    # -- main thread: run tasks --------------------------------------------------------

    def run(self) -> int:
        """Serve tasks until drained or stopped; returns the process exit status."""
        io = _WorkerIO(self)
        keeper = threading.Thread(target=io.keep, name="fade-worker-keeper", daemon=True)
        try:
            with io.socket_lock:
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
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass

    def _execute(self, job: _Job) -> None:
        started = time.monotonic()
        try:
            value = self._call(job)
            status, payload = p.Status.OK, self._checked_size(ser.dumps_value(value))
        except ModuleNotFoundError as exc:
            status, payload = p.Status.RAISED, ser.dumps_exception(self._missing(exc))
        except BaseException as exc:  # the task's own failure, SystemExit included
            status, payload = p.Status.RAISED, ser.dumps_exception(exc)
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
        if keeper_busy:
            self.wake()  # the keeper is polling the socket: make it hand the socket back

    def _retire(self) -> None:
        """max_tasks_per_child: drain (the results go out, the rest goes back), then exit
        with EXIT_RETIRED; the supervisor starts a fresh process."""
        log.info("retiring after max_tasks_per_child tasks of one executor")
        self.retired = True
        self._drain_requests = max(self._drain_requests, 1)

    def _call(self, job: _Job) -> object:
        code = ser.code_version(job.payload)
        # The key is the client's identity plus an 8-byte task id.
        self._code.ensure(code, job.record.key[:-8])
        self._setups.before(job.payload)
        fn, args, kwargs = ser.loads_call(job.payload, self._functions)
        return fn(*args, **kwargs)

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

    def _fetch(self, client: bytes, request: dict[str, object]) -> list[bytes]:
        """Ask ``client`` for code and wait for the answer (main thread only)."""
        fetch = _Fetch(next(self._fetch_ids), client, p.pack_request(request), threading.Event())
        with self._lock:
            self._fetches[fetch.request_id] = fetch
            self._fetch_outbox.append(fetch)
        self.io_wanted.set()  # the keeper takes the socket now, not after TAKEOVER
        self.wake()
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

    def answer_fetch(self, request_id: int, status: p.CodeStatus, frames: list[bytes]) -> None:
        """Called by the socket holder when CODE arrives."""
        with self._lock:
            fetch = self._fetches.get(request_id)
        if fetch is not None:
            fetch.status, fetch.frames = status, frames
            fetch.answered.set()

    def _checked_size(self, payload: p.Payload) -> p.Payload:
        """The result, or MessageTooLargeError if a peer on the way would refuse a part."""
        limits = [self.max_message_size, self.broker_max_message_size or self.max_message_size]
        largest = p.largest_part(payload)
        if largest > min(limits):
            raise MessageTooLargeError(
                f"the result has a {largest}-byte frame; the limit on its way back is "
                f"{min(limits)} bytes (--max-message-size of the worker and the broker, "
                "max_message_size of the Executor)"
            )
        return payload

    # -- used by whichever thread holds the socket -----------------------------------------------

    def wanted(self) -> int:
        """How many tasks this worker wants to hold: one to run plus its prefetch."""
        if self._fixed_prefetch is not None:
            return 1 + self._fixed_prefetch
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


class _WorkerIO:
    """The broker link: the socket, its loop, and the lock a thread holds to touch it."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.exit_status = 0
        self._context = zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._watch: security.HandshakeWatch | None = None
        self._poller = zmq.Poller()
        self._expiry = p.expiry(worker.interval, worker.liveness)
        self._heard = self._told = time.monotonic()
        self._credits = 0  # credits the broker believes we have unused
        self._draining = False
        self._drain_acked = False
        self._drain_started = 0.0
        self._stopped = False
        self._bad_input = RateLimitedLog(log)
        self._last_pass = 0.0
        self._next_check = 0.0
        self._last_start = 0.0
        self._keeper_asleep = False
        self._task_started = threading.Event()  # wakes a sleeping keeper
        self.socket_lock = threading.Lock()

    # -- main thread ------------------------------------------------------------------------

    def next_job(self) -> _Job | None:
        """Serve the socket until a task is at hand and mark it running; None: leave."""
        inbox = self.w._inbox
        with self.socket_lock:
            while not self._stopped:
                # Back-to-back tasks skip the socket for a moment so that their results
                # share one DONE; a lone task's result leaves at once.
                # A drain (or retirement) hands back the inbox before another task starts.
                if (
                    not inbox
                    or self.w._drain_requests
                    or time.monotonic() - self._last_pass >= RESULT_DELAY
                ):
                    self._pass(block=not inbox)
                if inbox and not self._stopped:
                    return self._start(inbox.popleft())
        return None

    def _start(self, job: _Job) -> _Job:
        with self.w._lock:
            self.w._current = (job.record.key, time.monotonic(), job.record.timeout)
        self._last_start = self.w._current[1]
        if self._keeper_asleep:
            self._task_started.set()
        return job

    def stop(self) -> None:
        """End the loop and the keeper, and close the socket (main thread, no task running)."""
        self._stopped = True
        self._task_started.set()
        self.w.io_wanted.set()
        with self.socket_lock:
            self._close()

    # -- keeper thread ---------------------------------------------------------------------------

    def keep(self) -> None:
        """Hold the socket for every task that outlasts TAKEOVER or waits for code."""
        try:
            while not self._stopped:
                task = self._wait_for_a_long_task()
                if task is not None:
                    self._hold_socket_during(task)
        except Exception:
            log.exception("worker keeper thread failed")
            os._exit(1)  # a running task would go on without heartbeats: leave instead

    def _wait_for_a_long_task(self) -> tuple[bytes, float, float] | None:
        """The running task once it has run TAKEOVER (at once if it waits for code)."""
        w = self.w
        current = w._current
        if current is None:
            if time.monotonic() - self._last_start < KEEPER_NAP:
                if w.io_wanted.wait(TAKEOVER) and w._current is None:
                    # Only a running task sets the flag. Its task is over, so it was
                    # served while this thread held the socket (a second code fetch,
                    # say): left set, it would end every wait at once, and this thread
                    # would spin, taking the GIL from the main thread for up to 5 ms
                    # at a time, for as long as tasks keep coming.
                    w.io_wanted.clear()
                return None
            # Idle for a while: sleep until the main thread starts a task. The flag is
            # set before _current is read again, so a task started in between is seen.
            self._keeper_asleep = True
            if w._current is None:
                self._task_started.wait()
            self._keeper_asleep = False
            self._task_started.clear()
            return None
        takeover = min(TAKEOVER, current[2]) if current[2] > 0 else TAKEOVER
        wait = current[1] + takeover - time.monotonic()
        if wait > 0 and w.io_wanted.wait(wait) is False:
            return None
        w.io_wanted.clear()
        return current

    def _hold_socket_during(self, task: tuple[bytes, float, float]) -> None:
        w = self.w
        with self.socket_lock:
            with w._lock:
                if w._current is not task:
                    return
                w._keeper_busy = True
            try:
                while not self._stopped:
                    self._pass(block=True)
                    with w._lock:
                        if w._current is not task:
                            return
            finally:
                with w._lock:
                    w._keeper_busy = False

    # -- the loop, run by whichever thread holds socket_lock --------------------------------------

    def _pass(self, block: bool) -> None:
        """One turn of the loop; never blocks longer than a heartbeat interval."""
        sock = self._socket
        assert sock is not None
        self._flush()  # before a blocking poll: a finished result must not wait
        timeout = self._poll_timeout() if block else 0.0
        events = dict(self._poller.poll(int(timeout * 1000)))
        if self.w._wake_r in events:
            _drain_pipe(self.w._wake_r)
        if sock in events:
            self._read_one(sock)
        if self.w._drain_requests and not self._draining:
            while has_input(sock):  # tasks already here go back with the rest, in one DONE
                self._read_one(sock)
            self._start_drain()
        if self.w._drain_requests > 1:
            self._leave_now()
            return
        self._flush()
        now = time.monotonic()
        self._check_timeout(now)
        if now - self._heard > self._expiry:
            log.warning("broker silent for %.1fs; reconnecting", now - self._heard)
            self.connect()
        elif now - self._told >= self.w.interval:
            self._send(p.encode(p.Command.HEARTBEAT))
        if self._draining and not self._drain_acked and now - self._drain_started > self._expiry:
            # No answer from the broker: it is away. Leave anyway; whatever it still
            # thinks we hold is re-queued when it hears our DISCONNECT or expires us.
            log.warning("no answer to DRAIN for %.1fs; leaving anyway", now - self._drain_started)
            self._drain_acked = True
        if self._draining and self._drain_acked and self.w.held() == 0 and not self.w._outbox:
            self._send(p.encode(p.Command.DISCONNECT))
            self._stopped = True
        if now >= self._next_check:
            self._slow_checks(now)
        self._last_pass = now

    def _slow_checks(self, now: float) -> None:
        """What may wait a moment: each costs a system call, too much for every task."""
        self._next_check = now + CHECK_INTERVAL
        if self._watch is not None:
            self._watch.check()
        if self.w._parent_pid is not None and os.getppid() != self.w._parent_pid:
            log.info("parent process is gone; exiting")
            os._exit(0)

    def _poll_timeout(self) -> float:
        timeout = self.w.interval - (time.monotonic() - self._told)
        current = self.w._current
        if current is not None and current[2] > 0:
            timeout = min(timeout, current[1] + current[2] - time.monotonic())
        return max(0.0, min(timeout, self.w.interval))

    # -- connection ---------------------------------------------------------------------

    def connect(self) -> None:
        self._close()
        sock = connect_dealer(
            self._context,
            self.w.address,
            identity=self.w.identity,
            linger_ms=1000,
            keys=self.w.keys,
            max_message_size=self.w.max_message_size,
        )
        self._watch = security.HandshakeWatch(sock, log, self.w.keys)
        self._socket = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self.w._wake_r, zmq.POLLIN)
        self._heard = time.monotonic()
        self._hello()

    def _hello(self) -> None:
        """(Re-)register; the broker's view of our credits restarts from what we say here."""
        self._credits = 0 if self._draining else max(0, self.w.wanted() - self.w.held())
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "credits": self._credits,
            "python": sys.version.split()[0],
            # A TASK still in flight on a socket we replaced is gone: telling the broker
            # what we do hold lets it re-queue the rest instead of waiting forever.
            "holding": [key.hex() for key in self.w.holding()],
        }
        self._send(p.encode_hello("worker", info))
        if self._draining:
            self._send(p.encode(p.Command.DRAIN))

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _send(self, frames: list[p.Frame]) -> None:
        assert self._socket is not None
        send_frames(self._socket, frames)
        self._told = time.monotonic()

    # -- input ----------------------------------------------------------------------------

    def _read_one(self, sock: zmq.Socket[bytes]) -> None:
        """Handle the message the caller's poll saw. One per pass: the next pass's poll
        sees any other, and asking the socket here would cost a system call per task."""
        try:
            frames = recv_frames(sock)
        except zmq.Again:
            return
        self._heard = time.monotonic()
        try:
            self._handle(p.parse(frames))
        except ProtocolError as exc:
            self._bad_input.warning("dropped a message from the broker: %s", exc)

    def _handle(self, message: p.Message) -> None:
        command = message.command
        if command is p.Command.TASK:
            self._on_task(p.decode_task(message.body))
        elif command is p.Command.RESET:
            log.info("broker does not know us (it may have restarted); registering again")
            self._hello()
        elif command is p.Command.WELCOME:
            welcome = p.decode_welcome(message.body)
            self.w.broker_max_message_size = welcome.max_message_size
            log.debug("registered with broker %s", welcome.broker_id)
        elif command is p.Command.DRAIN:
            self._drain_acked = True
        elif command is p.Command.CODE:
            _, request_id, status, frames = p.decode_code(message.body)
            self.w.answer_fetch(request_id, status, [_frame_bytes(f) for f in frames])
        elif command is p.Command.ERROR:
            reason = p.decode_error(message.body)
            self._bad_input.warning("the broker refused a message: %s", reason)
        elif command is not p.Command.HEARTBEAT:
            raise ProtocolError(f"{command.name} is not for a worker")

    def _on_task(self, tasks: list[tuple[p.TaskRecord, p.Payload]]) -> None:
        self._credits = max(0, self._credits - len(tasks))
        if self._draining:
            self._outbox_returned([_Job(r, f) for r, f in tasks])
            return
        self.w._inbox.extend(_Job(record, payload) for record, payload in tasks)

    # -- output ------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send every finished result in one DONE, granting the credits we now want."""
        # The lists are looked at before taking the lock, which most passes then skip:
        # whoever appends to them while another thread holds the socket wakes it.
        w = self.w
        if w._fetch_outbox:
            with w._lock:
                fetches = list(w._fetch_outbox)
                w._fetch_outbox.clear()
            for fetch in fetches:
                self._send(p.encode_fetch(fetch.client, fetch.request_id, fetch.request))
        results = []
        if w._outbox:
            with w._lock:
                results = list(w._outbox)
                w._outbox.clear()
        grant = 0
        if not self._draining:
            grant = max(0, self.w.wanted() - self.w.held() - self._credits)
        if not results and not grant:
            return
        self._credits += grant
        if results:
            for i, batch in enumerate(p.chunked(results)):
                self._send(p.encode_done(grant if i == 0 else 0, batch))
        else:
            self._send(p.encode_ready(grant))

    def _take_inbox(self) -> list[_Job]:
        jobs = list(self.w._inbox)
        self.w._inbox.clear()
        return jobs

    def _outbox_returned(self, jobs: list[_Job]) -> None:
        returned = [(p.DoneRecord(j.record.key, p.Status.RETURNED), _EMPTY) for j in jobs]
        with self.w._lock:
            self.w._outbox.extend(returned)

    def _start_drain(self) -> None:
        log.info("draining: handing back unstarted tasks, finishing the running one")
        self._draining = True
        self._drain_started = time.monotonic()
        self._outbox_returned(self._take_inbox())
        self._send(p.encode(p.Command.DRAIN))

    def _leave_now(self) -> None:
        """Second signal: hand back everything, the running task included, and go."""
        log.warning("leaving now: handing back every task held")
        with self.w._lock:
            current, self.w._current = self.w._current, None
        self._outbox_returned(self._take_inbox())
        if current is not None:
            with self.w._lock:
                self.w._outbox.append((p.DoneRecord(current[0], p.Status.RETURNED), _EMPTY))
        self._draining = True
        self._flush()
        self._send(p.encode(p.Command.DISCONNECT))
        self._linger_and_exit(0)

    def _check_timeout(self, now: float) -> None:
        if not _overdue(self.w._current, now):
            return  # the usual case, seen without the lock; checked again under it
        with self.w._lock:
            current = self.w._current
            if current is None or not _overdue(current, now):
                return
            self.w._current = None
            key, started, limit = current
            error = TaskTimeoutError(
                f"the task ran for {now - started:.1f}s, past its task_timeout of {limit:g}s; "
                f"worker process {os.getpid()} on {socket.gethostname()} was stopped"
            )
            self.w._outbox.append((p.DoneRecord(key, p.Status.RAISED), ser.dumps_exception(error)))
        log.warning("task exceeded its %gs limit; replacing this worker process", limit)
        self._outbox_returned(self._take_inbox())
        self._draining = True
        self._flush()
        self._send(p.encode(p.Command.DISCONNECT))
        self._linger_and_exit(EXIT_TIMEOUT)

    def _linger_and_exit(self, status: int) -> None:
        """Give queued messages a moment to leave, then end the process (the task may hang)."""
        assert self._socket is not None
        if self._watch is not None:
            self._watch.close()  # an open monitor socket would keep term() waiting
        self._socket.close(linger=2000)
        self._context.term()
        os._exit(status)


def _overdue(current: tuple[bytes, float, float] | None, now: float) -> bool:
    """Whether the running task (key, started, timeout) has passed its time limit."""
    return current is not None and current[2] > 0 and now - current[1] >= current[2]


def _frame_bytes(frame: p.Frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


# -- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``fade-worker``, parsed and checked."""
    parser = argparse.ArgumentParser(
        prog="fade-worker", description="Run fade worker processes connected to a broker."
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=default_address(),
        help="the broker's ZeroMQ endpoint (default %(default)s; FADE_ADDRESS sets it)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes to keep running on this host (default %(default)s)",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=p.HEARTBEAT_INTERVAL)
    parser.add_argument("--heartbeat-liveness", type=int, default=p.HEARTBEAT_LIVENESS)
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="tasks to hold beyond the running one (default: adapt to task duration)",
    )
    parser.add_argument(
        "--code-cache",
        default=None,
        help="where shipped code is cached on this host (default: $FADE_CODE_CACHE or "
        "~/.cache/fade/code)",
    )
    parser.add_argument(
        "--keys",
        metavar="FILE",
        default=None,
        help=f"this worker's key file (fade-keys add worker NAME); default ${security.KEYS_ENV}",
    )
    parser.add_argument(
        "--max-message-size",
        type=parse_size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        metavar="BYTES",
        help="largest frame sent or accepted, e.g. 64M or 2G (default 1G)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--identity", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.heartbeat_interval <= 0 or args.heartbeat_liveness < 1:
        parser.error("--heartbeat-interval must be > 0 and --heartbeat-liveness >= 1")
    return args


def child_argv(args: argparse.Namespace, identity: bytes, parent_pid: int) -> list[str]:
    """The command line of one supervised worker process."""
    argv = [
        sys.executable,
        "-m",
        "fade.worker",
        args.address,
        "--child",
        "--identity",
        identity.hex(),
        "--parent-pid",
        str(parent_pid),
        "--heartbeat-interval",
        str(args.heartbeat_interval),
        "--heartbeat-liveness",
        str(args.heartbeat_liveness),
        "--log-level",
        args.log_level,
        "--max-message-size",
        str(args.max_message_size),
    ]
    if args.keys is not None:
        argv += ["--keys", args.keys]
    if args.prefetch is not None:
        argv += ["--prefetch", str(args.prefetch)]
    if args.code_cache is not None:
        argv += ["--code-cache", args.code_cache]
    return argv


def _run_child(args: argparse.Namespace, keys: security.PeerKeys | None) -> int:
    # A worker imports shipped code; recording its sources (a client's job) would only
    # cost memory here.
    uninstall_import_hook()
    worker = Worker(
        args.address,
        identity=bytes.fromhex(args.identity) if args.identity else None,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_liveness=args.heartbeat_liveness,
        prefetch=args.prefetch,
        parent_pid=args.parent_pid,
        code_cache=args.code_cache,
        keys=keys,
        max_message_size=args.max_message_size,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.request_drain())
    return worker.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fade-worker``."""
    args = parse_args(argv)
    role = "fade-worker" if args.child else "fade-supervisor"
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {role}[{os.getpid()}@{socket.gethostname()}] "
        "%(levelname)s %(message)s",
    )
    try:
        keys = security.resolve_peer_keys(args.keys, "worker")
    except SecurityError as exc:
        print(f"fade-worker: {exc}", file=sys.stderr)
        return 2
    if keys is not None:
        args.keys = keys.path  # the children read the same file, wherever they start
    if args.child:
        return _run_child(args, keys)
    from fade.supervisor import Supervisor

    return Supervisor(args, keys).run()


if __name__ == "__main__":
    sys.exit(main())
