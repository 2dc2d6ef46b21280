"""``fade-scale``: an elastic pool, grown and shrunk through the cluster's scheduler.

::

    fade-scale slurm --broker tcp://head:5555 --keys ~/.fade/scale.key \\
        --worker-keys ~/.fade/worker.key --min 0 --max 64 --cpus-per-job 16 \\
        --partition cpu --account proj --time 4:00:00 --sbatch-line '#SBATCH --qos=long'

It asks the broker for its state (``--keys``: a client key, as fade-status uses) every
``--poll`` seconds, lists its jobs with squeue, and submits, cancels or drains worker
jobs as :mod:`fade.scale.policy` decides. The workers get the broker's address and their
key file's path (``--worker-keys``, on a filesystem the nodes share) in their job's
environment, never on a command line. SIGINT or SIGTERM stop the scaler and leave the
jobs as they are: a scaler started again with the same ``--job-name`` adopts them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from fade._env import default_address
from fade._version import __version__
from fade.keyfiles import KEYS_ENV
from fade.scale.loop import Scaler
from fade.scale.policy import Policy, Settings
from fade.scale.slurm import JobSpec, Slurm
from fade.status import query

__all__ = ["main", "parse_args", "settings_of"]

log = logging.getLogger("fade.scale")


def _policy_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    group = parser.add_argument_group("policy (docs/deploying.md: Elastic pools)")
    group.add_argument(
        "--min", type=int, default=d.min_jobs, help="jobs kept (default %(default)s)"
    )
    group.add_argument(
        "--max", type=int, required=True, help="jobs alive at most, draining ones included"
    )
    group.add_argument(
        "--target-wait",
        type=float,
        default=d.target_wait,
        metavar="SECONDS",
        help="ask for jobs when waiting tasks would wait longer (default %(default)s)",
    )
    group.add_argument(
        "--idle",
        type=float,
        default=d.idle_time,
        metavar="SECONDS",
        help="give back capacity unused this long, and no sooner after a change "
        "(default %(default)s)",
    )
    group.add_argument(
        "--min-age",
        type=float,
        default=d.min_age,
        metavar="SECONDS",
        help="drain no job that has run less (default %(default)s)",
    )
    _job_timing_arguments(group, d)


def _job_timing_arguments(group: argparse._ArgumentGroup, d: Settings) -> None:
    """The policy's patience with jobs that do not join, its polling, and its trace."""
    group.add_argument(
        "--start-timeout",
        type=float,
        default=d.start_timeout,
        metavar="SECONDS",
        help="cancel a running job none of whose workers joined by then (default %(default)s)",
    )
    group.add_argument(
        "--retry-delay",
        type=float,
        default=d.retry_delay,
        metavar="SECONDS",
        help="after a job that never joined, submit nothing for this long, doubled at "
        "each failure in a row (default %(default)s)",
    )
    group.add_argument(
        "--poll", type=float, default=5.0, metavar="SECONDS", help="(default %(default)s)"
    )
    group.add_argument(
        "--trace", metavar="FILE", help="append what the policy saw and decided (JSON lines)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fade-scale", description="Grow and shrink a fade pool through a cluster scheduler."
    )
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    sub = parser.add_subparsers(dest="provider", required=True)
    slurm = sub.add_parser("slurm", help="worker jobs on Slurm (sbatch, squeue, scancel)")
    slurm.add_argument(
        "--broker",
        default=default_address(),
        help="the broker's address from here (default %(default)s; FADE_ADDRESS sets it)",
    )
    slurm.add_argument(
        "--keys", metavar="FILE", help=f"a client key to ask the broker with (default ${KEYS_ENV})"
    )
    slurm.add_argument(
        "--worker-address",
        metavar="ADDRESS",
        help="the broker's address as the compute nodes reach it (default: --broker)",
    )
    slurm.add_argument(
        "--worker-keys",
        metavar="PATH",
        default=str(Path.home() / ".fade" / "worker.key"),
        help="the worker key file, on a filesystem the nodes share (default %(default)s)",
    )
    slurm.add_argument(
        "--job-name", default="fade-scale", help="our jobs' name (default %(default)s)"
    )
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--time", help="each job's time limit, e.g. 4:00:00")
    slurm.add_argument(
        "--cpus-per-job", type=int, default=1, help="worker processes per job (default %(default)s)"
    )
    slurm.add_argument("--gpus-per-job", type=int, default=0)
    slurm.add_argument("--mem", help="memory per job, e.g. 64G")
    slurm.add_argument(
        "--sbatch-line",
        action="append",
        default=[],
        metavar="'#SBATCH ...'",
        help="an extra line for the job script (repeat it for more)",
    )
    slurm.add_argument(
        "--script", type=Path, help="another worker job script (default: fade-worker.sbatch)"
    )
    slurm.add_argument("--log-level", default="INFO")
    _policy_arguments(slurm)
    return parser


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(
        min_jobs=args.min,
        max_jobs=args.max,
        slots_per_job=args.cpus_per_job,
        target_wait=args.target_wait,
        idle_time=args.idle,
        min_age=args.min_age,
        start_timeout=args.start_timeout,
        retry_delay=args.retry_delay,
    )


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings, JobSpec]:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = settings_of(args)
    try:
        settings.check()
    except ValueError as exc:
        parser.error(str(exc))
    if args.poll <= 0:
        parser.error("--poll must be > 0")
    if args.gpus_per_job < 0:
        parser.error("--gpus-per-job must be >= 0")
    spec = JobSpec(
        worker_address=args.worker_address or args.broker,
        worker_keys=os.path.abspath(os.path.expanduser(args.worker_keys)),
        job_name=args.job_name,
        cpus=args.cpus_per_job,
        gpus=args.gpus_per_job,
        partition=args.partition,
        account=args.account,
        time=args.time,
        mem=args.mem,
        extra_lines=tuple(args.sbatch_line),
        script=args.script,
    )
    return args, settings, spec


def main(argv: Sequence[str] | None = None) -> int:
    args, settings, spec = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s fade-scale %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not os.path.isfile(spec.worker_keys):
        print(f"fade-scale: no worker key file {spec.worker_keys} (--worker-keys)", file=sys.stderr)
        return 2
    try:
        provider = Slurm(spec)
    except (OSError, ValueError) as exc:
        print(f"fade-scale: {exc}", file=sys.stderr)
        return 2

    def ask() -> dict[str, Any]:
        return query(args.broker, keys=args.keys)

    with ExitStack() as stack:
        trace = stack.enter_context(open(args.trace, "a")) if args.trace else None
        scaler = Scaler(ask, provider, Policy(settings), trace=trace)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: scaler.stop())
        log.info(
            "scaling %s on Slurm: jobs %s named %s, %d to %d, %d worker processes each",
            args.broker,
            spec.job_name,
            spec.job_name,
            settings.min_jobs,
            settings.max_jobs,
            spec.cpus,
        )
        scaler.run(args.poll)
        log.info(
            "stopped: %d jobs submitted, %d cancelled, %d drained; the jobs left run on",
            scaler.submitted,
            scaler.cancelled,
            scaler.drained,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
