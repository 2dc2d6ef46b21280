"""The embedded pool behind ``fade.Executor()``: a broker and a supervisor of N workers.

::

    this process --spawn--> fade.broker  ipc://<tmpdir>/broker --parent-pid <us>
                 --spawn--> fade.worker  ipc://<tmpdir>/broker --processes N --parent-pid <us>

Both children are in their own session (a terminal's Ctrl-C is ours to handle)
and watch our pid: if this process dies, even by SIGKILL, they exit within a
heartbeat interval, and the supervisor takes its workers with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fade.security import KEYS_ENV

__all__ = ["EmbeddedPool"]

STOP_TIMEOUT = 10.0


class EmbeddedPool:
    """Start the processes at once; :meth:`stop` ends them and removes the socket file."""

    def __init__(
        self, max_workers: int, *, heartbeat_interval: float, heartbeat_liveness: int
    ) -> None:
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
        self._broker = self._spawn("fade.broker", [self.address, *timing])
        self._workers = self._spawn(
            "fade.worker", [self.address, "--processes", str(max_workers), *timing]
        )
        self._stopping = False

    @staticmethod
    def _spawn(module: str, args: list[str]) -> subprocess.Popen[bytes]:
        # A private ipc socket needs no keys: $FADE_KEYS is meant for remote pools.
        env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def problem(self) -> str | None:
        """Why the pool cannot work, if one of its processes has died; None if it is fine."""
        if self._stopping:
            return None
        for name, process in (("broker", self._broker), ("worker supervisor", self._workers)):
            status = process.poll()
            if status is not None:
                return f"the embedded {name} (pid {process.pid}) exited with status {status}"
        return None

    def stop(self) -> None:
        """Drain the workers, stop the broker, and wait for both (killing after a deadline)."""
        self._stopping = True
        for process in (self._workers, self._broker):
            _end(process)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [self._broker.pid, self._workers.pid]


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        process.kill()
        process.wait()
