#!/usr/bin/env python
"""Benchmark fade against ProcessPoolExecutor, raw pyzmq and any installed peers.

    bench.py ──> for each system, one at a time (2 cores: never two at once):
                   python -m benchmarks.runner SYSTEM   own process group, own time limit
                   reads the runner's JSON, which is rewritten after every step
                   afterwards: killpg(SIGKILL), then kill any process still carrying the
                   runner's environment tag, so nothing it started outlives it
             ──> table (metrics x systems), fade / baseline ratios, the issue's targets
             ──> --json PATH: every figure plus date, host, cpu count and versions

Usage: ``python benchmarks/bench.py [--smoke|--full] [--json out.json] [--systems a,b,...]``.
Exit status 0 when every selected system that is installed ran without error; targets missed
do not change it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "python benchmarks/bench.py" puts benchmarks/ on the path, not ROOT: the package needs ROOT.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import zmq  # noqa: E402

from benchmarks.metrics import METRICS, SIZES, WORKERS  # noqa: E402
from benchmarks.procs import TAG_VARIABLE, describe_pid, tagged_pids  # noqa: E402
from benchmarks.report import (  # noqa: E402
    SystemResult,
    evaluate_targets,
    ratio_tables,
    ratios,
    results_table,
    status_lines,
    target_lines,
)
from benchmarks.systems import SYSTEMS, missing  # noqa: E402

TIME_LIMIT_S = {"smoke": 25.0, "full": 300.0}
LOG_TAIL_LINES = 12
SWEEP_GRACE_S = 2.0
PACKAGES = ("fade", "pyzmq", "cloudpickle", "numpy", "loky", "dask", "distributed", "ray")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected systems one by one, print the report; 1 if any errored or timed out."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so the finally clauses kill runner groups
    load_before = os.getloadavg()
    compiled = _compile_fade()
    results: dict[str, SystemResult] = {}
    with tempfile.TemporaryDirectory(prefix="fade-bench-") as tmp:
        logs = args.logs or Path(tmp)
        for system in (s for s in SYSTEMS if s.name in args.systems):
            reason = missing(system)
            if reason:
                results[system.name] = SystemResult("skipped", reason)
            else:
                results[system.name] = run_system(
                    system.name, args.mode, args.time_limit, Path(tmp), logs
                )
            _progress(system.name, results[system.name])
    document = _document(args.mode, results, load_before)
    document["meta"]["fade_bytecode_precompiled"] = compiled
    _print_report(results, document)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    failed = [n for n, r in results.items() if r.status in ("error", "timeout")]
    return 1 if failed else 0


def _compile_fade() -> bool:
    """Byte-compile fade's modules, as pip does when it installs a package; True if it did.

    From a source checkout (an editable install) with PYTHONDONTWRITEBYTECODE set, as on our
    CI machines, every fade process would otherwise compile them each time it starts: about
    0.15 s of CPU each, which "start to first result" would count against fade alone (the
    other systems' modules are installed, hence compiled). compileall writes the cache even
    when that variable is set; a checkout's __pycache__ folders are git-ignored.
    """
    import compileall

    import fade

    return bool(compileall.compile_dir(Path(fade.__file__).parent, quiet=1))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="small sizes, well under a minute (for tests)",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="full sizes, a few minutes (the default)",
    )
    parser.add_argument(
        "--systems",
        type=_system_list,
        default=[s.name for s in SYSTEMS],
        help="comma-separated subset of: " + ",".join(s.name for s in SYSTEMS),
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all figures here")
    parser.add_argument(
        "--logs", type=Path, metavar="DIR", help="keep each runner's output in DIR/SYSTEM.log"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="per-system limit (default: 25 smoke, 300 full)",
    )
    args = parser.parse_args(argv)
    args.mode = args.mode or "full"
    args.time_limit = args.time_limit or TIME_LIMIT_S[args.mode]
    return args


def _system_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - {s.name for s in SYSTEMS})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system(s): {', '.join(unknown)}")
    return names


def _exit_on_signal(signum: int, _frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)


def run_system(name: str, mode: str, time_limit: float, tmp: Path, logs: Path) -> SystemResult:
    """Run one runner subprocess to completion or to its time limit, then kill its group."""
    logs.mkdir(parents=True, exist_ok=True)
    out, log = tmp / f"{name}.json", logs / f"{name}.log"
    command = [sys.executable, "-m", "benchmarks.runner", name, "--mode", mode]
    command += ["--time-limit", str(time_limit), "--out", str(out)]
    tag = uuid.uuid4().hex
    started = time.monotonic()
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_runner_env(tag),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=time_limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)
            leftovers = _sweep(tag)
    result = _read_result(out, log, timed_out, time_limit)
    result.elapsed_s = time.monotonic() - started
    result.leftovers = leftovers
    if result.sizes == asdict(SIZES[mode]):
        result.sizes = None
    return result


def _runner_env(tag: str) -> dict[str, str]:
    """Tag every descendant, and put ROOT on its path so that workers import
    ``benchmarks.tasks``."""
    env = dict(os.environ)
    env[TAG_VARIABLE] = tag
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the runner's whole process group: runner, brokers, workers."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _sweep(tag: str) -> list[str]:
    """Kill what the runner left behind outside its group; describe each process killed.

    A system that shut down cleanly leaves nothing; stragglers get a moment to finish exiting.
    """
    deadline = time.monotonic() + SWEEP_GRACE_S
    while (pids := tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = [describe_pid(pid) for pid in pids]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return described


def _read_result(out: Path, log: Path, timed_out: bool, time_limit: float) -> SystemResult:
    data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result = SystemResult(
        status=data.get("status", "error"),
        metrics=data.get("metrics", {}),
        runs=data.get("runs", {}),
        errors=data.get("errors", {}),
        sizes=data.get("sizes"),
    )
    if timed_out:
        result.status = "timeout"
        result.reason = f"over the {time_limit:g} s limit during {data.get('phase', 'start')}"
    elif result.status == "running":
        result.status = "error"
        result.reason = f"runner died during {data.get('phase', 'start')}"
    elif result.status == "error":
        steps = "; ".join(f"{step}: {error}" for step, error in result.errors.items())
        result.reason = data.get("error") or steps
    if result.status != "ok":
        result.log_tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        if result.reason is None:
            result.reason = result.log_tail[-1] if result.log_tail else "no output"
    return result


def _progress(name: str, result: SystemResult) -> None:
    elapsed = "" if result.elapsed_s is None else f" in {result.elapsed_s:.1f} s"
    print(f"{name}: {result.status}{elapsed}", file=sys.stderr, flush=True)


def _document(
    mode: str, results: dict[str, SystemResult], load_before: tuple[float, float, float]
) -> dict[str, Any]:
    table = ratios(results)
    return {
        "meta": _meta(mode, load_before),
        "metrics": [asdict(m) for m in METRICS],
        "systems": {name: asdict(result) for name, result in results.items()},
        "ratios": table,
        "targets": evaluate_targets(results, table),
    }


def _meta(mode: str, load_before: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "mode": mode,
        "sizes": asdict(SIZES[mode]),
        "workers": WORKERS,
        "processpool_start_method": multiprocessing.get_start_method(),
        "libzmq": zmq.zmq_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
        # Other work on the machine skews every figure; the load averages show whether there was.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
    if package == "fade":  # a source checkout that was never pip-installed
        try:
            import fade

            return str(fade.__version__)
        except Exception:
            return None
    return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _print_report(results: dict[str, SystemResult], document: dict[str, Any]) -> None:
    meta = document["meta"]
    load = f"load average {meta['loadavg_before'][0]:.2f} before"
    load += f", {meta['loadavg_after'][0]:.2f} after"
    header = [
        f"fade benchmarks, {meta['mode']} mode: {meta['sizes']}",
        f"{meta['workers']} workers per system",
        f"{meta['cpu_count']} cpus",
        f"python {meta['python']}",
        f"libzmq {meta['libzmq']}",
        load,
    ]
    print("; ".join(header))
    print()
    print("\n".join(results_table(results)))
    print()
    print("\n".join(status_lines(results)))
    print("\n".join(ratio_tables(document["ratios"])))
    print()
    print("targets")
    print("\n".join("  " + line for line in target_lines(document["targets"])))
    for name, result in results.items():
        if result.log_tail:
            print(f"\n{name} log (last lines):", *result.log_tail, sep="\n  ", file=sys.stderr)
        if result.leftovers:
            print(f"\n{name} left running:", *result.leftovers, sep="\n  ", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
