"""The client: :class:`Executor`, a drop-in ``concurrent.futures.Executor``.

::

    user threads                        I/O thread                                   broker
    submit(fn, *args) --pickle-->  outbox ---wake pipe--->  SUBMIT (batched) ------->
        `--- a lone task, socket free: sent by the caller -->  SUBMIT ------------->
    Future <--set_result--------- in_flight{id} <---------- RESULT (batched) <-------
                                                            HEARTBEAT <----------->

* User threads pickle (so a bad argument raises at ``submit``), then append to
  the outbox and poke a pipe, and the I/O thread sends what waits there in
  batches. A lone task (none other waiting or out) goes straight out from the
  caller's thread instead: waking the I/O thread for it would add two thread
  wake-ups to its round trip.
* The socket is touched only by the thread holding ``socket_lock`` (ZeroMQ lets a
  socket move between threads across such a full memory barrier). The I/O thread
  never holds it while it waits: it sleeps on the socket's file descriptor, and
  whoever last used the socket checks ZMQ_EVENTS afterwards and wakes it if a
  message came in meanwhile (the descriptor only signals edges).
* A thread that calls ``result()`` reads the socket itself for the first few
  milliseconds of its wait if no one else is using it, and completes its own
  future when the reply comes: a short round trip then wakes no other thread.
  Any other result it reads, and any future with done-callbacks, is left to the
  I/O thread, so callbacks never run in a thread that is waiting (it may hold a
  lock they need).
* Futures are completed after the I/O thread has let go of the socket, so a
  done-callback may submit at once.
* Flow control: the client keeps at most the pool's *capacity* (as the broker
  reports it) of tasks at the broker. The rest wait here, still PENDING, so
  ``cancel()`` on them succeeds and they never run, and a map over a huge
  iterable never floods the broker.
* Code shipping: each task names the version of the client's local code
  (fade/shipping.py); workers that lack it FETCH it, and the I/O thread
  answers with CODE.
* Reliability: after every WELCOME (a first connection, a broker restart, a
  reconnection) the client re-sends every task that has no result yet; the
  broker ignores ids it already holds and a second result for an id is
  dropped here, so each future completes exactly once.
* Security: with ``keys`` (or $FADE_KEYS) the socket is a CurveZMQ client that
  talks only to the holder of the broker's secret key; why a handshake fails is
  logged. A frame larger than ``max_message_size`` (ours at ``submit``, the
  broker's once it has said it) fails its future instead of being sent.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import itertools
import json
import logging
import math
import os
import select
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import zmq

if TYPE_CHECKING:
    import asyncio

from fade import protocol as p
from fade import security
from fade import serialization as ser
from fade._logutil import RateLimitedLog
from fade._version import __version__
from fade.embedded import EmbeddedPool
from fade.errors import (
    BrokenPoolError,
    FadeError,
    InitializerError,
    MessageTooLargeError,
    MissingDependencyError,
    ProtocolError,
    WorkerLostError,
)
from fade.initializer import report_failure
from fade.shipping import DEFAULT_MAX_BYTES, LocalCode, install_import_hook
from fade.sockets import (
    DEFAULT_MAX_MESSAGE_SIZE,
    check_endpoint,
    connect_dealer,
    has_input,
    recv_frames,
    send_frames,
    wait_for_input,
)

__all__ = ["Executor"]

# Record the source of local modules as they are imported from now on, so that
# what the workers run is what this process runs (see fade/shipping.py).
install_import_hook()

log = logging.getLogger("fade.client")

T = TypeVar("T")

#: At most this many tasks travel in one SUBMIT message (and p.BATCH_BYTES of inline data).
MAX_BATCH = 512
#: Seconds between checks that the embedded pool's processes are alive.
POOL_CHECK_INTERVAL = 0.1
#: Seconds a thread waiting for a result reads the socket itself before it leaves
#: that to the I/O thread (which cannot send or heartbeat meanwhile).
LEAD_TIME = 0.005


@dataclass(slots=True, eq=False)
class _WorkItem:
    """A submitted task as the client keeps it: it has the Future; only ``frames`` travel."""

    task_id: int
    future: cf.Future[Any]
    payload: p.Payload
    largest: int = 0  # bytes in its largest frame (p.largest_part)
    started: bool = False  # marked running while still in the outbox (_ClientIO.enqueue)


class _ClientIO:
    """The broker link: the socket, the I/O thread that serves it, and the fast submit."""

    def __init__(
        self,
        address: str,
        *,
        heartbeat_interval: float,
        heartbeat_liveness: int,
        max_attempts: int,
        task_timeout: float | None,
        pool: EmbeddedPool | None,
        code: LocalCode | None,
        keys: security.PeerKeys | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        assumed_capacity: int = 0,
    ) -> None:
        self.address = address
        self.assumed_capacity = assumed_capacity  # until the broker says: see enqueue()
        self.keys = keys
        self.max_message_size = max_message_size
        self.broker_max_message_size = 0  # 0 until a WELCOME says
        self.identity = security.peer_identity(b"C", keys)
        self.interval = heartbeat_interval
        self.expiry = p.expiry(heartbeat_interval, heartbeat_liveness)
        self.max_attempts = max_attempts
        self.timeout = task_timeout or 0.0
        self.pool = pool
        self.code = code
        self.lock = threading.Lock()  # guards outbox, closing, _woken, _started
        self.outbox: collections.deque[_WorkItem] = collections.deque()
        self._started = 0  # tasks in the outbox marked running
        # Re-entrant: _break may run inside a pass. Guards the socket and in_flight.
        self.socket_lock = threading.RLock()
        self.in_flight: dict[int, _WorkItem] = {}
        self._ready: list[tuple[cf.Future[Any], bool, Any]] = []  # results to deliver
        self.closing = False
        self.broken: BaseException | None = None
        self._capacity = 0
        self._welcomed = False
        self._woken = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._context = zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._watch: security.HandshakeWatch | None = None
        self._sleeper = _Sleeper(self._wake_r)
        self._heard = self._told = time.monotonic()
        self._next_pool_check = 0.0
        self._bad_input = RateLimitedLog(log)
        self.thread = threading.Thread(target=self._run, name="fade-client-io", daemon=True)

    # -- called from user threads --------------------------------------------------------

    def enqueue(self, item: _WorkItem) -> None:
        if not self.outbox and self._send_now(item):
            return
        with self.lock:
            self._start_early(item)
            self.outbox.append(item)
            wake = not self._woken
            self._woken = True
        if wake:
            self.wake()

    def _start_early(self, item: _WorkItem) -> None:
        """(Holding ``lock``.) As in the standard pools, the first tasks count as running as
        soon as they are submitted, so ``shutdown(cancel_futures=True)`` lets them run: as
        many as the pool's capacity (the embedded pool's workers, until the broker says)
        less those already out. Running tasks cannot be cancelled; the rest can."""
        capacity = self._capacity or self.assumed_capacity
        if self._started + len(self.in_flight) < capacity:
            item.started = item.future.set_running_or_notify_cancel()
            self._started += item.started

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass

    def _send_now(self, item: _WorkItem) -> bool:
        """Send a lone task from the caller's thread (the socket is free, no other task
        of ours is out or waiting); False: it must take the outbox."""
        if not self.socket_lock.acquire(blocking=False):
            return False
        try:
            limit = self.broker_max_message_size
            if (
                self.outbox
                or not self._welcomed
                or self.broken is not None
                or self.closing
                or self.in_flight  # a burst: batches through the I/O thread cost less
                or not self._capacity
                or (limit and item.largest > limit)
                or not item.future.set_running_or_notify_cancel()
            ):
                return False
            self.in_flight[item.task_id] = item
            self._send(self._submit_frames([item]))
            self._wake_if_input()
            return True
        finally:
            self.socket_lock.release()

    def _wake_if_input(self) -> None:
        """After using the socket outside the I/O thread: ZeroMQ may have consumed the
        edge its descriptor would have signalled for a message that came meanwhile."""
        if self._socket is not None and has_input(self._socket):
            self.wake()

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with self.socket_lock:
                self._connect()
            woken = False
            while True:
                with self.socket_lock:
                    self._take_input(woken)
                    ready = self._take_ready()
                _deliver(ready)  # before the upkeep: a caller is waiting for these
                with self.socket_lock:
                    self._upkeep()
                    finished = self._finished()
                    if finished:
                        self._send(p.encode(p.Command.DISCONNECT))
                    timeout = self._poll_timeout()
                    ready = self._take_ready()
                _deliver(ready)
                if finished:
                    break
                woken = self._sleeper.sleep(timeout)  # not holding the socket
        except BaseException as exc:
            log.exception("the client I/O thread failed")
            self._break(BrokenPoolError(f"the client's I/O thread failed: {exc!r}"))
        finally:
            with self.socket_lock:
                _deliver(self._take_ready())
                if self._watch is not None:
                    self._watch.close()
                if self._socket is not None:
                    self._socket.close(linger=200)
                    self._socket = None
            self._sleeper.close()
            self._context.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _finished(self) -> bool:
        if self.broken is not None:
            return True
        with self.lock:
            return self.closing and not self.outbox and not self.in_flight

    def _take_ready(self) -> list[tuple[cf.Future[Any], bool, Any]]:
        ready, self._ready = self._ready, []
        return ready

    # -- called from a thread waiting for a result -------------------------------------------

    def wait_here(self, future: _Future[Any], deadline: float) -> None:
        """Read the socket in the waiting thread, for up to LEAD_TIME, if no one else is
        using it: the result then reaches its caller without waking the I/O thread.

        Only this future is completed here, and only if it has no done-callbacks
        (those always run on the I/O thread); whatever else comes in is left to the
        I/O thread, which is woken for it.
        """
        if not self.socket_lock.acquire(blocking=False):
            return
        outcome = None
        try:
            sock = self._socket
            if sock is None or self.broken is not None:
                return
            self._sleeper.mute()  # the I/O thread need not wake
            try:
                outcome = self._take_outcome(future)
                end = min(deadline, time.monotonic() + LEAD_TIME)
                while outcome is None:
                    left = end - time.monotonic()
                    if left <= 0 or not wait_for_input(sock, math.ceil(left * 1000)):
                        break
                    try:
                        self._read_all(sock, known=True)
                    except Exception as exc:  # as in the I/O thread: the pool is unusable
                        log.exception("reading the broker's reply failed")
                        self._break(BrokenPoolError(f"the client failed to read: {exc!r}"))
                        return
                    outcome = self._take_outcome(future)
            finally:
                self._sleeper.unmute()
                # The last thing done to the socket here found no input (the poll, or
                # _read_all's last check), so the descriptor will signal the next message.
                if self._ready:
                    self.wake()
        finally:
            self.socket_lock.release()
        if outcome is not None and not future.complete_here(outcome[1], outcome[2]):
            with self.socket_lock:  # a callback came meanwhile: the I/O thread runs it
                self._ready.append(outcome)
            self.wake()

    def _take_outcome(self, future: _Future[Any]) -> tuple[cf.Future[Any], bool, Any] | None:
        if future.has_callbacks:
            return None
        for i, outcome in enumerate(self._ready):
            if outcome[0] is future:
                return self._ready.pop(i)
        return None

    def _take_input(self, woken: bool) -> None:
        """Read what the broker sent (holding the socket); never blocks."""
        if woken:
            # Empty the pipe *before* clearing the flag: a submit that comes after the
            # flag is cleared writes a fresh byte, and one that came before is already
            # in the outbox, which _send_tasks reads below. The other order can leave
            # the flag set with the pipe empty, and the next submit would wait for the
            # poll to time out.
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            with self.lock:
                self._woken = False
        assert self._socket is not None
        self._read_all(self._socket)

    def _upkeep(self) -> None:
        """Send what waits, heartbeat, reconnect (holding the socket); never blocks."""
        self._send_tasks()
        if self._watch is not None:
            self._watch.check()
        now = time.monotonic()
        if now - self._heard > self.expiry:
            log.warning("broker silent for %.1fs; reconnecting", now - self._heard)
            self._connect()
        elif now - self._told >= self.interval:
            self._send(p.encode(p.Command.HEARTBEAT))
        if self.pool is not None and now >= self._next_pool_check:
            self._next_pool_check = now + POOL_CHECK_INTERVAL  # it asks the OS: not every pass
            problem = self.pool.problem()
            if problem is not None:
                self._break(BrokenPoolError(problem))

    def _poll_timeout(self) -> float:
        if self._socket is not None and has_input(self._socket):
            return 0.0  # our own sends may have consumed the descriptor's edge
        return max(0.0, min(self.interval - (time.monotonic() - self._told), self.interval))

    # -- connection ------------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._socket is not None:
            self._sleeper.forget()
            self._socket.close(linger=0)
        sock = connect_dealer(
            self._context,
            self.address,
            identity=self.identity,
            keys=self.keys,
            max_message_size=self.max_message_size,
        )
        self._watch = security.HandshakeWatch(sock, log, self.keys)
        self._socket = sock
        self._sleeper.watch(cast(int, sock.getsockopt(zmq.FD)))
        self._heard = time.monotonic()
        self._hello()

    def _hello(self) -> None:
        self._welcomed = False
        info = {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__}
        self._send(p.encode_hello("client", info))

    def _send(self, frames: list[Any]) -> None:
        assert self._socket is not None
        send_frames(self._socket, frames)
        self._told = time.monotonic()

    # -- input -------------------------------------------------------------------------------------

    def _read_all(self, sock: zmq.Socket[bytes], known: bool = False) -> None:
        """Handle every message waiting; ``known``: a poll just saw one, so the first
        needs no check. Asking EVENTS costs less than the zmq.Again a drained socket raises."""
        while known or has_input(sock):
            known = False
            frames = recv_frames(sock)
            self._heard = time.monotonic()
            try:
                self._handle(p.parse(frames))
            except ProtocolError as exc:
                self._bad_input.warning("dropped a message from the broker: %s", exc)

    def _handle(self, message: p.Message) -> None:
        command = message.command
        if command is p.Command.RESULT:
            capacity, results = p.decode_result(message.body)
            self._capacity = capacity
            for record, payload in results:
                self._complete(record, payload)
        elif command is p.Command.HEARTBEAT:
            announced = p.decode_capacity(message.body)
            if announced is not None:
                self._capacity = announced
        elif command is p.Command.WELCOME:
            self._on_welcome(p.decode_welcome(message.body))
        elif command is p.Command.RESET:
            log.info("broker does not know this client (it may have restarted)")
            self._hello()
        elif command is p.Command.FETCH:
            self._on_fetch(*p.decode_fetch(message.body))
        elif command is p.Command.ERROR:
            reason = p.decode_error(message.body)
            self._bad_input.warning("the broker refused a message: %s", reason)
        else:
            raise ProtocolError(f"{command.name} is not for a client")

    def _on_welcome(self, welcome: p.Welcome) -> None:
        self._capacity = welcome.capacity
        self.broker_max_message_size = welcome.max_message_size
        self._welcomed = True
        if self.in_flight:
            # Whatever the broker had of ours may be gone: send it all again.
            # The broker skips ids it still holds.
            log.info(
                "re-sending %d unfinished tasks to broker %s",
                len(self.in_flight),
                welcome.broker_id,
            )
            items = sorted(self.in_flight.values(), key=lambda item: item.task_id)
            batch: list[_WorkItem] = []
            size = 0
            for item in items:
                inline = len(item.payload.inline) + p.HEAD_ROOM
                if batch and (len(batch) == MAX_BATCH or size + inline > self._batch_bytes()):
                    self._send(self._submit_frames(batch))
                    batch, size = [], 0
                batch.append(item)
                size += inline
            if batch:
                self._send(self._submit_frames(batch))

    def _on_fetch(self, worker: bytes, request_id: int, request: Any) -> None:
        """A worker asks for our code: the manifest of a version, or file contents."""
        status, frames = p.CodeStatus.MISSING, [b"this client ships no code"]
        if self.code is not None:
            status, frames = _serve(self.code, p.unpack_request(request))
        self._send(p.encode_code(worker, request_id, status, frames))

    def _complete(self, record: p.ResultRecord, payload: p.Payload) -> None:
        item = self.in_flight.pop(record.task_id, None)
        if item is None:
            return  # a duplicate: this future already has its result
        outcome: tuple[bool, Any]
        if record.status is p.Status.OK:
            try:
                outcome = True, ser.loads_value(payload)
            except FadeError as exc:
                outcome = False, exc
        elif record.status is p.Status.RAISED:
            outcome = False, _name_distribution(ser.loads_exception(payload))
            if isinstance(outcome[1], InitializerError):
                # As in the standard pools, a failed initializer breaks the executor.
                self._ready.append((item.future, *outcome))
                if self.broken is None:
                    report_failure(outcome[1])
                self._break(outcome[1])
                return
        elif record.status is p.Status.LOST:
            outcome = False, _lost_error(payload)
        else:
            outcome = False, ProtocolError(f"unexpected result status {record.status.name}")
        self._ready.append((item.future, *outcome))

    # -- output ------------------------------------------------------------------------

    def _send_tasks(self) -> None:
        """Move tasks from the outbox to the broker while the pool has room for them."""
        if not self._welcomed or not self.outbox:
            return
        while True:
            room = min(MAX_BATCH, self._capacity - len(self.in_flight))
            if room <= 0:
                return
            batch = self._take(room)
            if not batch:
                return
            batch = self._refuse_oversized(batch)
            if batch:
                self._send(self._submit_frames(batch))

    def _refuse_oversized(self, batch: list[_WorkItem]) -> list[_WorkItem]:
        """Fail the tasks the broker would not accept: it would drop our connection."""
        limit = self.broker_max_message_size
        if not limit or all(item.largest <= limit for item in batch):
            return batch
        kept = []
        for item in batch:
            if item.largest <= limit:
                kept.append(item)
                continue
            del self.in_flight[item.task_id]
            item.future.set_exception(
                MessageTooLargeError(
                    f"the task has a {item.largest}-byte frame; the broker accepts at most "
                    f"{limit} (its --max-message-size)"
                )
            )
        return kept

    def _take(self, room: int) -> list[_WorkItem]:
        """Up to ``room`` tasks from the outbox whose inline data fits in one frame."""
        batch: list[_WorkItem] = []
        size = 0
        with self.lock:
            while self.outbox and len(batch) < room:
                inline = len(self.outbox[0].payload.inline) + p.HEAD_ROOM
                if batch and size + inline > self._batch_bytes():
                    break
                item = self.outbox.popleft()
                if item.started:
                    self._started -= 1
                if item.started or item.future.set_running_or_notify_cancel():
                    batch.append(item)
                    size += inline
        for item in batch:
            self.in_flight[item.task_id] = item
        return batch

    def _batch_bytes(self) -> int:
        """The most bytes a SUBMIT's first frame may carry (each task's inline bytes plus
        p.HEAD_ROOM): every peer's frame limit applies to that one frame, not to each task."""
        limits = [self.max_message_size, p.BATCH_BYTES]
        if self.broker_max_message_size:
            limits.append(self.broker_max_message_size)
        return min(limits)

    def _submit_frames(self, items: list[_WorkItem]) -> list[Any]:
        return p.encode_submit(
            [
                (p.SubmitRecord(item.task_id, self.max_attempts, self.timeout), item.payload)
                for item in items
            ]
        )

    def _break(self, error: BaseException) -> None:
        """The pool is unusable: fail every future that is not done."""
        if self.broken is not None:
            return
        with self.socket_lock, self.lock:
            self.broken = error
            items = [*self.outbox, *self.in_flight.values()]
            self.outbox.clear()
            self._started = 0
            self.in_flight.clear()
        for item in items:
            if not item.future.done():
                try:
                    item.future.set_exception(error)
                except cf.InvalidStateError:
                    pass


class _Sleeper:
    """Where the I/O thread sleeps: on its wake-up pipe and, unless muted, on the
    socket's descriptor. Muting takes effect at once, even for a thread already
    asleep. With epoll it is one system call; selectors' unregister, the fallback
    where there is no epoll, costs about four times as much per round trip."""

    def __init__(self, wake_fd: int) -> None:
        self._wake_fd = wake_fd
        self._socket_fd = -1
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._selector = selectors.DefaultSelector() if self._epoll is None else None
        self._add(wake_fd)

    def watch(self, fd: int) -> None:
        """Sleep on this socket descriptor from now on."""
        self.forget()
        self._socket_fd = fd
        self._add(fd)

    def forget(self) -> None:
        """Stop watching the socket descriptor (before its socket is closed)."""
        if self._socket_fd >= 0:
            if self._epoll is not None:
                self._epoll.unregister(self._socket_fd)
            else:
                assert self._selector is not None
                self._selector.unregister(self._socket_fd)
            self._socket_fd = -1

    def mute(self) -> None:
        if self._epoll is not None:
            self._epoll.modify(self._socket_fd, 0)
        else:
            assert self._selector is not None
            self._selector.unregister(self._socket_fd)

    def unmute(self) -> None:
        if self._epoll is not None:
            self._epoll.modify(self._socket_fd, select.EPOLLIN)
        else:
            self._add(self._socket_fd)

    def sleep(self, timeout: float) -> bool:
        """Until input, a wake-up or ``timeout``; True if woken through the pipe."""
        if self._epoll is not None:
            return any(fd == self._wake_fd for fd, _ in self._epoll.poll(timeout))
        assert self._selector is not None
        return any(key.fd == self._wake_fd for key, _ in self._selector.select(timeout))

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        else:
            assert self._selector is not None
            self._selector.close()

    def _add(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            assert self._selector is not None
            self._selector.register(fd, selectors.EVENT_READ)


def _deliver(ready: list[tuple[cf.Future[Any], bool, Any]]) -> None:
    """Complete the futures whose results came in (outside the socket lock, so a
    done-callback may submit)."""
    for future, ok, value in ready:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _Future(cf.Future[T]):
    """A ``concurrent.futures.Future`` whose ``result()`` may read the reply itself."""

    def __init__(self, io: _ClientIO) -> None:
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
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        self._io.wait_here(self, deadline)
        if timeout is not None:
            timeout = max(0.0, deadline - time.monotonic())
        return super().result(timeout)


def _serve(code: LocalCode, request: dict[str, Any]) -> tuple[p.CodeStatus, list[bytes]]:
    kind = request.get("kind")
    if kind == "manifest":
        try:
            manifest = code.manifest_json(bytes.fromhex(str(request.get("version"))))
        except ValueError:
            manifest = None
        if manifest is not None:
            return p.CodeStatus.OK, [manifest]
        return p.CodeStatus.MISSING, [b"unknown code version"]
    hashes = request.get("hashes")
    if kind == "blobs" and isinstance(hashes, list):
        blobs = code.blobs([str(h) for h in hashes])
        if blobs is not None:
            return p.CodeStatus.OK, blobs
        return p.CodeStatus.MISSING, [b"unknown file hash"]
    return p.CodeStatus.MISSING, [b"malformed request"]


def _name_distribution(exc: BaseException) -> BaseException:
    """Add to a worker's MissingDependencyError the distribution the client has it from."""
    if not isinstance(exc, MissingDependencyError) or not exc.module:
        return exc
    top = exc.module.partition(".")[0]
    try:
        import importlib.metadata as md

        dists = md.packages_distributions().get(top, [])
    except Exception:  # metadata is advisory; never hide the real error
        dists = []
    if dists:
        versions = ", ".join(f"{d} {_version_of(d)}" for d in dists)
        hint = f"; this client has it from the distribution {versions}: install that on the workers"
    else:
        hint = "; install it on the workers"
    enriched = MissingDependencyError(str(exc) + hint, module=exc.module, host=exc.host)
    enriched.__cause__ = exc.__cause__
    return enriched


def _version_of(distribution: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return "?"


def _lost_error(payload: p.Payload) -> WorkerLostError:
    try:
        info = json.loads(payload.inline)
    except ValueError:
        return WorkerLostError("the task's worker was lost too many times")
    identity = str(info.get("identity", "?"))[:12]
    where = f"worker {identity} on host {info.get('host')} pid {info.get('pid')}"
    if info.get("signal"):
        where += f", killed by {info['signal']}"
    elif info.get("exitcode") is not None:
        where += f", exit code {info['exitcode']}"
    return WorkerLostError(
        f"the task was attempted {info.get('attempts')} times and lost its worker each time "
        f"(it may crash its worker: a segfault, os._exit, running out of memory); "
        f"last seen: {where} ({info.get('reason')})"
    )


class Executor(cf.Executor):
    """Run calls on a fade pool: an embedded one (no address) or a broker at ``address``.

    Behaves like ``concurrent.futures.ProcessPoolExecutor``: ``submit`` returns a
    real ``concurrent.futures.Future``; ``map`` yields results in order. CPython's
    own test_concurrent_futures is the judge (docs/conformance.md).

    Args:
        address: a broker endpoint, ``"tcp://host:port"`` or ``"ipc://path"``; a
            malformed one raises ValueError. None starts an embedded broker and
            ``max_workers`` worker processes on this machine. An int here is
            ``max_workers``, as in ``ThreadPoolExecutor(4)``.
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
            interval x liveness seconds.
        ship_code: ``"auto"`` sends the client's local modules (those not
            installed in its Python environment) to the workers, following
            edits and reloads; ``"pin"`` freezes them as they are at the first
            submit; ``"off"`` sends none (workers must have the code).
        ship_code_limit: the most bytes of local code and data to ship.
        keys: with an address, the path of this client's key file (made by
            ``fade-keys add client NAME``); default: $FADE_KEYS, else no keys.
        max_message_size: the largest frame (a pickle, or one large buffer such
            as a numpy array's data) sent or accepted, in bytes; default 1 GiB.

    As in the standard pools, the first tasks count as running as soon as they
    are submitted (as many as the pool can run at once: on an embedded pool, its
    ``max_workers`` until the broker reports its capacity; on a remote pool,
    none until it does), so ``shutdown(cancel_futures=True)`` cancels only the
    others. Where ``ProcessPoolExecutor`` breaks (a worker dies, a task or a
    result cannot be unpickled), the future concerned fails with an error that is
    also a ``BrokenProcessPool`` (see fade.errors), and the pool goes on working.
    """

    def __init__(
        self,
        address: str | int | None = None,
        *,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
        max_attempts: int = 3,
        task_timeout: float | None = None,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        ship_code: str = "auto",
        ship_code_limit: int = DEFAULT_MAX_BYTES,
        keys: security.KeySource | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        address, max_workers = _address_or_max_workers(address, max_workers)
        if address is not None:
            check_endpoint(address)
        if ship_code not in ("auto", "pin", "off"):
            raise ValueError("ship_code must be 'auto', 'pin' or 'off'")
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child < 1:
                raise ValueError("max_tasks_per_child must be >= 1")
        if not 1 <= max_attempts <= 65535:
            raise ValueError("max_attempts must be between 1 and 65535")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive (or None for no limit)")
        if heartbeat_interval <= 0 or heartbeat_liveness < 1:
            raise ValueError("heartbeat_interval must be > 0 and heartbeat_liveness >= 1")
        if max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 byte")
        if address is None and keys is not None:
            raise ValueError("keys are for a broker at an address; the embedded pool needs none")
        # $FADE_KEYS is for remote pools only: the embedded one talks over a private ipc socket.
        peer_keys = security.resolve_peer_keys(keys, "client") if address is not None else None
        # Every task carries it (fade/initializer.py); pickled now, so that an initializer
        # that cannot travel fails here, as the standard pools fail at their start.
        self._setup = b""
        if initializer is not None or max_tasks_per_child is not None:
            self._setup = ser.dumps_setup(
                os.urandom(16), initializer, tuple(initargs), max_tasks_per_child or 0
            )
        self._max_message_size = max_message_size
        self._pool: EmbeddedPool | None = None
        assumed_capacity = 0
        if address is None:
            assumed_capacity = max_workers or os.cpu_count() or 1
            self._pool = EmbeddedPool(
                assumed_capacity,
                heartbeat_interval=heartbeat_interval,
                heartbeat_liveness=heartbeat_liveness,
            )
            address = self._pool.address
        self.address = address
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._ids = itertools.count(1)
        self._code = (
            None
            if ship_code == "off"
            else LocalCode(pinned=ship_code == "pin", max_bytes=ship_code_limit)
        )
        self._io = _ClientIO(
            address,
            heartbeat_interval=heartbeat_interval,
            heartbeat_liveness=heartbeat_liveness,
            max_attempts=max_attempts,
            task_timeout=task_timeout,
            pool=self._pool,
            code=self._code,
            keys=peer_keys,
            max_message_size=max_message_size,
            assumed_capacity=assumed_capacity,
        )
        self._io.thread.start()
        _live_executors.add(self)

    @property
    def _broken(self) -> BaseException | bool:
        """As the standard pools' attribute of that name: what broke this executor, or False."""
        return self._io.broken or False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Schedule ``fn(*args, **kwargs)``. As in the standard pools, a task that cannot
        be sent fails its future instead of raising here: with SerializationError (a
        ``pickle.PicklingError``) if it cannot be pickled, MessageTooLargeError, or
        CodeShippingError. Raises RuntimeError after shutdown, BrokenPoolError once broken."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        broken = self._io.broken
        if broken is not None:
            kind = type(broken) if isinstance(broken, BrokenPoolError) else BrokenPoolError
            raise kind(str(broken)) from broken
        future: cf.Future[T] = _Future(self._io)
        try:
            payload, largest = self._payload(fn, args, kwargs)
        except FadeError as exc:
            future.set_exception(exc)
            return future
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._io.enqueue(_WorkItem(next(self._ids), future, payload, largest))
        return future

    def _payload(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[p.Payload, int]:
        """The task's payload and the size of its largest part; raises FadeError."""
        code = b""
        if self._code is not None:
            code = self._code.version()
            self._code.check_function(fn)
        payload = ser.dumps_call(fn, args, kwargs, code, self._setup)
        largest = p.largest_part(payload)
        if largest > self._max_message_size:
            raise MessageTooLargeError(
                f"the task has a {largest}-byte part, more than max_message_size "
                f"({self._max_message_size}); raise it here, on the broker and on the workers"
            )
        return payload, largest

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
        embedded pool (if any) has stopped."""
        with self._shutdown_lock:
            self._shutdown = True
        io = self._io
        if cancel_futures:
            with io.lock:
                items = [item for item in io.outbox if not item.started]
                running = [item for item in io.outbox if item.started]
                io.outbox.clear()
                io.outbox.extend(running)  # marked running: they run, as in the standard pools
            for item in items:
                item.future.cancel()
        with io.lock:
            io.closing = True
        io.wake()
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


def _address_or_max_workers(
    address: object, max_workers: int | None
) -> tuple[str | None, int | None]:
    """``Executor(4)`` is ``Executor(max_workers=4)``, as ``ThreadPoolExecutor(4)`` is."""
    if address is None or isinstance(address, str):
        return address, max_workers
    if isinstance(address, int) and not isinstance(address, bool):
        if max_workers is not None:
            raise TypeError("Executor() got max_workers both as its first argument and by name")
        return None, address
    raise TypeError(
        "the first argument of Executor() is the broker's address, a string such as "
        f"'tcp://host:port' or 'ipc://path', or max_workers, an int; not {type(address).__name__}"
    )


_live_executors: weakref.WeakSet[Executor] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    # As the standard library does: let submitted work finish when the
    # interpreter exits, and leave no embedded pool behind.
    for executor in list(_live_executors):
        executor.shutdown(wait=True)
