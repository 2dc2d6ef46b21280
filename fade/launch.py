"""Starting worker processes, with nothing heavier than the standard library imported.

::

    fade.Executor()
      1. check its arguments                       (fade/clientoptions.py)
      2. EmbeddedStart: socket folder, K x spawn   (here: no ZeroMQ yet)    workers 1..K
      3. import ZeroMQ, the I/O thread, ...        (0.05-0.1 s)             start (0.1 s
      4. EmbeddedPool: supervisor adopts them, broker binds                  each, meanwhile)
      5. first submit ------------------------------------------------->  first result
      6. one of them serves: the supervisor starts workers K+1..N

Why: a worker process takes about 0.1 s to start (the interpreter, then ZeroMQ,
cloudpickle and fade), and the client about 0.06 s to import what it runs with.
Started one after the other they add up on the way to the first result; here they
overlap. K leaves the client a CPU (:func:`_started_at_once`). The workers connect
before the broker binds: ZeroMQ retries.

The supervisor (fade/supervisor.py) spawns its replacements with the same
:func:`spawn_worker`, and keeps the :class:`Child` records.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fade.defaults import KEYS_ENV
from fade.options import WorkerOptions, child_argv
from fade.resources import detect_resources, usable_cpus

__all__ = ["Child", "EmbeddedStart", "peer_identity", "spawn_worker"]

_FOLDER = re.compile(r"fade-(\d+)-")


@dataclass(slots=True)
class Child:
    """A worker process its supervisor started, and the socket pair they talk over."""

    identity: bytes
    process: subprocess.Popen[bytes]
    started: float
    control: socket.socket
    serving: bool = False
    interval: float = 0.0  # the broker's heartbeat interval it was told; 0: not yet
    unread: bytes = b""  # the start of a control record not all read yet


def peer_identity(role: bytes, tag: bytes = b"") -> bytes:
    """A routing identity: role byte, key tag (with keys), then 15 random bytes
    (fade.security.peer_identity gives the tag of a peer's keys)."""
    return role + tag + os.urandom(15)


def spawn_worker(options: WorkerOptions, identity: bytes, env: dict[str, str] | None) -> Child:
    """Start one worker process of ``options``' pool, supervised by this process."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    argv = [
        *child_argv(options, identity, os.getpid()),
        "--control-fd",
        str(theirs.fileno()),
    ]
    # A session (and process group) of its own: a terminal's Ctrl-C reaches the
    # supervisor alone, and the group can be ended with everything a task started.
    try:
        process = subprocess.Popen(
            argv,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            env=env,
            pass_fds=(theirs.fileno(),),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Child(identity, process, time.monotonic(), ours)


class EmbeddedStart:
    """The first half of an embedded pool (``fade.Executor()``): its socket folder and
    its worker processes, started before the client imports ZeroMQ.
    fade.embedded.EmbeddedPool takes them over; :meth:`abandon` ends them if the
    Executor fails to start."""

    def __init__(
        self, max_workers: int, *, heartbeat_interval: float, heartbeat_liveness: int
    ) -> None:
        self.owner = os.getpid()
        _remove_abandoned_folders()
        self.dir = tempfile.mkdtemp(prefix=f"fade-{self.owner}-")
        # ipc: no port to pick or race for, and the workers may connect before the
        # broker has bound (ZeroMQ retries).
        self.address = f"ipc://{self.dir}/broker"
        self.options = WorkerOptions(
            address=self.address,
            processes=max_workers,
            heartbeat_interval=heartbeat_interval,
            heartbeat_liveness=heartbeat_liveness,
            log_level=os.environ.get("FADE_LOG_LEVEL", "WARNING"),
            parent_pid=self.owner,
            remove_dir=self.dir,
            # Data by content, kept only as long as this pool: each client's entries are
            # its own (scoped by its tag), so no later pool could use them.
            data_cache_dir=os.path.join(self.dir, "data"),
            # The host's resources, found once: the processes lend from one table.
            resources=detect_resources(),
            pool=os.urandom(6).hex(),
        )
        # A private ipc socket needs no keys: $FADE_KEYS is meant for remote pools.
        self.env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}
        self.children: list[Child] = []
        try:
            for _ in range(_started_at_once(max_workers)):
                self.children.append(spawn_worker(self.options, peer_identity(b"W"), self.env))
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """End the workers and remove the folder: the Executor did not start."""
        for child in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
            child.control.close()
        self.children.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def _started_at_once(workers: int) -> int:
    """How many of the pool's workers start before the client has imported the rest:
    as many as leave it a CPU, at least one. The others start once one of these serves
    (the supervisor, fade/embedded.py): each start is 0.1 s of CPU, and on two CPUs a
    second one made the first result later (the client and the first worker wait for
    a CPU): 0.17 s instead of 0.14 (median of five fresh processes each)."""
    return max(1, min(workers, int(usable_cpus()) - 1))


def _remove_abandoned_folders() -> None:
    """Socket folders of embedded pools whose process is gone (killed before it could
    clean up, with its workers): the folder name carries the pid."""
    with contextlib.suppress(OSError):
        for entry in Path(tempfile.gettempdir()).glob("fade-*-*"):
            match = _FOLDER.match(entry.name)
            if match and entry.stat().st_uid == os.getuid() and not _alive(int(match[1])):
                shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
