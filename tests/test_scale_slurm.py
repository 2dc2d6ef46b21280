"""``fade-scale slurm`` on a real single-node Slurm cluster (the ``slurm_cluster`` fixture,
tests/slurm.py): a keyed broker outside Slurm, the scaler as a user runs it, worker jobs
submitted with sbatch from the recipe, drained with ``scancel --batch --signal=USR2``.

Every task appends a line to a marker file when it runs, so executions are counted, not
inferred. The scaler's ``--trace`` tells what it decided and why; squeue, sampled by the
test, tells what Slurm really held. Times are short (an idle threshold of a few
seconds) so that a run fits CI; the five-minute run is ``-m slow`` (see the end).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tasks
from conftest import free_port, kill_tree, wait_for
from deployment import BIN, environ, make_pool_keys
from slurm import SlurmCluster

import fade
from fade.scale.slurm import JobSpec, Slurm, SlurmError, compose_script, default_script
from fade.status import query

pytestmark = pytest.mark.timeout(240)

#: The scaler's timing here: looks twice a second, gives back capacity unused for 3 s.
POLL, IDLE = 0.5, 3.0
RECIPE = Path(__file__).resolve().parent.parent / "deploy" / "slurm" / "fade-worker.sbatch"


# -- the provider's commands, without a cluster ---------------------------------------------


def test_the_scaler_submits_the_recipe() -> None:
    """The job script installed with fade is deploy/slurm/fade-worker.sbatch, byte for byte."""
    assert default_script().read_bytes() == RECIPE.read_bytes()


def test_extra_sbatch_lines_go_after_the_scripts_own() -> None:
    text = compose_script(RECIPE.read_text(), ["#SBATCH --qos=long", "#SBATCH --constraint=avx"])
    lines = text.splitlines()
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert lines[directives[-2]] == "#SBATCH --qos=long"
    assert lines[directives[-1]] == "#SBATCH --constraint=avx"
    first_command = next(i for i, line in enumerate(lines) if line.startswith("set -"))
    assert directives[-1] < first_command  # sbatch reads them only before the first command
    for bad in ("--qos=long", "#SBATCH --qos=long\necho"):
        with pytest.raises(ValueError, match="SBATCH"):
            compose_script(RECIPE.read_text(), [bad])


class Recorder:
    """Stands in for subprocess.run: records each command, answers like Slurm."""

    def __init__(self, squeue: str = "") -> None:
        self.calls: list[tuple[list[str], dict[str, str], str | None]] = []
        self.squeue = squeue
        self.next_job = 40

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kw["env"], kw.get("input")))
        out = ""
        if argv[0] == "sbatch":
            self.next_job += 1
            out = f"{self.next_job}\n"
        elif argv[0] == "squeue":
            out = self.squeue
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_worker_jobs_get_the_key_path_in_their_environment_never_on_a_command_line(
    tmp_path: Path,
) -> None:
    keys = make_pool_keys(tmp_path / "pool")
    secret = keys.worker.read_text().split('secret-key = "')[1].split('"')[0]
    spec = JobSpec(
        worker_address="tcp://head:5555",
        worker_keys=str(keys.worker),
        job_name="elastic",
        cpus=16,
        gpus=2,
        partition="gpu",
        account="proj",
        time="4:00:00",
        mem="64G",
        extra_lines=("#SBATCH --qos=long",),
    )
    run = Recorder()
    slurm = Slurm(spec, run=run, environ={"PATH": "/usr/bin"}, user="alice")
    assert slurm.submit(3) == ["41_0", "41_1", "41_2"]  # several: one array
    assert slurm.submit(1) == ["42"]
    slurm.cancel(["41_2"])
    slurm.drain(["41_0", "42"])
    (argv, env, script), single, (cancel, _, _), (drain, _, _) = run.calls
    assert argv[:2] == ["sbatch", "--parsable"] and "--array=0-2" in argv
    assert "--array=0-2" not in single[0]
    for option in ("--job-name=elastic", "--nodes=1", "--ntasks=1", "--cpus-per-task=16",
                   "--gres=gpu:2", "--partition=gpu", "--account=proj", "--time=4:00:00",
                   "--mem=64G", "--export=ALL"):  # fmt: skip
        assert option in argv
    assert env["FADE_KEYS"] == str(keys.worker) and env["FADE_ADDRESS"] == "tcp://head:5555"
    assert script is not None and "#SBATCH --qos=long" in script and "--label" in script
    for call, _, _ in run.calls:
        assert not any(str(keys.worker) in a or secret in a for a in call), call
    assert cancel == ["scancel", "41_2"]
    assert drain == ["scancel", "--batch", "--signal=USR2", "41_0", "42"]


def test_jobs_are_listed_with_their_state() -> None:
    run = Recorder(squeue="41_0|RUNNING\n41_1|PENDING\n43|CONFIGURING\n44|COMPLETING\n")
    spec = JobSpec(worker_address="tcp://h:1", worker_keys="/k", job_name="elastic")
    listed = Slurm(spec, run=run, environ={}, user="alice").jobs()
    assert [(j.id, j.running) for j in listed] == [("41_0", True), ("41_1", False), ("43", True)]
    argv = run.calls[0][0]
    assert "--user=alice" in argv and "--name=elastic" in argv and "--array" in argv


def test_a_failing_slurm_command_says_what_it_said() -> None:
    def failing(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "sbatch: error: invalid partition\n")

    spec = JobSpec(worker_address="tcp://h:1", worker_keys="/k")
    with pytest.raises(SlurmError, match="invalid partition"):
        Slurm(spec, run=failing, environ={}, user="alice").submit(1)


def test_the_scaler_refuses_to_start_without_the_worker_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "fade-scale"), "slurm", "--max", "2", "--worker-keys", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "no worker key file" in out.stderr
    out = subprocess.run(
        [str(BIN / "fade-scale"), "slurm", "--max", "2", "--min", "3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--min" in out.stderr


# -- on the cluster -------------------------------------------------------------------------


@dataclass
class Scaled:
    """A keyed broker on loopback and ``fade-scale slurm`` for it, with what the test
    watches: squeue samples, the trace, the marker file the tasks write."""

    cluster: SlurmCluster
    folder: Path
    name: str
    max_jobs: int
    address: str = ""
    client_key: Path = Path()
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    samples: list[tuple[float, list[str]]] = field(default_factory=list)  # (t, job ids)
    _watching: threading.Event = field(default_factory=threading.Event)

    @property
    def trace(self) -> Path:
        return self.folder / "trace.jsonl"

    @property
    def marker(self) -> Path:
        return self.folder / "ran"

    def start(self, *extra: str, idle: float = IDLE, worker_keys: Path | None = None) -> None:
        keys = make_pool_keys(self.folder / "pool")
        self.client_key = keys.client
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.processes.append(
            subprocess.Popen(
                [str(BIN / "fade-broker"), self.address, "--keys", str(keys.dir)],
                env=environ(),
                stderr=(self.folder / "broker.log").open("wb"),
            )
        )
        wait_for(lambda: self._answers(), 20, "the broker")
        argv = [
            str(BIN / "fade-scale"), "slurm", "--broker", self.address,
            "--keys", str(keys.client), "--worker-keys", str(worker_keys or keys.worker),
            "--job-name", self.name, "--max", str(self.max_jobs), "--cpus-per-job", "1",
            "--idle", str(idle), "--min-age", "1", "--target-wait", "2",
            "--poll", str(POLL), "--trace", str(self.trace),
            "--sbatch-line", f"#SBATCH --output={self.folder}/job-%j.out",
            *extra,
        ]  # fmt: skip
        self.processes.append(
            subprocess.Popen(
                argv,
                env=self.cluster.environ(environ()),
                stderr=(self.folder / "scaler.log").open("wb"),
            )
        )
        threading.Thread(target=self._watch, daemon=True).start()

    def _answers(self) -> bool:
        try:
            query(self.address, timeout=1, keys=str(self.client_key))
        except fade.BrokerUnreachableError:
            return False
        return True

    def _watch(self) -> None:
        while not self._watching.wait(0.2):
            self.samples.append((time.monotonic(), self.jobs()))

    def jobs(self) -> list[str]:
        out = self.cluster.run(
            "squeue", "--noheader", "--array", f"--name={self.name}", "--format=%i", check=False
        )
        return out.stdout.split()

    def state(self) -> dict[str, Any]:
        return query(self.address, keys=str(self.client_key))

    def workers(self) -> int:
        return len(self.state()["workers"])

    def decisions(self) -> list[dict[str, Any]]:
        lines = self.trace.read_text().splitlines() if self.trace.exists() else []
        return [json.loads(line)["decision"] for line in lines if '"decision"' in line]

    def totals(self) -> dict[str, int]:
        decided = self.decisions()
        return {
            "submitted": sum(d["submit"] for d in decided),
            "cancelled": sum(len(d["cancel"]) for d in decided),
            "drained": sum(len(d["drain"]) for d in decided),
        }

    def executions(self) -> list[int]:
        lines = self.marker.read_text().splitlines() if self.marker.exists() else []
        return sorted(int(line.split()[0]) for line in lines)

    def executor(self) -> fade.Executor:
        return fade.Executor(self.address, keys=self.client_key)

    def wait_zero(self, timeout: float) -> float:
        """Wait until no job of ours is left and no worker at the broker; seconds taken."""
        start = time.monotonic()
        wait_for(lambda: not self.jobs() and not self.workers(), timeout, "the pool at zero")
        return time.monotonic() - start

    def most_jobs(self) -> int:
        return max((len(ids) for _, ids in self.samples), default=0)

    def stop(self) -> None:
        self._watching.set()
        scaler = self.processes[-1] if len(self.processes) > 1 else None
        if scaler is not None and scaler.poll() is None:
            scaler.send_signal(signal.SIGTERM)
            try:
                scaler.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        left = self.jobs()
        if left:
            self.cluster.run("scancel", f"--name={self.name}", check=False)
            wait_for(lambda: not self.jobs(), 60, f"jobs {left} to end")
        for process in self.processes:
            kill_tree(process.pid)
            process.wait()

    def logs(self) -> str:
        parts = [
            f"-- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.folder.glob("*.log"))
        ]
        return "\n".join(parts)  # fmt: skip


@pytest.fixture
def scaled(
    slurm_cluster: SlurmCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    @contextmanager
    def make(max_jobs: int) -> Iterator[Scaled]:
        pool = Scaled(slurm_cluster, tmp_path, f"fade-scale-{request.node.name[:40]}", max_jobs)
        try:
            yield pool
        except BaseException:
            print(pool.logs())
            raise
        finally:
            pool.stop()

    yield make


def test_from_zero_a_500_task_map_scales_up_completes_and_scales_back_to_zero(
    scaled: Any,
) -> None:
    with scaled(max_jobs=2) as pool:
        pool.start()
        time.sleep(3 * POLL)
        assert pool.jobs() == [] and pool.workers() == 0  # nothing to do: nothing asked for
        start = time.monotonic()
        with pool.executor() as ex:
            args = [(str(pool.marker), i, 0.02) for i in range(500)]
            futures = [ex.submit(tasks.record_then_sleep, *a) for a in args]
            wait_for(lambda: pool.workers() > 0, 60, "a first worker")
            first_worker = time.monotonic() - start
            results = [f.result(timeout=120) for f in futures]
        done = time.monotonic() - start
        assert results == list(range(500))
        assert pool.executions() == list(range(500))  # each ran once
        zero = pool.wait_zero(IDLE + 30)
        totals = pool.totals()
        assert totals == {"submitted": 2, "cancelled": 0, "drained": 2}, pool.decisions()
        assert pool.most_jobs() <= 2
        print(
            f"\n500 tasks of 20 ms from zero: first worker after {first_worker:.1f}s, "
            f"all done after {done:.1f}s, back to zero {zero:.1f}s later (idle {IDLE:g}s)"
        )


def test_scaling_in_during_a_map_loses_and_duplicates_nothing(scaled: Any) -> None:
    """A map whose window holds 2 tasks, every 40th task 6 s long: while the long one runs
    on one job, the other job has nothing to do and is drained mid-map; the map goes on.
    Every task runs exactly once."""
    with scaled(max_jobs=2) as pool:
        pool.start()
        durations = [6.0 if i % 40 == 39 else 0.05 for i in range(120)]
        with pool.executor() as ex:
            results = list(
                ex.map(
                    tasks.record_then_sleep,
                    [str(pool.marker)] * 120,
                    range(120),
                    durations,
                    buffersize=2,
                )
            )
            during = pool.totals()
        assert results == list(range(120))
        assert pool.executions() == list(range(120))
        assert during["drained"] >= 1, pool.decisions()  # scaled in while the map ran
        pool.wait_zero(IDLE + 30)
        assert pool.most_jobs() <= 2
        print(f"\nscaling in during a map: {during}")


def test_a_burst_of_submissions_never_makes_more_than_max_jobs(scaled: Any) -> None:
    """Four clients submit 150 tasks each at once; --max 3 on a 2-CPU node (so one job
    stays pending: capacity on the way, never a fourth job)."""
    with scaled(max_jobs=3) as pool:
        pool.start()
        executors = [pool.executor() for _ in range(4)]
        try:
            futures = [
                ex.submit(tasks.record_then_sleep, str(pool.marker), c * 1000 + i, 0.05)
                for i in range(150)
                for c, ex in enumerate(executors)
            ]
            results = sorted(f.result(timeout=120) for f in futures)
        finally:
            for ex in executors:
                ex.shutdown()
        assert results == sorted(c * 1000 + i for c in range(4) for i in range(150))
        assert pool.executions() == results
        assert pool.most_jobs() <= 3
        totals = pool.totals()
        assert totals["submitted"] == 3, pool.decisions()
        pool.wait_zero(IDLE + 30)
        print(f"\nburst: at most {pool.most_jobs()} jobs seen; {pool.totals()}")


def test_jobs_that_cannot_join_are_not_submitted_in_a_loop(scaled: Any, tmp_path: Path) -> None:
    """A worker key file that is not one (a site's mistake): each job fails at once. The
    scaler backs off, doubling (--retry-delay 1: submissions at about 0, 1, 3, 7, 15 s)."""
    bad = tmp_path / "not-a-key"
    bad.write_text("nonsense\n")
    bad.chmod(0o600)
    with scaled(max_jobs=2) as pool:
        pool.start("--retry-delay", "1", worker_keys=bad)
        ex = pool.executor()
        try:
            ex.submit(tasks.square, 3)
            time.sleep(14)
            totals = pool.totals()
            assert 2 <= totals["submitted"] <= 5, pool.decisions()
            assert pool.workers() == 0
        finally:
            ex.shutdown(cancel_futures=True)  # no worker will ever take it
        print(f"\njobs that cannot join, over 14 s: {totals}")


def mixed_load(pool: Scaled, seconds: float) -> int:
    """Bursts of mixed tasks (20 ms to 2 s; each burst keeps both processes busy for at
    least a second), with pauses of up to 2 s, for ``seconds``; returns the task count."""
    import random

    rng = random.Random(21)
    count = 0
    end = time.monotonic() + seconds
    with pool.executor() as ex:
        while time.monotonic() < end:
            durations = [rng.choice([0.02, 0.2, 1.0, 2.0]) for _ in range(rng.randint(4, 30))]
            durations[:2] = [1.5, 1.5]
            futures = [
                ex.submit(tasks.record_then_sleep, str(pool.marker), count + i, d)
                for i, d in enumerate(durations)
            ]
            assert [f.result(timeout=120) for f in futures] == list(
                range(count, count + len(durations))
            )
            count += len(durations)
            time.sleep(rng.uniform(0, 2.0))
    return count


def run_mixed_load(scaled: Any, seconds: float) -> None:
    with scaled(max_jobs=2) as pool:
        pool.start(idle=8.0)
        count = mixed_load(pool, seconds)
        during = pool.totals()
        assert pool.executions() == list(range(count))
        # The pool grew once, to --max, and nothing was cancelled or drained while the
        # load lasted (its pauses are shorter than the idle threshold).
        assert during == {"submitted": 2, "cancelled": 0, "drained": 0}, pool.decisions()
        zero = pool.wait_zero(8.0 + 30)
        assert pool.totals() == {"submitted": 2, "cancelled": 0, "drained": 2}
        print(
            f"\n{seconds:g}s of mixed load, {count} tasks: {pool.totals()}, zero {zero:.1f}s after"
        )


def test_a_minute_of_mixed_load_starts_and_ends_each_job_once(scaled: Any) -> None:
    run_mixed_load(scaled, 60)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_five_minutes_of_mixed_load_start_and_end_each_job_once(scaled: Any) -> None:
    """The issue's five minutes: ``pytest -m slow tests/test_scale_slurm.py``."""
    run_mixed_load(scaled, 300)
