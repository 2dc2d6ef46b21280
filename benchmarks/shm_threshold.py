#!/usr/bin/env python
"""Where shared memory starts to pay: round trips of one array through the embedded pool,
as frames, by content and through shared memory (fade/shm.py), size by size, in turns.

    shm_threshold.py ──> three embedded pools at once: frames (share_threshold=None,
                         shared_memory=False), by content (shared_memory=False), and shared
                         memory for every buffer of at least 64 KiB (threshold lowered)
                     ──> for each size: R rounds, each of M round trips of
                         ``submit(identity, array).result()`` on each pool in turn
                     ──> per size: median round trip on each, and their ratio

Both pools send arguments as they would by default otherwise (``share_threshold=None``:
nothing by content), the default (by content from 1 MiB: hashed, fetched, cached) and
segments. Each call changes a byte of the array unless ``--same``: an array used once; with
``--keep``, each round keeps its results until it ends. Usage:
``python benchmarks/shm_threshold.py [--rounds R] [--calls M] [--same] [--keep] [--json F]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402

import fade  # noqa: E402
from benchmarks.tasks import identity  # noqa: E402
from fade import shm  # noqa: E402

#: Bytes per array: 64 KiB (the smallest out-of-band buffer) to 50 MB (bench.py's).
SIZES = (64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20, 16 * 2**20, 50 * 10**6)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--sizes", type=lambda text: [int(x) for x in text.split(",")], default=SIZES
    )
    parser.add_argument(
        "--same",
        action="store_true",
        help="send the very same bytes every time (else one byte changes per call, so that "
        "by content must fetch each time, as for an array used once)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep every result of a round (as a caller collecting results does), so that "
        "no result's memory can be reused for the next",
    )
    args = parser.parse_args(argv)
    frames = fade.Executor(max_workers=2, share_threshold=None, shared_memory=False)
    content = fade.Executor(max_workers=2, shared_memory=False)
    segments = fade.Executor(max_workers=2, share_threshold=None, shared_memory=True)
    assert segments._segments is not None
    segments._segments.threshold = 64 * 2**10  # every out-of-band buffer, to compare
    pools = {"frames": frames, "by content": content, "shared memory": segments}
    rows = []
    try:
        for pool in pools.values():  # warm: workers up, the client's folder known
            for size in args.sizes:
                pool.submit(identity, np.ones(size, np.uint8)).result(timeout=60)
        print(
            f"{'size':>10} : {'frames µs':>10} {'content µs':>10} {'shm µs':>10} {'shm/frames':>10}"
        )
        for size in args.sizes:
            array = np.ones(size, np.uint8)
            samples: dict[str, list[float]] = {name: [] for name in pools}
            for r in range(args.rounds):
                order = list(pools.items())[r % 3 :] + list(pools.items())[: r % 3]
                for name, pool in order:
                    kept = []
                    for _ in range(args.calls):
                        if not args.same:
                            array[0] = (int(array[0]) + 1) % 256
                        started = time.perf_counter()
                        result = pool.submit(identity, array).result(timeout=60)
                        samples[name].append(time.perf_counter() - started)
                        if args.keep:
                            kept.append(result)
                        del result
                    del kept
            median = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
            ratio = median["shared memory"] / median["frames"]
            rows.append({"size": size, **median, "ratio": ratio})
            print(
                f"{size:>10} : {median['frames']:>10.0f} {median['by content']:>10.0f} "
                f"{median['shared memory']:>10.0f} "
                f"{ratio:>10.2f}"
            )
    finally:
        for pool in pools.values():
            pool.shutdown()
    print(f"threshold now : {shm.DEFAULT_THRESHOLD} bytes")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
