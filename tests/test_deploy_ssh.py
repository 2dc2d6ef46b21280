"""The SSH recipe (deploy/ssh/fade-workers.sh, docs/deploying.md), end to end.

The worker host is a network namespace of the test's own, with a real sshd in it
(Debian's openssh-server, key login only; tests/sshd.py). The head node is this
host: its broker binds the host's end of the link into the namespace, an address
that is not loopback, so the pool needs keys, made with fade-keys as the docs say.
The script copies the worker key to the host over SSH, starts the workers there,
a map runs on them with a client key, and its stop command drains them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil
import pytest
import tasks
from conftest import Namespace, free_port, kill_tree, unavailable, wait_for
from deployment import BIN, environ, make_pool_keys, wait_workers
from sshd import SshServer, SshUnavailable

import fade

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "ssh" / "fade-workers.sh"


def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def server_tree(server: SshServer) -> list[psutil.Process]:
    """sshd and every process its sessions started (orphans included: see subreaper.py)."""
    return psutil.Process(server.process.pid).children(recursive=True)


def left_on_host(server: SshServer) -> list[str]:
    """The processes on the worker host other than sshd's (those ending meanwhile skipped)."""
    left = []
    for proc in server_tree(server):
        try:
            if proc.name() != "sshd":
                left.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            pass
    return left


def test_ssh_recipe_starts_keyed_workers_and_drains_them(netns: Namespace, tmp_path: Path) -> None:
    head = tmp_path / "head"
    keys = make_pool_keys(head / "pool", head / "rack1.key", head / "alice.key")
    try:
        server = SshServer.start(tmp_path / "node1", netns.ns_ip, netns=netns.name)
    except SshUnavailable as exc:
        unavailable("sshd", str(exc))
    address = f"tcp://{netns.host_ip}:{free_port()}"
    broker_log = head / "broker.log"
    broker = subprocess.Popen(
        [
            str(BIN / "fade-broker"),
            address,
            "--keys",
            str(keys.dir),
            "--http",
            f"127.0.0.1:{free_port()}",
        ],
        stderr=broker_log.open("wb"),
    )
    try:
        # Paths on the worker host (a folder of the test's own stands in for its home).
        remote_key = server.folder / "home" / ".fade" / "worker.key"
        workdir = server.folder / "run"
        env = environ(
            {
                "FADE_SSH": server.ssh_command,
                "FADE_ADDRESS": address,
                "FADE_KEYS": str(remote_key),
                "FADE_PROCESSES": "2",
                "FADE_WORKER": str(BIN / "fade-worker"),
                "FADE_WORKER_DIR": str(workdir),
            }
        )
        # Without its key a host refuses to start, and says how to fix it.
        refused = run_script("start", netns.ns_ip, env=env)
        assert refused.returncode != 0 and "send-key" in refused.stderr, refused
        sent = run_script("send-key", str(keys.worker), netns.ns_ip, env=env)
        assert sent.returncode == 0, sent.stderr
        assert remote_key.read_bytes() == keys.worker.read_bytes()
        assert remote_key.stat().st_mode & 0o777 == 0o600
        assert remote_key.parent.stat().st_mode & 0o777 == 0o700

        started = run_script("start", netns.ns_ip, env=env)
        assert started.returncode == 0, started.stderr
        wait_workers(address, keys.client, 2)
        with fade.Executor(address, keys=keys.client) as ex:
            assert list(ex.map(tasks.square, range(20))) == [x * x for x in range(20)]
            ran_on = set(ex.map(tasks.pid_after, range(8), [0.05] * 8))
        # The tasks ran in processes that sshd's session started on the worker host.
        on_host = {p.pid for p in server_tree(server)}
        assert {pid for _, pid in ran_on} <= on_host

        stopped = run_script("stop", netns.ns_ip, env=env)
        assert stopped.returncode == 0, stopped.stderr
        # Drained: both workers told the broker and left; nothing is left on the host.
        wait_for(
            lambda: broker_log.read_text().count("left; re-queueing the 0 tasks") == 2,
            30,
            "both workers to leave",
        )
        assert broker_log.read_text().count("is draining") == 2
        wait_for(
            lambda: not left_on_host(server), 30, "the worker host to have no process but sshd"
        )
        assert not (workdir / "fade-worker.pid").exists()
        assert "draining" in (workdir / "fade-worker.log").read_text()
    finally:
        server.stop()
        kill_tree(broker.pid)
        broker.wait()
