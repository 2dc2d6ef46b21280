#!/usr/bin/env python
"""How much of a pool's time goes to the tasks: a sweep over task durations.

    durations.py ──> starts every pool at once (fade over TCP: broker + fade-worker
                     --processes W; the embedded pool: fade.Executor(max_workers=W); two
                     baselines: concurrent.futures.ProcessPoolExecutor(W), and "loop", the
                     tasks called one after another in this process, W = 1), then
                       for each duration D and kind (sleep: time.sleep(D); cpu: a busy loop
                       of D seconds), R rounds (--repeat), each over every pool in a new
                       order: an untimed warm-up, then N tasks submitted at once and their
                       results read in order, as ``map`` does
                 ──> efficiency = ideal / measured time, ideal = N x D / W, the median of
                     the R runs (0 ms has no ideal: tasks/s instead)
                 ──> --json PATH: every cell's figures and the machine

``bench.py`` measures no-ops and large payloads only; real tasks take milliseconds, and a pool
can fail there (issue 13, item 0: 1-2 ms tasks ran at 5-13 tasks/s while 0.2 ms and 5 ms
ones ran normally). N is chosen so that each cell's ideal time is about ``--cell-seconds``; a
cell that has not finished after ``--cell-limit`` seconds is cut: its efficiency counts the
tasks done by then, and it is marked. The "loop" column is what the tasks themselves allow:
``time.sleep(D)`` overruns D by the kernel's timer slack and wake-up (about 0.08 ms here), so
0.5 ms sleeps reach only about 0.86 even with no pool at all. Usage:
``python benchmarks/durations.py [--smoke] [--durations 0.5,1,2] [--json out.json]``;
``--client-delay 2`` puts the tcp pool's client 2 ms from its broker (each way).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # "python benchmarks/durations.py" puts benchmarks/ on the path
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import zmq  # noqa: E402

import fade  # noqa: E402
from benchmarks.delayproxy import delayed  # noqa: E402
from benchmarks.metrics import Deadline  # noqa: E402
from benchmarks.procs import free_tcp_address, module_processes  # noqa: E402
from benchmarks.tasks import pid_after, spin  # noqa: E402

DURATIONS_MS = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0)
KINDS = ("sleep", "cpu")
POOLS = ("tcp", "embedded", "processpool", "loop")
FADE_POOLS = ("tcp", "embedded")  # the target is theirs; processpool shows what the machine allows
WORKER_COUNTS = (1, 2)
TARGET = 0.8  # issue 13, item 0: efficiency above this for every duration >= TARGET_FROM_MS
TARGET_FROM_MS = 0.5
#: mode: (durations, ideal seconds per cell, cell limit in seconds, tasks at 0 ms per worker)
MODES: dict[str, tuple[tuple[float, ...], float, float, int]] = {
    "full": (DURATIONS_MS, 0.5, 5.0, 2000),
    "smoke": ((0.0, 1.0, 5.0), 0.03, 2.0, 100),
}
REPEAT = 1  # runs per cell; the table shows the median
MIN_TASKS_PER_WORKER = 10  # a cell of long tasks still has this many per worker
WARM_UP_S = 0.15  # of work per worker before each cell: the workers' prefetch adapts to D,
# and they use up the credits granted for shorter tasks (up to 1 + MAX_PREFETCH each)
WARM_UP_NOOPS = 200  # per worker before a 0 ms cell
START_TIMEOUT_S = 60.0  # for a pool's W workers to be serving


@dataclass(slots=True)
class Cell:
    """One measured cell of the sweep."""

    pool: str
    workers: int
    kind: str
    duration_ms: float
    tasks: int
    done: int
    seconds: float
    tasks_per_s: float
    efficiency: float | None  # None at 0 ms
    cut: bool  # not finished within the cell limit: figures over the tasks done by then
    runs: list[float]  # every run's efficiency (tasks/s at 0 ms); the cell is their median


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    load_before = os.getloadavg()
    with ExitStack() as stack:
        pools = _open_all(stack, args)
        cells = _sweep(pools, args)
    document = _document(cells, args, load_before)
    print("\n".join(_report(document)))
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--durations", type=_floats, help="task durations in ms, e.g. 0.5,1,2")
    parser.add_argument("--kinds", type=_names(KINDS), default=KINDS, help="sleep,cpu")
    parser.add_argument(
        "--pools", type=_names(POOLS), default=POOLS, help="tcp,embedded,processpool"
    )
    parser.add_argument("--workers", type=_counts, default=WORKER_COUNTS, help="e.g. 1,2")
    parser.add_argument("--cell-seconds", type=float, help="ideal seconds per cell (0.5)")
    parser.add_argument("--cell-limit", type=float, help="seconds before a cell is cut (5)")
    parser.add_argument("--repeat", type=int, default=REPEAT, help="runs per cell (median)")
    parser.add_argument(
        "--client-delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="the tcp pool's client reaches its broker through a proxy that delays each "
        "way by MS (benchmarks/delayproxy.py): a client on another host",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    durations, cell_seconds, cell_limit, zero_tasks = MODES["smoke" if args.smoke else "full"]
    args.durations = args.durations or durations
    args.cell_seconds = args.cell_seconds or cell_seconds
    args.cell_limit = args.cell_limit or cell_limit
    args.zero_tasks = zero_tasks
    if min(args.durations) < 0 or args.cell_seconds <= 0 or args.cell_limit <= 0:
        parser.error("durations must be >= 0, --cell-seconds and --cell-limit > 0")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.client_delay < 0:
        parser.error("--client-delay must be >= 0")
    return args


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


def _counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(part) for part in text.split(","))
    if min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts must be at least 1")
    return counts


def _names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        unknown = set(names) - set(allowed)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(unknown))}")
        return names

    return parse


# -- pools ------------------------------------------------------------------------------------


@contextmanager
def _open_pool(pool: str, workers: int, client_delay_s: float = 0.0) -> Iterator[cf.Executor]:
    """Start a pool of ``workers`` worker processes and yield it once all of them serve."""
    if pool == "loop":
        yield _InProcess()
        return
    if pool == "processpool":
        with cf.ProcessPoolExecutor(workers) as executor:
            _wait_until_serving(executor, workers)
            yield executor
        return
    if pool == "embedded":
        with fade.Executor(max_workers=workers) as executor:
            _wait_until_serving(executor, workers)
            yield executor
        return
    address = free_tcp_address()
    commands = [
        ["fade.broker", address, "--log-level", "WARNING"],
        ["fade.worker", address, "--processes", str(workers), "--log-level", "WARNING"],
    ]
    with ExitStack() as stack:
        stack.enter_context(module_processes(commands))
        if client_delay_s:
            address = stack.enter_context(delayed(address, client_delay_s))
        executor = stack.enter_context(fade.Executor(address))
        _wait_until_serving(executor, workers)
        yield executor


class _InProcess(cf.Executor):
    """Runs each call at once in the caller's thread: the tasks' own cost, no pool."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _wait_until_serving(executor: cf.Executor, workers: int) -> None:
    """Until ``workers`` distinct worker processes have run a task, so that no cell runs
    while a worker is still starting."""
    deadline = Deadline(START_TIMEOUT_S)
    seen: set[int] = set()
    while len(seen) < workers:
        futures = [executor.submit(pid_after, 0.02) for _ in range(2 * workers)]
        seen.update(f.result(deadline.remaining()) for f in futures)


def _open_all(stack: ExitStack, args: argparse.Namespace) -> dict[tuple[str, int], cf.Executor]:
    """Start every pool at once (an idle pool costs nothing); (pool, workers) -> executor."""
    return {
        (pool, workers): stack.enter_context(_open_pool(pool, workers, args.client_delay / 1000))
        for pool in args.pools
        for workers in args.workers
        if pool != "loop" or workers == 1  # the loop is one thread: one worker
    }


# -- the sweep --------------------------------------------------------------------------------


def _sweep(pools: dict[tuple[str, int], cf.Executor], args: argparse.Namespace) -> list[Cell]:
    """Row by row (duration, kind), each row ``--repeat`` rounds over every pool in a new
    order each round: a row's cells are measured within seconds of one another, so the
    machine's other load hits them alike. Each cell is its median run."""
    shuffle = random.Random(13)  # fixed: reruns visit the pools in the same orders
    cells = []
    for duration_ms in args.durations:
        for kind in args.kinds:
            runs: dict[tuple[str, int], list[Cell]] = {key: [] for key in pools}
            for _ in range(args.repeat):
                order = list(pools)
                shuffle.shuffle(order)
                for pool, workers in order:
                    cell = _measure(pools[pool, workers], pool, workers, kind, duration_ms, args)
                    runs[pool, workers].append(cell)
            for key in pools:
                cell = _median(runs[key])
                print(_progress_line(cell), file=sys.stderr, flush=True)
                cells.append(cell)
    return cells


def _median(runs: list[Cell]) -> Cell:
    """The median run, carrying every run's figure."""
    median = sorted(runs, key=_figure_of)[len(runs) // 2]
    median.runs = [_figure_of(run) for run in runs]
    return median


def _figure_of(cell: Cell) -> float:
    return cell.tasks_per_s if cell.efficiency is None else cell.efficiency


def _measure(
    executor: cf.Executor,
    pool: str,
    workers: int,
    kind: str,
    duration_ms: float,
    args: argparse.Namespace,
) -> Cell:
    """Warm up, then time N tasks submitted at once and read in order."""
    fn: Callable[[float], Any] = time.sleep if kind == "sleep" else spin
    seconds = duration_ms / 1000
    tasks = _task_count(seconds, workers, args)
    warm_up = workers * (max(2, math.ceil(WARM_UP_S / seconds)) if seconds else WARM_UP_NOOPS)
    _run(executor, fn, seconds, warm_up, Deadline(60.0))
    started = time.perf_counter()
    done, cut = _run(executor, fn, seconds, tasks, Deadline(args.cell_limit))
    elapsed = time.perf_counter() - started
    return Cell(
        pool=pool,
        workers=workers,
        kind=kind,
        duration_ms=duration_ms,
        tasks=tasks,
        done=done,
        seconds=elapsed,
        tasks_per_s=done / elapsed,
        efficiency=done * seconds / workers / elapsed if seconds else None,
        cut=cut,
        runs=[],
    )


def _task_count(seconds: float, workers: int, args: argparse.Namespace) -> int:
    """Enough tasks for an ideal time of ``--cell-seconds``, at least MIN_TASKS_PER_WORKER
    per worker; a fixed count at 0 ms."""
    if seconds == 0:
        return int(args.zero_tasks * workers)
    return workers * max(MIN_TASKS_PER_WORKER, round(args.cell_seconds / seconds))


def _run(
    executor: cf.Executor, fn: Callable[[float], Any], seconds: float, tasks: int, limit: Deadline
) -> tuple[int, bool]:
    """Submit ``tasks`` calls at once and wait for each result in order, as ``map`` does;
    (tasks done, whether ``limit`` cut the run). After a cut, what has not started is
    cancelled and what runs is waited for, so the next cell starts on an idle pool."""
    futures = [executor.submit(fn, seconds) for _ in range(tasks)]
    try:
        for future in futures:
            future.result(limit.remaining())
        return tasks, False
    except (TimeoutError, cf.TimeoutError):
        done = sum(f.done() for f in futures)
        for future in futures:
            future.cancel()
        cf.wait(futures, timeout=60.0)
        return done, True


def _progress_line(cell: Cell) -> str:
    figure = f"{cell.tasks_per_s:,.0f} tasks/s"
    if cell.efficiency is not None:
        figure = f"efficiency {cell.efficiency:.2f} ({figure})"
    cut = f"; cut after {cell.done} of {cell.tasks} tasks" if cell.cut else ""
    runs = f"; runs {', '.join(f'{run:.2f}' for run in cell.runs)}" if len(cell.runs) > 1 else ""
    return (
        f"{cell.pool} {cell.workers}w {cell.kind} {cell.duration_ms:g} ms: "
        f"{cell.tasks} tasks in {cell.seconds:.2f}s, {figure}{cut}{runs}"
    )


# -- report -----------------------------------------------------------------------------------


def _document(cells: list[Cell], args: argparse.Namespace, load_before: Sequence[float]) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        "fade": fade.__version__,
        "git_commit": _git_commit(),
        "mode": "smoke" if args.smoke else "full",
        "cell_seconds": args.cell_seconds,
        "cell_limit": args.cell_limit,
        "repeat": args.repeat,
        "client_delay_ms": args.client_delay,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "target": {"efficiency": TARGET, "from_ms": TARGET_FROM_MS},
        "cells": [asdict(cell) for cell in cells],
    }


def _report(document: dict[str, Any]) -> list[str]:
    """The aligned table: a row per duration and kind, a column per pool and worker count."""
    cells = [Cell(**cell) for cell in document["cells"]]
    columns = list(dict.fromkeys((c.pool, c.workers) for c in cells))
    rows = list(dict.fromkeys((c.duration_ms, c.kind) for c in cells))
    by_key = {(c.duration_ms, c.kind, c.pool, c.workers): c for c in cells}
    lines = [
        f"task-duration sweep ({document['mode']}): efficiency = ideal / measured time, "
        "ideal = tasks x duration / workers; at 0 ms, tasks/s",
        f"{document['cpus']} cpus; python {document['python']}; median of {document['repeat']} "
        f"run(s) per cell; load average {document['load_before'][0]:.2f} before, "
        f"{document['load_after'][0]:.2f} after",
        *_delay_lines(document),
        "",
        f"{'duration':>9} {'kind':5} " + " ".join(f"{f'{p} {w}w':>15}" for p, w in columns),
    ]
    for duration_ms, kind in rows:
        figures = [_figure(by_key.get((duration_ms, kind, p, w))) for p, w in columns]
        lines.append(f"{duration_ms:>6g} ms {kind:5} " + " ".join(f"{f:>15}" for f in figures))
    if any(c.cut for c in cells):
        lines.append(f"* cut after {document['cell_limit']:g}s: the figure counts the tasks done")
    lines.append(_target_line(cells))
    return lines


def _delay_lines(document: dict[str, Any]) -> list[str]:
    delay = document.get("client_delay_ms") or 0
    if not delay:
        return []
    return [f"the tcp pool's client is {delay:g} ms from its broker, each way (a delay proxy)"]


def _figure(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    text = f"{cell.tasks_per_s:,.0f}/s" if cell.efficiency is None else f"{cell.efficiency:.2f}"
    return text + ("*" if cell.cut else " ")


def _target_line(cells: list[Cell]) -> str:
    judged = [
        c
        for c in cells
        if c.pool in FADE_POOLS and c.efficiency is not None and c.duration_ms >= TARGET_FROM_MS
    ]
    missed = [c for c in judged if c.efficiency is not None and c.efficiency <= TARGET]
    head = f"target: fade's efficiency > {TARGET} for every duration >= {TARGET_FROM_MS:g} ms: "
    if not judged:
        return head + "no cell measured"
    if not missed:
        return head + f"PASS ({len(judged)} cells)"
    named = ", ".join(f"{c.pool} {c.workers}w {c.kind} {c.duration_ms:g} ms" for c in missed)
    return head + f"MISS in {len(missed)} of {len(judged)} cells: {named}"


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
