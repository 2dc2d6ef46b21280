"""How fast running work stops (issue 16's cases), with real processes.

    python benchmarks/terminate.py [--smoke] [--runs N] [--json out.json]

* ``terminate``: a task sleeping 600 s on a pool of 4 worker processes; the time from
  ``Executor.terminate(future)`` to its future failing with TaskTerminatedError (the
  next task then runs on the same pool). Bound asked for: 2 x the heartbeat interval.
* ``killed client``: a client with 100 tasks of 600 s (4 running, 96 queued) is
  SIGKILLed; the time until the broker shows nothing running or queued. Bound asked
  for: interval x liveness, the time in which the broker can know the client is gone.

Heartbeat interval 0.2 s x liveness 3, as in the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from benchmarks.procs import free_tcp_address, module_processes  # noqa: E402

INTERVAL, LIVENESS = 0.2, 3
TIMING = ["--heartbeat-interval", str(INTERVAL), "--heartbeat-liveness", str(LIVENESS)]
WORKERS = 4


def sleep_and_return(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def _until(condition: Callable[[], bool], limit: float, what: str, address: str = "") -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            state = _state(address) if address else {}
            raise SystemExit(f"gave up waiting for {what}: {state}")
        time.sleep(0.005)


def _state(address: str) -> dict:  # type: ignore[type-arg]
    from fade.status import query

    return query(address)


def measure_terminate(address: str, runs: int) -> list[float]:
    import fade

    took = []
    with fade.Executor(address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS) as ex:
        for _ in range(runs):
            future = ex.submit(sleep_and_return, 600)
            _until(lambda: _state(address)["running"] == 1, 30, "the task to start")
            asked = time.monotonic()
            ex.terminate(future)
            try:
                future.result(timeout=30)
            except fade.TaskTerminatedError:
                pass
            took.append(time.monotonic() - asked)
            assert ex.submit(sleep_and_return, 0).result(timeout=30) == 0
    return took


CLIENT = """
import sys, time
sys.path.insert(0, {root!r})
import fade
from benchmarks.terminate import sleep_and_return
ex = fade.Executor({address!r}, heartbeat_interval={interval}, heartbeat_liveness={liveness})
futures = [ex.submit(sleep_and_return, 600) for _ in range(100)]
print("submitted", flush=True)
time.sleep(600)
"""


def measure_killed_client(address: str, runs: int) -> list[float]:
    script = textwrap.dedent(
        CLIENT.format(root=str(ROOT), address=address, interval=INTERVAL, liveness=LIVENESS)
    )
    took = []
    for _ in range(runs):
        client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "submitted"
            _until(lambda: _state(address)["running"] >= WORKERS, 30, "every worker busy", address)
            killed = time.monotonic()
            client.kill()
            client.wait()

            def freed() -> bool:
                state = _state(address)
                return state["running"] == 0 and state["queued"] == 0

            _until(freed, 30, "the workers to be freed")
            took.append(time.monotonic() - killed)
        finally:
            client.kill()
            client.wait()
    return took


def _row(name: str, values: list[float], bound: float) -> dict[str, float | str]:
    return {
        "case": name,
        "runs": len(values),
        "min_s": min(values),
        "median_s": statistics.median(values),
        "max_s": max(values),
        "bound_s": bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two runs of each (for tests)")
    parser.add_argument("--runs", type=int, default=10, help="runs of each case (10)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = parser.parse_args()
    runs = 2 if args.smoke else args.runs
    address = free_tcp_address()
    broker = ["fade.broker", address, *TIMING]
    workers = ["fade.worker", address, "--processes", str(WORKERS), *TIMING]
    with module_processes([broker, workers]):
        _until(lambda: len(_state(address)["workers"]) == WORKERS, 60, "the workers")
        rows = [
            _row("terminate", measure_terminate(address, runs), 2 * INTERVAL),
            _row("killed client", measure_killed_client(address, runs), INTERVAL * LIVENESS),
        ]
    print(f"interval {INTERVAL} s x liveness {LIVENESS}; {WORKERS} worker processes")
    print(f"{'case':<15}{'runs':>5}{'min s':>9}{'median s':>10}{'max s':>8}{'bound s':>9}")
    for r in rows:
        print(
            f"{r['case']:<15}{r['runs']:>5}{r['min_s']:>9.3f}{r['median_s']:>10.3f}"
            f"{r['max_s']:>8.3f}{r['bound_s']:>9.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
