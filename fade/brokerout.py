"""The broker's outgoing direction: every frame it sends leaves through one :class:`Outbox`.

::

    Scheduler.take_sends() --> Outbox.flush --> STOP, TASK batches ---------> workers
                                          \\--> RESULT batches, NOTICE -----> clients
    handlers (WELCOME, RESET, ERROR, ...) --> Outbox.send --> the ROUTER socket,
                                                          or a client in this process

* Separate from the poll loop (fade/broker.py) so that the loop reads as dispatch:
  the scheduler decides, this module encodes what it decided, in one place per
  direction, and counts the payload bytes relayed (fade-status shows them).
* Batches are cut to each receiver's frame limit (said in its HELLO).
* A client in this very process (the embedded pool, fade/locallink.py) is handed
  its frames, and its results as records, without a socket.
* Each send on the socket is reported to ``told`` (the broker's heartbeat clocks):
  a peer told something needs no heartbeat for an interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from fade import protocol as p
from fade.data import scope_of
from fade.peers import Task
from fade.scheduler import Scheduler
from fade.sockets import send_frames

__all__ = ["LocalResults", "Outbox"]

log = logging.getLogger("fade.broker")

#: How a client in this process takes its results: (capacity, records).
LocalResults = Callable[[int, list[tuple[p.ResultRecord, p.Payload]]], None]


class Outbox:
    """Sends for the broker: on ``socket`` (set once bound), or to local clients."""

    def __init__(self, told: Callable[[bytes, float], None]) -> None:
        #: The ROUTER, once bound.
        self.socket: zmq.Socket[bytes] | None = None
        #: Payload bytes this broker sent on: to workers in TASK, to clients in RESULT,
        #: and relayed in CODE (shipped code and data fetched by content).
        self.relayed = {"task": 0, "result": 0, "code": 0}
        self._told = told
        self._local: dict[bytes, Callable[[list[p.Frame]], None]] = {}
        self._local_results: dict[bytes, LocalResults] = {}

    def attach_local(
        self, identity: bytes, deliver: Callable[[list[p.Frame]], None], results: LocalResults
    ) -> None:
        """Hand what goes to ``identity`` to ``deliver``, its results to ``results``."""
        self._local[identity] = deliver
        self._local_results[identity] = results

    def send(self, identity: bytes, frames: list[p.Frame]) -> None:
        local = self._local.get(identity) if self._local else None
        if local is not None:
            local(frames)
            return
        sock = self.socket
        assert sock is not None
        try:
            send_frames(sock, [identity, *frames])
        except zmq.ZMQError as exc:
            log.debug("could not send to %s: %s", p.short_id(identity), exc)
        self._told(identity, time.monotonic())

    def connected(self, identity: bytes) -> bool:
        """Whether the peer still has a connection here: a HEARTBEAT sent so that ZeroMQ
        says if it has none (ROUTER_MANDATORY, for this one send). The kernel closes the
        sockets of a process that ends, and TCP keepalive and TCP_MAXRT (fade/sockets.py)
        a connection whose host vanished; a process whose threads cannot run (its code
        holds the GIL) or that is stopped keeps its connection. A local client is
        connected for as long as it is attached."""
        if identity in self._local:
            return True
        sock = self.socket
        assert sock is not None
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            send_frames(sock, [identity, *p.encode(p.Command.HEARTBEAT)])
        except zmq.ZMQError:  # EHOSTUNREACH: no connection for this identity
            return False
        finally:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._told(identity, time.monotonic())
        return True

    def flush(self, sched: Scheduler) -> None:
        """Send what the scheduler decided: STOPs and TASK batches to workers, RESULT
        batches and NOTICEs to clients, the capacity."""
        if not sched.has_sends():
            return
        sends = sched.take_sends()
        for identity, keys in sends.stops.items():
            self.send(identity, p.encode_stop(keys))
        for identity, tasks in sends.tasks.items():
            self._send_tasks(sched, identity, tasks)
        for identity, notices in sends.notices.items():
            for message, task_ids in notices:
                self.send(identity, p.encode_notice(message, task_ids))
        capacity = sched.capacity
        for identity, results in sends.results.items():
            local = self._local_results.get(identity) if self._local_results else None
            if local is not None:
                local(capacity, results)
                continue
            limit = _batch_limit(sched.clients.get(identity))
            for batch in p.chunked(results, limit):
                frames = p.encode_result(capacity, batch)
                self.relayed["result"] += _size(frames)
                self.send(identity, frames)
        if sends.capacity_changed:
            beat = p.encode_capacity(p.Command.HEARTBEAT, capacity)
            for identity in sched.clients:
                self.send(identity, beat)

    def _send_tasks(self, sched: Scheduler, identity: bytes, tasks: list[Task]) -> None:
        records = []
        owner, scope = None, p.NO_SCOPE
        for task in tasks:
            if task.client is not owner:  # a batch's tasks are mostly one client's
                owner = task.client
                scope = scope_of(owner.key_name, owner.hello.tag)
            records.append(
                (p.TaskRecord(task.key, task.timeout, task.devices, scope), task.payload)
            )
        limit = _batch_limit(sched.workers.get(identity))
        for batch in p.chunked(records, limit):
            frames = p.encode_task(batch)
            self.relayed["task"] += _size(frames)
            self.send(identity, frames)

    def heartbeats(self, sched: Scheduler, due: list[bytes]) -> None:
        """HEARTBEAT to the peers told nothing for an interval; clients' say the capacity."""
        capacity = p.encode_capacity(p.Command.HEARTBEAT, sched.capacity)
        plain = p.encode(p.Command.HEARTBEAT)
        for identity in due:
            self.send(identity, capacity if identity in sched.clients else plain)


def _size(frames: list[p.Frame]) -> int:
    """Bytes in a batch (its first frame is bytes; buffers follow, if any)."""
    total = len(frames[0])
    for frame in frames[1:]:
        total += p.frame_size(frame)
    return total


def _batch_limit(peer: Any) -> int:
    """The most bytes a batch's first frame may carry to this peer."""
    limit = peer.hello.max_message_size if peer is not None else 0
    return min(limit, p.BATCH_BYTES) if limit else p.BATCH_BYTES
