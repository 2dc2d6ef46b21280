"""The steady-state cost of code shipping, per task, against plain cloudpickle.

    python benchmarks/shipping_overhead.py [--tasks N] [--json out.json]

Builds a small local package in a temporary directory, then measures:

* client side, per submit: ``cloudpickle.dumps((fn, args, kwargs))`` (what a
  plain cloudpickle-based pool pays), fade's ``dumps_call`` without code
  shipping, and with it (the version check plus the 16-byte id);
* end to end: submit-and-wait throughput of N tasks of a function from that
  package on an embedded pool, with ``ship_code="auto"`` and with ``"off"``
  (the workers are then given the package on their PYTHONPATH instead).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

import fade
from fade import serialization as ser
from fade.shipping import LocalCode


def _make_package(root: Path) -> str:
    name = "shipbench_pkg"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("from .work import step\n")
    (root / name / "work.py").write_text(
        textwrap.dedent(
            """
            def step(x):
                return x + 1
            """
        )
    )
    return name


def _per_call(fn: Callable[[], Any], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def _throughput(ship_code: str, fn: Callable[[int], int], n: int) -> float:
    with fade.Executor(max_workers=2, ship_code=ship_code) as ex:
        ex.submit(fn, 0).result(timeout=60)  # start-up and the first fetch are not steady state
        started = time.perf_counter()
        futures = [ex.submit(fn, i) for i in range(n)]
        assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(n)]
        return n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        name = _make_package(Path(tmp))
        sys.path.insert(0, tmp)
        pkg = importlib.import_module(name)
        code = LocalCode()
        code.version()
        n = 20_000
        rows = {
            "cloudpickle.dumps((fn, args, kwargs))": _per_call(
                lambda: cloudpickle.dumps((pkg.step, (1,), {}), protocol=5), n
            ),
            "fade dumps_call, ship_code='off'": _per_call(
                lambda: ser.dumps_call(pkg.step, (1,), {}), n
            ),
            "fade dumps_call + version(), ship_code='auto'": _per_call(
                lambda: ser.dumps_call(pkg.step, (1,), {}, code.version()), n
            ),
            "version() alone": _per_call(code.version, n),
        }
        throughput = {"auto": _throughput("auto", pkg.step, args.tasks)}
        # Without shipping, the workers need the package on their path.
        os.environ["PYTHONPATH"] = os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])
        throughput["off"] = _throughput("off", pkg.step, args.tasks)

    width = max(len(k) for k in rows) + 2
    print("client-side cost per submit (µs)")
    for label, value in rows.items():
        print(f"  {label:<{width}}: {value:8.2f} µs")
    print(f"end to end, {args.tasks} tasks, embedded pool of 2 (tasks/s)")
    for mode, value in throughput.items():
        print(f"  {'ship_code=' + repr(mode):<{width}}: {value:8.0f} tasks/s")
    print(f"  {'ratio auto / off':<{width}}: {throughput['auto'] / throughput['off']:8.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"per_submit_us": rows, "tasks_per_s": throughput}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
