"""Sweep an epidemic model over a grid of parameters on a fade pool.

    python examples/parameter_sweep.py                          # embedded pool
    python examples/parameter_sweep.py --address tcp://head:5555  # a running pool
    python examples/parameter_sweep.py --smoke                  # a tiny grid

The model lives in ``sweep_model.py`` beside this script, a local module that
the workers do not have: fade ships it to them with the tasks.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence

import sweep_model

import fade


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="broker address (default: embedded)")
    parser.add_argument("--smoke", action="store_true", help="a tiny grid for a quick check")
    args = parser.parse_args(argv)
    size, days = (4, 120) if args.smoke else (40, 365)
    betas = [0.1 + 0.9 * k / (size - 1) for k in range(size)]
    gammas = [0.05 + 0.45 * k / (size - 1) for k in range(size)]
    grid = list(itertools.product(betas, gammas))

    started = time.perf_counter()
    with fade.Executor(args.address) as ex:
        outcomes = list(ex.map(sweep_model.simulate, *zip(*grid), [days] * len(grid), chunksize=4))
    elapsed = time.perf_counter() - started

    worst = max(outcomes, key=lambda o: o.peak_infected)
    mildest = max(outcomes, key=lambda o: o.never_infected)
    print(f"{len(outcomes)} runs of sweep_model.simulate in {elapsed:.2f} s")
    for name, o in (("worst", worst), ("mildest", mildest)):
        print(
            f"{name:>8}: beta={o.beta:.3f} gamma={o.gamma:.3f} -> peak {o.peak_infected:.1%}"
            f" on day {o.peak_day}, {o.never_infected:.1%} never infected"
        )


if __name__ == "__main__":
    main()
