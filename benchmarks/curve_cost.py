"""What CurveZMQ encryption costs fade: the harness's steps on fade-tcp, without and with keys.

    python benchmarks/curve_cost.py [--mode smoke|full] [--json PATH]

    for keys in (off, on):
        fade.broker tcp://127.0.0.1:PORT [--keys DIR]  +  fade.worker --processes 2 [--keys FILE]
        fade.Executor(address[, keys=FILE]) -> ExecutorTarget: warm-up, submit, map, latency, 50 MB

Both runs use the same machine, loopback TCP, worker count and measurement code as the harness
(``benchmarks.metrics``); only the keys differ. The table shows each figure without and with keys
and the change, as ``name : value [unit]`` rows aligned in columns.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (like its siblings) or as a module: either way ``benchmarks`` imports.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from benchmarks.metrics import METRICS, SIZES, WORKERS, Deadline, ExecutorTarget, Sizes  # noqa: E402
from benchmarks.procs import free_tcp_address, module_processes  # noqa: E402

__all__ = ["main", "measure"]

TIME_LIMIT_S = 300.0


@contextmanager
def _pool(keys_dir: Path | None) -> Iterator[ExecutorTarget]:
    import fade
    from fade import security

    address = free_tcp_address()
    broker = ["fade.broker", address]
    worker = ["fade.worker", address, "--processes", str(WORKERS)]
    client_key = None
    if keys_dir is not None:
        security.create_key_dir(keys_dir)
        client_key = security.add_peer(keys_dir, "client", "bench", keys_dir / "client.key")
        worker_key = security.add_peer(keys_dir, "worker", "bench-w", keys_dir / "worker.key")
        broker += ["--keys", str(keys_dir)]
        worker += ["--keys", str(worker_key)]
    with (
        module_processes([broker, worker]),
        fade.Executor(address, keys=client_key, share_threshold=None) as ex,  # transport
    ):
        yield ExecutorTarget(ex)


def measure(with_keys: bool, sizes: Sizes) -> dict[str, float]:
    """Every metric of the harness but start-up, on fade-tcp with or without keys."""
    deadline = Deadline(TIME_LIMIT_S)
    with tempfile.TemporaryDirectory(prefix="fade-curve-") as tmp:
        started = time.perf_counter()
        with _pool(Path(tmp) / "pool" if with_keys else None) as target:
            target.first_result(deadline)
            figures = {"startup_s": time.perf_counter() - started}
            for _, step in target.steps(sizes):
                figures.update(step(deadline))
    return figures


def _table(plain: dict[str, float], curve: dict[str, float]) -> str:
    rows = [("", "no keys", "keys", "change")]
    for metric in METRICS:
        if metric.key not in plain or metric.key not in curve:
            continue
        before, after = plain[metric.key], curve[metric.key]
        change = (after - before) / before * 100 if before else float("nan")
        rows.append(
            (
                f"{metric.label} [{metric.unit}]",
                f"{before:,.1f}",
                f"{after:,.1f}",
                f"{change:+.1f}%",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append(f"{cells[0]} : {'  '.join(cells[1:])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = SIZES[args.mode]
    plain = measure(False, sizes)
    curve = measure(True, sizes)
    print(f"fade-tcp, {WORKERS} worker processes, loopback, mode {args.mode}")
    print(_table(plain, curve))
    if args.json is not None:
        args.json.write_text(json.dumps({"no_keys": plain, "keys": curve}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
