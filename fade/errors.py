"""The exceptions fade raises, rooted at :class:`FadeError`.

::

    FadeError
     +-- BrokenPoolError         (also a concurrent.futures.BrokenExecutor)
     +-- ProtocolError           a peer sent bytes that are not fade's protocol
     |    +-- ProtocolVersionError  the broker speaks another version (also a BrokenPoolError)
     +-- SerializationError      something could not be pickled or unpickled
     |    +-- ResultDecodeError  a result or exception did not survive the trip back
     +-- WorkerLostError         a task's worker died too many times
     +-- TaskTimeoutError        a task ran past its time limit
     +-- IncompatibleWorkerError no connected worker can run the task (Python version...)
     +-- MessageTooLargeError    a frame over a peer's max_message_size
     +-- CodeShippingError       local code could not travel to a worker
     |    +-- MissingDependencyError  a worker lacks an installed package the task needs
     +-- NoWorkersError          no worker answered in time (also a TimeoutError)
     +-- RemoteTraceback         the __cause__ of a task's re-raised exception
     +-- BrokerUnreachableError  a status query got no answer in time
     +-- MissingExtraError       an optional feature's extra is not installed (an ImportError)

A task's own exception is never wrapped: ``result()`` raises the original type,
with a :class:`RemoteTraceback` holding the worker's traceback as ``__cause__``.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

__all__ = [
    "BrokenPoolError",
    "BrokerUnreachableError",
    "CodeShippingError",
    "FadeError",
    "IncompatibleWorkerError",
    "InsecureAddressError",
    "MessageTooLargeError",
    "MissingDependencyError",
    "MissingExtraError",
    "NoWorkersError",
    "ProtocolError",
    "ProtocolVersionError",
    "RemoteTraceback",
    "ResultDecodeError",
    "SecurityError",
    "SerializationError",
    "SharedDataError",
    "TaskTimeoutError",
    "WorkerLostError",
]


class FadeError(Exception):
    """Root of every error fade raises itself."""


class BrokenPoolError(FadeError, BrokenExecutor):
    """The pool cannot run tasks: the embedded broker or workers failed to start or died."""


class ProtocolError(FadeError):
    """A message did not follow fade's wire protocol; it is dropped, never trusted."""


class ProtocolVersionError(ProtocolError, BrokenPoolError):
    """The broker speaks another version of fade's protocol: use one fade version everywhere."""


class SerializationError(FadeError):
    """A function, argument, result or exception could not be pickled or unpickled."""


class ResultDecodeError(SerializationError):
    """The worker's result or exception could not be pickled there or rebuilt here."""


class WorkerLostError(FadeError):
    """The task's worker died (crash, kill, lost heartbeats) on every allowed attempt."""


class TaskTimeoutError(FadeError):
    """The task ran longer than its ``task_timeout``; its worker process was replaced."""


class CodeShippingError(FadeError):
    """The client's local code could not be shipped to, or set up on, a worker."""


class MissingDependencyError(CodeShippingError, ModuleNotFoundError):
    """A worker cannot import an installed package the task needs; install it there."""

    def __init__(self, message: str, *, module: str = "", host: str = "") -> None:
        super().__init__(message)
        self.name = module
        self.module = module
        self.host = host

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_missing, (str(self), self.module, self.host))


def _rebuild_missing(message: str, module: str, host: str) -> MissingDependencyError:
    return MissingDependencyError(message, module=module, host=host)


class SharedDataError(FadeError):
    """Argument data that travels by content id could not reach the worker, or did not
    match its id; the message says which and why."""


class IncompatibleWorkerError(FadeError):
    """No connected worker can run the task (another Python version, or none serves this
    client): the message names both sides."""


class MessageTooLargeError(FadeError):
    """A task or result frame exceeds ``max_message_size``; raise the limit on every peer."""


class SecurityError(FadeError):
    """A key file or key folder is missing, malformed, or meant for another role."""


class InsecureAddressError(SecurityError):
    """A broker was asked to listen on a network address without keys; it refuses."""


class RemoteTraceback(FadeError):
    """Carries the formatted traceback of an exception raised on a worker.

    ``frames`` lists its frames as (file, line number, function, source line), with
    the client's own file names for the code it shipped (empty if the worker sent
    text only).
    """

    def __init__(self, tb: str, frames: tuple[tuple[str, int, str, str], ...] = ()) -> None:
        super().__init__(tb)
        self.tb = tb
        self.frames = frames

    def __str__(self) -> str:
        return self.tb

    def __reduce__(self) -> tuple[object, ...]:
        return (RemoteTraceback, (self.tb, self.frames))


class NoWorkersError(FadeError, TimeoutError):
    """No worker answered within the wait: start ``fade-worker`` processes or wait longer."""


class BrokerUnreachableError(FadeError):
    """The broker did not answer in time: not running, not at that address, unreachable,
    or refusing our keys; the message names the address and the likely cause."""


class MissingExtraError(FadeError, ImportError):
    """An optional feature needs a library that is not installed; the message names the extra."""
