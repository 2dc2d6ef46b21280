"""Worker side of package shipping: which process runs a task, with which packages.

::

    task names environment E (16 bytes; b"": none) ──none──> run here, as always
        │ E known to this process? (its route, kept)
        ▼ no
    E's description: the host's cache, else FETCH it from the task's client (checked:
        │   it hashes to E); this worker's Python must run the client's pickles
        ▼
    every distribution of E installed here at the same version? ──yes──> run here
        │ no: those that differ travel (if they can: a RECORD with hashes, relocatable,
        │     compiled for this platform and ABI, under the client's size limit)
        ▼
    their trees on this host (fade/pkgcache.py: downloaded once per host, checked once
        │   per process), held in use while the task runs
        ▼
    the environment process for exactly that set of trees (fade/envproc.py; started on
    first use, a few kept) runs the task; its result goes back as any other

The worker process itself never imports a shipped distribution, so its own packages,
and every other task it runs, are unaffected. The routes, the processes and the host
cache are reported to the broker (ENVIRONMENTS) whenever they change, for fade-status.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fade import protocol as p
from fade import serialization as ser
from fade.distributions import (
    Distribution,
    Environment,
    PythonInfo,
    this_python,
)
from fade.envproc import EnvProcess, EnvProcessDied
from fade.errors import IncompatibleWorkerError, MissingDependencyError, PackageShippingError
from fade.pkgcache import PackageCache

__all__ = ["MAX_PROCESSES", "Environments"]

log = logging.getLogger("fade.worker")

#: Environment processes one worker process keeps; the least recently used is stopped.
MAX_PROCESSES = 4
#: Environments one worker process remembers.
MAX_ROUTES = 256
#: At most this many entries of each list go in an ENVIRONMENTS report.
REPORT_ENVIRONMENTS = 32
REPORT_DISTRIBUTIONS = 128
#: Seconds between reports sent only because task counts changed.
REPORT_INTERVAL = 2.0

#: Asks the client of task ``key`` for something: (key, request) -> frames.
Fetch = Callable[[bytes, dict[str, object]], list[bytes]]


@dataclass(slots=True)
class _Route:
    """What running tasks of one environment takes in this worker process."""

    environment: Environment
    shipped: tuple[Distribution, ...]  # those that differ from this worker's own
    tasks: int = 0
    process: EnvProcess | None = field(default=None, repr=False)


class Environments:
    """Routes the tasks of one worker process by their package environment."""

    def __init__(
        self,
        cache_root: str,
        max_bytes: int,
        fetch: Fetch,
        host: str,
        log_level: str = "INFO",
    ) -> None:
        self.cache = PackageCache(cache_root, max_bytes)
        self.code_cache = cache_root
        self.python = this_python()
        self.host = host
        self.log_level = log_level
        self._fetch = fetch
        self._routes: collections.OrderedDict[bytes, _Route] = collections.OrderedDict()
        self._processes: collections.OrderedDict[tuple[str, ...], EnvProcess] = (
            collections.OrderedDict()
        )
        self._versions: dict[str, str | None] = {}  # this worker's own, by name
        self._checked: set[str] = set()  # trees checked in this process
        self.fetches = 0  # requests this process sent to clients for packages
        self._report_due = 0.0
        self._report_lock = threading.Lock()
        self._report: dict[str, Any] | None = None  # not sent yet
        self._last_report: dict[str, Any] | None = None

    def run(
        self,
        key: bytes,
        payload: p.Payload,
        data_inline: Callable[[p.Payload], p.Payload] | None = None,
    ) -> tuple[p.Status, p.Payload] | None:
        """Run a task whose distributions differ from this process's in an environment
        process and return its outcome; None: it runs here, as any task. Raises what
        keeps it from running (the task fails with that, before it ran).

        ``data_inline`` turns a payload's data by content into plain frames: the
        environment process has no data cache (fade/data.py)."""
        env_id = ser.environment_of(payload)
        if not env_id:
            return None
        route = self._routes.get(env_id)
        if route is None:
            route = self._route(env_id, key)
        else:
            self._routes.move_to_end(env_id)  # the least recently used is forgotten first
        route.tasks += 1
        if time.monotonic() >= self._report_due:
            self._changed()  # the task counts, now and then
        if not route.shipped:
            return None
        if data_inline is not None and ser.data_refs(payload):
            payload = data_inline(payload)
        return self._run_there(route, key, payload)

    # -- deciding ----------------------------------------------------------------------------

    def _route(self, env_id: bytes, key: bytes) -> _Route:
        env = self.cache.environment(env_id)
        if env is None:
            (data,) = self._ask(key, {"kind": "environment", "id": env_id.hex()})[:1]
            env = Environment.from_json(data, env_id)
            self.cache.save_environment(env_id, data)
        if not self.python.runs_pickles_of(env.python):
            raise IncompatibleWorkerError(self._sides(env.python))
        shipped = tuple(d for d in env.distributions if self._version(d.name) != d.version)
        for dist in shipped:
            self._check_can_travel(dist, env.python)
        total = sum(d.size for d in shipped)
        if total > env.limit:
            raise PackageShippingError(
                f"{_mib(total)} of packages would travel to host {self.host} for this task "
                f"({', '.join(d.label for d in shipped)}), more than the client's "
                f"ship_packages_limit of {_mib(env.limit)}: raise it, or install them on "
                "the workers"
            )
        route = _Route(env, shipped)
        self._routes[env_id] = route
        while len(self._routes) > MAX_ROUTES:
            self._routes.popitem(last=False)
        self._changed()
        return route

    def _check_can_travel(self, dist: Distribution, client: PythonInfo) -> None:
        here = self._version(dist.name)
        has = f"has {dist.name} {here}" if here else f"does not have {dist.name}"
        if dist.problem:
            raise MissingDependencyError(
                f"worker pid {os.getpid()} on host {self.host} {has}, and the client's "
                f"{dist.label} cannot travel: {dist.problem}. Install {dist.label} on the "
                "workers",
                host=self.host,
                distribution=dist.name,
            )
        if dist.native and not self.python.loads_extensions_of(client):
            raise IncompatibleWorkerError(
                f"{dist.label} holds compiled code for the client's platform, and worker pid "
                f"{os.getpid()} {has}: {self._sides(client)}. Install {dist.label} on the "
                "workers, or run them on the client's platform"
            )

    def _sides(self, client: PythonInfo) -> str:
        return f"client {client.describe()}, worker {self.python.describe()} on host {self.host}"

    def _version(self, name: str) -> str | None:
        """This worker's own version of a distribution (None: not installed here)."""
        if name not in self._versions:
            # Imported here, not at the top: it costs a worker 10-20 ms at start-up, and
            # only tasks whose client ships packages ever ask.
            import importlib.metadata as md

            try:
                found: str | None = md.distribution(name).version
            except md.PackageNotFoundError:
                found = None
            self._versions[name] = found
        return self._versions[name]

    # -- running there -----------------------------------------------------------------------

    def _run_there(
        self, route: _Route, key: bytes, payload: p.Payload
    ) -> tuple[p.Status, p.Payload]:
        ids = tuple(d.id for d in route.shipped)
        for _ in range(3):
            trees = [self._tree(dist, key) for dist in route.shipped]
            with self.cache.using(ids) as present:
                if not present:  # evicted since: its process may miss files; start afresh
                    self._stop(ids)
                    self._checked.difference_update(ids)
                    continue
                process = self._process(ids, trees, route)
                try:
                    return process.run(key, payload, self._fetch)
                except EnvProcessDied as died:
                    _die_like(died.status, process.pid)
        raise PackageShippingError(
            f"the package cache on host {self.host} keeps evicting the packages of this task "
            "before it can run: raise fade-worker --package-cache-size"
        )

    def _tree(self, dist: Distribution, key: bytes) -> str:
        """The checked tree of ``dist`` on this host (fetched first if need be)."""
        downloads = self.cache.downloads
        tree = self.cache.provide(dist, lambda request: self._ask(key, request))
        if self.cache.downloads != downloads:
            self._checked.add(dist.id)  # checked file by file as it arrived
            self._changed()
        if dist.id not in self._checked:
            problems = self.cache.check(dist)
            if problems:
                log.warning(
                    "%s in the package cache failed its check (%s); fetching it again",
                    dist.label,
                    "; ".join(problems[:3]),
                )
                self.cache.discard(dist.id)
                tree = self.cache.provide(dist, lambda request: self._ask(key, request))
            self._checked.add(dist.id)
        return tree

    def _process(self, ids: tuple[str, ...], trees: list[str], route: _Route) -> EnvProcess:
        process = self._processes.get(ids)
        if process is not None and process.alive():
            self._processes.move_to_end(ids)
        else:
            if process is not None:
                self._stop(ids)
            labels = [d.label for d in route.shipped]
            process = EnvProcess(trees, labels, self.code_cache, self.log_level)
            log.info("started process %d for %s", process.pid, ", ".join(labels))
            self._processes[ids] = process
            route.process = process
            while len(self._processes) > MAX_PROCESSES:
                self._stop(next(iter(self._processes)))
            self._changed()
        route.process = process
        return process

    def _stop(self, ids: tuple[str, ...]) -> None:
        process = self._processes.pop(ids, None)
        if process is not None:
            process.stop()
            self._changed()

    def _ask(self, key: bytes, request: dict[str, object]) -> list[bytes]:
        self.fetches += 1
        return self._fetch(key, request)

    # -- what fade-status shows ---------------------------------------------------------------

    def _changed(self) -> None:
        """Build the report now (on the thread that changed things), for the socket holder."""
        self._report_due = time.monotonic() + REPORT_INTERVAL
        environments = []
        for env_id, route in reversed(self._routes.items()):
            process = route.process
            if not route.shipped:
                where = "here"
            elif (
                process is not None
                and self._processes.get(tuple(d.id for d in route.shipped)) is process
                and process.alive()
            ):
                where = f"process {process.pid}"
            else:
                where = "not running"
            environments.append(
                {
                    "id": env_id.hex()[:12],
                    "packages": [d.label for d in route.environment.distributions][:64],
                    "where": where,
                    "tasks": route.tasks,
                }
            )
        cached = self.cache.listing()
        report = {
            "environments": environments[:REPORT_ENVIRONMENTS],
            "cache": {
                "distributions": [[d.name, d.version, d.size] for d in reversed(cached)][
                    :REPORT_DISTRIBUTIONS
                ],
                "bytes": sum(d.size for d in cached),
                "limit": self.cache.max_bytes,
            },
        }
        with self._report_lock:
            self._report = self._last_report = report

    def take_report(self) -> dict[str, Any] | None:
        """The ENVIRONMENTS report to send, if something changed since the last one was
        taken (any thread)."""
        if self._report is None:  # the usual case, seen without the lock
            return None
        with self._report_lock:
            report, self._report = self._report, None
        return report

    def report_again(self) -> None:
        """A broker (re)registered us: it has no report of ours."""
        with self._report_lock:
            self._report = self._last_report


def _die_like(status: int, pid: int) -> None:
    """The environment process died running a task: so does this worker process, the same
    way, so that its supervisor and the broker see what they would have seen."""
    log.error(
        "environment process %d running a task %s; this worker process ends the same way",
        pid,
        f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited ({status})",
    )
    logging.shutdown()
    if status < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 1  # a signal that does not end a process by default
    os._exit(status)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
