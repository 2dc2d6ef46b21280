"""The tasks workers hold across a broker restart, before their clients re-send them.

::

    worker HELLO(holding=[keys]) ── remember: key -> worker, for keys unknown here
    worker DONE for such a key ──── keep: its result, kept for the client's copy
    client SUBMIT (re-sent) ─────── take_result: complete it at once, or
                                    take_holder: the task is that worker's again
    every few expiries ──────────── age: results no client re-sent for two ages go

Separate from fade/scheduler.py, which decides what runs where: this is the bookkeeping
a fresh broker (restarted, or a pair's standby taking over) needs so that no task runs
twice and no result is lost, and nothing else. Plain data, no sockets.
"""

from __future__ import annotations

from collections.abc import Container

from fade import protocol as p
from fade.peers import Worker

__all__ = ["MAX_ORPHANS", "Holdings"]

#: Results kept for tasks not re-sent yet (see age), at most; the oldest go first.
MAX_ORPHANS = 65536


class Holdings:
    """Keys workers hold that no client has sent here yet, and results kept for them."""

    def __init__(self) -> None:
        self.held: dict[bytes, Worker] = {}  # keys held by workers, not yet submitted here
        # Results for held keys not submitted yet: this age's, and the one before.
        self.orphans: dict[bytes, tuple[p.Status, p.Payload]] = {}
        self.old_orphans: dict[bytes, tuple[p.Status, p.Payload]] = {}

    def remember(self, worker: Worker, holding: tuple[bytes, ...], known: Container[bytes]) -> None:
        """Keys a worker holds that are unknown here (this broker is new): when their
        client re-sends them, they are the worker's again instead of running twice."""
        for key in holding:
            if key not in known:
                self.held[key] = worker

    def forget(self, worker: Worker) -> None:
        if self.held:
            for key in [k for k, w in self.held.items() if w is worker]:
                del self.held[key]

    def keep(self, worker: Worker, record: p.DoneRecord, payload: p.Payload) -> None:
        """A result for a task this worker told us it holds, whose client has not re-sent
        it yet: keep it for the client's copy (a handed-back or declined task is just
        forgotten)."""
        if self.held.get(record.key) is not worker:
            return
        del self.held[record.key]
        if record.status is p.Status.RETURNED or record.status is p.Status.DECLINED:
            return  # not an outcome: the task runs again once its client re-sends it
        while len(self.orphans) >= MAX_ORPHANS:
            del self.orphans[next(iter(self.orphans))]
        self.orphans[record.key] = (record.status, payload)

    def holder(self, key: bytes) -> Worker | None:
        """The worker that said it holds this task, which is not here yet (a fresh broker)."""
        return self.held.get(key)

    def age(self) -> None:
        """Forget the results kept for tasks no client re-sent since the call before the
        last (the broker calls this every few expiries: clients re-send at once)."""
        self.old_orphans, self.orphans = self.orphans, {}

    def take_result(self, key: bytes) -> tuple[p.Status, p.Payload] | None:
        """The result a worker already sent for this re-sent task, if any (forgotten here)."""
        if self.orphans or self.old_orphans:
            return self.orphans.pop(key, None) or self.old_orphans.pop(key, None)
        return None

    def take_holder(self, key: bytes) -> Worker | None:
        """The worker that holds this re-sent task, if one said so (forgotten here)."""
        return self.held.pop(key, None) if self.held else None
