"""The fair-share clock: the worker-seconds each client has used, kept as tasks start and end.

::

    Scheduler._assign ── start_clock(task, now): the client runs one more, from now
    Scheduler._unassign ─ stop_clock(task, clock): its time is charged to the client
    Scheduler._queue ─── rebase(client, clients, now): a client that was idle starts at
                         the lowest clock of the active ones
    Scheduler._serve_fairest: the waiting client with the lowest Client.clock goes first

A client's usage is ``charged + running * now - start_sum`` (fade/peers.py): the running
tasks counted up to now without touching each of them. Separate from fade/scheduler.py,
which decides what runs: these are the sums its fairness is read from, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fade.peers import Client, Task

__all__ = ["rebase", "start_clock", "stop_clock"]


def rebase(client: Client, clients: Iterable[Client], now: float) -> None:
    """A client that was idle starts at the lowest clock of the active clients: its
    share from now on, with no debt or credit from before."""
    active = [c for c in clients if c is not client and (c.queued or c.running)]
    if active:
        floor = min(c.usage(now) / c.weight for c in active)
        client.charged = max(client.charged, floor * client.weight)


def start_clock(task: Task, now: float) -> None:
    client = task.client
    task.started = now
    client.running += 1
    client.start_sum += now


def stop_clock(task: Task, clock: Callable[[], float]) -> None:
    if task.started is not None:
        client = task.client
        client.charged += clock() - task.started
        client.running -= 1
        client.start_sum -= task.started
        task.started = None
