"""The examples in examples/ run in smoke mode, on an embedded pool and against a broker.

Each example runs as its own process in a scratch directory, as a user would run
it. For the broker runs the test starts a broker and two ``fade-worker``
processes with the test's own environment: their PYTHONPATH names tests/ (and
never examples/), and their working directory is not examples/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Pool

pytestmark = pytest.mark.timeout(240)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODES = ["embedded", "broker"]


def run_example(name: str, mode: str, request: pytest.FixtureRequest, cwd: Path) -> str:
    """Run ``examples/<name>.py --smoke``; return its output, fail the test on an error."""
    assert Path.cwd().resolve() != EXAMPLES
    assert str(EXAMPLES) not in os.environ.get("PYTHONPATH", "")
    argv = [sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke"]
    if mode == "broker":
        pool: Pool = request.getfixturevalue("pool")
        pool.start_broker()
        pool.start_worker()
        pool.start_worker()
        pool.wait_workers(2)
        argv += ["--address", pool.address]
    out = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.parametrize("mode", MODES)
def test_monte_carlo(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    out = run_example("monte_carlo", mode, request, tmp_path)
    estimate = float(out.split("pi ~ ")[1].split()[0])
    assert abs(estimate - 3.14159) < 0.05, out
    assert "80,000 points in 8 tasks" in out


@pytest.mark.parametrize("mode", MODES)
def test_parameter_sweep_ships_its_local_module(
    mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    out = run_example("parameter_sweep", mode, request, tmp_path)
    assert "16 runs of sweep_model.simulate" in out
    assert "worst: beta=1.000 gamma=0.050" in out
    assert "mildest: beta=0.100 gamma=0.500" in out


@pytest.mark.parametrize("mode", MODES)
def test_grid_search(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    out = run_example("grid_search", mode, request, tmp_path)
    workers = 2 if mode == "broker" else os.cpu_count()
    assert f"20 fits on {workers} fade workers" in out, out
    assert "best: {'C': " in out
    accuracy = float(out.split("mean accuracy ")[1].rstrip(")\n"))
    assert accuracy > 0.9, out
