"""Environment processes: a child of a worker process that runs tasks with shipped packages.

::

    worker process (fade/worker.py)                  environment process (this module)
      Environments.run(job) ── TASK(key, payload) ──>  python -S: the shipped trees first on
                                                       sys.path, then site-packages as usual
                             <── FETCH(key, request)   (code shipping: the worker relays it
        worker._fetch ──> broker ──> client            through its own broker link)
                             ── CODE(status, frames) ─>
                             <── DONE(status, payload)  the task ran exactly as in a worker
                                                        process, its modules from the trees

A process that has imported one version of a package cannot swap in another, so a
task whose distributions differ from the worker's own runs in a process started
for exactly that set of trees: the worker process starts one per set (a few at a
time, least recently used stopped first) and talks to it over a socket pair,
``[u32 frame count][u64 size]... frames``. It is a child in the worker's process
group: whatever ends the worker process's group ends it too, and it ends by itself
when the worker process closes its end.

If it dies while running a task (a segfault, ``os._exit``), the worker process
dies the same way, so the supervisor and the broker treat it exactly as the death
of a worker process that ran the task itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from fade import protocol as p
from fade.errors import CodeShippingError, FadeError, PackageShippingError

__all__ = ["EnvProcess", "EnvProcessDied", "child_main"]

log = logging.getLogger("fade.worker")

#: Seconds an environment process may take to start (it imports fade, nothing of the task).
START_TIMEOUT = 60.0

_COUNT = struct.Struct("<I")
_SIZE = struct.Struct("<Q")

#: Runs in ``python -S``: the trees go first on sys.path *before* site-packages and the
#: .pth files there are processed, then the trees' own .pth files are processed.
_BOOT = """\
import json, sys
args = json.loads(sys.argv[1])
if sys.path and sys.path[0] == "":  # -c put the current folder first: not the worker's path
    del sys.path[0]
sys.path[0:0] = args["trees"]
import site
site.main()
for tree in args["trees"]:
    site.addsitedir(tree)
from fade.envproc import child_main
child_main(args)
"""

Fetch = Callable[[bytes, dict[str, object]], list[bytes]]


class EnvProcessDied(FadeError):
    """The environment process ended while running a task; ``status`` is its exit status
    (negative: the signal that killed it)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the environment process ended with status {status}")
        self.status = status


class EnvProcess:
    """The worker process's end of one environment process."""

    def __init__(
        self, trees: Sequence[str], labels: Sequence[str], code_cache: str, log_level: str
    ) -> None:
        self.trees = tuple(trees)
        ours, theirs = socket.socketpair()
        args = {
            "trees": list(trees),
            "labels": list(labels),
            "code_cache": code_cache,
            "log_level": log_level,
            "fd": theirs.fileno(),
        }
        self._sock = ours
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-S", "-c", _BOOT, json.dumps(args)],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self.tasks = 0
        self._wait_until_ready(", ".join(labels))

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_until_ready(self, what: str) -> None:
        self._sock.settimeout(START_TIMEOUT)
        try:
            message = _recv(self._sock)
        except OSError as exc:  # timed out
            self.stop()
            raise PackageShippingError(
                f"the process for the packages {what} did not start within "
                f"{START_TIMEOUT:g}s ({exc})"
            ) from None
        finally:
            self._sock.settimeout(None)
        if message and message[0] == b"R":
            return
        self.stop()
        if message and message[0] == b"E":
            reason = message[1].decode(errors="replace")
        else:
            reason = f"it exited with status {self.process.returncode} (see the worker's log)"
        raise PackageShippingError(f"the process for the packages {what} failed to start: {reason}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, key: bytes, payload: p.Payload, fetch: Fetch) -> tuple[p.Status, p.Payload]:
        """Run one task there (relaying its code requests); raises EnvProcessDied."""
        self.tasks += 1
        try:
            _send(self._sock, [b"T", key, payload.inline, *payload.buffers])
        except OSError:
            raise EnvProcessDied(self._status()) from None
        while True:
            message = _recv(self._sock)
            if not message:
                raise EnvProcessDied(self._status())
            kind = message[0]
            if kind == b"D" and len(message) >= 3 and len(message[1]) == 1:
                return p.Status(message[1][0]), p.Payload(message[2], tuple(message[3:]))
            if kind == b"F" and len(message) == 3:
                try:
                    frames = fetch(message[1], p.unpack_request(message[2]))
                    reply = [b"C", b"\x00", *frames]
                except CodeShippingError as exc:
                    reply = [b"C", b"\x01", str(exc).encode()]
                _send(self._sock, reply)
                continue
            self.stop()
            raise PackageShippingError("the environment process sent something unexpected")

    def _status(self) -> int:
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def stop(self) -> None:
        """End it: closing our end makes it leave; one that does not is killed."""
        self._sock.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the environment process itself -----------------------------------------------------------


class _Child:
    def __init__(self, args: dict[str, Any], sock: socket.socket) -> None:
        from fade import serialization as ser
        from fade.codecache import CodeCache, CodeRunner
        from fade.shipping import uninstall_import_hook
        from fade.taskenv import TaskEnvironment

        uninstall_import_hook()
        self.sock = sock
        self.pid = os.getpid()  # a process a task forks is not this one
        self.host = socket.gethostname()
        self.trees = {str(t): str(label) for t, label in zip(args["trees"], args["labels"])}
        self.functions = ser.FunctionCache()
        self.code = CodeRunner(CodeCache(args["code_cache"]), self._fetch, self.functions)
        self.task_env = TaskEnvironment(self.code.managed_path)

    def serve(self) -> None:
        _send(self.sock, [b"R"])
        while True:
            message = _recv(self.sock)
            if not message:
                return  # the worker process closed its end, or is gone
            if message[0] != b"T" or len(message) < 3:
                raise PackageShippingError("the worker process sent something unexpected")
            status, payload = self._run(message[1], p.Payload(message[2], tuple(message[3:])))
            _send(self.sock, [b"D", bytes((status,)), payload.inline, *payload.buffers])

    def _run(self, key: bytes, payload: p.Payload) -> tuple[p.Status, p.Payload]:
        from fade import serialization as ser
        from fade import taskenv
        from fade.errors import MissingDependencyError

        with self.task_env:
            try:
                taskenv.loading = threading.get_ident()  # no pool from the code it imports
                try:
                    self.code.ensure(ser.code_version(payload), p.key_tag(key), key)
                    fn, args, kwargs = ser.loads_call(payload, self.functions)
                finally:
                    taskenv.loading = 0
                try:
                    value = fn(*args, **kwargs)
                except BaseException as exc:
                    if os.getpid() != self.pid:  # a process the task forked came back
                        taskenv.end_forked_child(exc)
                    raise
                if os.getpid() != self.pid:
                    taskenv.end_forked_child(None)
                return p.Status.OK, ser.dumps_value(value)
            except ModuleNotFoundError as exc:
                error = MissingDependencyError.on_host(exc, self.host)
                return p.Status.RAISED, ser.dumps_exception(self._load_error(error))
            except BaseException as exc:
                return p.Status.RAISED, ser.dumps_exception(self._load_error(exc))

    def _load_error(self, exc: BaseException) -> BaseException:
        """An import of a shipped tree's file that failed here (a compiled extension that
        needs a system library this host lacks) becomes an error naming the distribution."""
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, ImportError):
                where = f"{seen.path or ''} {seen}"
                for tree, label in self.trees.items():
                    if tree + os.sep in where:
                        name = label.partition(" ")[0]
                        error = PackageShippingError(
                            f"{label}, shipped from the client, does not load on host "
                            f"{self.host}: {seen}. It needs something this host lacks (a "
                            f"system library, most often): install that here, or install "
                            f"{name} on the workers"
                        )
                        error.__cause__ = exc
                        return error
            seen = seen.__cause__ or seen.__context__
        return exc

    def _fetch(self, key: bytes, request: dict[str, object]) -> list[bytes]:
        _send(self.sock, [b"F", key, p.pack_request(request)])
        message = _recv(self.sock)
        if not message or message[0] != b"C" or len(message) < 2:
            raise CodeShippingError("the worker process did not answer a code request")
        if message[1] != b"\x00":
            raise CodeShippingError(
                message[2].decode(errors="replace") if len(message) > 2 else "?"
            )
        return message[2:]


def _ignore(signum: int, frame: object) -> None:
    """SIGINT in an environment process (see child_main)."""


def child_main(args: dict[str, Any]) -> None:
    """The environment process (see _BOOT): serve tasks until the worker process leaves."""
    logging.basicConfig(
        level=str(args.get("log_level", "INFO")).upper(),
        format=f"%(asctime)s fade-worker-env[{os.getpid()}@{socket.gethostname()}] "
        "%(levelname)s %(message)s",
    )
    from fade.taskenv import fork_with_pythons_signals

    # The worker process decides when to stop. A handler that does nothing, not SIG_IGN:
    # an ignored signal stays ignored in every process a task starts, even through exec.
    fork_with_pythons_signals((signal.SIGINT,))
    signal.signal(signal.SIGINT, _ignore)
    sock = socket.socket(fileno=int(args["fd"]))
    try:
        child = _Child(args, sock)
    except BaseException as exc:
        _send(sock, [b"E", "".join(traceback.format_exception_only(exc)).strip().encode()])
        raise
    try:
        child.serve()
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # threads a task left running must not keep this process alive


# -- framing -----------------------------------------------------------------------------------


def _send(sock: socket.socket, frames: Sequence[Any]) -> None:
    views = [_view(f) for f in frames]
    head = _COUNT.pack(len(views)) + b"".join(_SIZE.pack(v.nbytes) for v in views)
    sock.sendall(head)
    for view in views:
        if view.nbytes:
            sock.sendall(view)


def _recv(sock: socket.socket) -> list[bytes]:
    """One message; [] when the other end closed."""
    head = _read(sock, _COUNT.size)
    if head is None:
        return []
    (count,) = _COUNT.unpack(head)
    sizes = _read(sock, _SIZE.size * count) if count else b""
    if sizes is None:
        return []
    out = []
    for (size,) in _SIZE.iter_unpack(sizes):
        frame = _read(sock, size) if size else b""
        if frame is None:
            return []
        out.append(frame)
    return out


def _read(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


def _view(frame: Any) -> memoryview:
    buffer = getattr(frame, "buffer", None)  # a zmq.Frame
    return memoryview(buffer if buffer is not None else frame).cast("B")
