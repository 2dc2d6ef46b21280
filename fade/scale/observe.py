"""The policy's view of the pool, from the broker's state and the scheduler's job list.

::

    broker STATE: queued, backlog, tasks_done,        scheduler: our jobs, pending or
    workers [{label, state, done}, ...]               running (squeue)
                 \\                                     /
                  Observer.observe(now, state, listed) --> policy.Observation

A worker belongs to a job by its label (``fade-worker --label slurm:JOB``, which the
Slurm recipe sets). The observer remembers, per job, when it was submitted and first
seen running, whether any of its workers ever joined, and since when none of them
held a task (a task finished between two looks counts as activity: its worker's
``done`` grew). Jobs the scaler cancelled or drained are draining until the scheduler
forgets them. A job that disappears before any of its workers joined, unasked, is a
failure (the policy then holds submissions back). No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fade.scale.policy import Job, JobState, Observation

__all__ = ["LISTING_GRACE", "Listed", "Observer"]

#: Seconds a job we submitted may be missing from the scheduler's list before it counts
#: as gone, for a scheduler whose listing may lag a submission (Slurm's does not).
LISTING_GRACE = 15.0


@dataclass(frozen=True, slots=True)
class Listed:
    """One of our jobs as the scheduler lists it."""

    id: str
    running: bool  # False: waiting in the scheduler's queue


@dataclass(slots=True)
class _Memory:
    submitted: float
    listed: bool = False  # the scheduler has listed it
    started: float | None = None
    joined: bool = False
    ending: bool = False  # we cancelled or drained it
    done: int = 0  # its workers' tasks done, at the last look
    idle_since: float | None = None


@dataclass
class Observer:
    """Turns each look at the broker and the scheduler into an Observation."""

    label_prefix: str  # "slurm:": a worker labelled slurm:123 belongs to job 123
    listing_grace: float = LISTING_GRACE
    _jobs: dict[str, _Memory] = field(default_factory=dict)

    def submitted(self, ids: Iterable[str], now: float) -> None:
        for job_id in ids:
            self._jobs.setdefault(job_id, _Memory(submitted=now))

    def ending(self, ids: Iterable[str]) -> None:
        """These jobs were cancelled or told to drain: capacity no more."""
        for job_id in ids:
            if job_id in self._jobs:
                self._jobs[job_id].ending = True

    def observe(
        self, now: float, state: Mapping[str, Any], listed: Sequence[Listed]
    ) -> Observation:
        workers = [w for w in state.get("workers", []) if isinstance(w, dict)]
        mine = _by_job(workers, self.label_prefix)
        failed = self._forget_gone(now, {job.id for job in listed})
        jobs = tuple(self._job(now, entry, mine.get(entry.id, [])) for entry in listed)
        jobs += self._unlisted(now, {job.id for job in listed})
        serving = [w for w in workers if w.get("state") != "draining"]
        return Observation(
            now=now,
            waiting=_count(state.get("queued")) + _count(state.get("backlog")),
            workers=len(serving),
            busy=sum(w.get("state") == "busy" for w in serving),
            done=_count(state.get("tasks_done")),
            jobs=jobs,
            failed=failed,
        )

    def _job(self, now: float, entry: Listed, workers: list[dict[str, Any]]) -> Job:
        memory = self._jobs.setdefault(entry.id, _Memory(submitted=now))
        memory.listed = True
        if entry.running and memory.started is None:
            memory.started = now
        serving = [w for w in workers if w.get("state") != "draining"]
        busy = sum(w.get("state") == "busy" for w in serving)
        done = sum(_count(w.get("done")) for w in workers)
        if busy:
            memory.idle_since = None
        elif memory.idle_since is None or done != memory.done or not memory.joined:
            memory.idle_since = now  # idle now; active (or first seen) since the last look
        memory.done = done
        memory.joined = memory.joined or bool(serving)
        if memory.ending or (workers and not serving):
            state = JobState.DRAINING
        elif not entry.running:
            state = JobState.PENDING
        elif not memory.joined:
            state = JobState.STARTING
        else:
            state = JobState.READY
        return Job(
            id=entry.id,
            state=state,
            submitted=memory.submitted,
            started=memory.started,
            workers=len(serving),
            busy=busy,
            idle_since=memory.idle_since if state is JobState.READY and not busy else None,
        )

    def _unlisted(self, now: float, listed: set[str]) -> tuple[Job, ...]:
        """Jobs just submitted that the listing has not shown yet: pending."""
        return tuple(
            Job(job_id, JobState.DRAINING if memory.ending else JobState.PENDING, memory.submitted)
            for job_id, memory in self._jobs.items()
            if job_id not in listed and now - memory.submitted < self.listing_grace
        )

    def _forget_gone(self, now: float, listed: set[str]) -> int:
        """Forget the jobs the scheduler no longer lists; how many of them never joined
        though we had not asked them to end."""
        gone = [
            job_id
            for job_id, memory in self._jobs.items()
            if job_id not in listed
            and (memory.listed or now - memory.submitted >= self.listing_grace)
        ]
        failed = 0
        for job_id in gone:
            memory = self._jobs.pop(job_id)
            failed += not memory.joined and not memory.ending
        return failed


def _by_job(workers: list[dict[str, Any]], prefix: str) -> dict[str, list[dict[str, Any]]]:
    mine: dict[str, list[dict[str, Any]]] = {}
    for worker in workers:
        label = worker.get("label")
        if isinstance(label, str) and label.startswith(prefix) and len(label) > len(prefix):
            mine.setdefault(label[len(prefix) :], []).append(worker)
    return mine


def _count(value: object) -> int:
    """A count from the broker's state; anything else is 0 (a state is only read)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
