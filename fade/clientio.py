"""The client's broker link and the I/O thread that serves it (see fade/client.py).

::

    user threads                        I/O thread                                   broker
    submit(fn, *args) --pickle-->  outbox ---wake pipe--->  SUBMIT (batched) ------->
        `--- fast path: a lone task, sent by the caller (fade/fastpath.py) --------->
    Future <--set_result--------- in_flight{id} <---------- RESULT (batched) <-------
                                                            HEARTBEAT <----------->

* User threads pickle (so a bad argument raises at ``submit``), then append to
  the outbox and poke the wake-up pipe; the I/O thread sends what waits there in
  batches, never more than the pool's *capacity* (as the broker reports it) at
  the broker: the rest wait here, still PENDING, so ``cancel()`` on them succeeds.
* The socket is touched only by the thread holding ``baton``; the I/O thread
  never holds it while it sleeps (on the socket's descriptor and the pipe).
* Futures are completed after the I/O thread has let go of the socket, so a
  done-callback may submit at once.
* After every WELCOME (a first connection, a broker restart, a reconnection) the
  client re-sends every task that has no result yet; the broker skips ids it
  holds and a second result for an id is dropped here: each future completes
  exactly once.
* A broker that cannot be reached (never answered within ``connect_timeout``, or
  silent for ``reconnect_timeout``) fails every pending future with
  BrokerUnreachableError naming the address and the likely cause; while it stays
  unreachable, new tasks fail the same way at once.

What this module decides is *when*; the *what* lives apart, with no socket or thread:
the outbox and SUBMIT packing (fade/outbox.py), what a RESULT means
(fade/outcomes.py), the answers to FETCH (fade/clientfetch.py), the settings
(fade/clientoptions.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import platform
import socket
import sys
import sysconfig
import threading
import time
from typing import Any, TypeVar, cast

import zmq

from fade import fastpath, security
from fade import protocol as p
from fade._logutil import RateLimitedLog, printable
from fade._version import __version__
from fade.clientfetch import answer
from fade.clientoptions import ClientSettings
from fade.data import DataShelf
from fade.embedded import EmbeddedPool
from fade.errors import (
    BrokenPoolError,
    BrokerUnreachableError,
    InitializerError,
    MessageTooLargeError,
    TaskTerminatedError,
)
from fade.initializer import report_failure
from fade.link import BrokerLink
from fade.locallink import LocalLink
from fade.outbox import MAX_BATCH, Outbox, WorkItem, batches, submit_record
from fade.outcomes import Outcome, deliver, outcome
from fade.packages import InstalledPackages
from fade.shipping import LocalCode
from fade.shm import SWEEP_INTERVAL, ClientSegments
from fade.sockets import has_input
from fade.wakeup import Sleeper, WakePipe
from fade.window import Window

__all__ = ["ClientIO"]

log = logging.getLogger("fade.client")

T = TypeVar("T")

#: Seconds between checks that the embedded pool's processes are alive.
POOL_CHECK_INTERVAL = 0.1
#: The outbox is swept of cancelled tasks once they may be 1/SWEEP_SHARE of it.
SWEEP_SHARE = 4
#: Tasks whose latest NOTICE the client keeps, to say why a result() timed out.
NOTED = 10_000
#: Seconds tasks may wait on a pool with no worker before the client says so (once, until
#: workers come): a result() or map without a timeout would otherwise wait in silence.
NO_WORKERS_WARNING = 10.0
_CANCELLED = cf._base.CANCELLED
_CANCELLED_AND_NOTIFIED = cf._base.CANCELLED_AND_NOTIFIED


class ClientIO:
    """The broker link, the I/O thread that serves it, and what waits to go or come back."""

    def __init__(
        self,
        address: str,
        settings: ClientSettings,
        *,
        pool: EmbeddedPool | None,
        code: LocalCode | None,
        keys: security.PeerKeys | None = None,
        packages: InstalledPackages | None = None,
        assumed_capacity: int = 0,
        shelf: DataShelf | None = None,
        segments: ClientSegments | None = None,
    ) -> None:
        self.max_message_size = settings.max_message_size
        self.segments = segments  # large buffers through shared memory (fade/shm.py)
        self._next_sweep = 0.0
        self.assumed_capacity = assumed_capacity  # until the broker says: see enqueue()
        self._started = 0  # tasks in the outbox marked running, guarded by lock
        self._cancelled: list[cf.Future[Any]] = []  # since the last pass: waiters to tell
        self._unswept = 0  # cancelled tasks maybe still in the outbox
        self.shelf = shelf
        self.max_attempts = settings.max_attempts
        self.timeout = settings.task_timeout or 0.0
        self.pool = pool
        self.owner = os.getpid()  # a forked child has a copy of this, none of its threads
        self.code = code
        self.packages = packages
        self.tag = os.urandom(p.TAG_SIZE)
        self.lock = threading.Lock()  # guards outbox, closing, _woken
        self.outbox = Outbox()
        self.baton = fastpath.baton()  # the socket, in_flight and ready (fade/fastpath.py)
        self.in_flight: dict[int, WorkItem] = {}
        self.terminations: list[int] = []  # task ids to stop, guarded by lock
        self.ready: list[Outcome] = []  # results to deliver, outside the baton
        self.closing = False
        self.broken: BaseException | None = None
        self.unreachable: BrokerUnreachableError | None = None
        self.window = Window()  # how many tasks may be at the broker (fade/window.py)
        #: Results that came for a task already complete here (each future completes
        #: once regardless); the broker is meant to send none, and tests check it.
        self.late_results = 0
        self._woken = False
        #: The backlog (tasks in the outbox) the broker was last told of, and when.
        self._told_backlog = 0
        self._backlog_at = 0.0
        self.wake = WakePipe()
        self.sleeper = Sleeper(self.wake.fd)
        self.link = self._make_link(address, keys, settings)
        self.fast = fastpath.ClientFastPath(self) if fastpath.enabled(settings.fast_paths) else None
        self._notices = RateLimitedLog(log, burst=5, period=60.0)
        #: The broker's latest word on a waiting task (why it cannot be placed), by task
        #: id, for a result() that times out; the oldest go first past NOTED.
        self._noted: dict[int, tuple[float, str]] = {}
        self._next_pool_check = 0.0
        #: Since when tasks have waited with no worker connected (None: they do not), and
        #: whether the client said so.
        self._workerless_since: float | None = None
        self._said_workerless = False
        self.thread = threading.Thread(target=self._run, name="fade-client-io", daemon=True)

    def _make_link(
        self, address: str, keys: security.PeerKeys | None, settings: ClientSettings
    ) -> BrokerLink | LocalLink:
        """The link to the broker: through a socket, or, for the embedded pool, to the
        broker object this process drives itself (fade/locallink.py)."""
        common = {
            "identity": security.peer_identity(b"C", keys),
            "hello": self._hello,
            "handlers": {
                p.Command.RESULT: self._on_result,
                p.Command.HEARTBEAT: self._on_heartbeat,
                p.Command.FETCH: self._on_fetch,
                p.Command.NOTICE: self._on_notice,
            },
            "on_welcome": self._on_welcome,
            "on_fatal": self.break_pool,
            "on_unreachable": self._on_unreachable,
            "on_socket": self._on_socket,
            "log": log,
        }
        if self.pool is not None:
            return LocalLink(self.pool.broker, on_results=self._take_results, **common)  # type: ignore[arg-type]
        return BrokerLink(
            address,
            keys=keys,
            max_message_size=self.max_message_size,
            interval=settings.heartbeat_interval,
            liveness=settings.heartbeat_liveness,
            connect_timeout=settings.connect_timeout,
            reconnect_timeout=settings.reconnect_timeout,
            **common,  # type: ignore[arg-type]
        )

    # -- called from user threads -----------------------------------------------------

    def enqueue(self, item: WorkItem) -> None:
        if self.fast is not None and not self.outbox and self.fast.send_lone(item):
            return
        with self.lock:
            self._start_early(item)
            self.outbox.append(item)
            wake = not self._woken
            self._woken = True
        if wake:
            self.wake.wake()

    def terminate(self, item_id: int, future: cf.Future[Any]) -> bool:
        """Stop a task: one still waiting here fails at once; one at the broker is asked to
        stop there. False if it is done already."""
        if future.done():
            return False
        with self.lock:
            item = next((i for i in self.outbox if i.task_id == item_id), None)
            if item is not None:
                self.outbox.remove(item)
                self._started -= item.started
            else:
                self.terminations.append(item_id)
        if item is not None:
            self.fail(item, TaskTerminatedError("the task was terminated before it was sent"))
        else:
            self.wake.wake()
        return True

    def why_waiting(self, timeout: float | None, task_id: int = 0) -> str:
        """For a result() that timed out: what the task is waiting for, as far as we know."""
        link = self.link
        if not link.reached:
            waited = f"after {timeout:g}s" if timeout is not None else "yet"
            return f"no answer yet from the broker at {link.address} {waited}: {link.cause()}"
        if link.welcomed and not self.capacity:
            return self._no_workers()
        noted = self._noted.get(task_id)
        if noted is not None:  # it may have started since: say when the broker said it
            said, text = noted
            ago = time.monotonic() - said
            return (
                f"the task did not finish within {timeout:g}s; the broker said {ago:.0f}s "
                f"ago: {text}"
            )
        return f"the task did not finish within {timeout:g}s (broker {link.address})"

    def _no_workers(self) -> str:
        if self.pool is not None:
            return "the embedded pool's worker processes have not connected yet"
        address = self.link.address
        return (
            f"no worker is connected to the broker at {address}: tasks wait until one is "
            f"(start one: fade-worker {address}, with --keys for a pool that uses keys)"
        )

    def _say_if_workerless(self, now: float) -> None:
        """Say once, after NO_WORKERS_WARNING seconds, that tasks wait on a pool with no
        worker; again only after workers came and went."""
        if self.capacity:  # workers came: say it again the next time there are none
            self._workerless_since, self._said_workerless = None, False
            return
        waiting = len(self.outbox) + len(self.in_flight)
        if not waiting or not self.link.welcomed:  # nothing waits, or for the broker
            self._workerless_since = None
        elif self._workerless_since is None:
            self._workerless_since = now
        elif not self._said_workerless and now - self._workerless_since >= NO_WORKERS_WARNING:
            self._said_workerless = True
            log.warning(
                "%d tasks have waited %.0fs: %s",
                waiting,
                now - self._workerless_since,
                self._no_workers(),
            )

    def _start_early(self, item: WorkItem) -> None:
        """(Holding ``lock``.) As in the standard pools, the first tasks count as running as
        soon as they are submitted, so ``shutdown(cancel_futures=True)`` lets them run: as
        many as the pool's capacity (the embedded pool's workers, until the broker says)
        less those already out. Running tasks cannot be cancelled; the rest can."""
        capacity = self.capacity or self.assumed_capacity
        if self._started + len(self.in_flight) < capacity:
            item.started = item.future.set_running_or_notify_cancel()
            self._started += item.started

    def close_soon(self) -> None:
        with self.lock:
            self.closing = True
        self.wake.wake()

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with self.baton:
                self.link.connect()
            woken = False
            while True:
                with self.baton:
                    self._take_input(woken)
                    ready = self._take_ready()
                deliver(ready)  # before the upkeep: a caller is waiting for these
                with self.baton:
                    self._upkeep()
                    finished = self._finished()
                    if finished and self.link.socket is not None:
                        self.link.send(p.encode(p.Command.DISCONNECT))
                    timeout = self._poll_timeout()
                    ready = self._take_ready()
                deliver(ready)
                if finished:
                    self._serve_until_workers_leave()
                    break
                woken = self.sleeper.sleep(timeout)  # not holding the socket
        except BaseException as exc:
            log.exception("the client I/O thread failed")
            self.break_pool(BrokenPoolError(f"the client's I/O thread failed: {exc!r}"))
        finally:
            with self.baton:
                deliver(self._take_ready())
                self.link.close(linger_ms=200)
            self.sleeper.close()
            self.wake.close()
            if self.segments is not None:
                self.segments.close()

    def _serve_until_workers_leave(self) -> None:
        """The embedded pool's broker lives in this thread: keep serving it while its
        workers drain and leave (they wait for its answer), within the pool's deadline."""
        pool = self.pool
        if pool is None:
            return
        pool.begin_stop()
        while not pool.stopped():
            with self.baton:
                sock = self.link.socket
                if sock is not None:
                    self.link.read(sock)
                self.link.upkeep(time.monotonic())
            self.sleeper.sleep(0.05)

    def _finished(self) -> bool:
        if self.broken is not None:
            return True
        with self.lock:
            return self.closing and not self.outbox and not self.in_flight

    def _take_ready(self) -> list[Outcome]:
        ready, self.ready = self.ready, []
        return ready

    def _take_input(self, woken: bool) -> None:
        """Read what the broker sent (holding the socket); never blocks."""
        if woken:
            # Empty the pipe *before* clearing the flag: a submit that comes after the
            # flag is cleared writes a fresh byte, and one that came before is already
            # in the outbox, which _send_tasks reads below.
            self.wake.clear()
            with self.lock:
                self._woken = False
        sock = self.link.socket
        if sock is not None:
            self.link.read(sock)

    def note_cancelled(self, future: cf.Future[Any]) -> None:
        """A future was cancelled (any thread): its waiters are told (``wait`` and
        ``as_completed`` count it done) and its task leaves the outbox soon, so that it
        neither holds up shutdown nor counts as work for a scaler."""
        with self.lock:
            self._cancelled.append(future)
        self.wake.wake()

    def settle_cancelled(self) -> None:
        """(Any thread.) Tell the waiters of futures cancelled since the last call, and
        sweep the outbox of their tasks when they are a good share of it."""
        if not self._cancelled:
            return
        with self.lock:
            cancelled, self._cancelled = self._cancelled, []
            for future in cancelled:
                _notify_cancelled(future)
            # Each sweep reads the whole outbox: sweep once the cancels since the last one
            # are a good share of it (cancelling 100,000 queued futures one by one, a
            # sweep per cancel took 30 s). _take skips any left over.
            self._unswept += len(cancelled)
            if self._unswept * SWEEP_SHARE < len(self.outbox):
                return
            self._unswept = 0
            dropped = self.outbox.drop(_cancelled_item)
            self._started -= sum(item.started for item in dropped)

    def _upkeep(self) -> None:
        """Send what waits, heartbeat, reconnect (holding the socket); never blocks."""
        self.settle_cancelled()
        self._send_tasks()
        now = time.monotonic()
        self._report_backlog(now)
        self._say_if_workerless(now)
        self.link.upkeep(now)
        if self.pool is not None and now >= self._next_pool_check:
            self._next_pool_check = now + POOL_CHECK_INTERVAL  # it asks the OS: not every pass
            problem = self.pool.problem()
            if problem is not None:
                self.break_pool(BrokenPoolError(problem))
        if self.segments is not None and now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self.segments.sweep(self.in_flight)

    def _report_backlog(self, now: float) -> None:
        """Tell the broker how many tasks wait here for room there, so that a scaler
        (fade/scale) sees the work a pool without workers cannot take: at once when a
        backlog starts or ends, otherwise at most once per heartbeat interval. The
        report is a HEARTBEAT, so it also serves as one."""
        if not self.link.welcomed:
            return
        with self.lock:
            backlog = len(self.outbox)
        told = self._told_backlog
        if backlog == told or (backlog and told and now - self._backlog_at < self.link.interval):
            return
        self.link.send(p.encode_backlog(backlog))
        self._told_backlog, self._backlog_at = backlog, now

    def _poll_timeout(self) -> float:
        sock = self.link.socket
        if sock is not None and has_input(sock):
            return 0.0  # our own sends may have consumed the descriptor's edge
        return self.link.poll_timeout(time.monotonic())

    def _on_socket(self, sock: zmq.Socket[bytes] | None) -> None:
        if sock is None:
            self.sleeper.forget()
        else:
            self.sleeper.watch(cast(int, sock.getsockopt(zmq.FD)))

    # -- from the broker ---------------------------------------------------------------

    def _hello(self) -> p.ClientHello:
        return p.ClientHello(
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            python=platform.python_version(),
            implementation=sys.implementation.name,
            tag=self.tag,
            max_message_size=self.max_message_size,
            platform=sysconfig.get_platform(),
            abi=str(sysconfig.get_config_var("SOABI") or ""),
        )

    @property
    def capacity(self) -> int:
        """The pool's capacity, as the broker last reported it."""
        return self.window.capacity

    @capacity.setter
    def capacity(self, capacity: int) -> None:
        self.window.capacity = capacity

    def _on_welcome(self, welcome: p.Welcome) -> None:
        self.capacity = welcome.capacity
        self.window.quota = welcome.max_client_tasks
        self._told_backlog = 0  # a broker that (re)welcomes us knows of no backlog
        if not self.in_flight:
            return
        # Whatever the broker had of ours may be gone: send it all again. It skips ids
        # it still holds.
        log.info(
            "re-sending %d unfinished tasks to broker %s", len(self.in_flight), welcome.broker_id
        )
        in_order = sorted(self.in_flight.values(), key=lambda item: item.task_id)
        for batch in batches(in_order, self._batch_bytes()):
            self.link.submit(self.submit_records(batch))

    def _on_result(self, message: p.Message) -> None:
        self._take_results(*p.decode_result(message.body))

    def _take_results(self, capacity: int, results: list[tuple[p.ResultRecord, p.Payload]]) -> None:
        self.capacity = capacity
        self.window.results(len(results), time.monotonic())
        for record, payload in results:
            self._complete(record, payload)

    def _on_heartbeat(self, message: p.Message) -> None:
        announced = p.decode_capacity(message.body)
        if announced is not None:
            self.capacity = announced

    def _on_fetch(self, message: p.Message) -> None:
        """A worker asks for our code, our installed packages, data a task names by
        content, or shared memory (fade/clientfetch.py)."""
        ref, request_id, frame = p.decode_fetch(message.body)
        status, frames = answer(
            p.unpack_request(frame),
            code=self.code,
            packages=self.packages,
            shelf=self.shelf,
            segments=self.segments,
            pending=self.in_flight,
        )
        limit = self.link.broker_max_message_size
        largest = max((len(frame) for frame in frames), default=0)
        if limit and largest + p.HEAD_ROOM > limit:
            # The broker would drop our connection for it, and the worker wait for ever.
            status, frames = (
                p.CodeStatus.MISSING,
                [
                    f"the answer has a {largest}-byte part, over the broker's frame limit of "
                    f"{limit} bytes (its --max-message-size): raise the limit on the broker and "
                    "the workers, or install what is shipped on the workers".encode()
                ],
            )
        self.link.send(p.encode_code(ref, request_id, status, frames))

    def _on_notice(self, message: p.Message) -> None:
        text, task_ids = p.decode_notice(message.body)
        text = printable(text, limit=1000)
        self._notices.warning("the broker says, of %d tasks: %s", len(task_ids), text)
        noted, now = self._noted, time.monotonic()
        for task_id in task_ids:
            noted.pop(task_id, None)  # re-inserted: the newest last
            noted[task_id] = (now, text)
        while len(noted) > NOTED:
            del noted[next(iter(noted))]

    def _on_unreachable(self, error: BrokerUnreachableError | None) -> None:
        self.unreachable = error
        if error is None:
            return
        with self.lock:
            items = [*self.outbox, *self.in_flight.values()]
            self.outbox.clear()
            self._started = 0
        self.in_flight.clear()
        for item in items:
            self.fail(item, error)

    def _complete(self, record: p.ResultRecord, payload: p.Payload) -> None:
        item = self.in_flight.pop(record.task_id, None)
        if item is None:
            self.late_results += 1  # a duplicate: this future already has its result
            return
        segments = self.segments
        take = None
        if segments is not None and payload.inline[:1] == b"S":  # some in shared memory
            take = segments.taker(record.task_id)
        ok, value = outcome(record.status, payload, take)
        if segments is not None:
            segments.done(record.task_id)
        self.ready.append((item.future, ok, value))
        if isinstance(value, InitializerError):
            # As in the standard pools, a failed initializer breaks the executor.
            if self.broken is None:
                report_failure(value)
            self.break_pool(value)

    # -- to the broker -----------------------------------------------------------------

    def _send_terminations(self) -> None:
        if not self.terminations or not self.link.welcomed:
            return
        with self.lock:
            ids, self.terminations = self.terminations, []
        ids = [i for i in ids if i in self.in_flight]
        if ids:
            self.link.send(p.encode_terminate(ids))

    def _send_tasks(self) -> None:
        """Move tasks from the outbox to the broker while the pool has room for them."""
        self._send_terminations()
        if not self.outbox:
            return
        if self.unreachable is not None:
            self._on_unreachable(self.unreachable)
            return
        if not self.link.welcomed:
            return
        while True:
            room = min(MAX_BATCH, self.window.size() - len(self.in_flight))
            urgent = False
            if room <= 0:
                # A task of raised priority may go beyond the window (by up to the
                # capacity): at the broker it overtakes this client's queued tasks, which
                # it could not from here.
                room = min(MAX_BATCH, self.window.size() + self.capacity - len(self.in_flight))
                urgent = True
                if room <= 0 or not self.outbox or self.outbox.peek().options.priority <= 0:
                    return
            batch = self._refuse_oversized(self._take(room, urgent))
            if not batch:
                return
            self.link.submit(self.submit_records(batch))

    def _refuse_oversized(self, batch: list[WorkItem]) -> list[WorkItem]:
        """Fail the tasks the broker would not accept: it would drop our connection."""
        limit = self.link.broker_max_message_size
        if not limit or all(item.largest <= limit for item in batch):
            return batch
        kept = []
        for item in batch:
            if item.largest <= limit:
                kept.append(item)
                continue
            del self.in_flight[item.task_id]
            error = MessageTooLargeError(
                f"the task has a {item.largest}-byte frame; the broker accepts at most "
                f"{limit} (its --max-message-size)"
            )
            self.fail(item, error)
        return kept

    def _take(self, room: int, urgent: bool = False) -> list[WorkItem]:
        """Up to ``room`` tasks from the outbox whose inline data fits in one frame
        (``urgent``: only tasks of raised priority)."""
        batch: list[WorkItem] = []
        size = 0
        with self.lock:
            while self.outbox and len(batch) < room:
                head = self.outbox.peek()
                inline = len(head.payload.inline) + p.HEAD_ROOM
                if (batch and size + inline > self._batch_bytes()) or (
                    urgent and head.options.priority <= 0
                ):
                    break
                item = self.outbox.popleft()
                if item.started:
                    self._started -= 1
                if item.started or _start_unless_cancelled(item.future):
                    batch.append(item)
                    size += inline
        if batch:
            self.window.sending(len(self.in_flight), time.monotonic())
        for item in batch:
            self.in_flight[item.task_id] = item
        return batch

    def _batch_bytes(self) -> int:
        """The most bytes a SUBMIT's first frame may carry (each task's inline bytes plus
        p.HEAD_ROOM): every peer's frame limit applies to that one frame, not to each task."""
        limits = [self.max_message_size, p.BATCH_BYTES]
        if self.link.broker_max_message_size:
            limits.append(self.link.broker_max_message_size)
        return min(limits)

    def submit_records(self, items: list[WorkItem]) -> list[tuple[p.SubmitRecord, p.Payload]]:
        return [
            (submit_record(item, self.max_attempts, self.timeout), item.payload) for item in items
        ]

    # -- failure ---------------------------------------------------------------------

    def break_pool(self, error: BaseException) -> None:
        """The pool is unusable: fail every future that is not done."""
        if self.broken is not None:
            return
        with self.baton, self.lock:
            self.broken = error
            items = [*self.outbox, *self.in_flight.values()]
            self.outbox.clear()
            self._started = 0
            self.in_flight.clear()
        for item in items:
            self.fail(item, error)

    def fail(self, item: WorkItem, error: BaseException) -> None:
        future = item.future
        if future.done():
            return  # finished, or cancelled (settle_cancelled tells its waiters)
        with self.lock:
            started = future.running() or _start_unless_cancelled(future)
        if started:
            with contextlib.suppress(cf.InvalidStateError):
                future.set_exception(error)  # unless its result came meanwhile


def _cancelled_item(item: WorkItem) -> bool:
    return item.future.cancelled()


# (Holding ClientIO.lock, as every call that moves a future the caller may have
# cancelled out of PENDING or CANCELLED does: set_running_or_notify_cancel may be called
# once only, and a second call logs a CRITICAL and raises.)


def _notify_cancelled(future: cf.Future[Any]) -> None:
    """Tell a cancelled future's waiters, unless they were told."""
    if future._state == _CANCELLED:
        future.set_running_or_notify_cancel()


def _start_unless_cancelled(future: cf.Future[Any]) -> bool:
    """Mark a future running; False if it was cancelled (its waiters told, once)."""
    if future._state == _CANCELLED_AND_NOTIFIED:
        return False
    return future.set_running_or_notify_cancel()
