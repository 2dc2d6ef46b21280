"""The cost, per task, of putting the worker's state back (fade/taskenv.py).

    python benchmarks/taskenv.py [--rounds N] [--json out.json]

Measures in one process, in alternating rounds (the median of each is printed):

* an empty ``with`` block: the loop and context-manager overhead alone;
* ``with TaskEnvironment``: the usual task, which changes nothing (comparisons only);
* the same after a task that set an environment variable (a restore each time);
* the same after a task that changed the working directory.

The figure that matters is the second minus the first: what every task pays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fade.taskenv import TaskEnvironment

CALLS = 20_000


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def _per_call(body: Callable[[], None], manager: object) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        with manager:  # type: ignore[attr-defined]
            body()
    return (time.perf_counter() - started) / CALLS * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    sys.path.insert(0, "/a/code/tree")  # as code activation leaves it
    env = TaskEnvironment(lambda: "/a/code/tree")
    sys.path.remove("/a/code/tree")
    sys.path.insert(0, "/a/code/tree")
    elsewhere = tempfile.mkdtemp()

    def set_variable() -> None:
        os.environ["FADE_BENCH_TASKENV"] = "1"

    cases: dict[str, tuple[Callable[[], None], object]] = {
        "empty with-block (baseline)": (lambda: None, _Nothing()),
        "TaskEnvironment, task changes nothing": (lambda: None, env),
        "TaskEnvironment, task sets a variable": (set_variable, env),
        "TaskEnvironment, task changes cwd": (lambda: os.chdir(elsewhere), env),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (body, manager) in cases.items():
            times[name].append(_per_call(body, manager))
    os.rmdir(elsewhere)
    medians = {name: statistics.median(values) for name, values in times.items()}
    medians["per task (changes nothing) minus baseline"] = (
        medians["TaskEnvironment, task changes nothing"] - medians["empty with-block (baseline)"]
    )
    width = max(len(name) for name in medians) + 2
    print(f"cost per task, median of {args.rounds} rounds of {CALLS} (µs)")
    print(
        f"  {'environment size':<{width}}: {len(os.environ):8d} variables, "
        f"{len(sys.path)} sys.path entries"
    )
    for name, value in medians.items():
        print(f"  {name:<{width}}: {value:8.2f} µs")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_task_us": medians}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
