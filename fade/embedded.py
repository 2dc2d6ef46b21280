"""The embedded pool behind ``fade.Executor()``: a broker and N workers, supervised here.

::

    this process --spawn--> fade.broker  ipc://<tmpdir>/broker --parent-pid <us>
       |         --spawn--> fade.worker  ipc://<tmpdir>/broker --child --parent-pid <us>  (x N)
       +-- thread "fade-embedded-supervisor": a fade.supervisor.Supervisor that replaces
           dead workers and reports them to the broker, as ``fade-worker --processes N``

The workers are this process's own children (no supervisor process between):
one Python start-up less before the first result. Every child is in its own
session (a terminal's Ctrl-C is ours to handle) and watches our pid: if this
process dies, even by SIGKILL, they exit within a heartbeat interval, and the
broker removes the socket's folder.

Only the process that started a pool stops it: a forked child that exits (and
runs its atexit handlers) leaves its parent's pool alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from fade.options import WorkerOptions
from fade.security import KEYS_ENV

__all__ = ["EmbeddedPool"]

log = logging.getLogger("fade.embedded")

STOP_TIMEOUT = 10.0


class EmbeddedPool:
    """Start the processes at once; :meth:`stop` ends them and removes the socket file."""

    def __init__(
        self, max_workers: int, *, heartbeat_interval: float, heartbeat_liveness: int
    ) -> None:
        self._owner = os.getpid()
        self._dir = tempfile.mkdtemp(prefix="fade-")
        # ipc: no port to pick or race for, and the workers may connect before the
        # broker has bound (ZeroMQ retries), so both start in parallel.
        self.address = f"ipc://{self._dir}/broker"
        timing = [
            "--heartbeat-interval",
            str(heartbeat_interval),
            "--heartbeat-liveness",
            str(heartbeat_liveness),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            os.environ.get("FADE_LOG_LEVEL", "WARNING"),
        ]
        # A private ipc socket needs no keys: $FADE_KEYS is meant for remote pools.
        env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
        self._broker = subprocess.Popen(
            [sys.executable, "-m", "fade.broker", self.address, *timing, "--remove-dir", self._dir],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        from fade.supervisor import Supervisor

        _log_like_the_workers()
        options = WorkerOptions(
            address=self.address,
            processes=max_workers,
            heartbeat_interval=heartbeat_interval,
            heartbeat_liveness=heartbeat_liveness,
            log_level=os.environ.get("FADE_LOG_LEVEL", "WARNING"),
            parent_pid=os.getpid(),
            # Data by content, kept only as long as this pool: each client's entries are
            # its own (scoped by its tag), so no later pool could use them.
            data_cache_dir=os.path.join(self._dir, "data"),
        )
        self._supervisor = Supervisor(options, env=env)
        self._supervisor.start()
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
        """Why the pool cannot work, if one of its processes has died; None if it is fine."""
        if self._stopping.is_set():
            return None
        status = self._broker.poll()
        if status is not None:
            return f"the embedded broker (pid {self._broker.pid}) exited with status {status}"
        if not self._thread.is_alive():
            return "the embedded pool's supervisor thread has stopped"
        return None

    def stop(self) -> None:
        """Drain the workers, stop the broker, and wait for both (killing after a deadline).
        Does nothing in a process other than the one that started the pool."""
        if os.getpid() != self._owner:
            return
        self._stopping.set()
        self._thread.join()
        _end(self._broker)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [self._broker.pid, *self._supervisor.pids]


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


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        process.kill()
        process.wait()
