"""The one place where fade's ZeroMQ sockets are made and configured.

Every peer gets its socket here, so socket-wide policy (reconnect timing,
high-water marks, and later security and size limits) is set once for all.
"""

from __future__ import annotations

import zmq

__all__ = ["bind_router", "connect_dealer"]

#: Reconnect quickly after a broker restart, backing off to this at most (ms).
RECONNECT_IVL = 50
RECONNECT_IVL_MAX = 1000


def connect_dealer(
    context: zmq.Context[zmq.Socket[bytes]],
    address: str,
    *,
    identity: bytes | None = None,
    linger_ms: int = 0,
) -> zmq.Socket[bytes]:
    """A DEALER connected to the broker at ``address``, with a stable routing identity."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX)
    # Never drop outgoing messages while the broker is away: they are bounded by
    # the client window and worker credits, and re-sent after a reconnection.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(address)
    return sock


def bind_router(context: zmq.Context[zmq.Socket[bytes]], address: str) -> zmq.Socket[bytes]:
    """The broker's ROUTER, bound to ``address``."""
    # Each peer is a socket inside libzmq too; its default cap (1023) would limit the
    # broker to about a thousand workers and clients.
    if context.get(zmq.MAX_SOCKETS) < 65536:
        context.set(zmq.MAX_SOCKETS, 65536)
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # A reconnecting peer keeps its identity; the new pipe replaces the old.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    # Never drop a message to a slow peer: credits and client windows
    # already bound what is in flight to each one.
    sock.setsockopt(zmq.SNDHWM, 0)
    try:
        sock.bind(address)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock
