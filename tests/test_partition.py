"""A real network partition: a worker in its own network namespace, cut off by its link.

The namespace is joined to this host by a veth pair with addresses that exist
only on it; all traffic stays on this machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import tasks
from conftest import (
    EXPIRY,
    INTERVAL,
    LIVENESS,
    Namespace,
    Pool,
    free_port,
    kill_tree,
    make_keys,
    wait_for,
)

import fade

pytestmark = pytest.mark.timeout(120)


def _runs(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(v, int(pid)) for v, pid in (line.split() for line in log.read_text().splitlines())]


@pytest.mark.parametrize("with_keys", [False, True], ids=["insecure", "keys"])
def test_partitioned_worker_task_reruns_and_worker_rejoins(
    netns: Namespace, tmp_path: Path, with_keys: bool
) -> None:
    """With keys too: a keyed broker refuses a second connection under an identity until
    the first is closed, and the far worker's old connection, cut off, is closed only
    once the link is back (TCP keepalive): it must still rejoin."""
    pool = Pool(port=free_port())
    address = f"tcp://{netns.host_ip}:{pool.port}"
    timing = ["--heartbeat-interval", str(INTERVAL), "--heartbeat-liveness", str(LIVENESS)]
    keys = make_keys(tmp_path) if with_keys else None
    # A network address without keys: allowed only with --insecure (the link is ours alone).
    access = ["--keys", str(keys.dir)] if keys else ["--insecure"]
    worker_keys = ["--keys", str(keys.worker)] if keys else []
    broker = subprocess.Popen([sys.executable, "-m", "fade.broker", address, *access, *timing])
    far = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-m", "fade.worker", address,
         *worker_keys, *timing]
    )  # fmt: skip
    near: subprocess.Popen[bytes] | None = None
    log = tmp_path / "runs.txt"
    delivered: list[str] = []
    try:
        client_keys = keys.client if keys else None
        with fade.Executor(address, heartbeat_interval=INTERVAL, keys=client_keys) as ex:
            # Only the far worker exists yet, so it takes the task.
            future = ex.submit(tasks.record_then_sleep, str(log), "t", 1.0)
            future.add_done_callback(lambda f: delivered.append(f.result()))
            wait_for(lambda: _runs(log), 30, "the far worker to start the task")
            far_pid = _runs(log)[0][1]
            near = subprocess.Popen(
                [sys.executable, "-m", "fade.worker", address, *worker_keys, *timing]
            )
            time.sleep(0.5)
            netns.cut()
            cut_at = time.monotonic()
            assert future.result(timeout=30) == "t"
            elapsed = time.monotonic() - cut_at
            runs = _runs(log)
            assert len(runs) == 2 and runs[1][1] != far_pid
            # Detected within interval x liveness; then the task's own second.
            assert elapsed < EXPIRY + 1.0 + 2.0, f"re-run took {elapsed:.2f}s"

            netns.restore()

            def far_worker_back() -> bool:
                pids = {pid for _, pid in ex.map(tasks.pid_after, range(4), [0.1] * 4)}
                return far_pid in pids

            wait_for(far_worker_back, 30, "the partitioned worker to rejoin")
        assert delivered == ["t"], "the result was delivered more than once"
    finally:
        for proc in (far, near, broker):
            if proc is not None:
                kill_tree(proc.pid)
                proc.wait()
