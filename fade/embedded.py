"""The embedded pool behind ``fade.Executor()``: N worker processes around a broker that
lives in this process.

::

    this process: fade.Executor ── I/O thread ── LocalLink ── Broker (ROUTER, ipc://<tmpdir>/broker)
       |                                                          ^
       +-- thread "fade-embedded-supervisor": a Supervisor        |  DEALER each
           --spawn--> fade.worker --child --parent-pid <us>  (x N) ┘

* The broker is the same :class:`fade.broker.Broker` (scheduler, heartbeats, re-runs,
  suspects, poison limits) driven by the client's I/O thread (fade/locallink.py): no
  broker process to start, and no hop between client and broker.
* The workers are this process's own children, started before the client imports
  ZeroMQ (fade/launch.py; they connect before the broker binds: ZeroMQ retries), each
  in its own session and process group, each watching our pid: if this process dies,
  even by SIGKILL, they exit within a heartbeat interval, and remove the socket's folder.
* Only the process that started a pool stops it: a forked child that exits (and runs
  its atexit handlers) leaves its parent's pool alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time

import zmq

from fade.broker import Broker
from fade.launch import EmbeddedStart
from fade.supervisor import Supervisor

__all__ = ["EmbeddedPool"]

log = logging.getLogger("fade.embedded")

#: Seconds the workers get to drain and leave when the pool stops.
STOP_TIMEOUT = 10.0


class EmbeddedPool:
    """Supervise the workers an :class:`~fade.launch.EmbeddedStart` started; the client
    binds the broker; :meth:`stop` ends them and removes the socket's folder."""

    def __init__(self, start: EmbeddedStart) -> None:
        self._owner = start.owner
        self._dir = start.dir
        self.address = start.address
        options = start.options
        _log_like_the_workers()
        self._supervisor = Supervisor(options, env=start.env)
        context = zmq.Context()
        try:
            # The others start once a first one serves: on a machine with few CPUs they
            # would take them from it and from this client, on the way to the first result.
            self._supervisor.start(start.children, stagger=True)
            #: The broker, unbound: the client's I/O thread binds and drives it.
            self.broker = Broker(
                self.address,
                heartbeat_interval=options.heartbeat_interval,
                heartbeat_liveness=options.heartbeat_liveness,
                context=context,
                own_context=True,
            )
        except BaseException:
            # destroy, not term: term waits for sockets a half-made broker left open.
            context.destroy(linger=0)
            self._supervisor.close()  # ends the workers (the caller removes the folder)
            raise
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, name="fade-embedded-supervisor", daemon=True
        )
        self._thread.start()

    def _supervise(self) -> None:
        """Replace dead workers until told to stop; then drain them, within a deadline."""
        supervisor = self._supervisor
        try:
            while not self._stopping.wait(0.05):
                supervisor.tick()
            supervisor.stop()
            deadline = time.monotonic() + STOP_TIMEOUT
            while supervisor.tick() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            supervisor.close()

    def problem(self) -> str | None:
        """Why the pool cannot work, if part of it has died; None if it is fine."""
        if self._stopping.is_set():
            return None
        if not self._thread.is_alive():
            return "the embedded pool's supervisor thread has stopped"
        failing = self._supervisor.cannot_start()
        if failing is not None:
            # Replacing them on would keep every future waiting, for ever.
            return f"the embedded pool's worker processes cannot start: {failing}"
        return None

    def begin_stop(self) -> None:
        """Ask the workers to drain and leave (the broker must still be served meanwhile:
        the client's I/O thread does that until :meth:`stopped`)."""
        if os.getpid() == self._owner:
            self._stopping.set()

    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Drain the workers and wait for them (killing after a deadline); remove the
        socket's folder. Does nothing in a process other than the one that started it."""
        if os.getpid() != self._owner:
            return
        self._stopping.set()
        self._thread.join()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return self._supervisor.pids


def _log_like_the_workers() -> None:
    """The supervisor thread logs in this process: with the format of the pool's other
    processes, unless the program configured logging itself."""
    logger = logging.getLogger("fade.supervisor")
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s fade-embedded[{os.getpid()}@{socket.gethostname()}] "
            "%(levelname)s %(message)s"
        )
    )
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("FADE_LOG_LEVEL", "WARNING").upper())
