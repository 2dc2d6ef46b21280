"""Sharing one pool between clients, end to end (issue 16): real brokers, workers and
clients on loopback. The scheduler's decisions themselves are tested without processes in
tests/test_scheduler_sharing.py; here the whole path is.

Tasks record when they ran (wall clock), so shares are measured in worker-seconds, as the
issue asks, not in task counts.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
import tasks
import zmq
from conftest import EXPIRY, INTERVAL, Keys, Pool, fade_env, raw_hello, wait_for

import fade
from fade import protocol as p
from fade import security
from fade import serialization as ser
from fade.status import query
from fade.worker import LOAD_GRACE, STOP_GRACE

pytestmark = pytest.mark.timeout(120)


def spans(path: Path) -> dict[str, list[tuple[float, float]]]:
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        tag, start, end, _ = line.split()
        runs[tag].append((float(start), float(end)))
    return runs


def used(runs: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in runs)


@pytest.fixture
def four(pool: Pool) -> Pool:
    pool.start_broker()
    pool.start_worker(4)
    pool.wait_workers(4)
    wait_for(lambda: len(query(pool.address)["workers"]) == 4, 30, "4 workers")
    return pool


def test_two_clients_share_the_pool_by_time(four: Pool, tmp_path: Path) -> None:
    """120 ms tasks, then 30 ms tasks from a second client a second later: over the
    overlap each gets half the worker-seconds (by count, the second would get 80%)."""
    log = tmp_path / "spans"
    with (
        fade.Executor(four.address, heartbeat_interval=INTERVAL) as first,
        fade.Executor(four.address, heartbeat_interval=INTERVAL) as second,
    ):
        long = [first.submit(tasks.record_span, str(log), "A", 0.12) for _ in range(300)]
        time.sleep(1.0)
        arrived = time.time()
        short = [second.submit(tasks.record_span, str(log), "B", 0.03) for _ in range(150)]
        for f in short:
            f.result(timeout=60)
        first.shutdown(wait=False, cancel_futures=True)
        del long
    runs = spans(log)
    start = min(s for s, _ in runs["B"])
    end = max(e for _, e in runs["B"])
    a, b = used(runs["A"], start, end), used(runs["B"], start, end)
    assert 0.4 <= b / (a + b) <= 0.6, f"the second client got {b / (a + b):.0%} of the time"
    assert start - arrived < 0.12 + 0.5, "the second client waited more than a task for a slot"


def test_weights_set_on_the_broker_divide_the_pool(
    pool: Pool, curve_keys: Keys, tmp_path: Path
) -> None:
    names = ["heavy", "light1", "light2"]
    keys = {n: security.add_peer(curve_keys.dir, "client", n, tmp_path / f"{n}.key") for n in names}
    pool.start_broker("--keys", str(curve_keys.dir), "--weight", "heavy=2")
    pool.start_worker(4, None, "--keys", str(curve_keys.worker))
    pool.wait_workers(4)
    wait_for(lambda: len(query(pool.address, keys=keys["heavy"])["workers"]) == 4, 30, "workers")
    log = tmp_path / "spans"
    executors = [
        fade.Executor(pool.address, keys=keys[n], heartbeat_interval=INTERVAL) for n in names
    ]
    try:
        futures = {n: [] for n in names}  # type: dict[str, list[object]]
        for n, ex in zip(names, executors):
            futures[n] = [ex.submit(tasks.record_span, str(log), n, 0.05) for _ in range(200)]
        time.sleep(4.0)
    finally:
        for ex in executors:
            ex.shutdown(wait=True, cancel_futures=True)
    runs = spans(log)
    start = max(min(s for s, _ in runs[n]) for n in names)
    end = start + 2.5
    shares = {n: used(runs[n], start, end) for n in names}
    total = sum(shares.values())
    assert abs(shares["heavy"] / total - 0.5) <= 0.1, shares
    assert all(abs(shares[n] / total - 0.25) <= 0.1 for n in ("light1", "light2")), shares


def test_an_executor_past_its_quota_gets_the_documented_error(pool: Pool) -> None:
    """An ordinary client whose window is larger than its quota: the excess fails with
    QuotaExceededError naming the broker's option, the rest runs, the broker never holds
    more than the quota, and another client is served meanwhile."""
    pool.start_broker("--max-client-tasks", "3")
    pool.start_worker(2)
    pool.wait_workers(2)
    with (
        fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex,
        fade.Executor(pool.address, heartbeat_interval=INTERVAL) as other,
    ):
        futures = [ex.submit(tasks.sleep_and_return, 0.2, i) for i in range(30)]
        held = 0
        deadline = time.monotonic() + 60
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            held = max([held] + [c["tasks"] for c in query(pool.address)["clients"]])
            time.sleep(0.02)
        assert other.submit(tasks.add, 1, 2).result(timeout=30) == 3
        errors = [f.exception(timeout=0) for f in futures]
        refused = [e for e in errors if e is not None]
        assert refused and all(isinstance(e, fade.QuotaExceededError) for e in refused)
        assert "--max-client-tasks" in str(refused[0])
        assert [f.result() for f, e in zip(futures, errors) if e is None] == [
            i for i, e in enumerate(errors) if e is None
        ]
        assert 0 < held <= 3


def test_a_flooding_client_is_held_to_its_quota(pool: Pool, tmp_path: Path) -> None:
    """A client that ignores its window and pushes 200,000 tasks: the broker keeps at most
    its quota (and its memory bounded), refuses the rest, and another client's tasks
    start within about a task's duration."""
    pool.start_broker("--max-client-tasks", "20000")
    pool.start_worker(2)
    pool.wait_workers(2)
    broker = psutil.Process(pool.broker.pid)  # type: ignore[union-attr]
    before = broker.memory_info().rss
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        flood = ctx.socket(zmq.DEALER)
        flood.linger = 0
        flood.setsockopt(zmq.IDENTITY, b"C" + os.urandom(15))
        flood.connect(pool.address)
        flood.send_multipart(raw_hello("client"))
        payload = ser.dumps_call(tasks.sleep_and_return, (0.2,), {})
        for first in range(0, 200_000, 1000):
            batch = [(p.SubmitRecord(i, 0, 0.0), payload) for i in range(first + 1, first + 1001)]
            flood.send_multipart(p.encode_submit(batch))
        # The workers finish a few of the flood's tasks while it arrives, and each frees
        # a place under the quota: count what ran too. Refusals come in as the broker
        # reads the batches, with pauses of over a second on a loaded machine (a CI run
        # stopped counting at 5,000 after one): read until all that should be refused
        # are, then a little longer for any refused beyond that.
        refused = ran = 0
        deadline = time.monotonic() + 60
        settle: float | None = None
        while time.monotonic() < (deadline if settle is None else min(deadline, settle)):
            if settle is None and 200_000 - refused <= 20_000 + ran:
                settle = time.monotonic() + 0.5
            if flood.poll(100):
                message = p.parse(flood.recv_multipart())
                if message.command is p.Command.RESULT:
                    for record, body in p.decode_result(message.body)[1]:
                        if record.status is p.Status.REFUSED:
                            assert p.decode_refusal(body)[0] == "quota"
                            refused += 1
                        else:
                            ran += 1
        accepted = 200_000 - refused
        assert 20_000 <= accepted <= 20_000 + ran, (refused, ran)
        grown = broker.memory_info().rss - before
        # Measured 77 MiB here: the 20,000 kept tasks, and the peak of 180,000 refusals
        # waiting in the broker's send queue for a client that reads them slowly.
        assert grown < 128 * 2**20, f"the broker grew by {grown >> 20} MiB"
        log = tmp_path / "spans"
        with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as other:
            submitted = time.time()
            futures = [other.submit(tasks.record_span, str(log), "other", 0.0) for _ in range(20)]
            for f in futures:
                f.result(timeout=30)
        first_start = min(s for s, _ in spans(log)["other"])
        assert first_start - submitted < 0.2 + 0.5, "the other client waited behind the flood"
    finally:
        ctx.destroy(linger=0)


def test_a_later_high_priority_task_runs_before_earlier_low_ones(
    pool: Pool, tmp_path: Path
) -> None:
    pool.start_broker()
    pool.start_worker(1)
    pool.wait_workers(1)
    log = tmp_path / "spans"
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        low = [ex.submit(tasks.record_span, str(log), f"low{i}", 0.3) for i in range(4)]
        wait_for(lambda: log.exists() or ex._io.in_flight, 10, "the first task to start")  # type: ignore[attr-defined]
        time.sleep(0.1)
        high = ex.options(priority=10).submit(tasks.record_span, str(log), "high", 0.0)
        for f in [*low, high]:
            f.result(timeout=30)
    order = [
        tag for tag, _ in sorted(((t, r[0][0]) for t, r in spans(log).items()), key=lambda x: x[1])
    ]
    assert order.index("high") <= 1, order  # right after the one already running


# -- resources ------------------------------------------------------------------------------


def test_tasks_that_need_a_gpu_run_where_one_is_and_see_it(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    pool.start_broker()
    pool.start_worker(1, {"CUDA_VISIBLE_DEVICES": "7"}, "--resources", "gpu=1")
    pool.start_worker(1, None, "--resources", "")
    pool.wait_workers(2)
    wait_for(lambda: len(query(pool.address)["workers"]) == 2, 30, "2 workers")
    gpu_pid = next(w["pid"] for w in query(pool.address)["workers"] if w["resources"])
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        gpu = ex.options(resources={"gpu": 1})
        seen = [gpu.submit(tasks.visible_devices).result(timeout=30) for _ in range(6)]
        assert seen == [("7", gpu_pid)] * 6
        plain = {pid for _, pid in ex.map(tasks.pid_after, range(20), [0.05] * 20)}
        assert len(plain) == 2  # plain tasks use both
        with caplog.at_level(logging.WARNING, logger="fade.client"):
            waiting = ex.options(resources={"gpu": 2}).submit(tasks.add, 1, 1)
            wait_for(lambda: "no connected worker has the resources" in caplog.text, 10, "")
        state = query(pool.address)
        assert sum(c["waiting_for_resources"] for c in state["clients"]) == 1
        assert not waiting.done()
        # A result() that times out says so too ("did not finish within 1s" read like a
        # slow task).
        with pytest.raises(cf.TimeoutError, match=r"no connected worker has the resources"):
            waiting.result(timeout=1)
        ex.terminate(waiting)


# -- stopping running tasks ---------------------------------------------------------------------


def test_terminate_stops_a_running_task_and_its_worker_goes_on(tcp_pool: Pool) -> None:
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        running = ex.submit(tasks.sleep_and_return, 600)
        wait_for(lambda: query(tcp_pool.address)["running"] == 1, 10, "the task to start")
        pids = set(tcp_pool.worker_pids())
        asked = time.monotonic()
        assert ex.terminate(running)
        with pytest.raises(fade.TaskTerminatedError, match="terminated on request"):
            running.result(timeout=30)
        assert time.monotonic() - asked < 2 * INTERVAL + 0.5
        assert ex.terminate(running) is False  # done already
        assert set(tcp_pool.worker_pids()) == pids  # no process was replaced
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_a_stop_whose_first_signal_is_lost_still_stops_the_task(tcp_pool: Pool) -> None:
    # A stop signal that arrives just before the task enters a blocking call (say while
    # its thread waits for the GIL) does not interrupt that call: Python runs the handler
    # only when the call returns. CI met it: time.sleep(600) slept on, and the process
    # was replaced after the grace. The stop is signalled again until the task ends.
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        running = ex.submit(tasks.lose_the_first_stop_then_sleep, 600)
        wait_for(lambda: query(tcp_pool.address)["running"] == 1, 10, "the task to start")
        time.sleep(0.2)  # into its first sleep
        pids = set(tcp_pool.worker_pids())
        asked = time.monotonic()
        assert ex.terminate(running)
        with pytest.raises(fade.TaskTerminatedError, match="terminated on request"):
            running.result(timeout=30)
        assert time.monotonic() - asked < STOP_GRACE - 0.2  # not the grace running out
        assert set(tcp_pool.worker_pids()) == pids  # no process was replaced


@pytest.mark.parametrize("load", [0.4, STOP_GRACE + 1.0], ids=["short", "past-the-grace"])
def test_a_task_asked_to_stop_while_its_arguments_load_stops_when_they_have(
    tcp_pool: Pool, tmp_path: Path, load: float
) -> None:
    # The stop comes while the worker loads the task (its code, its arguments: its code
    # has not started): it must take effect as the code starts, however long fade's own
    # loading takes, not replace the process when the grace for a task that ignores its
    # stop runs out. (CI runs met this window twice by chance, under load.)
    marker = tmp_path / "loading"
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        running = ex.submit(tasks.sleep_and_return, 600, tasks.SlowToLoad(str(marker), load))
        wait_for(marker.exists, 10, "the task's arguments to start loading")
        pids = set(tcp_pool.worker_pids())
        asked = time.monotonic()
        assert ex.terminate(running)
        with pytest.raises(fade.TaskTerminatedError, match="terminated on request"):
            running.result(timeout=30)
        assert time.monotonic() - asked < load + STOP_GRACE
        assert set(tcp_pool.worker_pids()) == pids  # no process was replaced
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_a_task_whose_loading_hangs_has_its_process_replaced_when_asked_to_stop(
    tcp_pool: Pool, tmp_path: Path
) -> None:
    # Nothing waits forever: a load that never ends (an argument's unpickling that
    # hangs) is not waited for past LOAD_GRACE; the process is replaced as for a task
    # that will not stop.
    marker = tmp_path / "loading"
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        hung = ex.submit(tasks.sleep_and_return, 1, tasks.SlowToLoad(str(marker), 600))
        wait_for(marker.exists, 10, "the task's arguments to start loading")
        loading_pid = int(marker.read_text())
        asked = time.monotonic()
        assert ex.terminate(hung)
        with pytest.raises(fade.TaskTerminatedError):
            hung.result(timeout=LOAD_GRACE + 20)
        assert time.monotonic() - asked >= LOAD_GRACE  # it was given the time to load
        wait_for(lambda: loading_pid not in tcp_pool.worker_pids(), 20, "the process to go")
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_a_task_that_will_not_stop_has_its_process_replaced(tcp_pool: Pool) -> None:
    with fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL) as ex:
        stubborn = ex.submit(tasks.ignore_stop_signal_and_sleep, 600)
        wait_for(lambda: query(tcp_pool.address)["running"] == 1, 10, "the task to start")
        ex.terminate(stubborn)
        with pytest.raises(fade.TaskTerminatedError):
            stubborn.result(timeout=30)
        assert ex.submit(tasks.add, 2, 2).result(timeout=30) == 4


def test_shutdown_can_terminate_what_runs(tcp_pool: Pool) -> None:
    ex = fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL)
    futures = [ex.submit(tasks.sleep_and_return, 600) for _ in range(4)]
    wait_for(lambda: query(tcp_pool.address)["running"] == 2, 10, "two tasks to start")
    started = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True, terminate=True)
    assert time.monotonic() - started < 10
    assert all(f.done() for f in futures)
    # What had reached the broker (running or queued there) is terminated; the rest, still
    # here, is cancelled.
    assert all(
        f.cancelled() or isinstance(f.exception(), fade.TaskTerminatedError) for f in futures
    )


def test_a_killed_client_frees_every_worker(pool: Pool) -> None:
    pool.start_broker()
    pool.start_worker(4)
    pool.wait_workers(4)
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fade, tasks, time
                ex = fade.Executor({pool.address!r}, heartbeat_interval={INTERVAL})
                futures = [ex.submit(tasks.sleep_and_return, 600) for _ in range(100)]
                print("SUBMITTED", flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=fade_env(),
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "SUBMITTED"
        wait_for(lambda: query(pool.address)["running"] == 4, 20, "the workers to be busy")
        client.send_signal(signal.SIGKILL)
        client.wait()
        killed = time.monotonic()
        wait_for(
            lambda: (s := query(pool.address))["running"] == 0 and s["queued"] == 0,
            EXPIRY + 5,
            "the workers to be free",
        )
        assert time.monotonic() - killed < EXPIRY + 2 * INTERVAL + 1.0
        with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
            assert sorted(ex.map(tasks.add, range(8), range(8))) == [2 * i for i in range(8)]
    finally:
        client.kill()
        client.wait()
