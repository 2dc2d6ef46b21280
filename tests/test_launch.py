"""The embedded pool's start (fade/launch.py): its first workers start before the client
imports ZeroMQ, as many as leave the client a CPU; an Executor that fails to start
leaves none of them behind."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import threading
from typing import Any

import psutil
import pytest

import fade
from fade.launch import _started_at_once

pytestmark = pytest.mark.timeout(120)

# Records, in order, each worker process started and the import of ZeroMQ.
_ORDER = r"""
import sys
events = []

def hook(event, args):
    if event == "subprocess.Popen" and "fade.worker" in list(args[1]):
        events.append("worker")
    elif event == "import" and args[0] == "zmq":
        events.append("zmq")

sys.addaudithook(hook)
import fade
with fade.Executor(max_workers=3) as ex:
    assert ex.submit(abs, -1).result(timeout=60) == 1
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
    ],
    ids=["keys", "priority", "control", "initargs"],
)
def test_an_executor_that_fails_to_start_leaves_no_worker_behind(
    kwargs: dict[str, Any], error: type[BaseException] | None, message: str | None
) -> None:
    # These arguments are checked after the workers have started (checking them needs
    # the modules imported while the workers start): a failure must end the workers.
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
