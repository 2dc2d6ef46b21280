"""The scheduler's records of tasks, clients and workers (fade/scheduler.py decides).

A :class:`Client` keeps its queued tasks in one priority heap per resource request
(higher priority first, then submission order) and a fair-share clock: the
worker-seconds its tasks have used, counting running tasks up to now, divided by
its weight. The scheduler serves the client whose clock is lowest.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from fade import protocol as p
from fade.lifecycle import TaskState
from fade.resources import ResourcePool

__all__ = ["Client", "Counts", "Sends", "Task", "Worker", "WorkerClass"]


@dataclass(frozen=True, slots=True)
class WorkerClass:
    """What decides which tasks a worker can take: its Python, platform and ABI, frame
    limit and clients."""

    python: str
    max_message_size: int  # 0: no limit said
    clients: tuple[str, ...] | None  # key names served; None: all
    platform: tuple[str, str] = ("", "")  # p.platform_of(hello): platform and ABI

    def serves(self, client: Client) -> bool:
        if self.python != client.python:
            return False
        return self.clients is None or client.key_name in self.clients

    def fits(self, task: Task) -> bool:
        if task.native and self.platform != task.client.platform:
            return False  # it needs compiled packages of the client's platform and ABI
        return not self.max_message_size or task.largest <= self.max_message_size


@dataclass(slots=True, eq=False)
class Task:
    key: bytes
    client: Client
    task_id: int
    payload: p.Payload
    timeout: float
    max_attempts: int
    largest: int  # bytes in its largest frame, for the workers' limits
    size: int  # bytes the broker holds for it
    priority: int = 0
    spec: bytes = b""  # its resource request, canonical JSON (the queue it waits in)
    native: bool = False  # needs the client's platform and ABI (p.SUBMIT_NATIVE)
    need: dict[str, float] | None = None
    seq: int = 0  # submission order, within its client
    state: TaskState = TaskState.QUEUED
    worker: Worker | None = None
    losses: int = 0
    started: float | None = None  # when it was assigned (for the fair-share clock)
    devices: bytes = b""  # device indices lent to it
    terminating: bool = False  # its client asked to stop it while it runs
    in_queue: bool = False  # in its client's queue (a finished one is dropped lazily)


@dataclass(slots=True, eq=False)
class Client:
    identity: bytes
    hello: p.ClientHello
    python: str  # p.python_of(hello): what its pickles need
    key_name: str | None = None
    weight: float = 1.0
    platform: tuple[str, str] = ("", "")  # what its compiled packages need
    tasks: dict[bytes, Task] = field(default_factory=dict)  # everything it has here
    queues: dict[bytes, list[tuple[int, int, Task]]] = field(default_factory=dict)
    queued: int = 0
    held_bytes: int = 0
    charged: float = 0.0  # worker-seconds of runs that ended
    running: int = 0  # tasks assigned now
    start_sum: float = 0.0  # the sum of their start times
    next_seq: int = 0
    backlog: int = 0  # tasks it holds back for want of room here, as it last said
    #: Workers that declined its tasks (their host cannot keep its code: a full cache
    #: disk), each until when it gets none of them; and the last one's error, for its
    #: tasks that no other worker can take (fade/scheduler.py, Scheduler.decline).
    declined: dict[bytes, float] = field(default_factory=dict)
    decline: p.Payload | None = None

    def usage(self, now: float) -> float:
        """Worker-seconds used, running tasks counted up to ``now``: O(1)."""
        return self.charged + self.running * now - self.start_sum

    def clock(self, now: float) -> tuple[float, float]:
        """Its place in the fair-share order: usage per weight, then running per weight."""
        return self.usage(now) / self.weight, self.running / self.weight

    def push(self, task: Task) -> None:
        heapq.heappush(self.queues.setdefault(task.spec, []), (-task.priority, task.seq, task))
        task.in_queue = True
        self.queued += 1

    def unqueue(self, task: Task) -> None:
        """Count a queued task out (it finished while queued); its heap entry is dropped
        when it reaches the head."""
        if task.in_queue:
            task.in_queue = False
            self.queued -= 1

    def heads(self) -> list[Task]:
        """The first live task of each queue, best first (dead entries are dropped)."""
        heads = []
        for heap in self.queues.values():
            while heap and not heap[0][2].in_queue:
                heapq.heappop(heap)  # finished since it was queued
            if heap:
                heads.append(heap[0][2])
        if len(heads) > 1:
            heads.sort(key=lambda t: (-t.priority, t.seq))
        return heads

    def pop(self, task: Task) -> None:
        """Take ``task``, the head of its queue, off it."""
        heapq.heappop(self.queues[task.spec])
        task.in_queue = False
        self.queued -= 1

    def next_plain(self) -> Task | None:
        """The head of the queue of tasks that ask for no resources."""
        heap = self.queues.get(b"")
        while heap and not heap[0][2].in_queue:
            heapq.heappop(heap)
        return heap[0][2] if heap else None


@dataclass(slots=True, eq=False)
class Worker:
    identity: bytes
    hello: p.WorkerHello
    kind: WorkerClass
    key_name: str | None = None
    pool: ResourcePool | None = None
    credits: int = 0
    tasks: dict[bytes, Task] = field(default_factory=dict)
    draining: bool = False
    isolated: bool = False  # running a suspect alone: nothing else meanwhile
    counted: int = 0  # its share of the pool capacity, as last counted
    done: int = 0
    exit: dict[str, Any] = field(default_factory=dict)  # exitcode/signal, from an OBITUARY
    environments: dict[str, Any] = field(default_factory=dict)  # its ENVIRONMENTS report


@dataclass(slots=True)
class Sends:
    """What the broker must send after a call: it encodes and sends, nothing else."""

    tasks: dict[bytes, list[Task]] = field(default_factory=dict)  # worker -> new tasks
    results: dict[bytes, list[tuple[p.ResultRecord, p.Payload]]] = field(default_factory=dict)
    stops: dict[bytes, list[bytes]] = field(default_factory=dict)  # worker -> keys to stop
    notices: dict[bytes, list[tuple[str, list[int]]]] = field(default_factory=dict)
    capacity_changed: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.tasks or self.results or self.stops or self.notices or self.capacity_changed
        )


@dataclass(slots=True)
class Counts:
    done: int = 0  # every task that finished, however
    failed: int = 0  # of done: raised, or refused by the broker
    lost: int = 0  # of done: lost its worker max_attempts times
