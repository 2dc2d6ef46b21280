"""What waits on the client to be sent, and how it is packed into SUBMITs.

::

    Executor.submit --WorkItem--> Outbox --(ClientIO._send_tasks: room in the window)--> SUBMIT
                                  highest priority first,       submit_record: the wire's
                                  then in submission order      record, no Future

* A ``WorkItem`` is the local record: it holds the Future and stays home; only its
  payload and ``submit_record`` travel (as CPython's ``_WorkItem``/``_CallItem``).
* ``Outbox`` costs a deque's O(1) for tasks of the default priority (most), a heap's
  O(log n) for the others.
* ``batches`` packs tasks into SUBMITs of at most MAX_BATCH tasks and the bytes every
  peer accepts in one frame.

Separate from fade/clientio.py, which decides *when* to send (the window, the
broker's capacity); this is *what* is sent, with no socket or thread.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fade import protocol as p
from fade.clientoptions import DEFAULT_OPTIONS, TaskOptions

__all__ = ["MAX_BATCH", "Outbox", "WorkItem", "batches", "submit_record"]

#: At most this many tasks travel in one SUBMIT message (and p.BATCH_BYTES of inline data).
MAX_BATCH = 512


@dataclass(slots=True, eq=False)
class WorkItem:
    """A submitted task as the client keeps it: it has the Future; only its payload travels."""

    task_id: int
    future: cf.Future[Any]
    payload: p.Payload
    largest: int = 0  # bytes in its largest frame (p.largest_part)
    options: TaskOptions = DEFAULT_OPTIONS
    started: bool = False  # marked running while still in the outbox (ClientIO.enqueue)
    flags: int = 0  # SUBMIT flags (p.SUBMIT_NATIVE)


class Outbox:
    """Tasks waiting here to be sent, highest priority first, then in submission order.
    Tasks of the default priority 0 (most) cost a deque's O(1); others a heap's O(log n)."""

    __slots__ = ("_plain", "_ranked")

    def __init__(self) -> None:
        self._plain: collections.deque[WorkItem] = collections.deque()
        self._ranked: list[tuple[int, int, WorkItem]] = []

    def append(self, item: WorkItem) -> None:
        priority = item.options.priority
        if priority:
            heapq.heappush(self._ranked, (-priority, item.task_id, item))
        else:
            self._plain.append(item)

    def _ranked_first(self) -> bool:
        if not self._ranked:
            return False
        if not self._plain:
            return True
        priority, task_id, _ = self._ranked[0]
        return (priority, task_id) < (0, self._plain[0].task_id)

    def peek(self) -> WorkItem:
        return self._ranked[0][2] if self._ranked_first() else self._plain[0]

    def popleft(self) -> WorkItem:
        return heapq.heappop(self._ranked)[2] if self._ranked_first() else self._plain.popleft()

    def remove(self, item: WorkItem) -> bool:
        if item in self._plain:
            self._plain.remove(item)
            return True
        for entry in self._ranked:
            if entry[2] is item:
                self._ranked.remove(entry)
                heapq.heapify(self._ranked)
                return True
        return False

    def clear(self) -> None:
        self._plain.clear()
        self._ranked.clear()

    def drop(self, unwanted: Callable[[WorkItem], bool]) -> list[WorkItem]:
        """Take out every item ``unwanted`` says, in one pass (the others keep their order)."""
        dropped = [item for item in self._plain if unwanted(item)]
        if dropped:
            self._plain = collections.deque(item for item in self._plain if not unwanted(item))
        ranked = [entry for entry in self._ranked if unwanted(entry[2])]
        if ranked:
            self._ranked = [entry for entry in self._ranked if not unwanted(entry[2])]
            heapq.heapify(self._ranked)
            dropped += [entry[2] for entry in ranked]
        return dropped

    def __iter__(self) -> Iterator[WorkItem]:
        yield from self._plain
        yield from (entry[2] for entry in self._ranked)

    def __len__(self) -> int:
        return len(self._plain) + len(self._ranked)


def submit_record(item: WorkItem, max_attempts: int, timeout: float) -> p.SubmitRecord:
    """The wire's record of ``item``; its options over the executor's ``max_attempts``
    and ``timeout`` (0: none)."""
    options = item.options
    if options is DEFAULT_OPTIONS:
        return p.SubmitRecord(item.task_id, max_attempts, timeout, flags=item.flags)
    timeout = options.task_timeout if options.task_timeout is not None else timeout
    attempts = options.max_attempts or max_attempts
    return p.SubmitRecord(
        item.task_id, attempts, timeout, options.priority, options.resources, item.flags
    )


def batches(items: Iterable[WorkItem], batch_bytes: int) -> Iterator[list[WorkItem]]:
    """``items`` in order, in SUBMITs of at most MAX_BATCH tasks whose inline bytes (each
    plus p.HEAD_ROOM) fit in ``batch_bytes``; a task over it alone goes on its own."""
    batch: list[WorkItem] = []
    size = 0
    for item in items:
        inline = len(item.payload.inline) + p.HEAD_ROOM
        if batch and (len(batch) == MAX_BATCH or size + inline > batch_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += inline
    if batch:
        yield batch
