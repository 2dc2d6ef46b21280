"""Keeps N worker processes alive on one host (``fade-worker --processes N``).

::

    supervisor --spawn--> worker 1 ... worker N        (each with its own DEALER, its own
        |  <== control socket pair ==> each worker       process group, and a control pair)
        |  waitpid: a worker died abnormally
        +--OBITUARY(identity, exit status)--> broker    (re-queues its tasks at once)
        +--end the dead worker's process group          (what its tasks started dies too)
        +--spawn a replacement (with back-off if they keep dying at start-up)

* Each worker runs in a process group of its own; when it exits or is replaced,
  the group is killed, so processes its tasks started do not outlive it.
* Control goes through a socket pair, not signals (a task may ignore SIGTERM):
  the supervisor writes DRAIN or LEAVE; the worker writes SERVING at each
  registration, with the heartbeat interval the broker announced, so a death after
  that is not a start-up failure and the supervisor vouches at the broker's pace;
  end of file on either side means the other is gone.
* A worker that exits with status 0 left on purpose (it was drained): it is not
  replaced. When every worker has left, the supervisor exits. A worker that
  exits with EXIT_INCOMPATIBLE cannot work with this broker: nothing is replaced.
* SIGTERM/SIGINT drain the workers; a second signal kills their groups.
* :meth:`Supervisor.tick` never blocks: back-off delays a spawn, it does not sleep.
* With keys, the supervisor and its workers use the same worker key: the
  broker accepts an OBITUARY only for identities bound to the sender's key.
* Every heartbeat interval of the broker (the shortest its workers were told) it
  vouches for its live workers (ALIVE): a task holding the GIL silences its worker.
* Every SWEEP_INTERVAL it removes the shared-memory folders of processes of this
  host that are gone (fade/shm.py): a client killed while its workers wrote results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import replace

import zmq

from fade import protocol as p
from fade import security, shm
from fade.initializer import EXIT_RETIRED
from fade.launch import Child, spawn_worker
from fade.options import WorkerOptions
from fade.resources import detect_resources
from fade.sockets import connect_dealer

__all__ = [
    "CONTROL_DRAIN",
    "CONTROL_LEAVE",
    "CONTROL_SERVING",
    "EXIT_INCOMPATIBLE",
    "Supervisor",
    "encode_serving",
]

log = logging.getLogger("fade.supervisor")

#: A worker that dies sooner than this after its start, before it said SERVING,
#: counts as failing to start.
QUICK_DEATH = 1.0
MAX_BACKOFF = 10.0
#: Worker processes in a row that died before saying SERVING, none serving since, after
#: which :meth:`Supervisor.cannot_start` says why (the embedded pool then breaks; a
#: ``fade-worker`` goes on trying, with back-off, as a service should).
START_FAILURE_LIMIT = 5
#: Seconds a staggered start (``Supervisor.start``) holds the other workers back at most
#: while the first ones have not said they serve.
STAGGER_LIMIT = 1.0
#: Control bytes: supervisor -> worker, and worker -> supervisor.
CONTROL_DRAIN = b"D"
CONTROL_LEAVE = b"L"
CONTROL_SERVING = b"S"
#: SERVING as the worker writes it: the tag, then the broker's heartbeat interval.
_SERVING = struct.Struct("<cd")
#: Exit status of a worker that cannot work with this broker (another protocol version).
EXIT_INCOMPATIBLE = 3


def encode_serving(interval: float) -> bytes:
    """What a worker writes to its supervisor at each registration (WELCOME)."""
    return _SERVING.pack(CONTROL_SERVING, interval)


def decode_serving(data: bytes) -> tuple[list[float], bytes]:
    """The intervals of the whole SERVING records in ``data``, and the bytes left over
    (a record split between two reads of the stream)."""
    whole = len(data) - len(data) % _SERVING.size
    intervals = [interval for _, interval in _SERVING.iter_unpack(data[:whole])]
    return intervals, data[whole:]


class Supervisor:
    """Run ``options.processes`` worker processes and replace those that die."""

    def __init__(
        self,
        options: WorkerOptions,
        keys: security.PeerKeys | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        # The host's resources are found once and shared by its worker processes (one
        # pool at the broker: they lend from one table).
        if options.resources is None:
            options = replace(options, resources=detect_resources())
        self.options = replace(options, pool=options.pool or os.urandom(6).hex())
        self.keys = keys
        self.env = env  # the workers' environment; None: ours
        self.incompatible = False
        self._children: dict[int, Child] = {}
        self._stopping = 0
        self._backoff = 0.0
        self._failed_starts = 0  # in a row, none serving since (cannot_start)
        self._last_failure = ""
        self._owed = 0  # replacements not started yet
        self._held, self._hold_until = 0, 0.0  # first starts held back (``start``)
        self._spawn_at = 0.0
        self._next_sweep = 0.0
        self._next_vouch = 0.0
        self._context = zmq.Context()
        # With keys the broker checks that every sender's identity carries its key's tag.
        identity = security.peer_identity(b"S", keys)
        # One socket per broker of a pair: an OBITUARY goes to both, and the one that
        # stands by drops it.
        self._sockets = [
            connect_dealer(
                self._context,
                address,
                identity=identity,
                linger_ms=500,
                keys=keys,
                max_message_size=options.max_message_size,
                # What it says is worth saying only now: none of it queues up for a
                # broker that is away (a death it missed, it learns from the silence).
                immediate=True,
            )
            for address in options.address.split(",")
        ]

    def run(self) -> int:
        """The ``fade-worker`` command: supervise until every worker has left."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.start()
        parent = self.options.parent_pid
        try:
            while self.tick():
                time.sleep(0.05)
                if parent is not None and os.getppid() != parent:
                    log.info("parent process is gone; stopping workers")
                    self.stop(signal.SIGKILL)
        finally:
            self.close()
        return 2 if self.incompatible else 0

    def start(self, started: Sequence[Child] = (), *, stagger: bool = False) -> None:
        """Start the worker processes: those of ``started`` (spawned already, with these
        options: fade/launch.py) and as many more as ``options.processes`` says; with
        ``stagger``, those more once one of them serves (or after STAGGER_LIMIT)."""
        log.info(
            "starting %d worker processes for %s", self.options.processes, self.options.address
        )
        for child in started:
            self._file(child)
        rest = self.options.processes - len(started)
        if stagger and started:
            self._held, self._hold_until = rest, time.monotonic() + STAGGER_LIMIT
            return
        for _ in range(rest):
            self._spawn()

    def tick(self) -> bool:
        """Reap and replace dead workers; never blocks. False once none is left."""
        self._read_controls()
        self._reap()
        now = time.monotonic()
        if self._held and not self._stopping and (now >= self._hold_until or self._serving()):
            for _ in range(self._held):
                self._spawn()
            self._held = 0
        if now >= self._next_sweep:
            self._next_sweep = now + shm.SWEEP_INTERVAL
            shm.sweep()
        if now >= self._next_vouch:
            self._next_vouch = now + self._vouch_interval()
            self._vouch()
        if self._owed and not self._stopping and now >= self._spawn_at:
            self._owed -= 1
            self._spawn()
        return bool(self._children) or bool((self._owed or self._held) and not self._stopping)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Replace nobody from now on; SIGTERM drains the workers, SIGKILL ends them."""
        self._stopping = max(self._stopping, 1 if sig == signal.SIGTERM else 2)
        for child in self._children.values():
            self._pass_on_stop(child)

    def close(self) -> None:
        """Kill what is left and close the socket (from the thread that ticks)."""
        self._kill_all()
        for child in self._children.values():
            child.process.wait()
            _end_group(child)
            child.control.close()
        self._children.clear()
        for sock in self._sockets:
            sock.close()
        self._context.term()

    @property
    def pids(self) -> list[int]:
        return list(self._children)

    def cannot_start(self) -> str | None:
        """Why no worker process can start, once START_FAILURE_LIMIT in a row have died
        before serving and none serves; None otherwise. Read from any thread."""
        failed = self._failed_starts
        if failed < START_FAILURE_LIMIT:
            return None
        # A copy, taken at once: the supervisor's thread files and reaps meanwhile.
        if any(child.serving for child in list(self._children.values())):
            return None
        return (
            f"{failed} worker processes in a row died during start-up, the last "
            f"{self._last_failure}; their error output (above, or in the log) says why"
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop(signal.SIGTERM if self._stopping == 0 else signal.SIGKILL)

    def _pass_on_stop(self, child: Child) -> None:
        """What the stop asks of a child: drain (a SIGTERM), or end now (a second signal)."""
        if self._stopping == 1:
            with contextlib.suppress(OSError):  # it is gone; reaping will tell
                child.control.send(CONTROL_DRAIN)
        elif child.process.poll() is None:
            _end_group(child)

    def _kill_all(self) -> None:
        for child in self._children.values():
            if child.process.poll() is None:
                _end_group(child)

    def _serving(self) -> bool:
        return any(child.serving for child in self._children.values())

    def _spawn(self) -> None:
        self._file(spawn_worker(self.options, security.peer_identity(b"W", self.keys), self.env))

    def _file(self, child: Child) -> None:
        self._children[child.process.pid] = child
        log.debug("started worker process %d (%s)", child.process.pid, p.short_id(child.identity))
        if self._stopping:
            # A signal handled while Popen ran told every child but this one, which was
            # not filed yet: without this it would serve on, and we would wait for it.
            self._pass_on_stop(child)

    def _read_controls(self) -> None:
        for child in self._children.values():
            try:
                data = child.control.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            self._take_reports(child, data)

    def _take_reports(self, child: Child, data: bytes) -> None:
        intervals, child.unread = decode_serving(child.unread + data)
        if not intervals:
            return
        if not child.serving:
            child.serving = True
            self._failed_starts = 0
        if child.interval != intervals[-1]:
            child.interval = intervals[-1]
            # A broker faster than our own settings: vouch at its pace from now on.
            self._next_vouch = min(self._next_vouch, time.monotonic() + child.interval)

    def _vouch_interval(self) -> float:
        """The broker's heartbeat interval, as our workers were told it (the shortest,
        for a pair of brokers told apart), or ours until one registers."""
        told = [c.interval for c in self._children.values() if c.interval]
        return min(told) if told else self.options.heartbeat_interval

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            status = child.process.poll()
            if status is None:
                continue
            del self._children[pid]
            self._read_last_word(child)
            _end_group(child)
            child.control.close()
            if status == EXIT_RETIRED and not self._stopping:
                log.info("worker process %d retired (max_tasks_per_child); replacing it", pid)
                self._spawn()
            elif status == EXIT_INCOMPATIBLE:
                self._give_up(pid)
            elif status == 0 or self._stopping:
                log.info("worker process %d left (status %d)", pid, status)
            else:
                self._report_death(child, status)
                self._replace(child)

    def _read_last_word(self, child: Child) -> None:
        if not child.serving:
            try:
                self._take_reports(child, child.control.recv(4096))
            except OSError:
                pass

    def _give_up(self, pid: int) -> None:
        log.error(
            "worker process %d cannot work with the broker at %s (see its log); stopping",
            pid,
            self.options.address,
        )
        self.incompatible = True
        self.stop(signal.SIGTERM)

    def _vouch(self) -> None:
        """Tell the broker which worker processes live and run (not stopped, not dead): a
        task that holds the GIL in native code (a backtracking regular expression, a
        sort of a huge list) keeps its process from sending heartbeats for as long, and
        it must not be taken for dead and run again elsewhere. A stopped or frozen
        host says nothing, and its workers expire as before."""
        alive = [c.identity for c in self._children.values() if c.serving and _runs(c)]
        for sock in self._sockets:
            for start in range(0, len(alive), p.ALIVE_LIMIT):
                try:
                    sock.send_multipart(
                        p.encode_alive(alive[start : start + p.ALIVE_LIMIT]), zmq.NOBLOCK
                    )
                except zmq.ZMQError:
                    pass  # no connection now: nothing to vouch to

    def _report_death(self, child: Child, status: int) -> None:
        info: dict[str, object] = {"host": socket.gethostname(), "pid": child.process.pid}
        if status < 0:
            info["signal"] = signal.Signals(-status).name
            what = f"was killed by {info['signal']}"
        else:
            info["exitcode"] = status
            what = f"exited with status {status}"
        when = "while serving" if child.serving else "during start-up"
        log.warning("worker process %d %s %s; replacing it", child.process.pid, what, when)
        if not child.serving:
            self._failed_starts += 1
            self._last_failure = what
        for sock in self._sockets:
            try:
                sock.send_multipart(p.encode_obituary(child.identity, info), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the broker will notice the silence instead

    def _replace(self, child: Child) -> None:
        if not child.serving and time.monotonic() - child.started < QUICK_DEATH:
            self._backoff = min(MAX_BACKOFF, max(0.1, self._backoff * 2))
            log.warning("workers are dying at start-up; waiting %.1fs", self._backoff)
        else:
            self._backoff = 0.0
        self._owed += 1
        self._spawn_at = time.monotonic() + self._backoff


def _end_group(child: Child) -> None:
    """Kill the worker's process group: the worker, if alive, and what its tasks started."""
    try:
        os.killpg(child.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


#: Process states (``/proc/PID/stat``) of a process that can work: running, sleeping,
#: waiting on a disk. Not stopped (SIGSTOP, a debugger), not a zombie.
_WORKING_STATES = frozenset("RSD")


def _runs(child: Child) -> bool:
    """Whether the worker process lives and is not stopped (Linux; elsewhere, where
    there is no /proc, False: its heartbeats alone speak for it)."""
    if child.process.poll() is not None:
        return False
    try:
        with open(f"/proc/{child.process.pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat.rpartition(b")")[2].split()  # the name, in parentheses, may hold spaces
    return bool(fields) and fields[0].decode() in _WORKING_STATES
