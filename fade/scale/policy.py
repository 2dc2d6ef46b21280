"""When to ask the cluster for more workers and when to give them back: numbers in,
decisions out, no I/O; the same for every provider.

::

    Observation (every poll)          Policy.decide                        Decision
      now, waiting tasks, busy and  ──> 1. jobs that never joined: cancel ──> submit N jobs
      idle worker processes, tasks      2. work waits longer than the       cancel [pending]
      done, our jobs (pending,             target: ask for jobs             drain  [starting, idle]
      starting, ready, draining)        3. capacity unused for the idle
                                           time: give the surplus back

**Scaling up.** Tasks wait (queued at the broker, or held back by clients for want of
room there). With ``S`` worker processes present or on the way (jobs pending in the
scheduler's queue or starting count as their processes: capacity on the way) and
tasks lasting ``d`` seconds on average, the last waiting task starts after about
``waiting * d / S`` seconds. When that exceeds ``target_wait``, the policy asks for
enough jobs to bring it under, never for more processes than there are tasks, and
never for more than ``max_jobs`` jobs alive at once (draining ones included). ``d``
is measured (:class:`TaskClock`, Little's law over the last minute, kept between
bursts, raised while processes stay busy with nothing finishing); until it is known,
each waiting task is given a process of its own.

**Scaling down.** Only capacity that went unused for ``idle_time`` is given back: over
a window of ``idle_time`` seconds with no waiting task at any observation, the pool
needed at most as many processes as were busy at the window's peak; jobs beyond that
(and beyond ``min_jobs``) go: pending ones are cancelled, starting ones and running
ones whose workers hold no task are drained (their workers finish a task that reached
them meanwhile and hand back what they had not started: nothing is lost or run twice).

**Anti-churn.** (1) Nothing is given back while work waits, or before a full
``idle_time`` has passed since the last change of size, up or down: each scale-down
follows ``idle_time`` seconds of plain surplus, so a job submitted for a burst is not
cancelled the moment the burst is served. (2) A running job is drained only once it
has run ``min_age`` seconds, and only while none of its workers holds a task.
(3) Pending jobs count as capacity, so a slow queue does not make the policy ask
again and again. (4) Jobs that end or time out before any of their workers joined
(a wrong address, a missing key file) hold further submissions back, for
``retry_delay`` doubled at each failure in a row, up to :data:`MAX_RETRY_DELAY`.
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass, field

__all__ = [
    "MAX_RETRY_DELAY",
    "Decision",
    "Job",
    "JobState",
    "Observation",
    "Policy",
    "Settings",
    "TaskClock",
]

#: Submissions are never held back longer than this after jobs that failed to join.
MAX_RETRY_DELAY = 600.0
#: Seconds of observations the task clock averages over.
CLOCK_WINDOW = 60.0
#: The task clock measures when its window holds this many times more finished tasks
#: than tasks running at either of its edges (so the edges bias it by under 1/8).
EDGE_FACTOR = 4


class JobState(enum.Enum):
    """Where one of our jobs stands, as the scheduler and the broker see it."""

    PENDING = "pending"  # in the scheduler's queue: capacity on the way
    STARTING = "starting"  # running, no worker of it at the broker yet: on the way too
    READY = "ready"  # its workers are at the broker
    DRAINING = "draining"  # told to leave (or leaving): no capacity, but still a job


@dataclass(frozen=True, slots=True)
class Job:
    """One job the scaler started, as observed."""

    id: str
    state: JobState
    submitted: float  # when it was submitted (or first seen), on the policy's clock
    started: float | None = None  # when it was first seen running
    workers: int = 0  # its worker processes at the broker
    busy: int = 0  # of which hold a task
    idle_since: float | None = None  # since when none of them held a task; None: busy


@dataclass(frozen=True, slots=True)
class Observation:
    """The pool at one moment. ``workers`` and ``busy`` count every worker process at the
    broker that is not draining, ours or not (others are capacity we cannot give back)."""

    now: float
    waiting: int  # tasks queued at the broker plus those clients hold back
    workers: int
    busy: int
    done: int  # tasks the broker finished since it started (its counter)
    jobs: tuple[Job, ...] = ()
    failed: int = 0  # our jobs that ended, since the last observation, before joining


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now: submit this many jobs, cancel these, drain these."""

    submit: int = 0
    cancel: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.submit or self.cancel or self.drain)


@dataclass(frozen=True, slots=True)
class Settings:
    """The scaler's knobs (``fade-scale --help`` lists them with their defaults)."""

    min_jobs: int = 0
    max_jobs: int = 1
    slots_per_job: int = 1  # worker processes one job brings
    target_wait: float = 30.0
    idle_time: float = 120.0
    min_age: float = 60.0
    start_timeout: float = 600.0  # a job running this long with no worker at the broker
    retry_delay: float = 30.0

    def check(self) -> None:
        """Raise ValueError naming the first setting that makes no sense."""
        if not 0 <= self.min_jobs <= self.max_jobs or self.max_jobs < 1:
            raise ValueError("need 0 <= --min <= --max and --max >= 1")
        if self.slots_per_job < 1:
            raise ValueError("a job must bring at least one worker process")
        for name in ("target_wait", "idle_time", "start_timeout", "retry_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0")
        if self.min_age < 0:
            raise ValueError("min-age must be >= 0")


class TaskClock:
    """The mean task duration, by Little's law over the last :data:`CLOCK_WINDOW`
    seconds of observations: busy worker-seconds divided by tasks finished.

    Between bursts of work (no task finished in the window) the last measurement
    stands, so a pool scaled to zero does not forget how long its tasks take; but while
    processes have been busy all along without finishing anything, their tasks have run
    at least that long, and the estimate is raised to it."""

    def __init__(self, window: float = CLOCK_WINDOW) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self._known: float | None = None
        self._busy_since: float | None = None  # the start of the current busy stretch

    def observe(self, now: float, done: int, busy: int) -> None:
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # the broker restarted: its counter began again
            self._busy_since = None
        if self._busy_since is not None and (not busy or done != self._samples[-1][1]):
            # The stretch ends: its tasks ran at least from its start to the last look
            # that saw nothing finished.
            stretch = self._samples[-1][0] - self._busy_since
            if stretch > (self._known or 0.0):
                self._known = stretch
            self._busy_since = None
        if busy and self._busy_since is None:
            self._busy_since = now
        self._samples.append((now, done, busy))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        samples = self._samples
        finished = samples[-1][1] - samples[0][1]
        # Tasks running at either edge of the window are counted in part (their time or
        # their end, not both): measure only when they are few beside those finished.
        if finished > 0 and finished >= EDGE_FACTOR * max(samples[0][2], busy):
            # Each look's busy count holds until the next look (the tasks it saw ran then).
            busy_seconds = sum(
                (t1 - t0) * b0 for (t0, _, b0), (t1, _, _) in zip(samples, list(samples)[1:])
            )
            self._known = max(busy_seconds, 1e-3) / finished

    def mean(self) -> float | None:
        """Seconds per task; None until one finished (and its length is not bounded
        from below by tasks running for long without finishing)."""
        if self._busy_since is None or self._known is None:
            return self._known
        running_for = self._samples[-1][0] - self._busy_since
        return max(self._known, running_for)


class _Window:
    """The observations of the last ``idle_time`` seconds, and when the size last changed:
    was there a moment with waiting work, and how many processes were busy at most."""

    def __init__(self, span: float, changed: float) -> None:
        self.span = span
        self.changed = changed
        self._samples: collections.deque[tuple[float, int, bool]] = collections.deque()

    def add(self, obs: Observation) -> None:
        self._samples.append((obs.now, obs.busy, obs.waiting > 0))
        while self._samples and self._samples[0][0] < obs.now - self.span:
            self._samples.popleft()

    def quiet_since(self, now: float) -> float:
        """Seconds without a change of size and without waiting work (up to ``span``)."""
        waited = [t for t, _, waiting in self._samples if waiting]
        last = max([self.changed, *waited])
        return now - last

    def peak_busy(self) -> int:
        return max((busy for _, busy, _ in self._samples), default=0)


@dataclass(slots=True)
class _Backoff:
    """Failures in a row of jobs that never joined, and until when not to submit."""

    failures: int = 0
    until: float = -math.inf


@dataclass
class Policy:
    """Decides from each observation in turn. Holds only what the rules need to remember
    (the window, the task clock, the back-off); the clock is the observations' own."""

    settings: Settings
    clock: TaskClock = field(default_factory=TaskClock)
    _window: _Window | None = None
    _backoff: _Backoff = field(default_factory=_Backoff)

    def decide(self, obs: Observation) -> Decision:
        self.clock.observe(obs.now, obs.done, obs.busy)
        if self._window is None:
            self._window = _Window(self.settings.idle_time, obs.now)
        self._window.add(obs)
        if any(job.state in (JobState.READY, JobState.DRAINING) for job in obs.jobs):
            self._backoff.failures = 0  # a job joined: the setup works
        if obs.failed:
            self._fail(obs.now, obs.failed)
        stuck = self._stuck(obs)
        if stuck:
            self._fail(obs.now, len(stuck))
        change = self._grow(obs) or self._shrink(obs, stuck)
        if change:
            self._window.changed = obs.now  # a change of size: the next window starts
        if not stuck:
            return change
        why = (
            f"{len(stuck)} jobs ran {self.settings.start_timeout:g}s without any worker "
            "at the broker"
        )
        reason = "; ".join(text for text in (why, change.reason) if text)
        return Decision(change.submit, stuck + change.cancel, change.drain, reason)

    def submission_failed(self, now: float) -> None:
        """The scheduler refused a submission (a bad partition, say): back off as after a
        job that never joined, so that a broken setup is not retried every poll."""
        self._fail(now, 1)

    # -- the rules ----------------------------------------------------------------------

    def _fail(self, now: float, failures: int) -> None:
        """Jobs that could not join: hold submissions back, longer at each failure."""
        backoff = self._backoff
        backoff.failures += failures
        delay = self.settings.retry_delay * 2 ** min(backoff.failures - 1, 30)
        backoff.until = now + min(delay, MAX_RETRY_DELAY)

    def _stuck(self, obs: Observation) -> tuple[str, ...]:
        """Jobs running for start_timeout with no worker at the broker."""
        limit = self.settings.start_timeout
        return tuple(
            job.id
            for job in obs.jobs
            if job.state is JobState.STARTING
            and job.started is not None
            and obs.now - job.started >= limit
        )

    def _grow(self, obs: Observation) -> Decision:
        s = self.settings
        # Every job counts against max_jobs until it is gone, draining or cancelled.
        room = s.max_jobs - len(obs.jobs)
        if room <= 0 or obs.now < self._backoff.until:
            return Decision()
        serving = [job for job in obs.jobs if job.state is not JobState.DRAINING]
        if len(serving) < s.min_jobs:
            return Decision(min(room, s.min_jobs - len(serving)), reason="below --min")
        if not obs.waiting:
            return Decision()
        coming = sum(job.state in (JobState.PENDING, JobState.STARTING) for job in serving)
        capacity = obs.workers + coming * s.slots_per_job
        wanted = self._slots_wanted(obs)
        if wanted <= capacity:
            return Decision()
        jobs = min(room, math.ceil((wanted - capacity) / s.slots_per_job))
        return Decision(
            jobs,
            reason=f"{obs.waiting} tasks waiting would wait over {s.target_wait:g}s on "
            f"{capacity} processes (present and on the way); {wanted} wanted",
        )

    def _slots_wanted(self, obs: Observation) -> int:
        """Worker processes that would start every waiting task within target_wait."""
        target = self.settings.target_wait
        seconds = self.clock.mean()
        if seconds is None or seconds >= target:
            # A task outlasts the target (or its length is unknown): tasks running now
            # free no process in time, so each waiting task needs one of its own.
            return obs.busy + obs.waiting
        return min(obs.busy + obs.waiting, math.ceil(obs.waiting * seconds / target))

    def _shrink(self, obs: Observation, stuck: tuple[str, ...]) -> Decision:
        s, window = self.settings, self._window
        assert window is not None
        quiet = window.quiet_since(obs.now)
        if quiet < s.idle_time:
            return Decision()
        ours = [job for job in obs.jobs if job.state is not JobState.DRAINING]
        ours = [job for job in ours if job.id not in stuck]
        others = obs.workers - sum(job.workers for job in ours)
        peak = window.peak_busy()
        needed = max(0, peak - max(0, others))
        keep = max(s.min_jobs, math.ceil(needed / s.slots_per_job))
        surplus = len(ours) - keep
        if surplus <= 0:
            return Decision()
        cancel, drain = _surplus(ours, surplus, obs.now, s.min_age)
        if not cancel and not drain:
            return Decision()
        return Decision(
            cancel=cancel,
            drain=drain,
            reason=f"for {quiet:.0f}s no task waited and at most {peak} processes were "
            f"busy; {keep} jobs are enough",
        )


def _surplus(
    jobs: list[Job], count: int, now: float, min_age: float
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Up to ``count`` jobs to give back, cheapest first: pending ones (newest first) are
    cancelled; starting ones, then running ones that hold no task and are old enough
    (idle longest first), are drained. A starting job is drained, not cancelled: its
    workers may join, and take a task, between the look and the scancel, and a plain
    scancel would make them hand a running task back, to run again elsewhere."""
    pending = sorted((j for j in jobs if j.state is JobState.PENDING), key=lambda j: -j.submitted)
    starting = [j for j in jobs if j.state is JobState.STARTING]
    idle = sorted(
        (
            j
            for j in jobs
            if j.state is JobState.READY
            and j.busy == 0
            and j.idle_since is not None
            and j.started is not None
            and now - j.started >= min_age
        ),
        key=lambda j: (j.idle_since, j.id),
    )
    cancel = [j.id for j in pending][:count]
    drain = [j.id for j in [*starting, *idle]][: count - len(cancel)]
    return tuple(cancel), tuple(drain)
