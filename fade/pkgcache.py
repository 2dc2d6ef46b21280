"""A worker host's cache of shipped distributions: bounded, least recently used first out.

::

    <cache>/packages/envs/<env id>.json     environment descriptions (checked: hash = id)
    <cache>/packages/dists/<content id>/    one distribution's files, a site-packages tree
        .fade-dist.json                     its manifest (checked: files hash to the id)
    <cache>/packages/dists/.staging-<id>-*  a download under way (or whose worker died)
    <cache>/locks/dist-<id>                 held (exclusive) while <id> is downloaded
    <cache>/locks/use-<id>                  held (shared) while a task runs with <id>
    <cache>/locks/packages                  held (exclusive) while admitting or evicting

* **One download per host.** A worker process takes the distribution's lock, looks
  again, and downloads only if no other process did meanwhile.
* **Atomic.** Files are written into a staging folder and checked against their
  RECORD hash as they arrive; the manifest is written last; the folder is renamed
  into place. A worker killed mid-download leaves only a staging folder, never a
  tree: the next download of that distribution (or any eviction pass) removes it.
* **Bounded, LRU.** A tree's folder time is touched whenever a task uses it. Before
  a download, trees are evicted, least recently used first, until the new one fits
  under the bound; a tree a running task uses (its shared lock is held) is skipped.
  An environment process whose tree was evicted is replaced before its next task.
* **Checked, never believed.** A tree is hashed file by file against its manifest
  before its first use in each worker process; one that fails is removed and
  fetched again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from fade import defaults
from fade.codecache import check_private_dir
from fade.datacache import FILE_SYSTEM_FAILURES
from fade.distributions import Distribution, Environment, Manifest, hash_matches
from fade.errors import PackageShippingError

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process locks (atomic renames still hold)
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_MAX_BYTES", "CachedDistribution", "PackageCache"]

log = logging.getLogger("fade.pkgcache")

#: The default bound of a host's package cache.
DEFAULT_MAX_BYTES = defaults.PACKAGE_CACHE_SIZE
MANIFEST_FILE = ".fade-dist.json"
#: A worker asks for at most this many bytes of files in one FETCH.
FILES_BATCH = 8 * 2**20

#: Asks the task's client for something: request -> frames (raises on failure).
Ask = Callable[[dict[str, object]], list[bytes]]


@dataclass(frozen=True, slots=True)
class CachedDistribution:
    id: str
    name: str
    version: str
    size: int
    used: float  # the folder's time: when a task last used it


class PackageCache:
    """The package store of one host, inside its (private) code cache folder."""

    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        base = os.path.join(root, "packages")
        self.envs = os.path.join(base, "envs")
        self.dists = os.path.join(base, "dists")
        self.locks = os.path.join(root, "locks")
        for directory in (root, base, self.envs, self.dists, self.locks):
            check_private_dir(directory)
        self.downloads = 0  # distributions this process fetched
        self.evictions = 0

    # -- environments ----------------------------------------------------------------------

    def environment(self, env_id: bytes) -> Environment | None:
        """A description stored by any process of this host, if it is intact."""
        try:
            with open(self._env_path(env_id), "rb") as f:
                data = f.read()
            return Environment.from_json(data, env_id)
        except (OSError, PackageShippingError):
            return None

    def save_environment(self, env_id: bytes, data: bytes) -> None:
        _write_atomically(self._env_path(env_id), data, False)

    def _env_path(self, env_id: bytes) -> str:
        return os.path.join(self.envs, f"{env_id.hex()}.json")

    # -- distribution trees -------------------------------------------------------------------

    def tree(self, dist_id: str) -> str:
        return os.path.join(self.dists, dist_id)

    def provide(self, dist: Distribution, ask: Ask) -> str:
        """The tree of ``dist`` on this host, downloaded first if it is not here (once per
        host: other processes wait for the download and then find it)."""
        final = self.tree(dist.id)
        if os.path.isfile(os.path.join(final, MANIFEST_FILE)):
            return final
        with self._lock(f"dist-{dist.id}"):
            if os.path.isfile(os.path.join(final, MANIFEST_FILE)):
                return final
            self._remove_staging(dist.id)
            manifest_json = ask({"kind": "distribution", "name": dist.name, "id": dist.id})[0]
            manifest = Manifest.from_json(manifest_json, dist)
            self._make_room(dist)
            staging = tempfile.mkdtemp(prefix=f".staging-{dist.id}-", dir=self.dists)
            try:
                self._download(dist, manifest, ask, staging)
                _write_atomically(os.path.join(staging, MANIFEST_FILE), manifest_json, False)
                os.rename(staging, final)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)  # the space it took, back
                if exc.errno not in FILE_SYSTEM_FAILURES:
                    raise
                raise PackageShippingError(
                    f"the package cache {self.dists} on host {socket.gethostname()} cannot "
                    f"take {dist.label} ({_mib(dist.size)}): {exc.strerror or exc}. Make "
                    f"room there, or give the worker a cache folder on another file system "
                    f"with fade-worker --code-cache DIR (packages are kept in it)"
                ) from exc
            self.downloads += 1
            log.info("%s (%d bytes) is now in the package cache", dist.label, dist.size)
        return final

    def _download(self, dist: Distribution, manifest: Manifest, ask: Ask, staging: str) -> None:
        batch: list[tuple[str, str, int, bool]] = []
        size = 0
        for entry in manifest.files:
            if batch and size + entry[2] > FILES_BATCH:
                self._fetch_batch(dist, batch, ask, staging)
                batch, size = [], 0
            batch.append(entry)
            size += entry[2]
        if batch:
            self._fetch_batch(dist, batch, ask, staging)

    def _fetch_batch(
        self, dist: Distribution, batch: list[tuple[str, str, int, bool]], ask: Ask, staging: str
    ) -> None:
        paths = [rel for rel, _, _, _ in batch]
        blobs = ask({"kind": "files", "name": dist.name, "id": dist.id, "paths": paths})
        if len(blobs) != len(batch):
            raise PackageShippingError(
                f"the client sent {len(blobs)} files of {dist.label}, not {len(batch)}"
            )
        for (rel, digest, _, executable), blob in zip(batch, blobs):
            if not hash_matches(blob, digest):
                raise PackageShippingError(f"{rel} of {dist.label} does not match its RECORD hash")
            target = os.path.join(staging, *rel.split("/"))
            _makedirs_private(os.path.dirname(target))
            _write_atomically(target, blob, executable)

    def check(self, dist: Distribution) -> list[str]:
        """What is wrong with the tree of ``dist`` (empty: all is well): files that differ
        from its manifest or are missing, and files that are not in it (Python's own
        ``__pycache__`` aside)."""
        tree = self.tree(dist.id)
        try:
            with open(os.path.join(tree, MANIFEST_FILE), "rb") as f:
                manifest = Manifest.from_json(f.read(), dist)
        except (OSError, PackageShippingError) as exc:
            return [f"its manifest is missing or wrong ({exc})"]
        problems = []
        expected = {rel: digest for rel, digest, _, _ in manifest.files}
        for rel, digest in expected.items():
            try:
                with open(os.path.join(tree, *rel.split("/")), "rb") as f:
                    ok = hash_matches(f.read(), digest)
            except OSError:
                ok = False
            if not ok:
                problems.append(f"{rel}: missing or changed")
        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), tree).replace(os.sep, "/")
                if rel not in expected and rel != MANIFEST_FILE:
                    problems.append(f"{rel}: not part of the distribution")
        return problems

    def discard(self, dist_id: str) -> None:
        """Remove a tree (renamed first: no reader sees half of one)."""
        with self._lock(f"dist-{dist_id}"):
            self._remove(self.tree(dist_id))

    @contextlib.contextmanager
    def using(self, dist_ids: Sequence[str]) -> Iterator[bool]:
        """Mark these trees in use (eviction skips them) and touch them (LRU) for the
        duration; yields False if one of them is gone (evicted meanwhile)."""
        fds = []
        try:
            present = True
            for dist_id in dist_ids:
                fd = os.open(
                    os.path.join(self.locks, f"use-{dist_id}"), os.O_RDWR | os.O_CREAT, 0o600
                )
                fds.append(fd)
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                try:
                    os.utime(self.tree(dist_id))
                except OSError:
                    present = False
            yield present
        finally:
            for fd in fds:
                os.close(fd)

    def listing(self) -> list[CachedDistribution]:
        """The trees on this host, least recently used first."""
        out = []
        for name in os.listdir(self.dists):
            if name.startswith("."):
                continue
            path = self.tree(name)
            try:
                used = os.stat(path).st_mtime
                with open(os.path.join(path, MANIFEST_FILE), "rb") as f:
                    raw = json.load(f)
                size = sum(int(entry[2]) for entry in raw["files"])
                out.append(
                    CachedDistribution(name, str(raw["name"]), str(raw["version"]), size, used)
                )
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                continue  # being removed, or not ours: not counted
        return sorted(out, key=lambda d: d.used)

    # -- the bound --------------------------------------------------------------------------------

    def _make_room(self, dist: Distribution) -> None:
        """Evict least recently used trees until ``dist`` fits under the bound."""
        if dist.size > self.max_bytes:
            raise PackageShippingError(
                f"{dist.label} is {_mib(dist.size)}, more than this worker's package cache "
                f"holds ({_mib(self.max_bytes)}, fade-worker --package-cache-size): raise it, "
                f"or install {dist.name} on the workers"
            )
        with self._lock("packages"):
            self._remove_stale()
            cached = self.listing()
            total = sum(d.size for d in cached)
            for old in cached:
                if total + dist.size <= self.max_bytes:
                    return
                if self._evict(old):
                    total -= old.size
            if total + dist.size > self.max_bytes:
                log.warning(
                    "the package cache %s holds %s in use; %s goes over its bound of %s",
                    self.dists,
                    _mib(total),
                    dist.label,
                    _mib(self.max_bytes),
                )

    def _evict(self, old: CachedDistribution) -> bool:
        """Remove a tree unless a task is using it; True if it was removed."""
        fd = self._open_lock(f"use-{old.id}")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        return False  # a task runs with it now
                    raise
            self._remove(self.tree(old.id))
        finally:
            os.close(fd)
        self.evictions += 1
        log.info("evicted %s %s (%s) from the package cache", old.name, old.version, _mib(old.size))
        return True

    def _remove_staging(self, dist_id: str) -> None:
        """Staging folders of ``dist_id`` left by a download that died (we hold its lock)."""
        for name in os.listdir(self.dists):
            if name.startswith(f".staging-{dist_id}-"):
                self._remove(os.path.join(self.dists, name))

    def _remove_stale(self) -> None:
        """Staging folders whose download is not under way (its worker died), and what an
        interrupted removal left."""
        for name in os.listdir(self.dists):
            if name.startswith(".removing-"):
                shutil.rmtree(os.path.join(self.dists, name), ignore_errors=True)
            elif name.startswith(".staging-"):
                dist_id = name.split("-")[1]
                with self._try_lock(f"dist-{dist_id}") as free:
                    if free:
                        self._remove(os.path.join(self.dists, name))

    def _remove(self, path: str) -> None:
        doomed = os.path.join(self.dists, f".removing-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # -- locks --------------------------------------------------------------------------------

    def _open_lock(self, name: str) -> int:
        return os.open(os.path.join(self.locks, name), os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        fd = self._open_lock(name)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _try_lock(self, name: str) -> Iterator[bool]:
        fd = self._open_lock(name)
        try:
            free = True
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    free = False
            yield free
        finally:
            os.close(fd)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _makedirs_private(path: str) -> None:
    if os.path.isdir(path):
        return
    _makedirs_private(os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


def _write_atomically(path: str, data: bytes, executable: bool) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700 if executable else 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
