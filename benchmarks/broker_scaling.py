"""The broker alone: dispatch rate with many connected workers, and memory per queued task.

    python benchmarks/broker_scaling.py [--smoke] [--workers 1,16,256,1024] [--json out.json]

A real ``fade-broker`` process; simulated peers in this process speak fade's
protocol through ``fade.protocol`` (no fade client or worker code):

* dispatch: N simulated workers, each granting one credit at a time (the
  slow-task regime, where every task is a separate dispatch decision) and
  answering every TASK at once; one simulated client keeps the queue full.
  Measured: tasks completed per second, and its ratio to the 2-worker rate.
* memory: one simulated client queues Q tasks (100-byte payloads) with no
  worker connected; the broker's RSS before and after gives bytes per queued
  task, against the target of payload + 1 KB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import zmq  # noqa: E402

from fade import protocol as p  # noqa: E402

PAYLOAD = b"x" * 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_broker() -> tuple[subprocess.Popen[bytes], str]:
    address = f"tcp://127.0.0.1:{_free_port()}"
    broker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fade.broker",
            address,
            "--log-level",
            "ERROR",
            "--heartbeat-interval",
            "5",
        ]
    )
    time.sleep(0.5)
    return broker, address


def _dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], address: str, identity: bytes
) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    return sock


def _submit(client: zmq.Socket[bytes], first: int, count: int) -> None:
    tasks = [(p.SubmitRecord(first + i, 0, 0.0), p.Payload(PAYLOAD)) for i in range(count)]
    client.send_multipart(p.encode_submit(tasks))


def _expect(sock: zmq.Socket[bytes], command: p.Command) -> p.Message:
    while True:
        message = p.parse(sock.recv_multipart())
        if message.command is command:
            return message


def _allow_many_sockets() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _hello(role: str) -> list[p.Frame]:
    """A HELLO as this interpreter's Python (workers serve only clients of their Python)."""
    common = {
        "host": "bench",
        "pid": os.getpid(),
        "version": "bench",
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
    }
    if role == "client":
        return p.encode_hello(p.ClientHello(tag=os.urandom(p.TAG_SIZE), **common))
    return p.encode_hello(p.WorkerHello(credits=1, **common))


def dispatch_rate(workers: int, tasks: int) -> float:
    """Tasks per second through a broker with ``workers`` one-credit workers."""
    broker, address = _start_broker()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, workers + 64)
    try:
        peers = [_dealer(ctx, address, b"W%07d" % i) for i in range(workers)]
        for peer in peers:
            peer.send_multipart(_hello("worker"))
        client = _dealer(ctx, address, b"Cbench")
        client.send_multipart(_hello("client"))
        _expect(client, p.Command.WELCOME)
        poller = zmq.Poller()
        for peer in peers:
            poller.register(peer, zmq.POLLIN)
        poller.register(client, zmq.POLLIN)
        window = max(2 * workers, 256)
        sent = done = 0
        started = time.perf_counter()
        while done < tasks:
            if sent - done < window and sent < tasks:
                batch = min(window - (sent - done), tasks - sent, 512)
                _submit(client, sent, batch)
                sent += batch
            for sock, _ in poller.poll(1000):
                if sock is client:
                    done += _drain_results(client)
                else:
                    _answer_tasks(sock)
        return tasks / (time.perf_counter() - started)
    finally:
        ctx.destroy(linger=0)
        broker.kill()
        broker.wait()


def _answer_tasks(worker: zmq.Socket[bytes]) -> None:
    while True:
        try:
            frames = worker.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        message = p.parse(frames)
        if message.command is p.Command.TASK:
            results = [
                (p.DoneRecord(record.key, p.Status.OK), p.Payload(b"r"))
                for record, _ in p.decode_task(message.body)
            ]
            worker.send_multipart(p.encode_done(len(results), results))


def _drain_results(client: zmq.Socket[bytes]) -> int:
    count = 0
    while True:
        try:
            frames = client.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return count
        message = p.parse(frames)
        if message.command is p.Command.RESULT:
            count += len(p.decode_result(message.body)[1])


def memory_per_task(queued: int) -> tuple[float, float]:
    """(broker bytes per queued task, seconds to queue them), with no worker connected."""
    broker, address = _start_broker()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        proc = psutil.Process(broker.pid)
        client = _dealer(ctx, address, b"Cbench")
        client.send_multipart(_hello("client"))
        _expect(client, p.Command.WELCOME)
        before = proc.memory_info().rss
        started = time.perf_counter()
        for first in range(0, queued, 1000):
            _submit(client, first, min(1000, queued - first))
        # A heartbeat's answer comes after everything sent before it was handled.
        client.send_multipart(p.encode(p.Command.HEARTBEAT))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.memory_info().rss > before and _quiet(proc):
                break
        elapsed = time.perf_counter() - started
        return (proc.memory_info().rss - before) / queued, elapsed
    finally:
        ctx.destroy(linger=0)
        broker.kill()
        broker.wait()


def _quiet(proc: psutil.Process) -> bool:
    """The broker has used no CPU for a moment: it has handled what was sent."""
    first = sum(proc.cpu_times()[:2])
    time.sleep(0.3)
    return sum(proc.cpu_times()[:2]) == first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--workers", default="2,16,256,1024")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    _allow_many_sockets()
    tasks = 5_000 if args.smoke else 50_000
    queued = 50_000 if args.smoke else 1_000_000

    rates = {n: dispatch_rate(n, tasks) for n in counts}
    per_task, seconds = memory_per_task(queued)
    base = rates[counts[0]]
    print(f"broker dispatch, one credit per worker, {tasks:,} tasks")
    for n, rate in rates.items():
        print(f"  workers {n:>5} : {rate:10,.0f} tasks/s   {rate / base:5.2f}x of {counts[0]}")
    print(f"broker memory, {queued:,} queued tasks of {len(PAYLOAD)}-byte payloads")
    print(
        f"  per queued task : {per_task:10,.0f} bytes   (target: payload + 1024 = "
        f"{len(PAYLOAD) + 1024})"
    )
    print(f"  queued in       : {seconds:10.1f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "dispatch_tasks_per_s": rates,
                    "bytes_per_queued_task": per_task,
                    "payload_bytes": len(PAYLOAD),
                    "queued": queued,
                    "cpu_count": os.cpu_count(),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
