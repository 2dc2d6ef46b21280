"""``fade-status`` and the STATUS/STATE exchange, checked against what a real pool does."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tasks
from conftest import Keys, Pool, free_port, make_keys, wait_for

import fade
from fade import protocol as p
from fade._rate import Throughput
from fade.broker import Broker
from fade.errors import ProtocolError
from fade.status import format_status, query

pytestmark = pytest.mark.timeout(60)


def fade_status(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fade.status", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_registered(pool: Pool, count: int) -> None:
    """The pool's worker processes exist as soon as they start; wait until they said HELLO."""
    wait_for(
        lambda: len(query(pool.address)["workers"]) == count, 20, f"{count} registered workers"
    )


# -- the wire ------------------------------------------------------------------------


def test_status_and_state_round_trip() -> None:
    message = p.parse(p.encode_status())
    assert message.command is p.Command.STATUS
    p.decode_status(message.body)
    state = {"broker_id": "b", "workers": [{"pid": 1}], "tasks_done": 3}
    message = p.parse(p.encode_state(state))
    assert message.command is p.Command.STATE
    assert p.decode_state(message.body) == state


@pytest.mark.parametrize(
    "body",
    [[b"not json"], [b"[]"], [b'{"broker_id": "b"}'], [b'{"broker_id": 1, "workers": []}'], []],
)
def test_malformed_state_is_a_protocol_error(body: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        p.decode_state(body)


def test_status_with_a_body_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        p.decode_status([b"x"])


# -- the throughput ring -----------------------------------------------------------------


def test_throughput_counts_per_second_and_forgets_after_the_window() -> None:
    ring = Throughput(started=1000.0, window=60)
    ring.record(1000.5, 10)
    ring.record(1000.9, 15)  # 5 more in the same second
    ring.record(1002.1, 45)  # 30 in second 1002
    series = ring.series(1002.5)
    assert series[-3:] == [15, 0, 30] and sum(series) == 45
    # 2.5 s since start: the mean is over that, not over a minute.
    assert ring.rate(1002.5) == pytest.approx(45 / 2.5)
    # A minute later those seconds have left the window: stale slots read zero.
    ring.record(1062.2, 46)
    assert sum(ring.series(1062.5)) == 1
    assert ring.rate(1062.5) == pytest.approx(1 / 59.5)


# -- against a real pool ---------------------------------------------------------------------


def test_status_command_reports_workers_and_tasks_done(
    tcp_pool: Pool, fade_executor: fade.Executor
) -> None:
    wait_registered(tcp_pool, 2)
    n = 50
    assert list(fade_executor.map(tasks.square, range(n))) == [x * x for x in range(n)]

    result = fade_status(tcp_pool.address, "--json")
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    pids = sorted(tcp_pool.worker_pids())
    assert sorted(w["pid"] for w in state["workers"]) == pids
    assert state["tasks_done"] == n
    assert sum(w["done"] for w in state["workers"]) == n
    assert state["queued"] == 0 and state["running"] == 0
    assert [c["pid"] for c in state["clients"]] == [os.getpid()]
    assert sum(state["per_second"]) == n and state["rate"] > 0
    assert all(w["state"] == "idle" and w["last_heard"] < 5 for w in state["workers"])

    text = fade_status(tcp_pool.address)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "workers  2 (0 busy, 2 idle, 0 draining)   clients 1" in out
    assert f"0 queued, 0 running, {n} done (0 raised, 0 lost)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] != ["WORKER"]]
    worker_rows = [r for r in rows if len(r) >= 8 and r[3] == "idle"]
    assert sorted(int(r[2]) for r in worker_rows) == pids
    assert sum(int(r[5]) for r in worker_rows) == n


def test_short_ids_tell_sibling_workers_and_successive_clients_apart(pool: Pool) -> None:
    """Issue 13: with --processes 2 both workers showed as one id, and three clients one
    after another were logged under one id (short ids were prefixes of identities that
    share their first bytes)."""
    pool.start_broker()
    pool.start_worker(2)
    wait_for(lambda: len(query(pool.address)["workers"]) == 2, 30, "two workers")
    workers = [w["id"] for w in query(pool.address)["workers"]]
    clients = []
    for _ in range(3):
        with fade.Executor(pool.address) as ex:
            assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
            (client,) = query(pool.address)["clients"]
            clients.append(client["id"])
    assert len(set(workers)) == 2 and len(set(clients)) == 3, (workers, clients)
    assert not set(workers) & set(clients)


def test_status_shows_running_and_queued_tasks(
    tcp_pool: Pool, fade_executor: fade.Executor
) -> None:
    futures = [fade_executor.submit(tasks.sleep_and_return, 1.5, i) for i in range(8)]

    def two_busy() -> dict[str, Any] | None:
        state = query(tcp_pool.address, timeout=5)
        busy = [w for w in state["workers"] if w["state"] == "busy"]
        return state if state["running"] == 2 and len(busy) == 2 else None

    wait_for(two_busy, 20, "both workers to be busy")
    state = query(tcp_pool.address, timeout=5)
    # Each worker runs one task; the rest wait at the broker or, past the pool's
    # capacity, at the client (where the broker does not see them).
    assert state["running"] == 2
    assert state["queued"] >= 1
    assert state["clients"][0]["tasks"] == state["running"] + state["queued"]
    out = fade_status(tcp_pool.address).stdout
    assert "workers  2 (2 busy, 0 idle, 0 draining)" in out
    for future in futures:
        future.cancel()


def test_status_raised_tasks_are_counted(tcp_pool: Pool, fade_executor: fade.Executor) -> None:
    futures = [fade_executor.submit(tasks.fail_on, x, 3) for x in range(5)]
    assert sum(f.exception(timeout=30) is not None for f in futures) == 1
    state = query(tcp_pool.address)
    assert (state["tasks_done"], state["tasks_failed"], state["tasks_lost"]) == (5, 1, 0)


def test_status_without_a_broker_fails_fast_with_a_message() -> None:
    started = time.monotonic()
    result = fade_status(f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert result.returncode == 1
    assert "no answer from a fade broker" in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 15


def test_status_bad_address_is_a_usage_error() -> None:
    result = fade_status("not-an-endpoint")
    assert result.returncode == 2
    assert "'not-an-endpoint' is not a broker address: no scheme" in result.stderr


def test_status_reads_fade_address_from_the_environment(tcp_pool: Pool) -> None:
    wait_registered(tcp_pool, 2)
    result = fade_status("--json", env={"FADE_ADDRESS": tcp_pool.address})
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["workers"]) == 2


@pytest.fixture
def broker_thread() -> Iterator[Broker]:
    """A broker in this process, so a test can look at its bookkeeping."""
    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=0.2)
    broker.address = broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:
        yield broker
    finally:
        broker.stop()
        thread.join(10)
        assert not thread.is_alive()


def test_status_queries_leave_no_state_at_the_broker(broker_thread: Broker) -> None:
    for _ in range(20):
        state = query(broker_thread.address, timeout=5)
        assert state["workers"] == [] and state["clients"] == []
    time.sleep(0.5)  # past a heartbeat interval: nobody is owed a heartbeat
    assert not broker_thread._clocks._heard and not broker_thread._clocks._told


def test_format_status_aligns_columns() -> None:
    worker = {"host": "h", "state": "idle", "running": 0, "last_heard": 0.25}
    state = {
        "version": "9",
        "broker_id": "abc",
        "uptime": 3725.0,
        "workers": [
            {**worker, "id": "a" * 12, "pid": 7, "done": 5},
            {**worker, "id": "b" * 12, "pid": 12345, "done": 123456},
        ],
        "clients": [],
    }
    lines = format_status(state).splitlines()
    assert "up 1h02m05s" in lines[0]
    table = lines[lines.index("") + 1 :]
    assert table[0].split()[:6] == ["WORKER", "HOST", "PID", "STATE", "RUNNING", "DONE"]
    # Numbers are right-aligned: their last digits line up with the header's end.
    done_end = table[0].index("DONE") + len("DONE")
    assert [row[done_end - 1] for row in table[1:]] == ["5", "6"]


# -- rough edges (issue 13.5) and hostile strings (issue 14.4) -------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("who", ["no keys", "another pool's key"])
def test_status_against_a_keyed_broker_says_why_the_handshake_failed(
    pool: Pool, curve_keys: Keys, tmp_path: Path, who: str
) -> None:
    """Found: it waited for the timeout, then asked whether the broker was running."""
    pool.start_broker("--keys", str(curve_keys.dir))
    wait_for(
        lambda: query(pool.address, timeout=5, keys=str(curve_keys.client))["workers"] == [],
        30,
        "the keyed broker to answer an authorised fade-status",
    )  # control: the broker is up and answers the right key
    args = [] if who == "no keys" else ["--keys", str(make_keys(tmp_path / "other").client)]
    timeout = 40.0
    started = time.monotonic()
    result = fade_status(pool.address, "--timeout", str(timeout), *args, timeout=2 * timeout)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "is it running" not in result.stderr, result.stderr
    if who == "no keys":
        assert "requires keys" in result.stderr, result.stderr
    else:
        assert "may not be this broker's" in result.stderr, result.stderr
    assert pool.address in result.stderr
    # It says so as soon as the handshake fails, not when its long timeout runs out.
    assert elapsed < timeout / 2, elapsed


def test_status_into_a_closed_pipe_exits_quietly(tcp_pool: Pool) -> None:
    """Found: `fade-status | head -3` printed a BrokenPipeError traceback."""
    wait_registered(tcp_pool, 2)
    for args in ([tcp_pool.address], [tcp_pool.address, "--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "fade.status", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader has gone before the first line is written
        stderr = proc.stderr.read().decode()
        code = proc.wait(timeout=30)
        proc.stderr.close()
        assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
        assert stderr == ""
        assert code == 141  # what a shell reports for a tool ended by SIGPIPE


def test_status_through_head_prints_its_first_lines_and_no_traceback(tcp_pool: Pool) -> None:
    wait_registered(tcp_pool, 2)
    result = subprocess.run(
        f"{shlex.quote(sys.executable)} -m fade.status {tcp_pool.address} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.startswith("fade ") and len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_format_status_escapes_control_characters_in_peer_strings() -> None:
    hostile = "\x1b[2J\x1b]0;pwned\x07x\ny\r\u202e\x9b" + "z" * 1000
    worker = {"id": "a" * 12, "host": hostile, "pid": 7, "state": "idle\x1b[5m", "running": 0}
    state = {
        "version": "1\x1b[31m",
        "broker_id": "b",
        "address": "tcp://h\n:1",
        "host": hostile,
        "workers": [{**worker, "done": 1, "last_heard": 0.1}],
        "clients": [{"identity": "43" * 16, "host": hostile, "pid": 8, "tasks": 0}],
    }
    out = format_status(state)
    assert all(ch == "\n" or ch.isprintable() for ch in out), repr(out)
    assert "\\x1b[2J\\x1b]0;pwned\\x07x\\ny\\r\\u202e\\x9b" in out
    # No line was split: 4 of summary, a blank, header and 1 worker, a blank, header and 1 client.
    assert len(out.splitlines()) == 10, out
    assert max(len(line) for line in out.splitlines()) < 600  # peer strings are bounded
    # A client named by its identity is shown by a hash of it, never a prefix.
    assert "4343434343" not in out


def test_status_json_output_has_no_control_bytes() -> None:
    # json.dumps escapes them: --json is safe to print as it is.
    text = json.dumps({"host": "\x1b[2Jx\ny"}, indent=2, sort_keys=True)
    assert "\x1b" not in text and "\\u001b[2Jx\\ny" in text
