#!/usr/bin/env python
"""fade beside raw pyzmq and ProcessPoolExecutor in alternating rounds: round-trip latency
and 50 MB round trips.

    alternating.py ──> starts fade over TCP (broker + fade-worker, 2 processes), the embedded
                       pool, ProcessPoolExecutor(2) and raw pyzmq's broker + 2 workers, all at
                       once (idle pools cost nothing), then runs R rounds of M sequential
                       round trips of a no-op on each system in turn, in a new order every
                       round, then R rounds of B round trips of a 50 MB array likewise
                   ──> per system: latency median and p99 over all round trips, 50 MB MB/s
                       over all; per fade system: the median of its per-round ratios to raw
                       pyzmq, for both; for the embedded pool also to ProcessPoolExecutor
                       (issue 18's round-trip target)
                   ──> --json PATH: the figures, every round's figures and the machine

``bench.py`` measures each system in its own process, one after another, minutes apart. On a
shared machine raw pyzmq's median moved from 339 to 482 µs between such runs while fade's stayed
put, which is larger than the gap being measured. Here every round compares the systems within a
few hundred milliseconds of each other, so drift hits them alike. Usage:
``python benchmarks/alternating.py [--smoke] [--rounds R] [--calls M] [--json out.json]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # "python benchmarks/alternating.py" puts benchmarks/ on the path
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from typing import Any  # noqa: E402

import zmq  # noqa: E402

from benchmarks.metrics import (  # noqa: E402
    BIG_ARRAY_MB,
    Deadline,
    big_array,
    check_big,
    latency_summary,
)
from benchmarks.rawclient import open_raw  # noqa: E402
from benchmarks.systems import open_target  # noqa: E402
from benchmarks.tasks import identity, noop  # noqa: E402

BASELINE = "raw-zmq"
PROCESSPOOL = "processpool"
SYSTEM_NAMES = ("fade-tcp", "fade-embedded", PROCESSPOOL, BASELINE)
TARGET_LATENCY = 1.3  # issue #5: fade's median round trip <= 1.3x raw pyzmq's
TARGET_LOCAL_LATENCY = 1.2  # issue 18: the embedded pool's <= 1.2x ProcessPoolExecutor's
TARGET_BIG = 0.8  # issue #5: fade's 50 MB round trips >= 0.8x raw pyzmq's bandwidth
MODES = {"smoke": (4, 50, 1), "full": (20, 100, 2)}  # rounds; calls and 50 MB trips per round
WARM_UP_CALLS = 200
SETTLE_S = 2.0  # after starting everything: let the last processes finish their imports
DEADLINE_S = 600.0

Call = Callable[[int, Any], Any]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    load_before = os.getloadavg()
    with ExitStack() as stack:
        calls = _open_all(stack, Deadline(DEADLINE_S))
        rounds = _measure(calls, args.rounds, args.calls, args.big)
    document = _summarise(rounds, args, load_before)
    _print(document)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds (for tests)")
    parser.add_argument("--rounds", type=int, help="rounds (default: 20; smoke 4)")
    parser.add_argument("--calls", type=int, help="round trips per system per round (100)")
    parser.add_argument("--big", type=int, help="50 MB round trips per system per round (2)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    rounds, calls, big = MODES["smoke" if args.smoke else "full"]
    args.rounds = args.rounds or rounds
    args.calls = args.calls or calls
    args.big = args.big or big
    if args.rounds < 1 or args.calls < 1 or args.big < 1:
        parser.error("--rounds, --calls and --big must be at least 1")
    return args


def _open_all(stack: ExitStack, deadline: Deadline) -> dict[str, Call]:
    """Start every system; one warmed-up call function each."""
    calls: dict[str, Call] = {}
    for name in SYSTEM_NAMES:
        if name == BASELINE:
            raw = stack.enter_context(open_raw())
            calls[name] = lambda fn, arg, raw=raw: raw._call(fn, arg, deadline)
        else:
            target: Any = stack.enter_context(open_target(name))
            executor = target.executor
            calls[name] = lambda fn, arg, ex=executor: ex.submit(fn, arg).result(
                deadline.remaining()
            )
    time.sleep(SETTLE_S)
    array = big_array()
    for call in calls.values():
        for i in range(WARM_UP_CALLS):
            call(noop, i)
        check_big(call(identity, array), array)
    return calls


def _measure(
    calls: dict[str, Call], rounds: int, per_round: int, big: int
) -> list[dict[str, tuple[list[float], float]]]:
    """R rounds of ``per_round`` sequential round trips (seconds each) on each system, then
    R rounds of ``big`` 50 MB round trips (MB/s over them): apart, so that the large
    transfers do not disturb the small ones. Each round visits the systems in a new order."""
    shuffle = random.Random(5)  # fixed: reruns visit the systems in the same orders
    times: list[dict[str, list[float]]] = []
    for _ in range(rounds):
        samples = {}
        for name in _shuffled(calls, shuffle):
            call, samples[name] = calls[name], []
            for i in range(per_round):
                started = time.perf_counter()
                call(noop, i)
                samples[name].append(time.perf_counter() - started)
        times.append(samples)
    array = big_array()
    out = []
    for samples in times:
        figures = {}
        for name in _shuffled(calls, shuffle):
            started = time.perf_counter()
            for _ in range(big):
                check_big(calls[name](identity, array), array)
            figures[name] = (
                samples[name],
                2 * BIG_ARRAY_MB * big / (time.perf_counter() - started),
            )
        out.append(figures)
    return out


def _shuffled(calls: dict[str, Call], shuffle: random.Random) -> list[str]:
    order = list(calls)
    shuffle.shuffle(order)
    return order


def _summarise(
    rounds: list[dict[str, tuple[list[float], float]]],
    args: argparse.Namespace,
    load_before: Sequence[float],
) -> dict[str, Any]:
    systems: dict[str, dict[str, Any]] = {}
    for name in SYSTEM_NAMES:
        every = [t for r in rounds for t in r[name][0]]
        systems[name] = {
            **latency_summary(every),
            "round_medians_us": [statistics.median(r[name][0]) * 1e6 for r in rounds],
            "round_big_mbps": [r[name][1] for r in rounds],
        }
        systems[name]["big_mbps"] = statistics.median(systems[name]["round_big_mbps"])
    base = systems[BASELINE]
    for name in SYSTEM_NAMES:
        if name != BASELINE:
            figures = systems[name]
            if name == "fade-embedded":
                pool = systems[PROCESSPOOL]
                versus = _ratios(figures["round_medians_us"], pool["round_medians_us"])
                figures["pp_ratio_per_round"] = versus
                figures["pp_ratio_median"] = statistics.median(versus)
            latency = _ratios(figures["round_medians_us"], base["round_medians_us"])
            big = _ratios(figures["round_big_mbps"], base["round_big_mbps"])
            figures["ratio_per_round"] = latency
            figures["ratio_median"] = statistics.median(latency)
            figures["big_ratio_per_round"] = big
            figures["big_ratio_median"] = statistics.median(big)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "big_per_round": args.big,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "systems": systems,
    }


def _ratios(fade: list[float], raw: list[float]) -> list[float]:
    return [f / r for f, r in zip(fade, raw)]


def _print(document: dict[str, Any]) -> None:
    print(
        f"{document['rounds']} alternating rounds of {document['calls_per_round']} round trips "
        f"and {document['big_per_round']} of {BIG_ARRAY_MB} MB per system; "
        f"{document['cpus']} cpus; load average {document['load_before'][0]:.2f} before, "
        f"{document['load_after'][0]:.2f} after"
    )
    print(
        f"{'system':14} {'median µs':>10} {'p99 µs':>8} {'vs raw':>22}"
        f" {'50 MB MB/s':>11} {'vs raw':>22}"
    )
    for name, figures in document["systems"].items():
        print(
            f"{name:14} {figures['lat_median_us']:>10,.0f} {figures['lat_p99_us']:>8,.0f} "
            f"{_ratio_cell(figures, 'ratio'):>22} {figures['big_mbps']:>11,.0f} "
            f"{_ratio_cell(figures, 'big_ratio'):>22}"
        )
    local = document["systems"]["fade-embedded"]["pp_ratio_median"]
    print(
        f"target: fade-embedded round trip <= {TARGET_LOCAL_LATENCY}x processpool: {local:.2f}x "
        f"{'PASS' if local <= TARGET_LOCAL_LATENCY else 'MISS'}"
    )
    tcp = document["systems"]["fade-tcp"]
    latency, big = tcp["ratio_median"], tcp["big_ratio_median"]
    print(
        f"target: fade-tcp round trip <= {TARGET_LATENCY}x raw-zmq: {latency:.2f}x "
        f"{'PASS' if latency <= TARGET_LATENCY else 'MISS'}"
    )
    print(
        f"target: fade-tcp 50 MB >= {TARGET_BIG}x raw-zmq: {big:.2f}x "
        f"{'PASS' if big >= TARGET_BIG else 'MISS'}"
    )


def _ratio_cell(figures: dict[str, Any], key: str) -> str:
    """The median of the per-round ratios and their range; blank for the baseline."""
    if f"{key}_median" not in figures:
        return ""
    per_round = figures[f"{key}_per_round"]
    return f"{figures[f'{key}_median']:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


if __name__ == "__main__":
    sys.exit(main())
