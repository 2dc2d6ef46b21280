"""Where the scheduler files its workers: by class, idle or busy with credit; the
resource pools of their hosts; and the capacity they add up to.

::

    Scheduler (fade/scheduler.py) ── file(worker, ready) after every change to a worker
      Roster
        classes{WorkerClass}: Filed ── idle{identity} (most recently busy last)
                                       busy{identity} (with credit)
                                       members, hosts (to name them in refusals)
        pools{pool id}: ResourcePool, shared by the worker processes of one host
        capacity: credits + running tasks + 1 of every ready worker
        serving{client}: the classes that serve it (kept until a class comes or goes)

Separate from fade/scheduler.py, which decides *what* runs and in what order (fair
share, priorities, suspects, quotas): this module only keeps the workers where the
dispatch finds one in O(classes), and knows nothing of queues or clients' tasks. Plain
data, no sockets, like the scheduler.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from fade import protocol as p
from fade.peers import Client, Task, Worker, WorkerClass
from fade.resources import ResourcePool

__all__ = ["Filed", "Roster"]


class Filed:
    """The workers of one class, filed for dispatch: with credit and holding nothing, or
    with credit and busy."""

    __slots__ = ("busy", "hosts", "idle", "members")

    def __init__(self) -> None:
        self.idle: dict[bytes, Worker] = {}
        self.busy: dict[bytes, Worker] = {}
        self.members = 0
        self.hosts: collections.Counter[str] = collections.Counter()  # to name them

    def next_worker(self, skip: dict[bytes, float] | None = None) -> Worker | None:
        """The idle worker filed last (most recently busy), else the busy one filed first;
        none of those in ``skip`` (workers that declined the client's tasks).

        Most recently busy, not idle longest: a light load then stays on the few workers
        it needs, whose caches and threads are warm (a round trip on two idle workers
        took 200 us served in turn, 145 us on one), and the others stay idle long
        enough for an elastic pool to give them back (fade/scale)."""
        if skip:
            return next(self._candidates(skip), None)
        if self.idle:
            return next(reversed(self.idle.values()))
        if self.busy:
            return next(iter(self.busy.values()))
        return None

    def with_room(
        self, need: dict[str, float], skip: dict[bytes, float] | None = None
    ) -> Worker | None:
        """A worker with credit whose host has ``need`` free (idle ones first, in the
        order of next_worker), not one in ``skip``."""
        for worker in self._candidates(skip or {}):
            if worker.pool is not None and worker.pool.fits(need):
                return worker
        return None

    def _candidates(self, skip: dict[bytes, float]) -> Iterator[Worker]:
        for worker in reversed(self.idle.values()):
            if worker.identity not in skip:
                yield worker
        for worker in self.busy.values():
            if worker.identity not in skip:
                yield worker


class Roster:
    """The workers filed by class, their hosts' resource pools, and the capacity."""

    def __init__(self) -> None:
        self.classes: dict[WorkerClass, Filed] = {}
        self.pools: dict[str, ResourcePool] = {}
        self.capacity = 0
        self.serving: dict[bytes, list[WorkerClass]] = {}  # kinds_serving, per client

    def filed(self, kind: WorkerClass) -> Filed:
        filed = self.classes.get(kind)
        if filed is None:
            filed = self.classes[kind] = Filed()
        return filed

    def file(self, worker: Worker, ready: bool) -> None:
        """The one place that decides where a worker is filed, and its share of capacity
        (``ready``: connected and not draining)."""
        filed = self.unfile(worker)
        if ready and not worker.isolated and worker.credits > 0:
            (filed.busy if worker.tasks else filed.idle)[worker.identity] = worker
        share = worker.credits + len(worker.tasks) + 1 if ready else 0
        self.capacity += share - worker.counted
        worker.counted = share

    def unfile(self, worker: Worker) -> Filed:
        filed = self.filed(worker.kind)
        filed.idle.pop(worker.identity, None)
        filed.busy.pop(worker.identity, None)
        return filed

    def reclass(self, worker: Worker, kind: WorkerClass) -> None:
        if kind != worker.kind:
            self.members(worker.kind, worker.hello.host, -1)
            self.members(kind, worker.hello.host, +1)
            worker.kind = kind

    def members(self, kind: WorkerClass, host: str, change: int) -> None:
        filed = self.filed(kind)
        filed.members += change
        filed.hosts[host] += change
        if filed.hosts[host] <= 0:
            del filed.hosts[host]
        if filed.members in (0, 1):  # a class appeared or went: which serve whom changed
            self.serving.clear()

    def kinds_serving(self, client: Client) -> list[WorkerClass]:
        """The classes of connected workers that serve this client. Kept per client until
        a class gains or loses its first or last worker."""
        cached = self.serving.get(client.identity)
        if cached is None:
            cached = [k for k, c in self.classes.items() if c.members and k.serves(client)]
            self.serving[client.identity] = cached
        return cached

    def hosts(
        self, kinds: list[WorkerClass] | None = None
    ) -> dict[WorkerClass, collections.Counter[str]]:
        """The hosts of the workers of ``kinds`` (None: of every class that has some)."""
        if kinds is None:
            return {kind: c.hosts for kind, c in self.classes.items() if c.members}
        return {kind: self.classes[kind].hosts for kind in kinds}

    # -- finding a worker -------------------------------------------------------------------

    def worker_for(self, client: Client, task: Task) -> Worker | None:
        skip = client.declined
        for kind, filed in self.classes.items():
            if kind.serves(client) and kind.fits(task):
                if task.need is None:
                    worker = filed.next_worker(skip)
                else:
                    worker = filed.with_room(task.need, skip)
                if worker is not None:
                    return worker
        return None

    def idle_worker_for(self, task: Task) -> Worker | None:
        skip = task.client.declined
        for kind, filed in self.classes.items():
            if filed.idle and kind.serves(task.client) and kind.fits(task):
                for worker in filed.idle.values():
                    if worker.identity in skip:
                        continue
                    if task.need is None or (worker.pool and worker.pool.fits(task.need)):
                        return worker
        return None

    # -- resource pools ---------------------------------------------------------------------

    def pool(self, hello: p.WorkerHello) -> ResourcePool | None:
        """The resource pool a worker process shares with the others of its host."""
        if not hello.resources:
            return None
        pool_id = hello.pool or hello.host
        pool = self.pools.get(pool_id)
        if pool is None:
            pool = self.pools[pool_id] = ResourcePool(pool_id, dict(hello.resources))
        pool.members += 1
        return pool

    def leave_pool(self, worker: Worker) -> None:
        pool = worker.pool
        if pool is not None:
            pool.members -= 1
            if not pool.members:
                del self.pools[pool.pool_id]
