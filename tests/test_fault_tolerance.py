"""Nothing is lost when workers, the broker or clients fail: tests that really kill things."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import tasks
from conftest import EXPIRY, INTERVAL, Pool, wait_for

import fade

pytestmark = pytest.mark.timeout(120)


def _runs(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def test_poison_task_fails_after_the_limit_while_others_succeed(tcp_pool: Pool) -> None:
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL, max_attempts=3) as ex:
        futures = [ex.submit(tasks.square, i) for i in range(50)]
        poison = ex.submit(tasks.die, 13)
        futures += [ex.submit(tasks.square, i) for i in range(50, 100)]
        with pytest.raises(fade.WorkerLostError) as info:
            poison.result(timeout=60)
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(100)]
        message = str(info.value)
        assert "attempted 3 times" in message
        assert "exit code 13" in message and "pid" in message
        assert isinstance(info.value, fade.FadeError)
        # The hosts kept their capacity: both supervisors replaced what died.
        assert len(tcp_pool.wait_workers(2)) == 2
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_poison_task_in_a_map(tcp_pool: Pool) -> None:
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL, max_attempts=2) as ex:
        results = ex.map(tasks.fail_or_die, range(20), [7] * 20)
        assert [next(results) for _ in range(7)] == list(range(7))
        with pytest.raises(fade.WorkerLostError, match="attempted 2 times"):
            next(results)


def test_task_that_raises_is_not_retried(fade_executor: fade.Executor, tmp_path: Path) -> None:
    log = tmp_path / "runs.txt"
    with pytest.raises(ValueError):
        fade_executor.submit(tasks.record_then_raise, str(log)).result(timeout=30)
    assert len(_runs(log)) == 1


def test_worker_process_that_exits_is_replaced(
    tcp_pool: Pool, fade_executor: fade.Executor, tmp_path: Path
) -> None:
    before = set(tcp_pool.wait_workers(2))
    marker = tmp_path / "died-once"
    assert fade_executor.submit(tasks.die_if_first, str(marker), "ok").result(timeout=60) == "ok"
    assert int(marker.read_text()) in before
    wait_for(lambda: len(set(tcp_pool.worker_pids()) - before) == 1, 20, "a replacement")
    assert len(tcp_pool.worker_pids()) == 2
    pids = {pid for _, pid in fade_executor.map(tasks.slow_where_marked, range(40), [0] * 40)}
    assert pids <= set(tcp_pool.worker_pids())


def test_task_timeout_stops_the_task_and_replaces_its_process(tcp_pool: Pool) -> None:
    before = set(tcp_pool.wait_workers(2))
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL, task_timeout=0.5) as ex:
        started = time.monotonic()
        hung = ex.submit(tasks.sleep_and_return, 60)
        quick = [ex.submit(tasks.square, i) for i in range(20)]
        with pytest.raises(fade.TaskTimeoutError, match=r"task_timeout of 0\.5s"):
            hung.result(timeout=30)
        assert time.monotonic() - started < 5
        assert [f.result(timeout=30) for f in quick] == [i * i for i in range(20)]

        def replaced() -> bool:
            now = set(tcp_pool.worker_pids())
            return len(now) == 2 and len(now - before) == 1

        wait_for(replaced, 20, "a fresh process in place of the one whose task hung")
        assert ex.submit(tasks.add, 2, 3).result(timeout=30) == 5


def test_busy_loop_task_keeps_heartbeating(fade_executor: fade.Executor) -> None:
    seconds = EXPIRY * 3
    assert fade_executor.submit(tasks.spin, seconds).result(timeout=30) > 0


def test_broker_killed_and_restarted_mid_map(tcp_pool: Pool) -> None:
    n = 2000
    done_calls: list[int] = []
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        futures = [ex.submit(tasks.sleep_and_return, 0.001, i) for i in range(n)]
        for f in futures:
            f.add_done_callback(lambda f: done_calls.append(f.result()))
        wait_for(lambda: sum(f.done() for f in futures) >= 200, 60, "some results")
        tcp_pool.kill_broker()
        # Submitting while the broker is down: held, and sent when it is back.
        while_down = [ex.submit(tasks.square, i) for i in range(50)]
        time.sleep(EXPIRY * 2)
        tcp_pool.start_broker()
        assert [f.result(timeout=60) for f in futures] == list(range(n))
        assert [f.result(timeout=60) for f in while_down] == [i * i for i in range(50)]
    assert sorted(done_calls) == list(range(n))


def test_broker_restart_reaches_workers_and_new_clients(tcp_pool: Pool) -> None:
    tcp_pool.kill_broker()
    tcp_pool.start_broker()
    seen: set[int] = set()
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:
            seen |= {pid for _, pid in ex.map(tasks.pid_after, range(4), [0.2] * 4)}
    assert seen == set(tcp_pool.worker_pids()), "a worker did not come back to the new broker"


def test_drained_worker_finishes_or_hands_back_and_nothing_runs_twice(
    tcp_pool: Pool, tmp_path: Path
) -> None:
    log = tmp_path / "runs.txt"
    n = 40
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        results = ex.map(tasks.record_then_sleep, [str(log)] * n, range(n), [0.1] * n)
        wait_for(lambda: len(_runs(log)) >= 4, 30, "the map to get going")
        leaving = tcp_pool.workers[0]
        leaving.send_signal(signal.SIGTERM)
        assert list(results) == list(range(n))
        assert leaving.wait(timeout=30) == 0
    runs = _runs(log)
    assert sorted(runs, key=int) == [str(i) for i in range(n)], "a task ran twice or not at all"


def test_client_loss_drops_its_tasks(tcp_pool: Pool, tmp_path: Path) -> None:
    """A client that vanishes (its process killed) has its queued tasks dropped."""
    import subprocess
    import sys
    import textwrap

    log = tmp_path / "runs.txt"
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import fade, tasks, time
            ex = fade.Executor({tcp_pool.address!r}, heartbeat_interval={INTERVAL})
            fs = [ex.submit(tasks.record_then_sleep, {str(log)!r}, i, 0.2) for i in range(200)]
            fs[0].result(timeout=30)
            print("running", flush=True)
            time.sleep(60)
            """
        )
    )
    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "running"
        client.kill()
        client.wait()
        time.sleep(EXPIRY + 1.0)
        ran = len(_runs(log))
        time.sleep(1.0)
        assert len(_runs(log)) == ran, "tasks of a dead client kept running"
        assert ran < 200
    finally:
        client.kill()
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_broker_memory_stays_flat_across_many_clients(tcp_pool: Pool) -> None:
    assert tcp_pool.broker is not None
    broker = psutil.Process(tcp_pool.broker.pid)

    def one_client(i: int) -> None:
        with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
            futures = [ex.submit(tasks.add, i, j) for j in range(1000)]
            assert [f.result(timeout=60) for f in futures] == [i + j for j in range(1000)]

    one_client(0)
    after_first = broker.memory_info().rss
    for i in range(1, 100):
        one_client(i)
    after_all = broker.memory_info().rss
    growth = after_all - after_first
    assert growth < 8 * 2**20, f"broker RSS grew by {growth / 2**20:.1f} MiB over 99 clients"


@pytest.mark.timeout(240)
def test_chaos_kills_stops_and_a_broker_restart(pool: Pool) -> None:
    pool.start_broker()
    pool.start_worker(2)
    pool.start_worker(2)
    pool.wait_workers(4)
    rng = random.Random(1234)
    n = 5000
    delivered: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    stopped: list[int] = []
    events: list[str] = []

    def chaos() -> None:
        actions = 0
        while not stop.wait(0.25):
            pids = pool.worker_pids()
            if not pids:
                continue
            victim = rng.choice(pids)
            actions += 1
            try:
                if actions == 6:
                    pool.kill_broker()
                    time.sleep(0.3)
                    pool.start_broker()
                    events.append("broker restart")
                elif actions % 3 == 0:
                    os.kill(victim, signal.SIGSTOP)
                    stopped.append(victim)
                    time.sleep(rng.uniform(0.1, EXPIRY * 1.5))
                    os.kill(victim, signal.SIGCONT)
                    events.append("stop")
                else:
                    os.kill(victim, signal.SIGKILL)
                    events.append("kill")
            except ProcessLookupError:
                pass

    # A task can be unlucky and lose several workers in a row here; the retry
    # limit is for tasks that kill workers themselves, so it is raised for chaos.
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL, max_attempts=50) as ex:
        futures = [ex.submit(tasks.sleep_and_return, 0.005, i) for i in range(n)]

        def on_done(f: cf.Future[int]) -> None:
            with lock:
                delivered.append(f.result())

        for f in futures:
            f.add_done_callback(on_done)
        agent = threading.Thread(target=chaos)
        agent.start()
        try:
            results = [f.result(timeout=200) for f in futures]
            # A Future runs callbacks once whatever comes; the broker must not even send a
            # second result for a task.
            late = ex._io.late_results
        finally:
            stop.set()
            agent.join()
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
    assert results == list(range(n))
    assert sorted(delivered) == list(range(n)), "a result was delivered twice or not at all"
    assert late == 0, f"the broker sent {late} results for tasks already complete"
    assert "broker restart" in events and events.count("kill") >= 3, events
