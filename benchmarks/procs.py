"""Starting and stopping the broker and worker processes that a benchmark launches.

Every process is a fresh interpreter (``python -m MODULE ...``) in the runner's process group,
so ``bench.py`` can always kill whatever a runner left behind with one ``killpg``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["free_tcp_address", "module_processes"]

STOP_TIMEOUT_S = 5.0


def free_tcp_address() -> str:
    """A ``tcp://127.0.0.1:PORT`` address whose port was free a moment ago.

    Another process could take the port before the broker binds it; on this benchmark machine
    that race is rare enough, and the broker then fails loudly rather than silently.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def module_processes(commands: Sequence[Sequence[str]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``python -m`` for each argument list; stop them all on exit, error or not."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for args in commands:
            procs.append(subprocess.Popen([sys.executable, "-m", *args]))
        yield procs
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM in reverse start order (workers before broker), then SIGKILL what lingers."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"pid {proc.pid} {proc.args!r} ignored SIGTERM; killing", file=sys.stderr)
            proc.kill()
            proc.wait()
