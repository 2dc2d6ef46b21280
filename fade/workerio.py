"""The socket side of a worker process: the broker link, the loop that serves it, the
keeper thread, and the process's SERVING -> DRAINING -> LEAVING lifecycle.

::

    fast paths on (fade/fastpath.py):
      main thread   next_job(): holds the baton, serves the socket until a task is at
                    hand; runs it; its result leaves on the next pass
      keeper        takes the baton once a task has run TAKEOVER or waits for code,
                    serves the socket until that task ends
    fast paths off:
      keeper        holds the baton for good and serves the socket
      main thread   waits on ``jobs`` for a task, runs it, wakes the keeper

Whoever holds the baton runs :meth:`WorkerIO.run_pass`: poll the socket, the wake-up
pipe and the supervisor's control socket; read; send results (one DONE for
everything finished, granting the credits now wanted) and code requests;
heartbeat; check the running task's time limit; move the lifecycle along.

With a broker pair (two addresses), the results sent in the last two expiries are
kept: if the broker dies before passing them on, the HELLO to the one that takes over
lists them as held and the first DONE after its WELCOME sends them again, so their
tasks need not run again (fade/scheduler.py keeps them until the clients re-send).
"""

from __future__ import annotations

import collections
import logging
import os
import platform
import shutil
import signal
import socket
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from fade import fastpath, shm
from fade import protocol as p
from fade import serialization as ser
from fade._version import __version__
from fade.errors import BrokerUnreachableError, FadeError, ProtocolVersionError, TaskTimeoutError
from fade.keeper import Keeper
from fade.lifecycle import PROCESS_MOVES, ProcessState, move
from fade.link import BrokerLink
from fade.sockets import POLLIN, SPIN, has_input, poll, spin_for_input
from fade.supervisor import CONTROL_DRAIN, CONTROL_LEAVE, EXIT_INCOMPATIBLE, encode_serving

if TYPE_CHECKING:
    from fade.worker import Worker

__all__ = ["MAX_PREFETCH", "PREFETCH_HORIZON", "SLOW_TASK", "Fetch", "Job", "WorkerIO"]

log = logging.getLogger("fade.worker")

#: Tasks a worker may hold beyond the one it runs.
MAX_PREFETCH = 64
#: Seconds of queued work a worker tries to keep at hand (at least one task, if faster
#: than SLOW_TASK): it runs while DONE goes to the broker and the next TASK comes back.
PREFETCH_HORIZON = 0.002
#: Seconds a task takes on average from which the worker holds none queued: that round
#: trip is then a small part of a task, and a queued task might run sooner elsewhere.
SLOW_TASK = 0.02
#: Between back-to-back tasks, results wait at most this long to share one DONE.
RESULT_DELAY = 0.001
#: Seconds between the checks no task waits for: the parent process.
CHECK_INTERVAL = 0.1
#: Exit status of a worker that ended itself after a task timed out, or did not stop.
EXIT_TIMEOUT = 75
EXIT_STOPPED = 77
#: Results sent within this many expiries are kept to be sent again after a new WELCOME
#: (a failover, a broker restarted or stalled); at most this many, and this many bytes.
RETAIN_EXPIRIES = 2
RETAIN_MAX = 1024
RETAIN_BYTES = 16 << 20

_EMPTY = p.Payload(b"")

Current = tuple[bytes, float, float]  # the running task: key, started, timeout


@dataclass(slots=True)
class Fetch:
    """A code request from the main thread, answered through the socket holder."""

    request_id: int
    key: bytes  # the task that needs the code
    request: bytes
    answered: threading.Event
    status: p.CodeStatus = p.CodeStatus.MISSING
    frames: list[bytes] | None = None


@dataclass(slots=True)
class Job:
    record: p.TaskRecord
    payload: p.Payload


class WorkerIO:
    """The broker link, its loop, and the baton a thread holds to touch the socket."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.exit_status = 0
        self.state = ProcessState.SERVING
        self.baton = fastpath.baton()
        options = worker.options
        self.link = BrokerLink(
            options.address,
            identity=worker.identity,
            hello=self._hello,
            handlers={
                p.Command.TASK: self._on_task,
                p.Command.DRAIN: self._on_drain,
                p.Command.CODE: self._on_code,
                p.Command.STOP: self._on_stop,
                p.Command.HEARTBEAT: lambda message: None,
            },
            on_welcome=self._on_welcome,
            on_fatal=self._on_fatal,
            on_unreachable=self._on_unreachable,
            log=log,
            keys=worker.keys,
            max_message_size=options.max_message_size,
            interval=options.heartbeat_interval,
            liveness=options.heartbeat_liveness,
            linger_ms=1000,
        )
        self._polled: list[tuple[Any, int]] = []
        self._credits = 0  # credits the broker believes we have unused
        self._drain_acked = False
        self._drain_started = 0.0
        self._last_pass = 0.0
        self._ran = False  # next_job has handed out a task: it then runs just after one
        self._next_check = 0.0
        self._orphaned = False  # our supervisor is gone (its control socket closed)
        self.keeper = Keeper(self)  # the second thread that may hold the socket
        # Results lately sent (when, record, payload, bytes), and whether a broker
        # welcomed us before (after the first WELCOME, every one re-sends them): the
        # other broker of a pair, a restarted one, or one that stalled while we moved to
        # a new connection (what was left unread in the old one is dropped), may not
        # have read them, and without them would run their tasks again.
        self._retained: collections.deque[
            tuple[float, list[tuple[p.DoneRecord, p.Payload]], int]
        ] = collections.deque()
        self._retained_count = 0
        self._retained_bytes = 0
        self._welcomed_before = False

    @property
    def stopped(self) -> bool:
        return self.state is ProcessState.LEAVING

    # -- main thread ------------------------------------------------------------------------

    def connect(self) -> None:
        self._watch(self.link.connect())

    def _watch(self, sock: zmq.Socket[bytes]) -> None:
        """What a pass polls: the socket, the wake-up pipe, the supervisor's control socket
        (a list for the compiled poll: zmq.Poller rebuilds one on every call)."""
        self._polled = [(sock, POLLIN), (self.w.wake.fd, POLLIN)]
        if self.w.control is not None:
            self._polled.append((self.w.control.fileno(), POLLIN))

    def next_job(self) -> Job | None:
        """The next task, marked running; None: leave."""
        if not self.w.fast:
            return self._wait_for_job()
        inbox = self.w._inbox
        spin, self._ran = self._ran, True  # just after a task, the next may be µs away
        with self.baton:
            while not self.stopped:
                # Back-to-back tasks skip the socket for a moment so that their results
                # share one DONE; a lone task's result leaves at once.
                # A drain (or retirement) hands back the inbox before another task starts.
                if (
                    not inbox
                    or self.w._drain_requests
                    or time.monotonic() - self._last_pass >= RESULT_DELAY
                ):
                    self.run_pass(block=not inbox, spin=spin)
                    spin = False
                if inbox and not self.stopped:
                    return self._start(inbox.popleft())
        return None

    def _wait_for_job(self) -> Job | None:
        """Fast paths off: the keeper serves the socket; wait for it to hand us a task."""
        with self.w.jobs:
            # A drain (or retirement) asked for: the keeper hands the inbox back; none of
            # it may start meanwhile.
            while (not self.w._inbox or self.w._drain_requests) and not self.stopped:
                self.w.jobs.wait(CHECK_INTERVAL)
            if self.stopped:
                return None
            job = self.w._inbox.popleft()
        return self._start(job)

    def _start(self, job: Job) -> Job:
        with self.w._lock:
            self.w._current = (job.record.key, time.monotonic(), job.record.timeout)
        keeper = self.keeper
        keeper.last_start = self.w._current[1]
        if keeper.asleep:
            keeper.task_started.set()
        return job

    def stop(self) -> None:
        """End the loop and the keeper, and close the socket (main thread, no task running)."""
        if not self.stopped:
            move(self, ProcessState.LEAVING, PROCESS_MOVES)
        self.keeper.task_started.set()
        self.w.io_wanted.set()
        with self.w.jobs:
            self.w.jobs.notify_all()
        with self.baton:
            self.link.close()

    # -- keeper thread ------------------------------------------------------------------------

    def keep(self) -> None:
        """The keeper thread's body (fade/keeper.py)."""
        self.keeper.run()

    # -- the loop, run by whichever thread holds the baton ---------------------------------------

    def run_pass(self, block: bool, spin: bool = False) -> None:
        """One turn of the loop; never blocks longer than a heartbeat interval. With
        ``spin``, looks for a message a moment before sleeping (fade/fastpath.py)."""
        sock = self.link.socket
        assert sock is not None
        self._flush()  # before a blocking poll: a finished result must not wait
        timeout = self._poll_timeout() if block else 0.0
        if spin and timeout and spin_for_input(sock, min(SPIN, timeout)):
            timeout = 0.0
        events = dict(poll(self._polled, int(timeout * 1000)))
        if self.w.wake.fd in events:
            self.w.wake.clear()
        control = self.w.control
        if control is not None and control.fileno() in events:
            self._read_control(control)
        if sock in events:
            self.link.read(sock, known=True, most=1)
        self._act_on_requests()
        if self.stopped:
            return
        now = time.monotonic()
        if self.w._inbox and self.w._current is not None:
            self._hand_back_if_outlasted(now)
        self._flush()
        self._check_timeout(now)
        self._check_stopping(now)
        self.link.upkeep(now)
        if self.link.socket is not sock and self.link.socket is not None:
            self._watch(self.link.socket)
        self._maybe_leave()
        if now >= self._next_check:
            self._slow_checks(now)
        self._last_pass = now

    def _hand_back_if_outlasted(self, now: float) -> None:
        """Tasks prefetched behind a task that runs far longer than this worker's tasks
        do go back to the broker, which gives them to a free worker (here they would
        wait for it); until it ends, this worker asks for none (Worker.wanted)."""
        due = self.w.hand_back_due()
        if due is None or now < due:
            return
        jobs = self._take_inbox()
        if jobs:
            log.debug("handing back %d tasks queued behind a long task", len(jobs))
            self._outbox_returned(jobs)

    def _read_control(self, control: socket.socket) -> None:
        try:
            data = control.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the supervisor is gone: nobody will replace or drain us
            log.info("the supervisor is gone; leaving now")
            self._orphaned = True
            self.w._drain_requests = 2
        elif CONTROL_LEAVE in data:
            self.w._drain_requests = 2
        elif CONTROL_DRAIN in data:
            self.w._drain_requests = max(self.w._drain_requests, 1)

    def _act_on_requests(self) -> None:
        requests = self.w._drain_requests
        if requests and self.state is ProcessState.SERVING:
            sock = self.link.socket
            while sock is not None and self.link.socket is sock and has_input(sock):
                self.link.read(sock, most=1)  # tasks already here go back in the same DONE
            self._start_drain()
        if requests > 1 and not self.stopped:
            self._leave_now()

    def _maybe_leave(self) -> None:
        if self.state is not ProcessState.DRAINING:
            return
        now = time.monotonic()
        if not self._drain_acked and now - self._drain_started > self.link.expiry:
            # No answer from the broker: it is away. Leave anyway; whatever it still
            # thinks we hold is re-queued when it hears our DISCONNECT or expires us.
            log.warning("no answer to DRAIN for %.1fs; leaving anyway", now - self._drain_started)
            self._drain_acked = True
        if self._drain_acked and self.w.held() == 0:
            if self.w._outbox:
                # Leaving: even a broker that has not welcomed us gets them (it may know
                # the tasks; if not, their clients re-send them).
                self._flush(force=True)
            self.link.send(p.encode(p.Command.DISCONNECT))
            move(self, ProcessState.LEAVING, PROCESS_MOVES)

    def _slow_checks(self, now: float) -> None:
        """What may wait a moment: each costs a system call, too much for every task."""
        self._next_check = now + CHECK_INTERVAL
        if self._parent_gone():
            log.info("parent process is gone; exiting")
            self._clean_up_after_parent()
            _end_own_group()
            os._exit(0)

    def _parent_gone(self) -> bool:
        parent = self.w.options.parent_pid
        return parent is not None and os.getppid() != parent

    def _clean_up_after_parent(self) -> None:
        """The embedded pool's process is gone: nobody else will remove its socket folder,
        or its shared-memory folder (fade/shm.py: its lock is free now)."""
        folder = self.w.options.remove_dir
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            shm.sweep()

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        timeout = self.link.poll_timeout(now)
        current = self.w._current
        if current is not None and current[2] > 0:
            timeout = min(timeout, current[1] + current[2] - now)
        if self.w._inbox:
            hand_back = self.w.hand_back_due()
            if hand_back is not None:
                timeout = min(timeout, hand_back - now)
        stop_deadline = self.w.stop_deadline()
        if stop_deadline is not None:
            timeout = min(timeout, stop_deadline - now)
            resignal = self.w.resignal_due()
            if resignal is not None:
                timeout = min(timeout, resignal - now)
        return max(0.0, timeout)

    # -- the broker link's callbacks -------------------------------------------------------

    def _hello(self) -> p.WorkerHello:
        """(Re-)register; the broker's view of our credits restarts from what we say here."""
        draining = self.state is not ProcessState.SERVING
        self._credits = 0 if draining else max(0, self.w.wanted() - self.w.held())
        options = self.w.options
        return p.WorkerHello(
            host=self.w.host,
            pid=os.getpid(),
            version=__version__,
            python=platform.python_version(),
            implementation=sys.implementation.name,
            credits=self._credits,
            # A TASK still in flight on a socket we replaced is gone: telling the broker
            # what we do hold lets it re-queue the rest instead of waiting forever.
            holding=self._holding(),
            max_message_size=options.max_message_size,
            clients=options.clients,
            resources=options.resources,
            pool=options.pool,
            platform=sysconfig.get_platform(),
            abi=str(sysconfig.get_config_var("SOABI") or ""),
            label=options.label,
        )

    def _holding(self) -> tuple[bytes, ...]:
        """What we owe an answer for, and the results we keep (the newest first)."""
        keys = self.w.holding()
        room = p.MAX_HOLDING - len(keys)
        if room > 0 and self._retained:
            keys += [record.key for record, _ in self._kept()[-room:]]
        return tuple(keys)

    def _on_welcome(self, welcome: p.Welcome) -> None:
        self.w.broker_max_message_size = welcome.max_message_size
        self.w.environments.report_again()
        log.debug("registered with broker %s", welcome.broker_id)
        if self._welcomed_before:
            # It may be the other broker of a pair, or a restarted one: our code requests
            # and the results we sent lately may never have reached their clients.
            self.w.ask_again()
            kept = self._kept()
            for batch in p.chunked(kept, self._batch_limit()):
                self.link.send(p.encode_done(0, batch))
        self._welcomed_before = True
        if self.state is ProcessState.DRAINING:
            self.link.send(p.encode(p.Command.DRAIN))
        if self.w.control is not None:
            # At every registration: the broker (a restarted one, the other of a pair)
            # may use another interval, which our supervisor's vouches must keep up with.
            try:
                self.w.control.send(encode_serving(welcome.heartbeat_interval))
            except OSError:
                pass

    def _on_fatal(self, error: FadeError) -> None:
        log.error("%s", error)
        if isinstance(error, ProtocolVersionError):
            self.exit_status = EXIT_INCOMPATIBLE
        if not self.stopped:
            move(self, ProcessState.LEAVING, PROCESS_MOVES)

    def _on_unreachable(self, error: BrokerUnreachableError | None) -> None:
        pass  # the link logged it; a worker keeps trying for as long as it lives

    def _on_task(self, message: p.Message) -> None:
        tasks = p.decode_task(message.body)
        self._credits = max(0, self._credits - len(tasks))
        if self.state is not ProcessState.SERVING:
            self._outbox_returned([Job(r, f) for r, f in tasks])
            return
        with self.w.jobs:
            self.w._inbox.extend(Job(record, payload) for record, payload in tasks)
            self.w.jobs.notify()

    def _on_drain(self, message: p.Message) -> None:
        p.decode_drain(message.body)
        self._drain_acked = True

    def _on_stop(self, message: p.Message) -> None:
        """Stop what the broker says: drop unstarted tasks (answered as terminated), and
        interrupt the running one (replaced with its process if it does not end)."""
        keys = set(p.decode_stop(message.body))
        with self.w.jobs:
            dropped = [job for job in self.w._inbox if job.record.key in keys]
            for job in dropped:
                self.w._inbox.remove(job)
        error = ser.dumps_exception(self.w.terminated())
        with self.w._lock:
            for job in dropped:
                self.w._outbox.append((p.DoneRecord(job.record.key, p.Status.RAISED), error))
        for key in keys:
            self.w.stop_running(key)

    def _check_stopping(self, now: float) -> None:
        """A task asked to stop that has not ended in time: report it and leave (the
        supervisor starts a fresh process and ends this one's process group)."""
        stopping, deadline = self.w.stopping, self.w.stop_deadline()
        if stopping is None or deadline is None:
            return
        if now < deadline:
            resignal = self.w.resignal_due()
            if resignal is not None and now >= resignal:
                self.w.signal_stop()  # the last one may have come before a blocking call
            return
        with self.w._lock:
            current = self.w._current
            self.w.stopping = None
            if current is None or current[0] != stopping[0]:
                return
            self.w._current = None
            error = ser.dumps_exception(self.w.terminated())
            self.w._outbox.append((p.DoneRecord(current[0], p.Status.RAISED), error))
        log.warning("a task asked to stop did not; replacing this worker process")
        self._outbox_returned(self._take_inbox())
        self._leave(EXIT_STOPPED)

    def _on_code(self, message: p.Message) -> None:
        _, request_id, status, frames = p.decode_code(message.body)
        self.w.answer_fetch(request_id, status, [_frame_bytes(f) for f in frames])

    # -- output ------------------------------------------------------------------------------

    def _flush(self, force: bool = False) -> None:
        """Send every finished result in one DONE, granting the credits we now want.
        Unless ``force``d, only to a broker that has welcomed us: one that has not may be
        the passive broker of a pair, or may not know us yet; meanwhile the results wait
        here, and our HELLO lists them as held."""
        # The lists are looked at before taking the lock, which most passes then skip:
        # whoever appends to them while another thread holds the socket wakes it.
        if not (force or self.link.welcomed):
            return
        w = self.w
        if w._fetch_outbox:
            with w._lock:
                fetches = list(w._fetch_outbox)
                w._fetch_outbox.clear()
            for fetch in fetches:
                self.link.send(p.encode_fetch(fetch.key, fetch.request_id, fetch.request))
        report = w.environments.take_report()
        if report is not None:
            self.link.send(p.encode_environments(report))
        results = []
        if w._outbox:
            with w._lock:
                results = list(w._outbox)
                w._outbox.clear()
        grant = 0
        if self.state is ProcessState.SERVING:
            grant = max(0, w.wanted() - w.held() - self._credits)
        if not results and not grant:
            return
        self._credits += grant
        if results:
            for i, batch in enumerate(p.chunked(results, self._batch_limit())):
                self.link.send(p.encode_done(grant if i == 0 else 0, batch))
            self._keep(results)
        else:
            self.link.send(p.encode_ready(grant))

    def _keep(self, results: list[tuple[p.DoneRecord, p.Payload]]) -> None:
        """Keep results just sent, dropping the oldest past the limits. One entry per
        flush, not per result: this runs after every task (0.7 us per result kept one
        by one, measured; RETURNED ones are skipped when re-sent instead)."""
        now = time.monotonic()
        size = 0
        for _, payload in results:
            size += len(payload.inline)
            if payload.buffers:
                size += sum(p.frame_size(b) for b in payload.buffers)
        kept = self._retained
        kept.append((now, results, size))
        self._retained_count += len(results)
        self._retained_bytes += size
        oldest = now - RETAIN_EXPIRIES * self.link.expiry
        while kept and (
            self._retained_count > RETAIN_MAX
            or self._retained_bytes > RETAIN_BYTES
            or kept[0][0] < oldest
        ):
            _, gone, gone_size = kept.popleft()
            self._retained_count -= len(gone)
            self._retained_bytes -= gone_size

    def _kept(self) -> list[tuple[p.DoneRecord, p.Payload]]:
        """The results kept (oldest first), but those handed back: not outcomes."""
        returned = p.Status.RETURNED
        kept = [result for _, results, _ in self._retained for result in results]
        return [result for result in kept if result[0].status is not returned]

    def _batch_limit(self) -> int:
        limit = self.link.broker_max_message_size
        return min(limit, p.BATCH_BYTES) if limit else p.BATCH_BYTES

    def _take_inbox(self) -> list[Job]:
        with self.w.jobs:
            jobs = list(self.w._inbox)
            self.w._inbox.clear()
        return jobs

    def _outbox_returned(self, jobs: list[Job]) -> None:
        returned = [(p.DoneRecord(j.record.key, p.Status.RETURNED), _EMPTY) for j in jobs]
        with self.w._lock:
            self.w._outbox.extend(returned)

    def _start_drain(self) -> None:
        log.info("draining: handing back unstarted tasks, finishing the running one")
        move(self, ProcessState.DRAINING, PROCESS_MOVES)
        self._drain_started = time.monotonic()
        self._outbox_returned(self._take_inbox())
        self.link.send(p.encode(p.Command.DRAIN))

    def _leave_now(self) -> None:
        """Second request: hand back everything, the running task included, and go."""
        log.warning("leaving now: handing back every task held")
        with self.w._lock:
            current, self.w._current = self.w._current, None
        self._outbox_returned(self._take_inbox())
        if current is not None:
            with self.w._lock:
                self.w._outbox.append((p.DoneRecord(current[0], p.Status.RETURNED), _EMPTY))
        self._leave(0)

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
                f"worker process {os.getpid()} on {self.w.host} was stopped"
            )
            self.w._outbox.append((p.DoneRecord(key, p.Status.RAISED), ser.dumps_exception(error)))
        log.warning("task exceeded its %gs limit; replacing this worker process", limit)
        self._outbox_returned(self._take_inbox())
        self._leave(EXIT_TIMEOUT)

    def _leave(self, status: int) -> None:
        """Send what is owed and DISCONNECT, give them a moment to leave, and end the
        process (the running task may never return)."""
        if self.state is ProcessState.SERVING:
            move(self, ProcessState.DRAINING, PROCESS_MOVES)
        self._flush(force=True)
        self.link.send(p.encode(p.Command.DISCONNECT))
        move(self, ProcessState.LEAVING, PROCESS_MOVES)
        self.link.close(linger_ms=2000)
        if self._orphaned or self._parent_gone():
            self._clean_up_after_parent()
            _end_own_group()  # no supervisor will, and its tasks' processes are in it
        logging.shutdown()
        os._exit(status)


def _end_own_group() -> None:
    """Kill this process's group (this process with it), if it leads one: what its tasks
    started goes too. A supervisor ends the group when a worker leaves; one whose
    supervisor is gone (an embedded pool's client killed, say) ends it itself."""
    if os.getpgid(0) == os.getpid():
        logging.shutdown()
        os.killpg(0, signal.SIGKILL)


def _overdue(current: Current | None, now: float) -> bool:
    """Whether the running task (key, started, timeout) has passed its time limit."""
    return current is not None and current[2] > 0 and now - current[1] >= current[2]


def _frame_bytes(frame: p.Frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)
