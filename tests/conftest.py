"""Fixtures that start real brokers and workers on loopback and clean up after them.

Every process a test starts is tracked; teardown kills what is left and the
session ends by checking that no child process of the test run survived.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import psutil
import pytest
import slurm
import zmq

import fade
from fade import security
from fade.sockets import connect_dealer

if TYPE_CHECKING:
    from browser import Chromium

TESTS = Path(__file__).resolve().parent
# Worker processes import the test helpers (tests/tasks.py) by name.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p
)
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# Shipped code is cached per host; keep the test run's cache out of the home directory,
# and task data sent by content likewise (fade/datacache.py). Caches this run made are
# removed when it ends (pytest_unconfigure): each run left two folders behind.
_RUN_CACHES: list[str] = []
for _variable, _kind in (("FADE_CODE_CACHE", "code"), ("FADE_DATA_CACHE", "data")):
    if _variable not in os.environ:
        os.environ[_variable] = os.path.join(
            tempfile.gettempdir(), f"fade-test-{_kind}-{os.getpid()}"
        )
        _RUN_CACHES.append(os.environ[_variable])


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _RUN_CACHES:
        shutil.rmtree(folder, ignore_errors=True)


#: Fast failure detection for tests: a silent peer is dead after 0.6 s.
INTERVAL = 0.2
LIVENESS = 3
EXPIRY = INTERVAL * LIVENESS


def raw_hello(role: str, **fields: object) -> list[bytes]:
    """HELLO frames for a hand-made peer (pyzmq directly, no fade peer code), speaking as
    this interpreter's Python; ``fields`` override the defaults."""
    import platform
    import sysconfig

    from fade import protocol as p

    common: dict[str, object] = {
        "host": "raw",
        "pid": os.getpid(),
        "version": fade.__version__,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
    }
    if role == "client":
        hello: p.Hello = p.ClientHello(**{"tag": os.urandom(p.TAG_SIZE), **common, **fields})  # type: ignore[arg-type]
    else:
        # A worker of this machine's platform and ABI, as fade-worker says: it may take
        # tasks that need compiled packages (tests/tasks.py imports numpy in places).
        here = {"platform": sysconfig.get_platform(), "abi": sysconfig.get_config_var("SOABI")}
        hello = p.WorkerHello(**{"credits": 1, **common, **here, **fields})  # type: ignore[arg-type]
    return [bytes(f) for f in p.encode_hello(hello)]


PYENV = Path.home() / ".pyenv" / "versions"


def other_python(minor: str) -> Path:
    """An interpreter of another minor version (from pyenv) with fade's dependencies, in a
    virtual environment made once per machine; fade itself comes from this checkout
    (PYTHONPATH). Skips the test where pyenv has no such version."""
    found = sorted(PYENV.glob(f"{minor}.*/bin/python"))
    if not found:
        pytest.skip(f"no Python {minor} under {PYENV} (pyenv install {minor})")
    return _test_venv(found[-1], f"python-{minor}", ["pyzmq>=25", "cloudpickle>=3"])


def python_with(name: str, requirements: list[str]) -> Path:
    """This Python in a virtual environment (made once per machine) with
    ``requirements`` instead of this one's packages: another side's versions of fade's
    dependencies. fade itself comes from this checkout (PYTHONPATH)."""
    return _test_venv(Path(sys.executable), name, requirements)


def _test_venv(base: Path, name: str, requirements: list[str]) -> Path:
    venv = Path(tempfile.gettempdir()) / f"fade-test-{name}"
    python = venv / "bin" / "python"
    if not python.exists():
        # The base interpreter, not this virtual environment's: its site-packages
        # would shadow the requirements.
        real = subprocess.run(
            [str(base), "-c", "import sys; print(sys._base_executable)"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        subprocess.run([real, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *requirements], check=True, timeout=300
        )
    return python


def fade_env(**extra: str) -> dict[str, str]:
    """The environment for a process that must import this checkout's fade."""
    root = str(TESTS.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail the test (never hang) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants; with SIGKILL, wait until they are gone."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(sig)
            if sig == signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass
    if sig == signal.SIGKILL:
        wait_for(lambda: not any(_alive(p) for p in procs), 10, f"process tree {pid} to die")


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (orphans reparented to a non-reaping init stay zombies)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _resource_tracker(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker: started by the first "spawn" ProcessPoolExecutor
    (max_tasks_per_child), it lives as long as this process, by design."""
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


@dataclass
class Pool:
    """A broker and worker processes on a loopback port, started and ended by the test."""

    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"  # "[::1]": IPv6 loopback
    interval: float = INTERVAL
    liveness: int = LIVENESS
    broker: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def _timing(self) -> list[str]:
        return [
            "--heartbeat-interval",
            str(self.interval),
            "--heartbeat-liveness",
            str(self.liveness),
        ]

    def start_broker(self, *extra: str, stderr: int | None = None) -> subprocess.Popen[bytes]:
        self.broker = subprocess.Popen(
            [sys.executable, "-m", "fade.broker", self.address, *self._timing(), *extra],
            stderr=stderr,
        )
        return self.broker

    def start_worker(
        self,
        processes: int = 1,
        env: dict[str, str] | None = None,
        *extra: str,
        stderr: int | None = None,
    ) -> subprocess.Popen[bytes]:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fade.worker",
                self.address,
                "--processes",
                str(processes),
                *self._timing(),
                *extra,
            ],
            env={**os.environ, **(env or {})},
            stderr=stderr,
        )
        self.workers.append(worker)
        return worker

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (the supervisors' children; one that has
        exited but is not yet reaped does not count)."""
        pids = []
        for sup in self.workers:
            try:
                children = psutil.Process(sup.pid).children()
            except psutil.NoSuchProcess:
                continue
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if child.status() != psutil.STATUS_ZOMBIE:
                        pids.append(child.pid)
        return pids

    def wait_workers(self, count: int, timeout: float = 20) -> list[int]:
        """The worker pids once there are ``count``: those seen then (asking again could
        catch a supervisor between reaping a process and starting its replacement)."""
        seen: list[int] = []

        def enough() -> bool:
            nonlocal seen
            seen = self.worker_pids()
            return len(seen) >= count

        wait_for(enough, timeout, f"{count} worker processes")
        return seen

    def kill_broker(self) -> None:
        if self.broker is not None:
            kill_tree(self.broker.pid)
            self.broker.wait()

    def stop(self) -> None:
        for worker in self.workers:
            kill_tree(worker.pid)
            worker.wait()
        self.kill_broker()


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    """A private folder on a 128 KiB file system of its own (tmpfs), for what a full
    disk does; root only (mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    folder = tmp_path / "small-file-system"
    folder.mkdir(mode=0o700)
    options = "size=128k,mode=0700"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def pool() -> Iterator[Pool]:
    """An empty pool description: the test starts what it needs; all is killed after."""
    p = Pool()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def tcp_pool(pool: Pool) -> Pool:
    """A broker and two worker processes (one ``fade-worker`` each) on loopback TCP."""
    pool.start_broker()
    pool.start_worker()
    pool.start_worker()
    pool.wait_workers(2)
    return pool


@dataclass
class Keys:
    """A broker key folder with one authorised client key and one authorised worker key."""

    dir: Path
    client: Path
    worker: Path


def make_keys(root: Path) -> Keys:
    security.create_key_dir(root / "pool")
    client = security.add_peer(root / "pool", "client", "tester", root / "client.key")
    worker = security.add_peer(root / "pool", "worker", "workers", root / "worker.key")
    return Keys(root / "pool", client, worker)


@pytest.fixture
def curve_keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


@pytest.fixture
def curve_pool(pool: Pool, curve_keys: Keys) -> Pool:
    """Like ``tcp_pool``, with CurveZMQ keys on: the broker accepts only ``curve_keys``."""
    pool.start_broker("--keys", str(curve_keys.dir))
    pool.start_worker(1, None, "--keys", str(curve_keys.worker))
    pool.start_worker(1, None, "--keys", str(curve_keys.worker))
    pool.wait_workers(2)
    return pool


def make_executor(kind: str, request: pytest.FixtureRequest, **kwargs: Any) -> cf.Executor:
    """An executor of that kind; ``kwargs`` are those both kinds take (``initializer``...)."""
    if kind == "processpool":
        return cf.ProcessPoolExecutor(2, **kwargs)
    if kind.endswith("-plain"):
        # The fast paths off (fade/fastpath.py): the client's I/O thread sends and reads
        # everything, and the workers' keeper threads hold their sockets for good.
        kind = kind.removesuffix("-plain")
        kwargs["fast_paths"] = False
        os.environ["FADE_FAST_PATHS"] = "0"  # for the workers this test starts
        request.addfinalizer(lambda: os.environ.pop("FADE_FAST_PATHS", None))
    if kind == "embedded":
        return fade.Executor(
            max_workers=2, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS, **kwargs
        )
    if kind == "tcp-curve":
        pool = request.getfixturevalue("curve_pool")
        keys: Keys = request.getfixturevalue("curve_keys")
        return fade.Executor(
            pool.address,
            keys=keys.client,
            heartbeat_interval=INTERVAL,
            heartbeat_liveness=LIVENESS,
            **kwargs,
        )
    pool = request.getfixturevalue("tcp_pool")
    return fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS, **kwargs
    )


#: fade's pools with the fast paths on (the default) and off ("-plain"), and the baseline.
KINDS = ["embedded", "tcp", "tcp-curve", "embedded-plain", "tcp-plain", "processpool"]


@pytest.fixture(params=KINDS)
def executor(request: pytest.FixtureRequest) -> Iterator[cf.Executor]:
    """The behaviour suite runs against each of these."""
    ex = make_executor(request.param, request)
    ex.kind = request.param  # type: ignore[attr-defined]
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(params=KINDS)
def executor_kind(request: pytest.FixtureRequest) -> str:
    """For the behaviour tests that build their executor themselves (make_executor)."""
    return str(request.param)


@pytest.fixture
def fade_executor(tcp_pool: Pool) -> Iterator[fade.Executor]:
    ex = fade.Executor(tcp_pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Each test must leave no process of its own behind."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    me = psutil.Process()

    def leftovers() -> list[psutil.Process]:
        return [
            p
            for p in me.children(recursive=True)
            if p.pid not in before and _alive(p) and not _resource_tracker(p)
        ]

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = leftovers()
    for proc in left:
        kill_tree(proc.pid)
    assert not left, f"processes left running: {[(p.pid, p.cmdline()) for p in left]}"


class Sockets:
    """Raw DEALER sockets for a test, every one tracked and closed at the end."""

    def __init__(self) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._made: list[zmq.Socket[bytes]] = []

    def dealer(self, address: str, identity: bytes | None = None) -> zmq.Socket[bytes]:
        """A DEALER with a routing identity of its own, as a peer must set (random, with
        the role byte of a worker, unless given)."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity or b"W" + os.urandom(15))
        sock.connect(address)
        self._made.append(sock)
        return sock

    def peer(
        self,
        address: str,
        key_file: Path,
        prefix: bytes = b"W",
        identity: bytes | None = None,
    ) -> zmq.Socket[bytes]:
        """A DEALER holding the keys of ``key_file``, as fade's peers make them."""
        keys = security.load_peer_keys(key_file)
        identity = identity or security.peer_identity(prefix, keys)
        sock = connect_dealer(self.context, address, identity=identity, keys=keys)
        self._made.append(sock)
        return sock

    def close(self) -> None:
        for sock in self._made:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    made = Sockets()
    try:
        yield made
    finally:
        made.close()


# -- a real headless Chromium (tests/browser.py) -------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    """Debian's Chromium, headless, with a profile of its own (skips where it is not
    installed)."""
    from browser import Chromium, find_chromium  # here: tests/browser.py imports conftest

    executable = find_chromium()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    chromium = Chromium(executable, tmp_path / "profile")
    try:
        yield chromium
    finally:
        chromium.close()


# -- a network namespace of our own ------------------------------------------------------------


@dataclass
class Namespace:
    """A network namespace joined to this host by a veth pair; its addresses exist only
    here, so all traffic stays on this machine."""

    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, timeout=10)

    def cut(self) -> None:
        self.run("ip", "link", "set", self.ns_if, "down")

    def restore(self) -> None:
        self.run("ip", "link", "set", self.ns_if, "up")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A fresh namespace (skips the test where namespaces cannot be made: root and
    iproute2 are needed); removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    ns = Namespace(f"fade-{tag}", f"fh{tag}", f"fw{tag}", "10.213.77.1", "10.213.77.2")
    try:
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
        _ip("link", "set", ns.ns_if, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        ns.run("ip", "addr", "add", f"{ns.ns_ip}/30", "dev", ns.ns_if)
        ns.run("ip", "link", "set", ns.ns_if, "up")
        ns.run("ip", "link", "set", "lo", "up")
    except (OSError, subprocess.SubprocessError) as exc:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", ns.host_if], capture_output=True, check=False)
        pytest.skip(f"cannot create a network namespace here (needs root and iproute2): {exc}")
    try:
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", ns.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


# -- services the deploy recipes need (tests/slurm.py, tests/sshd.py) --------------------------


def unavailable(service: str, reason: str) -> NoReturn:
    """Skip the test because ``service`` cannot run here, saying why; but fail it where
    $FADE_TEST_REQUIRE names the service (.ci/run sets it for what it installed), so that
    a broken fixture cannot pass as a skip."""
    required = {s.strip() for s in os.environ.get("FADE_TEST_REQUIRE", "").split(",")}
    if service in required:
        pytest.fail(f"{service} is required here (FADE_TEST_REQUIRE) but: {reason}")
    pytest.skip(f"{service}: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slurm.SlurmCluster]:
    """A real single-node Slurm cluster (munged, slurmctld, slurmd; see tests/slurm.py),
    started once for the session and stopped, with every process it started, at the end."""
    try:
        cluster = slurm.SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm.SlurmUnavailable as exc:
        unavailable("slurm", str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
