"""Starting and stopping the processes a benchmark launches, and finding any it left behind.

Every broker and worker is a fresh interpreter (``python -m MODULE ...``). ``bench.py`` gives each
runner a unique ``FADE_BENCH_RUN`` environment tag, which every descendant inherits, even one that
moved to a process group of its own (fade's embedded pool does) or was orphaned; ``tagged_pids``
finds them all afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TAG_VARIABLE", "describe_pid", "free_tcp_address", "module_processes", "tagged_pids"]

STOP_TIMEOUT_S = 5.0
TAG_VARIABLE = "FADE_BENCH_RUN"


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
    """Stop in reverse start order, each fully before the next (workers drain back to a broker
    that is still there): SIGTERM, then SIGKILL if it lingers."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"pid {proc.pid} {proc.args!r} ignored SIGTERM; killing", file=sys.stderr)
            proc.kill()
            proc.wait()


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment has ``FADE_BENCH_RUN=tag``. Reads /proc, so on a system
    without it this finds nothing; zombies have an empty environment and are never found."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0") and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def describe_pid(pid: int) -> str:
    """``pid: command line``, for reports about processes left behind."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmdline = "?"
    return f"{pid}: {cmdline.strip()}"
