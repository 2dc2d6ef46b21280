"""The scaling policy (fade/scale/policy.py) and the observer, from queue traces: no
scheduler, no processes, no clock but the traces' own.

Three kinds of trace: hand-written sequences of observations for each rule; a small
simulated cluster (jobs that start after a delay, tasks that take their time) driven by
the policy through minutes of mixed load, to count the jobs it starts and ends; and a
trace recorded by ``fade-scale --trace`` on the real Slurm cluster of
tests/test_scale_slurm.py, replayed through a fresh policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from fade.scale.loop import decision_from_dict, observation_from_dict, to_dict
from fade.scale.observe import LISTING_GRACE, Listed, Observer
from fade.scale.policy import (
    MAX_RETRY_DELAY,
    Decision,
    Job,
    JobState,
    Observation,
    Policy,
    Settings,
    TaskClock,
)

TRACES = Path(__file__).resolve().parent / "traces"

P, S, R, D = JobState.PENDING, JobState.STARTING, JobState.READY, JobState.DRAINING


def job(
    id: str,
    state: JobState = R,
    *,
    at: float = 0.0,
    workers: int = 1,
    busy: int = 0,
    idle_since: float | None = 0.0,
) -> Job:
    running = state is not P
    ready = state is R
    return Job(
        id,
        state,
        submitted=at,
        started=at if running else None,
        workers=workers if ready or state is D else 0,
        busy=busy if ready else 0,
        idle_since=idle_since if ready and not busy else None,
    )


def obs(
    now: float, waiting: int = 0, *jobs: Job, busy: int | None = None, done: int = 0, **kw: int
) -> Observation:
    workers = sum(j.workers for j in jobs if j.state is not D) + kw.pop("others", 0)
    busy = sum(j.busy for j in jobs) if busy is None else busy
    return Observation(now, waiting, workers, busy, done, tuple(jobs), **kw)


def settings(**kw: float) -> Settings:
    base = {"max_jobs": 8, "target_wait": 30.0, "idle_time": 60.0, "min_age": 30.0}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


# -- scaling up -------------------------------------------------------------------------------


def test_from_zero_each_waiting_task_gets_a_process_until_durations_are_known() -> None:
    policy = Policy(settings(max_jobs=4))
    assert policy.decide(obs(0, 500)).submit == 4  # 500 tasks, unknown length: up to --max
    policy = Policy(settings(max_jobs=64, slots_per_job=16))
    assert policy.decide(obs(0, 40)).submit == 3  # 40 tasks: 3 jobs of 16 processes


def test_nothing_waits_nothing_is_asked() -> None:
    policy = Policy(settings())
    assert not policy.decide(obs(0, 0))
    assert not policy.decide(obs(5, 0, job("1", busy=1), busy=1))


def test_pending_and_starting_jobs_count_as_capacity_on_the_way() -> None:
    policy = Policy(settings(max_jobs=10, slots_per_job=4))
    assert policy.decide(obs(0, 10)).submit == 3
    # Next look: three jobs still in the scheduler's queue, one starting: nothing more.
    on_the_way = [job("1", P), job("2", P), job("3", S)]
    assert not policy.decide(obs(5, 10, *on_the_way))
    # More work came meanwhile: only what the jobs on their way do not cover.
    assert policy.decide(obs(10, 18, *on_the_way)).submit == 2


def feed_rate(policy: Policy, start: float, seconds: float, per_second: int, busy: int) -> float:
    """Observations once a second of ``busy`` processes finishing ``per_second`` tasks."""
    done = 0
    t = start
    while t < start + seconds:
        policy.clock.observe(t, done, busy)
        t += 1
        done += per_second
    return t


def test_known_short_tasks_ask_only_for_what_brings_the_wait_under_target() -> None:
    policy = Policy(settings(max_jobs=20))
    ready = [job("a", busy=1), job("b", busy=1)]
    t = feed_rate(policy, 0, 30, per_second=20, busy=2)  # 0.1 s per task
    assert policy.clock.mean() == pytest.approx(0.1)
    # 100 waiting on 2 processes: 5 s, under the target of 30 s.
    assert not policy.decide(obs(t, 100, *ready, done=600))
    # 1000 waiting: 50 s; 4 processes bring it to 25 s: 2 more jobs, not 20.
    decision = policy.decide(obs(t + 1, 1000, *ready, done=620))
    assert decision.submit == 2, decision


def test_tasks_longer_than_the_target_get_a_process_each() -> None:
    policy = Policy(settings(max_jobs=50))
    t = feed_rate(policy, 0, 60, per_second=1, busy=100)  # 100 s per task
    ready = [job(str(i), busy=1) for i in range(8)]
    decision = policy.decide(obs(t, 5, *ready, busy=8, done=60))
    assert decision.submit == 5


def test_never_more_than_max_jobs_alive_draining_ones_included() -> None:
    policy = Policy(settings(max_jobs=3))
    alive: list[Job] = []
    for t in range(0, 100, 5):
        decision = policy.decide(obs(t, 10_000, *alive))
        alive += [job(f"{t}-{i}", P, at=t) for i in range(decision.submit)]
        assert len(alive) <= 3
    assert len(alive) == 3
    # Two of them leaving still count: no replacement until they are gone.
    leaving = [replace(alive[0], state=D), replace(alive[1], state=D), alive[2]]
    assert not policy.decide(obs(200, 10_000, *leaving))
    assert policy.decide(obs(205, 10_000, alive[2])).submit == 2


def test_min_jobs_are_kept_even_without_work() -> None:
    policy = Policy(settings(min_jobs=2, max_jobs=4))
    assert policy.decide(obs(0, 0)).submit == 2
    two = [job("1", at=0), job("2", at=0)]
    for t in range(5, 1000, 5):
        assert not policy.decide(obs(t, 0, *two))


# -- scaling down, and the anti-churn rules ---------------------------------------------------


def test_idle_jobs_are_drained_after_the_idle_time_and_not_before() -> None:
    policy = Policy(settings(idle_time=60, min_age=30))
    jobs = [job("1"), job("2")]
    for t in range(0, 60, 5):
        assert not policy.decide(obs(t, 0, *jobs)), t
    decision = policy.decide(obs(60, 0, *jobs))
    assert decision.drain == ("1", "2") and not decision.cancel and not decision.submit


def test_nothing_is_given_back_while_work_waits() -> None:
    """Idle jobs while tasks wait (say, for resources those workers lack): kept."""
    policy = Policy(settings(idle_time=10, max_jobs=2))
    jobs = [job("1"), job("2")]
    for t in range(0, 300, 5):
        assert not policy.decide(obs(t, 3, *jobs)).drain


def test_a_burst_ending_soon_after_a_submission_does_not_cancel_at_once() -> None:
    """Jobs submitted for a burst stay pending for a full idle time after the burst is
    served: work that comes back meanwhile finds them on the way (no submit/cancel loop)."""
    policy = Policy(settings(idle_time=60, max_jobs=2))
    assert policy.decide(obs(0, 100)).submit == 2
    pending = [job("1", P), job("2", P)]
    for t in range(5, 60, 5):
        assert not policy.decide(obs(t, 0, *pending)), t
    decision = policy.decide(obs(60, 0, *pending))
    assert decision.cancel == ("1", "2") and not decision.drain


def test_young_jobs_are_not_drained() -> None:
    policy = Policy(settings(idle_time=10, min_age=100))
    young = job("1", at=50)
    for t in range(50, 150, 5):
        assert not policy.decide(obs(t, 0, young)), t
    assert policy.decide(obs(150, 0, young)).drain == ("1",)


def test_a_job_holding_a_task_is_not_drained() -> None:
    policy = Policy(settings(idle_time=10, min_age=0))
    busy, idle = job("busy", busy=1), job("idle")
    for t in range(0, 10, 2):
        policy.decide(obs(t, 0, busy, idle))
    decision = policy.decide(obs(10, 0, busy, idle))
    assert decision.drain == ("idle",)


def test_capacity_spread_thin_is_given_back_to_the_window_peak() -> None:
    """Four one-process jobs, at most one busy at any look for the whole window (the broker
    spreads tasks, so no single job stays idle): three jobs are surplus."""
    policy = Policy(settings(idle_time=60, min_age=0))
    t = 0
    for t in range(0, 60, 5):
        k = (t // 5) % 4  # a different job busy each time
        jobs = [job(str(i), busy=int(i == k), idle_since=None if i == k else t) for i in range(4)]
        assert not policy.decide(obs(t, 0, *jobs))
    jobs = [job(str(i), busy=int(i == 0), idle_since=None if i == 0 else 50) for i in range(4)]
    decision = policy.decide(obs(60, 0, *jobs))
    assert sorted(decision.drain) == ["1", "2", "3"]


def test_workers_not_ours_cover_the_peak_first() -> None:
    policy = Policy(settings(idle_time=20, min_age=0))
    mine = [job("1"), job("2")]
    for t in range(0, 20, 5):
        policy.decide(obs(t, 0, *mine, busy=3, others=4))
    assert sorted(policy.decide(obs(20, 0, *mine, busy=3, others=4)).drain) == ["1", "2"]


def test_one_change_of_size_per_idle_time() -> None:
    """After a scale-down, the next one waits a full idle time (gradual, never a cascade)."""
    policy = Policy(settings(idle_time=30, min_age=0))
    jobs = [job(str(i)) for i in range(4)]
    for t in range(0, 30, 5):
        policy.decide(obs(t, 0, *jobs, busy=2))
    first = policy.decide(obs(30, 0, *jobs, busy=2))
    assert len(first.drain) == 2
    rest = [j for j in jobs if j.id not in first.drain]
    for t in range(35, 65, 5):  # the window [30, 60] still holds the look with 2 busy
        assert not policy.decide(obs(t, 0, *rest))
    assert len(policy.decide(obs(65, 0, *rest)).drain) == 2


# -- jobs that never join ----------------------------------------------------------------------


def test_jobs_that_never_join_hold_submissions_back_doubling() -> None:
    policy = Policy(settings(retry_delay=10, max_jobs=4))
    assert policy.decide(obs(0, 50)).submit == 4
    # They ended without a worker joining (a wrong address, a missing key).
    assert not policy.decide(obs(5, 50, failed=4))
    assert not policy.decide(obs(5 + 10 * 8 - 1, 50))  # 4 failures: 10 s * 2**3
    assert policy.decide(obs(5 + 10 * 8, 50)).submit == 4
    assert not policy.decide(obs(90, 50, failed=1))
    assert not policy.decide(obs(90 + 160 - 1, 50))  # the fifth: 10 s * 2**4
    assert policy.decide(obs(90 + 160, 50)).submit == 4
    assert not policy.decide(obs(300, 50, failed=10))
    assert not policy.decide(obs(300 + MAX_RETRY_DELAY - 1, 50))  # never longer than this
    assert policy.decide(obs(300 + MAX_RETRY_DELAY, 50)).submit == 4
    # A job that joins resets the count.
    ready = [job("a", busy=1)]
    policy.decide(obs(1000, 50, *ready, busy=1))
    assert not policy.decide(obs(1001, 50, *ready, busy=1, failed=1))
    assert policy.decide(obs(1001 + 10, 50, *ready, busy=1)).submit == 3


def test_a_job_running_without_workers_past_the_start_timeout_is_cancelled() -> None:
    policy = Policy(settings(start_timeout=100, retry_delay=50, max_jobs=2))
    stuck = job("1", S, at=0)
    assert not policy.decide(obs(99, 5, stuck)).cancel
    decision = policy.decide(obs(100, 5, stuck))
    assert decision.cancel == ("1",) and decision.submit == 0
    assert "without any worker" in decision.reason
    assert not policy.decide(obs(120, 5))  # backing off
    assert policy.decide(obs(150, 5)).submit == 2


def test_task_clock_follows_littles_law_and_a_broker_restart() -> None:
    clock = TaskClock(window=60)
    assert clock.mean() is None
    for t in range(0, 120):
        clock.observe(t, t * 4, 8)  # 8 busy, 4 done per second: 2 s per task
    assert clock.mean() == pytest.approx(2.0)
    clock.observe(121, 3, 8)  # the counter started again: the tasks are the same
    assert clock.mean() == pytest.approx(2.0)


def test_task_clock_remembers_between_bursts_and_learns_of_longer_tasks() -> None:
    clock = TaskClock(window=60)
    for t in range(0, 31):
        clock.observe(t, t * 10, 2 if t < 30 else 0)  # 0.2 s per task, then nothing
    assert clock.mean() == pytest.approx(0.2, rel=0.05)
    for t in range(31, 500):
        clock.observe(t, 300, 0)  # an idle pool, scaled to zero: still 0.2 s
        assert clock.mean() == pytest.approx(0.2, rel=0.25), t  # as the window leaves it
    # New work of long tasks: busy for 100 s with nothing finished, so at least 100 s.
    for t in range(500, 601):
        clock.observe(t, 300, 4)
    assert clock.mean() == pytest.approx(100.0)
    clock.observe(601, 301, 4)  # one finished, after 100 s at least
    assert clock.mean() == pytest.approx(100.0)


def test_a_pool_at_zero_remembers_how_long_tasks_take() -> None:
    """After a pause longer than the clock's window, a new burst of the same short tasks
    asks for what they need, not a process each."""
    policy = Policy(settings(max_jobs=20, target_wait=30))
    t = feed_rate(policy, 0, 30, per_second=20, busy=2)  # 0.1 s per task
    for u in range(int(t), int(t) + 300, 5):
        policy.clock.observe(u, 600, 0)
    assert policy.decide(obs(t + 300, 500, done=600)).submit == 2  # 500 * 0.1 / 30


# -- a simulated cluster: minutes of mixed load, counting the jobs started and ended -------------


@dataclass
class SimJob:
    id: str
    submitted: float
    start_at: float
    slots: int
    running: list[float] = field(default_factory=list)  # end times of its tasks
    done: int = 0
    idle_since: float = 0.0
    draining: bool = False
    started: float | None = None


@dataclass
class Cluster:
    """Jobs start ``delay`` seconds after submission; tasks go to free processes, oldest
    job first (fade spreads them across idle workers, the worst case for scale-down is
    covered by test_capacity_spread_thin_...); a drained job ends when its tasks end."""

    settings: Settings
    delay: float = 10.0
    jobs: dict[str, SimJob] = field(default_factory=dict)
    queue: list[float] = field(default_factory=list)  # durations of waiting tasks
    done: int = 0
    submitted: int = 0
    ended: list[tuple[float, str, float]] = field(default_factory=list)  # (t, id, age)
    changes: list[tuple[float, str]] = field(default_factory=list)  # (t, "up" | "down")
    last_busy: float = 0.0  # the last time a task waited or ran
    last_waiting: float = 0.0  # the last time a task waited
    policy: Policy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = Policy(self.settings)

    def tick(self, t: float) -> None:
        for j in list(self.jobs.values()):
            finished = [end for end in j.running if end <= t]
            j.running = [end for end in j.running if end > t]
            j.done += len(finished)
            self.done += len(finished)
            if j.started is None and t >= j.start_at:
                j.started, j.idle_since = t, t
            if j.draining and not j.running:
                del self.jobs[j.id]
                self.ended.append((t, j.id, t - (j.started or t)))
        for j in self.jobs.values():
            while (
                j.started is not None and not j.draining and self.queue and len(j.running) < j.slots
            ):
                j.running.append(t + self.queue.pop(0))
            if j.running:
                j.idle_since = t
        observation = self.observe(t)
        if observation.waiting or observation.busy:
            self.last_busy = t
        if observation.waiting:
            self.last_waiting = t
        self.apply(t, self.policy.decide(observation))

    def observe(self, t: float) -> Observation:
        jobs = []
        for j in self.jobs.values():
            if j.draining:
                state = D
            elif j.started is None:
                state = P
            else:
                state = R
            busy = len(j.running) if state is R else 0
            jobs.append(
                Job(j.id, state, j.submitted, j.started, j.slots if state is R else 0, busy,
                    j.idle_since if state is R and not busy else None)
            )  # fmt: skip
        workers = sum(x.workers for x in jobs)
        busy = sum(x.busy for x in jobs)
        return Observation(t, len(self.queue), workers, busy, self.done, tuple(jobs))

    def apply(self, t: float, decision: Decision) -> None:
        if decision.cancel or decision.drain:
            self.changes.append((t, "down"))
        if decision.submit:
            self.changes.append((t, "up"))
        for job_id in decision.cancel:
            j = self.jobs.pop(job_id)
            self.ended.append((t, job_id, 0.0))
            assert j.started is None
        for job_id in decision.drain:
            j = self.jobs[job_id]
            assert not j.running, "drained a job that held a task"
            assert t - j.idle_since >= 0
            j.draining = True
        for _ in range(decision.submit):
            self.submitted += 1
            name = f"j{self.submitted}"
            self.jobs[name] = SimJob(name, t, t + self.delay, self.settings.slots_per_job)
        assert len(self.jobs) <= self.settings.max_jobs


def run(cluster: Cluster, load: Iterator[tuple[float, list[float]]], until: float) -> None:
    """Drive ``cluster`` once a second from 0 to ``until``, then until no work is left;
    ``load`` yields (time, task durations) arrivals."""
    run_from(cluster, list(load), 0.0, until)


def mixed_load(
    seed: int, seconds: float, gap: float, tasks: tuple[int, int]
) -> Iterator[tuple[float, list[float]]]:
    """Bursts of short and long tasks (their number drawn from ``tasks``), with pauses of
    up to ``gap`` seconds between them."""
    import random

    rng = random.Random(seed)
    t = 0.0
    while t < seconds:
        yield t, [rng.choice([0.2, 0.5, 2.0, 8.0]) for _ in range(rng.randint(*tasks))]
        t += rng.uniform(1.0, gap)


def drain_out(cluster: Cluster, start: float, until: float) -> float:
    t = start
    while cluster.jobs and t < until:
        cluster.tick(t)
        t += 1
    return t


@pytest.mark.parametrize("seed", range(5))
def test_mixed_load_with_short_pauses_keeps_the_pool(seed: int) -> None:
    """Five minutes of bursts that each fill the pool, pauses shorter than the idle time:
    the pool grows once to --max and no job ends or is cancelled while the load lasts;
    afterwards every job goes, once, after the idle time."""
    s = settings(max_jobs=6, slots_per_job=2, target_wait=10, idle_time=40, min_age=20)
    cluster = Cluster(s)
    run(cluster, mixed_load(seed, 300, gap=30, tasks=(24, 60)), until=300)
    assert cluster.ended == [] and cluster.submitted == s.max_jobs
    drain_out(cluster, 301, 1000)
    assert not cluster.jobs
    assert cluster.submitted == s.max_jobs and len(cluster.ended) == s.max_jobs
    # Given back once the load was over: capacity beyond the last minute's peak an idle
    # time after the last waiting task, the rest an idle time after that.
    ends = sorted({end for end, _, _ in cluster.ended})
    assert 1 <= len(ends) <= 2, cluster.ended
    assert ends[0] >= cluster.last_waiting + s.idle_time
    assert ends[-1] <= cluster.last_busy + 2 * s.idle_time + 2


@pytest.mark.parametrize("seed", range(10))
def test_random_mixed_load_never_starts_and_ends_jobs_in_a_loop(seed: int) -> None:
    """Bursts of any size (some fill the pool, some do not) and pauses of any length: the
    pool follows the load, and the anti-churn rules hold at every step: no job is ended
    younger than min_age or while it holds a task (Cluster.apply checks), scale-downs are
    an idle time apart and an idle time after any growth, and the jobs started stay
    within what those rules allow."""
    s = settings(max_jobs=6, slots_per_job=2, target_wait=10, idle_time=40, min_age=20)
    cluster = Cluster(s)
    run(cluster, mixed_load(seed, 300, gap=90, tasks=(2, 60)), until=300)
    drain_out(cluster, 301, 1000)
    assert not cluster.jobs
    for _, _, age in cluster.ended:
        assert age == 0.0 or age >= s.min_age
    changes = cluster.changes
    downs = [t for t, kind in changes if kind == "down"]
    for t in downs:
        before = [u for u, _ in changes if u < t]
        assert not before or t - max(before) >= s.idle_time, changes
    # Each scale-down follows idle_time seconds without one: at most (run time / idle
    # time) of them, so at most that many refills of the pool.
    assert cluster.submitted <= s.max_jobs * (1 + len(downs))
    assert len(downs) <= 1 + 340 // s.idle_time


def test_load_with_long_pauses_follows_it() -> None:
    """Pauses longer than the idle time: jobs go in each pause and come back with the work,
    once per pause."""
    s = settings(max_jobs=4, slots_per_job=1, target_wait=10, idle_time=30, min_age=20)
    cluster = Cluster(s, delay=5)
    arrivals = [(burst * 90.0, [2.0] * 40) for burst in range(5)]  # 4 pauses of ~60 s
    run(cluster, iter(arrivals), until=500)
    assert not cluster.jobs
    assert cluster.submitted == 4 * 5 and len(cluster.ended) == 4 * 5
    assert [kind for _, kind in cluster.changes] == ["up", "down"] * 5


def test_constant_load_converges_and_stays() -> None:
    """Three 1-second tasks a second: about three processes busy. The pool settles and
    then neither grows nor shrinks."""
    s = settings(max_jobs=20, slots_per_job=1, target_wait=20, idle_time=30, min_age=10)
    cluster = Cluster(s, delay=5)
    load = [(float(t), [1.0] * 3) for t in range(0, 600)]
    run(cluster, iter(load[:300]), until=299)
    settled = (cluster.submitted, len(cluster.ended))
    assert 3 <= len(cluster.jobs) <= 8
    run_from(cluster, load[300:], 300, 600)
    assert (cluster.submitted, len(cluster.ended)) == settled


def run_from(
    cluster: Cluster, arrivals: list[tuple[float, list[float]]], start: float, until: float
) -> None:
    t = start
    while t <= until:
        while arrivals and arrivals[0][0] <= t:
            cluster.queue += arrivals.pop(0)[1]
        cluster.tick(t)
        t += 1.0


# -- the observer -------------------------------------------------------------------------------


def state(
    *workers: dict[str, object], queued: int = 0, backlog: int = 0, done: int = 0
) -> dict[str, object]:
    return {"queued": queued, "backlog": backlog, "tasks_done": done, "workers": list(workers)}


def worker(label: str, st: str = "idle", done: int = 0) -> dict[str, object]:
    return {"label": label, "state": st, "done": done}


def test_the_observer_knows_jobs_by_their_workers_labels() -> None:
    o = Observer("slurm:")
    o.submitted(["7", "8_0", "8_1"], 0)
    first = o.observe(1, state(queued=3, backlog=5), [Listed("7", False), Listed("8_0", True)])
    assert first.waiting == 8
    assert {j.id: j.state for j in first.jobs} == {"7": P, "8_0": S, "8_1": P}
    second = o.observe(
        2,
        state(worker("slurm:8_0", "busy"), worker("slurm:8_0"), worker("other"), worker("slurm:9")),
        [Listed("7", True), Listed("8_0", True), Listed("8_1", True)],
    )
    jobs = {j.id: j for j in second.jobs}
    assert jobs["8_0"].state is R and jobs["8_0"].workers == 2 and jobs["8_0"].busy == 1
    assert jobs["7"].state is S and jobs["8_1"].state is S
    assert second.workers == 4 and second.busy == 1  # every worker at the broker counts


def test_the_observer_sees_activity_between_two_looks() -> None:
    o = Observer("slurm:")
    listed = [Listed("1", True)]
    assert o.observe(0, state(worker("slurm:1")), listed).jobs[0].idle_since == 0
    assert o.observe(5, state(worker("slurm:1")), listed).jobs[0].idle_since == 0
    # A task ran and finished between the looks: the job was not idle all along.
    assert o.observe(10, state(worker("slurm:1", done=1)), listed).jobs[0].idle_since == 10
    assert o.observe(15, state(worker("slurm:1", "busy", 1)), listed).jobs[0].idle_since is None


def test_the_observer_counts_jobs_that_vanish_before_joining() -> None:
    o = Observer("slurm:")
    o.submitted(["1", "2", "3"], 0)
    o.observe(1, state(), [Listed("1", True), Listed("2", True), Listed("3", True)])
    o.observe(
        2, state(worker("slurm:3")), [Listed("1", True), Listed("2", True), Listed("3", True)]
    )
    o.ending(["2"])  # we cancelled this one
    gone = o.observe(3, state(), [])
    assert gone.failed == 1  # 1 never joined and we did not end it; 3 had joined
    # A submission the listing does not show yet is pending, then gone after the grace.
    o.submitted(["4"], 10)
    assert [j.state for j in o.observe(11, state(), []).jobs] == [P]
    assert o.observe(10 + LISTING_GRACE, state(), []).failed == 1
    # With a scheduler whose list never lags (Slurm's), missing at the next look is gone.
    slurm = Observer("slurm:", listing_grace=0.0)
    slurm.submitted(["5"], 20)
    assert slurm.observe(20.5, state(), []).failed == 1


def test_jobs_we_ended_are_draining_until_gone() -> None:
    o = Observer("slurm:")
    o.observe(0, state(worker("slurm:1")), [Listed("1", True)])
    o.ending(["1"])
    (j,) = o.observe(1, state(worker("slurm:1")), [Listed("1", True)]).jobs
    assert j.state is D and j.workers == 1  # still serving: the scaler asks again later
    (j,) = o.observe(2, state(worker("slurm:1", "draining")), [Listed("1", True)]).jobs
    assert j.state is D and j.workers == 0


# -- a trace recorded on the real cluster ---------------------------------------------------------


def recorded(name: str) -> list[tuple[Observation, Decision] | float]:
    """A trace's looks and decisions, and the times at which a submission failed."""
    path = TRACES / name
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        (observation_from_dict(r["obs"]), decision_from_dict(r["decision"]))
        if "obs" in r
        else float(r["submission_failed"])
        for r in rows
        if "obs" in r or "submission_failed" in r
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in TRACES.glob("*.jsonl")))
def test_a_recorded_trace_replays_to_the_same_decisions(name: str) -> None:
    """``fade-scale --trace`` on the real Slurm cluster (tests/test_scale_slurm.py): a fresh
    policy with the run's settings, fed what the scaler saw, decides as it did."""
    header = json.loads((TRACES / name).read_text().splitlines()[0])
    s = Settings(**header["settings"])
    policy = Policy(s)
    trace = recorded(name)
    assert len(trace) > 10
    submitted = 0
    for entry in trace:
        if isinstance(entry, float):
            policy.submission_failed(entry)
            continue
        observation, decision = entry
        again = policy.decide(observation)
        assert to_dict(again) == to_dict(decision), observation
        submitted += decision.submit
    assert 1 <= submitted <= s.max_jobs * 2


# -- the loop, with a provider that only records -----------------------------------------------


class FakeProvider:
    label_prefix = "slurm:"
    listing_grace = 0.0

    def __init__(self) -> None:
        self.listed: list[Listed] = []
        self.calls: list[tuple[str, object]] = []
        self.refuse = False
        self.next_id = 0

    def jobs(self) -> list[Listed]:
        return list(self.listed)

    def submit(self, count: int) -> list[str]:
        self.calls.append(("submit", count))
        if self.refuse:
            from fade.scale.slurm import SlurmError

            raise SlurmError("sbatch: error: invalid partition specified: nope")
        ids = [str(self.next_id + i) for i in range(count)]
        self.next_id += count
        self.listed += [Listed(i, False) for i in ids]
        return ids

    def cancel(self, ids: object) -> None:
        self.calls.append(("cancel", ids))

    def drain(self, ids: object) -> None:
        self.calls.append(("drain", ids))


def test_the_loop_backs_off_when_the_scheduler_refuses_a_submission(tmp_path: Path) -> None:
    from fade.scale.loop import Scaler

    now = [0.0]
    provider = FakeProvider()
    provider.refuse = True
    states = {"queued": 0, "backlog": 50, "tasks_done": 0, "workers": []}
    with (tmp_path / "trace").open("w") as trace:
        scaler = Scaler(
            lambda: states,
            provider,
            Policy(settings(retry_delay=10, max_jobs=2)),
            trace=trace,
            clock=lambda: now[0],
        )
        for t in range(0, 31):
            now[0] = float(t)
            scaler.step()
    # Refused at 0, held back 10 s; refused at 10, held back 20 s; tried again at 30:
    # three tries in 31 looks.
    assert [c for c in provider.calls if c[0] == "submit"] == [("submit", 2)] * 3
    assert scaler.submitted == 0
    lines = (tmp_path / "trace").read_text().splitlines()
    assert sum('"submission_failed"' in line for line in lines) == 3


def test_a_round_without_the_broker_changes_nothing() -> None:
    from fade.errors import BrokerUnreachableError
    from fade.scale.loop import Scaler

    def unreachable() -> dict[str, object]:
        raise BrokerUnreachableError("no answer")

    provider = FakeProvider()
    scaler = Scaler(unreachable, provider, Policy(settings()), clock=lambda: 0.0)
    assert scaler.step() is None and provider.calls == []


def test_starting_jobs_are_drained_not_cancelled() -> None:
    """A job running without workers yet may get one, and a task, any moment: a plain
    scancel would make it hand a running task back; the drain lets it finish."""
    policy = Policy(settings(idle_time=10, max_jobs=3, min_age=0, start_timeout=1000))
    jobs = [job("p", P, at=0), job("s", S, at=0), job("r", at=0)]
    for t in range(0, 10, 2):
        policy.decide(obs(t, 0, *jobs))
    decision = policy.decide(obs(10, 0, *jobs))
    assert decision.cancel == ("p",) and decision.drain == ("s", "r")


def test_the_loop_asks_again_a_job_that_missed_its_drain() -> None:
    from fade.scale.loop import DRAIN_RESEND, Scaler

    now = [0.0]
    provider = FakeProvider()
    provider.listed = [Listed("7", True)]
    serving = {"queued": 0, "tasks_done": 0, "workers": [{"label": "slurm:7", "state": "idle"}]}
    scaler = Scaler(
        lambda: serving,
        provider,
        Policy(settings(idle_time=5, min_age=0)),
        clock=lambda: now[0],
    )
    for t in range(0, 6):
        now[0] = float(t)
        scaler.step()
    assert provider.calls == [("drain", ("7",))]
    # Its workers still serve: the signal came before the job's script set its trap.
    for t in range(6, 6 + int(DRAIN_RESEND) + 1):
        now[0] = float(t)
        scaler.step()
    assert provider.calls == [("drain", ("7",)), ("drain", ["7"])]
