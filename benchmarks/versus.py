#!/usr/bin/env python
"""Two fade checkouts side by side in one run: small-task figures, in alternating rounds.

    python benchmarks/versus.py --a /tmp/fade-main [--b .] [--rounds 20] [--tasks 20000]

``git archive main | tar -x -C /tmp/fade-main`` makes the first. Each checkout gets a
driver process that imports only that checkout's fade and starts its own pool, as
``bench.py``'s fade-tcp does (a broker and ``fade-worker --processes 2`` on loopback TCP),
all at once (an idle pool costs nothing). Then, round after round, each driver in turn (a
new order every round) measures bench.py's "submit" step (N x ``submit(noop, i)``, then
wait for all: tasks/s), its "map chunksize=1" step, and M sequential round trips (median
latency). Reported: each side's medians, and the median of the per-round ratios b/a, so
that drift on a shared machine hits both alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__" and "--driver" in sys.argv:
    # A driver imports fade from the checkout it was given, and nothing else of ours.
    sys.path.insert(0, sys.argv[sys.argv.index("--driver") + 1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

SETTLE_S = 2.0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--driver" in args:
        return _drive(args[args.index("--driver") + 1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", type=Path, default=ROOT, help="checkout B (default: this one)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per submit/map step")
    parser.add_argument("--calls", type=int, default=200, help="round trips per round")
    parser.add_argument("--json", type=Path, metavar="PATH")
    opts = parser.parse_args(args)
    sides = {"a": opts.a.resolve(), "b": opts.b.resolve()}
    load_before = os.getloadavg()
    drivers = {name: _Driver(path) for name, path in sides.items()}
    try:
        time.sleep(SETTLE_S)
        for driver in drivers.values():
            driver.ask(f"warm {opts.calls}")
        rounds: list[dict[str, dict[str, float]]] = []
        order = random.Random(7)
        for _ in range(opts.rounds):
            names = list(drivers)
            order.shuffle(names)
            rounds.append(
                {name: drivers[name].ask(f"round {opts.tasks} {opts.calls}") for name in names}
            )
    finally:
        for driver in drivers.values():
            driver.close()
    document = _summarise(rounds, sides, opts, load_before)
    _print(document)
    if opts.json:
        opts.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0


class _Driver:
    """One checkout's driver process, spoken to one line at a time."""

    def __init__(self, checkout: Path) -> None:
        self._dir = tempfile.mkdtemp(prefix="fade-versus-")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--driver", str(checkout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=self._dir,  # "python -m" children put it first on sys.path: no fade there
            env={**os.environ, "PYTHONPATH": str(checkout)},
        )

    def ask(self, line: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"driver {self.proc.args!r} ended")
        figures: dict[str, float] = json.loads(answer)
        return figures

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _drive(checkout: str) -> int:
    """In a driver process: start a pool of this checkout's fade, answer each request."""
    import fade
    from benchmarks.tasks import noop

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    common = ["--log-level", "WARNING"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "fade.broker", address, *common]),
        subprocess.Popen(
            [sys.executable, "-m", "fade.worker", address, "--processes", "2", *common]
        ),
    ]
    try:
        with fade.Executor(address) as ex:
            print(f"driver for {fade.__file__}", file=sys.stderr)
            for line in sys.stdin:
                command, *numbers = line.split()
                sizes = [int(n) for n in numbers]
                if command == "warm":
                    [f.result(timeout=120) for f in [ex.submit(noop, i) for i in range(8)]]
                    for i in range(sizes[0]):
                        ex.submit(noop, i).result(timeout=60)
                    figures: dict[str, float] = {}
                else:
                    figures = _round(ex, noop, *sizes)
                print(json.dumps(figures), flush=True)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


def _round(ex: Any, noop: Any, tasks: int, calls: int) -> dict[str, float]:
    started = time.perf_counter()
    [f.result(timeout=300) for f in [ex.submit(noop, i) for i in range(tasks)]]
    submit = tasks / (time.perf_counter() - started)
    started = time.perf_counter()
    count = sum(1 for _ in ex.map(noop, range(tasks), chunksize=1, timeout=300))
    mapped = count / (time.perf_counter() - started)
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        ex.submit(noop, i).result(timeout=60)
        samples.append(time.perf_counter() - started)
    return {
        "submit_tps": submit,
        "map_c1_tps": mapped,
        "lat_median_us": statistics.median(samples) * 1e6,
    }


def _summarise(
    rounds: list[dict[str, dict[str, float]]],
    sides: dict[str, Path],
    opts: argparse.Namespace,
    load_before: Sequence[float],
) -> dict[str, Any]:
    keys = ("submit_tps", "map_c1_tps", "lat_median_us")
    out: dict[str, Any] = {
        "sides": {k: str(v) for k, v in sides.items()},
        "rounds": opts.rounds,
        "tasks": opts.tasks,
        "calls": opts.calls,
        "cpus": os.cpu_count(),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "per_round": rounds,
        "figures": {},
    }
    for key in keys:
        a = [r["a"][key] for r in rounds]
        b = [r["b"][key] for r in rounds]
        ratios = [y / x for x, y in zip(a, b)]
        out["figures"][key] = {
            "a_median": statistics.median(a),
            "b_median": statistics.median(b),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return out


def _print(document: dict[str, Any]) -> None:
    sides = document["sides"]
    print(f"a = {sides['a']}\nb = {sides['b']}")
    print(
        f"{document['rounds']} alternating rounds; load average "
        f"{document['load_before'][0]:.2f} before, {document['load_after'][0]:.2f} after"
    )
    print(f"{'metric':16} {'a':>10} {'b':>10} {'b/a (median of rounds, range)':>32}")
    for key, f in document["figures"].items():
        print(
            f"{key:16} {f['a_median']:>10,.0f} {f['b_median']:>10,.0f} "
            f"{f['ratio_median']:>12.3f}x ({f['ratio_min']:.2f}-{f['ratio_max']:.2f})"
        )


if __name__ == "__main__":
    sys.exit(main())
