"""The exceptions fade raises, rooted at :class:`FadeError`.

::

    FadeError
     +-- BrokenPoolError         (also a concurrent.futures.BrokenExecutor)
     |    +-- InitializerError   the executor's initializer raised on a worker
     +-- ProtocolError           a peer sent bytes that are not fade's protocol
     |    +-- ProtocolVersionError  the broker speaks another version (also a BrokenPoolError)
     +-- SerializationError      something could not be pickled or unpickled (a PicklingError)
     |    +-- ResultDecodeError  a result or exception did not survive the trip back (*)
     |    +-- TaskDecodeError    a worker could not unpickle a task's function or arguments (*)
     +-- WorkerLostError         a task's worker died too many times (*)
     +-- TaskTimeoutError        a task ran past its time limit
     +-- TaskTerminatedError     a task was stopped on request (Executor.terminate)
     +-- QuotaExceededError      the broker holds as many of this client's tasks as it allows
     +-- IncompatibleWorkerError no connected worker can run the task (Python version...)
     +-- MessageTooLargeError    a frame over a peer's max_message_size
     +-- CodeShippingError       local code could not travel to a worker
     |    +-- MissingDependencyError  a worker lacks an installed package the task needs
     |    +-- PackageShippingError    an installed package could not travel or load there
     +-- NoWorkersError          no worker answered in time (also a TimeoutError)
     +-- RemoteTraceback         the __cause__ of a task's re-raised exception
     +-- BrokerUnreachableError  the broker cannot be reached (never answered, or gone)
     +-- MissingExtraError       an optional feature's extra is not installed (an ImportError)

    LargeFunctionWarning         (a UserWarning) a function pickled by value is large

A task's own exception is never wrapped: ``result()`` raises the original type,
with a :class:`RemoteTraceback` holding the worker's traceback as ``__cause__``.

Code written for the standard library's pools catches what fade raises where
``ProcessPoolExecutor`` would raise: what cannot be pickled is a
``pickle.PicklingError``, a failed initializer a ``BrokenExecutor``, and the
errors marked (*) are also ``concurrent.futures.process.BrokenProcessPool``,
which the standard pool raises when a worker dies, cannot unpickle a task, or
its result cannot be unpickled. fade fails only the future concerned: unlike
``ProcessPoolExecutor``, its pool goes on working (a failed initializer alone
breaks the executor, as in the standard library).
"""

from __future__ import annotations

import pickle
from concurrent.futures import BrokenExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fade._brokenpool import ResultDecodeError, TaskDecodeError, WorkerLostError

__all__ = [
    "BrokenPoolError",
    "BrokerUnreachableError",
    "CodeShippingError",
    "FadeError",
    "IncompatibleWorkerError",
    "InitializerError",
    "InsecureAddressError",
    "LargeFunctionWarning",
    "MessageTooLargeError",
    "MissingDependencyError",
    "MissingExtraError",
    "NoWorkersError",
    "PackageShippingError",
    "ProtocolError",
    "ProtocolVersionError",
    "QuotaExceededError",
    "RemoteTraceback",
    "ResultDecodeError",
    "SecurityError",
    "SerializationError",
    "SharedDataError",
    "TaskDecodeError",
    "TaskTerminatedError",
    "TaskTimeoutError",
    "WorkerLostError",
]


class FadeError(Exception):
    """Root of every error fade raises itself."""


class BrokenPoolError(FadeError, BrokenExecutor):
    """The pool cannot run tasks: the embedded broker or workers failed to start or died."""


class InitializerError(BrokenPoolError):
    """The executor's ``initializer`` raised on a worker: the executor is broken (its cause
    holds the worker's traceback), as a standard pool is when its initializer fails."""


class ProtocolError(FadeError):
    """A message did not follow fade's wire protocol; it is dropped, never trusted."""


class ProtocolVersionError(ProtocolError, BrokenPoolError):
    """The broker speaks another version of fade's protocol: use one fade version everywhere."""


class SerializationError(FadeError, pickle.PicklingError):
    """A function, argument, result or exception could not be pickled or unpickled.

    Also a ``pickle.PicklingError``: what code written for the standard pools catches."""


class TaskTimeoutError(FadeError):
    """The task ran longer than its ``task_timeout``; its worker process was replaced."""


class TaskTerminatedError(FadeError):
    """The task was stopped on request (``Executor.terminate``, or ``shutdown`` with
    ``terminate=True``) before it finished."""


class QuotaExceededError(FadeError):
    """The broker holds as many of this client's tasks as it allows (its
    ``--max-client-tasks`` and ``--max-client-bytes``): wait for results, then submit more."""


class CodeShippingError(FadeError):
    """The client's local code could not be shipped to, or set up on, a worker."""


class MissingDependencyError(CodeShippingError, ModuleNotFoundError):
    """A worker cannot import an installed package the task needs; install it there.
    ``distribution`` names it when the worker knew which one (the message then says all)."""

    def __init__(
        self, message: str, *, module: str = "", host: str = "", distribution: str = ""
    ) -> None:
        super().__init__(message)
        self.name = module
        self.module = module
        self.host = host
        self.distribution = distribution

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_missing, (str(self), self.module, self.host, self.distribution))

    @classmethod
    def on_host(cls, exc: ModuleNotFoundError, host: str) -> BaseException:
        """A worker's failed import, naming the module and this host (the client adds the
        distribution it has it from); ``exc`` itself if it says no more than that."""
        if isinstance(exc, MissingDependencyError) or not exc.name:
            return exc
        import os

        error = cls(
            f"worker pid {os.getpid()} on host {host} cannot import {exc.name!r}",
            module=exc.name,
            host=host,
        )
        error.__cause__ = exc
        return error


def _rebuild_missing(
    message: str, module: str, host: str, distribution: str = ""
) -> MissingDependencyError:
    return MissingDependencyError(message, module=module, host=host, distribution=distribution)


class PackageShippingError(CodeShippingError):
    """An installed distribution the task needs could not travel to a worker, or does not
    load there (it records the client's paths, or needs a system library the worker
    lacks): the message names it and what is missing."""


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


class LargeFunctionWarning(UserWarning):
    """A task's function, pickled by value with what it refers to, is large: every task
    carries it again (fade/serialization.py names what makes it large)."""


#: The errors that are also ``BrokenProcessPool`` live in fade/_brokenpool.py: its module,
#: ``concurrent.futures.process``, imports ``multiprocessing`` (10-15 ms of every worker's
#: start and of ``import fade``), so they are imported the first time they are named.
_BROKEN_POOL_ERRORS = frozenset({"ResultDecodeError", "TaskDecodeError", "WorkerLostError"})


def __getattr__(name: str) -> type[FadeError]:
    if name in _BROKEN_POOL_ERRORS:
        from fade import _brokenpool

        error: type[FadeError] = getattr(_brokenpool, name)
        return error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
