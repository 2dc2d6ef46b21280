"""The embedded pool's start (fade/launch.py): its first workers start before the client
imports ZeroMQ, as many as leave the client a CPU; an Executor that fails to start
leaves none of them behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import INTERVAL, Pool, wait_for

import fade
from fade.launch import _started_at_once, peer_identity, spawn_worker
from fade.options import WorkerOptions

pytestmark = pytest.mark.timeout(120)

# Records, in order, each worker process started and the import of ZeroMQ.
_ORDER = r"""
import sys
events = []

def hook(event, args):
    if event == "subprocess.Popen" and any("fade.worker" in str(a) for a in args[1]):
        events.append("worker")
    elif event == "import" and args[0] == "zmq":
        events.append("zmq")

sys.addaudithook(hook)
import time
import fade
with fade.Executor(max_workers=3) as ex:
    assert ex.submit(abs, -1).result(timeout=60) == 1
    deadline = time.monotonic() + 30  # the others start once one serves
    while events.count("worker") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
print(" ".join(events))
"""


def test_the_first_workers_start_before_the_client_imports_zeromq() -> None:
    # Their start (0.1 s each) and the client's imports (0.06 s) then overlap on the way
    # to the first result; the others start once the client has a CPU to spare.
    out = subprocess.run([sys.executable, "-c", _ORDER], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    events = out.stdout.split()
    early = _started_at_once(3)
    assert events == ["worker"] * early + ["zmq"] + ["worker"] * (3 - early), events


def test_as_many_start_at_once_as_leave_the_client_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from fade import launch

    for cpus, workers, early in [(1, 4, 1), (2, 4, 1), (2, 1, 1), (8, 4, 4), (8, 16, 7)]:
        monkeypatch.setattr(launch, "usable_cpus", lambda cpus=cpus: float(cpus))
        assert _started_at_once(workers) == early, (cpus, workers)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"keys": "alice.key"}, ValueError, "keys are for a broker"),
        ({"priority": "high"}, TypeError, "priority must be an int"),
        ({"initializer": lambda: threading.Lock()}, None, None),  # pickles: a control
        ({"initializer": print, "initargs": (threading.Lock(),)}, Exception, "pickle"),
        ({"broker_fails": True}, OSError, "no room for a broker"),
    ],
    ids=["keys", "priority", "control", "initargs", "broker"],
)
def test_an_executor_that_fails_to_start_leaves_no_worker_behind(
    kwargs: dict[str, Any],
    error: type[BaseException] | None,
    message: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # These arguments are checked after the workers have started (checking them needs
    # the modules imported while the workers start), and the broker is made then: a
    # failure must end the workers.
    if kwargs.pop("broker_fails", False):
        from fade import embedded

        def no_broker(*args: Any, **kwargs: Any) -> None:
            raise OSError("no room for a broker")

        monkeypatch.setattr(embedded, "Broker", no_broker)
    me = psutil.Process()
    before = {c.pid for c in me.children()}
    folders = set(glob.glob(os.path.join(tempfile.gettempdir(), f"fade-{os.getpid()}-*")))
    if error is None:
        ex = fade.Executor(max_workers=2, **kwargs)
        started = {c.pid for c in me.children()} - before
        assert started, "the control started no worker"
        ex.shutdown()
    else:
        with pytest.raises(error, match=message):
            fade.Executor(max_workers=2, **kwargs)
    assert {c.pid for c in me.children()} - before == set()
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), f"fade-{os.getpid()}-*"))) == folders


@pytest.mark.parametrize("broker", [True, False], ids=["first-serves", "none-serves"])
def test_a_staggered_start_holds_the_others_until_one_serves(
    pool: Pool, broker: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The others wait for the first to serve (it registered with the broker); with no
    # broker none ever does, and they start after STAGGER_LIMIT all the same. The limit
    # is long where the first must serve first, so that a slow start cannot pass it.
    from fade import supervisor as sv

    limit = 60.0 if broker else 1.0
    monkeypatch.setattr(sv, "STAGGER_LIMIT", limit)
    if broker:
        pool.start_broker()
    options = WorkerOptions(
        address=pool.address, processes=3, heartbeat_interval=INTERVAL, heartbeat_liveness=3
    )
    sup = sv.Supervisor(options)
    try:
        first = spawn_worker(sup.options, peer_identity(b"W"), None)
        began = time.monotonic()
        sup.start([first], stagger=True)
        assert sup.pids == [first.process.pid]
        wait_for(lambda: sup.tick() and len(sup.pids) == 3, 50, "the other workers to start")
        waited = time.monotonic() - began
        if broker:
            assert first.serving and waited < limit
            assert first.interval == INTERVAL  # the broker's, which it vouches at
        else:
            assert not first.serving and waited >= limit
    finally:
        sup.stop(signal.SIGKILL)
        sup.close()


def test_serving_records_split_between_reads_are_joined() -> None:
    from fade.supervisor import decode_serving, encode_serving

    stream = encode_serving(0.2) + encode_serving(1.5)
    intervals, rest = decode_serving(stream[:12])
    assert intervals == [0.2] and rest == stream[9:12]
    intervals, rest = decode_serving(rest + stream[12:])
    assert intervals == [1.5] and rest == b""


# A client run as "python <elsewhere>/run.py" from a folder holding a module named like
# one of Python's own (here platform.py, which ZeroMQ imports).
_FROM_ANOTHER_FOLDER = r"""
import fade
with fade.Executor(max_workers=1) as ex:
    print(ex.submit(pow, 2, 5).result(timeout=30))
"""


def test_a_module_in_the_current_folder_does_not_shadow_the_workers_imports(
    tmp_path: Path,
) -> None:
    # The client's own path starts with its script's folder, not the current one; its
    # workers' must not either ("python -m" puts the current folder first): there they
    # imported the user's platform.py, died at start-up, again and again, and the
    # first result never came.
    here = tmp_path / "here"
    here.mkdir()
    (here / "platform.py").write_text('raise RuntimeError("the user\'s own platform.py")\n')
    script = tmp_path / "elsewhere" / "run.py"
    script.parent.mkdir()
    script.write_text(_FROM_ANOTHER_FOLDER)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=here, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["32"]
    assert "platform.py" not in out.stderr


# Workers whose environment is broken (here a PYTHONHOME with no Python in it: the
# interpreter cannot even start) die at start-up however often they are replaced.
_CANNOT_START = r"""
import os, sys, time
import fade
os.environ["PYTHONHOME"] = sys.argv[1]
began = time.monotonic()
with fade.Executor(max_workers=2) as ex:
    future = ex.submit(pow, 2, 5)
    try:
        future.result(timeout=60)
    except fade.BrokenPoolError as exc:
        print("failed:", exc)
    try:
        ex.submit(pow, 2, 6)
    except fade.BrokenPoolError:
        print("later submits fail too")
print(f"exited after {time.monotonic() - began:.1f}s")
"""


def test_an_embedded_pool_whose_workers_cannot_start_breaks_and_says_why(tmp_path: Path) -> None:
    # ProcessPoolExecutor breaks when a worker dies; fade replaces workers that die, but
    # when every one dies during start-up, again and again, waiting helps nobody: the
    # futures fail (BrokenPoolError, a BrokenExecutor), and the pool ends promptly.
    broken = tmp_path / "no-python-here"
    broken.mkdir()
    script = tmp_path / "run.py"
    script.write_text(_CANNOT_START)
    out = subprocess.run(
        [sys.executable, str(script), str(broken)], capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("failed: "), out.stdout
    assert "worker processes cannot start" in lines[0]
    assert "exited with status 1" in lines[0] and "error output" in lines[0]
    assert lines[1] == "later submits fail too"
    assert float(lines[2].split()[2].rstrip("s")) < 30, lines[2]
    assert "No module named 'encodings'" in out.stderr  # the workers' own words, above


# A script and a module beside it, run from another folder, shipping nothing: the
# embedded workers must import what the client imports, as ProcessPoolExecutor's do.
_BESIDE = r"""
import fade, helper
with fade.Executor(max_workers=1, ship_code="off") as ex:
    print(ex.submit(helper.triple, 14).result(timeout=30))
"""


def test_the_embedded_workers_import_from_the_clients_path(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "helper.py").write_text("def triple(x):\n    return 3 * x\n")
    (project / "run.py").write_text(_BESIDE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, str(project / "run.py")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["42"]
