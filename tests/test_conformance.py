"""fade as a drop-in for concurrent.futures: what only fade has to show, and CPython's suite.

The behaviour both fade and ProcessPoolExecutor share is in test_behaviour.py;
here are fade's own sides of it (a shared pool, the broker's counters, the
constructor's checks) and the run of CPython's test_concurrent_futures through
tests/cpython_suite.py (docs/conformance.md).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import math
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
import tasks
from conftest import INTERVAL, LIVENESS, TESTS, Pool, wait_for
from cpython_suite import NO_SUITE

import fade
from fade import serialization as ser
from fade._map import run_chunk
from fade.initializer import Setups
from fade.protocol import Payload
from fade.status import query

pytestmark = pytest.mark.timeout(90)


def _executor(pool: Pool, **kwargs: object) -> fade.Executor:
    return fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS, **kwargs
    )


# -- the constructor ---------------------------------------------------------------------------


def test_an_int_first_argument_is_max_workers() -> None:
    with fade.Executor(3) as ex:
        pool = ex._pool
        assert pool is not None
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
        # 3 workers (the broker is here); the others start once the first serves.
        wait_for(lambda: len(pool.pids) == 3, 30, "the pool's 3 workers")


@pytest.mark.parametrize("first", [2.5, b"tcp://127.0.0.1:5555", True, ["tcp://a:1"]])
def test_a_first_argument_that_is_neither_address_nor_int_is_a_type_error(first: object) -> None:
    with pytest.raises(TypeError, match="broker's address"):
        fade.Executor(first)  # type: ignore[arg-type]


def test_max_workers_twice_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="max_workers both"):
        fade.Executor(2, max_workers=2)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1:5555", "no scheme"),
        ("udp://127.0.0.1:5555", "unknown scheme 'udp'"),
        ("tcp://127.0.0.1", "no host and port"),
        ("tcp://:5555", "no host and port"),
        ("tcp://127.0.0.1:port", "not a port number"),
        ("tcp://127.0.0.1:99999", "not a port number"),
        ("tcp://*:5555", "for binding"),
        ("ipc://", "no socket path"),
    ],
)
def test_a_malformed_address_is_a_value_error_naming_it(address: str, why: str) -> None:
    with pytest.raises(ValueError, match="tcp://host:port") as info:
        fade.Executor(address)
    assert repr(address) in str(info.value) and why in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"initializer": 5}, TypeError, "initializer must be a callable"),
        ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child must be >= 1"),
        ({"max_tasks_per_child": "3"}, TypeError, "max_tasks_per_child must be an integer"),
        (
            {"initializer": tasks.init, "initargs": (threading.Lock(),)},
            pickle.PicklingError,
            "cannot pickle the initializer init or its initargs",
        ),
    ],
)
def test_bad_initializer_or_task_limit_fails_at_once(
    kwargs: dict[str, object], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        fade.Executor(1, **kwargs)  # type: ignore[arg-type]


# -- errors that code written for the standard library catches ------------------------------------


def test_fade_errors_are_the_standard_librarys_too() -> None:
    assert issubclass(fade.SerializationError, pickle.PicklingError)
    assert issubclass(fade.ResultDecodeError, pickle.PicklingError)
    for error in (fade.WorkerLostError, fade.ResultDecodeError, fade.TaskDecodeError):
        assert issubclass(error, BrokenProcessPool)
    assert issubclass(fade.InitializerError, fade.BrokenPoolError)
    assert issubclass(fade.InitializerError, cf.BrokenExecutor)


def test_a_result_unpickling_sys_exit_fails_its_future_and_keeps_the_pool(
    fade_executor: fade.Executor,
) -> None:
    future = fade_executor.submit(tasks.return_instance, tasks.ExitAtUnpickle)
    with pytest.raises(fade.ResultDecodeError, match="SystemExit"):
        future.result(timeout=30)
    assert fade_executor.submit(tasks.add, 2, 3).result(timeout=30) == 5
    assert not fade_executor._broken


def test_a_task_that_cannot_be_unpickled_says_so(fade_executor: fade.Executor) -> None:
    future = fade_executor.submit(tasks.identity, tasks.ErrorAtUnpickle())
    with pytest.raises(fade.TaskDecodeError, match="UnpicklingError: error in unpickle"):
        future.result(timeout=30)


# -- the executor setup in a task's payload, and the worker's side of it (no I/O) -------------


def test_a_payload_without_setup_has_no_setup_section() -> None:
    payload = ser.dumps_call(tasks.add, (1, 2), {}, b"v" * 16)
    fn = ser.dumps_function(tasks.add)
    # Header (code version size, environment size, function size, refs), then the sections.
    assert payload.inline.startswith(struct.pack("<BBIH", 16, 0, len(fn), 0) + b"v" * 16 + fn)
    assert ser.executor_setup(payload) is None


def test_a_partial_of_functions_by_reference_is_pickled_once_and_notes_their_modules() -> None:
    # Executor.map sends every chunk with partial(run_chunk, fn): one pickle per map.
    chunked = functools.partial(run_chunk, tasks.add)
    first = ser.dumps_function(chunked)
    assert ser.dumps_function(chunked) is first
    assert pickle.loads(first)([(1, 2), (3, 4)]) == [3, 7]
    assert ser._function_pickle(chunked, True) == (first, {"fade._map", tasks.__name__})
    # A function by value may change between calls: pickled again each time.
    by_value = functools.partial(run_chunk, lambda a, b: a - b)
    assert ser.dumps_function(by_value) is not ser.dumps_function(by_value)
    with_keywords = functools.partial(tasks.add, b=1)
    assert ser.dumps_function(with_keywords) is not ser.dumps_function(with_keywords)


def test_a_payload_carries_its_executors_setup() -> None:
    setup = ser.dumps_setup(b"e" * 16, tasks.init, ("x",), 7)
    payload = ser.dumps_call(tasks.add, (1,), {"b": 3}, b"v" * 16, setup)
    assert ser.code_version(payload) == b"v" * 16
    parsed = ser.executor_setup(payload)
    assert parsed is not None
    assert (parsed.executor_id, parsed.max_tasks) == (b"e" * 16, 7)
    assert ser.loads_initializer(parsed.initializer) == (tasks.init, ("x",))
    fn, args, kwargs = ser.loads_call(payload, ser.FunctionCache())
    assert fn(*args, **kwargs) == 4


def _task(
    executor_id: bytes, initializer: Any = None, initargs: tuple[Any, ...] = (), max_tasks: int = 0
) -> Payload:
    setup = ser.dumps_setup(executor_id, initializer, initargs, max_tasks)
    return ser.dumps_call(tasks.add, (1, 2), {}, b"", setup)


def test_setups_run_each_initializer_once_and_count_each_executor_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "INIT_STATUS", tasks.INIT_STATUS)  # restored afterwards
    log = tmp_path / "runs.txt"
    setups = Setups()
    first = _task(b"1" * 16, tasks.init, ("first", str(log)), max_tasks=3)
    second = _task(b"2" * 16, tasks.init, ("second", str(log)))
    for _ in range(2):
        setups.before(first)
        setups.before(second)
    assert len(log.read_text().split()) == 2  # once per executor
    assert tasks.INIT_STATUS == "second"
    assert [setups.after(first) for _ in range(3)] == [False, False, True]
    assert not any(setups.after(second) for _ in range(10))  # no limit
    assert not setups.after(ser.dumps_call(tasks.add, (1, 2), {}))  # no setup at all


def test_setups_fail_every_task_of_an_executor_whose_initializer_failed() -> None:
    setups = Setups()
    failing = _task(b"f" * 16, tasks.init_fail)
    for _ in range(2):
        with pytest.raises(fade.InitializerError, match="ValueError: error in initializer") as info:
            setups.before(failing)
        assert isinstance(info.value.__cause__, ValueError)
    setups.before(_task(b"g" * 16))  # another executor is not affected


def test_setups_never_raise_after_a_malformed_task() -> None:
    broken = Payload(bytes([0x80]) + b"\x00" * 4)  # says a setup follows; none does
    with pytest.raises(fade.SerializationError):
        Setups().before(broken)
    assert Setups().after(broken) is False


# -- initializer -----------------------------------------------------------------------------


def test_failing_initializer_is_logged_and_fails_every_pending_future(
    tcp_pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
        ex = _executor(tcp_pool, initializer=tasks.init_fail)
        try:
            futures = [ex.submit(tasks.sleep_and_return, 0.2, i) for i in range(20)]
            for future in futures:
                with pytest.raises(fade.InitializerError):
                    future.result(timeout=30)
            assert isinstance(ex._broken, fade.InitializerError)
            with pytest.raises(fade.InitializerError):
                ex.submit(tasks.add, 1, 2)
        finally:
            ex.shutdown(wait=True)
    [record] = [r for r in caplog.records if r.name == "concurrent.futures"]
    assert record.levelno == logging.CRITICAL
    message = record.getMessage()
    assert "Exception in initializer" in message and "ValueError: error in initializer" in message


def test_a_broken_executor_leaves_the_pool_to_the_others(tcp_pool: Pool, tmp_path: Path) -> None:
    """Workers are shared: one executor's failing initializer breaks that executor only,
    and another executor's initializer runs in the same processes, once in each."""
    log = tmp_path / "initialized.txt"
    with (
        _executor(tcp_pool, initializer=tasks.init_fail) as broken,
        pytest.raises(fade.InitializerError),
    ):
        broken.submit(tasks.add, 1, 2).result(timeout=30)
    with (
        _executor(tcp_pool) as plain,
        _executor(tcp_pool, initializer=tasks.init, initargs=("second", str(log))) as second,
    ):
        assert plain.submit(tasks.add, 1, 2).result(timeout=30) == 3
        results = [second.submit(tasks.init_status_and_pid).result(timeout=30) for _ in range(20)]
    assert {status for status, _ in results} == {"second"}
    initialized = [int(pid) for pid in log.read_text().split()]
    assert sorted(initialized) == sorted(set(initialized))


def test_initializer_from_the_clients_own_code(tcp_pool: Pool) -> None:
    """A closure travels by value, as tasks defined in a script do."""
    marker = "set by a closure"

    def initialize() -> None:
        tasks.INIT_STATUS = marker

    with _executor(tcp_pool, initializer=initialize) as ex:
        assert ex.submit(tasks.init_status).result(timeout=30) == marker


# -- max_tasks_per_child --------------------------------------------------------------------


def test_retired_workers_are_replaced_not_lost(tcp_pool: Pool) -> None:
    with _executor(tcp_pool, max_tasks_per_child=3) as ex:
        results = list(ex.map(tasks.pid_after, range(30), [0.01] * 30))
    assert [x for x, _ in results] == list(range(30))
    per_process: dict[int, int] = {}
    for _, pid in results:
        per_process[pid] = per_process.get(pid, 0) + 1
    assert max(per_process.values()) <= 3
    assert query(tcp_pool.address)["tasks_lost"] == 0
    # The supervisors replaced every retired process: two serve again.
    wait_for(lambda: len(query(tcp_pool.address)["workers"]) == 2, 20, "two workers again")
    assert all(w.poll() is None for w in tcp_pool.workers)


def test_other_executors_tasks_do_not_count(tcp_pool: Pool) -> None:
    # 30 tasks on two processes: one ran 15 or more, but only 10 of the limited executor's.
    with _executor(tcp_pool) as plain, _executor(tcp_pool, max_tasks_per_child=15) as limited:
        pids = {plain.submit(tasks.pid).result(timeout=30) for _ in range(20)}
        pids |= {limited.submit(tasks.pid).result(timeout=30) for _ in range(10)}
    assert len(pids) <= 2, "a worker process retired before running 15 of its executor's tasks"


# -- the broker's counters ----------------------------------------------------------------------


def test_a_chunk_that_raised_counts_as_raised(tcp_pool: Pool) -> None:
    with _executor(tcp_pool) as ex:
        results = ex.map(tasks.fail_on, range(10), [4] * 10, chunksize=2)
        assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="bad value 4") as info:
            next(results)
        assert "fail_on" in str(info.value.__cause__)
    state = query(tcp_pool.address)
    assert state["tasks_failed"] == 1, state


# -- CPython's own suite ---------------------------------------------------------------------------


def _interpreters() -> list[str]:
    """This one, and those in $FADE_SUITE_PYTHONS (each with fade installed)."""
    extra = [p for p in os.environ.get("FADE_SUITE_PYTHONS", "").split(os.pathsep) if p]
    return [sys.executable, *extra]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("python", _interpreters(), ids=lambda p: Path(p).parent.parent.name)
def test_cpython_suite(python: str, tmp_path: Path) -> None:
    """CPython's test_concurrent_futures, through tests/cpython_suite.py, in full: nothing
    fails, and what does not run is only what EXCLUDED lists (and Windows-only tests)."""
    out = tmp_path / "outcomes.json"
    run = subprocess.run(
        [python, str(TESTS / "cpython_suite.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=850,
    )
    if run.returncode == NO_SUITE:
        pytest.skip(run.stderr.strip())
    assert out.exists(), run.stderr[-3000:]
    report = json.loads(out.read_text())
    counts = report["counts"]
    assert counts["failed"] == counts["error"] == counts["other"] == 0, (
        f"{report['problems']}\n{run.stderr[-8000:]}"
    )
    assert set(report["skip_reasons"]) <= {"Windows-only process limit"}, report["skip_reasons"]
    assert run.returncode == 0
    # The counts of docs/conformance.md. A new release of a suite may change them: then
    # look at what it added, and update both.
    version = ".".join(report["python"].split(".")[:2])
    expected = SUITE_COUNTS.get(version)
    if expected is None:
        assert counts["passed"] >= 40, counts
    else:
        got = {"tests": report["tests"], **{k: counts[k] for k in ("passed", "excluded")}}
        assert got == expected, f"Python {version}: {got}, docs/conformance.md says {expected}"


#: Tests run, passed and excluded in CPython's suite, per Python version (docs/conformance.md).
SUITE_COUNTS = {
    "3.11": {"tests": 59, "passed": 42, "excluded": 16},
    "3.13": {"tests": 63, "passed": 44, "excluded": 18},
}


# The command lines check their addresses as Executor() does: fade-broker bound port
# 99999 as 34463 (ZeroMQ takes it modulo 65536) and fade-worker and fade-status retried
# it until stopped; "fade-broker 127.0.0.1:5555" was refused for want of keys.
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("command", "address", "why"),
    [
        ("fade-broker", "tcp://127.0.0.1:99999", "not a port number"),
        ("fade-broker", "127.0.0.1:5555", "no scheme"),
        ("fade-broker", "udp://127.0.0.1:5555", "unknown scheme 'udp'"),
        ("fade-broker", "tcp://*:99999", "not a port number"),  # named as given
        ("fade-worker", "tcp://127.0.0.1:99999", "not a port number"),
        ("fade-worker", "127.0.0.1:5555", "no scheme"),
        ("fade-worker", "tcp://*:5555", "for binding"),
        ("fade-status", "tcp://127.0.0.1:99999", "not a port number"),
    ],
)
def test_a_command_given_a_malformed_address_says_so_and_exits(
    command: str, address: str, why: str
) -> None:
    done = subprocess.run(
        [command, address], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 2, done.stderr
    assert repr(address) in done.stderr and why in done.stderr, done.stderr


# A worker told --prefetch -1 asked for no task and ran none, silently; a broker told
# --max-message-size 100 dropped every client's hello, whose task then waited in vain.
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("command", "option", "value", "why"),
    [
        ("fade-worker", "--prefetch", "-1", "--prefetch must be at least 0"),
        ("fade-worker", "--max-message-size", "100", "--max-message-size must be at least 64K"),
        ("fade-worker", "--max-message-size", "0", "a size must be at least 1 byte"),
        ("fade-broker", "--max-message-size", "1K", "--max-message-size must be at least 64K"),
        ("fade-broker", "--max-client-bytes", "lots", "not a size: 'lots'"),
        ("fade-broker", "--max-client-tasks", "0", "max_client_tasks must be >= 1"),
        ("fade-worker", "--package-cache-size", "x", "not a size: 'x'"),
        # inf and nan passed "> 0" checks, or failed none: a worker died at start-up in
        # a loop (OverflowError), a broker with a traceback.
        ("fade-worker", "--heartbeat-interval", "inf", "a finite number of seconds"),
        ("fade-worker", "--heartbeat-interval", "nan", "a finite number of seconds"),
        ("fade-broker", "--heartbeat-interval", "inf", "a finite number of seconds"),
        ("fade-broker", "--heartbeat-interval", "0", "must be > 0 seconds"),
        ("fade-status", "--timeout", "inf", "a finite number of seconds"),
    ],
)
def test_a_command_given_an_unusable_value_says_so_and_exits(
    command: str, option: str, value: str, why: str
) -> None:
    done = subprocess.run(
        [command, "tcp://127.0.0.1:5555", option, value],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert why in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("heartbeat_interval", math.inf),  # the I/O thread died of an OverflowError
        ("heartbeat_interval", math.nan),
        ("task_timeout", math.nan),  # taken: no limit, silently
        ("task_timeout", math.inf),
        ("connect_timeout", math.nan),
        ("reconnect_timeout", math.inf),
        ("ship_code_limit", -1),
        ("share_threshold", -1),  # refused after the pool started: its workers lived on
    ],
)
def test_an_executor_refuses_a_number_that_is_not_finite_or_is_negative(
    option: str, value: float
) -> None:
    with pytest.raises(ValueError, match=option):
        fade.Executor(max_workers=1, **{option: value})


def test_an_executor_refuses_a_max_message_size_too_small_for_fades_own_messages() -> None:
    with pytest.raises(ValueError, match="max_message_size must be at least 64K"):
        fade.Executor("tcp://127.0.0.1:5555", max_message_size=100)
    fade.Executor("tcp://127.0.0.1:5555", max_message_size=64 << 10).shutdown(wait=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0"])
def test_the_broker_may_bind_a_port_the_system_picks(address: str) -> None:
    proc = subprocess.Popen(
        ["fade-broker", address], stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 30
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert "listening on tcp://127.0.0.1:" in line, line
        assert not line.rstrip().endswith((":*", ":0")), line
    finally:
        proc.terminate()
        proc.wait(timeout=10)
