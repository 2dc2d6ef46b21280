"""Sharing one pool, at the scheduler (no sockets, no processes): fair share by time,
weights, priorities, resources, termination and quotas.

The pool is simulated on a fake clock: workers take what the scheduler sends them, each
task "runs" for the duration its client's tasks take, and completions are fed back in
time order, as DONE would be.
"""

from __future__ import annotations

import heapq
import itertools
import json

import pytest
from test_scheduler import client_hello, records, worker_hello

from fade import protocol as p
from fade.scheduler import Scheduler

pytestmark = pytest.mark.timeout(20)


class Simulation:
    """Workers with one credit each, running what they are sent for a given duration."""

    def __init__(self, sched: Scheduler, workers: int, **hello: object) -> None:
        self.sched = sched
        self.now = 0.0
        sched.clock = lambda: self.now
        self.events: list[tuple[float, int, bytes, bytes]] = []  # end, seq, worker, key
        self.seq = itertools.count()
        self.durations: dict[bytes, float] = {}  # client -> task length
        self.used: dict[bytes, list[tuple[float, float]]] = {}  # client -> runs (start, end)
        self.started: list[tuple[bytes, int]] = []  # (client, task id) in start order
        for n in range(workers):
            sched.add_worker(b"W%d" % n, worker_hello(credits=1, **hello), None)  # type: ignore[arg-type]

    def collect(self) -> None:
        """Start what the scheduler sent."""
        for worker, tasks in self.sched.take_sends().tasks.items():
            for task in tasks:
                client = task.client.identity
                end = self.now + self.durations[client]
                heapq.heappush(self.events, (end, next(self.seq), worker, task.key))
                self.used.setdefault(client, []).append((self.now, end))
                self.started.append((client, task.task_id))

    def run_until(self, until: float) -> None:
        self.collect()
        while self.events and self.events[0][0] <= until:
            end, _, worker, key = heapq.heappop(self.events)
            self.now = end
            done = [(p.DoneRecord(key, p.Status.OK), p.Payload(b""))]
            self.sched.done(worker, done)
            self.sched.grant(worker, 1)
            self.collect()
        self.now = max(self.now, until)

    def share(self, client: bytes, start: float, end: float) -> float:
        """Worker-seconds the client used in [start, end]."""
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.used.get(client, []))


def test_fair_share_is_by_time_not_by_task_count() -> None:
    """The issue's case: 2,000 tasks of 120 ms, then 600 of 30 ms a second later, on 4
    workers: over the overlap, each client gets half the worker-seconds."""
    sched = Scheduler()
    sim = Simulation(sched, 4)
    sched.add_client(b"A", client_hello(), None)
    sched.add_client(b"B", client_hello(), None)
    sim.durations.update({b"A": 0.12, b"B": 0.03})
    sched.submit(b"A", records(*range(1, 2001)))
    sim.run_until(1.0)
    sched.submit(b"B", records(*range(1, 601)))
    sim.run_until(30.0)
    b_end = max(e for _, e in sim.used[b"B"])
    a, b = sim.share(b"A", 1.0, b_end), sim.share(b"B", 1.0, b_end)
    assert 0.4 <= b / (a + b) <= 0.6, f"B got {b / (a + b):.0%} of the worker-seconds"
    # B got its share within about one task duration of arriving.
    first_b = min(s for s, _ in sim.used[b"B"])
    assert first_b - 1.0 <= 0.12 + 1e-9


def test_weights_divide_the_pool() -> None:
    sched = Scheduler(weights={"heavy": 2.0})
    sim = Simulation(sched, 4)
    for name, key in ((b"H", "heavy"), (b"L1", "light1"), (b"L2", "light2")):
        sched.add_client(name, client_hello(), key)
        sim.durations[name] = 0.05
        sched.submit(name, records(*range(1, 3001)))
    sim.run_until(20.0)
    used = {c: sim.share(c, 0.0, 20.0) for c in (b"H", b"L1", b"L2")}
    total = sum(used.values())
    assert abs(used[b"H"] / total - 0.5) <= 0.1, used
    assert abs(used[b"L1"] / total - 0.25) <= 0.1 and abs(used[b"L2"] / total - 0.25) <= 0.1


def test_a_client_arriving_late_starts_at_the_floor_not_at_zero() -> None:
    """Fair from now on: a late client gets half, not everything until it catches up."""
    sched = Scheduler()
    sim = Simulation(sched, 2)
    sched.add_client(b"A", client_hello(), None)
    sim.durations.update({b"A": 0.1, b"B": 0.1})
    sched.submit(b"A", records(*range(1, 1001)))
    sim.run_until(10.0)  # A has used 20 worker-seconds
    sched.add_client(b"B", client_hello(), None)
    sched.submit(b"B", records(*range(1, 1001)))
    sim.run_until(14.0)
    a, b = sim.share(b"A", 10.0, 14.0), sim.share(b"B", 10.0, 14.0)
    assert 0.4 <= b / (a + b) <= 0.6


def test_a_later_high_priority_task_runs_before_earlier_low_ones() -> None:
    sched = Scheduler()
    sim = Simulation(sched, 2)
    sched.add_client(b"C", client_hello(), None)
    sim.durations[b"C"] = 1.0
    sched.submit(b"C", records(*range(1, 11)))  # priority 0; two start at once
    sim.run_until(0.5)
    urgent = [(p.SubmitRecord(99, 0, 0.0, priority=5), p.Payload(b"u"))]
    sched.submit(b"C", urgent)
    sim.run_until(20.0)
    order = [task_id for _, task_id in sim.started]
    assert order[:3] == [1, 2, 99], order


# -- resources --------------------------------------------------------------------------


def gpu_task(task_id: int, gpus: int = 1) -> tuple[p.SubmitRecord, p.Payload]:
    spec = p.encode_resources({"gpu": gpus})
    return p.SubmitRecord(task_id, 0, 0.0, resources=spec), p.Payload(b"g")


def test_tasks_asking_for_a_gpu_go_where_one_is_free_with_its_index() -> None:
    sched = Scheduler()
    hello = worker_hello(credits=2)
    gpu_hello = p.WorkerHello(**{**_fields(hello), "resources": {"gpu": 1.0}, "pool": "h1"})
    sched.add_worker(b"GPU", gpu_hello, None)
    sched.add_worker(b"CPU", worker_hello(credits=2), None)
    sched.add_client(b"C", client_hello(), None)
    sched.submit(b"C", [gpu_task(1), gpu_task(2)])
    sends = sched.take_sends()
    (task,) = sends.tasks[b"GPU"]
    assert task.task_id == 1 and json.loads(task.devices) == {"gpu": [0]}
    assert b"CPU" not in sends.tasks  # the second waits for the only GPU
    sched.submit(b"C", records(3, 4, 5))  # plain tasks use both (as credits allow)
    assert {w: len(t) for w, t in sched.take_sends().tasks.items()} == {b"CPU": 2, b"GPU": 1}
    key = p.task_key(sched.clients[b"C"].hello.tag, 1)
    sched.done(b"GPU", [(p.DoneRecord(key, p.Status.OK), p.Payload(b""))])
    sched.grant(b"GPU", 1)
    (task,) = sched.take_sends().tasks[b"GPU"]
    assert task.task_id == 2 and json.loads(task.devices) == {"gpu": [0]}  # given back, lent again


def test_a_request_no_connected_worker_could_meet_gets_a_notice() -> None:
    sched = Scheduler()
    gpu_hello = p.WorkerHello(**{**_fields(worker_hello()), "resources": {"gpu": 1.0}})
    sched.add_worker(b"GPU", gpu_hello, None)
    sched.add_client(b"C", client_hello(), None)
    sched.submit(b"C", [gpu_task(1, gpus=2)])
    sends = sched.take_sends()
    ((message, ids),) = sends.notices[b"C"]
    assert ids == [1] and '{"gpu":2}' in message and not sends.results
    assert sched.clients[b"C"].queued == 1  # it waits, in case such a worker joins


def _fields(hello: p.WorkerHello) -> dict[str, object]:
    return {name: getattr(hello, name) for name in hello.__slots__}  # type: ignore[attr-defined]


# -- terminating, and clients that leave -------------------------------------------------


def test_terminate_fails_queued_tasks_and_stops_running_ones() -> None:
    sched = Scheduler()
    sched.add_worker(b"W", worker_hello(credits=1), None)
    sched.add_client(b"C", client_hello(), None)
    sched.submit(b"C", records(1, 2))
    sched.take_sends()
    sched.terminate(b"C", [1, 2])
    sends = sched.take_sends()
    assert sends.stops == {b"W": [p.task_key(sched.clients[b"C"].hello.tag, 1)]}
    ((record, payload),) = sends.results[b"C"]
    assert record.task_id == 2 and p.decode_refusal(payload)[0] == "terminated"
    assert sched.clients[b"C"].queued == 0


def test_a_client_that_leaves_has_its_running_tasks_stopped() -> None:
    sched = Scheduler()
    sched.add_worker(b"W1", worker_hello(credits=1), None)
    sched.add_worker(b"W2", worker_hello(credits=1), None)
    sched.add_client(b"C", client_hello(), None)
    sched.submit(b"C", records(*range(1, 101)))
    sched.take_sends()
    sched.remove_client(b"C")
    stops = sched.take_sends().stops
    assert sorted(stops) == [b"W1", b"W2"] and all(len(keys) == 1 for keys in stops.values())
    assert not sched.tasks


# -- quotas -------------------------------------------------------------------------------


def test_a_client_over_its_quota_has_the_excess_refused() -> None:
    sched = Scheduler(max_client_tasks=100)
    sched.add_worker(b"W", worker_hello(credits=1), None)
    sched.add_client(b"FLOOD", client_hello(), None)
    sched.add_client(b"OTHER", client_hello(), None)
    sched.submit(b"FLOOD", records(*range(1, 1001)))
    sends = sched.take_sends()
    refused = [r for r, pl in sends.results[b"FLOOD"] if p.decode_refusal(pl)[0] == "quota"]
    assert len(refused) == 900 and len(sched.clients[b"FLOOD"].tasks) == 100
    sched.submit(b"OTHER", records(1))
    key = p.task_key(sched.clients[b"FLOOD"].hello.tag, 1)
    sched.done(b"W", [(p.DoneRecord(key, p.Status.OK), p.Payload(b""))])
    sched.grant(b"W", 1)
    (task,) = sched.take_sends().tasks[b"W"]
    assert task.client.identity == b"OTHER"  # next in line despite the flood
