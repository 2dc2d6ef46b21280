"""Keeps N worker processes alive on one host (``fade-worker --processes N``).

::

    supervisor --spawn--> worker 1 ... worker N        (each with its own DEALER)
        |  waitpid: a worker died abnormally
        +--OBITUARY(identity, exit status)--> broker    (re-queues its tasks at once)
        +--spawn a replacement (with back-off if they keep dying at start-up)

* A worker that exits with status 0 left on purpose (it was drained): it is
  not replaced. When every worker has left, the supervisor exits.
* SIGTERM/SIGINT are passed on to the workers, which drain; a second signal
  kills them.
* With ``--parent-pid`` (the embedded pool) the supervisor and its workers
  exit when that process is gone.
* With keys, the supervisor and its workers use the same worker key: the
  broker accepts an OBITUARY only for identities bound to the sender's key.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import zmq

from fade import protocol as p
from fade import security
from fade.initializer import EXIT_RETIRED
from fade.sockets import connect_dealer

__all__ = ["Supervisor"]

log = logging.getLogger("fade.supervisor")

#: A worker that dies sooner than this after its start counts as failing to start.
QUICK_DEATH = 1.0
MAX_BACKOFF = 10.0


@dataclass(slots=True)
class _Child:
    identity: bytes
    process: subprocess.Popen[bytes]
    started: float


class Supervisor:
    """Run ``args.processes`` worker processes and replace those that die."""

    def __init__(
        self,
        args: argparse.Namespace,
        keys: security.PeerKeys | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.keys = keys
        self.env = env  # the workers' environment; None: ours
        self._children: dict[int, _Child] = {}
        self._stopping = 0
        self._backoff = 0.0
        self._context = zmq.Context()
        self._socket = connect_dealer(
            self._context,
            args.address,
            # With keys the broker checks that every sender's identity carries its key's tag.
            identity=security.peer_identity(b"S", keys),
            linger_ms=500,
            keys=keys,
            max_message_size=args.max_message_size,
        )

    def run(self) -> int:
        """The ``fade-worker`` command: supervise until every worker has left."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.start()
        try:
            while self.tick():
                time.sleep(0.05)
                if self.args.parent_pid is not None and os.getppid() != self.args.parent_pid:
                    log.info("parent process is gone; stopping workers")
                    self.stop(signal.SIGKILL)
        finally:
            self.close()
        return 0

    def start(self) -> None:
        log.info("starting %d worker processes for %s", self.args.processes, self.args.address)
        for _ in range(self.args.processes):
            self._spawn()

    def tick(self) -> bool:
        """Reap and replace dead workers (never blocks long); False once none is left."""
        self._reap()
        return bool(self._children)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Replace nobody from now on; SIGTERM drains the workers, SIGKILL ends them."""
        self._stopping = max(self._stopping, 1 if sig == signal.SIGTERM else 2)
        self._signal_all(sig)

    def close(self) -> None:
        """Kill what is left and close the socket (from the thread that ticks)."""
        self._signal_all(signal.SIGKILL)
        for child in self._children.values():
            child.process.wait()
        self._socket.close()
        self._context.term()

    @property
    def pids(self) -> list[int]:
        return list(self._children)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop(signal.SIGTERM if self._stopping == 0 else signal.SIGKILL)

    def _signal_all(self, sig: int) -> None:
        for child in self._children.values():
            if child.process.poll() is None:
                try:
                    child.process.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _spawn(self) -> None:
        from fade.worker import child_argv

        identity = security.peer_identity(b"W", self.keys)
        # Its own session: a terminal's Ctrl-C reaches the supervisor alone, which
        # then drains the workers once, instead of every process at once.
        process = subprocess.Popen(
            child_argv(self.args, identity, os.getpid()),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        self._children[process.pid] = _Child(identity, process, time.monotonic())
        log.debug("started worker process %d (%s)", process.pid, identity.hex())

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            status = child.process.poll()
            if status is None:
                continue
            del self._children[pid]
            if status == EXIT_RETIRED and not self._stopping:
                log.info("worker process %d retired (max_tasks_per_child); replacing it", pid)
                self._spawn()
                continue
            if status == 0 or self._stopping:
                log.info("worker process %d left (status %d)", pid, status)
                continue
            self._report_death(child, status)
            self._replace(child)

    def _report_death(self, child: _Child, status: int) -> None:
        info: dict[str, object] = {"host": socket.gethostname(), "pid": child.process.pid}
        if status < 0:
            info["signal"] = signal.Signals(-status).name
            what = f"was killed by {info['signal']}"
        else:
            info["exitcode"] = status
            what = f"exited with status {status}"
        log.warning("worker process %d %s; replacing it", child.process.pid, what)
        try:
            self._socket.send_multipart(p.encode_obituary(child.identity, info), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the broker will notice the silence instead

    def _replace(self, child: _Child) -> None:
        if time.monotonic() - child.started < QUICK_DEATH:
            self._backoff = min(MAX_BACKOFF, max(0.1, self._backoff * 2))
            log.warning("workers are dying at start-up; waiting %.1fs", self._backoff)
            time.sleep(self._backoff)
        else:
            self._backoff = 0.0
        if not self._stopping:
            self._spawn()
