"""A broker pair and its workers on loopback, for tests (and the failover benchmark).

Brokers "a" (the primary) and "b" (the backup) run as real ``fade-broker`` processes,
each writing its log to a file the test can read; workers get both addresses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fade.errors import FadeError
from fade.status import query

NAMES = ("a", "b")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class PairPool:
    """Two brokers of a pair on loopback ports, and ``fade-worker`` processes given both."""

    logs: Path
    interval: float
    liveness: int
    keys: Any = None  # a conftest.Keys: both brokers serve its folder
    hosts: dict[str, str] = field(default_factory=lambda: dict.fromkeys(NAMES, "127.0.0.1"))
    ports: dict[str, int] = field(default_factory=lambda: {n: _free_port() for n in NAMES})
    #: Where a broker binds, what it is told its peer's address is, and a command to run it
    #: under (a network namespace): by default its own address, the other's, nothing.
    binds: dict[str, str] = field(default_factory=dict)
    peers: dict[str, str] = field(default_factory=dict)
    prefixes: dict[str, list[str]] = field(default_factory=dict)
    brokers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    starts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NAMES, 0))

    def address(self, name: str) -> str:
        return f"tcp://{self.hosts[name]}:{self.ports[name]}"

    @property
    def addresses(self) -> str:
        """What clients and workers are given: both brokers, the primary first."""
        return ",".join(self.address(name) for name in NAMES)

    def timing(self) -> list[str]:
        return [
            "--heartbeat-interval",
            str(self.interval),
            "--heartbeat-liveness",
            str(self.liveness),
        ]

    def log(self, name: str) -> Path:
        return self.logs / f"broker-{name}.log"

    def start_broker(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        other = NAMES[1 - NAMES.index(name)]
        keys = ["--keys", str(self.keys.dir)] if self.keys is not None else []
        argv = [
            *self.prefixes.get(name, []),
            sys.executable,
            "-m",
            "fade.broker",
            self.binds.get(name, self.address(name)),
            "--peer",
            self.peers.get(name, self.address(other)),
            "--primary" if name == "a" else "--backup",
            *self.timing(),
            *keys,
            *extra,
        ]
        self.starts[name] += 1
        with open(self.log(name), "ab") as log:
            log.write(f"--- start {self.starts[name]}\n".encode())
            log.flush()
            self.brokers[name] = subprocess.Popen(argv, stderr=log)
        return self.brokers[name]

    def start_both(self) -> None:
        for name in NAMES:
            self.start_broker(name)
        self.wait_active("a")

    @property
    def backup_first(self) -> str:
        """Both brokers, the backup first (as a peer configured the other way round)."""
        return ",".join(self.address(name) for name in reversed(NAMES))

    def start_worker(
        self, processes: int = 1, *extra: str, addresses: str | None = None
    ) -> subprocess.Popen[bytes]:
        keys = ["--keys", str(self.keys.worker)] if self.keys is not None else []
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fade.worker",
                addresses or self.addresses,
                "--processes",
                str(processes),
                *self.timing(),
                *keys,
                *extra,
            ]
        )
        self.workers.append(worker)
        return worker

    def worker_pids(self) -> list[int]:
        pids = []
        for sup in self.workers:
            try:
                pids += [c.pid for c in psutil.Process(sup.pid).children()]
            except psutil.NoSuchProcess:
                pass
        return pids

    def client_keys(self) -> str | None:
        return str(self.keys.client) if self.keys is not None else None

    # -- what the brokers say ------------------------------------------------------------

    def state(self, name: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """The broker's snapshot, or None if it does not answer in time."""
        try:
            return query(self.address(name), timeout=timeout, keys=self.client_keys())
        except FadeError:
            return None

    def pair_state(self, name: str) -> str | None:
        state = self.state(name)
        return None if state is None else str(state["pair"]["state"])

    def wait_active(self, name: str, timeout: float = 30) -> None:
        _wait(lambda: self.pair_state(name) == "active", timeout, f"broker {name} to be active")

    def wait_workers(self, name: str, count: int, timeout: float = 30) -> None:
        def enough() -> bool:
            state = self.state(name)
            return state is not None and len(state["workers"]) >= count

        _wait(enough, timeout, f"{count} workers at broker {name}")

    def transitions(self, name: str) -> list[str]:
        """The pair moves broker ``name`` logged, as "old -> new (event)", in order."""
        if not self.log(name).exists():
            return []
        lines = self.log(name).read_text(errors="replace").splitlines()
        return [line.split("pair: ", 1)[1].split(";")[0] for line in lines if "pair: " in line]

    # -- what happens to them ----------------------------------------------------------------

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.brokers[name].pid, sig)

    def kill(self, name: str) -> None:
        broker = self.brokers[name]
        broker.send_signal(signal.SIGKILL)
        broker.send_signal(signal.SIGCONT)
        broker.wait(timeout=10)

    def stop(self) -> None:
        for proc in [*self.workers, *self.brokers.values()]:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            except psutil.NoSuchProcess:
                pass
            proc.send_signal(signal.SIGKILL)
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=10)
