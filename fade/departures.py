"""How peers leave the broker: what it logs and tells the scheduler, no sockets.

::

    DISCONNECT ---------------> leave ---------.
    silent past the expiry ---> expire ---------+--> Scheduler.remove_worker / remove_client
    OBITUARY (its supervisor) -> obituary ------'     (a lost worker's tasks are re-queued,
    a revoked key ------------> revoked (which)        or fail after max_attempts losses)

* A worker that says it leaves has its tasks re-queued; one that is *lost* (silent,
  or its process died) has them re-queued as suspects, and each it was the last
  chance of is logged as failed, with the worker and the reason.
* Separate from the poll loop (fade/broker.py) so that the handlers stay dispatch;
  the broker forgets a departed peer's clocks itself.
* Logs name peers as fade-status does: short id @ host : pid, escaped
  (:func:`peer_name`); never by routing identity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fade import protocol as p
from fade import security
from fade._logutil import printable
from fade.peers import Worker
from fade.scheduler import Scheduler

__all__ = ["expire", "leave", "lose_worker", "obituary", "peer_name", "revoked", "worker_name"]

log = logging.getLogger("fade.broker")


def leave(sched: Scheduler, identity: bytes) -> None:
    """A peer said DISCONNECT (or was disconnected): forget it, re-queue its tasks."""
    worker = sched.workers.get(identity)
    if worker is not None:
        held = len(worker.tasks)
        log.info("worker %s left; re-queueing the %d tasks it held", worker_name(worker), held)
        sched.remove_worker(identity)
    client = sched.clients.get(identity)
    if client is not None:
        sched.remove_client(identity)
        who = peer_name(identity, client.hello)
        log.info("client %s left; %d clients", who, len(sched.clients))


def expire(sched: Scheduler, identity: bytes, silent: float) -> None:
    """A peer silent for ``silent`` seconds, past the expiry: lose it."""
    worker = sched.workers.get(identity)
    if worker is not None:
        lose_worker(sched, worker, f"no heartbeat for {silent:.1f}s")
    client = sched.clients.get(identity)
    if client is not None:
        log.warning(
            "client %s lost (no heartbeat for %.1fs); dropping its %d tasks",
            peer_name(identity, client.hello),
            silent,
            len(client.tasks),
        )
        sched.remove_client(identity)


def obituary(sched: Scheduler, dead: bytes, info: dict[str, Any]) -> bool:
    """A supervisor says the worker ``dead``'s process exited; True if it was ours."""
    worker = sched.workers.get(dead)
    if worker is None:
        return False
    worker.exit.update({k: v for k, v in info.items() if k in ("exitcode", "signal")})
    lose_worker(sched, worker, f"its process exited ({_exit_text(info)})")
    return True


def lose_worker(sched: Scheduler, worker: Worker, reason: str) -> None:
    """Remove a worker that did not say it leaves; log the tasks that fail for it."""
    held = len(worker.tasks)
    doomed = sum(t.losses + 1 >= t.max_attempts for t in worker.tasks.values())
    log.warning(
        "worker %s lost (%s); re-queueing %d of the %d tasks it held",
        worker_name(worker),
        reason,
        held - doomed,
        held,
    )
    for task in sched.remove_worker(worker.identity, lost=reason):
        if task.losses >= task.max_attempts:
            log.error(
                "task %d of client %s failed: it lost its worker %d times, last %s (%s)",
                task.task_id,
                p.short_id(task.client.identity),
                task.losses,
                worker_name(worker),
                reason,
            )


def revoked(sched: Scheduler, peers: dict[bytes, security.Peer]) -> Iterator[bytes]:
    """The workers and clients whose keys are among ``peers`` (by key tag), each logged
    as it is yielded. A scan of all peers, but only when a key was revoked: rare."""
    tag = slice(1, 1 + security.TAG_SIZE)
    for identity in [*sched.workers, *sched.clients]:
        peer = peers.get(identity[tag])
        if peer is not None:
            log.warning(
                "dropping %s %s: key %r revoked", peer.role, p.short_id(identity), peer.name
            )
            yield identity


def worker_name(worker: Worker) -> str:
    return peer_name(worker.identity, worker.hello)


def peer_name(identity: bytes, hello: p.Hello) -> str:
    """How logs name a peer: short id @ host : pid (what fade-status shows), escaped."""
    return f"{p.short_id(identity)}@{printable(hello.host)}:{hello.pid}"


def _exit_text(info: dict[str, Any]) -> str:
    if info.get("signal"):
        return f"killed by signal {info['signal']}"
    return f"exit code {info.get('exitcode')}"
