"""FETCH and CODE through the broker: a worker asks for a task's code, its client answers.

::

    worker --FETCH(task key)--> CodeRelay.fetch --FETCH(relay number)--> the task's client
    worker <--CODE(task key)--- CodeRelay.answer <--CODE(relay number)-- the task's client
                                  (a fresh broker: parked until the client re-sends the task)

* Neither side learns the other's identity: the client sees a relay number, the
  worker its own task key. An answer reaches the worker only if the task is still
  that worker's and the answering client's.
* Separate from the poll loop (fade/broker.py), whose ``_on_fetch`` and ``_on_code``
  check the sender and hand the message here, so that the loop stays dispatch.
* Both tables are bounded (:data:`MAX_RELAYS`): the oldest requests are forgotten,
  and their worker's wait for code times out.
"""

from __future__ import annotations

import collections
import itertools

from fade import protocol as p
from fade.brokerout import Outbox
from fade.peers import Task, Worker
from fade.scheduler import Scheduler

__all__ = ["MAX_RELAYS", "CodeRelay"]

#: Code requests relayed to clients and not yet answered, at most (the oldest are forgotten).
MAX_RELAYS = 65536


class CodeRelay:
    """The code requests in flight between workers and clients."""

    def __init__(self, out: Outbox, orphan_age: float) -> None:
        self._out = out
        self._orphan_age = orphan_age
        self._relays = _Relays()
        #: Requests waiting for their task's client to re-send it (empty: nothing to do).
        self.parked = _Parked()

    def forget(self) -> None:
        """Drop every request in flight (a broker that stops serving)."""
        self._relays = _Relays()
        self.parked = _Parked()

    def fetch(
        self,
        sched: Scheduler,
        worker: Worker,
        key: bytes,
        request_id: int,
        request: p.Frame,
        now: float,
    ) -> None:
        """A worker asks for the code of a task it holds: relay it to the task's client
        under a relay number (neither learns the other's identity)."""
        task = worker.tasks.get(key)
        if task is None and sched.holder(key) is worker:
            # A fresh broker: the worker holds the task, its client has not re-sent it
            # yet. Pass the request on when it does, rather than fail the task for it.
            self.parked.park(key, worker.identity, request_id, request, now)
            return
        if task is None or task.client.identity not in sched.clients:
            self._out.send(worker.identity, p.encode_code(key, request_id, p.CodeStatus.GONE, []))
            return
        self._pass_on(worker.identity, key, task, request_id, request)

    def _pass_on(
        self, asker: bytes, key: bytes, task: Task, request_id: int, request: p.Frame
    ) -> None:
        relay = self._relays.add(asker, key)
        self._out.send(task.client.identity, p.encode_fetch(relay, request_id, request))

    def unpark(self, sched: Scheduler, now: float) -> None:
        """Pass on the code requests whose tasks have come back; answer GONE to those
        whose worker left, or whose client did not come back in time. O(parked): only
        after a restart or a failover, for the few tasks fetching code then."""
        for key, (asker, request_id, request, since) in list(self.parked.items()):
            worker = sched.workers.get(asker)
            task = worker.tasks.get(key) if worker is not None else None
            if task is not None and task.client.identity in sched.clients:
                del self.parked[key]
                self._pass_on(asker, key, task, request_id, request)
            elif worker is None or now - since > self._orphan_age:
                del self.parked[key]
                if worker is not None:
                    self._out.send(asker, p.encode_code(key, request_id, p.CodeStatus.GONE, []))

    def answer(
        self,
        sched: Scheduler,
        client: bytes,
        ref: bytes,
        request_id: int,
        status: p.CodeStatus,
        frames: list[p.Frame],
    ) -> None:
        """A client answers a FETCH: relay the answer to the worker that asked, if the
        task is still that worker's and this client's."""
        asker = self._relays.take(ref)
        worker = sched.workers.get(asker[0]) if asker is not None else None
        task = worker.tasks.get(asker[1]) if worker is not None and asker is not None else None
        if worker is None or task is None or task.client.identity != client:
            return  # the worker or its task is gone, or the relay was never this client's
        limit = worker.hello.max_message_size
        if limit and any(p.frame_size(f) > limit for f in frames):
            status = p.CodeStatus.MISSING
            frames = [f"the code has a frame over the worker's limit of {limit} bytes".encode()]
        self._out.relayed["code"] += sum(p.frame_size(f) for f in frames)
        self._out.send(worker.identity, p.encode_code(task.key, request_id, status, frames))


class _Parked(collections.OrderedDict[bytes, tuple[bytes, int, p.Frame, float]]):
    """Code requests for tasks a worker holds whose clients have not re-sent them to this
    (fresh) broker yet: task key -> (the worker, request id, request, since). Bounded:
    the oldest are forgotten (their worker's wait for code times out). A dict, so that
    the check for any, made at every SUBMIT, costs no call."""

    def park(self, key: bytes, asker: bytes, request_id: int, request: p.Frame, now: float) -> None:
        self[key] = (asker, request_id, request, now)
        while len(self) > MAX_RELAYS:
            self.popitem(last=False)


class _Relays:
    """Code requests relayed to clients and not answered yet: relay number -> (the worker
    that asked, the key of its task). Bounded: the oldest are forgotten."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[int, tuple[bytes, bytes]] = collections.OrderedDict()
        self._numbers = itertools.count(1)

    def add(self, worker: bytes, key: bytes) -> bytes:
        number = next(self._numbers)
        self._open[number] = (worker, key)
        while len(self._open) > MAX_RELAYS:
            self._open.popitem(last=False)
        return number.to_bytes(8, "little")

    def take(self, ref: bytes) -> tuple[bytes, bytes] | None:
        if len(ref) != 8:
            return None
        return self._open.pop(int.from_bytes(ref, "little"), None)
