"""The exceptions fade raises, rooted at :class:`FadeError`.

::

    FadeError
     +-- BrokenPoolError         (also a concurrent.futures.BrokenExecutor)
     +-- ProtocolError           a peer sent bytes that are not fade's protocol
     +-- SerializationError      something could not be pickled or unpickled
     |    +-- ResultDecodeError  a result or exception did not survive the trip back
     +-- WorkerLostError         a task's worker died too many times
     +-- TaskTimeoutError        a task ran past its time limit
     +-- RemoteTraceback         the __cause__ of a task's re-raised exception

A task's own exception is never wrapped: ``result()`` raises the original type,
with a :class:`RemoteTraceback` holding the worker's traceback as ``__cause__``.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

__all__ = [
    "BrokenPoolError",
    "FadeError",
    "InsecureAddressError",
    "MessageTooLargeError",
    "ProtocolError",
    "RemoteTraceback",
    "ResultDecodeError",
    "SecurityError",
    "SerializationError",
    "TaskTimeoutError",
    "WorkerLostError",
]


class FadeError(Exception):
    """Root of every error fade raises itself."""


class BrokenPoolError(FadeError, BrokenExecutor):
    """The pool cannot run tasks: the embedded broker or workers failed to start or died."""


class ProtocolError(FadeError):
    """A message did not follow fade's wire protocol; it is dropped, never trusted."""


class SerializationError(FadeError):
    """A function, argument, result or exception could not be pickled or unpickled."""


class ResultDecodeError(SerializationError):
    """The worker's result or exception could not be pickled there or rebuilt here."""


class WorkerLostError(FadeError):
    """The task's worker died (crash, kill, lost heartbeats) on every allowed attempt."""


class TaskTimeoutError(FadeError):
    """The task ran longer than its ``task_timeout``; its worker process was replaced."""


class MessageTooLargeError(FadeError):
    """A task or result frame exceeds ``max_message_size``; raise the limit on every peer."""


class SecurityError(FadeError):
    """A key file or key folder is missing, malformed, or meant for another role."""


class InsecureAddressError(SecurityError):
    """A broker was asked to listen on a network address without keys; it refuses."""


class RemoteTraceback(FadeError):
    """Carries the formatted traceback of an exception raised on a worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
