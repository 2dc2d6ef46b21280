"""Estimate pi by throwing random points at a square, in parallel on a fade pool.

    python examples/monte_carlo.py                          # embedded pool, one worker per core
    python examples/monte_carlo.py --address tcp://head:5555  # a running pool
    python examples/monte_carlo.py --smoke                  # tiny sizes, for a quick check

Each task counts the points of its own seeded stream that fall inside the unit
circle, so the estimate is the same on any pool. ``count_inside`` is defined in
this script: fade (cloudpickle) sends it to the workers with each task.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence

import fade


def count_inside(samples: int, seed: int) -> int:
    """How many of ``samples`` random points in the unit square lie in the quarter circle."""
    rng = random.Random(seed)
    inside = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="broker address (default: embedded)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for a quick check")
    args = parser.parse_args(argv)
    tasks, samples = (8, 10_000) if args.smoke else (200, 500_000)

    started = time.perf_counter()
    with fade.Executor(args.address) as ex:
        inside = sum(ex.map(count_inside, [samples] * tasks, range(tasks)))
    elapsed = time.perf_counter() - started

    total = tasks * samples
    estimate = 4 * inside / total
    print(f"pi ~ {estimate:.6f}  (error {abs(estimate - math.pi):.1e})")
    print(
        f"{total:,} points in {tasks} tasks on {args.address or 'an embedded pool'}: "
        f"{elapsed:.2f} s"
    )


if __name__ == "__main__":
    main()
