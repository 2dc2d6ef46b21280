"""Every default a user can change, and how a size is written, in a module that
imports nothing but the standard library's ``re`` and typing helpers.

Why a module of its own: ``fade.Executor()`` starts the embedded pool's worker
processes before it imports ZeroMQ and the rest of the client (fade/launch.py), so
that the workers' start (about 0.1 s) and the client's imports (about 0.06 s) overlap.
The worker's options and the Executor's signature need these values at that point;
the modules that use them (fade.protocol, fade.sockets, fade.link, ...) take them
from here, under the names they always had.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "DATA_CACHE_SIZE",
    "DEFAULT_ADDRESS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_RECONNECT_TIMEOUT",
    "DEFAULT_SHARE_THRESHOLD",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_LIVENESS",
    "KEYS_ENV",
    "MIN_MAX_MESSAGE_SIZE",
    "PACKAGE_CACHE_SIZE",
    "SHIP_CODE_LIMIT",
    "SHIP_PACKAGES_LIMIT",
    "argument_type",
    "check_message_size",
    "check_seconds",
    "parse_message_size",
    "parse_seconds",
    "parse_size",
]

T = TypeVar("T")

#: Where the command-line tools find the broker when told nothing (fade/_env.py).
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
#: Seconds between heartbeats, in both directions.
HEARTBEAT_INTERVAL = 1.0
#: Heartbeats a peer may miss before it is presumed dead.
HEARTBEAT_LIVENESS = 3
#: The largest frame any fade socket accepts unless told otherwise: 1 GiB.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30
#: The smallest limit a peer takes: fade's own messages must fit under it (a peer's
#: hello; a shipped file's pieces, which leave 4 KiB for their header). A broker told
#: 100 bytes dropped every client's hello, and the task waited in vain.
MIN_MAX_MESSAGE_SIZE = 64 << 10
#: Seconds a peer waits for a broker it has never reached before saying so.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds a peer waits for a broker that stopped answering (a restart) before saying so.
DEFAULT_RECONNECT_TIMEOUT = 30.0
#: Argument buffers of at least this many bytes travel by content (``share_threshold``).
DEFAULT_SHARE_THRESHOLD = 2**20
#: The most bytes of local code and data a client ships (``ship_code_limit``).
SHIP_CODE_LIMIT = 64 * 2**20
#: The most bytes of installed distributions that may travel to a worker for one task.
SHIP_PACKAGES_LIMIT = 2**30
#: The default bound of a host's package cache (``fade-worker --package-cache-size``).
PACKAGE_CACHE_SIZE = 8 * 2**30
#: The default bound on a host's data cache, in bytes (``fade-worker --data-cache``).
DATA_CACHE_SIZE = 4 * 2**30
#: Clients and workers read their key file from here when given none.
KEYS_ENV = "FADE_KEYS"

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"1048576"``, ``"64M"``, ``"1GiB"`` -> bytes (binary units). Raises ValueError."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 64M, 2G)")
    number, unit = match.groups()
    size = int(number) << (10 * " kmgt".index(unit.lower() or " "))
    if size < 1:
        raise ValueError("a size must be at least 1 byte")
    return size


def parse_message_size(text: str) -> int:
    """A ``--max-message-size``: a size (:func:`parse_size`) fade's messages fit under."""
    size = parse_size(text)
    check_message_size(size, "--max-message-size")
    return size


def check_message_size(size: int, name: str) -> None:
    """Raise ValueError, naming the setting, if ``size`` is under MIN_MAX_MESSAGE_SIZE."""
    if size < MIN_MAX_MESSAGE_SIZE:
        raise ValueError(
            f"{name} must be at least 64K ({MIN_MAX_MESSAGE_SIZE} bytes), not {size}: "
            "fade's own messages (a peer's hello, the pieces of a shipped file) must fit"
        )


def parse_seconds(text: str) -> float:
    """A duration option: a finite number of seconds greater than 0 (float() also reads
    "inf" and "nan", which no deadline or poll takes)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number of seconds: {text!r}") from None
    check_seconds(value, "the value")
    return value


def check_seconds(value: float, name: str) -> None:
    """Raise ValueError, naming the setting, unless ``value`` is finite and > 0."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0 seconds, not {value!r}")


def argument_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type``, its ValueError's message shown (argparse would
    print only "invalid parse_size value")."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            import argparse  # only for a bad value: the embedded pool starts without it

            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert
