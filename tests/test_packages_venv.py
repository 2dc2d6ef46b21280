"""Installed packages travel between real virtual environments, installed by pip.

Two virtual environments of this machine's Python, made once per machine (in the
temporary folder, keyed by what they hold) with pip from the local package index:

* the workers': fade's dependencies and tabulate 0.8.10;
* the client's: fade's dependencies, tabulate 0.10.0, six (pure Python) and
  msgpack 1.2.3 (compiled: a wheel with a C extension), none of which but an
  older tabulate the workers have.

fade itself comes from this checkout in both (PYTHONPATH). The first run takes a
minute or two to make the environments; later runs reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import Pool, fade_env, kill_tree, wait_for

from fade.status import query

pytestmark = pytest.mark.timeout(600)

#: This machine's local package index (no network); elsewhere pip's own settings apply.
LOCAL_INDEX = Path("/opt/pypi/simple")
BASE = ["pyzmq>=25", "cloudpickle>=3"]
WORKER = [*BASE, "tabulate==0.8.10"]
CLIENT = [*BASE, "tabulate==0.10.0", "six", "msgpack==1.2.3"]


def make_venv(name: str, requirements: list[str]) -> Path:
    """A virtual environment with ``requirements`` installed by pip (made once)."""
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:10]
    venv = Path(tempfile.gettempdir()) / f"fade-test-venv-{name}-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        index = ["--index-url", LOCAL_INDEX.as_uri()] if LOCAL_INDEX.is_dir() else []
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *index, *requirements],
            check=True,
            timeout=600,
        )
        (venv / ".complete").touch()
    return python


@pytest.fixture(scope="module")
def venvs() -> tuple[Path, Path]:
    return make_venv("worker", WORKER), make_venv("client", CLIENT)


def start_worker(pool: Pool, python: Path, cache: Path) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(
        [
            str(python),
            "-m",
            "fade.worker",
            pool.address,
            *pool._timing(),
            "--code-cache",
            str(cache),
        ],
        env=fade_env(),
    )
    pool.workers.append(worker)
    return worker


def run_client(python: Path, script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(python), "-c", textwrap.dedent(script), *args],
        env=fade_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


MISSING = """
    import json, os, sys, time
    from pathlib import Path
    import fade, msgpack, six

    def use_both(x):
        return [msgpack.unpackb(msgpack.packb(x)), msgpack.version[:3], msgpack.Packer.__module__,
                msgpack.__file__, six.__version__, six.__file__, os.getpid()]

    address, phase, go_on = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    with fade.Executor(address, heartbeat_interval=0.2) as ex:
        first = ex.submit(use_both, [1, "a"]).result(timeout=120)
        after_first = dict(ex._packages.stats)
        second = ex.submit(use_both, [2]).result(timeout=60)
        after_second = dict(ex._packages.stats)
        phase.write_text(json.dumps([first, second, after_first, after_second]))
        deadline = time.monotonic() + 60
        while not go_on.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        third = ex.submit(use_both, [3]).result(timeout=120)
        print(json.dumps([third, dict(ex._packages.stats)]))
"""


def test_missing_pure_and_compiled_packages_travel_once_per_host(
    venvs: tuple[Path, Path], pool: Pool, tmp_path: Path
) -> None:
    worker_python, client_python = venvs
    cache = tmp_path / "worker-cache"
    pool.start_broker()
    first_worker = start_worker(pool, worker_python, cache)
    pool.wait_workers(1)
    phase, go_on = tmp_path / "phase.json", tmp_path / "go-on"
    client = run_client(client_python, MISSING, pool.address, str(phase), str(go_on))
    try:
        wait_for(phase.exists, 180, "the client's first two tasks")
        first, second, after_first, after_second = json.loads(phase.read_text())
        dists = str(cache / "packages" / "dists")
        value, version, packer, msgpack_file, _, six_file, pid = first
        assert value == [1, "a"] and version == [1, 2, 3]
        assert packer == "msgpack._cmsgpack"  # the compiled extension, not the fallback
        assert msgpack_file.startswith(dists) and six_file.startswith(dists)
        assert pid not in pool.worker_pids()  # an environment process of the worker's
        assert after_first["manifests_served"] == 2 and after_first["files_served"] > 0
        assert second[0] == [2] and second[-1] == pid
        assert after_second == after_first, "the second task fetched packages again"

        # A second worker process on this host, the first one gone: nothing travels.
        start_worker(pool, worker_python, cache)
        pool.wait_workers(2)
        kill_tree(first_worker.pid)
        first_worker.wait()
        wait_for(lambda: len(query(pool.address)["workers"]) == 1, 30, "one worker left")
        go_on.touch()
        out, err = client.communicate(timeout=180)
        assert out, err
        third, after_third = json.loads(out)
        assert third[0] == [3] and third[2] == "msgpack._cmsgpack" and third[-1] != pid
        assert after_third == after_first, "a second worker process fetched packages again"
    finally:
        kill_tree(client.pid)
        client.wait()


VERSIONS = """
    import importlib.metadata, json, os, sys, time
    import fade, tabulate

    def which(_):
        time.sleep(0.01)
        table = tabulate.tabulate([[1]])
        return importlib.metadata.version("tabulate"), tabulate.__file__, os.getpid(), bool(table)

    with fade.Executor(sys.argv[1], heartbeat_interval=0.2) as ex:
        print(json.dumps(sorted(set(map(tuple, ex.map(which, range(60)))))))
"""


def test_a_worker_with_an_older_version_runs_each_clients_own(
    venvs: tuple[Path, Path], pool: Pool, tmp_path: Path
) -> None:
    """The worker has tabulate 0.8.10. A client with 0.10.0 and a client with 0.8.10 (the
    workers' own environment) submit at the same time to the same worker process: each
    task sees its own client's version."""
    worker_python, client_python = venvs
    cache = tmp_path / "worker-cache"
    pool.start_broker()
    start_worker(pool, worker_python, cache)
    (worker_pid,) = pool.wait_workers(1)
    newer = run_client(client_python, VERSIONS, pool.address)
    older = run_client(worker_python, VERSIONS, pool.address)
    try:
        outs = [proc.communicate(timeout=240) for proc in (newer, older)]
    finally:
        for proc in (newer, older):
            kill_tree(proc.pid)
            proc.wait()
    seen_newer, seen_older = (json.loads(out) if out else pytest.fail(err) for out, err in outs)
    dists = str(cache / "packages" / "dists")
    assert {version for version, *_ in seen_newer} == {"0.10.0"}
    assert all(path.startswith(dists) and pid != worker_pid for _, path, pid, _ in seen_newer)
    assert {(version, pid) for version, _, pid, _ in seen_older} == {("0.8.10", worker_pid)}
    assert not any(path.startswith(dists) for _, path, _, _ in seen_older)
    assert os.path.isdir(dists)
