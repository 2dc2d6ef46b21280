"""The latency fast paths: the only code where a thread other than a peer's I/O thread
touches that peer's socket.

Each saves thread wake-ups on a short round trip (a wake-up costs tens of microseconds,
a round trip a few hundred):

* client, **lone submit**: a task submitted when nothing else of this client is out
  or waiting is sent from the caller's thread instead of waking the I/O thread;
* client, **wait here**: a thread blocked in ``result()`` reads the socket itself for
  the first LEAD_TIME of its wait and completes its own future;
* worker, **run where received**: the thread that received a task runs it and sends
  its result; the keeper thread takes the socket only when a task outlasts
  TAKEOVER or waits for code (fade/workerio.py and fade/keeper.py, ``WorkerIO``);
* client and worker, **look before sleeping**: a thread that expects a message within
  microseconds (the waiter in ``result()``; a worker's main thread just after a task)
  checks the socket for up to ``fade.sockets.SPIN`` (0.2 ms), yielding the CPU between
  checks, before it sleeps in a poll: a sleeping thread costs a wake-up when the
  message comes, and on a VM whose idle CPU is halted that wake-up is most of a short
  round trip (embedded pool, 2026-12-01: 255 -> 189 µs median, ProcessPoolExecutor
  195 µs; ``benchmarks/alternating.py``). Never while idle: once per task or wait;
  and never in a process that may use fewer than two CPUs (its affinity or its
  container's quota, ``fade.sockets.usable_cpus``): there the sender needs the CPU
  the looking thread holds, and pinned to one CPU the look made a round trip 253 µs
  instead of 151;
* client, **light futures**: a future's ``_condition`` is a :class:`FutureSignal`,
  one object where a ``threading.Condition`` is eight that the garbage collector
  tracks (its dict, its deque of waiters, five bound methods): 20,000 pending
  futures then cost the collector less than half as much (see FutureSignal).

The invariants, stated once for all of them:

1. A socket is touched only by the thread holding its baton (:func:`baton`). Taking and
   giving a lock is a full memory barrier, which is what ZeroMQ asks of a socket
   that moves between threads.
2. A fast path never waits for the baton: it tries once, and falls back to the
   plain path (the I/O thread) if the baton is taken.
3. A thread that used the socket and gives the baton back checks ZMQ_EVENTS and
   wakes the I/O thread if a message waits: the socket's descriptor signals edges
   only, and the thread's own calls may have consumed the edge the I/O thread
   sleeps on.
4. Done-callbacks never run in a thread that waits in ``result()``: it may hold a
   lock they need. A future with callbacks is completed on the I/O thread.

The switch: ``FADE_FAST_PATHS=0`` in the environment (or ``fast_paths=False`` to
``fade.Executor`` and ``fade.worker.Worker``) turns every fast path off: the client's
I/O thread then sends and reads everything, and a worker's keeper thread holds the
socket at all times while the main thread only runs tasks. The behaviour suite
runs in both modes.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from _thread import allocate_lock
from typing import TYPE_CHECKING, Any

from fade.errors import BrokenPoolError
from fade.sockets import SPIN, has_input, spin_for_input, wait_for_input

if TYPE_CHECKING:
    import concurrent.futures as cf

    from fade.clientio import ClientIO
    from fade.futures import _Future
    from fade.outbox import WorkItem

__all__ = ["LEAD_TIME", "ClientFastPath", "FutureSignal", "baton", "enabled"]

#: Seconds a thread waiting for a result reads the socket itself before it leaves
#: that to the I/O thread (which cannot send or heartbeat meanwhile).
LEAD_TIME = 0.005

Outcome = tuple["cf.Future[Any]", bool, Any]


def enabled(flag: bool | None = None) -> bool:
    """Whether the fast paths are on: ``flag`` if given, else ``$FADE_FAST_PATHS`` != "0"."""
    if flag is not None:
        return flag
    return os.environ.get("FADE_FAST_PATHS", "1") != "0"


def baton() -> threading.RLock:
    """The right to touch a socket (invariant 1). Re-entrant: the I/O thread may break the
    pool from inside a pass."""
    return threading.RLock()


class ClientFastPath:
    """The client's two fast paths, over a :class:`fade.clientio.ClientIO`."""

    def __init__(self, io: ClientIO) -> None:
        self.io = io

    def send_lone(self, item: WorkItem) -> bool:
        """Send a lone task from the caller's thread (the socket is free, no other task of
        ours is out or waiting); False: it must take the plain path."""
        io = self.io
        if not io.baton.acquire(blocking=False):
            return False
        try:
            link = io.link
            limit = link.broker_max_message_size
            if (
                io.outbox
                or not link.welcomed
                or io.broken is not None
                or io.unreachable is not None
                or io.closing
                or io.in_flight  # a burst: batches through the I/O thread cost less
                or not io.capacity
                or (limit and item.largest > limit)
                or not item.future.set_running_or_notify_cancel()
            ):
                return False
            io.window.sending(0, time.monotonic())
            io.in_flight[item.task_id] = item
            link.submit(io.submit_records([item]))
            self._wake_if_input()
            return True
        finally:
            io.baton.release()

    def _wake_if_input(self) -> None:
        """Invariant 3."""
        sock = self.io.link.socket
        if sock is not None and has_input(sock):
            self.io.wake.wake()

    def wait_here(self, future: _Future[Any], deadline: float) -> None:
        """Read the socket in the waiting thread for up to LEAD_TIME, if no one else is
        using it; only this future is completed here, and only if it has no callbacks."""
        io = self.io
        if future.task_id not in io.in_flight or self._sending_due():
            # Its task has not left yet, or others wait with room for them at the broker:
            # only the I/O thread sends, so the socket is its (issue 13, item 0).
            return
        if not io.baton.acquire(blocking=False):
            return
        outcome = None
        try:
            sock = io.link.socket
            if sock is None or io.broken is not None:
                return
            io.sleeper.mute()  # the I/O thread need not wake for what we read here
            try:
                outcome = self._read_until(future, deadline)
            finally:
                # Ask ZMQ_EVENTS last: that resets the descriptor, so that unmuting does
                # not wake the I/O thread for what was read here, and it signals the
                # next message (invariant 3); a message that waits already is the I/O
                # thread's, and it is woken for it.
                pending = io.link.socket is sock and has_input(sock)
                io.sleeper.unmute()
                if io.ready or pending or self._sending_due():
                    io.wake.wake()
        finally:
            io.baton.release()
        if outcome is not None and not future.complete_here(outcome[1], outcome[2]):
            with io.baton:  # a callback came meanwhile: the I/O thread runs it (invariant 4)
                io.ready.append(outcome)
            io.wake.wake()

    def _read_until(self, future: _Future[Any], deadline: float) -> Outcome | None:
        io = self.io
        sock = io.link.socket
        assert sock is not None
        outcome = self._take_outcome(future)
        end = min(deadline, time.monotonic() + LEAD_TIME)
        spin = True  # the reply to a short task is due within microseconds: look first
        # Others' results and room in the window are the I/O thread's to act on: leave it
        # the socket as soon as there are any (the baton is not fair, so it must be left).
        while outcome is None and not io.ready and not self._sending_due():
            if spin:  # then sleep in the poll below as ever (at once if it came)
                spin_for_input(sock, min(SPIN, end - time.monotonic()))
                spin = False
            left = end - time.monotonic()
            if left <= 0 or not wait_for_input(sock, math.ceil(left * 1000)):
                break
            try:
                io.link.read(sock, known=True)
            except Exception as exc:  # as in the I/O thread: the pool is unusable
                io.break_pool(BrokenPoolError(f"the client failed to read: {exc!r}"))
                return None
            if io.link.socket is not sock:
                break  # the link replaced its socket: the I/O thread takes over
            outcome = self._take_outcome(future)
        return outcome

    def _sending_due(self) -> bool:
        """Whether tasks wait in the outbox while the pool has room for them. A waiter that
        reads results makes room; unless it wakes the I/O thread and lets go of the socket,
        those tasks wait for the I/O thread's poll to time out (up to a heartbeat
        interval): 100 tasks of 1 ms took 3-29 s instead of 0.1 s."""
        io = self.io
        return bool(io.outbox) and io.window.size() > len(io.in_flight)

    def _take_outcome(self, future: _Future[Any]) -> Outcome | None:
        if future.has_callbacks:
            return None
        ready = self.io.ready
        for i, outcome in enumerate(ready):
            if outcome[0] is future:
                del ready[i]
                return outcome
        return None


class FutureSignal:
    """What ``concurrent.futures.Future`` uses of its ``_condition`` (a
    ``threading.Condition``): ``with``, ``acquire``/``release`` (``cf.wait`` and
    ``as_completed`` take each future's), ``wait(timeout)`` and ``notify_all()``.

    Why: a Condition is eight objects the garbage collector tracks, and a client
    with 20,000 pending futures spent about 7 µs of every submit in the collector
    (benchmarks/bench.py's submit step). This is one. The waiting is
    ``threading.Condition``'s own: each waiter sleeps on a lock of its own, which
    ``notify_all`` releases; the future's lock is an RLock, fully released while
    its holder waits, as a Condition does with it.
    """

    __slots__ = ("_lock", "_sleepers")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sleepers: list[Any] | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until notified or ``timeout``; the lock is held on entry and on return."""
        sleeper = allocate_lock()
        sleeper.acquire()
        if self._sleepers is None:
            self._sleepers = []
        self._sleepers.append(sleeper)
        saved = self._lock._release_save()  # type: ignore[attr-defined]
        woken = False
        try:
            if timeout is None:
                woken = sleeper.acquire()
            elif timeout > 0:
                woken = sleeper.acquire(True, timeout)
            else:
                woken = sleeper.acquire(False)
            return woken
        finally:
            self._lock._acquire_restore(saved)  # type: ignore[attr-defined]
            if not woken and self._sleepers is not None:
                # Timed out; notify_all (which runs under the lock) may have taken it off.
                with contextlib.suppress(ValueError):
                    self._sleepers.remove(sleeper)

    def notify_all(self) -> None:
        """Wake every waiter (called with the lock held)."""
        sleepers, self._sleepers = self._sleepers, None
        if sleepers:
            for sleeper in sleepers:
                sleeper.release()
