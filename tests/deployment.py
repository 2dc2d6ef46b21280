"""What the tests of the deploy recipes share: keys made as the docs say, fade's console
scripts on PATH, and a job run on a pool the way a user's program would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from conftest import wait_for

from fade.status import query

#: The folder of this environment's console scripts (fade-broker, fade-worker, ...),
#: as a virtual environment in /opt/fade would have them in /opt/fade/bin.
BIN = Path(sys.executable).parent

# A user's program: waits for its pool's workers, then runs a map; FADE_ADDRESS and
# FADE_KEYS come from the environment.
JOB = """\
import os, sys
import fade
from fade.status import query
from conftest import wait_for
address, workers = os.environ["FADE_ADDRESS"], int(sys.argv[1])
wait_for(lambda: len(query(address)["workers"]) >= workers, 60, f"{workers} workers")
with fade.Executor(address) as ex:
    print("job result", sum(ex.map(abs, range(-50, 50))), flush=True)
"""
JOB_RESULT = "job result 2500"


@dataclass(frozen=True)
class PoolKeys:
    """A pool's keys: the broker's folder, one worker key file and one client key file."""

    dir: Path
    worker: Path
    client: Path


def fade_keys(*args: str) -> None:
    """Run the ``fade-keys`` command as a user would."""
    out = subprocess.run(
        [str(BIN / "fade-keys"), *args], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, f"fade-keys {' '.join(args)}: {out.stderr}"


def make_pool_keys(
    folder: Path, worker: Path | None = None, client: Path | None = None
) -> PoolKeys:
    """``fade-keys init``, then one worker and one client key, written where given."""
    keys = PoolKeys(
        folder, worker or folder.parent / "worker.key", client or folder.parent / "client.key"
    )
    fade_keys("init", str(keys.dir))
    fade_keys("add", "worker", "workers", "--dir", str(keys.dir), "--out", str(keys.worker))
    fade_keys("add", "client", "alice", "--dir", str(keys.dir), "--out", str(keys.client))
    return keys


def environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with fade's console scripts first on PATH."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **(extra or {})}


def wait_workers(address: str, keys: Path, count: int, timeout: float = 60) -> None:
    """Wait until the broker knows ``count`` worker processes (asked with a client key)."""
    wait_for(
        lambda: len(query(address, keys=str(keys))["workers"]) >= count,
        timeout,
        f"{count} workers at {address}",
    )


def run_job(address: str, keys: Path, workers: int) -> None:
    """The user's program (JOB) against a pool: it must print the right result."""
    out = subprocess.run(
        [sys.executable, "-c", JOB, str(workers)],
        env={**os.environ, "FADE_ADDRESS": address, "FADE_KEYS": str(keys)},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0 and JOB_RESULT in out.stdout, out.stderr
