"""What a scaler reads from the broker (fade/scale): the work clients hold back, and which
job started each worker.

A client keeps tasks beyond the pool's capacity at home, and a pool with no worker has
no capacity: without being told, the broker (and so a scaler) would see no work at all
in a pool scaled to zero. Clients report that backlog on their HEARTBEAT; workers carry
the label of what started them (``--label slurm:JOB``). Real processes on loopback.
"""

from __future__ import annotations

import json
import time

import pytest
import tasks
from conftest import INTERVAL, LIVENESS, Pool, wait_for

import fade
from fade import protocol as p
from fade.errors import ProtocolError
from fade.metrics import render
from fade.status import format_status, query
from fade.web import public_view


def test_a_worker_hello_carries_its_label() -> None:
    hello = p.WorkerHello("h", 1, "v", "3.11.7", "cpython", credits=1, label="slurm:12_3")
    assert p.decode_hello(p.encode_hello(hello)[1:]) == hello
    unlabelled = p.WorkerHello("h", 1, "v", "3.11.7", "cpython", credits=1)
    assert b"label" not in p.encode_hello(unlabelled)[1]  # older brokers see nothing new
    data = {"role": "worker", "host": "h", "pid": 1, "label": "x" * (p.MAX_LABEL + 1)}
    with pytest.raises(ProtocolError, match="label"):
        p.decode_hello([json.dumps(data).encode()])
    with pytest.raises(ProtocolError, match="label"):
        p.decode_hello([json.dumps({**data, "label": 7}).encode()])


def test_a_client_heartbeat_carries_its_backlog() -> None:
    frames = p.encode_backlog(500)
    message = p.parse(frames)
    assert message.command is p.Command.HEARTBEAT
    assert p.decode_backlog(message.body) == 500
    assert p.decode_backlog(p.parse(p.encode(p.Command.HEARTBEAT)).body) is None
    assert p.decode_backlog(p.parse(p.encode_backlog(2**40)).body) == p.MAX_BACKLOG
    with pytest.raises(ProtocolError):
        p.decode_backlog([b"\x00\x01"])


def test_a_pool_without_workers_sees_the_work_its_clients_hold(pool: Pool) -> None:
    """No worker, so no capacity: the client sends no task, but the broker learns how many
    it holds (status, /status, /metrics), and the count falls to 0 once they ran."""
    pool.start_broker()
    with fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as ex:
        futures = [ex.submit(tasks.square, i) for i in range(40)]
        wait_for(lambda: query(pool.address)["backlog"] == 40, 10, "a backlog of 40")
        state = query(pool.address)
        assert state["queued"] == 0 and state["running"] == 0  # nothing reached the broker
        assert [c["backlog"] for c in state["clients"]] == [40]
        assert "40 held back by clients" in format_status(state)
        view = public_view(state)
        assert view["backlog"] == 40
        assert b"fade_tasks_backlog 40.0" in render(view)
        pool.start_worker(2, None, "--label", "slurm:77")
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(40)]
        wait_for(lambda: query(pool.address)["backlog"] == 0, 10, "the backlog to empty")
        state = query(pool.address)
        assert {w["label"] for w in state["workers"]} == {"slurm:77"}
        assert "slurm:77" in format_status(state)


def test_the_backlog_is_reported_again_to_a_restarted_broker(pool: Pool) -> None:
    pool.start_broker()
    with fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as ex:
        futures = [ex.submit(tasks.square, i) for i in range(7)]
        wait_for(lambda: query(pool.address)["backlog"] == 7, 10, "a backlog of 7")
        pool.kill_broker()
        pool.start_broker()
        wait_for(lambda: query(pool.address)["backlog"] == 7, 10, "the backlog at the new broker")
        pool.start_worker(1)
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(7)]


def test_reports_are_rate_limited(pool: Pool) -> None:
    """A client that submits steadily does not send a report per task: at most one per
    heartbeat interval, besides the first (the broker counts what it was told)."""
    pool.start_broker()
    with fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as ex:
        io = ex._io  # type: ignore[attr-defined]
        sent: list[int] = []
        original = io.link.send

        def counting(frames: list[p.Frame]) -> None:
            message = p.parse(frames)
            if message.command is p.Command.HEARTBEAT and message.body:
                sent.append(p.decode_backlog(message.body) or 0)
            original(frames)

        io.link.send = counting
        start = time.monotonic()
        futures = []
        for i in range(100):
            futures.append(ex.submit(tasks.square, i))
            time.sleep(0.01)
        wait_for(lambda: sent and sent[-1] == 100, 10, "the last report")
        elapsed = time.monotonic() - start
        assert len(sent) <= 2 + elapsed / INTERVAL, sent
        pool.start_worker(1)
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(100)]
