"""Fuzzing the broker: 100,000 random and mutated messages plus raw TCP bytes, keys on and off.

A bounded random generator with a fixed seed (hypothesis would be far too slow
for this count) builds fade messages the broker expects (HELLO, READY, SUBMIT,
DONE, DRAIN, OBITUARY, ...) and ones it does not (TASK, RESULT, unknown
commands), then mutates most of them: bit flips, truncations, extensions,
dropped, duplicated, swapped and inserted frames, other versions and commands,
extreme numbers in the packed records, and now and then a frame over the
broker's size limit. Some fuzzing peers read what the broker sends them (and
answer TASKs with forged DONEs), others never read. Raw TCP connections send
random bytes and mangled ZMTP greetings.

With keys, most fuzzing peers hold *authorised* keys (client and worker roles,
right and wrong identities): an outsider's junk never gets past the handshake,
so the interesting attacker is an insider.

The broker must stay up, its memory must stay bounded (no growth from the first
half of the fuzz to the second beyond a margin), and afterwards a fresh client
and worker must complete tasks.
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tasks
import zmq
from conftest import EXPIRY, INTERVAL, Keys, Pool, make_keys, raw_hello

import fade
import fade.status
from fade import protocol as p
from fade import security
from fade.sockets import connect_dealer

MESSAGES = 100_000
SEED = 20_240_611
MAX_MESSAGE_SIZE = 1 << 20
#: RSS may grow this much between the middle and the end of the fuzz (allocator noise),
#: beyond what the tasks the broker holds account for...
SECOND_HALF_GROWTH = 16 * 2**20
#: ... which is at most this much each (the fuzz's payloads are under 200 bytes; the
#: broker's own record is about 450, benchmarks/broker_scaling.py).
PER_HELD_TASK = 1024
#: ... and this much over the whole fuzz: what the accepted junk may legitimately hold.
TOTAL_GROWTH = 128 * 2**20

Frames = list[bytes]


class Generator:
    """Random, valid and mutated fade messages from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.task_keys: collections.deque[bytes] = collections.deque(maxlen=512)
        self.identities: list[bytes] = []
        self._next_id = 0

    def message(self) -> Frames:
        roll = self.rng.random()
        if roll < 0.3:
            return self.valid()
        if roll < 0.85:
            return self.mutate(self.valid()) or [b""]  # ZeroMQ has no empty message
        return self.noise()

    # -- valid messages ---------------------------------------------------------------

    def valid(self) -> Frames:
        rng = self.rng
        kind = rng.choices(
            ["hello", "ready", "submit", "done", "heartbeat", "drain", "disconnect",
             "obituary", "error", "task", "result", "welcome", "reset"],
            weights=[8, 8, 20, 15, 6, 2, 1, 3, 1, 2, 2, 1, 1],
        )[0]  # fmt: skip
        if kind == "hello":
            role = rng.choice(["client", "worker"])
            extra = {"credits": rng.randrange(9)} if role == "worker" else {}
            return raw_hello(role, host="fuzz", pid=rng.randrange(1 << 16), **extra)
        if kind == "ready":
            return _b(p.encode_ready(rng.choice([0, 1, 8, 4096, 2**32 - 1])))
        if kind == "submit":
            return _b(p.encode_submit([self._submit_record() for _ in range(rng.randrange(1, 4))]))
        if kind == "done":
            results = [self._done_record() for _ in range(rng.randrange(0, 4))]
            return _b(p.encode_done(rng.randrange(0, 9), results))
        if kind == "obituary":
            dead = rng.choice(self.identities) if self.identities else self._bytes(16)
            return _b(p.encode_obituary(dead, {"exitcode": rng.randrange(-9, 256)}))
        if kind == "error":
            return _b(p.encode_error("fuzz"))
        if kind == "task":
            record = p.TaskRecord(self._bytes(24), 0.0)
            return _b(p.encode_task([(record, p.Payload(self._bytes(32)))]))
        if kind == "result":
            return _b(p.encode_result(1, [(p.ResultRecord(1, p.Status.OK), p.Payload(b"x"))]))
        if kind == "welcome":
            return _b(p.encode_welcome(p.Welcome("fuzz", 1.0, 3, 4)))
        command = {
            "heartbeat": p.Command.HEARTBEAT,
            "drain": p.Command.DRAIN,
            "disconnect": p.Command.DISCONNECT,
            "reset": p.Command.RESET,
        }[kind]
        return _b(p.encode(command))

    def _submit_record(self) -> tuple[p.SubmitRecord, p.Payload]:
        rng = self.rng
        # Payloads the worker can never run: there are no workers during the fuzz anyway,
        # and a pickle of None is not a function.
        buffers = (self._bytes(rng.randrange(0, 64)),) if rng.random() < 0.3 else ()
        payload = p.Payload(b"\x80\x05N." + self._bytes(rng.randrange(0, 64)), buffers)
        self._next_id += 1
        record = p.SubmitRecord(self._next_id, rng.choice([0, 1, 3, 65535]), rng.choice([0.0, 0.5]))
        return record, payload

    def _done_record(self) -> tuple[p.DoneRecord, p.Payload]:
        rng = self.rng
        if self.task_keys and rng.random() < 0.7:
            key = rng.choice(self.task_keys)
        else:
            key = self._bytes(rng.randrange(1, 30))
        status = rng.choice(list(p.Status))
        payload = p.Payload(
            b"" if status is p.Status.RETURNED else self._bytes(rng.randrange(0, 40))
        )
        return p.DoneRecord(key, status), payload

    # -- mutations and noise -------------------------------------------------------------

    def mutate(self, frames: Frames) -> Frames:
        rng = self.rng
        frames = list(frames)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            i = rng.randrange(len(frames)) if frames else 0
            op = rng.randrange(12)
            if not frames:
                frames.append(self._bytes(8))
            elif op == 0:  # flip bits
                frame = bytearray(frames[i])
                for _ in range(rng.randrange(1, 4)):
                    if frame:
                        frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
                frames[i] = bytes(frame)
            elif op == 1:  # truncate
                frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
            elif op == 2:  # extend
                frames[i] += self._bytes(rng.randrange(1, 64))
            elif op == 3:  # drop a frame
                del frames[i]
            elif op == 4:  # duplicate a frame
                frames.insert(i, frames[i])
            elif op == 5:  # insert a random frame
                frames.insert(i, self._bytes(rng.randrange(0, 128)))
            elif op == 6 and len(frames) > 1:  # swap two frames
                j = rng.randrange(len(frames))
                frames[i], frames[j] = frames[j], frames[i]
            elif op == 7:  # another protocol version
                frames[0] = frames[0][:2] + bytes([rng.randrange(256)]) + frames[0][3:]
            elif op == 8:  # another (or unknown) command
                frames[0] = frames[0][:3] + bytes([rng.randrange(256)])
            elif op == 9 and len(frames) > 1:  # extreme numbers in the meta frame
                frames[1] = _extreme(frames[1], rng)
            elif op == 10:  # many frames
                frames += [b""] * rng.randrange(1, 200)
            else:  # a JSON body that is valid JSON but not what was expected
                frames[-1] = rng.choice([b"[]", b"null", b'{"role": 1}', b'{"credits": -1}', b"{"])
        return frames

    def noise(self) -> Frames:
        rng = self.rng
        count = rng.randrange(0, 7)
        if rng.random() < 0.01:
            return [self._bytes(64 * 1024) for _ in range(max(count, 1))]
        return [self._bytes(rng.randrange(0, 257)) for _ in range(count)] or [b""]

    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


def _b(frames: list[p.Frame]) -> Frames:
    return [bytes(f) for f in frames]  # type: ignore[arg-type]


def _extreme(meta: bytes, rng: random.Random) -> bytes:
    """Overwrite a random aligned number in a packed meta frame with an extreme value."""
    if len(meta) < 2:
        return meta
    size = rng.choice([1, 2, 4, 8])
    if len(meta) < size:
        size = 1
    offset = rng.randrange(len(meta) - size + 1)
    value = rng.choice([0, 1, (1 << (8 * size)) - 1, 1 << (8 * size - 1)])
    return meta[:offset] + value.to_bytes(size, "little") + meta[offset + size :]


def _raw_tcp(port: int, rng: random.Random) -> int:
    """One raw TCP connection with random bytes or a mangled ZMTP greeting; bytes sent."""
    greeting = bytearray(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00")
    greeting += rng.choice([b"NULL", b"CURVE", b"PLAIN", b"XXXX"]).ljust(20, b"\x00")
    greeting += b"\x00" + b"\x00" * 31
    kind = rng.randrange(4)
    if kind == 0:
        blob = rng.randbytes(rng.randrange(1, 8192))
    elif kind == 1:
        blob = bytes(greeting) + rng.randbytes(rng.randrange(0, 512))
    elif kind == 2:  # a greeting, then a frame header announcing a huge frame
        blob = bytes(greeting) + b"\x06" + struct.pack(">Q", 1 << 40) + rng.randbytes(64)
    else:
        mangled = bytearray(greeting)
        for _ in range(4):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        blob = bytes(mangled) + rng.randbytes(64)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(blob)
            raw.settimeout(0.05)
            try:
                raw.recv(4096)
            except (TimeoutError, OSError):
                pass
    except OSError:
        return 0  # the broker may reset a connection it does not like: that is fine
    return len(blob)


@dataclass
class FuzzPeer:
    make: Callable[[], zmq.Socket[bytes]]
    reads: bool  # a peer that never reads: the broker must not queue replies without bound
    insider: bool  # False: it has no authorised key, nothing it sends reaches fade
    sock: zmq.Socket[bytes] = field(init=False)
    sent: int = 0
    received: int = 0
    blocked: int = 0  # sends that would have blocked: not connected (an outsider)
    renewed: int = 0

    def __post_init__(self) -> None:
        self.sock = self.make()

    def renew(self) -> None:
        """A fresh socket: after an oversized frame the broker no longer reads the old one
        (ZeroMQ stops reading at once, and closes once it has flushed what it owes us)."""
        self.sock.close(linger=0)
        self.sock = self.make()
        self.renewed += 1


@dataclass
class Fuzz:
    peers: list[FuzzPeer] = field(default_factory=list)
    context: zmq.Context[zmq.Socket[bytes]] = field(default_factory=zmq.Context)

    def dealer(
        self, address: str, identity: bytes | None, reads: bool, insider: bool = True
    ) -> None:
        def make() -> zmq.Socket[bytes]:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if identity is not None:
                sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(address)
            return sock

        self.peers.append(FuzzPeer(make, reads, insider))

    def keyed(
        self,
        address: str,
        key_file: Path,
        prefix: bytes,
        reads: bool,
        *,
        bound: bool,
        insider: bool = True,
    ) -> None:
        keys = security.load_peer_keys(key_file)

        def make() -> zmq.Socket[bytes]:
            # A fresh identity for each socket: a keyed broker refuses a second
            # connection under an identity in use until the first is closed (no takeover
            # of another key holder's identity), and the one dropped for an oversized
            # frame is still being closed when its replacement connects.
            identity = security.peer_identity(prefix, keys if bound else None)
            sock = connect_dealer(self.context, address, identity=identity, keys=keys)
            sock.setsockopt(zmq.SNDHWM, 1000)
            return sock

        self.peers.append(FuzzPeer(make, reads, insider))

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close(linger=0)
        self.peers.clear()
        if not self.context.closed:
            self.context.term()


@pytest.fixture
def fuzz() -> Iterator[Fuzz]:
    f = Fuzz()
    try:
        yield f
    finally:
        f.close()


def _add_peers(fuzz: Fuzz, address: str, keys: Keys | None, tmp_path: Path) -> list[bytes]:
    """The fuzzing peers; returns identities an OBITUARY may name."""
    if keys is None:
        identities = [b"C" + bytes(15), b"W" + bytes(15), b"W" + b"\xff" * 15, b"x"]
        for i, identity in enumerate(identities):
            fuzz.dealer(address, identity, reads=i % 2 == 0)
        fuzz.dealer(address, None, reads=True)
        fuzz.dealer(address, None, reads=False)
        return identities
    other = make_keys(tmp_path / "other")
    for prefix, key_file in ((b"C", keys.client), (b"W", keys.worker)):
        fuzz.keyed(address, key_file, prefix, reads=True, bound=True)
        fuzz.keyed(address, key_file, prefix, reads=False, bound=True)
        fuzz.keyed(address, key_file, prefix, reads=True, bound=False)
    # Outsiders: their messages must never arrive. No keys at all, another pool's keys.
    fuzz.dealer(address, b"C" + bytes(15), reads=True, insider=False)
    fuzz.keyed(address, other.client, b"C", reads=True, bound=True, insider=False)
    return [security.peer_identity(b"W", security.load_peer_keys(keys.worker))]


def _drain(peer: FuzzPeer, gen: Generator) -> None:
    """Read what the broker sent; remember task keys so that forged DONEs can name them."""
    while True:
        try:
            frames = peer.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        peer.received += 1
        try:
            message = p.parse(frames)
            if message.command is p.Command.TASK:
                gen.task_keys.extend(r.key for r, _ in p.decode_task(message.body))
        except fade.ProtocolError:
            pass


@pytest.mark.timeout(150)
@pytest.mark.parametrize("with_keys", [False, True], ids=["no-keys", "keys"])
def test_fuzzed_broker_stays_up_bounded_and_serving(
    pool: Pool, fuzz: Fuzz, tmp_path: Path, with_keys: bool
) -> None:
    keys = make_keys(tmp_path) if with_keys else None
    extra = ["--keys", str(keys.dir)] if keys else []
    broker = pool.start_broker(
        *extra, "--max-message-size", str(MAX_MESSAGE_SIZE), "--log-level", "CRITICAL"
    )
    rss = psutil.Process(broker.pid)
    rng = random.Random(SEED + with_keys)
    gen = Generator(rng)
    gen.identities = _add_peers(fuzz, pool.address, keys, tmp_path)
    time.sleep(0.5)  # handshakes
    started = time.monotonic()
    samples: dict[int, int] = {}
    delivered = raw_bytes = raw_connections = oversized = held_middle = 0
    while delivered < MESSAGES:
        peer = fuzz.peers[rng.randrange(len(fuzz.peers))]
        frames = gen.message()
        if peer.insider and rng.random() < 0.0002:
            # The broker drops this peer's connection; it carries on with a new one.
            _send(peer, [frames[0], b"o" * (MAX_MESSAGE_SIZE + 1)])
            peer.renew()
            oversized += 1
        if not _send(peer, frames):
            continue
        delivered += peer.insider
        if peer.reads and delivered % 16 == 0:
            _drain(peer, gen)
        if peer.insider and delivered % 1000 == 0:
            raw_bytes += _raw_tcp(pool.port, rng)
            raw_connections += 1
            assert broker.poll() is None, f"the broker died after {delivered} messages"
            if delivered % 10_000 == 0:
                samples[delivered] = rss.memory_info().rss
            if delivered == MESSAGES // 2:
                held_middle = _tasks_held(pool.address, tmp_path if keys else None)
    fuzz_seconds = time.monotonic() - started
    time.sleep(1.0)  # the broker works through what is still queued
    samples[MESSAGES + 1] = rss.memory_info().rss
    held_end = _tasks_held(pool.address, tmp_path if keys else None)
    assert broker.poll() is None
    stats = [(q.insider, q.reads, q.sent, q.blocked, q.received, q.renewed) for q in fuzz.peers]
    fuzz.close()

    time.sleep(EXPIRY * 2)  # the fuzzers' registrations expire
    worker_extra = ["--keys", str(keys.worker)] if keys else []
    pool.start_worker(1, None, *worker_extra)
    client_keys = keys.client if keys else None
    with fade.Executor(pool.address, keys=client_keys, heartbeat_interval=INTERVAL) as ex:
        futures = [ex.submit(tasks.square, x) for x in range(200)]
        assert [f.result(timeout=60) for f in futures] == [x * x for x in range(200)]
    assert broker.poll() is None

    mib = {k: round(v / 2**20, 1) for k, v in samples.items()}
    print(
        f"\n{'keys' if keys else 'no keys'}: {delivered} messages in {fuzz_seconds:.1f}s, "
        f"{raw_connections} raw TCP connections ({raw_bytes} bytes), {oversized} oversized; "
        f"broker RSS MiB {mib}; peers (insider, reads, sent, blocked, received, renewed) {stats}"
    )
    first, middle, end = samples[10_000], samples[MESSAGES // 2], samples[MESSAGES + 1]
    # The fuzzers' valid SUBMITs queue real tasks (no worker runs during the fuzz):
    # memory may grow by what those hold, and by allocator noise, not more.
    legit = max(0, held_end - held_middle) * PER_HELD_TASK
    assert end - middle < SECOND_HALF_GROWTH + legit, (
        f"RSS kept growing: {mib}; tasks held {held_middle} -> {held_end}"
    )
    assert max(samples.values()) - first < TOTAL_GROWTH, f"RSS grew too much: {mib}"


def _tasks_held(address: str, key_dir: Path | None) -> int:
    """Tasks the broker owns now, from its own STATUS (with the test client's key)."""
    key_file = str(key_dir / "client.key") if key_dir is not None else None
    state = fade.status.query(address, timeout=30, keys=key_file)
    return int(state["queued"]) + int(state["running"])


def _send(peer: FuzzPeer, frames: Frames) -> bool:
    """Send, waiting out back-pressure from the broker; an outsider's send may not block."""
    try:
        peer.sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        if not peer.insider:
            peer.blocked += 1
            return False
        # The broker is behind: it must catch up (not stop reading) within the deadline.
        assert peer.sock.poll(10_000, zmq.POLLOUT), "the broker stopped reading"
        peer.sock.send_multipart(frames, zmq.NOBLOCK)
    peer.sent += 1
    return True
