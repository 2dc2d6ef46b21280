#!/usr/bin/env python
"""A TCP proxy on loopback that delays what it forwards, each way: a client "far" from its
broker without a network to put between them (this machine's kernel has no netem).

    client --> 127.0.0.1:LISTEN --(+DELAY)--> 127.0.0.1:TARGET (the broker)
           <--(+DELAY)------------------------'

Each chunk read from one side is written to the other DELAY seconds after it was read,
in order; the proxy's own cost (an asyncio loop in one process) is tens of microseconds
per chunk, far below the delays it is used with (1-10 ms). Usage: ``python
benchmarks/delayproxy.py LISTEN_PORT TARGET_PORT DELAY_SECONDS``, or :func:`delayed`.
It runs until it is stopped (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["delayed"]

START_TIMEOUT_S = 10.0
READ_SIZE = 1 << 20


@contextmanager
def delayed(address: str, delay: float) -> Iterator[str]:
    """A ``tcp://127.0.0.1:PORT`` address that reaches ``address`` (also on loopback)
    ``delay`` seconds later each way, while the block runs."""
    target = int(address.rsplit(":", 1)[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__)), str(port), str(target), str(delay)]
    )
    try:
        _wait_for_port(port, proc)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the delay proxy exited with status {proc.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"the delay proxy did not listen on port {port} in {START_TIMEOUT_S}s")


async def _forward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            chunk = await reader.read(READ_SIZE)
            queue.put_nowait((loop.time() + delay, chunk))
            if not chunk:
                return

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:  # the other side closed
                writer.close()
                return
            writer.write(chunk)
            await writer.drain()

    await asyncio.gather(read(), write())


async def _serve(listen: int, target: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _forward(reader, target_writer, delay),
            _forward(target_reader, writer, delay),
            return_exceptions=True,  # a side that resets ends its direction only
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listen", type=int, help="the port to listen on (127.0.0.1)")
    parser.add_argument("target", type=int, help="the port to forward to (127.0.0.1)")
    parser.add_argument("delay", type=float, help="seconds added each way")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.target, args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
