"""Put back what a task changed in its worker process: cwd, environment, sys.path, builtins,
the standard streams, interpreter settings, signal handlers and timers.

::

    worker start: baseline = cwd, os.environ, sys.path, builtins, sys.stdin/stdout/stderr,
                  interpreter settings, warning filters, signal handlers
    each task:    with task_environment:  run it, pickle its outcome
                  on the way out: compare with the baseline ── same ──> nothing to do
                                                  └─ differs ──> put the baseline back, log

A task may be followed, in the same worker process, by another client's task.
What it did to the process's working directory, ``os.environ``, ``sys.path``
(beyond the code tree that code activation puts first, fade/codecache.py), the
``builtins`` module, the standard streams (``sys.stdout = buffer`` left in
place, or ``sys.stdout.close()``), the interpreter settings that change how code
runs (recursion limit, switch interval, profile and trace functions, the garbage
collector, sockets' default timeout), the warning filters, and the handlers of the
signals a task may take over (SIGALRM, SIGCHLD, SIGPIPE, ...) with a pending alarm
are undone after it, so the next task starts from the worker's own state. The usual case costs
comparisons only (no copies): about 4 µs here (``python benchmarks/taskenv.py``).

Not undone (see docs/security.md): the state of imported modules (installed
packages and their caches), variables set with ``os.putenv`` directly, files
written, processes and threads started, ``sys.modules``, ``sys.meta_path``, the
umask, resource limits, the handlers of other signals, and anything else done
with the worker user's rights.

:func:`fork_with_pythons_signals`: a process a task forks (a ``multiprocessing``
pool, say) gets the signal handlers the worker process started with, not the
worker's own: with those, ``Process.terminate()`` asked a worker that is not there
to drain, and the process lived on.

:func:`end_forked_child`: a process a task forks that comes back into fade's code
(its function returned, raised or called ``sys.exit`` in the child too) ends there,
as a ``multiprocessing`` child does, instead of serving as a copy of its worker.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.getsignal, without the enum
import builtins
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, NoReturn

__all__ = [
    "TaskEnvironment",
    "check_not_loading_a_task",
    "end_forked_child",
    "fork_with_pythons_signals",
    "loading",
]

#: The thread of this process that is loading a task (unpickling its function and
#: arguments, which imports their modules), or 0. Set by the worker around the load.
loading = 0


def check_not_loading_a_task(what: str) -> None:
    """Refuse ``what`` (starting an embedded pool, submitting a task) in module-level code
    a worker runs to load a task: that code runs again in every worker that imports the
    module, so each of its workers would do the same, without end (multiprocessing
    refuses to start processes in a child importing ``__main__`` for the same reason). A
    running task may do both, so may an initializer; a module may create an executor for
    a remote pool."""
    if not loading or loading != threading.get_ident():
        return
    module = _importing_module(sys._getframe(1))
    if module is None:
        return
    raise RuntimeError(
        f"{what} while this worker imported module {module!r} to load a task: a module's "
        "top-level code runs again in every worker that imports it, so its workers would "
        'do the same, without end. Do it under `if __name__ == "__main__":` or inside a '
        "function"
    )


#: The modules whose frames load a task: a module's code above them is being imported.
_LOADERS = frozenset({"fade.worker", "fade.envproc", "fade.initializer"})


def _importing_module(frame: FrameType | None) -> str | None:
    """The name of the module whose top-level code called, between ``frame`` and the
    worker's loading of the task; None if the call came from a function (an initializer,
    a ``__setstate__``)."""
    while frame is not None and frame.f_globals.get("__name__") not in _LOADERS:
        if frame.f_code.co_name == "<module>":
            return str(frame.f_globals.get("__name__", "?"))
        frame = frame.f_back
    return None


log = logging.getLogger("fade.worker")


def fork_with_pythons_signals(signals: tuple[signal.Signals, ...]) -> None:
    """Give every child this process forks from now on the handlers ``signals`` have
    now; call before the worker sets its own."""
    handlers = {sig: signal.getsignal(sig) for sig in signals}

    def restore() -> None:
        for sig, handler in handlers.items():
            if handler is not None:  # None: not set from Python; left as it is
                signal.signal(sig, handler)

    os.register_at_fork(after_in_child=restore)


def end_forked_child(exc: BaseException | None) -> NoReturn:
    """End a process a task forked that came back here: the task's function returned,
    raised, or called ``sys.exit`` in the child as well as in the parent.

    The child holds copies of its worker's sockets and loop: going on, it would serve
    as a second worker on them, and a parent waiting for it (``os.waitpid``) would wait,
    with its task, for ever. So it leaves as a ``multiprocessing`` child leaves: its
    streams flushed, the atexit handlers (its worker's) not run, its exit status what
    its outcome would give a script: 0, 1 after printing the exception, or sys.exit's.
    """
    status = 0
    if isinstance(exc, SystemExit):
        if isinstance(exc.code, int):
            status = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            status = 1
    elif exc is not None:
        traceback.print_exception(exc)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: nothing more to say on it
            pass
    os._exit(status)


def _raw_environ() -> dict[Any, Any]:
    """os.environ's own dict (bytes on POSIX): comparing it skips decoding every entry."""
    data = getattr(os.environ, "_data", None)
    return data if isinstance(data, dict) else dict(os.environ)


class TaskEnvironment:
    """A context manager, entered around each task, that restores the worker's baseline.

    ``managed_path()`` names the ``sys.path`` entry code activation put first
    (None: none); it is kept in front of the baseline's entries.
    """

    __slots__ = (
        "_builtins",
        "_cwd",
        "_environ",
        "_environ_raw",
        "_fds",
        "_interpreter",
        "_managed",
        "_path",
        "_signal_numbers",
        "_signals",
        "_streams",
        "_warnings",
        "restored",
    )

    def __init__(self, managed_path: Callable[[], str | None] = lambda: None) -> None:
        self._cwd = os.getcwd()
        self._environ = dict(os.environ)
        self._environ_raw = dict(_raw_environ())
        self._path = list(sys.path)
        self._builtins = dict(builtins.__dict__)
        self._streams = (sys.stdin, sys.stdout, sys.stderr)
        self._fds = (_descriptor(sys.stdout), _descriptor(sys.stderr))
        self._interpreter = _interpreter_settings()
        self._warnings = list(warnings.filters)
        self._signal_numbers = _SIGNAL_NUMBERS
        self._signals = self._handlers()
        self._managed = managed_path
        self.restored = 0  # tasks after which something had to be put back

    def keep_handlers(self, *signals: signal.Signals) -> None:
        """Put back, after each task, the handlers ``signals`` have now as well: the
        owner's own (the worker's SIGTERM, SIGINT and stop signal), set after it made
        this environment."""
        self._signal_numbers = (*_SIGNAL_NUMBERS, *(int(sig) for sig in signals))
        self._signals = self._handlers()

    def __enter__(self) -> TaskEnvironment:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back whatever differs from the baseline (never raises)."""
        changed = []
        try:
            cwd_changed = os.getcwd() != self._cwd
        except OSError:  # the task removed the folder it had moved to
            cwd_changed = True
        if cwd_changed:
            changed.append("working directory")
            try:
                os.chdir(self._cwd)
            except OSError as exc:
                log.warning("cannot go back to the working directory %s: %s", self._cwd, exc)
        if _raw_environ() != self._environ_raw:
            changed.append("environment")
            self._restore_environ()
        managed = self._managed()
        expected = self._path if managed is None else [managed, *self._path]
        if sys.path != expected:
            changed.append("sys.path")
            sys.path[:] = expected
        if builtins.__dict__ != self._builtins:
            changed.append("builtins")
            self._restore_builtins()
        if self._streams_changed():
            changed.append("standard streams")
            self._restore_streams()
        if _interpreter_settings() != self._interpreter:
            changed.append("interpreter settings")
            _restore_interpreter_settings(self._interpreter)
        if self._handlers() != self._signals or _timer_pending():
            changed.append("signal handlers or timers")
            self._restore_signals()
        if warnings.filters != self._warnings:
            changed.append("warning filters")
            warnings.filters[:] = self._warnings  # type: ignore[index]  # a list
            # Its caches too: a private function (3.10-3.13), looked up so that a Python
            # without it still gets the filters back rather than a failing worker.
            mutated = getattr(warnings, "_filters_mutated", None)
            if mutated is not None:
                mutated()
        if changed:
            self.restored += 1
            log.debug("the task changed the worker's %s; put back", ", ".join(changed))

    def _restore_environ(self) -> None:
        for key in [k for k in os.environ if k not in self._environ]:
            del os.environ[key]
        for key, value in self._environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value

    def _streams_changed(self) -> bool:
        stdin, stdout, stderr = self._streams
        return (
            sys.stdout is not stdout
            or sys.stderr is not stderr
            or sys.stdin is not stdin
            or (stdout is not None and stdout.closed)
            or (stderr is not None and stderr.closed)
        )

    def _restore_streams(self) -> None:
        """Put the worker's streams back; one the task closed is opened again on its file
        descriptor (Python's own streams leave it open), also for the worker's logging."""
        stdin, stdout, stderr = self._streams
        if stdout is not None and stdout.closed:
            stdout = _reopened(stdout, self._fds[0])
        if stderr is not None and stderr.closed:
            stderr = _reopened(stderr, self._fds[1])
        _retarget_log_handlers(self._streams, (stdin, stdout, stderr))
        self._streams = (stdin, stdout, stderr)
        sys.stdin, sys.stdout, sys.stderr = self._streams

    def _handlers(self) -> tuple[Any, ...]:
        return tuple(map(_getsignal, self._signal_numbers))

    def _restore_signals(self) -> None:
        """Stop the timers (first: one must not go off into a handler just put back),
        then put the handlers back."""
        now = self._handlers()
        changed = {
            sig for sig, was, is_ in zip(self._signal_numbers, self._signals, now) if is_ != was
        }
        for which, sig in _TIMERS:
            if which == signal.ITIMER_REAL or sig in changed:
                signal.setitimer(which, 0)
        for sig, handler in zip(self._signal_numbers, self._signals):
            if sig in changed and handler is not None:  # None: not set from Python
                try:
                    signal.signal(sig, handler)
                except (ValueError, OSError) as exc:  # not the main thread: cannot be done
                    name = signal.Signals(sig).name
                    log.warning("cannot put back the handler of %s: %s", name, exc)

    def _restore_builtins(self) -> None:
        namespace = builtins.__dict__
        for key in [k for k in namespace if k not in self._builtins]:
            del namespace[key]
        namespace.update(self._builtins)


#: What a task may change of the interpreter that would change the next task's run:
#: (recursion limit, switch interval, profile and trace functions, the collector's
#: state and thresholds, sockets' default timeout). Read and compared in about 0.4 µs.
Settings = tuple[int, float, Any, Any, bool, tuple[int, ...], "float | None"]


def _interpreter_settings() -> Settings:
    return (
        sys.getrecursionlimit(),
        sys.getswitchinterval(),
        sys.getprofile(),
        sys.gettrace(),
        gc.isenabled(),
        gc.get_threshold(),
        socket.getdefaulttimeout(),
    )


def _restore_interpreter_settings(settings: Settings) -> None:
    recursion, switch, profile, trace, collecting, threshold, timeout = settings
    sys.setrecursionlimit(recursion)
    sys.setswitchinterval(switch)
    sys.setprofile(profile)
    sys.settrace(trace)
    if collecting:
        gc.enable()
    else:
        gc.disable()
    gc.set_threshold(*threshold)
    socket.setdefaulttimeout(timeout)


#: The signals whose handlers a task may set and that would outlive it: the timers'
#: (alarm, virtual, profiling), a child's end (SIGCHLD left ignored makes every later
#: waitpid fail), a closed pipe (SIGPIPE at its default kills the process instead of
#: raising BrokenPipeError), a lost terminal, the spare user signal. The worker adds its
#: own (SIGTERM, SIGINT, its stop signal) with TaskEnvironment.keep_handlers.
_SIGNALS = (
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGCHLD,
    signal.SIGPIPE,
    signal.SIGHUP,
    signal.SIGUSR2,
)
#: As ints: the interval timers below name theirs so, and no enum is made per task.
_SIGNAL_NUMBERS = tuple(int(sig) for sig in _SIGNALS)
#: The interval timers and the signal each sends. The real one (``signal.alarm``) is
#: checked after every task, as its signal's default kills the worker under the next
#: task; the two CPU-time ones only with their handler changed (a profiler's).
_TIMERS = (
    (signal.ITIMER_REAL, int(signal.SIGALRM)),
    (signal.ITIMER_VIRTUAL, int(signal.SIGVTALRM)),
    (signal.ITIMER_PROF, int(signal.SIGPROF)),
)
_getsignal = _signal.getsignal  # signal's own wraps every answer in an enum: a cost per task


def _timer_pending() -> bool:
    return signal.getitimer(signal.ITIMER_REAL)[0] != 0.0


def _descriptor(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, ValueError, OSError):  # not a file's stream, or closed
        return None


def _reopened(stream: Any, fd: int | None) -> Any:
    """A new text stream like ``stream`` (closed) on its file descriptor ``fd``; the
    closed one if that cannot be done (the descriptor is gone too, or there was none)."""
    if fd is None:
        return stream
    try:
        return open(  # the worker's stream for as long as it lives: never closed
            fd,
            "w",
            buffering=1 if stream.line_buffering else -1,
            encoding=stream.encoding,
            errors=stream.errors,
            closefd=False,
        )
    except (OSError, ValueError, AttributeError, TypeError):
        return stream


def _retarget_log_handlers(old: tuple[Any, ...], new: tuple[Any, ...]) -> None:
    """Logging handlers that wrote to a stream replaced by ``new`` write to its successor."""
    replaced = {id(a): b for a, b in zip(old, new) if a is not b}
    if not replaced:
        return
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and id(stream) in replaced:
                with handler.lock or contextlib.nullcontext():  # not setStream: it flushes
                    handler.stream = replaced[id(stream)]  # the old one, closed
