"""The benchmark harness must not rot: a smoke run of ``benchmarks/bench.py`` has to produce a
positive figure for every metric of processpool, raw-zmq and both fade systems, a smoke run
of ``benchmarks/alternating.py`` figures for every system in every round, one of
``benchmarks/durations.py`` a figure in every cell, and none may leave a process behind.

Every process the run starts inherits a unique environment tag, so teardown finds and kills
stragglers even after they were orphaned and re-parented away from this test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("processpool", "raw-zmq", "fade-tcp", "fade-embedded")
TAG = "FADE_BENCH_SMOKE_TAG"
RUN_TIMEOUT_S = 100.0  # under the test's 120 s, to leave time for teardown
GRACE_S = 10.0


def _tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _stop(proc: subprocess.Popen[bytes], tag: str) -> list[str]:
    """Stop bench.py and everything it started; return what had to be killed afterwards."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # bench.py then kills its runner's group
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    leftovers = _tagged(tag)
    described = []
    for straggler in leftovers:
        try:
            described.append(f"{straggler.pid}: {' '.join(straggler.cmdline())}")
            straggler.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=GRACE_S)
    return described


def _bad_figures(document: dict[str, object]) -> list[str]:
    keys = [metric["key"] for metric in document["metrics"]]  # type: ignore[attr-defined]
    bad = []
    for system in SYSTEMS:
        result = document["systems"][system]  # type: ignore[index]
        for key in keys:
            value = result["metrics"].get(key)
            if not (isinstance(value, float) and value > 0):
                bad.append(f"{system} {key} = {value!r} ({result['status']}: {result['reason']})")
    return bad


def _run_script(script: str, *args: str) -> tuple[str, str]:
    """Run ``benchmarks/SCRIPT ARGS...`` to the end, stop whatever it left behind, and fail
    if it exited non-zero or left a process running; its stdout and a report for messages."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env={**os.environ, TAG: tag},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        leftovers = _stop(proc, tag)
    report = f"stdout:\n{stdout.decode()}\nstderr:\n{stderr.decode()}"
    assert proc.returncode == 0, report
    assert not leftovers, f"processes left running: {leftovers}"
    return stdout.decode(), report


@pytest.mark.timeout(120)
def test_smoke_run_measures_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    _, report = _run_script(
        "bench.py", "--smoke", "--systems", ",".join(SYSTEMS), "--json", str(out)
    )
    bad = _bad_figures(json.loads(out.read_text()))
    assert not bad, "\n".join(bad) + "\n" + report


@pytest.mark.timeout(120)
def test_alternating_smoke_run_compares_every_round(tmp_path: Path) -> None:
    """benchmarks/alternating.py: every system measured in every round, every ratio positive."""
    out = tmp_path / "alternating.json"
    stdout, report = _run_script("alternating.py", "--smoke", "--json", str(out))
    document = json.loads(out.read_text())
    systems = document["systems"]
    assert set(systems) == {"fade-tcp", "fade-embedded", "processpool", "raw-zmq"}, report
    for name, figures in systems.items():
        assert figures["lat_median_us"] > 0 and figures["lat_p99_us"] >= figures["lat_median_us"]
        assert figures["big_mbps"] > 0, name
        assert len(figures["round_medians_us"]) == document["rounds"], name
        assert len(figures["round_big_mbps"]) == document["rounds"], name
        if name != "raw-zmq":
            for key in ("ratio", "big_ratio"):
                assert len(figures[f"{key}_per_round"]) == document["rounds"], (name, key)
                assert figures[f"{key}_median"] > 0, (name, key)
    versus = systems["fade-embedded"]["pp_ratio_per_round"]
    assert len(versus) == document["rounds"] and min(versus) > 0, report
    assert "target: fade-embedded round trip" in stdout, report
    assert "target: fade-tcp round trip" in stdout, report
    assert "target: fade-tcp 50 MB" in stdout, report


@pytest.mark.timeout(120)
def test_failover_smoke_run_times_each_failover(tmp_path: Path) -> None:
    """benchmarks/failover.py: each run's takeover and outage measured, every result right."""
    out = tmp_path / "failover.json"
    stdout, report = _run_script("failover.py", "--smoke", "--json", str(out))
    document = json.loads(out.read_text())
    assert len(document["every_run"]) == document["runs"] == 2, report
    for run in document["every_run"]:
        assert run["correct"] and run["late_results"] == 0, report
        assert 0 < run["takeover_s"] < 10 and 0 < run["outage_s"] < 10, report
    assert "bound: outage <= 2 x interval x liveness" in stdout, report


@pytest.mark.timeout(120)
def test_terminate_smoke_run_times_both_cases(tmp_path: Path) -> None:
    """benchmarks/terminate.py: a time for terminating a running task and for freeing the
    workers of a killed client (no thresholds: the benchmark reports, it does not judge)."""
    out = tmp_path / "terminate.json"
    stdout, report = _run_script("terminate.py", "--smoke", "--json", str(out))
    rows = {row["case"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"terminate", "killed client"}, report
    assert all(row["runs"] == 2 and 0 < row["min_s"] <= row["max_s"] for row in rows.values())
    assert "killed client" in stdout, report


# Every benchmark with a command line, but the helpers bench.py starts with ``python -m``.
INTERNAL = {"runner.py", "rawzmq.py", "rawclient.py", "tasks.py"}
SCRIPTS = sorted(
    path.name
    for path in (ROOT / "benchmarks").glob("*.py")
    if "__main__" in path.read_text() and path.name not in INTERNAL
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_runs_as_a_script(script: str) -> None:
    """``python benchmarks/NAME.py`` (what benchmarks/README.md says) must at least start."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT.parent,  # not the checkout: the script must find its package itself
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


@pytest.mark.timeout(120)
def test_durations_smoke_run_fills_every_cell(tmp_path: Path) -> None:
    """benchmarks/durations.py: a figure for every pool, worker count, task kind and duration
    (no thresholds here: speed is the benchmark's to report, not a unit test's to judge)."""
    out = tmp_path / "durations.json"
    stdout, report = _run_script("durations.py", "--smoke", "--json", str(out))
    document = json.loads(out.read_text())
    durations = {0.0, 1.0, 5.0}
    expected = {
        (pool, workers, kind, duration)
        for pool in ("tcp", "embedded", "processpool", "loop")
        for workers in ((1,) if pool == "loop" else (1, 2))
        for kind in ("sleep", "cpu")
        for duration in durations
    }
    cells = document["cells"]
    assert {(c["pool"], c["workers"], c["kind"], c["duration_ms"]) for c in cells} == expected
    assert len(cells) == len(expected), report
    for cell in cells:
        assert cell["tasks_per_s"] > 0 and cell["done"] > 0, (cell, report)
        assert cell["cut"] or cell["done"] == cell["tasks"], (cell, report)
        if cell["duration_ms"] == 0:
            assert cell["efficiency"] is None, cell
        else:
            assert cell["efficiency"] > 0, cell
    assert "target: fade's efficiency > 0.8" in stdout, report


@pytest.mark.timeout(120)
def test_durations_with_a_distant_client_runs_through_the_delay_proxy(tmp_path: Path) -> None:
    """``--client-delay``: the tcp pool's client reaches its broker through
    benchmarks/delayproxy.py; its cells fill, and the proxy leaves no process behind."""
    out = tmp_path / "durations.json"
    stdout, report = _run_script(
        "durations.py", "--smoke", "--pools", "tcp", "--workers", "1", "--kinds", "sleep",
        "--durations", "1", "--client-delay", "2", "--json", str(out),
    )  # fmt: skip
    document = json.loads(out.read_text())
    assert document["client_delay_ms"] == 2
    assert "2 ms from its broker" in stdout, report
    (cell,) = document["cells"]
    assert cell["done"] > 0 and cell["efficiency"] > 0, (cell, report)


@pytest.mark.timeout(30)
def test_a_repeated_step_records_the_median_and_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench.py --full runs each throughput step several times (one run of a map in
    chunks of 100 lasts about 20 ms): the table shows the median, the JSON every run."""
    monkeypatch.syspath_prepend(str(ROOT))  # the checkout: benchmarks/ is not installed
    from benchmarks.runner import REPEATED_STEPS, Record

    assert {"submit", "map chunksize=1", "map chunksize=100"} == REPEATED_STEPS
    out = tmp_path / "record.json"
    record = Record("fade-embedded", out)
    record.add_runs([{"submit_tps": 30.0}, {"submit_tps": 10.0}, {"submit_tps": 20.0}])
    record.add_runs([{"big_mbps": 7.0}])
    data = json.loads(out.read_text())
    assert data["metrics"] == {"submit_tps": 20.0, "big_mbps": 7.0}
    assert data["runs"] == {"submit_tps": [30.0, 10.0, 20.0]}
