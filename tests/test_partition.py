"""A real network partition: a worker in its own network namespace, cut off by its link.

The namespace is joined to this host by a veth pair with addresses that exist
only on it; all traffic stays on this machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tasks
from conftest import EXPIRY, INTERVAL, LIVENESS, Pool, free_port, kill_tree, wait_for

import fade

pytestmark = pytest.mark.timeout(120)


@dataclass
class Namespace:
    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, timeout=10)

    def cut(self) -> None:
        self.run("ip", "link", "set", self.ns_if, "down")

    def restore(self) -> None:
        self.run("ip", "link", "set", self.ns_if, "up")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    tag = uuid.uuid4().hex[:6]
    ns = Namespace(f"fade-{tag}", f"fh{tag}", f"fw{tag}", "10.213.77.1", "10.213.77.2")
    try:
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
        _ip("link", "set", ns.ns_if, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        ns.run("ip", "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if)
        ns.run("ip", "link", "set", ns.ns_if, "up")
        ns.run("ip", "link", "set", "lo", "up")
    except (OSError, subprocess.SubprocessError) as exc:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", ns.host_if], capture_output=True, check=False)
        pytest.skip(f"cannot create a network namespace here (needs root and iproute2): {exc}")
    try:
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", ns.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


def _runs(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(v, int(pid)) for v, pid in (line.split() for line in log.read_text().splitlines())]


def test_partitioned_worker_task_reruns_and_worker_rejoins(
    netns: Namespace, tmp_path: Path
) -> None:
    pool = Pool(port=free_port())
    address = f"tcp://{netns.host_ip}:{pool.port}"
    timing = ["--heartbeat-interval", str(INTERVAL), "--heartbeat-liveness", str(LIVENESS)]
    # A network address without keys: allowed only with --insecure (the link is ours alone).
    broker = subprocess.Popen([sys.executable, "-m", "fade.broker", address, "--insecure", *timing])
    far = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-m", "fade.worker", address, *timing]
    )
    near: subprocess.Popen[bytes] | None = None
    log = tmp_path / "runs.txt"
    delivered: list[str] = []
    try:
        with fade.Executor(address, heartbeat_interval=INTERVAL) as ex:
            # Only the far worker exists yet, so it takes the task.
            future = ex.submit(tasks.record_then_sleep, str(log), "t", 1.0)
            future.add_done_callback(lambda f: delivered.append(f.result()))
            wait_for(lambda: _runs(log), 30, "the far worker to start the task")
            far_pid = _runs(log)[0][1]
            near = subprocess.Popen([sys.executable, "-m", "fade.worker", address, *timing])
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
