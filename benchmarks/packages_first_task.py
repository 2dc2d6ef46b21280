"""The first-task cost of shipping a large compiled distribution (numpy) to a worker host.

    python benchmarks/packages_first_task.py [--repeat N] [--json out.json]

The client is this process (its environment has numpy). The worker runs in a
virtual environment of this machine's Python that has fade's dependencies only (made
once, in the temporary folder, with pip from the local package index); fade comes
from this checkout. For each repetition, with an empty package cache:

* first task: ``numpy.sum(numpy.arange(1000))`` on the worker without numpy: the
  environment's description, numpy's file list and files (about 60 MB) travel
  through the broker, the tree is built, an environment process starts and
  imports numpy;
* second task, same worker process: the steady state;
* a second worker process on the same host (the first one stopped): the cache is
  warm, nothing travels; the tree is checked, a process starts, numpy is imported;
* baseline: the first task on a worker whose environment has numpy installed.

Slow (seconds per repetition), so not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import fade
from fade.status import query

ROOT = Path(__file__).resolve().parents[1]
LOCAL_INDEX = Path("/opt/pypi/simple")


def worker_venv() -> Path:
    """A virtual environment with fade's dependencies and nothing else (made once)."""
    requirements = ["pyzmq>=25", "cloudpickle>=3"]
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:10]
    venv = Path(tempfile.gettempdir()) / f"fade-bench-venv-bare-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        index = ["--index-url", LOCAL_INDEX.as_uri()] if LOCAL_INDEX.is_dir() else []
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *index, *requirements],
            check=True,
            timeout=600,
        )
        (venv / ".complete").touch()
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Pool:
    def __init__(self) -> None:
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker = self._start([sys.executable, "-m", "fade.broker", self.address])

    def _start(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*argv, "--log-level", "WARNING"], env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self, python: Path | str, cache: Path) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        before = len(query(self.address)["workers"])
        proc = self._start(
            [str(python), "-m", "fade.worker", self.address, "--code-cache", str(cache)], env
        )
        _wait(lambda: len(query(self.address)["workers"]) > before, 60, "a worker")
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        before = len(query(self.address)["workers"])
        _end(proc)
        _wait(lambda: len(query(self.address)["workers"]) < before, 30, "a worker to leave")

    def close(self) -> None:
        for proc in reversed(self.procs):
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.05)


def _timed(ex: fade.Executor) -> float:
    started = time.perf_counter()
    assert ex.submit(np.sum, np.arange(1000)).result(timeout=300) == 499500
    return time.perf_counter() - started


def one_round(bare: Path) -> dict[str, float]:
    pool = Pool()
    cache = Path(tempfile.mkdtemp(prefix="fade-bench-pkgcache-"))
    try:
        first = pool.worker(bare, cache)
        figures: dict[str, float] = {}
        with fade.Executor(pool.address) as ex:
            figures["first task, numpy shipped (s)"] = _timed(ex)
            stats = dict(ex._packages.stats)  # type: ignore[union-attr]
            figures["second task, same process (ms)"] = _timed(ex) * 1000
            second = pool.worker(bare, cache)
            pool.stop(first)
            figures["first task, 2nd process, cache warm (s)"] = _timed(ex)
            assert ex._packages.stats == stats, "the second worker process fetched again"  # type: ignore[union-attr]
            pool.stop(second)
            pool.worker(sys.executable, Path(tempfile.mkdtemp(prefix="fade-bench-pkgcache-")))
            figures["baseline: numpy installed there (s)"] = _timed(ex)
        figures["MB shipped"] = stats["bytes_served"] / 1e6
        figures["files shipped"] = stats["files_served"]
        return figures
    finally:
        pool.close()
        shutil.rmtree(cache, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bare = worker_venv()
    rounds = [one_round(bare) for _ in range(args.repeat)]
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"numpy {np.__version__} to a worker host without it (median of {args.repeat})")
    width = max(len(k) for k in medians) + 2
    for key, value in medians.items():
        print(f"  {key:<{width}}: {value:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median": medians}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
