#!/usr/bin/env python
"""Large arguments: one big array given to many tasks, and many distinct arrays through a
small cache. Runs on any fade checkout, so that today's main and this code are measured by
the same script.

    python benchmarks/bigdata.py same [--tasks 200] [--mb 200] [--hosts 2] [--json PATH]
        a broker and HOSTS worker groups ("hosts": each its own fade-worker and, where fade
        has one, its own data cache folder), one client; TASKS tasks each given the same
        MB-megabyte float64 array; each returns a checksum of it, compared with the
        client's. Reports the wall time from the first submit to the last result, the
        payload bytes the broker relayed (STATUS, where fade counts them) and the bytes
        the broker process wrote to sockets (/proc/PID/io, any fade), each against one
        copy of the array per host.

    python benchmarks/bigdata.py distinct [--tasks 1000] [--mb 10] [--cache 1G] ...
        TASKS tasks, each given a different array (made as it is submitted, at most
        --window pending), one worker group with a data cache of --cache bytes. Samples
        the cache folder's size and the worker processes' memory while it runs; checks
        every result.

    --fade DIR   import fade from DIR (a checkout) instead of this one, in every process:
                 `git archive main | tar -x -C /tmp/fade-main` then `--fade /tmp/fade-main`
                 measures main with this script.
    --no-share   on a fade that sends by content, turn it off (share_threshold=None).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fade_dir(argv: list[str]) -> Path:
    """The checkout whose fade every process imports (read before anything imports it)."""
    if "--fade" in argv:
        at = argv.index("--fade")
        if at + 1 < len(argv):
            return Path(argv[at + 1]).resolve()
    return ROOT


FADE_DIR = _fade_dir(sys.argv)
# This script imports nothing from benchmarks/: the fade it measures may be another
# checkout, whose benchmarks/ differs. Its task function is pickled by value.
if str(FADE_DIR) in sys.path:
    sys.path.remove(str(FADE_DIR))
sys.path.insert(0, str(FADE_DIR))

import argparse  # noqa: E402
import datetime  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

import fade  # noqa: E402
from fade.sockets import parse_size  # noqa: E402

MB = 2**20
DEADLINE_S = 3600.0


def checksum(a: Any) -> float:
    """A cheap checksum of a large array (every 4096th element, and its size): the task
    costs next to nothing, so the figures measure how the array travels."""
    return float(a[::4096].sum()) + float(a.size)


def free_tcp_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    started = time.time()
    load_before = os.getloadavg()
    figures = same(args) if args.command == "same" else distinct(args)
    document = {
        "benchmark": args.command,
        "date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "fade_dir": str(FADE_DIR),
        "fade_file": fade.__file__,
        "shares": _shares(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "arguments": {k: v for k, v in vars(args).items() if k != "json"},
        **figures,
    }
    for name, value in figures.items():
        if not isinstance(value, (list, dict)):
            print(f"{name:32}: {value}")
    if args.json:
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0 if figures.get("correct") else 1


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("same", "distinct"))
    parser.add_argument("--tasks", type=int, help="tasks (same: 200; distinct: 1000)")
    parser.add_argument("--mb", type=float, help="MiB per array (same: 200; distinct: 10)")
    parser.add_argument("--hosts", type=int, default=2, help="worker groups (same)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes per group")
    parser.add_argument("--cache", default="1G", help="data cache bound (distinct)")
    parser.add_argument("--window", type=int, default=8, help="pending tasks at most (distinct)")
    parser.add_argument("--fade", type=Path, help="import fade from this checkout")
    parser.add_argument("--no-share", action="store_true", help="share_threshold=None")
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    if args.command == "same":
        args.tasks = args.tasks or 200
        args.mb = args.mb or 200.0
    else:
        args.tasks = args.tasks or 1000
        args.mb = args.mb or 10.0
    return args


def _shares() -> bool:
    """Whether this fade sends large arguments by content."""
    return "share_threshold" in inspect.signature(fade.Executor).parameters


@contextmanager
def _pool(
    hosts: int, processes: int, cache: int | None, workdir: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], list[str]]]:
    """A broker and ``hosts`` worker groups, each with its own data cache folder."""
    address = free_tcp_address()
    env = {**os.environ, "PYTHONPATH": str(FADE_DIR)}
    env["FADE_CODE_CACHE"] = os.path.join(workdir, "code")
    common = ["--log-level", "WARNING"]
    # cwd: "python -m" puts it first on sys.path, where it must not find another fade.
    broker = [sys.executable, "-m", "fade.broker", address, *common]
    procs = [subprocess.Popen(broker, env=env, cwd=workdir)]
    caches = []
    try:
        for host in range(hosts):
            extra = []
            if _shares():
                caches.append(os.path.join(workdir, f"host{host}"))
                extra = ["--data-cache-dir", caches[-1]]
                if cache is not None:
                    extra += ["--data-cache", str(cache)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fade.worker", address, "--processes",
                     str(processes), *common, *extra],
                    env=env,
                    cwd=workdir,
                )
            )  # fmt: skip
        yield address, procs[0], caches
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _executor(address: str, args: argparse.Namespace) -> Any:
    if args.no_share:
        return fade.Executor(address, share_threshold=None)
    return fade.Executor(address)


def _tcp_bytes(address: str) -> int:
    """Bytes the broker's TCP connections have sent and received so far, as the kernel
    counts them (``ss``: bytes_sent + bytes_received of each established connection on
    its port): any fade version, payloads and protocol alike."""
    port = address.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(n) for n in re.findall(r"bytes_(?:sent|received):(\d+)", out))


def _relayed(address: str) -> dict[str, int]:
    from fade.status import query

    state = query(address, timeout=10)
    return dict(state.get("relayed_bytes", {}))


def same(args: argparse.Namespace) -> dict[str, Any]:
    size = int(args.mb * MB) // 8
    array = np.random.default_rng(17).random(size)
    expected = checksum(array)
    with (
        tempfile.TemporaryDirectory(prefix="fade-bigdata-") as workdir,
        _pool(args.hosts, args.processes, None, workdir) as (address, _, _),
        _executor(address, args) as ex,
    ):
        ex.submit(checksum, np.zeros(4)).result(timeout=120)  # every process up, code shipped
        _wait_for_workers(address, args.hosts * args.processes)
        before_io, before = _tcp_bytes(address), _relayed(address)
        started = time.perf_counter()
        futures = [ex.submit(checksum, array) for _ in range(args.tasks)]
        results = [f.result(timeout=DEADLINE_S) for f in futures]
        wall = time.perf_counter() - started
        after_io, after = _tcp_bytes(address), _relayed(address)
    copies = args.hosts * array.nbytes
    relayed = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    out: dict[str, Any] = {
        "correct": all(r == expected for r in results),
        "tasks": args.tasks,
        "array_mb": array.nbytes / MB,
        "hosts": args.hosts,
        "wall_s": round(wall, 3),
        "per_task_s": round(wall / args.tasks, 4),
        # In and out: one copy per host crosses the broker twice (client in, worker out).
        "broker_tcp_mb": round((after_io - before_io) / MB, 1),
        "broker_tcp_per_host_copy": round((after_io - before_io) / (2 * copies), 3),
    }
    if relayed:
        out["relayed"] = relayed
        out["relayed_mb"] = round(sum(relayed.values()) / MB, 1)
        out["relayed_per_host_copy"] = round(sum(relayed.values()) / copies, 3)
    return out


def _wait_for_workers(address: str, count: int) -> None:
    from fade.status import query

    deadline = time.monotonic() + 60
    while len(query(address, timeout=10)["workers"]) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} workers after 60 s")
        time.sleep(0.1)


def distinct(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    bound = parse_size(args.cache)
    size = int(args.mb * MB) // 8
    peak = {"cache": 0, "rss": 0}
    stop = threading.Event()
    with (
        tempfile.TemporaryDirectory(prefix="fade-bigdata-") as workdir,
        _pool(1, args.processes, bound, workdir) as (address, _, caches),
        _executor(address, args) as ex,
    ):
        ex.submit(checksum, np.zeros(4)).result(timeout=120)
        _wait_for_workers(address, args.processes)
        workers = [
            p for p in psutil.process_iter(["cmdline"]) if "--child" in (p.info["cmdline"] or [])
            and address in p.info["cmdline"]
        ]  # fmt: skip

        def sample() -> None:
            while not stop.wait(0.05):
                if caches:
                    peak["cache"] = max(peak["cache"], _folder_bytes(caches[0]))
                rss = 0
                for proc in workers:
                    try:
                        rss += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                peak["rss"] = max(peak["rss"], rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        wrong = 0
        pending: list[tuple[Any, float]] = []
        for i in range(args.tasks):
            array = np.random.default_rng(i).random(size)
            pending.append((ex.submit(checksum, array), checksum(array)))
            del array
            if len(pending) >= args.window:
                future, expected = pending.pop(0)
                wrong += future.result(timeout=DEADLINE_S) != expected
        for future, expected in pending:
            wrong += future.result(timeout=DEADLINE_S) != expected
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        final = _folder_bytes(caches[0]) if caches else 0
        entries = len(os.listdir(os.path.join(caches[0], "entries"))) if caches else 0
    return {
        "correct": wrong == 0,
        "wrong": wrong,
        "tasks": args.tasks,
        "array_mb": size * 8 / MB,
        "cache_bound_mb": bound / MB,
        "cache_peak_mb": round(peak["cache"] / MB, 1),
        "cache_final_mb": round(final / MB, 1),
        "cache_entries_final": entries,
        "workers_rss_peak_mb": round(peak["rss"] / MB, 1),
        "wall_s": round(wall, 3),
        "mb_per_s": round(args.tasks * size * 8 / MB / wall, 1),
    }


def _folder_bytes(path: str) -> int:
    """Bytes of the files under a data cache folder (apparent sizes: what the bound
    counts), walked holding the cache's index lock: entries move from tmp/ to entries/ by
    a rename made under it, and an unlocked walk could count one twice."""
    import fcntl

    lock = os.path.join(path, "locks", "index")
    fd = (
        os.open(lock, os.O_RDWR | os.O_CREAT, 0o600) if os.path.isdir(os.path.dirname(lock)) else -1
    )
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        total = 0
        for folder, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    pass
        return total
    finally:
        if fd >= 0:
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
