"""The Slurm provider: worker jobs submitted with sbatch, listed with squeue, ended with
scancel.

::

    submit(n)  sbatch --parsable --array=0-(n-1) --job-name NAME [site options] < script
               script: fade-worker.sbatch (packaged here; deploy/slurm/ holds the same),
                       the site's extra #SBATCH lines put after its own
               environment: FADE_ADDRESS (the broker as the nodes see it) and FADE_KEYS (the
                       worker key's path on a shared filesystem): never a command line
    jobs()     squeue --noheader --array --user ME --name NAME --format '%i|%T'
    cancel(ids)  scancel IDS                         (pending or starting: no task yet)
    drain(ids)   scancel --batch --signal=USR2 IDS   (the recipe drains on SIGUSR2)

Each job is one node's workers (``--nodes=1 --ntasks=1``, a worker process per CPU of
the task); its workers carry the label ``slurm:ID`` (the recipe sets it from
``SLURM_JOB_ID``, or ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID`` for an element of an
array), which is how the scaler knows which job a worker belongs to.
"""

from __future__ import annotations

import getpass
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fade.errors import FadeError
from fade.scale.observe import Listed

__all__ = [
    "LABEL_PREFIX",
    "JobSpec",
    "Slurm",
    "SlurmError",
    "compose_script",
    "default_script",
]

LABEL_PREFIX = "slurm:"
#: squeue states of a job waiting for its resources, and of one that runs (or is about to).
_WAITING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
_RUNNING = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED", "RESIZING"})
#: Seconds a Slurm command may take.
COMMAND_TIMEOUT = 60.0
#: Slurm's default MaxArraySize is 1001: an array never has more elements than this.
MAX_ARRAY = 1000

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class SlurmError(FadeError):
    """A Slurm command failed; the message quotes what it said."""


def default_script() -> Path:
    """The worker job script installed with fade (the recipe deploy/slurm/fade-worker.sbatch)."""
    return Path(str(resources.files("fade.scale") / "fade-worker.sbatch"))


def compose_script(text: str, extra_lines: Sequence[str]) -> str:
    """The job script with the site's extra ``#SBATCH`` lines after its own (where sbatch
    still reads them: before the first command, and later lines win)."""
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.startswith("#SBATCH")), default=0)
    for line in extra_lines:
        if not line.startswith("#SBATCH ") or "\n" in line:
            raise ValueError(f"not one #SBATCH line: {line!r}")
    return "\n".join([*lines[: last + 1], *extra_lines, *lines[last + 1 :]]) + "\n"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What each worker job asks Slurm for, and what its workers are told."""

    worker_address: str  # the broker as the compute nodes reach it
    worker_keys: str  # the worker key file's path on a filesystem the nodes share
    job_name: str = "fade-scale"
    cpus: int = 1  # per job: one worker process each
    gpus: int = 0
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    mem: str | None = None
    extra_lines: tuple[str, ...] = ()
    script: Path | None = None  # None: the packaged fade-worker.sbatch

    def options(self) -> list[str]:
        """sbatch's options for one job (they override the script's #SBATCH lines)."""
        options = [
            f"--job-name={self.job_name}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={self.cpus}",
            "--export=ALL",  # FADE_ADDRESS and FADE_KEYS reach the job, whatever the site sets
        ]
        for name, value in (
            ("partition", self.partition),
            ("account", self.account),
            ("time", self.time),
            ("mem", self.mem),
        ):
            if value:
                options.append(f"--{name}={value}")
        if self.gpus:
            options.append(f"--gres=gpu:{self.gpus}")
        return options

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        return {**base, "FADE_ADDRESS": self.worker_address, "FADE_KEYS": self.worker_keys}


class Slurm:
    """Submits, lists and ends our worker jobs (those named ``spec.job_name``, ours)."""

    label_prefix = LABEL_PREFIX
    #: sbatch returns once slurmctld holds the job: squeue lists it from then on, so a
    #: submitted job squeue does not show has ended (a job that fails at once, say).
    listing_grace = 0.0

    def __init__(
        self,
        spec: JobSpec,
        *,
        run: Runner = subprocess.run,
        environ: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> None:
        self.spec = spec
        self._run = run
        self._environ = dict(os.environ if environ is None else environ)
        self.user = user or getpass.getuser()
        script = spec.script or default_script()
        self.script = compose_script(script.read_text(), spec.extra_lines)

    def jobs(self) -> list[Listed]:
        out = self._command(
            "squeue",
            "--noheader",
            "--array",
            f"--user={self.user}",
            f"--name={self.spec.job_name}",
            "--format=%i|%T",
        )
        listed = []
        for line in out.splitlines():
            job_id, _, state = line.strip().partition("|")
            if job_id and state in _WAITING | _RUNNING:
                listed.append(Listed(job_id, running=state in _RUNNING))
        return listed

    def submit(self, count: int) -> list[str]:
        """Submit ``count`` jobs (one array for several); their ids as squeue shows them."""
        ids: list[str] = []
        while count > 0:
            batch = min(count, MAX_ARRAY)
            array = [f"--array=0-{batch - 1}"] if batch > 1 else []
            out = self._command(
                "sbatch",
                "--parsable",
                *self.spec.options(),
                *array,
                stdin=self.script,
                env=self.spec.environment(self._environ),
            )
            job = out.strip().split(";")[0]
            if not job.isdigit():
                raise SlurmError(f"sbatch answered {out.strip()!r}, not a job id")
            ids += [f"{job}_{i}" for i in range(batch)] if batch > 1 else [job]
            count -= batch
        return ids

    def cancel(self, ids: Sequence[str]) -> None:
        if ids:
            self._command("scancel", *ids)

    def drain(self, ids: Sequence[str]) -> None:
        """SIGUSR2 to each job's batch script, which turns it into one SIGTERM to
        fade-worker: its workers finish their running tasks and hand back the rest."""
        if ids:
            self._command("scancel", "--batch", "--signal=USR2", *ids)

    def _command(
        self, *argv: str, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        try:
            out = self._run(
                list(argv),
                input=stdin,
                env=dict(env or self._environ),
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SlurmError(f"{argv[0]} could not run: {exc}") from None
        if out.returncode != 0:
            said = (out.stderr or out.stdout).strip()[-500:]
            raise SlurmError(f"{' '.join(argv[:3])} ... failed ({out.returncode}): {said}")
        stdout: str = out.stdout
        return stdout
