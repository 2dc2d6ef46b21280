"""The broker's decisions, with no sockets: which task runs where, and what goes back.

::

    broker handler ──method call──> Scheduler ──> Sends: TASK batches per worker,
      (submit, grant, done,            │              RESULT records per client,
       add/remove peers, ...)          │              "capacity changed"
                                       v
      tasks{key}   clients{identity} (one FIFO queue each, served in turn)
      suspects     workers{identity} filed by class: idle first, then busy with credit

* A worker receives tasks only against the credits it granted; within a worker
  class, one holding nothing is served before one that is busy.
* Workers are grouped in *classes* of the same Python, frame-size limit and client
  restriction; a client's tasks go only to classes that can run them, so dispatch
  looks at classes and clients, never at every worker or every task.
* A lost worker's tasks come back as *suspects*: each runs alone on an idle worker,
  so a task that kills its worker cannot take innocent neighbours down with it;
  after ``max_attempts`` losses it is LOST.
* A worker may complete only the tasks assigned to it; a client's tag (the first
  half of its task keys) is bound to the client that first said it.
* Every task record moves through :data:`fade.lifecycle.TASK_MOVES`.
* A fresh broker (restarted, or a pair's standby taking over) learns from each
  worker's HELLO the keys it holds. A re-sent task held by a worker stays with it;
  a result that worker sends for a task whose client has not re-sent it yet is kept
  (an *orphan*) until the client does, then completes it at once, for two ageings
  at most (:meth:`Scheduler.age_orphans`).

The broker (fade/broker.py) calls these methods from its poll loop, then takes
what to send with :meth:`Scheduler.take_sends`. Everything here is plain data and
is unit-tested without processes (tests/test_scheduler.py).
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any

from fade import protocol as p
from fade.lifecycle import TASK_MOVES, TaskState, move

__all__ = ["Client", "Refusal", "Scheduler", "Sends", "Task", "Worker", "WorkerClass"]

DEFAULT_MAX_ATTEMPTS = 3
#: Results kept for tasks not re-sent yet (see age_orphans), at most; the oldest go first.
MAX_ORPHANS = 65536


class Refusal(Exception):
    """A peer's request the scheduler will not carry out; the message says why."""


@dataclass(frozen=True, slots=True)
class WorkerClass:
    """What decides which tasks a worker can take: its Python, frame limit and clients."""

    python: str
    max_message_size: int  # 0: no limit said
    clients: tuple[str, ...] | None  # key names served; None: all

    def serves(self, client: Client) -> bool:
        if self.python != client.python:
            return False
        return self.clients is None or client.key_name in self.clients

    def fits(self, task: Task) -> bool:
        return not self.max_message_size or task.largest <= self.max_message_size


@dataclass(slots=True, eq=False)
class Client:
    identity: bytes
    hello: p.ClientHello
    python: str  # p.python_of(hello): what its pickles need
    key_name: str | None = None
    tasks: dict[bytes, Task] = field(default_factory=dict)  # everything it has here
    queue: collections.deque[Task] = field(default_factory=collections.deque)


@dataclass(slots=True, eq=False)
class Task:
    key: bytes
    client: Client
    task_id: int
    payload: p.Payload
    timeout: float
    max_attempts: int
    largest: int  # bytes in its largest frame, for the workers' limits
    state: TaskState = TaskState.QUEUED
    worker: Worker | None = None
    losses: int = 0


@dataclass(slots=True, eq=False)
class Worker:
    identity: bytes
    hello: p.WorkerHello
    kind: WorkerClass
    key_name: str | None = None
    credits: int = 0
    tasks: dict[bytes, Task] = field(default_factory=dict)
    draining: bool = False
    isolated: bool = False  # running a suspect alone: nothing else meanwhile
    counted: int = 0  # its share of the pool capacity, as last counted
    done: int = 0
    exit: dict[str, Any] = field(default_factory=dict)  # exitcode/signal, from an OBITUARY


@dataclass(slots=True)
class _Class:
    """The workers of one class, filed for dispatch."""

    idle: dict[bytes, Worker] = field(default_factory=dict)  # credit, holding nothing
    busy: dict[bytes, Worker] = field(default_factory=dict)  # credit, holding some
    members: int = 0

    def next_worker(self) -> Worker | None:
        for filed in (self.idle, self.busy):
            if filed:
                return next(iter(filed.values()))
        return None


@dataclass(slots=True)
class Sends:
    """What the broker must send after a call: it encodes and sends, nothing else."""

    tasks: dict[bytes, list[Task]] = field(default_factory=dict)  # worker -> new tasks
    results: dict[bytes, list[tuple[p.ResultRecord, p.Payload]]] = field(default_factory=dict)
    capacity_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.tasks or self.results or self.capacity_changed)


@dataclass(slots=True)
class Counts:
    done: int = 0  # every task that finished, however
    failed: int = 0  # of done: raised, or refused by the broker
    lost: int = 0  # of done: lost its worker max_attempts times


class Scheduler:
    """Tasks, clients and workers; every decision about them."""

    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.max_attempts = max_attempts
        self.tasks: dict[bytes, Task] = {}
        self.clients: dict[bytes, Client] = {}
        self.workers: dict[bytes, Worker] = {}
        self.counts = Counts()
        self.capacity = 0
        self._tags: dict[bytes, Client] = {}
        self._classes: dict[WorkerClass, _Class] = {}
        self._waiting: dict[bytes, Client] = {}  # clients with queued tasks, in turn order
        self._suspects: collections.deque[Task] = collections.deque()
        self._held: dict[bytes, Worker] = {}  # keys held by workers, not yet submitted here
        # Results for held keys not submitted yet: this age's, and the one before.
        self._orphans: dict[bytes, tuple[p.Status, p.Payload]] = {}
        self._old_orphans: dict[bytes, tuple[p.Status, p.Payload]] = {}
        self._sends = Sends()

    def take_sends(self) -> Sends:
        sends, self._sends = self._sends, Sends()
        return sends

    # -- clients ---------------------------------------------------------------------------

    def add_client(self, identity: bytes, hello: p.ClientHello, key_name: str | None) -> Client:
        """Register (or re-register) a client; raises Refusal if its tag is another's."""
        owner = self._tags.get(hello.tag)
        if owner is not None and owner.identity != identity:
            raise Refusal("this client tag belongs to another client")
        if identity in self.workers:
            self.remove_worker(identity, lost="it re-registered as a client")
        client = self.clients.get(identity)
        if client is not None and client.hello.tag != hello.tag:
            self.remove_client(identity)  # a new session under an old identity
            client = None
        if client is None:
            client = Client(identity, hello, p.python_of(hello), key_name)
            self.clients[identity] = client
            self._tags[hello.tag] = client
        client.hello, client.python = hello, p.python_of(hello)
        return client

    def remove_client(self, identity: bytes) -> list[Task]:
        """Forget a client and drop its tasks; returns those that were running."""
        client = self.clients.pop(identity, None)
        if client is None:
            return []
        running = []
        for task in list(client.tasks.values()):
            if task.state is TaskState.RUNNING:
                running.append(task)
            self._finish(task, TaskState.DROPPED)
        client.queue.clear()
        self._waiting.pop(identity, None)
        self._tags.pop(client.hello.tag, None)
        return running

    def submit(self, identity: bytes, tasks: list[tuple[p.SubmitRecord, p.Payload]]) -> None:
        """Queue a client's tasks (a re-sent task it already has here is skipped)."""
        client = self.clients[identity]
        kinds = self._kinds_serving(client)
        for record, payload in tasks:
            key = p.task_key(client.hello.tag, record.task_id)
            if key in self.tasks:
                continue
            task = Task(
                key,
                client,
                record.task_id,
                payload,
                record.timeout,
                record.max_attempts or self.max_attempts,
                p.largest_part(payload),
            )
            self.tasks[key] = task
            client.tasks[key] = task
            if self._adopt(task) or self._refused_at_once(task, kinds):
                continue
            client.queue.append(task)
        if client.queue:
            self._waiting.setdefault(identity, client)
        self._dispatch()

    # -- workers ---------------------------------------------------------------------------

    def add_worker(self, identity: bytes, hello: p.WorkerHello, key_name: str | None) -> Worker:
        """Register a worker, or take a repeated HELLO (after a reconnection)."""
        if identity in self.clients:
            self.remove_client(identity)
        kind = WorkerClass(p.python_of(hello), hello.max_message_size, hello.clients)
        worker = self.workers.get(identity)
        if worker is None:
            worker = Worker(identity, hello, kind, key_name)
            self.workers[identity] = worker
            self._class(kind).members += 1
        else:
            self._unfile(worker)
            self._requeue_unheld(worker, set(hello.holding))
            self._reclass(worker, kind)
        self._remember_held(worker, hello.holding)
        worker.hello, worker.draining, worker.credits = hello, False, 0
        self.grant(identity, hello.credits)
        self._sends.capacity_changed = True
        return worker

    def grant(self, identity: bytes, credits: int) -> None:
        worker = self.workers[identity]
        worker.credits = min(worker.credits + credits, p.MAX_CREDITS)
        self._file(worker)
        self._dispatch()

    def drain(self, identity: bytes) -> None:
        """The worker wants no more tasks; it keeps (and finishes) what it holds."""
        worker = self.workers[identity]
        worker.draining = True
        self._file(worker)

    def remove_worker(self, identity: bytes, *, lost: str | None = None) -> list[Task]:
        """A worker left (``lost`` None: on purpose, its tasks handed back unharmed) or was
        lost (``lost`` says why: its tasks count a loss). Returns the tasks it held."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return []
        held = list(worker.tasks.values())
        for task in held:
            self._unassign(task)
        if lost is None:
            for task in reversed(held):  # each goes to the head of the line: keep their order
                self._requeue(task)
        else:
            for task in held:
                self._lose(task, worker, lost)
        worker.draining, worker.credits = True, 0
        self._file(worker)
        self._class(worker.kind).members -= 1
        self._forget_held(worker)
        self._sends.capacity_changed = True
        self._dispatch()
        return held

    def done(self, identity: bytes, results: list[tuple[p.DoneRecord, p.Payload]]) -> int:
        """Results from a worker; only tasks assigned to it count. Returns how many
        unstarted tasks it handed back."""
        worker = self.workers.get(identity)
        returned = 0
        for record, payload in results:
            task = self.tasks.get(record.key)
            if task is None or worker is None or task.worker is not worker:
                if task is None and worker is not None and self._held:
                    self._orphan(worker, record, payload)
                continue  # late, duplicate, or not this worker's to answer
            self._unassign(task, refile=False)
            if record.status is p.Status.RETURNED:
                self._requeue(task)
                returned += 1
                continue
            worker.done += 1
            state = TaskState.DONE if record.status is p.Status.OK else TaskState.FAILED
            self._finish(task, state, record.status, payload)
        if worker is not None:
            self._file(worker)
        return returned

    # -- failures --------------------------------------------------------------------------

    def refuse(self, task: Task, kind: str, message: str) -> None:
        """Fail a task the broker will not run (too large, incompatible...)."""
        self._finish(task, TaskState.FAILED, p.Status.REFUSED, p.encode_refusal(kind, message))

    def _lose(self, task: Task, worker: Worker, reason: str) -> None:
        task.losses += 1
        if task.losses >= task.max_attempts:
            report = _lost_report(task, worker, reason)
            self._finish(task, TaskState.LOST, p.Status.LOST, report)
        else:
            move(task, TaskState.QUEUED, TASK_MOVES)
            self._suspects.append(task)

    # -- task records ------------------------------------------------------------------------

    def _requeue(self, task: Task) -> None:
        """Back at the head of the line (handed back, not lost; a suspect stays one)."""
        move(task, TaskState.QUEUED, TASK_MOVES)
        if task.losses:
            self._suspects.appendleft(task)
        else:
            task.client.queue.appendleft(task)
            self._waiting.setdefault(task.client.identity, task.client)

    def _finish(
        self,
        task: Task,
        state: TaskState,
        status: p.Status | None = None,
        payload: p.Payload | None = None,
    ) -> None:
        """Move a task to a final state, forget it, and queue its result (unless dropped)."""
        if task.state is TaskState.RUNNING:
            self._unassign(task)
        move(task, state, TASK_MOVES)
        del self.tasks[task.key]
        task.client.tasks.pop(task.key, None)
        if state is TaskState.DROPPED:
            return
        counts = self.counts
        counts.done += 1
        counts.failed += state is TaskState.FAILED
        counts.lost += state is TaskState.LOST
        client = task.client
        if status is None or payload is None or client.identity not in self.clients:
            return
        limit = client.hello.max_message_size
        if limit and p.largest_part(payload) > limit:
            status = p.Status.REFUSED
            payload = p.encode_refusal("too_large", _result_too_large(payload, limit))
        result = (p.ResultRecord(task.task_id, status), payload)
        self._sends.results.setdefault(client.identity, []).append(result)

    def _kinds_serving(self, client: Client) -> list[WorkerClass] | None:
        """The classes of connected workers that serve this client; None if no worker is
        connected (then none is refused: workers may yet come)."""
        if not self.workers:
            return None
        return [kind for kind, c in self._classes.items() if c.members and kind.serves(client)]

    def _refused_at_once(self, task: Task, kinds: list[WorkerClass] | None) -> bool:
        """Refuse a task no connected worker could run; True if it was refused."""
        if kinds is None:
            return False
        if not kinds:
            present = [kind for kind, c in self._classes.items() if c.members]
            self.refuse(task, "incompatible", _incompatible(task.client, present))
            return True
        if not any(kind.fits(task) for kind in kinds):
            limit = max(kind.max_message_size for kind in kinds)
            self.refuse(task, "too_large", _too_large(task.largest, limit))
            return True
        return False

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued tasks to workers with credit: suspects alone to idle workers first,
        then the clients' queues in turn, each to a class that can run its tasks."""
        if self._suspects:
            self._dispatch_suspects()
        while self._waiting:
            if not self._serve_next_client():
                return

    def _serve_next_client(self) -> bool:
        """Give one client's next tasks to one worker; False when no waiting client's
        next task can go anywhere now."""
        for identity, client in list(self._waiting.items()):
            if not client.queue:
                del self._waiting[identity]
                continue
            worker = self._worker_for(client, client.queue[0])
            if worker is None:
                continue
            batch = self._take(client, worker)
            # Its turn is over: it goes to the back of the line.
            del self._waiting[identity]
            if client.queue:
                self._waiting[identity] = client
            if batch:
                self._assign(worker, batch)
            return True
        return False

    def _worker_for(self, client: Client, task: Task) -> Worker | None:
        for kind, filed in self._classes.items():
            if kind.serves(client) and kind.fits(task):
                worker = filed.next_worker()
                if worker is not None:
                    return worker
        return None

    def _take(self, client: Client, worker: Worker) -> list[Task]:
        batch: list[Task] = []
        queue = client.queue
        while queue and len(batch) < worker.credits:
            if not worker.kind.fits(queue[0]):
                break
            batch.append(queue.popleft())
        return batch

    def _dispatch_suspects(self) -> None:
        for _ in range(len(self._suspects)):
            task = self._suspects.popleft()
            if task.state is not TaskState.QUEUED:
                continue  # dropped meanwhile (its client left)
            worker = self._idle_worker_for(task)
            if worker is None:
                self._suspects.append(task)
                continue
            worker.isolated = True
            self._assign(worker, [task])

    def _idle_worker_for(self, task: Task) -> Worker | None:
        for kind, filed in self._classes.items():
            if filed.idle and kind.serves(task.client) and kind.fits(task):
                return next(iter(filed.idle.values()))
        return None

    def _assign(self, worker: Worker, batch: list[Task]) -> None:
        for task in batch:
            move(task, TaskState.RUNNING, TASK_MOVES)
            task.worker = worker
            worker.tasks[task.key] = task
        worker.credits -= len(batch)
        self._file(worker)
        self._sends.tasks.setdefault(worker.identity, []).extend(batch)

    def _unassign(self, task: Task, refile: bool = True) -> None:
        worker = task.worker
        if worker is None:
            return
        task.worker = None
        if worker.tasks.pop(task.key, None) is not None:
            if not worker.tasks:
                worker.isolated = False
            if refile:
                self._file(worker)

    # -- a worker's standing ---------------------------------------------------------------------

    def _class(self, kind: WorkerClass) -> _Class:
        filed = self._classes.get(kind)
        if filed is None:
            filed = self._classes[kind] = _Class()
        return filed

    def _file(self, worker: Worker) -> None:
        """The one place that decides where a worker is filed, and its share of capacity."""
        filed = self._unfile(worker)
        ready = not worker.draining and worker.identity in self.workers
        if ready and not worker.isolated and worker.credits > 0:
            (filed.busy if worker.tasks else filed.idle)[worker.identity] = worker
        share = worker.credits + len(worker.tasks) + 1 if ready else 0
        self.capacity += share - worker.counted
        worker.counted = share

    def _unfile(self, worker: Worker) -> _Class:
        filed = self._class(worker.kind)
        filed.idle.pop(worker.identity, None)
        filed.busy.pop(worker.identity, None)
        return filed

    def _reclass(self, worker: Worker, kind: WorkerClass) -> None:
        if kind != worker.kind:
            self._class(worker.kind).members -= 1
            self._class(kind).members += 1
            worker.kind = kind

    # -- tasks a worker holds across a reconnection or a broker restart -----------------------

    def _requeue_unheld(self, worker: Worker, holding: set[bytes]) -> None:
        """A worker that says HELLO again lists what it holds; any other task we had given
        it was lost in flight with its old socket, so it goes back in the queue."""
        lost = [t for t in worker.tasks.values() if t.key not in holding]
        for task in lost:
            self._unassign(task, refile=False)
        for task in reversed(lost):
            self._requeue(task)

    def _remember_held(self, worker: Worker, holding: tuple[bytes, ...]) -> None:
        """Keys a worker holds that are unknown here (this broker is new): when their
        client re-sends them, they are the worker's again instead of running twice."""
        for key in holding:
            if key not in self.tasks:
                self._held[key] = worker

    def _forget_held(self, worker: Worker) -> None:
        if self._held:
            for key in [k for k, w in self._held.items() if w is worker]:
                del self._held[key]

    def _orphan(self, worker: Worker, record: p.DoneRecord, payload: p.Payload) -> None:
        """A result for a task this worker told us it holds, whose client has not re-sent
        it yet: keep it for the client's copy (a handed-back task is just forgotten)."""
        if self._held.get(record.key) is not worker:
            return
        del self._held[record.key]
        if record.status is p.Status.RETURNED:
            return
        while len(self._orphans) >= MAX_ORPHANS:
            del self._orphans[next(iter(self._orphans))]
        self._orphans[record.key] = (record.status, payload)

    def holder(self, key: bytes) -> Worker | None:
        """The worker that said it holds this task, which is not here yet (a fresh broker)."""
        return self._held.get(key)

    def age_orphans(self) -> None:
        """Forget the results kept for tasks no client re-sent since the call before the
        last (the broker calls this every few expiries: clients re-send at once)."""
        self._old_orphans, self._orphans = self._orphans, {}

    def _adopt(self, task: Task) -> bool:
        """A re-sent task that a worker holds is its own again; one it has already
        answered is complete. True if so."""
        if self._orphans or self._old_orphans:
            orphan = self._orphans.pop(task.key, None) or self._old_orphans.pop(task.key, None)
            if orphan is not None:
                status, payload = orphan
                move(task, TaskState.RUNNING, TASK_MOVES)  # it ran, before we knew of it
                state = TaskState.DONE if status is p.Status.OK else TaskState.FAILED
                self._finish(task, state, status, payload)
                return True
        worker = self._held.pop(task.key, None) if self._held else None
        if worker is None or worker.identity not in self.workers:
            return False
        move(task, TaskState.RUNNING, TASK_MOVES)
        task.worker = worker
        worker.tasks[task.key] = task  # its credits already count it
        self._file(worker)
        return True


def _lost_report(task: Task, worker: Worker, reason: str) -> p.Payload:
    report = {
        "attempts": task.losses,
        "worker": p.short_id(worker.identity),
        "host": worker.hello.host,
        "pid": worker.hello.pid,
        "exitcode": worker.exit.get("exitcode"),
        "signal": worker.exit.get("signal"),
        "reason": reason,
    }
    return p.Payload(json.dumps(report).encode())


def _incompatible(client: Client, kinds: list[WorkerClass]) -> str:
    pythons = sorted({kind.python for kind in kinds})
    if client.python not in pythons:
        return (
            f"no connected worker can run this task: the client runs {client.python} "
            f"(host {client.hello.host}), the workers run {', '.join(pythons)}; start "
            f"workers with {client.python}, or run the client with the workers' Python"
        )
    who = f"key {client.key_name!r}" if client.key_name else "clients without keys"
    return (
        f"no connected worker serves this client ({who}): the workers of its Python "
        "were started with --serve-clients for other keys"
    )


def _result_too_large(payload: p.Payload, limit: int) -> str:
    return (
        f"the task's result has a {p.largest_part(payload)}-byte frame; this client accepts "
        f"at most {limit} (max_message_size of the Executor): raise it"
    )


def _too_large(largest: int, limit: int) -> str:
    return (
        f"the task has a {largest}-byte frame; the workers accept at most {limit} "
        "(their --max-message-size): raise it on the workers"
    )
