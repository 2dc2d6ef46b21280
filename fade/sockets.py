"""The one place where fade's ZeroMQ sockets are made and configured.

Every peer gets its socket here, so socket-wide policy (reconnect timing,
high-water marks, message size limits and CurveZMQ keys) is set once for all.

* ``MAXMSGSIZE`` bounds every *frame* a socket accepts (ZeroMQ checks each
  frame, not a whole message); a peer that sends a larger one is disconnected
  by ZeroMQ before the frame is buffered. The default leaves room for large
  numpy arrays, which travel as frames of their own.
* With keys, the broker's ROUTER is a CURVE server whose handshakes are
  checked by ZAP (``fade.security.ZapHandler``, which must be bound first), and
  each DEALER is a CURVE client that only talks to the holder of the broker's
  secret key.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Sequence
from typing import Any, cast

import zmq
from zmq.backend import Socket as _CompiledSocket
from zmq.backend import zmq_poll as _zmq_poll

from fade import defaults
from fade.keyfiles import BrokerKeys, PeerKeys
from fade.protocol import frame_size
from fade.resources import usable_cpus

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "POLLIN",
    "ZAP_DOMAIN",
    "bind_router",
    "check_endpoint",
    "connect_dealer",
    "has_input",
    "is_local_address",
    "parse_size",
    "poll",
    "recv_frames",
    "send_frames",
    "spin_for_input",
    "usable_cpus",
    "wait_for_input",
]

#: The ZAP domain of the broker's socket; fade.security answers only for it.
ZAP_DOMAIN = b"fade"
#: Reconnect quickly after a broker restart, backing off to this at most (ms).
RECONNECT_IVL = 50
RECONNECT_IVL_MAX = 1000
#: The largest frame any fade socket accepts unless told otherwise (fade/defaults.py).
DEFAULT_MAX_MESSAGE_SIZE = defaults.DEFAULT_MAX_MESSAGE_SIZE

# Plain ints: pyzmq's send_multipart and recv_multipart combine enum flags for every
# part, which costs more than the send itself for the small messages fade sends most.
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# pyzmq's zmq.Socket methods are Python wrappers around these compiled ones; calling
# them directly takes a third off each small send, receive and EVENTS check, which
# fade makes several of per task.
_send = _CompiledSocket.send
_recv = _CompiledSocket.recv
_get = _CompiledSocket.get

parse_size = defaults.parse_size


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[Any], block: bool = True) -> None:
    """Send one multipart message; large frames leave without a copy. With ``block``
    False, raises zmq.Again instead of waiting when the socket has nowhere to queue it
    (a DEALER whose connection libzmq ended for good); a multipart message is taken
    whole or not at all."""
    copy = not _has_large_frame(frames)
    last = frames[-1]
    more = _SNDMORE if block else _SNDMORE | _NOBLOCK
    for frame in frames[:-1]:
        _send(sock, frame, more, copy)
    _send(sock, last, 0 if block else _NOBLOCK, copy)


def recv_frames(sock: zmq.Socket[bytes]) -> list[zmq.Frame]:
    """The next multipart message as zmq.Frames, without waiting; raises zmq.Again."""
    frame = _recv(sock, _NOBLOCK, False)
    frames = [frame]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        frames.append(frame)
    return frames


def has_input(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message waits to be read (far cheaper than a recv that raises zmq.Again)."""
    return bool(cast(int, _get(sock, _EVENTS)) & _POLLIN)


#: For :func:`poll`'s items.
POLLIN = _POLLIN


def poll(items: list[tuple[Any, int]], timeout_ms: int) -> list[tuple[Any, int]]:
    """pyzmq's compiled poll over ready-made (socket or fd, events) items: zmq.Poller
    rebuilds its list and wraps the answer on every call."""
    return cast(list[tuple[Any, int]], _zmq_poll(items, timeout_ms))


#: How long a fast path checks for a reply it expects soon before it sleeps (seconds).
#: A thread woken from sleep costs tens of microseconds on bare metal and up to a
#: hundred on a VM whose idle CPU must itself be woken; most replies on one machine
#: come within this. Measured with benchmarks/alternating.py (docs/architecture.md).
#: Never with less than two CPUs: there the sender needs the very CPU a looking thread
#: holds (pinned to one CPU, a round trip took 253 µs with the look, 151 without).
SPIN = 0.0002 if usable_cpus() >= 2 else 0.0
_yield = getattr(os, "sched_yield", lambda: None)


def spin_for_input(sock: zmq.Socket[bytes], seconds: float = SPIN) -> bool:
    """Check for a message to read for up to ``seconds`` without sleeping, yielding the
    CPU to any thread that wants it between checks; True if one waits. For a reply
    expected within microseconds: the caller then sleeps in a poll as ever."""
    end = time.perf_counter() + seconds
    while not (cast(int, _get(sock, _EVENTS)) & _POLLIN):
        if time.perf_counter() >= end:
            return False
        _yield()
    return True


def wait_for_input(sock: zmq.Socket[bytes], timeout_ms: int) -> bool:
    """Wait up to ``timeout_ms`` for a message to read; True if one waits.
    (``zmq.Socket.poll`` builds a Poller on every call.)"""
    return bool(_zmq_poll([(sock, _POLLIN)], timeout_ms))


#: Frames at least this large are sent without copying; pyzmq copies smaller ones
#: faster than it builds the Frame object a zero-copy send needs.
ZERO_COPY_MIN = 64 * 1024


def _has_large_frame(frames: Sequence[Any]) -> bool:
    for frame in frames:  # a loop, not any(): this runs for every message sent
        if not isinstance(frame, bytes) and frame_size(frame) >= ZERO_COPY_MIN:
            return True
    return False


def connect_dealer(
    context: zmq.Context[zmq.Socket[bytes]],
    address: str,
    *,
    identity: bytes | None = None,
    linger_ms: int = 0,
    keys: PeerKeys | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    lossy: tuple[int, int] | None = None,
    immediate: bool = False,
) -> zmq.Socket[bytes]:
    """A DEALER connected to the broker at ``address``, with a stable routing identity.

    ``lossy`` (interval, timeout in ms), for messages worth sending only while they are
    fresh (a broker pair's reports): nothing is queued for a connection that is not up,
    at most a few messages for one that is, and ZMTP heartbeats end a connection whose
    other end stopped answering within the timeout. ``immediate``: nothing is queued
    for a connection that is not up (a send with NOBLOCK raises zmq.Again)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if needs_ipv6(address):
        sock.setsockopt(zmq.IPV6, 1)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL)
    # Backing off spares a remote broker a storm of reconnections. A local one is
    # cheap to retry, and backing off would cost a pool started with its broker up to
    # 0.4 s, when the broker binds just after an attempt (50, 100, 200, then 400 ms).
    backoff = not is_local_address(address)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX if backoff else RECONNECT_IVL)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    # Never drop outgoing messages while the broker is away: they are bounded by
    # the client window and worker credits, and re-sent after a reconnection.
    sock.setsockopt(zmq.SNDHWM, 0)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if lossy is not None:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.setsockopt(zmq.HEARTBEAT_IVL, lossy[0])
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, lossy[1])
    if keys is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.broker)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.connect(address)
    return sock


_ENDPOINT_FORMS = "expected tcp://host:port (port 1-65535) or ipc://path"


def check_endpoint(address: str, *, binding: bool = False) -> None:
    """Raise ValueError, naming ``address`` and the expected forms, unless it is an endpoint
    a client or worker can connect to (``binding``: one a broker can bind, where any host,
    ``*`` included, and a port the system picks, ``*`` or 0, will do). ZeroMQ would accept
    some malformed ones and fail later, in a thread, where no caller sees it, or take
    port 99999 as 34463 (modulo 65536)."""
    transport, sep, rest = address.partition("://")
    if not sep:
        raise ValueError(f"{address!r} is not a broker address: no scheme; {_ENDPOINT_FORMS}")
    if transport == "ipc":
        if not rest:
            raise ValueError(f"{address!r} names no socket path; {_ENDPOINT_FORMS}")
        return
    if transport != "tcp":
        raise ValueError(f"{address!r}: unknown scheme {transport!r}; {_ENDPOINT_FORMS}")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or "/" in rest:
        raise ValueError(f"{address!r} has no host and port; {_ENDPOINT_FORMS}")
    if binding and port in ("*", "0"):
        return
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: {port!r} is not a port number; {_ENDPOINT_FORMS}")
    if host == "*" and not binding:
        raise ValueError(f"{address!r} is for binding; name the broker's host; {_ENDPOINT_FORMS}")


def needs_ipv6(address: str, *, binding: bool = False) -> bool:
    """Whether a socket for this endpoint needs ZMQ_IPV6: libzmq speaks IPv4 only unless
    told. An IPv6 literal (``tcp://[::1]:5555``) needs it; a bind to every interface
    (``tcp://*:5555``) takes connections of both families with it (libzmq falls back to
    IPv4 where the host has no IPv6). Not for host names: with it on, libzmq connects to
    the first address the resolver gives, and ``localhost`` would become ::1 where a
    broker listens on 127.0.0.1."""
    transport, _, rest = address.partition("://")
    if transport != "tcp":
        return False
    return rest.startswith("[") or (binding and rest.startswith("*:"))


def is_local_address(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    transport, sep, rest = address.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp" or ":" not in rest:
        return False
    host = rest.rsplit(":", 1)[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: may face a network


def bind_router(
    context: zmq.Context[zmq.Socket[bytes]],
    address: str,
    *,
    keys: BrokerKeys | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    keepalive: tuple[int, int] = (1, 3),
) -> zmq.Socket[bytes]:
    """The broker's ROUTER, bound to ``address``; with ``keys``, a CURVE server.

    ``keepalive`` (seconds between probes, probes): TCP keepalive ends a connection whose
    peer vanished without closing it (a network partition) within about their product,
    and so does TCP_MAXRT one with data the peer does not acknowledge.
    (Not ZMTP heartbeats: libzmq 4.3 can abort the process when one times out, a crash
    the fuzz test found; the kernel's probes have no such path.)"""
    # Each peer is a socket inside libzmq too; its default cap (1023) would limit the
    # broker to about a thousand workers and clients.
    if context.get(zmq.MAX_SOCKETS) < 65536:
        context.set(zmq.MAX_SOCKETS, 65536)
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if needs_ipv6(address, binding=True):
        sock.setsockopt(zmq.IPV6, 1)
    # Without keys, a reconnecting peer's new connection takes over its identity at once.
    # With keys, identities are bound to keys, and handover would let any key holder who
    # learnt an identity take over that peer's traffic (the broker checks what a peer
    # sends, not where it sends): a second connection with an identity in use is refused
    # until the first one ends, which TCP keepalive bounds when the peer vanished.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 0 if keys is not None else 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, keepalive[0])
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, keepalive[0])
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, keepalive[1])
    # Keepalive probes only an idle connection; one with data the peer never acknowledges
    # (its host vanished while the broker sent it heartbeats) would stay up for the
    # kernel's retransmissions, about 15 minutes. This bounds that to the same time
    # (TCP_USER_TIMEOUT on Linux). A silent client is kept for as long as it has a
    # connection (fade/brokerupkeep.py): its connection must end when its host does.
    sock.setsockopt(zmq.TCP_MAXRT, keepalive[0] * (1 + keepalive[1]) * 1000)
    # Never drop a message to a slow peer: credits and client windows
    # already bound what is in flight to each one.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    if keys is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        # Without a ZAP handler libzmq would let in any key; with the domain set it
        # asks ours, and refuses everyone if ours is not there.
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    try:
        sock.bind(address)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock
