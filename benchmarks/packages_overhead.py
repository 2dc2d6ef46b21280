"""The steady-state cost of tracking installed packages, per submit, against ship_packages="off".

    python benchmarks/packages_overhead.py [--rounds N] [--tasks N] [--json out.json]

Measures in one run, in alternating rounds (medians printed, ratios of medians); the
per-call and per-submit figures are CPU time of the calling thread, which a busy
machine disturbs far less than the wall clock:

* client side, per call, for four kinds of call: the payload as ``ship_packages="off"``
  builds it (``dumps_call``), and as ``"auto"`` does (``dumps_tracked_call``: the
  modules noted, the environment looked up):
  a function by reference with small ints; the same with a numpy array; a closure
  with a dict (cloudpickle, by value); a function with a list of objects (cloudpickle);
* ``Executor.submit`` itself, on a live pool (a broker and two worker processes that
  have the client's packages), for tasks that use numpy: N submits timed without
  waiting for their results, then drained, with an executor of each setting in turn;
* end to end: submit-and-wait throughput of N such tasks with each setting.

The target (issue 19): the per-submit cost with packages tracked within 5% of "off".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import fade
from fade import serialization as ser
from fade.packages import InstalledPackages

#: The user's module (a local one, shipped as code): its functions pickle by reference.
MODULE = """
from dataclasses import dataclass
import numpy as np

@dataclass
class Point:
    x: float
    y: float

def scale(values, factor=2):
    return np.asarray(values) * factor
"""


def _user_module() -> Any:
    folder = tempfile.mkdtemp(prefix="fade-bench-packages-")
    Path(folder, "pkgbench_user.py").write_text(MODULE)
    sys.path.insert(0, folder)
    import pkgbench_user  # type: ignore[import-not-found]

    return pkgbench_user


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _per_call(fn: Callable[[], object], n: int) -> float:
    """Microseconds of this thread's CPU per call: what other processes on a busy machine
    do to the wall clock does not count."""
    started = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - started) / n * 1e6


def _calls(user: Any) -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
    offset = 3

    def closure(d: dict[str, int]) -> int:
        return len(d) + offset

    return {
        "by reference, ints": (user.scale, (1, 2)),
        "by reference, numpy array": (user.scale, (np.arange(1000),)),
        "closure, dict": (closure, ({"a": 1, "b": 2},)),
        "by reference, objects": (user.scale, ([user.Point(1.0, 2.0) for _ in range(4)],)),
    }


def client_side(user: Any, rounds: int, n: int) -> dict[str, dict[str, float]]:
    tracker = InstalledPackages()
    out: dict[str, dict[str, float]] = {}
    for label, (fn, args) in _calls(user).items():

        def off(fn: Callable[..., Any] = fn, args: tuple[Any, ...] = args) -> object:
            return ser.dumps_call(fn, args, {}, b"")

        def auto(fn: Callable[..., Any] = fn, args: tuple[Any, ...] = args) -> object:
            return ser.dumps_tracked_call(fn, args, {}, b"", tracker.environment)

        auto()  # the environment is computed once; what follows is the steady state
        times: dict[str, list[float]] = {"off": [], "auto": []}
        for _ in range(rounds):
            times["off"].append(_per_call(off, n))
            times["auto"].append(_per_call(auto, n))
        out[label] = {k: statistics.median(v) for k, v in times.items()}
    return out


def _executor(address: str, ship_packages: str) -> fade.Executor:
    return fade.Executor(address, ship_packages=ship_packages)


def on_a_pool(user: Any, rounds: int, tasks: int) -> dict[str, dict[str, float]]:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "FADE_CODE_CACHE": tempfile.mkdtemp(prefix="fade-bench-cache-")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "fade.broker", address, "--log-level", "WARNING"]),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fade.worker",
                address,
                "--processes",
                "2",
                "--log-level",
                "WARN",
            ],
            env=env,
            start_new_session=True,
        ),
    ]
    submit: dict[str, list[float]] = {"off": [], "auto": []}
    throughput: dict[str, list[float]] = {"off": [], "auto": []}
    arrays = [np.arange(i % 7 + 1) for i in range(tasks)]
    try:
        executors = {mode: _executor(address, mode) for mode in ("off", "auto")}
        for ex in executors.values():
            ex.submit(user.scale, arrays[0]).result(timeout=60)  # start-up and the first fetch
        for _ in range(rounds):
            for mode, ex in executors.items():
                started = time.thread_time()  # this thread's CPU, as above
                futures = [ex.submit(user.scale, a) for a in arrays]
                submit[mode].append((time.thread_time() - started) / tasks * 1e6)
                for f in futures:
                    f.result(timeout=120)
                started = time.perf_counter()
                for f in [ex.submit(user.scale, a) for a in arrays]:
                    f.result(timeout=120)
                throughput[mode].append(tasks / (time.perf_counter() - started))
        for ex in executors.values():
            ex.shutdown()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM) if proc is procs[1] else proc.terminate()
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "submit_us": {k: statistics.median(v) for k, v in submit.items()},
        "tasks_per_s": {k: statistics.median(v) for k, v in throughput.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10_000, help="per round, client side")
    parser.add_argument("--tasks", type=int, default=2_000, help="per round, on the pool")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    user = _user_module()
    client = client_side(user, args.rounds, args.calls)
    pool = on_a_pool(user, args.rounds, args.tasks)

    width = max(len(k) for k in client) + 2

    def row(label: str, off: float, auto: float, digits: int) -> None:
        print(f"  {label:<{width}}: {off:8.{digits}f}   {auto:8.{digits}f}   {auto / off:8.3f}")

    print(f"client-side cost per call (µs, median of {args.rounds} alternating rounds)")
    print(f"  {'call':<{width}}   {'off':>8}   {'auto':>8}   {'auto/off':>8}")
    for label, figures in client.items():
        row(label, figures["off"], figures["auto"], 2)
    submit, rate = pool["submit_us"], pool["tasks_per_s"]
    print(f"on a pool of 2 worker processes, {args.tasks} numpy tasks per round")
    row("Executor.submit (µs)", submit["off"], submit["auto"], 2)
    row("end to end (tasks/s)", rate["off"], rate["auto"], 0)
    ratio = submit["auto"] / submit["off"]
    verdict = "PASS" if ratio <= 1.05 else "MISS"
    print(f"target: Executor.submit, packages tracked, within 5% of 'off': {verdict} ({ratio:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"client_us": client, **pool}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
