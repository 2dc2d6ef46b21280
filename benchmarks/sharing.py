"""Fair share between clients on one pool, measured in worker-seconds (issue 16's cases).

    python benchmarks/sharing.py [--smoke] [--json out.json]

* ``by-time``: 4 worker processes; client A submits 2,000 tasks of 120 ms, client B 600
  tasks of 30 ms one second later. Over the overlap (B's first start to its last end),
  each client's share of the worker-seconds; fair is 50%.
* ``weights``: 3 clients with keys, the broker started with ``--weight heavy=2``, each
  submitting 50 ms tasks; their shares over a window when all three are busy; fair is
  50% / 25% / 25%.

Tasks sleep (the machine's two cores are not the limit) and record when they ran.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

from benchmarks.procs import free_tcp_address, module_processes  # noqa: E402

INTERVAL = "0.5"


def record_span(path: str, tag: str, seconds: float) -> str:
    import os
    import time

    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{tag} {start} {time.time()} {os.getpid()}\n")
    return tag


def _spans(path: Path) -> dict[str, list[tuple[float, float]]]:
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            tag, start, end, _ = line.split()
            runs[tag].append((float(start), float(end)))
    return runs


def _used(runs: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in runs)


def _wait_workers(address: str, count: int, keys: str | None = None) -> None:
    from fade.status import query

    deadline = time.monotonic() + 60
    while len(query(address, keys=keys)["workers"]) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} workers did not register")
        time.sleep(0.1)


def by_time(scale: float) -> dict[str, float]:
    import fade

    address = free_tcp_address()
    log = Path(tempfile.mkdtemp()) / "spans"
    timing = ["--heartbeat-interval", INTERVAL]
    with module_processes(
        [["fade.broker", address, *timing], ["fade.worker", address, "--processes", "4", *timing]]
    ):
        _wait_workers(address, 4)
        with fade.Executor(address) as a, fade.Executor(address) as b:
            long = [a.submit(record_span, str(log), "A", 0.12) for _ in range(int(2000 * scale))]
            time.sleep(1.0)
            short = [b.submit(record_span, str(log), "B", 0.03) for _ in range(int(600 * scale))]
            for future in short:
                future.result(timeout=600)
            a.shutdown(wait=True, cancel_futures=True, terminate=True)
            del long
    runs = _spans(log)
    start, end = min(s for s, _ in runs["B"]), max(e for _, e in runs["B"])
    used = {tag: _used(runs[tag], start, end) for tag in ("A", "B")}
    total = sum(used.values())
    return {"A": used["A"] / total, "B": used["B"] / total, "overlap_s": end - start}


def weights(scale: float) -> dict[str, float]:
    import fade
    from fade import security

    root = Path(tempfile.mkdtemp())
    security.create_key_dir(root / "pool")
    worker_key = security.add_peer(root / "pool", "worker", "w", root / "w.key")
    names = ["heavy", "light1", "light2"]
    keys = {n: security.add_peer(root / "pool", "client", n, root / f"{n}.key") for n in names}
    address = free_tcp_address()
    log = root / "spans"
    timing = ["--heartbeat-interval", INTERVAL]
    broker = ["fade.broker", address, "--keys", str(root / "pool"), "--weight", "heavy=2", *timing]
    workers = ["fade.worker", address, "--processes", "4", "--keys", str(worker_key), *timing]
    with module_processes([broker, workers]):
        _wait_workers(address, 4, str(keys["heavy"]))
        executors = [fade.Executor(address, keys=keys[n]) for n in names]
        try:
            for n, ex in zip(names, executors):
                for _ in range(int(400 * scale)):
                    ex.submit(record_span, str(log), n, 0.05)
            time.sleep(6.0 * scale + 1.0)
        finally:
            for ex in executors:
                ex.shutdown(wait=True, cancel_futures=True, terminate=True)
    runs = _spans(log)
    start = max(min(s for s, _ in runs[n]) for n in names)
    end = start + 5.0 * scale
    used = {n: _used(runs[n], start, end) for n in names}
    total = sum(used.values())
    return {n: used[n] / total for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fair share between clients, by time.")
    parser.add_argument("--smoke", action="store_true", help="a tenth of the tasks")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    scale = 0.1 if args.smoke else 1.0
    figures = {"by-time": by_time(scale), "weights": weights(scale)}
    shares = figures["by-time"]
    print(f"{'by time: A (2000 x 120 ms)':<40} : {shares['A']:.1%}   (fair: 50%)")
    print(f"{'by time: B (600 x 30 ms, 1 s later)':<40} : {shares['B']:.1%}   (fair: 50%)")
    print(f"{'by time: overlap':<40} : {shares['overlap_s']:.1f} [s]")
    for name, fair in (("heavy", 0.5), ("light1", 0.25), ("light2", 0.25)):
        print(
            f"{'weights 2:1:1: ' + name:<40} : {figures['weights'][name]:.1%}   (fair: {fair:.0%})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
