"""The broker's state as plain JSON, for fade-status, the dashboard and metrics.

::

    broker loop --snapshot(broker)--> dict --STATE--> fade-status
                \\--every PUBLISH_INTERVAL--> broker.published --> HTTP threads (fade/web.py)

Peers appear under short ids (:func:`fade.protocol.short_id`, hashes), never their
routing identities. The keys are described in docs/operating.md; tools may rely on them.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from fade import protocol as p
from fade._version import __version__

if TYPE_CHECKING:
    from fade.broker import Broker
    from fade.peers import Client, Worker

__all__ = ["snapshot"]


def snapshot(broker: Broker) -> dict[str, Any]:
    """A JSON-ready picture of the pool; O(workers + clients)."""
    now = time.monotonic()
    # Completions are counted at each upkeep, which may not have run since the last
    # ones: count them now, or the rate would lag what tasks_done says.
    broker.throughput.record(now, broker.tasks_done)
    sched = broker.scheduler
    running = sum(len(w.tasks) for w in sched.workers.values())
    counts = sched.counts
    state = {
        "broker_id": broker.broker_id,
        "version": __version__,
        "address": broker.address,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "uptime": now - broker.started,
        "heartbeat_interval": broker.interval,
        "workers": [
            _worker(w, now - broker.last_heard(w.identity, now)) for w in sched.workers.values()
        ],
        "clients": [_client(c, now, running) for c in sched.clients.values()],
        "queued": len(sched.tasks) - running,
        "running": running,
        "backlog": sum(c.backlog for c in sched.clients.values()),
        "tasks_done": counts.done,
        "tasks_failed": counts.failed,
        "tasks_lost": counts.lost,
        "capacity": sched.capacity,
        "rate": broker.throughput.rate(now),
        "per_second": broker.throughput.series(now),
        "relayed_bytes": dict(broker.relayed),
    }
    if broker.pair is not None:
        state["pair"] = _pair(broker, now)
    return state


def _pair(broker: Broker, now: float) -> dict[str, Any]:
    """Where this broker of a pair stands, and what it last heard of the other."""
    pair = broker.pair
    assert pair is not None
    peer = pair.peer
    peer_state = peer.state if peer is not None else "unknown"
    if pair.peer_lost:
        peer_state = "lost"
    return {
        "role": pair.role.value,
        "state": pair.state.value,
        "active": pair.serving,
        "term": pair.term,
        "takeovers": pair.takeovers,
        "in_state": now - pair.since,
        "peer_address": broker.peer_address,
        "peer_state": peer_state,
        "peer_heard": now - pair.peer_heard if peer is not None else None,
        "problem": pair.misconfigured,
    }


def _worker(worker: Worker, silent: float) -> dict[str, Any]:
    return {
        "id": p.short_id(worker.identity),
        "host": worker.hello.host,
        "pid": worker.hello.pid,
        "python": worker.kind.python,
        "platform": worker.kind.platform[0],
        "environments": worker.environments.get("environments", []),
        "package_cache": worker.environments.get("cache", {}),
        "state": "draining" if worker.draining else "busy" if worker.tasks else "idle",
        "label": worker.hello.label,
        "running": len(worker.tasks),
        "credits": worker.credits,
        "resources": worker.pool.totals if worker.pool is not None else {},
        "free": worker.pool.free if worker.pool is not None else {},
        "done": worker.done,
        "last_heard": silent,
    }


def _client(client: Client, now: float, running_total: int) -> dict[str, Any]:
    waiting = sum(
        1 for spec, heap in client.queues.items() if spec for _, _, task in heap if task.in_queue
    )
    return {
        "id": p.short_id(client.identity),
        "host": client.hello.host,
        "pid": client.hello.pid,
        "key": client.key_name,
        "tasks": len(client.tasks),
        "queued": client.queued,
        "running": client.running,
        "backlog": client.backlog,
        "weight": client.weight,
        "usage": client.usage(now),  # worker-seconds used while connected
        "share": client.running / running_total if running_total else 0.0,
        "waiting_for_resources": waiting,
    }
