"""Functions the tests run on workers (importable there by name through PYTHONPATH)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def add(a: int, b: int = 0) -> int:
    return a + b


def square(x: int) -> int:
    return x * x


def identity(x: Any) -> Any:
    return x


def pid() -> int:
    return os.getpid()


def sleep_and_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def sleep_once_path_exists(path: str, seconds: float, value: Any = None) -> Any:
    """Wait (at most 60 s) until ``path`` exists, then sleep ``seconds``; return value.

    Keeps a worker busy until the test says so, instead of for a time that a loaded
    machine may not leave the observer to look."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(seconds)
    return value


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def takes_fn_and_self(*, fn: int, self: int) -> int:
    return fn + self


def record(path: str, value: Any) -> Any:
    """Append a line to ``path`` (to count how often a task really ran), return value."""
    with open(path, "a") as f:
        f.write(f"{value} {os.getpid()}\n")
    return value


def record_run(path: str, value: Any, seconds: float = 0.0) -> Any:
    """Sleep ``seconds``, then append "value pid wall-time" to ``path``; return value."""
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{value} {os.getpid()} {time.time():.6f}\n")
    return value


def record_then_sleep(path: str, value: Any, seconds: float) -> Any:
    record(path, value)
    time.sleep(seconds)
    return value


def slow_where_marked(x: int, seconds: float) -> tuple[int, int]:
    """Sleep ``seconds`` on a worker started with FADE_TEST_SLOW=1; return (x, pid)."""
    if os.environ.get("FADE_TEST_SLOW"):
        time.sleep(seconds)
    return x, os.getpid()


def die(code: int = 13) -> None:
    os._exit(code)


def die_if_first(marker: str, value: Any) -> Any:
    """Kill the worker the first time (creating ``marker``); succeed on a re-run."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os._exit(7)
    return value


def _load_slowly(marker: str, seconds: float) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)


class SlowToLoad:
    """Takes ``seconds`` to unpickle where a task's arguments are loaded, and creates
    ``marker`` when that starts (the task has reached its worker but not its code)."""

    def __init__(self, marker: str, seconds: float) -> None:
        self.marker, self.seconds = marker, seconds

    def __reduce__(self) -> Any:
        return _load_slowly, (self.marker, self.seconds)


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def return_unpicklable() -> Unpicklable:
    return Unpicklable()


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("boom")
        self.lock = __import__("threading").Lock()


def raise_unpicklable() -> None:
    raise UnpicklableError()


class BadRebuild(Exception):
    """Pickles fine on the worker, but cannot be rebuilt (its __init__ needs two arguments)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)


def raise_bad_rebuild() -> None:
    raise BadRebuild(1, 2)


class TwoPartError(Exception):
    """An exception whose __init__ needs two arguments and keeps them: pickle rebuilds
    it by calling the class with ``args`` alone, which raises TypeError."""

    def __init__(self, part: str, detail: str) -> None:
        super().__init__(f"{part}: {detail}")
        self.part = part
        self.detail = detail


def raise_two_part(part: str) -> None:
    raise TwoPartError(part, "broken")


def return_two_part(parts: list[str]) -> list[Any]:
    """Errors returned as values (the ``return_exceptions`` idiom)."""
    return [TwoPartError(part, "returned") for part in parts]


def raise_unrebuildable() -> None:
    """An exception that cannot be rebuilt whatever is tried: an attribute of it
    raises where it is unpickled."""
    error = BadRebuild(1, 2)
    error.payload = ErrorAtUnpickle()  # type: ignore[attr-defined]
    raise error


def array_roundtrip(arr: Any) -> Any:
    return arr * 2


def fail_or_die(x: int, poison: int) -> int:
    """Return x, except that element ``poison`` kills its worker every time."""
    if x == poison:
        os._exit(9)
    return x


def record_then_raise(path: str) -> None:
    record(path, "raise")
    raise ValueError("raised on purpose")


def spin(seconds: float) -> int:
    """Busy-loop in pure Python (holding the GIL between switches) for ``seconds``."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def pid_after(x: int, seconds: float) -> tuple[int, int]:
    """Sleep, then return (x, the worker's pid)."""
    time.sleep(seconds)
    return x, os.getpid()


def raise_big(size: int) -> None:
    """Raise an exception whose pickle is over ``size`` bytes."""
    raise ValueError("too much: " + "x" * size)


def bytes_of_size(size: int) -> bytes:
    return b"z" * size


class ExitsOnUnpickle:
    """A result whose unpickling in the client raises SystemExit."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_exit_now, ())


def _exit_now() -> None:
    raise SystemExit("unpickled")


def exits_on_unpickle() -> ExitsOnUnpickle:
    return ExitsOnUnpickle()


def leave_a_thread_running(seconds: float) -> int:
    """Start a non-daemon thread that outlives the task (it would keep a process alive)."""
    import threading

    threading.Thread(target=time.sleep, args=(seconds,), daemon=False).start()
    return os.getpid()


def ignore_sigterm_and_sleep(seconds: float) -> int:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return os.getpid()


def start_a_child(seconds: float) -> int:
    """Start a process that outlives the task; return its pid."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    return child.pid


def start_a_child_then_sleep(path: str, seconds: float) -> None:
    """Write the pid of a long-lived child to ``path``, then sleep (past a time limit)."""
    with open(path, "w") as f:
        f.write(str(start_a_child(600)))
    time.sleep(seconds)


def change_worker_state(folder: str) -> int:
    """What a careless (or hostile) task does to its worker process; returns its pid."""
    import builtins

    os.chdir(folder)
    os.environ["FADE_LEAKED_SECRET"] = "tenant-a"
    os.environ["PATH"] = folder
    sys.path.insert(0, folder)
    sys.path.append(folder)
    builtins.leaked_by_tenant_a = True  # type: ignore[attr-defined]
    builtins.input = lambda *_: "hijacked"
    import io

    sys.stdout.close()  # and would read what the next tasks print:
    sys.stdout = io.StringIO()
    sys.stderr.close()
    import gc
    import socket
    import warnings

    sys.setrecursionlimit(60)  # the next tenant's recursion fails
    sys.setswitchinterval(1.0)
    sys.setprofile(lambda *args: None)  # a profiler left running slows every task
    gc.disable()
    gc.set_threshold(1, 1, 1)
    socket.setdefaulttimeout(0.001)
    warnings.simplefilter("error")  # every later warning an exception
    return os.getpid()


def worker_state() -> dict[str, object]:
    """What the next task sees of its worker process."""
    import builtins

    return {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "secret": os.environ.get("FADE_LEAKED_SECRET"),
        "PATH": os.environ.get("PATH"),
        "path": [p for p in sys.path if "/trees/" not in p],
        "leaked": hasattr(builtins, "leaked_by_tenant_a"),
        "input": builtins.input.__module__,
        "stdout": (type(sys.stdout).__name__, sys.stdout.closed, _fileno(sys.stdout)),
        "stderr": (type(sys.stderr).__name__, sys.stderr.closed, _fileno(sys.stderr)),
        "printed": print("printed by the next task", flush=True),
        "interpreter": _interpreter_settings(),
    }


def _interpreter_settings() -> dict[str, object]:
    import gc
    import socket
    import warnings

    return {
        "recursion": sys.getrecursionlimit(),
        "switch": sys.getswitchinterval(),
        "profile": sys.getprofile(),
        "trace": sys.gettrace(),
        "gc": (gc.isenabled(), gc.get_threshold()),
        "socket timeout": socket.getdefaulttimeout(),
        "warnings": [f[0] for f in warnings.filters[:3]],
    }


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return None


def record_span(path: str, tag: str, seconds: float) -> str:
    """Sleep ``seconds``; append "tag start end pid" (wall clock) to ``path``."""
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{tag} {start} {time.time()} {os.getpid()}\n")
    return tag


def visible_devices() -> tuple[str | None, int]:
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


def ignore_stop_signal_and_sleep(seconds: float) -> int:
    """A task that will not be interrupted: its process must be replaced to stop it."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    time.sleep(seconds)
    return os.getpid()


# -- what the standard library's own suite (test_concurrent_futures) throws at a pool --------


class ErrorAtPickle:
    """Raises pickle.PicklingError when pickled."""

    def __reduce__(self) -> Any:
        import pickle

        raise pickle.PicklingError("error in pickle")


def raise_unpickling_error() -> None:
    import pickle

    raise pickle.UnpicklingError("error in unpickle")


class ErrorAtUnpickle:
    """Pickles, but raises pickle.UnpicklingError where it is unpickled."""

    def __reduce__(self) -> Any:
        return raise_unpickling_error, ()


class ExitAtUnpickle:
    """Pickles, but calls sys.exit(1) where it is unpickled."""

    def __reduce__(self) -> Any:
        import sys

        return sys.exit, (1,)


def return_instance(cls: type) -> Any:
    return cls()


class Box:
    """A plain object, to watch with a weak reference."""


def make_box(_: Any) -> Box:
    return Box()


INIT_STATUS = "uninitialized"


def init(value: str, log: str | None = None) -> None:
    """An initializer: sets INIT_STATUS; with ``log``, appends this process's pid to it."""
    global INIT_STATUS
    INIT_STATUS = value
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")


def init_status() -> str:
    return INIT_STATUS


def init_fail() -> None:
    raise ValueError("error in initializer")


def init_status_and_pid(_: Any = None) -> tuple[str, int]:
    return INIT_STATUS, os.getpid()


def sleep_and_print(seconds: float, message: str) -> None:
    import sys

    time.sleep(seconds)
    print(message)
    sys.stdout.flush()


def raise_with_comment() -> None:
    raise RuntimeError(123)  # some comment


def checksum(a: Any, pause: float = 0.0) -> float:
    """A cheap checksum of a large array (every 4096th element and its size)."""
    time.sleep(pause)
    return float(a[::4096].sum()) + float(a.size)


def scribble_and_sum(d: Any) -> float:
    """Change the received arrays in place, then sum them: what a task may do to its
    arguments (the worker's copy, never the cached one)."""
    total = 0.0
    for value in d.values():
        if hasattr(value, "sum"):
            value += 1
            total += float(value.sum())
    return total


def backing_file(array: Any) -> str:
    """What backs an array's memory in this process: a file's path (a mapping), or "" for
    anonymous memory; from /proc/self/maps."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    return "?"


def backing_and_back(a: Any) -> tuple[str, Any]:
    """Where the argument's memory came from here, and the argument itself back."""
    return backing_file(a), a


_kept: list[Any] = []


def keep(a: Any) -> float:
    """Keep the argument in this worker process after the task ends (a cache, say)."""
    _kept.append(a)
    return float(a.sum())


def kept_sums() -> list[float]:
    return [float(a.sum()) for a in _kept]


def sees_module(name: str) -> tuple[bool, str, int]:
    """Whether this process can import ``name``; its current folder; its pid."""
    import importlib.util

    return importlib.util.find_spec(name) is not None, os.getcwd(), os.getpid()


def _say_ready_then_sleep(ready: Any, seconds: float) -> None:
    ready.set()
    time.sleep(seconds)


def signal_forked_children() -> tuple[int | None, int | None]:
    """Fork two children that sleep (as a multiprocessing Pool does); end one with SIGTERM
    (Process.terminate) and one with SIGINT; their exit codes (None: still running)."""
    import multiprocessing as mp
    import signal

    fork = mp.get_context("fork")
    codes: list[int | None] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        ready = fork.Event()
        child = fork.Process(target=_say_ready_then_sleep, args=(ready, 60))
        child.start()
        ready.wait(30)  # past its start, however slow: into its sleep
        os.kill(child.pid, sig)
        child.join(10)
        codes.append(child.exitcode)
        if child.exitcode is None:
            child.kill()
            child.join()
    return codes[0], codes[1]


def lose_the_first_stop_then_sleep(seconds: float) -> str:
    """Catch the first interruption (as a stop signal that came just before a blocking
    call is lost: Python runs its handler only when that call returns), then sleep."""
    try:
        time.sleep(seconds)
    except BaseException:
        pass
    time.sleep(seconds)
    return "slept"


def nested_pool_sum(values: list[int]) -> int:
    """Start an embedded pool inside the task (a pool in a worker) and sum through it."""
    import fade

    with fade.Executor(max_workers=1) as ex:
        return sum(ex.map(abs, values))


def init_with_a_pool() -> None:
    """An initializer that starts a pool of its own (its module is already imported)."""
    import fade

    with fade.Executor(max_workers=1) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1


def fork_and_come_back(how: str) -> tuple[str, int]:
    """Fork; the child comes back into its caller's code (returns, raises, or calls
    sys.exit) instead of leaving with os._exit, as careless task code does. The parent
    returns the child's exit status."""
    pid = os.fork()
    if pid == 0:
        if how == "return":
            return "child", os.getpid()
        if how == "raise":
            raise ValueError("raised in the forked child")
        sys.exit(3)
    _, status = os.waitpid(pid, 0)
    return "parent", os.waitstatus_to_exitcode(status)


def fork_in_initializer() -> None:
    """An initializer that forks; its child returns (into its worker's code) too."""
    pid = os.fork()
    if pid != 0:
        os.waitpid(pid, 0)


def note_run(path: str) -> int:
    """Append this process's pid to ``path``: how many times, and where, a task ran."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def _late_alarm(signum: int, frame: Any) -> None:
    raise RuntimeError("an earlier task's alarm went off")


def leave_signals_behind() -> int:
    """Leave what a task should not: a pending alarm whose handler raises, SIGCHLD
    ignored (the kernel then reaps children itself: waitpid fails), SIGPIPE at its
    default (a closed pipe then kills the process), a profiling timer, and the worker's
    own signals (a drain, its stop signal) ignored."""
    for own in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(own, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _late_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    signal.signal(signal.SIGPROF, _late_alarm)
    signal.setitimer(signal.ITIMER_PROF, 30.0, 30.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return os.getpid()


def signals_after(seconds: float) -> tuple[int, int, bool, bool, tuple[float, float], bool]:
    """After ``seconds``: this process, a child's exit status as waitpid sees it, whether
    SIGPIPE is ignored (Python's own setting) and SIGALRM's handler the default, the
    profiling timer, and whether the worker's own signals have handlers of Python code."""
    time.sleep(seconds)
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    _, status = os.waitpid(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    return (
        os.getpid(),
        child.returncode,
        signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN,
        signal.getsignal(signal.SIGALRM) is signal.SIG_DFL,
        signal.getitimer(signal.ITIMER_PROF),
        all(
            callable(signal.getsignal(own))
            for own in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        ),
    )


def wait_on_own_pool(address: str) -> int:
    """Submit a task to the pool this task runs on, and wait for it."""
    import fade

    with fade.Executor(address, heartbeat_interval=0.2) as ex:
        return int(ex.submit(add, 1, 2).result(timeout=120))


def stamp(_: Any) -> float:
    """When it ran (time.monotonic: one clock for every process of a host)."""
    return time.monotonic()


def hold_the_gil(path: str, seconds: float) -> float:
    """Note this process in ``path``, then hold the GIL for at least ``seconds`` in one
    call into native code (a regular expression that backtracks: no other thread of the
    process runs meanwhile, the worker's heartbeats included); how long it held it."""
    import re

    record(path, "held")
    pattern = re.compile(r"(a+)+$")
    for n in itertools.count(18):  # each more "a" doubles the time: no guess needed
        started = time.perf_counter()
        pattern.match("a" * n + "b")
        held = time.perf_counter() - started
        if held >= seconds:
            return held
    raise AssertionError("unreachable")
