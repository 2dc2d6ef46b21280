"""Per-executor set-up on shared workers: ``initializer``, ``initargs``, ``max_tasks_per_child``.

::

    client  Executor(initializer=f, initargs=a, max_tasks_per_child=n)
              └─ serialization.dumps_setup: executor id | n | pickle((f, a)), in every task
    worker  before a task:  Setups.before(payload)
              the first task of that executor this process runs: f(*a), once; if it
              raises, that task and every later one of that executor here fail with
              InitializerError (the worker itself serves other executors as before)
            after a task:   Setups.after(payload) -> True once this process has run n
              tasks of that executor: it drains (hands back what it holds, sends the
              result) and exits with EXIT_RETIRED; its supervisor starts a fresh one
    client  an InitializerError breaks the executor, as in the standard library:
              report_failure logs the worker's traceback on the "concurrent.futures"
              logger; pending futures fail and later submits raise

fade's workers are shared: a worker process runs the tasks of every executor
connected to its broker. So "once per worker process" means once per process and
executor, and the task limit counts only that executor's tasks. What an
initializer does to a process (globals, caches) is seen by the other executors'
tasks in it too.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import OrderedDict
from dataclasses import dataclass

from fade import serialization as ser
from fade.errors import InitializerError, SerializationError
from fade.protocol import Payload

__all__ = ["EXIT_RETIRED", "Setups", "report_failure"]

log = logging.getLogger("fade.worker")

#: Exit status of a worker process that retired after max_tasks_per_child tasks: its
#: supervisor replaces it at once, with no obituary and no back-off.
EXIT_RETIRED = 76
#: Executors a worker process remembers; one forgotten and seen again is set up again.
REMEMBERED = 4096


@dataclass(slots=True)
class _Executor:
    """What one worker process knows of one executor."""

    failure: BaseException | None = None  # what its initializer raised here
    tasks: int = 0


class Setups:
    """The worker side: runs each executor's initializer once, counts its tasks."""

    def __init__(self) -> None:
        self._executors: OrderedDict[bytes, _Executor] = OrderedDict()

    def before(self, payload: Payload) -> None:
        """Run the task's executor's initializer if this process has not yet; raises
        InitializerError if it failed (now or before). Call once the task's code is active."""
        setup = ser.executor_setup(payload)
        if setup is None:
            return
        known = self._executors.get(setup.executor_id)
        if known is None:
            known = self._remember(setup.executor_id)
            if setup.initializer:
                known.failure = _initialize(setup.initializer)
        else:
            self._executors.move_to_end(setup.executor_id)
        if known.failure is not None:
            failure = known.failure
            raise InitializerError(
                f"the executor's initializer raised {type(failure).__name__}: {failure} "
                f"(worker pid {os.getpid()} on {socket.gethostname()}); the executor is broken"
            ) from failure

    def after(self, payload: Payload) -> bool:
        """Count a task that ran; True when this process must now retire. Never raises (a
        malformed payload has already failed its task)."""
        try:
            setup = ser.executor_setup(payload)
        except SerializationError:
            return False
        if setup is None or not setup.max_tasks:
            return False
        known = self._executors.get(setup.executor_id) or self._remember(setup.executor_id)
        known.tasks += 1
        return known.tasks >= setup.max_tasks

    def _remember(self, executor_id: bytes) -> _Executor:
        known = self._executors[executor_id] = _Executor()
        if len(self._executors) > REMEMBERED:
            self._executors.popitem(last=False)
        return known


def _initialize(pickled: bytes) -> BaseException | None:
    """Run an initializer; what it raised (unpickling it included), or None."""
    try:
        initializer, initargs = ser.loads_initializer(pickled)
        initializer(*initargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: the task must fail, not the worker
        log.error("an executor's initializer failed", exc_info=True)
        return exc
    return None


_stdlib_log = logging.getLogger("concurrent.futures")


def report_failure(error: InitializerError) -> None:
    """Client side: say that the initializer failed where the standard pools say it, on
    the "concurrent.futures" logger at CRITICAL, with the worker's traceback."""
    remote = error.__cause__
    _stdlib_log.critical("Exception in initializer:%s", remote if remote is not None else error)
