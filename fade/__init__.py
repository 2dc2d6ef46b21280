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

from fade._version import __version__
from fade.client import Executor
from fade.errors import (
    BrokenPoolError,
    FadeError,
    InsecureAddressError,
    MessageTooLargeError,
    ProtocolError,
    RemoteTraceback,
    ResultDecodeError,
    SecurityError,
    SerializationError,
    TaskTimeoutError,
    WorkerLostError,
)

__all__ = [
    "BrokenPoolError",
    "Executor",
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
    "__version__",
]
