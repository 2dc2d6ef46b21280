"""Elastic pools: grow a fade pool while work waits, give nodes back when it is idle.

::

    fade-scale slurm ... (fade/scale/cli.py)
        every --poll seconds:
        broker --STATUS--> state ─┐
                                  ├─ observe.Observer ─> Observation ─> policy.Policy ─> Decision
        squeue ---------> jobs ───┘     (jobs, workers,     (pure: the same    (submit N, cancel,
                                         idle times)         for every          drain)
                                                             provider)
        Decision ─> slurm.Slurm: sbatch --array (fade-worker.sbatch), scancel, scancel --signal=USR2

* :mod:`fade.scale.policy` decides, from numbers alone: how many jobs to ask for so
  that queued work waits less than a target, and which capacity has gone unused long
  enough to give back; its anti-churn rules are unit-tested from recorded traces.
* :mod:`fade.scale.observe` turns the broker's state and the scheduler's job list into
  the policy's :class:`~fade.scale.policy.Observation`: which job each worker belongs to
  (its ``--label``), which jobs are idle and since when, which never joined.
* :mod:`fade.scale.slurm` is the Slurm provider: sbatch, squeue, scancel.
* On Kubernetes the existing engine scales (KEDA or an HPA on fade's Prometheus metrics;
  ``deploy/k8s/keda``, ``deploy/k8s/hpa``), with the same rules expressed in its settings.
"""

from __future__ import annotations

__all__: list[str] = []
