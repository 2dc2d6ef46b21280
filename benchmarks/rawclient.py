"""The raw pyzmq baseline's client: it starts rawzmq.py's broker and workers and measures them.

    open_raw() ──> python -m benchmarks.rawzmq broker FRONTEND BACKEND
               ──> python -m benchmarks.rawzmq worker BACKEND      (x2)
               ──> RawTarget: one DEALER on FRONTEND, no futures, no threads

The steps mirror ``metrics.ExecutorTarget`` so the figures compare directly: submit is pipelined
(send all N requests, then read all N replies), map sends ``chunksize`` calls per message and puts
the results back in order, latency is one request at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import zmq

from benchmarks.metrics import (
    WORKERS,
    Deadline,
    Sizes,
    Step,
    big_array,
    big_mbps,
    check_big,
    latency_summary,
    rate,
)
from benchmarks.procs import free_tcp_address, module_processes
from benchmarks.rawzmq import decode, encode, make_socket
from benchmarks.tasks import call_chunk, identity, noop

__all__ = ["RawTarget", "open_raw"]


class RawTarget:
    """The benchmark client: one DEALER, no futures, no threads."""

    def __init__(self, frontend_address: str) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER)
        self._sock.connect(frontend_address)

    def close(self) -> None:
        """Close the socket and context; idempotent."""
        self._ctx.destroy(linger=0)

    def first_result(self, deadline: Deadline) -> None:
        self._call(noop, 0, deadline)

    def steps(self, sizes: Sizes) -> list[Step]:
        return [
            ("warm-up", lambda d: self._warm_up(sizes, d)),
            ("submit", lambda d: {"submit_tps": self._submit(sizes.tasks, d)}),
            ("map chunksize=1", lambda d: {"map_c1_tps": self._map(sizes.tasks, 1, d)}),
            ("map chunksize=100", lambda d: {"map_c100_tps": self._map(sizes.tasks, 100, d)}),
            ("latency", lambda d: self._latency(sizes, d)),
            ("50 MB", lambda d: {"big_mbps": self._big(sizes.big_round_trips, d)}),
        ]

    def _send(self, request_id: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._sock.send_multipart(encode((request_id, fn, args)), copy=False)

    def _recv(self, deadline: Deadline) -> tuple[int, Any]:
        """The next reply, in arrival order; raises the task's exception if it failed."""
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not self._sock.poll(math.ceil(deadline.remaining() * 1000)):
                raise TimeoutError("no reply from the raw-zmq broker before the deadline") from None
            frames = self._sock.recv_multipart(copy=False)
        request_id, ok, value = decode(frames)
        if not ok:
            raise value
        return request_id, value

    def _call(self, fn: Callable[..., Any], arg: Any, deadline: Deadline) -> Any:
        self._send(0, fn, (arg,))
        return self._recv(deadline)[1]

    def _warm_up(self, sizes: Sizes, deadline: Deadline) -> dict[str, float]:
        self._submit(4 * WORKERS, deadline)
        for i in range(sizes.warmup_calls):
            self._call(noop, i, deadline)
        return {}

    def _submit(self, n: int, deadline: Deadline) -> float:
        """Pipelined: send all ``n`` requests, then read all ``n`` replies."""
        started = time.perf_counter()
        for i in range(n):
            self._send(i, noop, (i,))
        for _ in range(n):
            self._recv(deadline)
        return rate(n, started)

    def _map(self, n: int, chunksize: int, deadline: Deadline) -> float:
        """Like ``Executor.map``: ``chunksize`` calls per message, results put back in order."""
        started = time.perf_counter()
        starts = range(0, n, chunksize)
        for index, start in enumerate(starts):
            chunk = [(i,) for i in range(start, min(start + chunksize, n))]
            self._send(index, call_chunk, (noop, chunk))
        replies = dict(self._recv(deadline) for _ in starts)
        results = [value for index in range(len(starts)) for value in replies[index]]
        if len(results) != n:
            raise AssertionError(f"map returned {len(results)} results, expected {n}")
        return rate(n, started)

    def _latency(self, sizes: Sizes, deadline: Deadline) -> dict[str, float]:
        samples = []
        for i in range(sizes.calls):
            started = time.perf_counter()
            self._call(noop, i, deadline)
            samples.append(time.perf_counter() - started)
        return latency_summary(samples)

    def _big(self, round_trips: int, deadline: Deadline) -> float:
        array = big_array()
        self._call(identity, array, deadline)  # warm-up
        started = time.perf_counter()
        for _ in range(round_trips):
            check_big(self._call(identity, array, deadline), array)
        return big_mbps(round_trips, started)


@contextmanager
def open_raw() -> Iterator[RawTarget]:
    """Start a broker and two workers as subprocesses; yield a connected client; stop them all."""
    frontend = free_tcp_address()
    backend = free_tcp_address()
    while backend == frontend:
        backend = free_tcp_address()
    module = "benchmarks.rawzmq"
    commands = [[module, "broker", frontend, backend]] + [[module, "worker", backend]] * WORKERS
    with module_processes(commands):
        target = RawTarget(frontend)
        try:
            yield target
        finally:
            target.close()
