"""The Slurm recipes (deploy/slurm, docs/deploying.md) on a real single-node cluster.

munged, slurmctld and slurmd run from Debian's packages (the ``slurm_cluster``
fixture, tests/slurm.py); the scripts are submitted with ``sbatch`` exactly as
written, and stopped with ``scancel``. Keys are made as the docs say, in a home
folder of the test's own (``$HOME``, which sbatch passes on to the jobs). The
broker binds every interface, as the recipe does; clients reach it on loopback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tasks
from conftest import free_port, kill_tree, wait_for
from deployment import JOB, JOB_RESULT, environ, make_pool_keys, wait_workers
from slurm import SlurmCluster

import fade

pytestmark = pytest.mark.timeout(150)

SLURM = Path(__file__).resolve().parent.parent / "deploy" / "slurm"
#: Seconds a job gets to start, serve and end here (a noisy 2-core machine).
JOB_TIMEOUT = 60


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home folder with the pool's keys where fade.sbatch looks for them (~/.fade)."""
    home = tmp_path / "home"
    (home / ".fade").mkdir(parents=True, mode=0o700)
    make_pool_keys(
        home / ".fade" / "pool", home / ".fade" / "worker.key", home / ".fade" / "client.key"
    )
    return home


def pool_env(home: Path, port: int) -> dict[str, str]:
    return environ({"HOME": str(home), "FADE_PORT": str(port), "FADE_HTTP_PORT": str(free_port())})


def test_pool_job_runs_the_program_on_its_pool(slurm_cluster: SlurmCluster, home: Path) -> None:
    """`sbatch fade.sbatch python my_job.py`: a keyed broker on every interface, workers
    started by srun on every CPU, the program's map, then drain and stop."""
    port = free_port()
    n = slurm_cluster.cpus
    job = slurm_cluster.sbatch(
        SLURM / "fade.sbatch",
        sys.executable,
        "-c",
        JOB,
        str(n),
        options=["--nodes=1", f"--cpus-per-task={n}"],
        env=pool_env(home, port),
    )
    record = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    output = slurm_cluster.output(job)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", output
    assert JOB_RESULT in output
    assert "CURVE keys on" in output
    assert f"a pool at tcp://{slurm_cluster.node}:{port} for job {job}" in output
    # The pool went down with the program: each worker drained, then the broker stopped.
    assert output.count("draining: handing back unstarted tasks") == n, output
    assert "fade-broker stopped" in output


def test_pool_job_passes_on_the_program_status(slurm_cluster: SlurmCluster, home: Path) -> None:
    job = slurm_cluster.sbatch(
        SLURM / "fade.sbatch",
        "sh",
        "-c",
        "exit 3",
        options=["--nodes=1", "--cpus-per-task=1"],
        env=pool_env(home, free_port()),
    )
    record = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "3:0", record


def test_pool_job_serves_clients_until_scancel_drains_it(
    slurm_cluster: SlurmCluster, home: Path, tmp_path: Path
) -> None:
    """`sbatch fade.sbatch` with no program is a pool for clients elsewhere; `scancel
    --batch --signal=USR2` lets the running tasks finish (each runs once), then ends it."""
    port = free_port()
    n = slurm_cluster.cpus
    address = f"tcp://127.0.0.1:{port}"
    client_key = home / ".fade" / "client.key"
    job = slurm_cluster.sbatch(
        SLURM / "fade.sbatch",
        options=["--nodes=1", f"--cpus-per-task={n}"],
        env=pool_env(home, port),
    )
    slurm_cluster.wait_state(job, {"RUNNING"}, JOB_TIMEOUT)
    wait_workers(address, client_key, n)
    marker = tmp_path / "ran"
    with fade.Executor(address, keys=client_key) as ex:
        futures = [ex.submit(tasks.record_then_sleep, str(marker), i, 3) for i in range(n)]
        wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) >= n, 30, "tasks")
        slurm_cluster.scancel(job, "--batch", "--signal=USR2")
        assert [f.result(timeout=30) for f in futures] == list(range(n))
    record = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    output = slurm_cluster.output(job)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", output
    runs = sorted(int(line.split()[0]) for line in marker.read_text().splitlines())
    assert runs == list(range(n)), "a task ran twice or never: the drain handed it back"
    assert output.count("left; re-queueing the 0 tasks it held") == n, output
    assert "fade-broker stopped" in output


def test_worker_job_joins_a_broker_and_drains(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """fade-worker.sbatch, as a job of its own (what an elastic pool submits): it joins a
    broker elsewhere with the worker key from FADE_KEYS and drains on SIGUSR2."""
    keys = make_pool_keys(tmp_path / "pool")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen(
        [sys.executable, "-m", "fade.broker", address, "--keys", str(keys.dir)],
        stderr=(tmp_path / "broker.log").open("wb"),
    )
    try:
        job = slurm_cluster.sbatch(
            SLURM / "fade-worker.sbatch",
            options=["--cpus-per-task=1"],
            env=environ({"FADE_ADDRESS": address, "FADE_KEYS": str(keys.worker)}),
        )
        wait_workers(address, keys.client, 1)
        marker = tmp_path / "ran"
        with fade.Executor(address, keys=keys.client) as ex:
            future = ex.submit(tasks.record_then_sleep, str(marker), "once", 3)
            wait_for(marker.exists, 30, "the task to start")
            slurm_cluster.scancel(job, "--batch", "--signal=USR2")
            assert future.result(timeout=30) == "once"
        record = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
        output = slurm_cluster.output(job)
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", output
        assert marker.read_text().count("once") == 1, "the running task was handed back"
        assert "left (status 0)" in output
    finally:
        kill_tree(broker.pid)
        broker.wait()


def test_worker_job_without_its_key_says_so(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "worker.key"
    job = slurm_cluster.sbatch(
        SLURM / "fade-worker.sbatch",
        options=["--cpus-per-task=1"],
        env=environ({"FADE_ADDRESS": "tcp://127.0.0.1:9", "FADE_KEYS": str(missing)}),
    )
    record = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_TIMEOUT)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", record
    assert f"no worker key file {missing}" in slurm_cluster.output(job)
