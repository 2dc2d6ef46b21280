"""Measure one system in this process and record the figures as JSON, step by step.

    bench.py ──> python -m benchmarks.runner SYSTEM --mode smoke|full --time-limit S --out PATH
                   preload(SYSTEM)                         imports, not timed
                   open_target(SYSTEM) ─┐
                   first result        ─┴─ "start to first result"
                   warm-up, submit, map, latency, 50 MB   each step recorded when it ends
                                                           (submit and map: R runs, the median)
                   close                                   phase "shutdown"

The JSON file is rewritten after every step, so when ``bench.py`` kills a runner that overran its
time limit the figures measured before the overrun survive, and the recorded phase says where it
stuck. A step that fails records its error and the next step still runs. Every wait inside a step
is bounded by a deadline set a little before the time limit, to leave time for a clean shutdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.metrics import SIZES, Deadline, Sizes
from benchmarks.systems import open_target, preload, system

__all__ = ["Record", "main", "measure"]

SHUTDOWN_MARGIN_S = 5.0
#: The throughput steps, run ``Sizes.repeats`` times each (the median is reported).
REPEATED_STEPS = frozenset({"submit", "map chunksize=1", "map chunksize=100"})


class Record:
    """What one runner has measured so far, mirrored to a JSON file after every change."""

    def __init__(self, system: str, path: Path) -> None:
        self._path = path
        self.data: dict[str, Any] = {
            "system": system,
            "status": "running",
            "phase": "start",
            "metrics": {},
            "runs": {},  # a repeated step's metric: every run's figure
            "errors": {},
            "error": None,
            "sizes": None,
        }
        self._write()

    def phase(self, name: str) -> None:
        self.data["phase"] = name
        self._write()

    def set_sizes(self, sizes: Sizes) -> None:
        self.data["sizes"] = asdict(sizes)
        self._write()

    def add(self, metrics: dict[str, float]) -> None:
        self.data["metrics"].update(metrics)
        self._write()

    def add_runs(self, runs: list[dict[str, float]]) -> None:
        """Several runs of one step: each metric's median, and every run's figure."""
        if len(runs) == 1:
            self.add(runs[0])
            return
        for key in runs[0]:
            self.data["runs"][key] = [run[key] for run in runs]
        self.add({key: statistics.median(run[key] for run in runs) for key in runs[0]})

    def step_failed(self, step: str, exc: BaseException) -> None:
        self.data["errors"][step] = _describe(exc)
        self._write()

    def failed(self, exc: BaseException) -> None:
        self.data["status"] = "error"
        self.data["error"] = f"{_describe(exc)} (during {self.data['phase']})"
        self._write()

    def finish(self) -> None:
        self.data["status"] = "error" if self.data["errors"] else "ok"
        self.data["phase"] = "done"
        self._write()

    def _write(self) -> None:
        """Atomic replace, so a reader never sees half a file even if we are killed mid-write."""
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self._path)


def _describe(exc: BaseException) -> str:
    """``Type: message``; a bare ``future.result(timeout)`` timeout has no message of its own."""
    message = str(exc) or "no result before the deadline" * isinstance(exc, TimeoutError)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def measure(name: str, sizes: Sizes, deadline: Deadline, record: Record) -> None:
    """Open system ``name``, time the first result, run every step, close."""
    sizes = sizes.scaled(system(name).work)
    record.set_sizes(sizes)
    preload(name)
    started = time.perf_counter()
    with open_target(name) as target:
        record.phase("first result")
        target.first_result(deadline)
        record.add({"startup_s": time.perf_counter() - started})
        for step_name, step in target.steps(sizes):
            record.phase(step_name)
            try:
                repeats = sizes.repeats if step_name in REPEATED_STEPS else 1
                record.add_runs([step(deadline) for _ in range(repeats)])
            except Exception as exc:
                traceback.print_exc()
                record.step_failed(step_name, exc)
        record.phase("shutdown")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every step succeeded, 1 otherwise; the JSON file says what happened."""
    parser = argparse.ArgumentParser(description="Measure one system (run by bench.py).")
    parser.add_argument("system")
    parser.add_argument("--mode", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--time-limit", type=float, required=True, metavar="SECONDS")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    record = Record(args.system, args.out)
    margin = min(SHUTDOWN_MARGIN_S, args.time_limit / 5)
    try:
        measure(args.system, SIZES[args.mode], Deadline(args.time_limit - margin), record)
    except Exception as exc:
        traceback.print_exc()
        record.failed(exc)
        return 1
    record.finish()
    return 0 if record.data["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
