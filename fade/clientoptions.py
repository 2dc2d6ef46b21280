"""The Executor's arguments, checked and normalised; the options each task runs with.

::

    fade.Executor(address, max_workers=..., ...)
        pool_size, executor_setup, check_options,  --> ClientSettings (fade/clientio.py's)
        installed_packages, client_keys, local_code    TaskOptions (each task's defaults)
    Executor.options(priority=..., ...) --merge_options--> TaskOptions (a view's)

* Each check raises ValueError or TypeError naming the argument, in the order the
  Executor has always checked them.
* ``TaskOptions`` travel with each task (fade/outbox.py's WorkItem) into its SUBMIT
  record; None there means the executor's own setting, which the broker's default
  stands behind.

Separate from fade/client.py so that the Executor reads as what it does, not as the
checks of its two dozen arguments. ``pool_size``, ``check_setup`` and ``check_options``
run before the embedded pool's workers start, with nothing heavy imported.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fade.defaults import check_message_size, check_seconds
from fade.errors import ProtocolError
from fade.shipping import LocalCode

if TYPE_CHECKING:
    from fade import security
    from fade.packages import InstalledPackages

# The modules that import ZeroMQ are imported in the functions that need them: the
# Executor checks its arguments and starts the embedded pool's workers first, and
# imports them while the workers start (fade/launch.py).

__all__ = [
    "DEFAULT_OPTIONS",
    "ClientSettings",
    "TaskOptions",
    "check_options",
    "check_setup",
    "client_keys",
    "executor_setup",
    "installed_packages",
    "local_code",
    "merge_options",
    "pool_size",
]


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How tasks are to run: an Executor's defaults, or those of one of its views
    (``Executor.options``). None: the broker's default."""

    priority: int = 0
    resources: bytes = b""  # p.encode_resources of the request; empty: none
    task_timeout: float | None = None
    max_attempts: int | None = None


DEFAULT_OPTIONS = TaskOptions()


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """The Executor's arguments that its I/O side (fade/clientio.py) and link follow."""

    max_attempts: int
    task_timeout: float | None
    heartbeat_interval: float
    heartbeat_liveness: int
    max_message_size: int
    connect_timeout: float
    reconnect_timeout: float
    fast_paths: bool | None = None


def pool_size(address: str | int | None, max_workers: int | None) -> tuple[str | None, int | None]:
    """The broker's address (checked; None: an embedded pool) and the embedded pool's size."""
    if isinstance(address, int) and not isinstance(address, bool):
        # Executor(4), as ThreadPoolExecutor(4): the embedded pool's size.
        if max_workers is not None:
            raise TypeError("Executor() got max_workers both as its first argument and by name")
        address, max_workers = None, address
    if address is not None:
        from fade.link import check_address

        address = check_address(address)
    return address, max_workers


def check_setup(initializer: Callable[..., object] | None, max_tasks_per_child: int | None) -> None:
    """Raise TypeError or ValueError for an initializer or max_tasks_per_child out of
    their range."""
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if max_tasks_per_child is not None:
        if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
            raise TypeError("max_tasks_per_child must be an integer")
        if max_tasks_per_child < 1:
            raise ValueError("max_tasks_per_child must be >= 1")


def executor_setup(
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    max_tasks_per_child: int | None,
) -> bytes:
    """The executor's set-up (fade/initializer.py; checked by ``check_setup``), pickled
    once; every task carries it."""
    from fade import serialization as ser

    if initializer is None and max_tasks_per_child is None:
        return b""
    # Pickled now, so that an initializer that cannot travel fails here, as the standard
    # pools fail at their start.
    return ser.dumps_setup(os.urandom(16), initializer, tuple(initargs), max_tasks_per_child or 0)


def check_options(
    ship_code: str, ship_code_limit: int, max_workers: int | None, settings: ClientSettings
) -> None:
    """Raise TypeError or ValueError for the first argument of the wrong type or out of
    its range (before an embedded pool starts: nothing to clean up)."""
    s = settings
    if ship_code not in ("auto", "pin", "off"):
        raise ValueError("ship_code must be 'auto', 'pin' or 'off'")
    if ship_code_limit < 0:
        raise ValueError("ship_code_limit must be at least 0 bytes")
    if max_workers is not None and not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
    if max_workers is not None and max_workers < 1:
        raise ValueError("max_workers must be greater than 0")
    if not 1 <= s.max_attempts <= 65535:
        raise ValueError("max_attempts must be between 1 and 65535")
    if s.task_timeout is not None:
        check_seconds(s.task_timeout, "task_timeout (None for no limit)")
    check_seconds(s.heartbeat_interval, "heartbeat_interval")
    if s.heartbeat_liveness < 1:
        raise ValueError("heartbeat_liveness must be >= 1")
    check_message_size(s.max_message_size, "max_message_size")
    # Finite: every wait has a deadline; inf or nan would leave one waiting for ever.
    check_seconds(s.connect_timeout, "connect_timeout")
    check_seconds(s.reconnect_timeout, "reconnect_timeout")


def installed_packages(ship: str | Sequence[str], limit: int) -> InstalledPackages | None:
    """The installed distributions to ship (fade/packages.py), as ``ship_packages`` says."""
    if isinstance(ship, str):
        if ship not in ("auto", "off"):
            raise ValueError("ship_packages must be 'auto', 'off' or a list of distribution names")
        if ship == "off":
            return None
    if limit < 0:
        raise ValueError("ship_packages_limit must be at least 0 bytes")
    from fade.packages import InstalledPackages

    return InstalledPackages(ship, limit)


def client_keys(address: str | None, keys: security.KeySource | None) -> security.PeerKeys | None:
    """The keys this client talks to a broker at ``address`` with (None: no CurveZMQ)."""
    if address is None and keys is not None:
        raise ValueError("keys are for a broker at an address; the embedded pool needs none")
    from fade import security

    # $FADE_KEYS is for remote pools only: the embedded one talks over a private ipc socket.
    return security.resolve_peer_keys(keys, "client") if address is not None else None


def local_code(ship_code: str, limit: int) -> LocalCode | None:
    """The client's local code to ship (fade/shipping.py), as ``ship_code`` says."""
    return None if ship_code == "off" else LocalCode(pinned=ship_code == "pin", max_bytes=limit)


def merge_options(
    options: TaskOptions,
    priority: int | None,
    resources: dict[str, float] | None,
    task_timeout: float | None,
    max_attempts: int | None,
) -> TaskOptions:
    """``options`` with the given ones changed, checked."""
    if priority is not None:
        priority = _integer("priority", priority)
    if priority is not None and not -32768 <= priority <= 32767:
        raise ValueError("priority must be between -32768 and 32767")
    if task_timeout is not None and task_timeout <= 0:
        raise ValueError("task_timeout must be positive")
    if max_attempts is not None and not 1 <= max_attempts <= 65535:
        raise ValueError("max_attempts must be between 1 and 65535")
    spec = options.resources
    if resources is not None:
        from fade import protocol as p

        try:
            spec = p.encode_resources(p.decode_resources(p.encode_resources(resources)) or {})
        except (ProtocolError, TypeError) as exc:
            raise ValueError(f"bad resources {resources!r}: {exc}") from None
        if spec == b"{}":
            spec = b""
    return TaskOptions(
        options.priority if priority is None else priority,
        spec,
        options.task_timeout if task_timeout is None else task_timeout,
        options.max_attempts if max_attempts is None else max_attempts,
    )


def _integer(name: str, value: object) -> int:
    """``value`` as an int (numpy's integers too, not bools or floats); TypeError if none."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
