"""fade's errors that are also ``concurrent.futures.process.BrokenProcessPool``.

Part of fade.errors, which names them (``fade.errors.WorkerLostError`` is this class):
they live here because ``concurrent.futures.process`` imports ``multiprocessing``, which
a worker or a client that never meets them need not pay for at start.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

from fade.errors import FadeError, SerializationError

__all__ = ["ResultDecodeError", "TaskDecodeError", "WorkerLostError"]


class ResultDecodeError(SerializationError, BrokenProcessPool):
    """The worker's result or exception could not be pickled there or rebuilt here.

    Also a ``BrokenProcessPool``, which ``ProcessPoolExecutor`` raises when it cannot
    unpickle a result; only this future fails, the pool goes on."""


class TaskDecodeError(SerializationError, BrokenProcessPool):
    """A worker could not unpickle the task's function or arguments (the cause says why).

    Also a ``BrokenProcessPool``: a standard pool's worker dies there; only this future
    fails, the pool goes on."""


class WorkerLostError(FadeError, BrokenProcessPool):
    """The task's worker died (crash, kill, lost heartbeats) on every allowed attempt.

    Also a ``BrokenProcessPool``, as ``ProcessPoolExecutor`` reports a worker's death;
    only this future fails, the pool goes on."""


# Named and pickled as fade.errors' own (fade.errors.__getattr__ hands them out).
for _error in (ResultDecodeError, TaskDecodeError, WorkerLostError):
    _error.__module__ = "fade.errors"
del _error
