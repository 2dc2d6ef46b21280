"""The client I/O thread's sleeping place: muting the socket's descriptor must take effect
even for a thread already asleep, with epoll and with the selectors fallback."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fade.sockets import SPIN, spin_for_input, usable_cpus
from fade.wakeup import Sleeper

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(params=["epoll", "selectors"])
def sleeper(request: pytest.FixtureRequest) -> Iterator[tuple]:
    if request.param == "epoll" and not hasattr(select, "epoll"):
        pytest.skip("no epoll on this system")
    wake_r, wake_w = os.pipe()
    sock_r, sock_w = os.pipe()  # stands in for the socket's descriptor
    s = Sleeper(wake_r, use_epoll=request.param == "epoll")
    # The fallback must really be the fallback (not epoll under another name).
    assert (s._epoll is None) == (request.param == "selectors")
    s.watch(sock_r)
    yield s, wake_w, sock_w, sock_r
    s.close()
    for fd in (wake_r, wake_w, sock_r, sock_w):
        os.close(fd)


def test_wake_pipe_and_socket_descriptor_end_a_sleep(sleeper: tuple) -> None:
    s, wake_w, sock_w, sock_r = sleeper
    assert s.sleep(0.01) is False  # nothing: the timeout
    os.write(sock_w, b"x")
    assert s.sleep(5) is False  # the socket: not a wake-up
    os.read(sock_r, 1)
    os.write(wake_w, b"!")
    assert s.sleep(5) is True


def test_muting_reaches_a_thread_already_asleep(sleeper: tuple) -> None:
    s, _, sock_w, sock_r = sleeper
    if s._epoll is None:
        pytest.skip("the selectors fallback mutes from the next sleep on (tested below)")
    ended = threading.Event()

    def sleep_long() -> None:
        s.sleep(10)
        ended.set()

    thread = threading.Thread(target=sleep_long)
    thread.start()
    time.sleep(0.2)  # asleep by now
    s.mute()
    os.write(sock_w, b"x")  # readable, but muted: the sleeper must not wake
    assert not ended.wait(0.5)
    s.unmute()  # still readable: unmuting wakes it
    assert ended.wait(5)
    thread.join()
    os.read(sock_r, 1)


def test_watching_a_new_descriptor_drops_the_old(sleeper: tuple) -> None:
    s, _, sock_w, _ = sleeper
    new_r, new_w = os.pipe()
    try:
        s.watch(new_r)
        os.write(sock_w, b"x")  # the old descriptor no longer counts
        assert s.sleep(0.2) is False
        started = time.monotonic()
        os.write(new_w, b"y")
        assert s.sleep(5) is False and time.monotonic() - started < 4
        s.forget()
    finally:
        os.close(new_r)
        os.close(new_w)


def test_muted_descriptor_does_not_end_a_later_sleep(sleeper: tuple) -> None:
    """Both paths: once muted, input on the socket's descriptor ends no sleep begun after;
    unmuted, it does. (Only epoll also reaches a sleep already under way: with the
    fallback such a sleep may end early, which costs the I/O thread one idle pass.)"""
    s, _, sock_w, sock_r = sleeper
    s.mute()
    os.write(sock_w, b"x")
    assert s.sleep(0.3) is False  # the timeout, not the descriptor (muted)
    s.unmute()
    started = time.monotonic()
    assert s.sleep(5) is False and time.monotonic() - started < 4
    os.read(sock_r, 1)


# -- looking before sleeping (fade.sockets.spin_for_input, the fast paths' short wait) -------


@pytest.fixture
def pair() -> Iterator[tuple]:
    import zmq

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://spin")
    b.connect("inproc://spin")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def test_a_spin_sees_a_waiting_message_at_once(pair: tuple) -> None:
    sender, receiver = pair
    sender.send(b"x")
    time.sleep(0.05)
    started = time.perf_counter()
    assert spin_for_input(receiver, 5.0) is True
    assert time.perf_counter() - started < 1.0
    assert receiver.recv() == b"x"  # looking did not take it


def test_a_spin_ends_when_a_message_comes(pair: tuple) -> None:
    sender, receiver = pair
    threading.Timer(0.05, sender.send, (b"x",)).start()
    started = time.perf_counter()
    assert spin_for_input(receiver, 5.0) is True
    assert 0.04 < time.perf_counter() - started < 2.5  # not the 5 s it was allowed


def test_a_spin_without_a_message_ends_after_its_time(pair: tuple) -> None:
    _, receiver = pair
    started = time.perf_counter()
    assert spin_for_input(receiver, 0.05) is False
    assert 0.05 <= time.perf_counter() - started < 1.0


def test_a_process_with_one_cpu_never_looks_before_sleeping() -> None:
    # On one CPU the sender needs the very CPU a looking thread holds: pinned to one, a
    # round trip took 253 µs with the look and 151 without.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from fade import sockets; print(sockets.usable_cpus(), sockets.SPIN)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cpus, spin = map(float, out.stdout.split())
    assert cpus <= 1 and spin == 0  # (a container's quota may make it less than one)
    if len(os.sched_getaffinity(0)) >= 2 and usable_cpus() >= 2:  # a positive control
        assert SPIN > 0


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # no limit: the affinity's count
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
    ids=["v2-max", "v2-half", "v2-1.5", "v1-none", "v1-one", "unreadable", "none"],
)
def test_a_containers_cpu_quota_counts(tmp_path: Path, files: dict, expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path)) == (affinity if expected is None else min(affinity, expected))
