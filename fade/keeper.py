"""The keeper thread of a worker process: it takes the socket while a task runs long.

::

    fast paths on (fade/fastpath.py):
      main thread   WorkerIO.next_job marks a task running (last_start; wakes a sleeping
                    keeper), runs it
      Keeper.run    waits TAKEOVER into the task (at once if it waits for code:
                    io_wanted), then holds the baton and runs WorkerIO.run_pass until
                    that task ends; idle for KEEPER_NAP, it sleeps until a task starts
    fast paths off:
      Keeper.run    holds the baton for good and serves the socket

Separate from fade/workerio.py, which owns the socket and the loop that serves it:
this module is only *when* the second thread takes the baton, and how it waits
without spinning, written once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fade.workerio import Current, WorkerIO

__all__ = ["KEEPER_NAP", "TAKEOVER", "Keeper"]

log = logging.getLogger("fade.worker")

#: Seconds a task runs before the keeper thread takes the socket to heartbeat for it.
TAKEOVER = 0.01
#: Seconds without a task after which the keeper stops checking and sleeps until woken.
KEEPER_NAP = 1.0


class Keeper:
    """The keeper thread's waits; WorkerIO starts it and marks each task's start."""

    def __init__(self, io: WorkerIO) -> None:
        self.io = io
        self.w = io.w
        self.last_start = 0.0  # when the main thread last started a task
        self.asleep = False
        self.task_started = threading.Event()  # wakes a sleeping keeper

    def run(self) -> None:
        """Fast paths on: hold the socket for every task that outlasts TAKEOVER or waits
        for code. Off: hold it for good."""
        io = self.io
        try:
            if not io.w.fast:
                with io.baton:
                    while not io.stopped:
                        io.run_pass(block=True)
                return
            while not io.stopped:
                task = self._wait_for_a_long_task()
                if task is not None:
                    self._hold_socket_during(task)
        except Exception:
            log.exception("worker keeper thread failed")
            os._exit(1)  # a running task would go on without heartbeats: leave instead

    def _wait_for_a_long_task(self) -> Current | None:
        """The running task once it has run TAKEOVER (at once if it waits for code)."""
        w = self.w
        current = w._current
        if current is None:
            if time.monotonic() - self.last_start < KEEPER_NAP:
                if w.io_wanted.wait(TAKEOVER) and w._current is None:
                    # Only a running task sets the flag. Its task is over, so it was
                    # served while this thread held the socket (a second code fetch,
                    # say): left set, it would end every wait at once, and this thread
                    # would spin, taking the GIL from the main thread.
                    w.io_wanted.clear()
                return None
            # Idle for a while: sleep until the main thread starts a task. The flag is
            # set before _current is read again, so a task started in between is seen.
            self.asleep = True
            if w._current is None:
                self.task_started.wait()
            self.asleep = False
            self.task_started.clear()
            return None
        takeover = min(TAKEOVER, current[2]) if current[2] > 0 else TAKEOVER
        wait = current[1] + takeover - time.monotonic()
        if wait > 0 and w.io_wanted.wait(wait) is False:
            return None
        w.io_wanted.clear()
        return current

    def _hold_socket_during(self, task: Current) -> None:
        io, w = self.io, self.w
        with io.baton:
            with w._lock:
                if w._current is not task:
                    return
                w._keeper_busy = True
            try:
                while not io.stopped:
                    io.run_pass(block=True)
                    with w._lock:
                        if w._current is not task:
                            return
            finally:
                with w._lock:
                    w._keeper_busy = False
