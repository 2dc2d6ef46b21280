"""Raw pyzmq baseline: the load-balancing broker of the ZeroMQ guide, with no fade code at all.

    client DEALER ──tcp──> ROUTER frontend ┐ broker:     ┌ ROUTER backend <──tcp── DEALER worker
                  <───────                 └ LRU deque   ┘                 ───────> (x2)
                                             of idle workers

    worker -> broker  [READY]                   once, at start: "I am idle"
    client -> broker  [payload...]              broker prepends the client id and hands it to
    broker -> worker  [client id, payload...]   the least recently idle worker
    worker -> broker  [client id, payload...]   the reply; the worker is idle again
    broker -> client  [payload...]

A payload is a pickle (protocol 5, cloudpickle) of ``(request id, fn, args)`` going out and of
``(request id, ok, value)`` coming back, followed by its out-of-band buffers, one frame each. Frames
are sent with ``copy=False`` and the broker forwards the ``zmq.Frame`` objects it received, so a
50 MB array is copied neither by pickling, nor by the broker, nor by the worker. High-water marks
are off (0) so that the client can send all N requests before it reads any reply.

The broker polls the frontend only while a worker is idle: requests wait in the frontend queue,
never in the broker. Run the processes as ``python -m benchmarks.rawzmq broker FRONTEND BACKEND``
and ``python -m benchmarks.rawzmq worker BACKEND``; ``rawclient.open_raw()`` starts them and
measures them. This module imports no numpy and no benchmark code, so these processes start as
lean as fade's.
"""

from __future__ import annotations

import argparse
import pickle
from collections import deque
from collections.abc import Sequence
from typing import Any

import cloudpickle
import zmq

__all__ = ["READY", "decode", "encode", "main", "make_socket", "run_broker", "run_worker"]

READY = b"READY"
Frames = list[bytes | memoryview]


def encode(obj: Any) -> Frames:
    """Pickle ``obj`` to one header frame plus one frame per out-of-band buffer."""
    buffers: list[pickle.PickleBuffer] = []
    header = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [header, *(buffer.raw() for buffer in buffers)]


def decode(frames: Sequence[zmq.Frame]) -> Any:
    """Inverse of ``encode``; arrays come back as views onto the received frames."""
    return pickle.loads(frames[0].buffer, buffers=[frame.buffer for frame in frames[1:]])


def make_socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    """A socket with linger 0 and no high-water mark (the client sends N before reading any)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


# -- broker -----------------------------------------------------------------------------------


def run_broker(frontend_address: str, backend_address: str) -> None:
    """Forward requests to idle workers in LRU order and replies back to clients; never returns."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    frontend = make_socket(ctx, zmq.ROUTER)
    backend = make_socket(ctx, zmq.ROUTER)
    frontend.bind(frontend_address)
    backend.bind(backend_address)
    idle: deque[zmq.Frame] = deque()
    everyone, workers_only = zmq.Poller(), zmq.Poller()
    everyone.register(backend, zmq.POLLIN)
    everyone.register(frontend, zmq.POLLIN)
    workers_only.register(backend, zmq.POLLIN)
    try:
        while True:
            events = dict((everyone if idle else workers_only).poll())
            if backend in events:
                _on_worker(backend, frontend, idle)
            if frontend in events and idle:
                _on_client(frontend, backend, idle)
    finally:
        ctx.destroy(linger=0)


def _on_worker(
    backend: zmq.Socket[bytes], frontend: zmq.Socket[bytes], idle: deque[zmq.Frame]
) -> None:
    """A worker said READY or replied: either way it is idle now."""
    worker, *rest = backend.recv_multipart(copy=False)
    idle.append(worker)
    if len(rest) > 1:  # [client id, payload...]; a lone frame is READY
        frontend.send_multipart(rest, copy=False)


def _on_client(
    frontend: zmq.Socket[bytes], backend: zmq.Socket[bytes], idle: deque[zmq.Frame]
) -> None:
    """Hand one request ([client id, payload...]) to the least recently idle worker."""
    frames = frontend.recv_multipart(copy=False)
    backend.send_multipart([idle.popleft(), *frames], copy=False)


# -- worker -----------------------------------------------------------------------------------


def run_worker(backend_address: str) -> None:
    """Announce READY, then run one request at a time forever."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER)
    sock.connect(backend_address)
    sock.send(READY)
    try:
        while True:
            client, *payload = sock.recv_multipart(copy=False)
            sock.send_multipart([client, *encode(_run(payload))], copy=False)
    finally:
        ctx.destroy(linger=0)


def _run(payload: Sequence[zmq.Frame]) -> tuple[int, bool, Any]:
    request_id, fn, args = decode(payload)
    try:
        return request_id, True, fn(*args)
    except Exception as exc:  # sent back so the client raises instead of waiting forever
        return request_id, False, exc


def main(argv: Sequence[str] | None = None) -> None:
    """``broker FRONTEND BACKEND`` or ``worker BACKEND``; runs until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["broker", "worker"])
    parser.add_argument("addresses", nargs="+", metavar="ADDRESS")
    args = parser.parse_args(argv)
    # SIGTERM keeps its default action, ending the process at once: nothing here needs cleaning
    # up, and a Python handler would only run once a blocking zmq call returns.
    try:
        if args.role == "broker":
            run_broker(*args.addresses)
        else:
            run_worker(*args.addresses)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
