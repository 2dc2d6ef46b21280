"""The systems under test, each opened as a context manager that yields a measurable target.

    name           what is started                                       transport
    fade-tcp       fade.broker + fade.worker --processes 2 (subprocesses), tcp loopback
                   then fade.Executor("tcp://127.0.0.1:PORT")
    fade-embedded  fade.Executor(max_workers=2)                          ipc (fade's choice)
    processpool    concurrent.futures.ProcessPoolExecutor(2)             pipes
    raw-zmq        rawzmq.py: guide LRU broker + 2 DEALER workers        tcp loopback
    loky           loky.ProcessPoolExecutor(2)                           pipes
    dask           distributed LocalCluster, 2 worker processes x 1 thread  tcp loopback
    ray            ray.init(num_cpus=2) behind a small Executor adapter  ray

fade-tcp runs with ``share_threshold=None`` (see TRANSPORT): every row compares transport.
fade-embedded runs with the Executor's defaults, as ``fade.Executor()`` is first tried: its
large buffers go through shared memory (fade/shm.py), never by content, so its 50 MB row
compares transport too.

Opening a system starts everything it needs and closing it stops everything, error or not, so the
runner can time "start to first result" from before ``open_target`` is entered; ``preload`` does
the imports first, so that time leaves them out. Optional peers are imported only here, never at
module level; ``missing`` tells ``bench.py`` which ones to skip and why.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

from benchmarks.metrics import WORKERS, ExecutorTarget, Target
from benchmarks.procs import free_tcp_address, module_processes
from benchmarks.rawclient import open_raw
from benchmarks.tasks import call_chunk

__all__ = [
    "BASELINES",
    "FADE_SYSTEMS",
    "SYSTEMS",
    "DaskExecutor",
    "RayExecutor",
    "System",
    "missing",
    "open_target",
    "preload",
    "system",
]


@dataclass(frozen=True, slots=True)
class System:
    """A row of the results table and what it needs installed."""

    name: str
    requires: tuple[str, ...]  # importable modules; a missing optional peer is skipped
    optional: bool
    work: float = 1.0  # share of N and M it runs: dask costs ~5 ms a task on 2 cores


def system(name: str) -> System:
    """The ``System`` called ``name``; ``KeyError`` if there is none."""
    return _BY_NAME[name]


SYSTEMS: tuple[System, ...] = (
    System("fade-tcp", ("fade",), optional=False),
    System("fade-embedded", ("fade",), optional=False),
    System("processpool", (), optional=False),
    System("raw-zmq", ("zmq", "cloudpickle"), optional=False),
    System("loky", ("loky",), optional=True),
    System("dask", ("distributed",), optional=True, work=0.1),
    System("ray", ("ray",), optional=True),
)
_BY_NAME = {s.name: s for s in SYSTEMS}
FADE_SYSTEMS = ("fade-tcp", "fade-embedded")
BASELINES = tuple(s.name for s in SYSTEMS if s.name not in FADE_SYSTEMS)


def missing(system: System) -> str | None:
    """Why an optional peer cannot run here, or None. fade itself is never skipped: its
    ImportError belongs in the table."""
    if not system.optional:
        return None
    absent = [m for m in system.requires if importlib.util.find_spec(m) is None]
    return f"not installed (pip install {' '.join(absent)})" if absent else None


def preload(name: str) -> None:
    """Import what system ``name`` needs, so that its start-up time leaves imports out."""
    _quiet_ray()
    for module in system(name).requires:
        importlib.import_module(module)


def open_target(name: str) -> AbstractContextManager[Target]:
    """Start system ``name``; the context manager yields a ready ``Target``."""
    if name == "raw-zmq":
        return open_raw()
    return _executor_target(_OPENERS[name])


@contextmanager
def _executor_target(opener: Callable[[], AbstractContextManager[cf.Executor]]) -> Iterator[Target]:
    with opener() as executor:
        yield ExecutorTarget(executor)


#: The 50 MB row compares transport: the same array sent again and again would otherwise
#: travel by content once and be cached on the worker (docs/data.md), which no other system
#: does. benchmarks/bigdata.py measures that.
TRANSPORT = {"share_threshold": None}


@contextmanager
def _fade_tcp() -> Iterator[cf.Executor]:
    import fade

    address = free_tcp_address()
    commands = [["fade.broker", address], ["fade.worker", address, "--processes", str(WORKERS)]]
    with module_processes(commands), fade.Executor(address, **TRANSPORT) as executor:
        yield executor


@contextmanager
def _fade_embedded() -> Iterator[cf.Executor]:
    import fade

    with fade.Executor(max_workers=WORKERS) as executor:
        yield executor


@contextmanager
def _processpool() -> Iterator[cf.Executor]:
    with cf.ProcessPoolExecutor(WORKERS) as executor:
        yield executor


@contextmanager
def _loky() -> Iterator[cf.Executor]:
    import loky

    with loky.ProcessPoolExecutor(max_workers=WORKERS) as executor:
        yield executor


@contextmanager
def _dask() -> Iterator[cf.Executor]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    with cluster, Client(cluster) as client, DaskExecutor(client) as executor:
        yield executor


class DaskExecutor(cf.Executor):
    """dask's own ``ClientExecutor`` for ``submit``. Its ``map`` ignores ``chunksize`` and fetches
    results one by one, so ``map`` here does what a dask user would: one task per chunk through
    ``client.map``, collected with one ``client.gather``."""

    def __init__(self, client: Any) -> None:
        self._client = client
        # pure=False: identical calls are separate tasks, as with every other system.
        self._executor = client.get_executor(pure=False)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = self._executor.submit(fn, *args, **kwargs)
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        from distributed import wait

        chunks = _chunks(iterables, chunksize)
        futures = self._client.map(partial(call_chunk, fn), chunks, pure=False)
        wait(futures, timeout=timeout)
        return (value for chunk in self._client.gather(futures) for value in chunk)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._executor.shutdown(wait=wait)


@contextmanager
def _ray() -> Iterator[cf.Executor]:
    _quiet_ray()
    import ray

    ray.init(
        num_cpus=WORKERS,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        with RayExecutor() as executor:
            yield executor
    finally:
        ray.shutdown()


def _quiet_ray() -> None:
    """No usage statistics sent anywhere: ray must talk to nothing but loopback."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


class RayExecutor(cf.Executor):
    """The ``Executor`` face ray lacks: ``submit`` is ``remote(...).future()``; ``map`` sends one
    remote task per chunk of ``chunksize`` calls and collects them with one ``ray.get``."""

    def __init__(self) -> None:
        self._remotes: dict[Callable[..., Any], Any] = {}

    def _remote(self, fn: Callable[..., Any]) -> Any:
        import ray

        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = ray.remote(fn)
        return remote

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = self._remote(fn).remote(*args, **kwargs).future()
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        import ray

        chunk_task = self._remote(call_chunk)
        refs = [chunk_task.remote(fn, chunk) for chunk in _chunks(iterables, chunksize)]
        return (value for chunk in ray.get(refs, timeout=timeout) for value in chunk)


def _chunks(iterables: tuple[Iterable[Any], ...], chunksize: int) -> list[list[tuple[Any, ...]]]:
    """The argument tuples of ``map(fn, *iterables)``, ``chunksize`` calls per list."""
    calls = iter(zip(*iterables))
    return list(iter(lambda: list(islice(calls, chunksize)), []))


_OPENERS: dict[str, Callable[[], AbstractContextManager[cf.Executor]]] = {
    "fade-tcp": _fade_tcp,
    "fade-embedded": _fade_embedded,
    "processpool": _processpool,
    "loky": _loky,
    "dask": _dask,
    "ray": _ray,
}
