"""A broker pair (issue 20): a standby broker takes over, with nothing lost or delivered twice.

Real brokers, workers and clients on loopback (and, for the partition, in network
namespaces of the test's own); the brokers' pair moves are read from their logs.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tasks
import zmq
from browser import Chromium
from conftest import (
    INTERVAL,
    LIVENESS,
    Keys,
    Pool,
    Sockets,
    free_port,
    make_keys,
    raw_hello,
    wait_for,
)
from pairpool import PairPool

import fade
from fade import protocol as p
from fade import security
from fade import serialization as ser
from fade.broker import Broker
from fade.pairlink import pair_keys
from fade.sockets import connect_dealer
from fade.status import format_pair, query, query_each

pytestmark = pytest.mark.timeout(180)

EXPIRY = INTERVAL * LIVENESS


@pytest.fixture(params=["plain", "keys"])
def pair_pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PairPool]:
    """A pair on loopback, with CurveZMQ keys or without; the test starts what it needs."""
    keys = make_keys(tmp_path) if request.param == "keys" else None
    pool = PairPool(tmp_path, INTERVAL, LIVENESS, keys=keys)
    try:
        yield pool
    finally:
        pool.stop()


def executor(pool: PairPool, addresses: str | None = None) -> fade.Executor:
    return fade.Executor(
        addresses or pool.addresses,
        keys=pool.client_keys(),
        heartbeat_interval=INTERVAL,
        heartbeat_liveness=LIVENESS,
    )


def runs_of(log: Path) -> list[tuple[int, float]]:
    """(task, wall time) of every run, in order (tasks.record_run appends a line each)."""
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines()]
    return [(int(value), float(when)) for value, _, when in lines]


def runs_per_task(log: Path) -> collections.Counter[int]:
    return collections.Counter(task for task, _ in runs_of(log))


class Fault(threading.Thread):
    """Calls ``fault`` once ``at`` tasks have run (as the log says), noting the wall time."""

    def __init__(self, log: Path, at: int, fault: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.log, self.at, self.fault = log, at, fault
        self.when: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            if self.log.exists() and self.log.read_bytes().count(b"\n") >= self.at:
                self.when = time.time()
                self.fault()
                return


def map_with_fault(
    ex: fade.Executor, log: Path, count: int, at: int, fault: Callable[[], object]
) -> tuple[list[int], float]:
    """Map ``count`` tasks of a millisecond; ``fault()`` once ``at`` have run. Returns the
    results and the wall time of the fault."""
    thread = Fault(log, at, fault)
    thread.start()
    try:
        results = list(ex.map(tasks.record_run, [str(log)] * count, range(count), [0.001] * count))
    finally:
        thread.stop.set()
        thread.join()
    assert thread.when is not None, "the map ended before the fault"
    return results, thread.when


def outage(log: Path, since: float) -> float:
    """The longest time no task ran after ``since`` (a wall time), up to the last run."""
    times = [since, *sorted(when for _, when in runs_of(log) if when > since)]
    return max(b - a for a, b in itertools.pairwise(times))


# -- failover -------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_kill_the_active_broker_mid_map(pair_pool: PairPool, tmp_path: Path) -> None:
    """SIGKILL the active broker during a 5,000-task map on 4 workers: the map completes,
    every result correct and delivered once; the backup took over within 2 x expiry."""
    pool = pair_pool
    pool.start_both()
    pool.start_worker(2)
    pool.start_worker(2)
    pool.wait_workers("a", 4)
    log = tmp_path / "runs.txt"
    count = 5000
    with executor(pool) as ex:
        results, killed = map_with_fault(ex, log, count, 1000, lambda: pool.kill("a"))
        assert results == list(range(count))
        assert ex._io.late_results == 0
    runs = runs_per_task(log)
    gap = outage(log, killed)
    assert set(runs) == set(range(count))
    assert pool.transitions("b")[-1] in ("alone -> active (vote)", "passive -> active (vote)")
    # Failover: the expiry, then a pass or two of the loops involved.
    assert gap < 2 * EXPIRY, f"no task ran for {gap:.2f}s after the kill"
    state = pool.state("b")
    assert state is not None and state["pair"]["state"] == "active"
    assert state["pair"]["peer_state"] == "lost"


def test_stop_the_active_broker_for_ten_seconds(pair_pool: PairPool, tmp_path: Path) -> None:
    """SIGSTOP the active broker for 10 s mid-map, then SIGCONT: the backup took over;
    the woken broker stands by, and exactly one broker is active; nothing was lost or
    delivered twice, then or after."""
    pool = pair_pool
    pool.start_both()
    pool.start_worker(2)
    pool.start_worker(2)
    pool.wait_workers("a", 4)

    def stop_for_ten_seconds() -> None:
        pool.signal("a", signal.SIGSTOP)
        time.sleep(10)
        pool.signal("a", signal.SIGCONT)

    log = tmp_path / "runs.txt"
    with executor(pool) as ex:
        fault = Fault(log, 1000, stop_for_ten_seconds)
        fault.start()
        results = list(ex.map(tasks.record_run, [str(log)] * 5000, range(5000), [0.001] * 5000))
        assert results == list(range(5000))
        fault.join(timeout=30)
        assert fault.when is not None, "the map ended before the fault"
        stopped_for = outage(log, fault.when)
        assert stopped_for < 2 * EXPIRY, f"no task ran for {stopped_for:.2f}s after the stop"
        # After SIGCONT: the woken broker must not take clients or workers back.
        wait_for(lambda: pool.pair_state("a") == "passive", 30, "the woken broker to stand by")
        again = list(ex.map(tasks.record_run, [str(log)] * 1000, range(5000, 6000)))
        assert again == list(range(5000, 6000))
        assert ex._io.late_results == 0
    assert set(runs_per_task(log)) == set(range(6000))
    assert [pool.pair_state(name) for name in ("a", "b")] == ["passive", "active"]
    # It noticed its stall, or (stopped while it handled messages) it yielded to the
    # backup's later claim as soon as it heard it.
    moves = pool.transitions("a")
    assert moves[-1] in (
        "alone -> passive (peer heard)",
        "alone -> passive (peer active)",
        "active -> passive (peer active)",
    ), moves
    state = pool.state("a")
    assert state is not None and state["workers"] == [] and state["clients"] == []


def test_restarted_primary_stands_by_then_the_pool_fails_back(
    pair_pool: PairPool, tmp_path: Path
) -> None:
    """The old primary, restarted, joins as passive; kill the new active one mid-map:
    the pool fails back to the primary, and the map completes, each result once."""
    pool = pair_pool
    pool.start_both()
    pool.start_worker(2)
    pool.start_worker(2)
    pool.wait_workers("a", 4)
    log = tmp_path / "runs.txt"
    with executor(pool) as ex:
        assert list(ex.map(tasks.add, range(100), range(100))) == [2 * i for i in range(100)]
        pool.kill("a")
        # The client and the workers find it silent and vote at the backup.
        pool.wait_active("b")
        pool.wait_workers("b", 4)
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
        pool.start_broker("a")
        wait_for(lambda: pool.pair_state("a") == "passive", 30, "the primary to stand by")
        assert pool.transitions("a")[-1] == "starting -> passive (peer active)"
        assert pool.pair_state("b") == "active"
        results, killed = map_with_fault(ex, log, 3000, 1000, lambda: pool.kill("b"))
        assert results == list(range(3000))
        assert ex._io.late_results == 0
    assert set(runs_per_task(log)) == set(range(3000))
    assert pool.transitions("a")[-1] in ("alone -> active (vote)", "passive -> active (vote)")
    assert outage(log, killed) < 2 * EXPIRY
    state = pool.state("a")
    assert state is not None and state["pair"]["term"] == 3
    assert len(state["workers"]) == 4


# -- a partition between the brokers only ----------------------------------------------------


@dataclass
class Split:
    """Broker B's network namespace, joined to this host by two veth pairs: one that
    clients and workers reach it by, one that only the brokers' pair link uses."""

    ns: str
    links: dict[str, tuple[str, str, str, str]]  # name -> host if, ns if, host ip, ns ip

    def ip(self, name: str, side: str) -> str:
        host_ip, ns_ip = self.links[name][2:]
        return host_ip if side == "host" else ns_ip

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, *argv], check=True, timeout=10)

    def cut_pair_link(self) -> None:
        self.run("ip", "link", "set", self.links["pair"][1], "down")

    def restore_pair_link(self) -> None:
        self.run("ip", "link", "set", self.links["pair"][1], "up")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@pytest.fixture
def split() -> Iterator[Split]:
    tag = uuid.uuid4().hex[:6]
    net = Split(
        f"fade-pair-{tag}",
        {
            "peers": (f"fc{tag}", f"gc{tag}", "10.213.80.1", "10.213.80.2"),
            "pair": (f"fp{tag}", f"gp{tag}", "10.213.81.1", "10.213.81.2"),
        },
    )
    try:
        _ip("netns", "add", net.ns)
        net.run("ip", "link", "set", "lo", "up")
        for host_if, ns_if, host_ip, ns_ip in net.links.values():
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", net.ns)
            _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            net.run("ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
            net.run("ip", "link", "set", ns_if, "up")
    except (OSError, subprocess.SubprocessError) as exc:
        _remove(net)
        pytest.skip(f"cannot create network namespaces here (needs root and iproute2): {exc}")
    try:
        yield net
    finally:
        _remove(net)


def _remove(net: Split) -> None:
    for host_if, *_ in net.links.values():
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "del", net.ns], capture_output=True, check=False)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keys"])
def test_a_partition_between_the_brokers_makes_no_split_brain(
    split: Split, tmp_path: Path, keyed: bool
) -> None:
    """Cut the link between the two brokers only: clients and workers still reach both,
    so none votes, and the backup never serves, not even to a client and a worker that
    come to it first (Binary Star's rule would make it active for them); both brokers'
    logs and counters say so. Then the active one dies during the partition: the backup
    takes over after all."""
    pool = PairPool(tmp_path, INTERVAL, LIVENESS, keys=make_keys(tmp_path) if keyed else None)
    port = pool.ports
    pool.hosts["b"] = split.ip("peers", "ns")
    pool.binds = {name: f"tcp://0.0.0.0:{port[name]}" for name in ("a", "b")}
    pool.peers = {
        "a": f"tcp://{split.ip('pair', 'ns')}:{port['b']}",
        "b": f"tcp://{split.ip('pair', 'host')}:{port['a']}",
    }
    pool.prefixes["b"] = ["ip", "netns", "exec", split.ns]
    extra = [] if keyed else ["--insecure"]  # network addresses; this link is ours alone
    try:
        for name in ("a", "b"):
            pool.start_broker(name, *extra)
        pool.wait_active("a")
        wait_for(lambda: pool.pair_state("b") == "passive", 30, "the backup to stand by")
        pool.start_worker(2)
        pool.start_worker(2)
        pool.wait_workers("a", 4)
        log = tmp_path / "runs.txt"
        with executor(pool) as ex:
            split.cut_pair_link()
            wait_for(lambda: pool.pair_state("b") == "alone", 30, "the backup to lose the primary")
            results = list(ex.map(tasks.record_run, [str(log)] * 2000, range(2000)))
            assert results == list(range(2000))
            # Newcomers that try the backup first: sent on to the active broker.
            pool.start_worker(1, addresses=pool.backup_first)
            pool.wait_workers("a", 5)
            with executor(pool, pool.backup_first) as other:
                assert list(other.map(tasks.add, range(500), range(500))) == [
                    2 * i for i in range(500)
                ]
            time.sleep(5 * EXPIRY)  # long past any takeover the rule would allow
            a, b = pool.state("a"), pool.state("b")
            assert a is not None and b is not None
            assert (a["pair"]["state"], b["pair"]["state"]) == ("active", "alone")
            assert b["tasks_done"] == 0 and b["workers"] == [] and b["clients"] == []
            assert a["tasks_done"] >= 2500 and len(a["workers"]) == 5
            assert not any("-> active" in move for move in pool.transitions("b"))

            split.restore_pair_link()
            wait_for(lambda: pool.pair_state("b") == "passive", 30, "the backup to stand by again")
            assert pool.pair_state("a") == "active"

            split.cut_pair_link()
            wait_for(lambda: pool.pair_state("b") == "alone", 30, "the backup to lose the primary")
            results, killed = map_with_fault(ex, log, 3000, 1000, lambda: pool.kill("a"))
            assert results == list(range(3000))
            assert ex._io.late_results == 0
        assert pool.transitions("b")[-1] == "alone -> active (vote)"
        assert outage(log, killed) < 2 * EXPIRY
    finally:
        pool.stop()


# -- what the pair shows and refuses ------------------------------------------------------------


@pytest.fixture
def plain_pair(tmp_path: Path) -> Iterator[PairPool]:
    pool = PairPool(tmp_path, INTERVAL, LIVENESS)
    try:
        yield pool
    finally:
        pool.stop()


def fade_status(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fade.status", *argv], capture_output=True, text=True, timeout=60
    )


def test_status_shows_both_brokers_and_which_is_active(plain_pair: PairPool) -> None:
    pool = plain_pair
    pool.start_both()
    pool.start_worker(2)
    pool.wait_workers("a", 2)
    out = fade_status(pool.addresses)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"broker   {pool.address('a')}: ACTIVE (primary, term 1)"
    assert lines[1] == f"broker   {pool.address('b')}: PASSIVE (backup, term 0)"
    assert "workers  2 (0 busy, 2 idle, 0 draining)" in out.stdout  # the active one's pool
    assert f"the other at {pool.address('b')}: passive" in out.stdout
    data = json.loads(fade_status(pool.addresses, "--json").stdout)
    assert [b["queried"] for b in data["brokers"]] == [pool.address("a"), pool.address("b")]
    assert [b["pair"]["state"] for b in data["brokers"]] == ["active", "passive"]
    assert [b["pair"]["role"] for b in data["brokers"]] == ["primary", "backup"]

    pool.kill("a")
    pool.kill("b")
    out = fade_status(pool.addresses, "--timeout", "0.5")
    assert out.returncode == 1
    assert out.stdout.count(": no answer (") == 2
    assert "no broker of the pair is active" in out.stdout


def test_status_of_a_pair_with_one_broker_down(plain_pair: PairPool) -> None:
    pool = plain_pair
    pool.start_both()
    pool.kill("b")
    answers = query_each(pool.addresses, timeout=0.5)
    assert isinstance(answers[1][1], fade.BrokerUnreachableError)
    text = format_pair(answers)
    assert "ACTIVE (primary" in text and ": no answer (" in text


def test_a_worker_that_dies_is_reported_to_the_active_broker(plain_pair: PairPool) -> None:
    """The supervisor tells both brokers (the passive one ignores it): the task fails at
    once with its worker's exit code, as with one broker."""
    pool = plain_pair
    pool.start_both()
    pool.start_worker(1)
    pool.wait_workers("a", 1)
    ex = fade.Executor(pool.addresses, heartbeat_interval=INTERVAL, max_attempts=1)
    with ex, pytest.raises(fade.WorkerLostError, match="exit code 13"):
        ex.submit(tasks.die, 13).result(timeout=60)
    state = pool.state("b")
    assert state is not None and state["workers"] == [] and state["tasks_done"] == 0


@pytest.fixture(params=[LIVENESS])
def lone_backup(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A backup whose primary never answers (its port is closed), in this process; the
    param is its heartbeat liveness."""
    broker = Broker(
        "tcp://127.0.0.1:0",
        heartbeat_interval=INTERVAL,
        heartbeat_liveness=request.param,
        peer=f"tcp://127.0.0.1:{free_port()}",
        backup=True,
    )
    broker.address = broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:
        yield broker
    finally:
        broker.stop()
        thread.join(10)
        assert not thread.is_alive()


def answer(sock: zmq.Socket[bytes], timeout: float = 5.0) -> p.Message:
    assert sock.poll(int(timeout * 1000)), "no answer"
    return p.parse(sock.recv_multipart())


@pytest.mark.parametrize("lone_backup", [10], indirect=True)  # 2 s before it is alone
def test_a_broker_that_stands_by_serves_no_one(lone_backup: Broker, sockets: Sockets) -> None:
    """Before it has lost its peer: STANDBY to everyone; nothing of theirs is kept, and
    no heartbeat is owed to them. A voter is told to come back, and its vote counts
    when the broker loses its peer."""
    client, worker, supervisor = (sockets.dealer(lone_backup.address) for _ in range(3))
    client.send_multipart(raw_hello("client"))
    message = answer(client)
    assert message.command is p.Command.STANDBY
    assert p.decode_standby(message.body) == p.Standby("starting", 0.0)
    client.send_multipart(p.encode_submit([(p.SubmitRecord(1, 0, 0.0), p.Payload(b"x"))]))
    assert answer(client).command is p.Command.STANDBY
    supervisor.send_multipart([bytes(f) for f in p.encode_obituary(b"W" * 16, {"pid": 1})])
    assert not supervisor.poll(int(INTERVAL * 1000))  # no answer to an obituary
    assert lone_backup.scheduler.clients == {} and lone_backup.scheduler.workers == {}
    assert not lone_backup._clocks._heard and not lone_backup._clocks._told
    state = query(lone_backup.address, timeout=5)
    assert state["pair"]["state"] == "starting" and not state["pair"]["active"]
    worker.send_multipart(raw_hello("worker", left_silent=0.7))
    hint = p.decode_standby(answer(worker).body)
    assert hint.state == "starting" and 0 < hint.retry <= 1.1 * INTERVAL
    wait_for(lambda: query(lone_backup.address)["pair"]["active"], 10, "the remembered vote")
    assert lone_backup.pair is not None and lone_backup.pair.term == 1


def test_a_lone_backup_serves_when_a_peer_says_its_primary_is_gone(
    lone_backup: Broker, sockets: Sockets
) -> None:
    wait_for(lambda: lone_backup.pair and lone_backup.pair.state.value == "alone", 10, "alone")
    client = sockets.dealer(lone_backup.address)
    client.send_multipart(raw_hello("client"))  # no vote: it may just list this one first
    assert answer(client).command is p.Command.STANDBY
    client.send_multipart(raw_hello("client", left_silent=0.7))
    assert answer(client).command is p.Command.WELCOME
    state = query(lone_backup.address, timeout=5)
    assert state["pair"]["state"] == "active" and state["pair"]["term"] == 1
    assert len(state["clients"]) == 1


def test_a_lone_broker_says_pair_reports_are_not_for_it(sockets: Sockets) -> None:
    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=INTERVAL)
    broker.address = broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:
        sock = sockets.dealer(broker.address)
        report = p.PairReport("primary", "active", 9, "x", 1)
        sock.send_multipart([bytes(f) for f in p.encode_pair(report)])
        message = answer(sock)
        assert message.command is p.Command.ERROR
        assert p.decode_error(message.body) == "PAIR is not for the broker"
        assert "pair" not in query(broker.address, timeout=5)  # as before pairs existed
    finally:
        broker.stop()
        thread.join(10)


def test_with_keys_only_the_broker_key_may_report_to_a_pair(
    curve_keys: Keys, sockets: Sockets
) -> None:
    broker = Broker(
        "tcp://127.0.0.1:0",
        heartbeat_interval=INTERVAL,
        keys=curve_keys.dir,
        peer=f"tcp://127.0.0.1:{free_port()}",
    )
    broker.address = broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:
        rogue = sockets.peer(broker.address, curve_keys.client, prefix=b"C")
        report = p.PairReport("backup", "passive", 0, "x", 1, (broker.pair.incarnation, 1))  # type: ignore[union-attr]
        rogue.send_multipart([bytes(f) for f in p.encode_pair(report)])
        message = answer(rogue)
        assert message.command is p.Command.ERROR
        assert "a client key may not send PAIR" in p.decode_error(message.body)
        assert broker.pair is not None and broker.pair.peer is None
        # The pair link's own key: the broker key pair, which the other broker holds.
        keys = security.load_broker_keys(curve_keys.dir)
        link = connect_dealer(
            sockets.context,
            broker.address,
            identity=security.peer_identity(b"P", pair_keys(keys)),
            keys=pair_keys(keys),
        )
        sockets._made.append(link)
        link.send_multipart([bytes(f) for f in p.encode_pair(report)])
        wait_for(lambda: broker.pair is not None and broker.pair.peer is not None, 10, "report")
    finally:
        broker.stop()
        thread.join(10)


def test_brokers_with_different_keys_do_not_pair(tmp_path: Path) -> None:
    """The other broker must hold the same broker key pair: one that does not is refused
    at the handshake, so neither hears the other and neither serves unasked."""
    pool = PairPool(tmp_path, INTERVAL, LIVENESS, keys=make_keys(tmp_path / "one"))
    try:
        pool.start_broker("a")
        pool.keys = make_keys(tmp_path / "two")
        pool.start_broker("b")
        time.sleep(4 * EXPIRY)
        assert pool.transitions("a") == ["starting -> alone (peer lost)"]
        assert "refused our handshake" in pool.log("a").read_text()
        assert "copies of the same key folder" in pool.log("a").read_text()
    finally:
        pool.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: str = response.read().decode()
        return body


def test_dashboard_and_metrics_say_which_broker_is_active(
    plain_pair: PairPool, browser: Chromium
) -> None:
    pool = plain_pair
    http = {name: free_port() for name in ("a", "b")}
    for name in ("a", "b"):
        pool.start_broker(name, "--http", f"127.0.0.1:{http[name]}")
    pool.wait_active("a")
    pool.start_worker(1)

    def status(name: str) -> dict[str, object]:
        view: dict[str, object] = json.loads(_get(f"http://127.0.0.1:{http[name]}/status"))
        return view

    # Each page serves a snapshot its broker publishes now and then: wait for both.
    def pages_show(name: str, state: str) -> bool:
        return status(name).get("pair", {}).get("state") == state  # type: ignore[union-attr,no-any-return]

    wait_for(lambda: pages_show("a", "active") and pages_show("b", "passive"), 30, "the pages")
    pair_a, pair_b = status("a")["pair"], status("b")["pair"]
    assert pair_a == {
        "role": "primary",
        "state": "active",
        "active": True,
        "term": 1,
        "takeovers": 1,
        "peer_state": "passive",
    }
    assert pair_b["active"] is False and "peer_address" not in pair_b  # type: ignore[index,operator]
    metrics = {name: _get(f"http://127.0.0.1:{http[name]}/metrics") for name in http}
    assert "fade_pair_active 1.0" in metrics["a"] and "fade_pair_active 0.0" in metrics["b"]
    assert 'fade_pair_state{state="passive"} 1.0' in metrics["b"]
    assert "fade_pair_takeovers_total 1.0" in metrics["a"]

    browser.open(f"http://127.0.0.1:{http['b']}/")
    badge = "document.getElementById('pair').textContent"
    wait_for(lambda: browser.evaluate(badge) == "standing by (passive)", 30, "b's badge")
    assert "backup of a pair" in browser.evaluate(
        "document.getElementById('pair-text').textContent"
    )
    pool.kill("a")
    with fade.Executor(pool.addresses, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 2, 2).result(timeout=30) == 4  # its vote: b takes over
    wait_for(lambda: browser.evaluate(badge) == "active", 30, "b's badge to say active")
    assert not browser.exceptions, browser.exceptions


# -- code requests across a failover or a restart --------------------------------------------


def next_of(sock: zmq.Socket[bytes], command: p.Command, timeout: float = 10.0) -> p.Message:
    """The next message of ``command`` on a raw socket (heartbeats and the like skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            message = p.parse(sock.recv_multipart())
            if message.command is command:
                return message
    raise AssertionError(f"no {command.name} within {timeout}s")


def test_a_fresh_broker_passes_on_a_held_tasks_code_request_when_its_client_re_sends_it(
    sockets: Sockets,
) -> None:
    """A worker holding task 7 asks a fresh broker for its code before the task's client
    has re-sent the task: the request waits for it, instead of being answered GONE (the
    task would fail with CodeShippingError)."""
    broker = Broker("tcp://127.0.0.1:0", heartbeat_interval=INTERVAL)
    broker.address = broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:
        tag = os.urandom(p.TAG_SIZE)
        key = p.task_key(tag, 7)
        worker = sockets.dealer(broker.address)
        worker.send_multipart(raw_hello("worker", holding=(key,), credits=1))
        next_of(worker, p.Command.WELCOME)
        request = p.pack_request({"kind": "manifest", "version": "00" * 16})
        worker.send_multipart([bytes(f) for f in p.encode_fetch(key, 1, request)])
        for _ in range(3):  # a while, heartbeating so that the raw worker stays
            with pytest.raises(AssertionError, match="no CODE"):
                next_of(worker, p.Command.CODE, timeout=INTERVAL)
            worker.send_multipart([bytes(f) for f in p.encode(p.Command.HEARTBEAT)])
        client = sockets.dealer(broker.address)
        client.send_multipart(raw_hello("client", tag=tag))
        next_of(client, p.Command.WELCOME)
        task = [(p.SubmitRecord(7, 0, 0.0), p.Payload(b"x"))]
        client.send_multipart([bytes(f) for f in p.encode_submit(task)])
        ref, request_id, asked = p.decode_fetch(next_of(client, p.Command.FETCH).body)
        assert (request_id, bytes(asked)) == (1, request)
        answer = p.encode_code(ref, 1, p.CodeStatus.OK, [b"the manifest"])
        client.send_multipart([bytes(f) for f in answer])
        got = p.decode_code(next_of(worker, p.Command.CODE).body)
        assert (got[0], got[1], got[2], [bytes(f) for f in got[3]]) == (
            key,
            1,
            p.CodeStatus.OK,
            [b"the manifest"],
        )
    finally:
        broker.stop()
        thread.join(10)


def test_a_worker_asks_again_for_code_after_the_broker_restarts(
    pool: Pool, sockets: Sockets
) -> None:
    """The worker's code request died with the broker; after the restart it asks the new
    broker, which passes it on once the client has re-sent the task."""
    pool.start_broker()
    pool.start_worker(1)
    wait_for(lambda: len(query(pool.address, timeout=5)["workers"]) == 1, 30, "the worker")
    tag = os.urandom(p.TAG_SIZE)
    task = [(p.SubmitRecord(7, 0, 0.0), ser.dumps_call(tasks.add, (1, 2), {}, os.urandom(16)))]
    client = sockets.dealer(pool.address)
    client.send_multipart(raw_hello("client", tag=tag))
    next_of(client, p.Command.WELCOME)
    client.send_multipart([bytes(f) for f in p.encode_submit(task)])
    next_of(client, p.Command.FETCH)  # the worker lacks the task's code version
    pool.kill_broker()
    pool.start_broker()
    client.send_multipart(raw_hello("client", tag=tag))
    next_of(client, p.Command.WELCOME, timeout=30)
    client.send_multipart([bytes(f) for f in p.encode_submit(task)])
    ref, request_id, _ = p.decode_fetch(next_of(client, p.Command.FETCH, timeout=30).body)
    missing = p.encode_code(ref, request_id, p.CodeStatus.MISSING, [b"not here"])
    client.send_multipart([bytes(f) for f in missing])
    _, [(record, _)] = p.decode_result(next_of(client, p.Command.RESULT, timeout=30).body)
    assert (record.task_id, record.status) == (7, p.Status.RAISED)


def test_a_worker_that_joins_is_reported_to_the_other_broker_soon(sockets: Sockets) -> None:
    """If the active broker fails soon after a worker joined, the other must know of that
    worker: it waits for as many workers as it was told of before it lets clients re-send
    (otherwise a client's re-sent tasks can go to another worker and run twice). The test
    plays the backup: it reads the primary's reports and answers them."""
    interval = 2.0  # the regular report is 2 s away; the one for the worker comes at once
    reports = sockets.context.socket(zmq.ROUTER)
    sockets._made.append(reports)
    port = reports.bind_to_random_port("tcp://127.0.0.1")
    broker = Broker(
        "tcp://127.0.0.1:0",
        heartbeat_interval=interval,
        peer=f"tcp://127.0.0.1:{port}",
    )
    broker.address = broker.bind()
    thread = threading.Thread(target=broker.run, daemon=True)
    thread.start()
    try:

        def next_report(timeout: float) -> p.PairReport:
            assert reports.poll(int(timeout * 1000)), "no report"
            return p.decode_pair(p.parse(reports.recv_multipart()[1:]).body)

        backup = sockets.dealer(broker.address)
        first = next_report(10)
        ack = (first.incarnation, first.number)
        idle = p.PairReport("backup", "passive", 0, "test", 1, ack)
        backup.send_multipart([bytes(f) for f in p.encode_pair(idle)])
        while (report := next_report(10)).state != "active":
            pass
        assert report.workers == 0
        worker = sockets.dealer(broker.address)
        worker.send_multipart(raw_hello("worker"))
        next_of(worker, p.Command.WELCOME)
        joined = time.monotonic()
        report = next_report(interval)
        assert report.workers == 1
        assert time.monotonic() - joined < interval / 2
    finally:
        broker.stop()
        thread.join(10)
