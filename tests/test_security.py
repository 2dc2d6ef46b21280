"""Security: only authorised keys run code, roles hold, bad input harms nothing, safe defaults.

Every refusal is shown against a positive control on the same pool (the same
client script or socket with the right key succeeds), so a check that nothing
ran cannot pass merely because nothing could have run.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import secrets
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tasks
import zmq
import zmq.auth
from conftest import (
    EXPIRY,
    INTERVAL,
    LIVENESS,
    Keys,
    Namespace,
    Pool,
    Sockets,
    free_port,
    kill_tree,
    make_keys,
    raw_hello,
    wait_for,
)

import fade
from fade import protocol as p
from fade import security
from fade import serialization as ser
from fade.broker import Broker
from fade.sockets import parse_size
from fade.status import query

pytestmark = pytest.mark.timeout(90)

#: Long enough for several reconnection attempts (a client retries every expiry).
REFUSAL_WINDOW = max(3.0, 5 * EXPIRY)

# A client in its own process: one task per stdin line "TAG SECONDS"; prints each outcome.
CLIENT = textwrap.dedent(
    """
    import logging, sys
    import fade, tasks
    logging.basicConfig(level=logging.WARNING)
    address, keys, marker, interval = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
    ex = fade.Executor(address, keys=keys, heartbeat_interval=float(interval))
    print("ready", flush=True)
    for line in sys.stdin:
        tag, seconds = line.split()
        future = ex.submit(tasks.record_then_sleep, marker, tag, float(seconds))
        future.add_done_callback(
            lambda f, tag=tag: print("result", tag, repr(f.exception() or f.result()), flush=True)
        )
    """
)


class ClientProcess:
    """The CLIENT script, fed tasks through stdin; its output lines are collected by a thread."""

    def __init__(self, address: str, keys: Path | None, marker: Path, log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, address, str(keys or ""), str(marker), str(INTERVAL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next_line(30) == "ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def submit(self, tag: str, seconds: float = 0.0) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{tag} {seconds}\n")
        self.proc.stdin.flush()

    def next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def lines_within(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        out = []
        while (left := deadline - time.monotonic()) > 0:
            line = self.next_line(left)
            if line is not None:
                out.append(line)
        return out

    def close(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait()
        self._log_file.close()


def _ran(marker: Path) -> list[str]:
    return [line.split()[0] for line in marker.read_text().splitlines()] if marker.exists() else []


@dataclass
class SecurePool:
    pool: Pool
    keys: Keys
    broker_log: Path

    def log_text(self) -> str:
        return self.broker_log.read_text(errors="replace")


@pytest.fixture
def secure(pool: Pool, curve_keys: Keys, tmp_path: Path) -> Iterator[SecurePool]:
    """A broker with keys (its log kept) and two authorised worker processes."""
    log = tmp_path / "broker.log"
    with log.open("wb") as f:
        pool.start_broker("--keys", str(curve_keys.dir), stderr=f.fileno())
    pool.start_worker(1, None, "--keys", str(curve_keys.worker))
    pool.start_worker(1, None, "--keys", str(curve_keys.worker))
    pool.wait_workers(2)
    yield SecurePool(pool, curve_keys, log)


def _run_authorised_client(secure: SecurePool, marker: Path, tmp_path: Path, tag: str) -> None:
    """The positive control: the same script with an authorised key runs its task."""
    client = ClientProcess(secure.pool.address, secure.keys.client, marker, tmp_path / "ok.log")
    try:
        client.submit(tag)
        line = client.next_line(30)
        assert line == f"result {tag} {tag!r}", line
    finally:
        client.close()


# -- clients without the right keys --------------------------------------------------------


@pytest.mark.parametrize("who", ["no keys", "another pool's key", "a revoked key"])
def test_unauthorised_client_runs_nothing_and_learns_nothing(
    secure: SecurePool, tmp_path: Path, who: str
) -> None:
    marker = tmp_path / "ran.txt"
    if who == "no keys":
        keys, hint = None, "requires keys"  # "it requires" or "it probably requires": a race
    elif who == "another pool's key":
        keys = make_keys(tmp_path / "other").client
        hint = "encrypted handshake failed"
    else:
        keys = security.add_peer(secure.keys.dir, "client", "mallory", tmp_path / "mallory.key")
        assert security.revoke_peer(secure.keys.dir, "mallory")
        hint = "refused our client key 'mallory'"
    client = ClientProcess(secure.pool.address, keys, marker, tmp_path / "client.log")
    try:
        client.submit("intruder")
        assert client.lines_within(REFUSAL_WINDOW) == []
        assert _ran(marker) == []
        assert client.proc.poll() is None
    finally:
        client.close()
    assert hint in (tmp_path / "client.log").read_text(), "the client should say why"
    _run_authorised_client(secure, marker, tmp_path, "control")
    assert _ran(marker) == ["control"]


def test_revoked_client_is_cut_off_while_connected(secure: SecurePool, tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    bob = security.add_peer(secure.keys.dir, "client", "bob", tmp_path / "bob.key")
    client = ClientProcess(secure.pool.address, bob, marker, tmp_path / "client.log")
    try:
        client.submit("before")
        assert client.next_line(30) == "result before 'before'"
        client.submit("running", 2.0)
        wait_for(lambda: "running" in _ran(marker), 30, "the long task to start")
        security.revoke_peer(secure.keys.dir, "bob")
        wait_for(lambda: "key 'bob' revoked" in secure.log_text(), 10, "the broker to drop bob")
        client.submit("after")
        # Neither the task that was running at revocation nor a new one reports back.
        assert client.lines_within(REFUSAL_WINDOW) == []
        assert _ran(marker) == ["before", "running"]
    finally:
        client.close()
    _run_authorised_client(secure, marker, tmp_path, "control")


def test_key_added_while_running_is_accepted(secure: SecurePool, tmp_path: Path) -> None:
    carol = security.add_peer(secure.keys.dir, "client", "carol", tmp_path / "carol.key")
    with fade.Executor(secure.pool.address, keys=carol, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 2, 3).result(timeout=30) == 5


def test_environment_variable_carries_the_key(
    secure: SecurePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(security.KEYS_ENV, str(secure.keys.client))
    with fade.Executor(secure.pool.address, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_rogue_broker_cannot_talk_to_a_client(pool: Pool, tmp_path: Path) -> None:
    """A broker without the secret key the client expects gets no task and sends no result."""
    ours, rogue = make_keys(tmp_path / "ours"), make_keys(tmp_path / "rogue")
    pool.start_broker("--keys", str(rogue.dir))
    pool.start_worker(1, None, "--keys", str(rogue.worker))
    pool.wait_workers(1)
    marker = tmp_path / "ran.txt"
    client = ClientProcess(pool.address, ours.client, marker, tmp_path / "client.log")
    try:
        client.submit("victim")
        assert client.lines_within(REFUSAL_WINDOW) == []
        assert _ran(marker) == []
    finally:
        client.close()
    control = ClientProcess(pool.address, rogue.client, marker, tmp_path / "control.log")
    try:
        control.submit("control")
        assert control.next_line(30) == "result control 'control'"
    finally:
        control.close()


# -- workers without the right keys ----------------------------------------------------------


def test_worker_without_authorised_keys_never_receives_a_task(
    pool: Pool, curve_keys: Keys, tmp_path: Path
) -> None:
    pool.start_broker("--keys", str(curve_keys.dir))
    pool.start_worker(1)
    pool.start_worker(1, None, "--keys", str(make_keys(tmp_path / "other").worker))
    pool.wait_workers(2)
    marker = tmp_path / "ran.txt"
    with fade.Executor(pool.address, keys=curve_keys.client, heartbeat_interval=INTERVAL) as ex:
        future = ex.submit(tasks.record, str(marker), "x")
        time.sleep(REFUSAL_WINDOW)
        assert not future.done()
        assert _ran(marker) == []
        pool.start_worker(1, None, "--keys", str(curve_keys.worker))
        assert future.result(timeout=30) == "x"
    assert _ran(marker) == ["x"]


# -- roles: raw sockets that hold a real key but ask for the wrong thing -------------------


def _receive(sock: zmq.Socket[bytes], timeout: float) -> list[p.Message]:
    """Every message that arrives within ``timeout`` seconds, heartbeats left out."""
    out = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            message = p.parse(sock.recv_multipart())
            if message.command is not p.Command.HEARTBEAT:
                out.append(message)
    return out


def _error_reason(sock: zmq.Socket[bytes], timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            break
        message = p.parse(sock.recv_multipart())
        if message.command is p.Command.ERROR:
            return p.decode_error(message.body)
    raise AssertionError("no ERROR from the broker")


def _submit_frames(marker: Path, tag: str) -> list[p.Frame]:
    payload = ser.dumps_call(tasks.record, (str(marker), tag), {})
    return p.encode_submit([(p.SubmitRecord(1, 0, 0.0), payload)])


def _hello(role: str) -> list[p.Frame]:
    extra = {"credits": 8} if role == "worker" else {}
    return list(raw_hello(role, host="test", **extra))


def test_worker_key_cannot_submit(secure: SecurePool, sockets: Sockets, tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    address, worker_key = secure.pool.address, secure.keys.worker
    as_client = sockets.peer(address, worker_key, b"C")
    as_client.send_multipart(_hello("client"))
    assert _error_reason(as_client) == "a worker key may not say HELLO as a client"
    submitter = sockets.peer(address, worker_key, b"C")
    submitter.send_multipart(_submit_frames(marker, "from-a-worker-key"))
    assert _error_reason(submitter) == "a worker key may not send SUBMIT"
    # Control: the same SUBMIT, after HELLO, on a client key, runs.
    client = sockets.peer(address, secure.keys.client, b"C")
    client.send_multipart(_hello("client"))
    client.send_multipart(_submit_frames(marker, "from-a-client-key"))
    wait_for(lambda: _ran(marker), 30, "the control task to run")
    time.sleep(REFUSAL_WINDOW / 2)
    assert _ran(marker) == ["from-a-client-key"]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        (_hello("worker"), "a client key may not say HELLO as a worker"),
        (p.encode_ready(8), "a client key may not send READY"),
        (p.encode_done(8, []), "a client key may not send DONE"),
        (p.encode(p.Command.DRAIN), "a client key may not send DRAIN"),
        (p.encode_obituary(b"W" * 16, {"exitcode": 1}), "a client key may not send OBITUARY"),
    ],
)
def test_client_key_cannot_act_as_a_worker(
    pool: Pool,
    curve_keys: Keys,
    sockets: Sockets,
    tmp_path: Path,
    frames: list[p.Frame],
    reason: str,
) -> None:
    pool.start_broker("--keys", str(curve_keys.dir))  # and no worker at all
    fake = sockets.peer(pool.address, curve_keys.client, b"W")
    fake.send_multipart(frames)
    assert _error_reason(fake) == reason
    marker = tmp_path / "ran.txt"
    with fade.Executor(pool.address, keys=curve_keys.client, heartbeat_interval=INTERVAL) as ex:
        future = ex.submit(tasks.record, str(marker), "x")
        fake.send_multipart(p.encode_ready(8))  # as if it had been registered
        got = _receive(fake, REFUSAL_WINDOW)
        assert p.Command.TASK not in [m.command for m in got]
        assert not future.done()
        pool.start_worker(1, None, "--keys", str(curve_keys.worker))
        assert future.result(timeout=30) == "x"


def test_identity_must_belong_to_the_key(secure: SecurePool, sockets: Sockets) -> None:
    """One key holder cannot act under the routing identity of another key's peer."""
    foreign = sockets.peer(secure.pool.address, secure.keys.client, identity=b"C" + os.urandom(15))
    foreign.send_multipart(_hello("client"))
    assert _error_reason(foreign) == "this routing identity does not belong to this key"
    # A supervisor may report the death of its own workers only.
    supervisor = sockets.peer(secure.pool.address, secure.keys.worker, b"S")
    other = security.peer_identity(b"W", None)
    supervisor.send_multipart(p.encode_obituary(other, {"exitcode": 1}))
    assert "only report deaths of workers with its own key" in _error_reason(supervisor)
    # ... and vouch that its own workers live (a silent one is busy), no other key's.
    voucher = sockets.peer(secure.pool.address, secure.keys.worker, b"S")
    voucher.send_multipart(p.encode_alive([other]))
    assert "only vouch for workers with its own key" in _error_reason(voucher)


def test_broker_restart_with_keys_reconnects_everyone(secure: SecurePool) -> None:
    address = secure.pool.address
    with fade.Executor(address, keys=secure.keys.client, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3
        secure.pool.kill_broker()
        future = ex.submit(tasks.add, 3, 4)
        secure.pool.start_broker("--keys", str(secure.keys.dir))
        assert future.result(timeout=30) == 7


# -- safe defaults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "*", "[::]", "10.213.79.1", "eth0", "head.example.invalid"]
)
def test_broker_refuses_a_network_address_without_keys(host: str) -> None:
    address = f"tcp://{host}:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "fade.broker", address],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "fade-keys init DIR" in result.stderr and "--insecure" in result.stderr
    assert "listening" not in result.stderr  # it never got as far as binding


def test_refusal_comes_before_any_socket_exists() -> None:
    with pytest.raises(fade.InsecureAddressError, match="fade-keys init"):
        Broker(f"tcp://0.0.0.0:{free_port()}")


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///tmp/fade.sock", True),
        ("inproc://fade", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://192.168.1.2:5555", False),
        ("tcp://lo:5555", False),  # an interface name: not taken on trust
        ("tcp://localhost.example.com:5555", False),
        ("ws://127.0.0.1:5555", False),
        ("127.0.0.1:5555", False),
    ],
)
def test_what_counts_as_local(address: str, local: bool) -> None:
    assert security.is_local_address(address) is local


def test_insecure_serves_a_network_address_and_keeps_warning(
    netns: Namespace, pool: Pool, tmp_path: Path
) -> None:
    """``--insecure`` on every address of a namespace of our own: it serves, and it nags."""
    port = free_port()
    log = tmp_path / "broker.log"
    with log.open("wb") as f:
        pool.broker = subprocess.Popen(
            [
                "ip", "netns", "exec", netns.name,
                sys.executable, "-m", "fade.broker", f"tcp://0.0.0.0:{port}", "--insecure",
                "--heartbeat-interval", str(INTERVAL), "--insecure-warning-period", "0.5",
            ],
            stderr=f,
        )  # fmt: skip
    pool.port = port
    address = f"tcp://{netns.ns_ip}:{port}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "fade.worker", address, "--heartbeat-interval", str(INTERVAL)]
    )
    pool.workers.append(worker)
    with fade.Executor(address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS) as ex:
        assert ex.submit(tasks.add, 20, 22).result(timeout=30) == 42
    wait_for(lambda: log.read_text().count("INSECURE") >= 3, 10, "the warning to repeat")
    first = next(line for line in log.read_text().splitlines() if "INSECURE" in line)
    assert "WARNING" in first and "fade-keys init" in first


# -- the key tool ----------------------------------------------------------------------------


def _keys_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fade.keys", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_fade_keys_command_line(tmp_path: Path) -> None:
    assert _keys_cli("init", "pool", cwd=tmp_path).returncode == 0
    assert _keys_cli("init", "pool", cwd=tmp_path).returncode == 2  # never overwrites
    added = _keys_cli("add", "client", "alice", "--dir", "pool", cwd=tmp_path)
    assert added.returncode == 0 and 'keys="alice.key"' in added.stdout
    assert _keys_cli("add", "worker", "rack1", "--dir", "pool", cwd=tmp_path).returncode == 0
    taken = _keys_cli("add", "worker", "alice", "--dir", "pool", cwd=tmp_path)
    assert taken.returncode == 2 and "already a client" in taken.stderr
    bad = _keys_cli("add", "client", "../x", "--dir", "pool", cwd=tmp_path)
    assert bad.returncode == 2 and "bad name" in bad.stderr
    # Secret files are private; the public folder is what the broker reads.
    for secret in ("alice.key", "rack1.key", "pool/broker.key_secret"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600, secret
    alice = security.load_peer_keys(tmp_path / "alice.key", "client")
    broker = security.load_broker_keys(tmp_path / "pool")
    assert alice.broker == broker.public and alice.role == "client" and alice.name == "alice"
    with pytest.raises(fade.SecurityError, match="is a client key; a worker needs"):
        security.load_peer_keys(tmp_path / "alice.key", "worker")
    # pyzmq reads the same files.
    assert zmq.auth.load_certificate(tmp_path / "alice.key") == (alice.public, alice.secret)
    listing = _keys_cli("list", "--dir", "pool", cwd=tmp_path).stdout
    assert re.search(r"client\s+alice\s+", listing) and re.search(r"worker\s+rack1\s+", listing)
    assert _keys_cli("revoke", "alice", "--dir", "pool", cwd=tmp_path).returncode == 0
    assert _keys_cli("revoke", "alice", "--dir", "pool", cwd=tmp_path).returncode == 1
    assert "alice" not in _keys_cli("list", "--dir", "pool", cwd=tmp_path).stdout
    missing = _keys_cli("add", "client", "bob", "--dir", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "fade-keys init nowhere" in missing.stderr


def test_a_secret_key_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Copied with cp (the umask's 644), a client key lets every local user act as it.
    keys = make_keys(tmp_path)
    security.load_peer_keys(keys.client)  # as fade-keys wrote it: 600
    assert "can be read by other users" not in caplog.text
    keys.client.chmod(0o644)
    security.load_peer_keys(keys.client)
    assert f"{keys.client} can be read by other users (mode 644)" in caplog.text
    assert f"chmod 600 {keys.client}" in caplog.text
    broker_secret = keys.dir / "broker.key_secret"
    broker_secret.chmod(0o440)  # a group's, as the Kubernetes recipe mounts keys: fine
    security.load_broker_keys(keys.dir)
    assert f"{broker_secret} can be read" not in caplog.text
    broker_secret.chmod(0o604)
    security.load_broker_keys(keys.dir)
    assert f"{broker_secret} can be read by other users (mode 604)" in caplog.text


def test_damaged_key_files_are_refused_clearly(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    text = keys.client.read_text()
    swapped = tmp_path / "swapped.key"
    other = security.load_peer_keys(make_keys(tmp_path / "b").client)
    swapped.write_text(text.replace(security.load_peer_keys(keys.client).public.decode(), "short"))
    with pytest.raises(fade.SecurityError, match="not a 40-character Z85 key"):
        security.load_peer_keys(swapped)
    swapped.write_text(
        text.replace(security.load_peer_keys(keys.client).public.decode(), other.public.decode())
    )
    with pytest.raises(fade.SecurityError, match="do not belong together"):
        security.load_peer_keys(swapped)
    with pytest.raises(fade.SecurityError, match="cannot read key file"):
        security.load_peer_keys(tmp_path / "absent.key")
    worker_cli = subprocess.run(
        [sys.executable, "-m", "fade.worker", "tcp://127.0.0.1:1", "--keys", str(keys.client)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert worker_cli.returncode == 2 and "is a client key" in worker_cli.stderr
    with pytest.raises(fade.SecurityError, match="is a worker key"):
        fade.Executor("tcp://127.0.0.1:1", keys=keys.worker)
    with pytest.raises(ValueError, match="embedded pool needs none"):
        fade.Executor(keys=keys.client)


# -- bad input -------------------------------------------------------------------------------


def test_unknown_commands_and_versions_get_a_clear_rate_limited_answer(
    pool: Pool, sockets: Sockets, tmp_path: Path
) -> None:
    log = tmp_path / "broker.log"
    with log.open("wb") as f:
        pool.start_broker(stderr=f.fileno())
    pool.start_worker(1)
    probe = sockets.dealer(pool.address)
    probe.send_multipart([p.MAGIC + bytes((p.VERSION, 0x63)), b"body"])
    assert _error_reason(probe) == "unknown command 99"
    time.sleep(INTERVAL * 1.5)  # one answer per peer per heartbeat interval
    probe.send_multipart([b"fd\x07\x01", b"{}"])
    reason = _error_reason(probe)
    assert reason.startswith(
        f"protocol version 7 is not spoken here: this broker (fade {fade.__version__}) speaks protocol version {p.VERSION}"
    )
    stranger = sockets.dealer(pool.address)
    stranger.send_multipart([b"GET / HTTP/1.1", b""])
    assert _receive(stranger, 1.0) == []  # not fade: dropped without an answer
    # A flood: answers and log lines are both rate-limited.
    flood = sockets.dealer(pool.address)
    for _ in range(5000):
        flood.send_multipart([p.MAGIC + bytes((p.VERSION, 0x63))])
    answers = _receive(flood, 2.0)
    assert 1 <= len(answers) <= 2.0 / INTERVAL + 2
    assert all(m.command is p.Command.ERROR for m in answers)
    assert pool.broker is not None and pool.broker.poll() is None
    logged = log.read_text().count("dropped a message")
    assert logged <= 20, f"{logged} log lines for ~5000 bad messages"
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_oversized_messages_harm_nothing(pool: Pool, sockets: Sockets, tmp_path: Path) -> None:
    pool.start_broker("--max-message-size", "1M")
    pool.start_worker(1)
    pool.wait_workers(1)
    big = b"x" * (2 << 20)
    # A peer that sends a frame over the limit is disconnected; the broker carries on.
    for _ in range(3):
        rogue = sockets.dealer(pool.address)
        rogue.send_multipart([*raw_hello("client"), big])
        rogue.send_multipart([big, big])
    time.sleep(0.5)
    assert pool.broker is not None and pool.broker.poll() is None
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        # Too large for the broker: the client fails the task instead of being disconnected.
        with pytest.raises(fade.MessageTooLargeError, match="broker accepts at most 1048576"):
            ex.submit(tasks.identity, big).result(timeout=30)
        # A result too large for the broker is reported by the worker.
        with pytest.raises(fade.MessageTooLargeError, match="limit on its way back"):
            ex.submit(tasks.bytes_of_size, 2 << 20).result(timeout=30)
        fits = b"y" * (512 << 10)
        assert ex.submit(tasks.identity, fits).result(timeout=30) == fits
    small = fade.Executor(pool.address, max_message_size=1 << 20)
    try:
        with pytest.raises(fade.MessageTooLargeError, match="more than max_message_size"):
            small.submit(tasks.identity, big).result(timeout=0)
    finally:
        small.shutdown()


def test_parse_size() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("64M") == 64 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512k") == 512 << 10
    for bad in ("", "0", "1.5G", "-1", "12Q"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- the rules as data (no sockets) --------------------------------------------------------


class _Sent:
    """Stands in for a received zmq.Frame: only its ZAP User-Id is read."""

    def __init__(self, user: str) -> None:
        self.user = user

    def get(self, name: str) -> str:
        assert name == "User-Id"
        return self.user


def _guard(tmp_path: Path) -> tuple[security.Guard, security.PeerKeys, security.PeerKeys]:
    keys = make_keys(tmp_path)
    guard = security.Guard(security.KeyRing(keys.dir))
    return guard, security.load_peer_keys(keys.client), security.load_peer_keys(keys.worker)


def test_role_table() -> None:
    client, worker = security.PERMITTED["client"], security.PERMITTED["worker"]
    assert p.Command.SUBMIT in client and p.Command.SUBMIT not in worker
    worker_only = (p.Command.READY, p.Command.DONE, p.Command.DRAIN, p.Command.OBITUARY)
    for command in (*worker_only, p.Command.ALIVE):
        assert command in worker and command not in client
    # Nothing the broker itself sends is accepted from anyone.
    for command in (p.Command.TASK, p.Command.RESULT, p.Command.WELCOME, p.Command.ERROR):
        assert command not in client | worker


def test_guard_checks_key_identity_role_and_obituaries(tmp_path: Path) -> None:
    guard, client, worker = _guard(tmp_path)

    def check(keys: security.PeerKeys, identity: bytes, frames: list[p.Frame]) -> str:
        try:
            first = _Sent(keys.public.decode())
            guard.check(first, identity, p.parse(frames))  # type: ignore[arg-type]
        except security.Refused as exc:
            return str(exc)
        return "ok"

    c_id, w_id = security.peer_identity(b"C", client), security.peer_identity(b"W", worker)
    assert check(client, c_id, _hello("client")) == "ok"
    assert check(worker, w_id, _hello("worker")) == "ok"
    assert check(client, c_id, p.encode_ready(1)) == "a client key may not send READY"
    assert check(worker, w_id, _hello("client")) == "a worker key may not say HELLO as a client"
    assert check(client, w_id, _hello("client")).startswith("this routing identity")
    dead_ours, dead_other = security.peer_identity(b"W", worker), security.peer_identity(b"W", None)
    assert check(worker, w_id, p.encode_obituary(dead_ours, {})) == "ok"
    assert "its own key" in check(worker, w_id, p.encode_obituary(dead_other, {}))
    # Vouching that workers live (ALIVE): for its own key's workers only.
    assert check(worker, w_id, p.encode_alive([dead_ours])) == "ok"
    assert "its own key" in check(worker, w_id, p.encode_alive([dead_ours, dead_other]))
    assert check(client, c_id, p.encode_alive([])) == "a client key may not send ALIVE"
    security.revoke_peer(tmp_path / "pool", "tester")
    guard.keyring.refresh()
    assert [peer.name for peer in guard.keyring.take_revoked()] == ["tester"]
    assert check(client, c_id, _hello("client")).startswith("this key is not authorised")


def test_reply_limiter_allows_one_answer_per_peer_per_period() -> None:
    limiter = security.ReplyLimiter(period=0.2, limit=3)
    assert limiter.allow(b"a") and not limiter.allow(b"a")
    assert limiter.allow(b"b") and limiter.allow(b"c")
    assert not limiter.allow(b"d")  # at most ``limit`` peers per period
    time.sleep(0.25)
    assert limiter.allow(b"a") and limiter.allow(b"d")


def test_error_and_welcome_on_the_wire() -> None:
    message = p.parse(p.encode_error("x" * 1000))
    assert message.command is p.Command.ERROR
    assert p.decode_error(message.body) == "x" * p.MAX_ERROR_TEXT
    welcome = p.Welcome("b", 1.0, 3, 4, 1 << 20)
    assert p.decode_welcome(p.parse(p.encode_welcome(welcome)).body) == welcome
    old = p.parse([p.encode_welcome(welcome)[0], b'{"broker_id":"b","heartbeat_interval":1,'
                   b'"heartbeat_liveness":3,"capacity":4}'])  # fmt: skip
    assert p.decode_welcome(old.body).max_message_size == 0
    assert p.speaks_fade(b"fd\x09\x01") and not p.speaks_fade(b"GET ")
    with pytest.raises(fade.ProtocolError, match="unknown command 99"):
        p.parse([p.MAGIC + bytes((p.VERSION, 0x63))])


def test_handshakes_with_unknown_keys_do_not_keep_the_broker_reading(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)

    class Counting(security.KeyRing):
        loads = 0

        def _load(self) -> dict[str, security.Peer]:
            Counting.loads += 1
            return super()._load()

    ring = Counting(keys.dir)  # a folder written just now: every refresh would re-read it
    before = Counting.loads
    for _ in range(1000):
        assert ring.lookup("x" * 40) is None
    assert Counting.loads - before <= 3
    assert ring.lookup(security.load_peer_keys(keys.client).public.decode()) is not None


# -- the HTTP endpoint: who can reach it and what it tells them (issue 14.2) -----------------

#: A Host header a page on another site sends after rebinding its name to the broker's IP.
FOREIGN_HOST = "attacker.example"


def _http(port: int, path: str, host: str | None = None, token: str | None = None) -> HttpAnswer:
    headers = {"Host": host} if host else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return HttpAnswer(response.status, str(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return HttpAnswer(exc.code, str(exc.headers), exc.read())


@dataclass
class HttpAnswer:
    code: int
    headers: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _wait_http(port: int) -> None:
    def answers() -> bool:
        try:
            return _http(port, "status").code == 200
        except OSError:
            return False

    wait_for(answers, 20, f"the HTTP endpoint on port {port}")


@pytest.fixture
def http_token(tmp_path: Path) -> tuple[Path, str]:
    """A token file as an operator makes one: random, private."""
    token = secrets.token_urlsafe(32)
    path = tmp_path / "http.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


def test_keys_do_not_make_the_http_endpoint_public(pool: Pool, curve_keys: Keys) -> None:
    """Found: with --keys, --http 0.0.0.0:P started without --http-public."""
    broker = pool.start_broker("--keys", str(curve_keys.dir), "--http", f"0.0.0.0:{free_port()}")
    try:
        code = broker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None  # it started serving: the bug
    assert code == 2, "a keyed broker served --http on 0.0.0.0 without --http-public"


def test_foreign_host_header_is_refused_with_keys_unless_allowed(
    pool: Pool, curve_keys: Keys
) -> None:
    """Found: with --keys the DNS-rebinding check was off, even on a 127.0.0.1 bind."""
    port = free_port()
    pool.start_broker("--keys", str(curve_keys.dir), "--http", f"127.0.0.1:{port}")
    _wait_http(port)
    for path in ("", "status", "metrics"):
        assert _http(port, path, host=f"{FOREIGN_HOST}:{port}").code == 403, path
        assert _http(port, path, host=FOREIGN_HOST).code == 403, path
    assert _http(port, "status", host=f"127.0.0.1:{port}").code == 200  # control

    # Told otherwise: the name given to --http-allow-host is served, others still are not.
    pool.kill_broker()
    port = free_port()
    pool.start_broker(
        "--keys", str(curve_keys.dir), "--http", f"127.0.0.1:{port}",
        "--http-allow-host", "fade.example", "--http-allow-host", "FADE2.example",
    )  # fmt: skip
    _wait_http(port)
    assert _http(port, "status", host=f"fade.example:{port}").code == 200
    assert _http(port, "status", host="fade2.example").code == 200
    assert _http(port, "status", host=f"{FOREIGN_HOST}:{port}").code == 403


def _identity_traces(identity: bytes) -> list[bytes]:
    """Ways a routing identity, or a part of it long enough to matter, could appear."""
    traces = [identity, base64.b64encode(identity), base64.urlsafe_b64encode(identity)]
    hexed = identity.hex()
    for text in (hexed, hexed.upper()):
        traces += [text[i : i + 10].encode() for i in range(len(text) - 9)]
    return traces


def _contains_key(value: Any, names: set[str]) -> bool:
    if isinstance(value, dict):
        return any(k in names or _contains_key(v, names) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains_key(v, names) for v in value)
    return False


@pytest.mark.timeout(120)
def test_http_endpoint_shows_aggregates_to_anyone_and_peers_only_with_the_token(
    pool: Pool, curve_keys: Keys, sockets: Sockets, http_token: tuple[Path, str]
) -> None:
    """No routing identity in any answer; hosts, pids and short ids only with the token."""
    pool.interval, pool.liveness = 1.0, 30  # the raw peers below send no heartbeats
    token_file, token = http_token
    port = free_port()
    pool.start_broker(
        "--keys", str(curve_keys.dir), "--http", f"127.0.0.1:{port}",
        "--http-token-file", str(token_file),
    )  # fmt: skip
    pool.start_worker(1, None, "--keys", str(curve_keys.worker))
    # Peers whose routing identities this test knows: raw DEALERs speaking the protocol.
    raw = {}
    for role, prefix, key, host in (
        ("worker", b"W", curve_keys.worker, "raw-worker-host"),
        ("client", b"C", curve_keys.client, "raw-client-host"),
    ):
        identity = security.peer_identity(prefix, security.load_peer_keys(key))
        sock = sockets.peer(pool.address, key, identity=identity)
        # No credit: the raw worker must not be handed the control task below.
        extra = {"credits": 0} if role == "worker" else {}
        sock.send_multipart(raw_hello(role, host=host, pid=4242, **extra))
        raw[role] = identity
    _wait_http(port)

    def detail() -> dict[str, Any]:
        answer = _http(port, "status", token=token)
        assert answer.code == 200, answer
        state: dict[str, Any] = answer.json()
        return state

    wait_for(lambda: len(detail().get("workers", [])) == 2, 30, "2 workers on /status")
    with fade.Executor(pool.address, keys=curve_keys.client, heartbeat_interval=1.0) as ex:
        assert ex.submit(tasks.add, 2, 3).result(timeout=30) == 5
        wait_for(lambda: len(detail().get("clients", [])) == 2, 30, "2 clients on /status")

        identities = set(raw.values())
        # The pool's own peers too, where the broker's STATUS answer still names them.
        state = query(pool.address, keys=str(curve_keys.client))
        for peer in [*state["workers"], *state["clients"]]:
            if "identity" in peer:
                identities.add(bytes.fromhex(peer["identity"]))
        anonymous = {path: _http(port, path) for path in ("", "status", "metrics", "nope")}
        with_token = {path: _http(port, path, token=token) for path in ("status", "metrics")}
        wrong = {path: _http(port, path, token=token[:-1] + "x") for path in ("status", "metrics")}
        shown = detail()

    # Positive control: with the token, per-peer detail is there.
    worker_pids = sorted(w["pid"] for w in shown["workers"])
    assert worker_pids == sorted([4242, *pool.worker_pids()])
    assert {c["host"] for c in shown["clients"]} == {"raw-client-host", os.uname().nodename}
    assert all(len(peer["id"]) == 12 for peer in [*shown["workers"], *shown["clients"]])
    assert b"raw-worker-host" in with_token["status"].body

    # Without it: the numbers, and nothing about any peer.
    assert {path: a.code for path, a in anonymous.items()} == {
        "": 200, "status": 200, "metrics": 200, "nope": 404,
    }  # fmt: skip
    public = anonymous["status"].json()
    assert public["worker_count"] == 2 and public["client_count"] == 2
    assert public["tasks_done"] == 1
    assert not _contains_key(public, {"workers", "clients", "host", "pid", "identity", "id"})
    for answer in anonymous.values():
        for secret in (b"raw-worker-host", b"raw-client-host"):
            assert secret not in answer.body, (secret, answer.body[:300])
    assert b"pid=" not in anonymous["metrics"].body and b"host=" not in anonymous["metrics"].body
    # A wrong token is refused outright, not quietly answered with less.
    for answer in wrong.values():
        assert answer.code == 401 and "Bearer" in answer.headers

    # No routing identity, nor any 10-digit run of one, in any answer, with or without token.
    assert len(identities) >= 2
    for answer in [*anonymous.values(), *with_token.values(), *wrong.values()]:
        for identity in identities:
            for trace in _identity_traces(identity):
                assert trace not in answer.body and trace not in answer.headers.encode(), (
                    identity.hex(),
                    trace,
                )


def test_without_a_token_file_no_request_gets_per_peer_detail(pool: Pool) -> None:
    port = free_port()
    pool.start_broker("--http", f"127.0.0.1:{port}")
    pool.start_worker()
    _wait_http(port)
    wait_for(lambda: _http(port, "status").json()["worker_count"] == 1, 30, "1 worker")
    for path in ("status", "metrics"):
        answer = _http(port, path, token=secrets.token_urlsafe(32))
        assert answer.code == 401 and b"--http-token-file" in answer.body
    public = _http(port, "status").json()
    assert public["detail"] == "off"
    assert not _contains_key(public, {"workers", "clients", "host", "pid"})


# -- peer-supplied strings that reach operators (issue 14.4) ---------------------------------

FORGED_LINE = "2026-01-01 00:00:00,000 fade-broker[1@h] INFO forged"
HOSTILE_HOSTS = {
    "newline": "x\n" + FORGED_LINE,
    "ansi": "\x1b[2J\x1b[31mred\x1b[0m",
}


def test_hostile_host_names_forge_no_log_line_and_no_terminal_escape(
    pool: Pool, sockets: Sockets, tmp_path: Path
) -> None:
    """A raw DEALER (pyzmq and fade.protocol only) says HELLO as a worker with a host name
    made to forge a broker log line, another with one that clears an operator's terminal."""
    pool.interval, pool.liveness = 1.0, 30  # the raw peers send no heartbeats
    log_path = tmp_path / "broker.log"
    with log_path.open("wb") as stderr:
        pool.start_broker(stderr=stderr.fileno())
    for host in HOSTILE_HOSTS.values():
        sock = sockets.dealer(pool.address)
        sock.send_multipart(raw_hello("worker", host=host, pid=7, credits=1))

    def log_lines() -> list[str]:
        return log_path.read_text(errors="replace").splitlines()

    wait_for(lambda: sum("joined" in line for line in log_lines()) == 2, 30, "2 joins logged")
    lines = log_lines()
    # Positive control: both joins are logged, each on its own line, the names escaped.
    joined = [line for line in lines if " joined; " in line]
    assert len(joined) == 2
    assert any("@x\\n2026-01-01 00:00:00,000 fade-broker[1@h] INFO forged:7 " in j for j in joined)
    assert any("@\\x1b[2J\\x1b[31mred\\x1b[0m:7 " in j for j in joined)
    # The attack: no line of the log is the forged one, no escape byte reached it.
    assert not [line for line in lines if line.startswith("2026-01-01 00:00:00,000")], lines
    assert "\x1b" not in log_path.read_text(errors="replace")

    result = subprocess.run(
        [sys.executable, "-m", "fade.status", pool.address],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "workers  2 (" in out  # control: both are listed
    assert "\\x1b[2J" in out and "x\\n2026-01-01" in out
    assert b"\x1b" not in result.stdout
    assert not [line for line in out.splitlines() if line.startswith("2026-01-01")]
