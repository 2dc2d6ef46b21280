"""Smoke test of an installed fade (run by .ci/check-package in a fresh virtual environment).

Usage: python package_smoke.py EXPECTED_VERSION
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import fade


def cube(x: int) -> int:  # defined here: travels by value (cloudpickle)
    return x**3


def check_install(expected: str) -> None:
    package = Path(fade.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert package.parent == site, f"fade imported from {package}, not from {site}"
    assert (package / "py.typed").is_file(), "py.typed is missing"
    # fade-scale submits the worker job script installed with the package.
    assert (package / "scale" / "fade-worker.sbatch").is_file(), "fade-worker.sbatch is missing"
    assert fade.__version__ == expected, (fade.__version__, expected)
    assert importlib.metadata.version("fade") == expected
    scripts = Path(sys.executable).parent
    for name in ("fade-broker", "fade-worker", "fade-scale"):
        out = subprocess.run(
            [str(scripts / name), "--version"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"fade {expected}", out.stdout
    print(f"installed fade {expected} at {package}, scripts report the same version")


def check_embedded() -> None:
    with fade.Executor(max_workers=2) as ex:
        assert list(ex.map(cube, range(20), chunksize=3)) == [x**3 for x in range(20)]
        assert ex.submit(pow, 2, 10).result(timeout=60) == 1024

        async def awaited() -> int:
            return await ex.asubmit(cube, 3)

        assert asyncio.run(awaited()) == 27
    print("tasks ran on the embedded pool")


def check_broker() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    scripts = Path(sys.executable).parent
    broker = subprocess.Popen([str(scripts / "fade-broker"), address, "--log-level", "WARNING"])
    worker = subprocess.Popen(
        [str(scripts / "fade-worker"), address, "--processes", "2", "--log-level", "WARNING"]
    )
    try:
        with fade.Executor(address) as ex:
            futures = [ex.submit(cube, x) for x in range(50)]
            assert [f.result(timeout=60) for f in futures] == [x**3 for x in range(50)]
    finally:
        for process in (worker, broker):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    print(f"tasks ran through fade-broker and fade-worker at {address}")


def main() -> None:
    check_install(sys.argv[1])
    check_embedded()
    check_broker()


if __name__ == "__main__":
    main()
