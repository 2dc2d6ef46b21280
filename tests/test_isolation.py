"""One tenant cannot reach another's tasks, results or workers (issue 14, items 1 and 3).

Each test is an attack by a legitimate key holder on a keyed pool, with a positive
control: the victim's own work still completes, correctly. Before the fix, STATUS
gave every peer's routing identity to any client key, the broker let a new
connection take over an identity in use, and accepted results from any worker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tasks
import zmq
from conftest import INTERVAL, Keys, Pool, Sockets, raw_hello, wait_for

import fade
from fade import protocol as p
from fade import security
from fade import serialization as ser
from fade.status import query

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tenants(pool: Pool, curve_keys: Keys, tmp_path: Path) -> tuple[Pool, Keys, Path]:
    """A keyed pool with two worker processes, the tester's client key (the victim) and a
    second client key, mallory's (the attacker)."""
    mallory = security.add_peer(curve_keys.dir, "client", "mallory", tmp_path / "mallory.key")
    pool.start_broker("--keys", str(curve_keys.dir))
    pool.start_worker(2, None, "--keys", str(curve_keys.worker))
    pool.wait_workers(2)
    wait_for(
        lambda: len(query(pool.address, keys=curve_keys.client)["workers"]) == 2, 30, "workers"
    )
    return pool, curve_keys, mallory


def _identities_in(
    state: dict[str, object], roles: tuple[str, ...] = ("workers", "clients")
) -> list[bytes]:
    """Every value of a STATE that could be a peer's routing identity, as bytes."""
    found = []
    for role in roles:
        for entry in state[role]:  # type: ignore[attr-defined]
            for field in ("identity", "id"):
                value = entry.get(field)
                if isinstance(value, str):
                    try:
                        found.append(bytes.fromhex(value))
                    except ValueError:
                        pass
    return found


def _listen(socks: list[zmq.Socket[bytes]], seconds: float) -> list[p.Message]:
    """Everything the attacker's sockets receive (heartbeats aside) for a while."""
    got: list[p.Message] = []
    end = time.monotonic() + seconds
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    while (left := end - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(left * 1000)):
            try:
                message = p.parse(sock.recv_multipart())
            except fade.ProtocolError:
                continue
            if message.command not in (p.Command.HEARTBEAT, p.Command.ERROR):
                got.append(message)
    return got


def _keep_taking_over(
    sockets: Sockets, address: str, key: Path, identities: list[bytes], seconds: float
) -> list[p.Message]:
    """The attack: connect under each identity, again and again (the victim reconnects
    and takes its identity back), and keep what arrives."""
    got: list[p.Message] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        socks = [sockets.peer(address, key, identity=identity) for identity in identities]
        got += _listen(socks, 0.05)  # the victim reconnects within about that
        for sock in socks:
            sock.close(linger=0)
    return got


def test_status_gives_a_client_key_no_identity(tenants: tuple[Pool, Keys, Path]) -> None:
    pool, keys, mallory = tenants
    with fade.Executor(pool.address, keys=keys.client, heartbeat_interval=INTERVAL) as victim:
        assert victim.submit(tasks.add, 1, 1).result(timeout=30) == 2
        state = query(pool.address, keys=mallory)
        identity = victim._io.link.identity
        text = json.dumps(state)
        assert identity.hex() not in text and identity.hex()[:12] not in text
        assert all(found not in (identity, identity[:6]) for found in _identities_in(state))
        # The control: the victim is listed, under its short id.
        assert p.short_id(identity) in [c["id"] for c in state["clients"]]


def test_a_client_key_cannot_take_over_another_clients_results(
    tenants: tuple[Pool, Keys, Path], sockets: Sockets
) -> None:
    pool, keys, mallory = tenants
    with fade.Executor(pool.address, keys=keys.client, heartbeat_interval=INTERVAL) as victim:
        futures = [victim.submit(tasks.sleep_and_return, 0.1, i) for i in range(30)]
        # Mallory learns what STATUS tells her of the clients and poses as each of them.
        found = _identities_in(query(pool.address, keys=mallory), roles=("clients",))
        assert found, "STATUS listed no client at all"
        got = _keep_taking_over(sockets, pool.address, mallory, found, 3.0)
        assert [m.command.name for m in got] == [], "the attacker received another's traffic"
        assert [f.result(timeout=60) for f in futures] == list(range(30))


def test_even_knowing_an_identity_a_key_holder_cannot_take_it_over(
    tenants: tuple[Pool, Keys, Path], sockets: Sockets
) -> None:
    """Defence in depth: with the victim's real identity (read here, white-box), another
    key's connection is refused while the victim's is up, and anything it sends is
    refused too."""
    pool, keys, mallory = tenants
    with fade.Executor(pool.address, keys=keys.client, heartbeat_interval=INTERVAL) as victim:
        assert victim.submit(tasks.add, 1, 1).result(timeout=30) == 2
        futures = [victim.submit(tasks.sleep_and_return, 0.1, i) for i in range(30)]
        identity = victim._io.link.identity
        got = _keep_taking_over(sockets, pool.address, mallory, [identity], 3.0)
        assert [m.command.name for m in got] == []
        assert [f.result(timeout=60) for f in futures] == list(range(30))


def test_a_client_key_cannot_receive_tasks_by_posing_as_a_worker(
    tenants: tuple[Pool, Keys, Path], sockets: Sockets
) -> None:
    pool, keys, mallory = tenants
    with fade.Executor(pool.address, keys=keys.client, heartbeat_interval=INTERVAL) as victim:
        assert victim.submit(tasks.add, 1, 1).result(timeout=30) == 2
        found = _identities_in(query(pool.address, keys=mallory), roles=("workers",))
        assert found, "STATUS listed no worker at all"
        futures = [victim.submit(tasks.sleep_and_return, 0.1, i) for i in range(30)]
        got = _keep_taking_over(sockets, pool.address, mallory, found, 3.0)
        assert [m.command.name for m in got if m.command is p.Command.TASK] == []
        assert [f.result(timeout=60) for f in futures] == list(range(30))


def test_a_worker_key_cannot_complete_another_workers_task(
    pool: Pool, curve_keys: Keys, sockets: Sockets
) -> None:
    """A rogue worker learns a client's task keys from a task of its own and forges the
    result of the next one, which another worker runs."""
    pool.start_broker("--keys", str(curve_keys.dir))
    rogue = sockets.peer(pool.address, curve_keys.worker)
    rogue.send_multipart(raw_hello("worker", credits=1))
    with fade.Executor(pool.address, keys=curve_keys.client, heartbeat_interval=INTERVAL) as ex:
        first = ex.submit(tasks.add, 1, 1)
        key = _next_task(rogue)
        rogue.send_multipart(
            p.encode_done(0, [(p.DoneRecord(key, p.Status.OK), ser.dumps_value(2))])
        )
        assert first.result(timeout=30) == 2
        pool.start_worker(1, None, "--keys", str(curve_keys.worker))

        def honest_worker() -> bool:
            workers = query(pool.address, keys=curve_keys.client)["workers"]
            return any(w["host"] != "raw" for w in workers)

        wait_for(honest_worker, 30, "the honest worker")
        second = ex.submit(tasks.sleep_and_return, 3.0, "real")

        def running_on_the_honest_worker() -> bool:
            workers = query(pool.address, keys=curve_keys.client)["workers"]
            return any(w["host"] != "raw" and w["running"] for w in workers)

        wait_for(running_on_the_honest_worker, 30, "the task on the honest worker")
        number = int.from_bytes(key[-8:], "little") + 1
        forged = key[:-8] + number.to_bytes(8, "little")
        # The rogue is a registered worker when it forges (it sends no heartbeats, so it
        # may have been expired meanwhile: it says HELLO again, with no credit).
        rogue.send_multipart(raw_hello("worker", credits=0))
        rogue.send_multipart(
            p.encode_done(0, [(p.DoneRecord(forged, p.Status.OK), ser.dumps_value("forged"))])
        )
        assert second.result(timeout=30) == "real"


def _next_task(sock: zmq.Socket[bytes]) -> bytes:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sock.poll(200):
            message = p.parse(sock.recv_multipart())
            if message.command is p.Command.TASK:
                return p.decode_task(message.body)[0][0].key
        else:
            sock.send_multipart(p.encode(p.Command.HEARTBEAT))
    raise AssertionError("the rogue worker got no task")


# -- a worker pool for one trust domain ---------------------------------------------------


def test_workers_serve_only_the_client_keys_they_are_told(
    pool: Pool, curve_keys: Keys, tmp_path: Path
) -> None:
    bob = security.add_peer(curve_keys.dir, "client", "bob", tmp_path / "bob.key")
    pool.start_broker("--keys", str(curve_keys.dir))
    pool.start_worker(1, None, "--keys", str(curve_keys.worker), "--serve-clients", "tester")
    pool.wait_workers(1)
    wait_for(lambda: len(query(pool.address, keys=bob)["workers"]) == 1, 30, "the worker")
    with (
        fade.Executor(pool.address, keys=curve_keys.client, heartbeat_interval=INTERVAL) as ours,
        fade.Executor(pool.address, keys=bob, heartbeat_interval=INTERVAL) as theirs,
    ):
        served = ours.submit(tasks.pid).result(timeout=30)
        with pytest.raises(fade.IncompatibleWorkerError, match="serves"):
            theirs.submit(tasks.pid).result(timeout=30)
        pool.start_worker(1, None, "--keys", str(curve_keys.worker))  # serves anyone
        wait_for(lambda: len(query(pool.address, keys=bob)["workers"]) == 2, 30, "worker 2")
        pids = {theirs.submit(tasks.pid).result(timeout=30) for _ in range(10)}
        assert served not in pids
        assert ours.submit(tasks.pid).result(timeout=30) > 0
