"""``python -m fade.demo``: a visibly parallel job on the embedded pool.

Counts the primes below a bound in slices, one task per slice, and prints which
worker process did each slice, then the throughput of a burst of tiny tasks.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import time

import fade

__all__ = ["count_primes", "main"]


def count_primes(lo: int, hi: int) -> tuple[int, int, int, int]:
    """Primes in [lo, hi), by trial division: plain Python, CPU-bound on purpose."""
    count = 0
    for n in range(max(lo, 2), hi):
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            count += 1
    return lo, hi, count, os.getpid()


def _noop(x: int) -> int:
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fade.demo", description=__doc__)
    parser.add_argument("--bound", type=int, default=400_000)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--address", default=None, help="use a running broker instead")
    args = parser.parse_args(argv)
    # Run as ``python -m fade.demo`` this module is __main__; take the task functions
    # from the importable fade.demo so that they travel by reference.
    from fade.demo import _noop, count_primes

    step = -(-args.bound // args.slices)
    bounds = [(lo, min(lo + step, args.bound)) for lo in range(0, args.bound, step)]
    started = time.perf_counter()
    with fade.Executor(args.address, max_workers=args.workers) as ex:
        print(
            f"fade {fade.__version__}: counting primes below {args.bound:,} in {len(bounds)} tasks"
        )
        per_worker: collections.Counter[int] = collections.Counter()
        total = 0
        for lo, hi, count, pid in ex.map(count_primes, *zip(*bounds)):
            per_worker[pid] += 1
            total += count
            print(f"  [{lo:>9,}, {hi:>9,})  {count:>6,} primes   worker pid {pid}")
        elapsed = time.perf_counter() - started
        print(f"{total:,} primes in {elapsed:.2f}s on {len(per_worker)} worker processes")

        n = 20_000
        t0 = time.perf_counter()
        futures = [ex.submit(_noop, i) for i in range(n)]
        assert [f.result() for f in futures] == list(range(n))
        rate = n / (time.perf_counter() - t0)
        print(f"{n:,} tiny tasks: {rate:,.0f} tasks/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
