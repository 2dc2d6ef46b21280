#!/usr/bin/env python
"""How long a broker pair takes to fail over, and what a failover costs: N runs of SIGKILL.

    failover.py ──> per run: a fresh pair (fade-broker --peer, primary and backup), 2 fade-worker
                    supervisors of 2 processes each, one fade.Executor given both addresses;
                    a map of T tasks of 1 ms that note their run (task, pid, wall time) in a file;
                    SIGKILL of the active broker once K tasks have run
                ──> per run: takeover (the kill to the backup's "-> active" log line), outage (the
                    longest time no task ran after the kill), tasks that ran twice, results that
                    came twice (ClientIO.late_results); every result checked
                ──> min, median, max of each over the runs, beside the bound the issue sets:
                    2 x interval x liveness
                ──> --json PATH: every run's figures and the machine

Usage: ``python benchmarks/failover.py [--runs 10] [--tasks 5000] [--interval 1.0]
[--liveness 3] [--keys] [--json out.json]``; ``--smoke`` is 2 runs of 1,000 tasks at 0.2 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # "python benchmarks/failover.py" puts benchmarks/ on the path
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import zmq  # noqa: E402

import fade  # noqa: E402
from benchmarks.procs import free_tcp_address  # noqa: E402
from benchmarks.tasks import record_run  # noqa: E402
from fade import security  # noqa: E402
from fade.errors import FadeError  # noqa: E402
from fade.status import query  # noqa: E402

WORKER_PROCESSES = (2, 2)  # two fade-worker supervisors: 4 worker processes
TASK_SECONDS = 0.001
WAIT_S = 60.0  # for any one thing to happen (a broker to serve, workers to register)
MODES = {"smoke": (2, 1000, 200, 0.2), "full": (10, 5000, 1000, 1.0)}  # runs, tasks, kill at, s


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fade-failover-") as scratch:
        for number in range(args.runs):
            folder = (args.logs or Path(scratch)) / f"run-{number + 1}"
            folder.mkdir()
            runs.append(_one_run(args, folder))
            _print_run(number, runs[-1])
    document = _summarise(runs, args, load_before)
    _print_summary(document)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(run["correct"] for run in runs) else 1


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 short runs at 0.2 s (for tests)")
    parser.add_argument("--runs", type=int, help="runs (default 10; smoke 2)")
    parser.add_argument("--tasks", type=int, help="tasks per map (default 5000; smoke 1000)")
    parser.add_argument("--kill-at", type=int, help="tasks run before the kill (default 1000)")
    parser.add_argument("--interval", type=float, help="heartbeat interval, s (default 1.0)")
    parser.add_argument("--liveness", type=int, default=3, help="heartbeat liveness (default 3)")
    parser.add_argument("--keys", action="store_true", help="CurveZMQ keys on every socket")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--logs", type=Path, metavar="DIR", help="keep each run's broker logs and task runs here"
    )
    args = parser.parse_args(argv)
    runs, tasks, kill_at, interval = MODES["smoke" if args.smoke else "full"]
    args.runs = args.runs or runs
    args.tasks = args.tasks or tasks
    args.kill_at = args.kill_at or kill_at
    args.interval = args.interval or interval
    if args.runs < 1 or not 0 < args.kill_at < args.tasks or args.interval <= 0:
        parser.error("--runs >= 1, 0 < --kill-at < --tasks and --interval > 0, please")
    return args


# -- one run ------------------------------------------------------------------------------------


class _Pair:
    """A primary and a backup broker and their workers, logs in ``folder``."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.folder = folder
        self.addresses = {"a": free_tcp_address(), "b": free_tcp_address()}
        self.timing = [
            "--heartbeat-interval",
            str(args.interval),
            "--heartbeat-liveness",
            str(args.liveness),
        ]
        self.keys: dict[str, Path] = {}
        if args.keys:
            security.create_key_dir(folder / "pool")
            for role in ("client", "worker"):
                path = security.add_peer(folder / "pool", role, role, folder / f"{role}.key")
                self.keys[role] = path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def both(self) -> str:
        return f"{self.addresses['a']},{self.addresses['b']}"

    def log(self, name: str) -> Path:
        return self.folder / f"broker-{name}.log"

    def start(self) -> None:
        keys = ["--keys", str(self.folder / "pool")] if self.keys else []
        for name, other, role in (("a", "b", "--primary"), ("b", "a", "--backup")):
            with open(self.log(name), "wb") as log:
                self.procs[name] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fade.broker",
                        self.addresses[name],
                        "--peer",
                        self.addresses[other],
                        role,
                        *self.timing,
                        *keys,
                    ],
                    stderr=log,
                )
        worker_keys = ["--keys", str(self.keys["worker"])] if self.keys else []
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        with open(self.folder / "workers.log", "wb") as log:
            for processes in WORKER_PROCESSES:
                self.workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "fade.worker",
                            self.both,
                            "--processes",
                            str(processes),
                            *self.timing,
                            *worker_keys,
                        ],
                        stderr=log,
                        env=env,
                    )
                )
        _wait(lambda: self._serving("a", sum(WORKER_PROCESSES)), "the primary and its workers")

    def _serving(self, name: str, workers: int) -> bool:
        client_keys = str(self.keys["client"]) if self.keys else None
        try:
            state = query(self.addresses[name], timeout=2.0, keys=client_keys)
        except FadeError:
            return False
        return bool(state["pair"]["active"]) and len(state["workers"]) >= workers

    def kill_active(self) -> float:
        """SIGKILL the primary; the wall time of the kill."""
        killed = time.time()
        self.procs["a"].send_signal(signal.SIGKILL)
        return killed

    def takeover_at(self) -> float | None:
        """The wall time at which the backup logged that it serves, or None."""
        for line in self.log("b").read_text(errors="replace").splitlines():
            if "pair:" in line and "-> active" in line:
                stamp = " ".join(line.split()[:2])  # "2026-12-01 17:31:43,207"
                when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
                return when.timestamp()
        return None

    def stop(self) -> None:
        for proc in [*self.workers, *self.procs.values()]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()


@contextmanager
def _pair(args: argparse.Namespace, folder: Path) -> Iterator[_Pair]:
    pair = _Pair(args, folder)
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()


def _one_run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    runs_log = folder / "runs.txt"
    with _pair(args, folder) as pair:
        client_keys = str(pair.keys["client"]) if pair.keys else None
        executor = fade.Executor(
            pair.both,
            keys=client_keys,
            heartbeat_interval=args.interval,
            heartbeat_liveness=args.liveness,
        )
        with executor:
            killer = _KillAt(runs_log, args.kill_at, pair.kill_active)
            killer.start()
            started = time.monotonic()
            results = list(
                executor.map(
                    record_run,
                    [str(runs_log)] * args.tasks,
                    range(args.tasks),
                    [TASK_SECONDS] * args.tasks,
                )
            )
            elapsed = time.monotonic() - started
            killer.join(WAIT_S)
            late = executor._io.late_results
        takeover = pair.takeover_at()
    killed = killer.when
    runs = _runs(runs_log)
    counts = collections.Counter(task for task, _ in runs)
    if killed is None:
        raise RuntimeError("the map ended before the kill: use more --tasks or a lower --kill-at")
    after = sorted(when for _, when in runs if when > killed)
    gaps = [b - a for a, b in zip([killed, *after], after)]
    return {
        "correct": results == list(range(args.tasks)) and set(counts) == set(range(args.tasks)),
        "takeover_s": None if takeover is None else takeover - killed,
        "outage_s": max(gaps) if gaps else None,
        "ran_twice": sum(1 for n in counts.values() if n > 1),
        "runs": sum(counts.values()),
        "late_results": late,
        "map_s": elapsed,
    }


class _KillAt(threading.Thread):
    """Calls ``kill`` once ``count`` tasks have run (as the runs file says)."""

    def __init__(self, log: Path, count: int, kill: Callable[[], float]) -> None:
        super().__init__(daemon=True)
        self.log, self.count, self.kill = log, count, kill
        self.when: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.log.exists() and self.log.read_bytes().count(b"\n") >= self.count:
                self.when = self.kill()
                return
            time.sleep(0.002)


def _runs(log: Path) -> list[tuple[int, float]]:
    lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return [(int(task), float(when)) for task, _, when in lines]


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"gave up after {WAIT_S:g}s waiting for {what}")


# -- the figures ---------------------------------------------------------------------------------


def _summarise(
    runs: list[dict[str, Any]], args: argparse.Namespace, load_before: Sequence[float]
) -> dict[str, Any]:
    bound = 2 * args.interval * args.liveness
    summary = {}
    for key in ("takeover_s", "outage_s", "ran_twice", "late_results"):
        values = [run[key] for run in runs if run[key] is not None]
        summary[key] = {
            "min": min(values, default=None),
            "median": statistics.median(values) if values else None,
            "max": max(values, default=None),
        }
    worst = max((run["outage_s"] or float("inf")) for run in runs)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        "runs": args.runs,
        "tasks": args.tasks,
        "kill_at": args.kill_at,
        "interval": args.interval,
        "liveness": args.liveness,
        "keys": args.keys,
        "bound_s": bound,
        "within_bound": worst <= bound,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "summary": summary,
        "every_run": runs,
    }


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_run(number: int, run: dict[str, Any]) -> None:
    if number == 0:
        print(
            f"{'run':>3} {'takeover s':>10} {'outage s':>9} {'ran twice':>9} {'late':>5} {'ok':>3}"
        )
    print(
        f"{number + 1:>3} {_cell(run['takeover_s']):>10} {_cell(run['outage_s']):>9} "
        f"{run['ran_twice']:>9} {run['late_results']:>5} {'yes' if run['correct'] else 'NO':>3}",
        flush=True,
    )


def _print_summary(document: dict[str, Any]) -> None:
    keys = " with keys" if document["keys"] else ""
    print(
        f"\n{document['runs']} runs{keys}: SIGKILL of the active broker after "
        f"{document['kill_at']} of {document['tasks']} tasks, 4 workers; interval "
        f"{document['interval']:g} s x liveness {document['liveness']}; {document['cpus']} cpus, "
        f"load {document['load_before'][0]:.2f} before, {document['load_after'][0]:.2f} after"
    )
    print(f"{'figure':22} {'min':>7} {'median':>7} {'max':>7}")
    names = {
        "takeover_s": "takeover (s)",
        "outage_s": "outage (s)",
        "ran_twice": "tasks run twice",
        "late_results": "results came twice",
    }
    for key, name in names.items():
        figures = document["summary"][key]
        digits = 2 if key.endswith("_s") else 0
        print(
            f"{name:22} {_cell(figures['min'], digits):>7} {_cell(figures['median'], digits):>7} "
            f"{_cell(figures['max'], digits):>7}"
        )
    verdict = "PASS" if document["within_bound"] else "MISS"
    print(
        f"bound: outage <= 2 x interval x liveness = {document['bound_s']:g} s: worst "
        f"{document['summary']['outage_s']['max']:.2f} s {verdict}"
    )


if __name__ == "__main__":
    sys.exit(main())
