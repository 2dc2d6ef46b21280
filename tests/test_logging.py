"""The broker's log, read from a real broker's stderr: one line per worker join, loss,
hand-back and poison task, naming who; nothing per task at INFO."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import tasks
from conftest import INTERVAL, LIVENESS, Pool, kill_tree, wait_for

import fade
from fade.status import peer_id, query

pytestmark = pytest.mark.timeout(90)

LINE = re.compile(r"^\S+ \S+ fade-broker\[\d+@\S+\] (?P<level>[A-Z]+) (?P<message>.*)$")


class BrokerLog:
    """The lines a broker subprocess has written to its stderr so far."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[tuple[str, str]]:
        out = []
        for line in self.path.read_text().splitlines():
            match = LINE.match(line)
            assert match, f"not a broker log line: {line!r}"
            out.append((match["level"], match["message"]))
        return out

    def since(self, mark: int) -> list[tuple[str, str]]:
        return self.lines()[mark:]

    def wait(self, pattern: str, count: int = 1, timeout: float = 20) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []

        def enough() -> bool:
            found[:] = [(lv, m) for lv, m in self.lines() if re.search(pattern, m)]
            return len(found) >= count

        wait_for(enough, timeout, f"{count} broker log lines matching {pattern!r}")
        return found


@pytest.fixture
def logged_pool(pool: Pool, tmp_path: Path) -> Iterator[tuple[Pool, BrokerLog]]:
    path = tmp_path / "broker.log"
    with path.open("w") as stderr:
        pool.broker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fade.broker",
                pool.address,
                "--heartbeat-interval",
                str(INTERVAL),
                "--heartbeat-liveness",
                str(LIVENESS),
            ],
            stderr=stderr,
        )
    yield pool, BrokerLog(path)


def worker_names(pool: Pool) -> dict[int, str]:
    """pid -> the name logs use for that worker (short id @ host : pid)."""
    return {
        w["pid"]: f"{peer_id(w)}@{w['host']}:{w['pid']}" for w in query(pool.address)["workers"]
    }


def test_joins_and_tasks_at_info(logged_pool: tuple[Pool, BrokerLog]) -> None:
    pool, log = logged_pool
    pool.start_worker()
    pool.start_worker()
    joins = log.wait(r"^worker \S+ joined; \d workers$", count=2)
    names = worker_names(pool)
    assert sorted(m.split()[1] for _, m in joins) == sorted(names.values())
    assert {lv for lv, _ in joins} == {"INFO"}

    mark = len(log.lines())
    with fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as ex:
        assert sum(ex.map(tasks.square, range(300))) == sum(x * x for x in range(300))
    log.wait(r"^client \S+ left")
    # 300 tasks: only the client's arrival and departure, nothing per task.
    messages = [m for _, m in log.since(mark)]
    assert len(messages) == 2, messages
    client = f"@{os.uname().nodename}:{os.getpid()}"
    assert re.match(rf"client \w{{12}}{client} connected; 1 clients$", messages[0])
    assert re.match(rf"client \w{{12}}{client} left; 0 clients$", messages[1])


def test_lost_worker_and_poison_task(logged_pool: tuple[Pool, BrokerLog]) -> None:
    pool, log = logged_pool
    pool.start_worker()
    log.wait("joined")
    (name,) = worker_names(pool).values()
    with fade.Executor(
        pool.address, max_attempts=2, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as ex:
        future = ex.submit(tasks.die, 13)
        with pytest.raises(fade.WorkerLostError):
            future.result(timeout=60)
    # Each attempt kills the worker process; its supervisor reports it and starts another.
    lost = log.wait(r"^worker \S+ lost \(its process exited \(exit code 13\)\)", count=2)
    assert [lv for lv, _ in lost] == ["WARNING", "WARNING"]
    assert lost[0][1].startswith(f"worker {name} lost")
    assert lost[0][1].endswith("re-queueing 1 of the 1 tasks it held")
    assert lost[1][1].endswith("re-queueing 0 of the 1 tasks it held")
    ((level, poison),) = log.wait(r"^task \d+ of client \w+ failed")
    assert level == "ERROR"
    second = lost[1][1].split()[1]
    assert re.match(
        rf"task 1 of client \w{{12}} failed: it lost its worker 2 times, last {second}", poison
    )


def test_silent_worker_is_lost_and_its_task_requeued(
    logged_pool: tuple[Pool, BrokerLog], tmp_path: Path
) -> None:
    pool, log = logged_pool
    pool.start_worker()
    pool.start_worker()
    log.wait("joined", count=2)
    marker = tmp_path / "started"
    with fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as ex:
        future = ex.submit(tasks.record_then_sleep, str(marker), "v", 1.0)
        wait_for(marker.exists, 30, "the task to start")
        victim_pid = int(marker.read_text().split()[1])
        name = worker_names(pool)[victim_pid]
        supervisor = next(
            w for w in pool.workers if victim_pid in [c.pid for c in _children(w.pid)]
        )
        kill_tree(supervisor.pid)  # no supervisor left to report it: only silence tells
        assert future.result(timeout=60) == "v"
    ((level, message),) = log.wait(rf"^worker {re.escape(name)} lost")
    assert level == "WARNING"
    assert re.search(
        r"lost \(no heartbeat for [\d.]+s\); re-queueing 1 of the 1 tasks it held$", message
    )


def test_draining_worker_hands_back_tasks(
    logged_pool: tuple[Pool, BrokerLog], tmp_path: Path
) -> None:
    pool, log = logged_pool
    holder = pool.start_worker(1, None, "--prefetch", "4")
    log.wait("joined")
    (name,) = worker_names(pool).values()
    started = tmp_path / "started"
    with fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as ex:
        futures = [ex.submit(tasks.record_then_sleep, str(started), i, 0.5) for i in range(5)]
        wait_for(lambda: query(pool.address)["running"] == 5, 20, "the worker to hold 5 tasks")
        # Held is not started: on a busy machine the first task may not have begun yet,
        # and then all 5 would be handed back.
        wait_for(started.exists, 20, "the worker to start its first task")
        holder.send_signal(signal.SIGTERM)  # drain: finish the running task, hand back 4
        log.wait(r"handed back")
        pool.start_worker()  # someone to run what was handed back
        assert sorted(f.result(timeout=60) for f in futures) == list(range(5))
    draining = log.wait(rf"^worker {re.escape(name)} is draining")[0]
    handed = log.wait("handed back")[0]
    assert draining == ("INFO", f"worker {name} is draining (5 tasks held)")
    assert handed == ("INFO", f"worker {name} handed back 4 unstarted tasks; re-queued them")
    ((level, left),) = log.wait(rf"^worker {re.escape(name)} left")
    assert (level, left) == ("INFO", f"worker {name} left; re-queueing the 0 tasks it held")


def _children(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return []
