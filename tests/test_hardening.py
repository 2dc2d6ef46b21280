"""Nothing waits forever (issue 13, item 2): every case here hung, looped or crashed
before, and each test reproduces it as it was found.

Real brokers, workers and clients on loopback; a hand-made peer (pyzmq directly)
where a misbehaving or newer one is needed.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import tasks
import zmq
from conftest import (
    EXPIRY,
    INTERVAL,
    Keys,
    Pool,
    fade_env,
    free_port,
    kill_tree,
    make_executor,
    other_python,
    python_with,
    raw_hello,
    wait_for,
)
from dists import make_dist

import fade
from fade import protocol as p
from fade.options import WorkerOptions
from fade.status import query

pytestmark = pytest.mark.timeout(90)


def run_script(code: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a client script in its own interpreter; fail (never hang) past ``timeout``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=fade_env(**env),
    )


# -- addresses and the constructor ---------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:5555", "tcp://127.0.0.1", "tcp://:5555", "udp://127.0.0.1:5555", "tcp://h:x", ""],
)
def test_a_malformed_address_is_refused_by_the_constructor(address: str) -> None:
    with pytest.raises(ValueError, match="tcp://"):
        fade.Executor(address)


def test_an_int_is_max_workers_and_other_types_are_refused() -> None:
    with fade.Executor(1) as ex:
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
        assert len(ex._pool.pids) == 1  # type: ignore[union-attr]  # one worker process
    for bad in (4.5, b"tcp://127.0.0.1:5555", object(), True):
        with pytest.raises(TypeError):
            fade.Executor(bad)  # type: ignore[arg-type]
    for bad in (1.5, "4"):  # by name too, as ProcessPoolExecutor refuses them
        with pytest.raises(TypeError, match="max_workers must be an int"):
            fade.Executor(max_workers=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"priority": object()}, TypeError),
        ({"priority": 1 << 20}, ValueError),
        ({"resources": {"gpu": -1}}, ValueError),
        ({"resources": "gpu"}, ValueError),
    ],
)
def test_bad_options_are_refused_before_a_pool_starts(options: dict, error: type) -> None:
    """A constructor that raises leaves no embedded pool behind: nobody could stop it."""
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with pytest.raises(error):
        fade.Executor(**options)
    after = {child.pid for child in psutil.Process().children(recursive=True)}
    assert after <= before, "the constructor started processes"


# -- a broker that cannot be reached ----------------------------------------------------------


def test_no_broker_fails_futures_naming_the_address_and_exit_is_prompt() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_script(
        f"""
        import fade, tasks
        ex = fade.Executor({address!r}, connect_timeout=2)
        future = ex.submit(tasks.add, 1, 2)
        try:
            future.result(timeout=30)
        except fade.BrokerUnreachableError as exc:
            print("FAILED:", exc)
        pending = ex.submit(tasks.add, 3, 4)  # left pending at exit
        """,
        timeout=60,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert f"FAILED: the broker at {address} never answered" in result.stdout
    assert "not running" in result.stdout
    assert took < 20, f"the script took {took:.1f}s"


def test_a_result_wait_that_times_out_says_why() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with fade.Executor(address, connect_timeout=30) as ex:
        future = ex.submit(tasks.add, 1, 2)
        with pytest.raises(TimeoutError, match=f"no answer yet from the broker at {address}"):
            future.result(timeout=0.5)
        ex.shutdown(wait=False, cancel_futures=True)


def test_a_result_wait_on_a_pool_without_workers_says_so(pool: Pool) -> None:
    # It said only "the task did not finish within 1s": a pool with no worker started
    # looks the same as a slow task.
    pool.start_broker()
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        future = ex.submit(tasks.add, 1, 2)
        with pytest.raises(TimeoutError, match="no worker is connected to the broker"):
            future.result(timeout=1)
        pool.start_worker(1)
        assert future.result(timeout=30) == 3
        slow = ex.submit(tasks.sleep_and_return, 3)
        with pytest.raises(TimeoutError, match=r"did not finish within 0\.5s") as info:
            slow.result(timeout=0.5)
        assert "no worker" not in str(info.value)


def test_tasks_waiting_on_a_pool_without_workers_are_named_without_a_timeout(
    pool: Pool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A result() or a map with no timeout on a pool whose workers never came (not
    # started, started with the wrong keys, a batch job still queued) waited in
    # silence: nothing said why, ever. After a while the client says it, once.
    from fade import clientio

    monkeypatch.setattr(clientio, "NO_WORKERS_WARNING", 1.0)
    pool.start_broker()
    with (
        caplog.at_level(logging.WARNING, logger="fade.client"),
        fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex,
    ):
        futures = [ex.submit(tasks.add, i, 1) for i in range(3)]
        wait_for(lambda: "no worker is connected" in caplog.text, 20, "the warning")
        (record,) = [r for r in caplog.records if "no worker is connected" in r.getMessage()]
        message = record.getMessage()
        assert message.startswith("3 tasks have waited")
        assert f"fade-worker {pool.address}" in message
        pool.start_worker(1)
        assert [f.result(timeout=30) for f in futures] == [1, 2, 3]
        time.sleep(1.5)  # a task that waits no more: no second warning
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
    assert caplog.text.count("no worker is connected") == 1


@pytest.mark.timeout(180)
def test_tasks_waiting_for_tasks_of_their_own_pool_on_every_worker_are_named_a_deadlock(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    # A task that submits to its own pool and waits, on a pool whose every worker runs
    # such a task: nothing can ever finish, and nothing said so, anywhere.
    pool.start_broker()
    pool.start_worker(1)
    wait_for(lambda: len(query(pool.address)["workers"]) == 1, 30, "the worker")
    with (
        caplog.at_level(logging.WARNING, logger="fade.client"),
        fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex,
    ):
        parent = ex.submit(tasks.wait_on_own_pool, pool.address)
        wait_for(lambda: "deadlock" in caplog.text, 60, "the deadlock to be named")
        with pytest.raises(TimeoutError, match="waits for tasks it submitted to this pool"):
            parent.result(timeout=0.1)
        pool.start_worker(1)  # a worker to run the child: the parent finishes
        assert parent.result(timeout=60) == 3
        # Control: with a worker free for the child, no deadlock is named.
        assert ex.submit(tasks.wait_on_own_pool, pool.address).result(timeout=60) == 3
        time.sleep(3)
    assert caplog.text.count("deadlock") == 1, caplog.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["embedded", "tcp"])
def test_a_task_that_holds_the_gil_is_not_taken_for_a_dead_worker(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # A task in native code that holds the GIL (a backtracking regular expression, a
    # sort of a huge list) silences its worker's heartbeats: the broker took the worker
    # for dead, ran the task again elsewhere, and after 3 such losses the task failed
    # with WorkerLostError ("it may crash its worker"), though nothing had crashed.
    ex = make_executor(kind, request)
    runs = tmp_path / "runs"
    try:
        held = ex.submit(tasks.hold_the_gil, str(runs), 4 * EXPIRY).result(timeout=90)
        assert held >= 4 * EXPIRY  # one hold of four expiries: lost three times before
        assert len(runs.read_text().splitlines()) == 1  # it ran once, where it began
        # Control: a worker that is stopped (SIGSTOP) is still found out, its task run
        # again elsewhere.
        stopped_runs = tmp_path / "stopped"
        future = ex.submit(tasks.record_then_sleep, str(stopped_runs), "x", 3.0)
        wait_for(stopped_runs.exists, 30, "the task to start")
        pid = int(stopped_runs.read_text().split()[1])
        os.kill(pid, signal.SIGSTOP)
        try:
            assert future.result(timeout=30) == "x"
            assert len(stopped_runs.read_text().splitlines()) == 2
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["embedded", "tcp"])
def test_a_client_that_holds_the_gil_loses_no_task(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # The embedded broker runs in the client's process: the client's own code holding
    # the GIL (a regular expression, a sort of a huge list) stopped it too. The workers
    # took its silence for a dead broker and reconnected; once it ran again, the messages
    # left in their old connections came in under names ZeroMQ made up, as workers of
    # their own, the tasks went to those, and were lost: WorkerLostError, or run again.
    runs = tmp_path / "runs"
    ex = make_executor(kind, request)
    try:
        futures = [ex.submit(tasks.record_then_sleep, str(runs), i, 1.0) for i in range(2)]
        wait_for(lambda: runs.exists() and len(runs.read_text().splitlines()) == 2, 30, "tasks")
        assert tasks.hold_the_gil(str(tmp_path / "held"), 6 * EXPIRY) >= 6 * EXPIRY
        assert [f.result(timeout=60) for f in futures] == [0, 1]
        assert sorted(runs.read_text().split()[::2]) == ["0", "1"]  # each ran once
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
        address = ex._pool.address if kind == "embedded" else ex.address  # type: ignore[attr-defined]
        assert len(query(address)["workers"]) == 2
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(120)
def test_a_broker_stopped_for_a_while_loses_no_task_and_makes_up_no_worker(
    pool: Pool, tmp_path: Path
) -> None:
    # The same on a broker of its own, stopped (SIGSTOP: a paused VM, a laptop asleep)
    # for several expiries while its workers ran tasks: once back, it took every peer
    # for lost (dropping the client's tasks, re-queueing the workers'), and only their
    # re-registration put things right.
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        pool.start_broker(stderr=out.fileno())
    pool.start_worker(2)
    wait_for(lambda: len(query(pool.address)["workers"]) == 2, 30, "the workers")
    runs = tmp_path / "runs"
    assert pool.broker is not None
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        # Tasks that run on after the broker is back, and one in the queue.
        futures = [ex.submit(tasks.record_then_sleep, str(runs), i, 8 * EXPIRY) for i in range(3)]
        wait_for(lambda: runs.exists() and len(runs.read_text().splitlines()) == 2, 30, "tasks")
        pool.broker.send_signal(signal.SIGSTOP)
        try:
            time.sleep(6 * EXPIRY)
        finally:
            pool.broker.send_signal(signal.SIGCONT)
        assert [f.result(timeout=60) for f in futures] == [0, 1, 2]
        assert sorted(runs.read_text().split()[::2]) == ["0", "1", "2"]  # each ran once
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
        assert len(query(pool.address)["workers"]) == 2
    said = log.read_text()
    assert "did not run for" in said
    assert " lost " not in said, said


@pytest.mark.timeout(120)
def test_workers_vouched_for_at_the_brokers_interval_not_their_own(
    pool: Pool, tmp_path: Path
) -> None:
    # The broker expires a worker after 0.6 s (0.2 s x 3); the worker's supervisor was
    # started with the defaults (1 s). It vouched for its workers once a second, at its
    # own interval: a task holding the GIL was taken for dead between two vouches.
    pool.start_broker()
    log = tmp_path / "workers.log"
    with open(log, "wb") as out:
        for _ in range(2):
            pool.start_worker(
                1,
                None,
                "--heartbeat-interval",
                "1.0",
                "--heartbeat-liveness",
                "3",
                stderr=out.fileno(),
            )
    wait_for(lambda: len(query(pool.address)["workers"]) == 2, 30, "the workers")
    runs = tmp_path / "runs"
    with fade.Executor(pool.address) as ex:  # the client's defaults, too
        held = ex.submit(tasks.hold_the_gil, str(runs), 4 * EXPIRY).result(timeout=90)
        assert held >= 4 * EXPIRY
        assert len(runs.read_text().splitlines()) == 1  # it ran once, where it began
    # Nor did the worker take the broker for silent: it was its own thread that could
    # not run, and what the broker sent meanwhile was waiting for it.
    assert "silent" not in log.read_text(), log.read_text()


def test_a_keyed_broker_without_keys_says_it_requires_keys(pool: Pool, curve_keys: Keys) -> None:
    pool.start_broker("--keys", str(curve_keys.dir))
    with (
        fade.Executor(pool.address, connect_timeout=2) as ex,
        pytest.raises(fade.BrokerUnreachableError, match=r"requires keys"),
    ):
        ex.submit(tasks.add, 1, 2).result(timeout=30)


def test_another_pools_key_is_named(pool: Pool, curve_keys: Keys, tmp_path: Path) -> None:
    from conftest import make_keys

    other = make_keys(tmp_path / "other")
    pool.start_broker("--keys", str(curve_keys.dir))
    with (
        fade.Executor(pool.address, keys=other.client, connect_timeout=2) as ex,
        pytest.raises(fade.BrokerUnreachableError, match=re.escape(pool.address)),
    ):
        ex.submit(tasks.add, 1, 2).result(timeout=30)


def test_a_broker_killed_for_good_ends_the_script_within_the_bound(pool: Pool) -> None:
    """The interpreter exits with futures pending and the broker gone for good."""
    pool.start_broker()
    pool.start_worker()
    pool.wait_workers(1)
    script = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fade, tasks, sys
                ex = fade.Executor({pool.address!r}, heartbeat_interval={INTERVAL},
                                   reconnect_timeout=3)
                futures = [ex.submit(tasks.sleep_and_return, 60, i) for i in range(4)]
                print("SUBMITTED", flush=True)
                sys.stdin.readline()  # the test kills the broker, then lets us exit
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=fade_env(),
    )
    try:
        assert script.stdout is not None and script.stdin is not None
        assert script.stdout.readline().strip() == "SUBMITTED"
        time.sleep(0.5)
        pool.kill_broker()
        started = time.monotonic()
        script.stdin.write("\n")
        script.stdin.flush()
        _, err = script.communicate(timeout=30)
        took = time.monotonic() - started
        # The bound: reconnect_timeout (3 s) after the last word from the broker.
        assert took < 3 + 5, f"exit took {took:.1f}s"
        assert f"the broker at {pool.address} stopped answering" in err
    finally:
        kill_tree(script.pid)


@pytest.mark.timeout(120)
def test_a_client_stopped_longer_than_its_reconnect_timeout_gets_its_results(
    pool: Pool, tmp_path: Path
) -> None:
    """Ctrl-Z, then fg: the client was stopped (SIGSTOP) past its reconnect_timeout while
    its tasks ran. Its time stopped is neither the broker's silence nor its own."""
    pool.start_broker()
    pool.start_worker(2)
    wait_for(lambda: len(query(pool.address)["workers"]) == 2, 30, "the workers")
    runs = tmp_path / "runs"
    script = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fade, tasks
                with fade.Executor({pool.address!r}, heartbeat_interval={INTERVAL},
                                   reconnect_timeout=2) as ex:
                    futures = [ex.submit(tasks.record_then_sleep, {str(runs)!r}, i, 3.0)
                               for i in range(2)]
                    print([f.result(timeout=60) for f in futures], flush=True)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=fade_env(),
    )
    try:
        wait_for(lambda: runs.exists() and len(runs.read_text().splitlines()) == 2, 30, "tasks")
        script.send_signal(signal.SIGSTOP)
        time.sleep(5)  # past the reconnect timeout and the tasks' end
        script.send_signal(signal.SIGCONT)
        out, err = script.communicate(timeout=60)
        assert out.strip() == "[0, 1]", err
        assert sorted(runs.read_text().split()[::2]) == ["0", "1"]  # each ran once
        assert "Unreachable" not in err and "stopped answering" not in err, err
    finally:
        kill_tree(script.pid)


def test_a_pool_on_an_ipv6_address_works(pool: Pool) -> None:
    # libzmq speaks IPv4 only unless told: the broker failed with "No such device", and
    # workers and clients waited for a broker they could never reach.
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"this host has no IPv6 loopback: {exc}")
    pool.host = "[::1]"
    pool.start_broker()
    pool.start_worker(1)
    pool.wait_workers(1)
    with fade.Executor(pool.address, connect_timeout=20) as ex:
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
    wait_for(lambda: query(pool.address)["workers"], 20, "the worker in fade-status")


def test_a_worker_pointed_at_a_name_that_does_not_resolve_says_so(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as f:
        worker = subprocess.Popen(
            [sys.executable, "-m", "fade.worker", "tcp://no-such-host.invalid:5555"],
            stderr=f,
        )
    try:
        wait_for(lambda: "does not resolve" in log.read_text(), 20, "the resolution error")
        assert "no-such-host.invalid" in log.read_text()
    finally:
        kill_tree(worker.pid)


# -- results that misbehave --------------------------------------------------------------------


def test_a_result_that_exits_while_unpickled_fails_only_its_future(
    fade_executor: fade.Executor,
) -> None:
    future = fade_executor.submit(tasks.exits_on_unpickle)
    with pytest.raises(fade.ResultDecodeError, match="SystemExit"):
        future.result(timeout=30)
    assert fade_executor.submit(tasks.add, 2, 2).result(timeout=30) == 4


# -- heartbeat settings follow the broker --------------------------------------------------------


def test_peers_follow_the_brokers_heartbeat_settings(pool: Pool, tmp_path: Path) -> None:
    """A broker with a short interval and a client with the defaults: the client used to
    be declared lost every 0.8 s, its tasks dropped and re-sent, again and again."""
    pool.interval, pool.liveness = 0.2, 4
    pool.start_broker()
    pool.start_worker()
    pool.start_worker()
    pool.wait_workers(2)
    marker = tmp_path / "runs.txt"
    with fade.Executor(pool.address) as ex:  # default heartbeat settings
        futures = [ex.submit(tasks.record_then_sleep, str(marker), i, 1.0) for i in range(2)]
        long = ex.submit(tasks.sleep_and_return, 3.0, "late")
        assert [f.result(timeout=30) for f in futures] == [0, 1]
        assert long.result(timeout=30) == "late"
    runs = marker.read_text().split()[::2]
    assert sorted(runs) == ["0", "1"], f"tasks ran again: {runs}"


# -- frames over a receiver's limit -------------------------------------------------------------


def test_a_result_over_the_clients_limit_fails_its_future(tcp_pool: Pool) -> None:
    with fade.Executor(
        tcp_pool.address, heartbeat_interval=INTERVAL, max_message_size=1 << 20
    ) as ex:
        big = ex.submit(tasks.bytes_of_size, 2 << 20)
        with pytest.raises(fade.MessageTooLargeError, match="max_message_size"):
            big.result(timeout=30)
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_an_exception_over_the_brokers_limit_fails_its_future_and_names_it(pool: Pool) -> None:
    # Its DONE went over the broker's limit: the broker dropped the worker's connection,
    # the task was lost, and its future waited for ever.
    pool.start_broker("--max-message-size", "1M")
    pool.start_worker(1)
    pool.wait_workers(1)
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        with pytest.raises(fade.MessageTooLargeError, match="limit on its way back") as info:
            ex.submit(tasks.raise_big, 2 << 20).result(timeout=30)
        message = str(info.value)
        assert "ValueError: too much: xxx" in message and "raise_big" in message, message
        assert len(message) < 10_000, len(message)
        with pytest.raises(ValueError, match="too much"):  # under the limit: as raised
            ex.submit(tasks.raise_big, 100_000).result(timeout=30)
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_an_exception_over_the_clients_limit_fails_its_future(tcp_pool: Pool) -> None:
    with fade.Executor(
        tcp_pool.address, heartbeat_interval=INTERVAL, max_message_size=1 << 20
    ) as ex:
        with pytest.raises(fade.MessageTooLargeError, match="max_message_size"):
            ex.submit(tasks.raise_big, 2 << 20).result(timeout=30)
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_a_map_chunk_over_the_brokers_limit_says_to_lower_the_chunksize(pool: Pool) -> None:
    # Each call's arguments (~0.6 MB) are under the limit; five together are not.
    pool.start_broker("--max-message-size", "1M")
    pool.start_worker(1)
    pool.wait_workers(1)
    lists = [list(range(i, 100_000 + i)) for i in range(10)]
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        with pytest.raises(fade.MessageTooLargeError, match="chunksize=5") as info:
            list(ex.map(len, lists, chunksize=5))
        assert "broker accepts at most 1048576" in str(info.value)
        assert "a smaller chunksize" in str(info.value)
        assert list(ex.map(len, lists, chunksize=1)) == [100_000] * 10
        # The way back: each result under the limit, a chunk of them over it.
        with pytest.raises(fade.MessageTooLargeError, match="chunksize=4"):
            list(ex.map(tasks.bytes_of_size, [400_000] * 8, chunksize=4))


def test_workers_never_get_a_frame_over_their_limit(pool: Pool) -> None:
    pool.start_broker()
    for _ in range(2):
        pool.start_worker(2, None, "--max-message-size", "1M")
    pool.wait_workers(4)
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        with pytest.raises(fade.MessageTooLargeError, match="--max-message-size"):
            ex.submit(tasks.identity, b"x" * (2 << 20)).result(timeout=30)
        # Tasks under the limit that a batch would have put together over it.
        payloads = [bytes([i]) * (300 << 10) for i in range(40)]
        futures = [ex.submit(tasks.identity, data) for data in payloads]
        assert [f.result(timeout=60) for f in futures] == payloads
        assert len(set(ex.map(tasks.pid_after, range(40), [0.05] * 40))) > 1


# -- protocol versions -----------------------------------------------------------------------


def _fake_broker(
    port: int, version: int
) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    """A ROUTER that answers everything with an ERROR of another protocol version."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"tcp://127.0.0.1:{port}")
    return ctx, router


def _answer_with_errors(router: zmq.Socket[bytes], version: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if router.poll(50):
            identity, *_ = router.recv_multipart()
            router.send_multipart([identity, *p.encode_error("I speak another", version)])


def test_a_client_against_a_newer_broker_fails_naming_both_versions() -> None:
    port = free_port()
    ctx, router = _fake_broker(port, p.VERSION + 1)
    try:
        ex = fade.Executor(f"tcp://127.0.0.1:{port}")
        future = ex.submit(tasks.add, 1, 2)
        _answer_with_errors(router, p.VERSION + 1, 2.0)
        with pytest.raises(
            fade.ProtocolVersionError, match=f"version {p.VERSION}.*version {p.VERSION + 1}"
        ):
            future.result(timeout=10)
        with pytest.raises(fade.BrokenPoolError):
            ex.submit(tasks.add, 1, 2)
        ex.shutdown()
    finally:
        ctx.destroy(linger=0)


def test_a_worker_against_a_newer_broker_stops_and_says_why(tmp_path: Path) -> None:
    port = free_port()
    ctx, router = _fake_broker(port, p.VERSION + 1)
    log = tmp_path / "worker.log"
    try:
        with log.open("wb") as f:
            worker = subprocess.Popen(
                [sys.executable, "-m", "fade.worker", f"tcp://127.0.0.1:{port}"], stderr=f
            )
        _answer_with_errors(router, p.VERSION + 1, 3.0)
        assert worker.wait(timeout=30) == 2
        assert (
            f"the broker at tcp://127.0.0.1:{port} speaks version {p.VERSION + 1}"
            in log.read_text()
        )
    finally:
        kill_tree(worker.pid)
        ctx.destroy(linger=0)


def test_a_newer_peer_gets_an_error_it_can_read(tcp_pool: Pool) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        newer = ctx.socket(zmq.DEALER)
        newer.linger = 0
        newer.connect(tcp_pool.address)
        newer.send_multipart([p.MAGIC + bytes((p.VERSION + 1, p.Command.HELLO)), b"{}"])
        assert newer.poll(10_000)
        header, text = newer.recv_multipart()
        assert header == p.MAGIC + bytes((p.VERSION, p.Command.ERROR))  # our version: read it
        assert f"speaks protocol version {p.VERSION}".encode() in text
    finally:
        ctx.destroy(linger=0)


def test_a_peer_without_an_identity_of_its_own_is_told_and_never_registered(
    tcp_pool: Pool,
) -> None:
    # ZeroMQ names a connection that set no identity itself (first byte 0), and so it
    # names what is left in a connection a reconnected peer took over: the broker
    # registers neither (such leftovers became workers that were never there).
    hello = raw_hello("client")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        anonymous = ctx.socket(zmq.DEALER)
        anonymous.linger = 0
        anonymous.connect(tcp_pool.address)
        anonymous.send_multipart(hello)
        assert anonymous.poll(10_000)
        header, text = anonymous.recv_multipart()
        assert header == p.MAGIC + bytes((p.VERSION, p.Command.ERROR))
        assert b"routing identity of its own" in text
        assert query(tcp_pool.address)["clients"] == []
        # Control: the same HELLO from a socket with an identity is welcome.
        named = ctx.socket(zmq.DEALER)
        named.linger = 0
        named.setsockopt(zmq.IDENTITY, b"C" + os.urandom(15))
        named.connect(tcp_pool.address)
        named.send_multipart(hello)
        assert named.poll(10_000)
        assert p.parse(named.recv_multipart()).command is p.Command.WELCOME
    finally:
        ctx.destroy(linger=0)


# -- Python versions ---------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_an_older_cloudpickle_is_named_at_start(pool: Pool) -> None:
    # fade needs cloudpickle 3; with 2.2.1 beside it (pip install --no-deps, a
    # PYTHONPATH) a worker started and then failed every function pickled by value with
    # "Can't get attribute '_function_setstate' on <module 'cloudpickle.cloudpickle'>",
    # and a client failed each submit with "module 'cloudpickle.cloudpickle' has no
    # attribute '_code_reduce'": neither named the versions or the fix.
    python = python_with("cloudpickle-2", ["pyzmq>=25", "cloudpickle==2.2.1"])
    pool.start_broker()
    expected = "fade needs cloudpickle 3 or later, and this Python"
    worker = subprocess.run(
        [str(python), "-m", "fade.worker", pool.address, *pool._timing()],
        env=fade_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode != 0
    assert expected in worker.stderr and "has cloudpickle 2.2.1" in worker.stderr
    script = f"import fade\nfade.Executor({pool.address!r}).submit(len, 'ab').result(30)"
    client = subprocess.run(
        [str(python), "-c", script], env=fade_env(), capture_output=True, text=True, timeout=60
    )
    assert client.returncode != 0
    assert expected in client.stderr and "pip install 'cloudpickle>=3'" in client.stderr


@pytest.mark.timeout(240)
def test_a_worker_on_another_python_never_gets_the_task(pool: Pool, tmp_path: Path) -> None:
    """A closure's bytecode from one minor version crashes a worker of another; a task
    that needs an installed package of the client's cannot run there either. Both fail
    before running, naming both sides, and the pool stays usable."""
    minor = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    python = other_python(minor)
    pool.start_broker()
    worker = subprocess.Popen(
        [str(python), "-m", "fade.worker", pool.address, *pool._timing()], env=fade_env()
    )
    pool.workers.append(worker)
    pool.wait_workers(1, timeout=60)
    offset = 10

    def closure(x: int) -> int:
        return x + offset

    # An installed distribution only this client has: it would travel to a worker of
    # our Python, not to this one.
    site = tmp_path / "client-site"
    make_dist(site, "fade-hardening-dist", "1.0", {"fadehardening/__init__.py": "X = 7\n"})
    sys.path.insert(0, str(site))
    try:
        import fadehardening  # type: ignore[import-not-found]

        with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
            wait_for(lambda: ex._io.capacity > 0, 30, "the worker to register")  # type: ignore[attr-defined]
            before = set(pool.worker_pids())
            this = f"{sys.version_info[0]}.{sys.version_info[1]}"
            for fn, args in ((closure, (1,)), (getattr, (fadehardening, "X"))):
                with pytest.raises(fade.IncompatibleWorkerError) as caught:
                    ex.submit(fn, *args).result(timeout=30)
                message = str(caught.value)
                assert f"client CPython {this}" in message and "on host" in message
                assert f"workers: CPython {minor}" in message
            assert set(pool.worker_pids()) == before  # no worker died for it
            pool.start_worker()  # a worker of our own version: the pool is usable
            wait_for(lambda: len(query(pool.address)["workers"]) == 2, 30, "the second worker")
            assert ex.submit(closure, 1).result(timeout=60) == 11
            assert ex.submit(getattr, fadehardening, "X").result(timeout=60) == 7
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("fadehardening", None)


# -- done-callbacks ---------------------------------------------------------------------------


@pytest.mark.parametrize("wait", ["result", "exception", "result-timeout"])
def test_a_done_callback_waiting_for_a_pending_future_is_told_why_instead_of_hanging(
    wait: str,
) -> None:
    """Done-callbacks run on the client's I/O thread, the one that delivers results: one
    that waited there for another future froze the whole executor for ever."""
    with fade.Executor(max_workers=1) as ex:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
        seen: list[BaseException | None] = []
        later: cf.Future[None] | None = None

        def waiter(_: object) -> None:
            assert later is not None
            try:
                if wait == "result":
                    later.result()
                elif wait == "exception":
                    later.exception()
                else:
                    later.result(timeout=60)
                seen.append(None)
            except BaseException as exc:
                seen.append(exc)

        # One worker: ``later`` runs after ``first``, so it is pending when first's
        # callback runs (on the I/O thread: first is still running when it is added).
        first = ex.submit(time.sleep, 0.2)
        later = ex.submit(time.sleep, 0.5)
        first.add_done_callback(waiter)
        assert later.result(timeout=30) is None
        assert ex.submit(tasks.add, 3, 3).result(timeout=30) == 6
        wait_for(lambda: seen, 10, "the callback to run")
    assert isinstance(seen[0], RuntimeError), seen
    assert "done-callback" in str(seen[0]) and "I/O thread" in str(seen[0]), seen


def test_a_done_callback_may_read_its_own_future_and_submit() -> None:
    with fade.Executor(max_workers=2) as ex:
        chained: list[cf.Future[int]] = []
        future = ex.submit(tasks.add, 1, 1)
        future.add_done_callback(lambda f: chained.append(ex.submit(tasks.add, f.result(), 1)))
        wait_for(lambda: chained, 30, "the callback to run")
        assert chained[0].result(timeout=30) == 3


# -- what cannot be sent to a task ------------------------------------------------------------


def test_an_executor_or_a_future_sent_to_a_task_is_refused_by_name() -> None:
    """Not "cannot pickle '_thread.RLock' object": what was sent, and what to do instead."""
    with fade.Executor(max_workers=1) as ex:
        first = ex.submit(tasks.add, 1, 1)
        assert first.result(timeout=30) == 2
        with pytest.raises(fade.SerializationError, match=r"a fade\.Executor cannot be sent"):
            ex.submit(tasks.identity, ex).result(timeout=30)
        with pytest.raises(fade.SerializationError, match=r"a fade\.Executor cannot be sent"):
            ex.submit(lambda: ex.submit(tasks.add, 1, 1)).result(timeout=30)
        with pytest.raises(fade.SerializationError, match=r"future.result\(\)"):
            ex.submit(tasks.identity, first).result(timeout=30)
        assert ex.submit(tasks.identity, first.result()).result(timeout=30) == 2


# -- forks ---------------------------------------------------------------------------------


def test_a_forked_child_exiting_leaves_the_parents_pool_alone() -> None:
    with fade.Executor(max_workers=1, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
        pid = os.fork()
        if pid == 0:  # the child exits normally: its atexit handlers run
            os._exit(_exit_normally())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        folder = Path(ex.address.removeprefix("ipc://")).parent
        assert folder.exists(), "the child removed the parent's socket folder"
        # Workers replaced now must still reach the broker.
        for worker in list(ex._pool._supervisor.pids):  # type: ignore[union-attr]
            os.kill(worker, signal.SIGKILL)
        assert ex.submit(tasks.add, 2, 2).result(timeout=30) == 4


@pytest.mark.parametrize(("how", "status"), [("return", 0), ("raise", 1), ("exit", 3)])
def test_a_tasks_forked_child_that_comes_back_into_the_worker_ends_there(
    how: str, status: int
) -> None:
    # The child went on as a copy of the worker process (its socket, its loop), and the
    # parent's waitpid, with the task, waited for ever; ProcessPoolExecutor sends the
    # child's outcome as the task's (or hangs, on sys.exit). It ends as a
    # multiprocessing child does, its status from what it did.
    with fade.Executor(max_workers=1) as ex:
        future = ex.submit(tasks.fork_and_come_back, how)
        assert future.result(timeout=30) == ("parent", status)
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
        (worker,) = ex._pool._supervisor.pids  # type: ignore[union-attr]
        assert psutil.Process(worker).children() == []  # no second worker left behind


def test_signals_and_timers_a_task_leaves_are_put_back_for_the_next_task() -> None:
    # A pending alarm went off in the next task (another client's, on a shared worker),
    # raising there, or with its handler at the default killed the worker under it; a
    # SIGCHLD left ignored made the next task's waitpid fail; SIGPIPE left at its
    # default kills a worker writing to a closed pipe; a profiling timer runs on; the
    # worker's own SIGTERM, SIGINT and stop signal left ignored defeat a drain and stops.
    with fade.Executor(max_workers=1) as ex:
        pid = ex.submit(tasks.leave_signals_behind).result(timeout=30)
        after = ex.submit(tasks.signals_after, 1.0).result(timeout=30)
    assert after == (pid, 7, True, True, (0.0, 0.0), True)


def test_an_initializers_forked_child_that_comes_back_never_runs_the_task(
    tmp_path: Path,
) -> None:
    # The child went on to load and run the task as well (twice its side effects), and
    # then served as a copy of the worker.
    runs = tmp_path / "runs"
    with fade.Executor(max_workers=1, initializer=tasks.fork_in_initializer) as ex:
        pid = ex.submit(tasks.note_run, str(runs)).result(timeout=30)
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
    assert runs.read_text().split() == [str(pid)]


def _in_a_forked_child(body: Callable[[], str], timeout: float = 20.0) -> str:
    """Run ``body`` in a forked child; what it returned (or raised, by name). Fails if the
    child is not done within ``timeout``: it is killed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            outcome = body()
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write_end, outcome.encode())
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            pytest.fail(f"the forked child was still waiting after {timeout}s")
        time.sleep(0.02)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def test_a_forked_child_cannot_submit_to_its_parents_executor_and_is_told_why() -> None:
    # The child has a copy of the executor but none of its threads; its submit hung for
    # ever (on a lock a parent's thread held at the fork).
    with fade.Executor(max_workers=1, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2

        def submit() -> str:
            return repr(ex.submit(tasks.add, 2, 2).result(timeout=5))

        outcome = _in_a_forked_child(submit)
        assert outcome.startswith("RuntimeError"), outcome
        assert "forked" in outcome and "create a new fade.Executor" in outcome, outcome
        assert ex.submit(tasks.add, 3, 3).result(timeout=30) == 6  # the parent's goes on


def test_a_forked_child_waiting_on_its_parents_future_is_told_why() -> None:
    with fade.Executor(max_workers=1, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2
        pending = ex.submit(time.sleep, 3)
        outcome = _in_a_forked_child(lambda: repr(pending.result()))
        assert outcome.startswith("BrokenPoolError"), outcome
        assert "forked" in outcome, outcome
        assert pending.result(timeout=30) is None  # the parent still gets it


def _exit_normally() -> int:
    import atexit

    atexit._run_exitfuncs()  # what a normal interpreter exit runs in the child
    return 0


# -- a pool started by a module's top-level code ----------------------------------------------

#: A module that starts a pool when imported (embedded, or a client of a shared pool)
#: and runs one of its own functions there.
POOL_AT_IMPORT = """
    import fade

    def double(x):
        return 2 * x

    with fade.Executor({address!r}, max_workers=1) as ex:
        DOUBLED = ex.submit(double, 21).result(timeout=60)
"""


@pytest.mark.parametrize("kind", ["embedded", "tcp"])
def test_a_pool_used_by_an_imported_modules_top_level_code_is_refused_in_its_workers(
    kind: str, tmp_path: Path, pool: Pool
) -> None:
    # Each worker imported the module to load double(), which started a pool whose
    # worker imported it again: hundreds of nested pools within a minute, none ending.
    # Through a shared pool, each import's submit waited on another worker's import.
    address = None
    if kind == "tcp":
        pool.start_broker()
        pool.start_worker(processes=2)
        pool.wait_workers(2)
        address = pool.address
    module = textwrap.dedent(POOL_AT_IMPORT).format(address=address)
    (tmp_path / "startspool.py").write_text(module)
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import startspool"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=fade_env(PYTHONPATH=str(tmp_path)),
        )
    finally:
        _kill_processes_naming(str(tmp_path))
    what = "started an embedded pool" if kind == "embedded" else "a task was submitted"
    assert done.returncode == 1, done.stderr
    assert "TaskDecodeError" in done.stderr, done.stderr
    assert f"{what} while this worker imported module 'startspool'" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr, done.stderr


def test_a_task_may_start_a_pool_of_its_own(tmp_path: Path) -> None:
    # The control: only a module's top-level code, run to load a task, is refused.
    with fade.Executor(max_workers=1, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.nested_pool_sum, [1, 2, 3]).result(timeout=60) == 6


def test_an_initializer_may_start_a_pool_of_its_own() -> None:
    # It runs while the worker loads the task, but it is a function, not a module's code.
    with fade.Executor(max_workers=1, initializer=tasks.init_with_a_pool) as ex:
        assert ex.submit(tasks.add, 1, 2).result(timeout=60) == 3


def _kill_processes_naming(text: str) -> None:
    """Kill every process whose command line mentions ``text`` (a test's nested pools)."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in part for part in proc.info["cmdline"] or ()):
            proc.kill()


# -- tasks that would keep a worker from leaving ---------------------------------------------


def test_a_task_leaving_a_thread_running_does_not_keep_its_worker(pool: Pool) -> None:
    pool.start_broker()
    supervisor = pool.start_worker()
    pool.wait_workers(1)
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        ex.submit(tasks.leave_a_thread_running, 600).result(timeout=30)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=15) == 0


def test_a_task_ignoring_sigterm_does_not_defeat_the_drain(pool: Pool) -> None:
    pool.start_broker()
    supervisor = pool.start_worker()
    pool.wait_workers(1)
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        future = ex.submit(tasks.ignore_sigterm_and_sleep, 2.0)
        time.sleep(0.5)
        supervisor.send_signal(signal.SIGTERM)
        assert future.result(timeout=30) > 0  # the running task finishes: a drain
        assert supervisor.wait(timeout=15) == 0


def test_what_a_task_started_ends_with_its_worker(pool: Pool, tmp_path: Path) -> None:
    pool.start_broker()
    supervisor = pool.start_worker()
    pool.wait_workers(1)
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        child = ex.submit(tasks.start_a_child, 600).result(timeout=30)
        assert psutil.pid_exists(child)
        # Replaced after a timeout: what its task started goes too.
        marker = tmp_path / "pid"
        timed = fade.Executor(pool.address, heartbeat_interval=INTERVAL, task_timeout=1.0)
        with timed, pytest.raises(fade.TaskTimeoutError):
            timed.submit(tasks.start_a_child_then_sleep, str(marker), 60).result(timeout=30)
        orphan = int(marker.read_text())
        wait_for(lambda: not _running(orphan), 10, "the timed-out task's child to end")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=15) == 0
    wait_for(lambda: not _running(child), 10, "the task's child to end with its worker")


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "plain"])
def test_a_process_a_task_forks_has_pythons_own_signal_handlers(fast_paths: bool) -> None:
    # It inherited its worker's: SIGTERM and SIGINT asked a worker that is not there to
    # drain, so Process.terminate() and Pool.terminate() ended nothing (the task hung in
    # join(), or left the process behind).
    with fade.Executor(max_workers=1, fast_paths=fast_paths) as ex:
        terminated, interrupted = ex.submit(tasks.signal_forked_children).result(timeout=60)
    assert terminated == -signal.SIGTERM
    assert interrupted == 1  # KeyboardInterrupt, as in any Python process


def test_processes_a_task_started_end_when_its_embedded_client_is_killed() -> None:
    # The workers notice that their client is gone and leave; what their tasks started
    # in their process group must go with them (a supervisor ends it otherwise).
    script = _embedded_client("print(ex.submit(tasks.start_a_child, 600).result(timeout=30))")
    try:
        assert script.stdout is not None
        child = int(script.stdout.readline())
        assert _running(child)
        script.kill()
        script.wait()
        wait_for(lambda: not _running(child), 15, "the task's child to end with its worker")
    finally:
        kill_tree(script.pid)


def test_a_worker_started_while_a_sigterm_is_handled_drains_too(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM handled while the supervisor is starting a worker (a replacement, say)
    told every filed worker to drain but not the one being started, which served on:
    fade-worker never exited. The signal is placed in that window here by running the
    supervisor's handler from inside Popen."""
    from fade import launch
    from fade import supervisor as sv

    pool.start_broker()
    sup = sv.Supervisor(
        WorkerOptions(address=pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=3)
    )
    real_popen = subprocess.Popen

    def popen_interrupted(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = real_popen(*args, **kwargs)
        sup._on_signal(signal.SIGTERM, None)  # as if it came now
        return process

    monkeypatch.setattr(launch.subprocess, "Popen", popen_interrupted)
    try:
        sup.start()
        deadline = time.monotonic() + 30
        while sup.tick():
            assert time.monotonic() < deadline, "the worker started during the stop serves on"
            time.sleep(0.05)
    finally:
        sup.close()


def _embedded_client(body: str) -> subprocess.Popen[str]:
    """A script that makes an embedded pool ``ex``, runs ``body`` (its output on our pipe),
    and sleeps until killed."""
    code = f"import fade, time, tasks\nex = fade.Executor(max_workers=1)\n{body}\n"
    code += "sys.stdout.flush()\ntime.sleep(600)\n"
    return subprocess.Popen(
        [sys.executable, "-c", "import sys\n" + code],
        stdout=subprocess.PIPE,
        text=True,
        env=fade_env(),
    )


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- smaller defects (issue 13, item 5) ----------------------------------------------------


def test_a_task_that_exits_is_not_called_a_start_up_failure() -> None:
    result = run_script(
        """
        import fade, tasks
        with fade.Executor(max_workers=1, max_attempts=1) as ex:
            try:
                ex.submit(tasks.die, 13).result(timeout=30)
            except fade.WorkerLostError:
                print("LOST")
            print(ex.submit(tasks.add, 1, 2).result(timeout=30))
        """,
        timeout=60,
        FADE_LOG_LEVEL="INFO",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LOST", "3"]
    assert "start-up" not in result.stderr
    assert "exited with status 13 while serving" in result.stderr
    # One format for every process of the pool: a timestamp, then who says it.
    fade_lines = [line for line in result.stderr.splitlines() if "fade-" in line]
    assert fade_lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fade-", line)
                              for line in fade_lines), fade_lines  # fmt: skip


def test_a_killed_embedded_client_leaves_no_socket_folder() -> None:
    script = _embedded_client("ex.submit(tasks.add, 1, 1).result(timeout=30)\nprint(ex.address)")
    try:
        assert script.stdout is not None
        folder = Path(script.stdout.readline().strip().removeprefix("ipc://")).parent
        assert folder.is_dir()
        script.kill()
        script.wait()
        wait_for(lambda: not folder.exists(), 15, f"{folder} to be removed")
    finally:
        kill_tree(script.pid)


def test_cancelled_tasks_do_not_hold_up_shutdown_on_a_pool_with_no_workers(pool: Pool) -> None:
    """Found by the elastic-pool work: a pool scaled to zero has no room, so every task
    waits in the client's outbox; cancelling them all and shutting down waited for a
    worker to arrive (forever, on a pool that stays at zero)."""
    pool.start_broker()
    ex = fade.Executor(pool.address)
    try:
        futures = [ex.submit(tasks.add, i, i) for i in range(5)]
        wait_for(lambda: query(pool.address, timeout=5)["backlog"] == 5, 30, "a backlog of 5")
        assert all(f.cancel() for f in futures)
        started = time.monotonic()
        ex.shutdown(wait=True)
        assert time.monotonic() - started < 5
        assert all(f.cancelled() for f in futures)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def test_cancelled_tasks_leave_the_backlog_a_scaler_sees(pool: Pool) -> None:
    """A scaler reads the backlog to start workers: cancelled tasks are not work."""
    pool.start_broker()
    with fade.Executor(pool.address) as ex:
        futures = [ex.submit(tasks.add, i, i) for i in range(5)]
        wait_for(lambda: query(pool.address, timeout=5)["backlog"] == 5, 30, "a backlog of 5")
        assert all(f.cancel() for f in futures[:3])
        wait_for(lambda: query(pool.address, timeout=5)["backlog"] == 2, 30, "a backlog of 2")
        ex.shutdown(wait=False, cancel_futures=True)
