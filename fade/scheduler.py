"""The broker's decisions, with no sockets: which task runs where, and what goes back.

::

    broker handler ──method call──> Scheduler ──> Sends: TASK batches per worker, STOPs,
      (submit, grant, done, terminate,   │           RESULT records and NOTICEs per client,
       add/remove peers, ...)            │           "capacity changed"
                                         v
      clients{identity}: priority heaps per resource request, a fair-share clock
      workers{identity}: filed by class (idle first, then busy with credit), a resource pool
        (fade/roster.py); the fair-share clock's sums: fade/fairshare.py; keys held across a
        broker restart: fade/holdings.py; the texts of refusals: fade/refusals.py
      tasks{key}, suspects

* **Fair share by time.** When a worker has room, the waiting client whose clock is
  lowest is served: worker-seconds used (running tasks counted up to now) per unit of
  weight. A client that was idle starts at the lowest clock of the active ones, so it
  gets its share at once without a debt or a credit from the past. Weights are set on
  the broker per key name.
* **Priorities** order a client's own tasks (higher first, then in submission order);
  they do not move one client ahead of another. A task whose resources are not free
  lets the client's next one that can run go first.
* **Resources**: a task that asks for some runs only on a worker whose host has them
  free; the host lends them (device indices for GPUs) until the task ends.
* **Credits**: a worker receives tasks only against the credits it granted; within a
  class (same Python, platform and ABI, frame limit and clients served), one holding
  nothing is served before one that is busy, the most recently busy first; a task that
  needs compiled packages goes only to workers of its client's platform and ABI. Plain
  tasks cost O(clients + classes) to place; a task that asks for resources also looks at
  the workers with credit of its classes.
* A lost worker's tasks come back as *suspects*: each runs alone on an idle worker, so a
  task that kills its worker cannot take innocent neighbours down with it; after
  ``max_attempts`` losses it is LOST.
* **Terminate**: a queued task is failed at once; a running one is STOPped on its worker,
  which answers with the task's TaskTerminatedError. A client that leaves has its
  running tasks stopped the same way, so they free their workers.
* **Declines**: a worker whose host cannot keep a task's code (its cache disk is full)
  declines it: that worker gets none of the client's tasks for ``DECLINE_PERIOD``
  seconds, and the task goes to another worker. Where no other worker could take it,
  it fails with the worker's error, and so does every task of the client that no
  worker could take, at once (the error names the folder and the fix), rather than
  one by one as each worker's period ends.
* **Nested waits**: a client in a worker process (a task that submits to its own pool)
  is *nested* in that worker. When every worker that could run a nested client's
  queued tasks is itself running a task whose nested client has queued tasks, no
  task can finish; once that has lasted a while, the clients of the waiting tasks and
  the nested clients are told so (a NOTICE naming the workers).
* **Quotas**: a client may hold at most ``max_client_tasks`` tasks and
  ``max_client_bytes`` bytes here; beyond that its tasks are refused, so no client can
  exhaust the broker's memory.
* A worker may complete only the tasks assigned to it; a client's tag (the first half
  of its task keys) is bound to the client that first said it. Every task moves through
  :data:`fade.lifecycle.TASK_MOVES`.
* A fresh broker (restarted, or a pair's standby taking over) learns from each
  worker's HELLO the keys it holds. A re-sent task held by a worker stays with it;
  a result that worker sends for a task whose client has not re-sent it yet is kept
  (an *orphan*) until the client does, then completes it at once, for two ageings
  at most (:meth:`Scheduler.age_orphans`).

The broker (fade/broker.py) calls these methods from its poll loop, then takes what to
send with :meth:`Scheduler.take_sends`. Everything here is plain data and is
unit-tested without processes (tests/test_scheduler.py, tests/test_scheduler_sharing.py).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from fade import fairshare, refusals
from fade import protocol as p
from fade.errors import ProtocolError
from fade.holdings import Holdings
from fade.lifecycle import TASK_MOVES, TaskState, move
from fade.peers import Client, Counts, Sends, Task, Worker, WorkerClass
from fade.roster import Roster

__all__ = ["Refusal", "Scheduler"]

DEFAULT_MAX_ATTEMPTS = 3
#: A client may hold at most this many tasks at the broker (queued and running) ...
DEFAULT_MAX_CLIENT_TASKS = 100_000
#: ... and this many bytes of their payloads.
DEFAULT_MAX_CLIENT_BYTES = 2 << 30
#: Seconds a worker that declined a client's task (its host could not keep the code)
#: gets none of that client's tasks; then it may try again (its disk may have room).
DECLINE_PERIOD = 60.0


class Refusal(Exception):
    """A peer's request the scheduler will not carry out; the message says why."""


class Scheduler:
    """Tasks, clients and workers; every decision about them."""

    def __init__(
        self,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        *,
        weights: dict[str, float] | None = None,
        max_client_tasks: int = DEFAULT_MAX_CLIENT_TASKS,
        max_client_bytes: int = DEFAULT_MAX_CLIENT_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if max_client_tasks < 1:
            raise ValueError("max_client_tasks must be >= 1 (a client may hold no task at all)")
        self.max_attempts = max_attempts
        self.weights = dict(weights or {})
        self.max_client_tasks = max_client_tasks
        self.max_client_bytes = max_client_bytes
        self.clock = clock
        self.tasks: dict[bytes, Task] = {}
        self.clients: dict[bytes, Client] = {}
        self.workers: dict[bytes, Worker] = {}
        self.roster = Roster()  # the workers filed for dispatch (fade/roster.py)
        self.counts = Counts()
        self._tags: dict[bytes, Client] = {}
        self._waiting: dict[bytes, Client] = {}  # clients with queued tasks
        self._suspects: collections.deque[Task] = collections.deque()
        self.holdings = Holdings()  # across a broker restart (fade/holdings.py)
        self._sends = Sends()
        #: Worker processes by (host, pid); clients in a worker's process, by identity.
        self._processes: dict[tuple[str, int], Worker] = {}
        self._nested: dict[bytes, Worker] = {}
        #: Since when the pool has looked deadlocked by nested waits; whether told.
        self._deadlocked_since: float | None = None
        self._told_deadlock = False

    def has_sends(self) -> bool:
        return bool(self._sends)

    def take_sends(self) -> Sends:
        sends, self._sends = self._sends, Sends()
        return sends

    @property
    def capacity(self) -> int:
        """Credits, running tasks and 1 of every ready worker, added up (fade/roster.py)."""
        return self.roster.capacity

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
            weight = self.weights.get(key_name, 1.0) if key_name is not None else 1.0
            client = Client(identity, hello, p.python_of(hello), key_name, weight)
            self.clients[identity] = client
            self._tags[hello.tag] = client
        client.hello, client.python = hello, p.python_of(hello)
        client.platform = p.platform_of(hello)
        self.roster.serving.pop(identity, None)
        host = self._processes.get((hello.host, hello.pid))
        if host is not None:  # a task's own client, in its worker's process
            self._nested[identity] = host
        return client

    def remove_client(self, identity: bytes) -> list[Task]:
        """Forget a client and drop its tasks; the running ones are STOPped on their
        workers (and returned)."""
        client = self.clients.pop(identity, None)
        if client is None:
            return []
        running = [t for t in client.tasks.values() if t.state is TaskState.RUNNING]
        for task in running:
            if task.worker is not None:
                self._sends.stops.setdefault(task.worker.identity, []).append(task.key)
        for task in list(client.tasks.values()):
            self._finish(task, TaskState.DROPPED)
        client.queues.clear()
        self._waiting.pop(identity, None)
        self._nested.pop(identity, None)
        self.roster.serving.pop(identity, None)
        self._tags.pop(client.hello.tag, None)
        self._dispatch()
        return running

    def submit(self, identity: bytes, tasks: list[tuple[p.SubmitRecord, p.Payload]]) -> None:
        """Queue a client's tasks (a re-sent task it already has here is skipped)."""
        client = self.clients[identity]
        kinds = self._kinds_serving(client)
        unsatisfiable: dict[bytes, list[int]] = {}
        for record, payload in tasks:
            key = p.task_key(client.hello.tag, record.task_id)
            if key in self.tasks:
                continue
            task = self._new_task(client, key, record, payload)
            if self._adopt(task) or self._refused_at_once(task, kinds):
                continue
            if task.need is not None and kinds and not self._could_ever(task, kinds):
                unsatisfiable.setdefault(task.spec, []).append(task.task_id)
            self._queue(task)
        for spec, ids in unsatisfiable.items():
            self._notice(client, refusals.unsatisfiable(spec), ids)
        self._dispatch()

    def terminate(self, identity: bytes, task_ids: list[int]) -> None:
        """Stop a client's tasks: queued ones fail at once, running ones are STOPped."""
        client = self.clients[identity]
        for task_id in task_ids:
            task = self.tasks.get(p.task_key(client.hello.tag, task_id))
            if task is None:
                continue
            if task.state is TaskState.QUEUED:
                self.refuse(task, "terminated", "the task was terminated before it started")
            elif task.state is TaskState.RUNNING and not task.terminating and task.worker:
                task.terminating = True
                self._sends.stops.setdefault(task.worker.identity, []).append(task.key)
        self._dispatch()

    def _new_task(
        self, client: Client, key: bytes, record: p.SubmitRecord, payload: p.Payload
    ) -> Task:
        size = len(payload.inline) + sum(p.frame_size(b) for b in payload.buffers)
        client.next_seq += 1
        task = Task(
            key,
            client,
            record.task_id,
            payload,
            record.timeout,
            record.max_attempts or self.max_attempts,
            p.largest_part(payload),
            size,
            record.priority,
            record.resources,
            bool(record.flags & p.SUBMIT_NATIVE),
            seq=client.next_seq,
        )
        self.tasks[key] = task
        client.tasks[key] = task
        client.held_bytes += size
        return task

    # -- workers ---------------------------------------------------------------------------

    def add_worker(self, identity: bytes, hello: p.WorkerHello, key_name: str | None) -> Worker:
        """Register a worker, or take a repeated HELLO (after a reconnection)."""
        if identity in self.clients:
            self.remove_client(identity)
        kind = WorkerClass(
            p.python_of(hello), hello.max_message_size, hello.clients, p.platform_of(hello)
        )
        worker = self.workers.get(identity)
        if worker is None:
            worker = Worker(identity, hello, kind, key_name, self.roster.pool(hello))
            self.workers[identity] = worker
            self.roster.members(kind, hello.host, +1)
            self._processes[(hello.host, hello.pid)] = worker
        else:
            self.roster.unfile(worker)
            self._requeue_unheld(worker, set(hello.holding))
            self.roster.reclass(worker, kind)
        self.holdings.remember(worker, hello.holding, self.tasks)
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
        self.roster.members(worker.kind, worker.hello.host, -1)
        self.roster.leave_pool(worker)
        self.holdings.forget(worker)
        if self._processes.get((worker.hello.host, worker.hello.pid)) is worker:
            del self._processes[(worker.hello.host, worker.hello.pid)]
        for client_id in [c for c, w in self._nested.items() if w is worker]:
            del self._nested[client_id]
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
                if task is None and worker is not None and self.holdings.held:
                    self.holdings.keep(worker, record, payload)
                continue  # late, duplicate, or not this worker's to answer
            self._unassign(task, refile=False)
            if record.status is p.Status.DECLINED:
                self._decline(task, worker, payload)
                continue
            if record.status is p.Status.RETURNED:
                if task.terminating:
                    self.refuse(task, "terminated", "the task was terminated before it started")
                else:
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
        """Fail a task the broker will not run (too large, incompatible, over quota...)."""
        self._finish(task, TaskState.FAILED, p.Status.REFUSED, p.encode_refusal(kind, message))

    def _lose(self, task: Task, worker: Worker, reason: str) -> None:
        task.losses += 1
        if task.terminating:
            self.refuse(task, "terminated", f"the task was terminated (its worker: {reason})")
        elif task.losses >= task.max_attempts:
            report = refusals.lost_report(task, worker, reason)
            self._finish(task, TaskState.LOST, p.Status.LOST, report)
        else:
            move(task, TaskState.QUEUED, TASK_MOVES)
            self._suspects.append(task)

    # -- workers that cannot keep a client's code ------------------------------------------

    def _decline(self, task: Task, worker: Worker, payload: p.Payload) -> None:
        """The worker's host cannot keep the task's code: it gets none of the client's
        tasks for DECLINE_PERIOD; the task goes to another worker, or fails with the
        worker's error, as do the client's queued tasks no other worker could take."""
        client = task.client
        client.declined[worker.identity] = self.clock() + DECLINE_PERIOD
        client.decline = payload
        if task.terminating:
            self.refuse(task, "terminated", "the task was terminated before it started")
        elif self._has_taker(client, task):
            self._requeue(task)
        else:
            self._finish(task, TaskState.FAILED, p.Status.RAISED, payload)
            stranded = [t for t in client.tasks.values() if t.state is TaskState.QUEUED]
            for other in stranded:
                if not self._has_taker(client, other):
                    self._finish(other, TaskState.FAILED, p.Status.RAISED, payload)

    def _has_taker(self, client: Client, task: Task) -> bool:
        """Whether a connected worker that has not declined the client's tasks could run
        this one (now or once it has room). O(workers): only after a decline."""
        declined = client.declined
        for worker in self.workers.values():
            kind = worker.kind
            if worker.draining or worker.identity in declined or not kind.serves(client):
                continue
            if not kind.fits(task):
                continue
            if task.need is None or (worker.pool is not None and worker.pool.could(task.need)):
                return True
        return False

    def _forget_declines(self, client: Client) -> bool:
        """Drop the client's declines whose period has passed; True if any was."""
        now = self.clock()
        expired = [w for w, until in client.declined.items() if until <= now]
        for identity in expired:
            del client.declined[identity]
        if not client.declined:
            client.decline = None
        return bool(expired)

    def expire_declines(self) -> None:
        """Workers whose decline period has passed may take their clients' tasks again
        (the broker calls this from its upkeep)."""
        expired = False
        for client in self.clients.values():
            if client.declined and self._forget_declines(client):
                expired = True
        if expired:
            self._dispatch()

    # -- tasks that wait for tasks of their own pool -----------------------------------------

    def check_nested_waits(self, after: float) -> None:
        """Tell the clients concerned when, for ``after`` seconds, every worker that could
        run a nested client's queued tasks has been running a task that waits the same
        way (the broker calls this from its upkeep; O(nested clients x workers))."""
        stuck, blocked = self._nested_deadlock()
        if not stuck:
            self._deadlocked_since, self._told_deadlock = None, False
            return
        now = self.clock()
        if self._deadlocked_since is None:
            self._deadlocked_since = now
        if self._told_deadlock or now - self._deadlocked_since < after:
            return
        self._told_deadlock = True
        workers = sorted(blocked.values(), key=lambda w: w.identity)
        for client in stuck:
            queued = [t.task_id for t in client.tasks.values() if t.state is TaskState.QUEUED]
            self._notice(client, refusals.nested_deadlock(workers, parent=False), queued)
        parents: dict[bytes, list[int]] = {}
        for worker in workers:
            for task in worker.tasks.values():
                parents.setdefault(task.client.identity, []).append(task.task_id)
        for client_id, ids in parents.items():
            client = self.clients[client_id]
            self._notice(client, refusals.nested_deadlock(workers, parent=True), ids)

    def _nested_deadlock(self) -> tuple[list[Client], dict[bytes, Worker]]:
        """The nested clients whose queued tasks only waiting workers could run, and the
        waiting workers (running a task whose nested client has queued tasks)."""
        if not self._nested:
            return [], {}
        waiting = {
            worker.identity: worker
            for client_id, worker in self._nested.items()
            if worker.tasks and self.clients[client_id].queued
        }
        if not waiting:
            return [], {}
        stuck = []
        for client_id, worker in self._nested.items():
            client = self.clients[client_id]
            if client.queued and worker.identity in waiting and not self._free(client, waiting):
                stuck.append(client)
        return stuck, waiting

    def _free(self, client: Client, waiting: dict[bytes, Worker]) -> bool:
        """Whether a worker that is not waiting so could run the client's tasks."""
        return any(
            w.identity not in waiting and not w.draining and w.kind.serves(client)
            for w in self.workers.values()
        )

    # -- task records ------------------------------------------------------------------------

    def _queue(self, task: Task) -> None:
        client = task.client
        if client.identity not in self._waiting:
            if not client.running:
                fairshare.rebase(client, self.clients.values(), self.clock())
            self._waiting[client.identity] = client
        client.push(task)

    def _requeue(self, task: Task) -> None:
        """Back in line (handed back, not lost; a suspect stays one). It keeps its place:
        its priority and submission order put it ahead of what came after it."""
        move(task, TaskState.QUEUED, TASK_MOVES)
        if task.losses:
            self._suspects.appendleft(task)
        else:
            self._queue(task)

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
        task.client.unqueue(task)
        move(task, state, TASK_MOVES)
        del self.tasks[task.key]
        client = task.client
        client.tasks.pop(task.key, None)
        client.held_bytes -= task.size
        if state is TaskState.DROPPED:
            return
        counts = self.counts
        counts.done += 1
        counts.failed += state is TaskState.FAILED
        counts.lost += state is TaskState.LOST
        if status is None or payload is None or client.identity not in self.clients:
            return
        limit = client.hello.max_message_size
        if limit and p.largest_part(payload) > limit:
            status = p.Status.REFUSED
            payload = p.encode_refusal("too_large", refusals.result_too_large(payload, limit))
        result = (p.ResultRecord(task.task_id, status), payload)
        self._sends.results.setdefault(client.identity, []).append(result)

    def _refused_at_once(self, task: Task, kinds: list[WorkerClass] | None) -> bool:
        """Refuse a task over its client's quota, with a bad request, or that no connected
        worker could run; True if it was refused."""
        client = task.client
        if len(client.tasks) > self.max_client_tasks or client.held_bytes > self.max_client_bytes:
            self.refuse(
                task,
                "quota",
                refusals.over_quota(client, self.max_client_tasks, self.max_client_bytes),
            )
            return True
        try:
            task.need = p.decode_resources(task.spec)
        except ProtocolError as exc:
            self.refuse(task, "bad_request", str(exc))
            return True
        if kinds is None:
            return False  # no worker yet: workers may come
        if not kinds:
            present = self.roster.hosts()
            self.refuse(task, "incompatible", refusals.incompatible(client, present))
            return True
        if client.declined and self._stranded(task):
            return True
        if not any(kind.fits(task) for kind in kinds):
            native = [kind for kind in kinds if kind.platform == client.platform]
            if task.native and not native:
                serving = self.roster.hosts(kinds)
                self.refuse(task, "incompatible", refusals.incompatible(client, serving, True))
                return True
            limit = max(kind.max_message_size for kind in (native if task.native else kinds))
            self.refuse(task, "too_large", refusals.too_large(task.largest, limit))
            return True
        return False

    def _stranded(self, task: Task) -> bool:
        """Fail a new task that only workers which declined its client's tasks could
        take, with their error; True if it was."""
        client = task.client
        self._forget_declines(client)
        if not client.declined or client.decline is None or self._has_taker(client, task):
            return False
        self._finish(task, TaskState.FAILED, p.Status.RAISED, client.decline)
        return True

    def _kinds_serving(self, client: Client) -> list[WorkerClass] | None:
        """The classes of connected workers that serve this client; None if no worker is
        connected (then none is refused: workers may yet come). Kept per client until a
        class gains or loses its first or last worker."""
        if not self.workers:
            return None
        return self.roster.kinds_serving(client)

    def _could_ever(self, task: Task, kinds: list[WorkerClass]) -> bool:
        assert task.need is not None
        return any(
            w.pool is not None and w.pool.could(task.need)
            for w in self.workers.values()
            if w.kind in kinds
        )

    def _notice(self, client: Client, message: str, task_ids: list[int]) -> None:
        self._sends.notices.setdefault(client.identity, []).append((message, task_ids))

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued tasks to workers with credit: suspects alone to idle workers first,
        then the fairest waiting client's best task that can run, again and again."""
        if self._suspects:
            self._dispatch_suspects()
        if not self._waiting:
            return
        now = self.clock()
        while self._waiting and self._serve_fairest(now):
            pass

    def _serve_fairest(self, now: float) -> bool:
        """Give the fairest client that can use a worker now its next tasks; False when
        no waiting client's task can go anywhere now."""
        waiting = self._waiting
        order = list(waiting.values())
        if len(order) > 1:
            order.sort(key=lambda c: c.clock(now))
        for client in order:
            if not client.queued:
                del waiting[client.identity]
                continue
            if self._place(client, now):
                if not client.queued:
                    waiting.pop(client.identity, None)
                return True
        return False

    def _place(self, client: Client, now: float) -> bool:
        """Assign the client's best task that can run now (and, for plain tasks, what
        else of the same queue the chosen worker has credit for)."""
        for task in client.heads():
            worker = self.roster.worker_for(client, task)
            if worker is None:
                continue
            batch = [task]
            client.pop(task)
            if task.need is None:
                self._take_more(client, worker, batch)
            self._assign(worker, batch, now)
            return True
        return False

    def _take_more(self, client: Client, worker: Worker, batch: list[Task]) -> None:
        """Fill the worker's credits from the client's queue of plain tasks."""
        while len(batch) < worker.credits:
            task = client.next_plain()
            if task is None or not worker.kind.fits(task):
                return
            batch.append(task)
            client.pop(task)

    def _dispatch_suspects(self) -> None:
        now = self.clock()
        for _ in range(len(self._suspects)):
            task = self._suspects.popleft()
            if task.state is not TaskState.QUEUED:
                continue  # dropped meanwhile (its client left)
            worker = self.roster.idle_worker_for(task)
            if worker is None:
                self._suspects.append(task)
                continue
            worker.isolated = True
            self._assign(worker, [task], now)

    def _assign(self, worker: Worker, batch: list[Task], now: float) -> None:
        for task in batch:
            move(task, TaskState.RUNNING, TASK_MOVES)
            task.worker = worker
            worker.tasks[task.key] = task
            if task.need is not None and worker.pool is not None:
                task.devices = worker.pool.lend(task.need)
            fairshare.start_clock(task, now)
        worker.credits -= len(batch)
        self._file(worker)
        self._sends.tasks.setdefault(worker.identity, []).extend(batch)

    def _unassign(self, task: Task, refile: bool = True) -> None:
        worker = task.worker
        if worker is None:
            return
        task.worker = None
        fairshare.stop_clock(task, self.clock)
        if task.need is not None and worker.pool is not None:
            worker.pool.give_back(task.need, task.devices)
            task.devices = b""
        if worker.tasks.pop(task.key, None) is not None:
            if not worker.tasks:
                worker.isolated = False
            if refile:
                self._file(worker)

    # -- a worker's standing ---------------------------------------------------------------------

    def _file(self, worker: Worker) -> None:
        """Refile a worker after any change to it (fade/roster.py decides where)."""
        self.roster.file(worker, not worker.draining and worker.identity in self.workers)

    # -- tasks a worker holds across a reconnection or a broker restart -----------------------

    def _requeue_unheld(self, worker: Worker, holding: set[bytes]) -> None:
        """A worker that says HELLO again lists what it holds; any other task we had given
        it was lost in flight with its old socket, so it goes back in the queue."""
        lost = [t for t in worker.tasks.values() if t.key not in holding]
        for task in lost:
            self._unassign(task, refile=False)
        for task in reversed(lost):
            self._requeue(task)

    def holder(self, key: bytes) -> Worker | None:
        """The worker that said it holds this task, which is not here yet (a fresh broker)."""
        return self.holdings.holder(key)

    def age_orphans(self) -> None:
        """Forget the results kept for tasks no client re-sent since the call before the
        last (the broker calls this every few expiries: clients re-send at once)."""
        self.holdings.age()

    def _adopt(self, task: Task) -> bool:
        """A re-sent task that a worker holds is its own again; one it has already
        answered is complete. True if so."""
        orphan = self.holdings.take_result(task.key)
        if orphan is not None:
            status, payload = orphan
            move(task, TaskState.RUNNING, TASK_MOVES)  # it ran, before we knew of it
            state = TaskState.DONE if status is p.Status.OK else TaskState.FAILED
            self._finish(task, state, status, payload)
            return True
        worker = self.holdings.take_holder(task.key)
        if worker is None or worker.identity not in self.workers:
            return False
        move(task, TaskState.RUNNING, TASK_MOVES)
        task.worker = worker
        worker.tasks[task.key] = task  # its credits already count it
        fairshare.start_clock(task, self.clock())
        self._file(worker)
        return True
