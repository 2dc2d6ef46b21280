"""fade: run Python functions on many cores and many machines.

``fade.Executor`` is a drop-in ``concurrent.futures.Executor`` backed by a
ZeroMQ brokered workpool::

    import fade
    with fade.Executor() as ex:                   # embedded: broker + one worker per core
        print(list(ex.map(abs, range(-5, 5))))
    with fade.Executor("tcp://head:5555") as ex:  # a running pool (fade-broker, fade-worker)
        fut = ex.submit(pow, 2, 10)
    with fade.Executor("tcp://head:5555", keys="alice.key") as ex:  # with keys (fade-keys)
        fut = ex.submit(pow, 2, 10)
"""

from typing import TYPE_CHECKING, Any

from fade._version import __version__
from fade.errors import (
    BrokenPoolError,
    BrokerUnreachableError,
    CodeShippingError,
    FadeError,
    IncompatibleWorkerError,
    InitializerError,
    InsecureAddressError,
    LargeFunctionWarning,
    MessageTooLargeError,
    MissingDependencyError,
    MissingExtraError,
    NoWorkersError,
    PackageShippingError,
    ProtocolError,
    ProtocolVersionError,
    QuotaExceededError,
    RemoteTraceback,
    SecurityError,
    SerializationError,
    SharedDataError,
    TaskTerminatedError,
    TaskTimeoutError,
)
from fade.shipping import install_import_hook

if TYPE_CHECKING:
    from fade._brokenpool import ResultDecodeError, TaskDecodeError, WorkerLostError
    from fade.client import Executor
    from fade.data import Shared, share
    from fade.progress import as_completed

# Record the source of local modules imported from now on, so that what the
# workers run is what this process runs (see fade/shipping.py).
install_import_hook()


def __getattr__(name: str) -> Any:
    # The client is imported on first use: worker and broker processes, which
    # import this package too, start faster without it.
    if name == "Executor":
        from fade.client import Executor

        return Executor
    if name in ("ResultDecodeError", "TaskDecodeError", "WorkerLostError"):
        from fade import errors  # they import multiprocessing: see fade/errors.py

        return getattr(errors, name)
    if name in ("share", "Shared"):
        from fade import data

        return getattr(data, name)
    if name == "as_completed":
        from fade.progress import as_completed

        return as_completed
    raise AttributeError(f"module 'fade' has no attribute {name!r}")


__all__ = [
    "BrokenPoolError",
    "BrokerUnreachableError",
    "CodeShippingError",
    "Executor",
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
    "Shared",
    "SharedDataError",
    "TaskDecodeError",
    "TaskTerminatedError",
    "TaskTimeoutError",
    "WorkerLostError",
    "__version__",
    "as_completed",
    "share",
]
