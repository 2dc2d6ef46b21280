"""Lifecycles as data: each state machine is an enum and a table of legal moves.

::

    task (broker)          QUEUED --assign--> RUNNING --result--> DONE | FAILED
                             ^  |                |  \\--lost too often--> LOST
                             |  |                |   \\--its client left--> DROPPED
                             |  +--refused-------+--> FAILED (the broker refused it)
                             +----handed back / lost------+
                           QUEUED --its client left--> DROPPED

    worker process         SERVING --signal / retire--> DRAINING --nothing held--> LEAVING
                              \\------second signal / timeout / broker gone-----> LEAVING

One function, :func:`move`, applies a table to a record and raises
:class:`IllegalTransition` on a move the table does not list, in the manner of
h11's ``_state.py``. The tables are unit-tested without any I/O
(``tests/test_scheduler_lifecycle.py``).
"""

from __future__ import annotations

import enum
from typing import Protocol, TypeVar

__all__ = [
    "FINAL_TASK_STATES",
    "PROCESS_MOVES",
    "TASK_MOVES",
    "IllegalTransition",
    "ProcessState",
    "TaskState",
    "move",
]


class TaskState(enum.Enum):
    """Where a task stands in the broker."""

    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # handed to a worker, no answer yet
    DONE = "done"  # returned a value
    FAILED = "failed"  # raised, or was refused by the broker (too large, incompatible...)
    LOST = "lost"  # lost its worker max_attempts times
    DROPPED = "dropped"  # its client left before it finished


class ProcessState(enum.Enum):
    """Where a worker process stands in its own life."""

    SERVING = "serving"  # takes tasks
    DRAINING = "draining"  # takes no more, finishes the running one, hands back the rest
    LEAVING = "leaving"  # owes the broker nothing more: disconnect and exit


TASK_MOVES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.FAILED, TaskState.DROPPED}),
    TaskState.RUNNING: frozenset(
        {
            TaskState.QUEUED,
            TaskState.DONE,
            TaskState.FAILED,
            TaskState.LOST,
            TaskState.DROPPED,
        }
    ),
    TaskState.DONE: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.LOST: frozenset(),
    TaskState.DROPPED: frozenset(),
}

FINAL_TASK_STATES = frozenset(state for state, moves in TASK_MOVES.items() if not moves)

PROCESS_MOVES: dict[ProcessState, frozenset[ProcessState]] = {
    ProcessState.SERVING: frozenset({ProcessState.DRAINING, ProcessState.LEAVING}),
    ProcessState.DRAINING: frozenset({ProcessState.LEAVING}),
    ProcessState.LEAVING: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A record was asked to make a move its lifecycle table does not allow: a bug."""


S = TypeVar("S", bound=enum.Enum)


class _Stateful(Protocol[S]):
    state: S


def move(record: _Stateful[S], new: S, table: dict[S, frozenset[S]]) -> None:
    """Set ``record.state`` to ``new`` if ``table`` allows it; raise IllegalTransition if not."""
    old = record.state
    if new not in table[old]:
        raise IllegalTransition(f"{type(record).__name__}: {old.name} -> {new.name} is not allowed")
    record.state = new
