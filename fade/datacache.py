"""A host's cache of task data: content-addressed, memory-mapped, bounded, shared by every
worker process of the host (and open to a client on the same machine, which may put
entries in itself).

::

    open(scope, cid, size) ──hit──> a copy-on-write mapping of entries/<scope>-<cid>
        │ miss                      (its LRU clock touched; the file locked shared while mapped)
        ▼
    create(scope, cid, size) ──> under the index lock: evict least recently used entries
        │                        that no process maps until the new one fits the bound;
        │                        reserve tmp/<name> (its size counts from now on)
        ▼
    Writer.write(chunk)...   ──> appended and hashed as it arrives
    Writer.commit()          ──> the hash must be the content id; mapped, renamed into entries/

    <root>/entries/<scope>-<cid>   one file per (scope, content id): the bytes, nothing else
    <root>/tmp/<pid>-<random>      entries being written (each locked by its writer)
    <root>/locks/index, sNN        the index lock; striped locks for one fetch per entry

**Bounded.** The files in ``entries/`` and ``tmp/`` never add up to more than the
limit: space is reserved (the temporary file is sized) before a byte is fetched, and
eviction only removes entries no process has mapped (each mapping holds a shared
``flock`` on its file, through the descriptor the mapping keeps; eviction takes an
exclusive one without waiting, and skips entries it cannot get). An entry that cannot
fit even then is not cached (the caller keeps it in memory for that task).

**No corruption.** An entry appears under its final name only by a rename, after its
bytes hashed to its content id. A writer that dies leaves a temporary file nobody reads;
its lock dies with it, and the next scan removes it. Data is not forced to disk (no
fsync: that would cost as much as the transfer); instead an entry last changed before
this boot (a power loss may have left it short or zeroed) is hashed again before use,
and removed if it does not match.

**Private.** Like the code cache, the folder must belong to this user and no one else
may write it; it is made 0700 and files 0600. Entries are scoped (see fade/data.py): a
task finds only entries of its own client's scope.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

from fade import defaults
from fade.errors import SharedDataError

__all__ = [
    "DEFAULT_LIMIT",
    "FILE_SYSTEM_FAILURES",
    "DataCache",
    "Entry",
    "Writer",
    "default_data_dir",
]

log = logging.getLogger("fade.datacache")

#: Errors of a cache's file system, not of what is cached: full, over quota, read-only.
#: The caches of task data and of shipped code say so, naming the folder.
FILE_SYSTEM_FAILURES = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)

#: The default bound on a host's data cache, in bytes (``fade-worker --data-cache``).
DEFAULT_LIMIT = defaults.DATA_CACHE_SIZE
#: Striped fetch locks: two entries share a stripe only by chance, then one waits.
STRIPES = 64
#: Entries whose inode changed within this many seconds of boot are checked too: clocks
#: are not exact, and a check costs only a hash.
BOOT_MARGIN = 10.0


def default_data_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FADE_DATA_CACHE") or os.path.join(base, "fade", "data")


def _private_dir(path: str) -> None:
    """Create ``path`` (0700), or accept it if it is ours and no one else may write it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise SharedDataError(f"the data cache {path} is not a folder")
    if st.st_uid != os.geteuid():
        raise SharedDataError(
            f"refusing the data cache folder {path}: it belongs to uid {st.st_uid}, not to "
            f"uid {os.geteuid()} who runs this worker, and its owner could change the data "
            "tasks receive. Give this worker a folder of its own with --data-cache-dir DIR "
            "or FADE_DATA_CACHE."
        )
    if st.st_mode & 0o022:
        raise SharedDataError(
            f"refusing the data cache folder {path}: group or others may write to it (mode "
            f"{stat.S_IMODE(st.st_mode):o}), so they could change the data tasks receive. "
            f"Make it private with `chmod 700 {path}`, or give this worker another folder "
            "with --data-cache-dir DIR or FADE_DATA_CACHE."
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _boot_time() -> float:
    """When this machine booted, on the wall clock that file times use."""
    try:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # no CLOCK_BOOTTIME: check every entry once
        return float("inf")


def _lock(fd: int, how: int) -> bool:
    """flock ``fd``; False if ``how`` has LOCK_NB and another holds a conflicting lock."""
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Entry:
    """A committed entry as a scan sees it."""

    path: str
    size: int
    used: float  # last use (mtime): the LRU clock


class DataCache:
    """The data cache of one host in the folder ``root`` (default :func:`default_data_dir`),
    holding at most ``limit`` bytes (0: nothing is kept; every entry is refused)."""

    def __init__(self, root: str | None = None, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 0:
            raise ValueError("the data cache limit must be >= 0")
        self.root = os.path.abspath(root or default_data_dir())
        self.limit = limit
        _private_dir(self.root)
        self.entries = os.path.join(self.root, "entries")
        self.tmp = os.path.join(self.root, "tmp")
        self.locks = os.path.join(self.root, "locks")
        for directory in (self.entries, self.tmp, self.locks):
            _private_dir(directory)
        self._booted = _boot_time()
        self.evictions = 0  # by this process

    # -- reading ------------------------------------------------------------------------

    def path(self, scope: bytes, cid: bytes) -> str:
        return os.path.join(self.entries, f"{scope.hex()}-{cid.hex()}")

    def open(self, scope: bytes, cid: bytes, size: int) -> memoryview | None:
        """The entry as a writable, copy-on-write mapping (a task may change its arrays;
        the file never changes), or None if this host does not have it (or had it
        damaged: then it is removed). The entry cannot be evicted while mapped."""
        path = self.path(scope, cid)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            _lock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = -1
            if current != st.st_ino:
                return None  # evicted or replaced between our open and our lock
            if st.st_size != size:
                self._discard(path, f"it holds {st.st_size} bytes, not {size}")
                return None
            view = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
            if st.st_ctime < self._booted + BOOT_MARGIN and not self._intact(view, cid, path):
                return None
        finally:
            os.close(fd)  # the mapping keeps its own descriptor, and with it the shared lock
        with contextlib.suppress(OSError):
            os.utime(path)  # the LRU clock (and ctime: checked in this boot from now on)
        return view

    def _intact(self, view: memoryview, cid: bytes, path: str) -> bool:
        """Hash an entry written before this boot (unsynced data may have been lost)."""
        if hashlib.sha256(view).digest() == cid:
            return True
        self._discard(path, "its content no longer matches its id (written before a reboot?)")
        return False

    def _discard(self, path: str, why: str) -> None:
        log.warning("removing data cache entry %s: %s", os.path.basename(path), why)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # -- writing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def fetching(self, scope: bytes, cid: bytes) -> Iterator[None]:
        """Held while one process fetches an entry, so that the others wait for it and then
        find it instead of fetching it again (a host-wide lock, one of STRIPES)."""
        stripe = hashlib.blake2b(scope + cid, digest_size=1).digest()[0] % STRIPES
        fd = os.open(os.path.join(self.locks, f"s{stripe:02x}"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def create(self, scope: bytes, cid: bytes, size: int) -> Writer | None:
        """A writer for a new entry of ``size`` bytes, its space reserved (evicting as
        needed); None if it cannot fit within the limit even after eviction."""
        if size > self.limit:
            return None
        with self._index():
            used, entries = self._scan()
            excess = used + size - self.limit
            for entry in sorted(entries, key=lambda e: e.used):
                if excess <= 0:
                    break
                if self._evict(entry):
                    excess -= entry.size
            if excess > 0:
                return None
            tmp = os.path.join(self.tmp, f"{os.getpid()}-{uuid.uuid4().hex}")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            _lock(fd, fcntl.LOCK_EX)  # held while we live: we are writing
            os.ftruncate(fd, size)  # the reservation: later scans count it
        return Writer(self, self.path(scope, cid), tmp, fd, cid, size)

    def put(self, scope: bytes, cid: bytes, data: memoryview | bytes) -> memoryview | None:
        """Store ``data`` (which must hash to ``cid``) and return its mapping; None if it
        cannot fit. For a writer that has the bytes at hand (a client on this machine)."""
        view = memoryview(data).cast("B")
        existing = self.open(scope, cid, view.nbytes)
        if existing is not None:
            return existing
        writer = self.create(scope, cid, view.nbytes)
        if writer is None:
            return None
        with writer:
            writer.write(view)
            return writer.commit()

    def usage(self) -> int:
        """Bytes held now: committed entries and reservations."""
        with self._index():
            return self._scan()[0]

    def _scan(self) -> tuple[int, list[Entry]]:
        """(bytes held, committed entries); removes what dead writers left. Call it holding
        the index lock: O(entries), but only when an entry is added."""
        used = 0
        entries = []
        with os.scandir(self.entries) as found:
            for item in found:
                try:
                    st = item.stat()
                except FileNotFoundError:
                    continue
                used += st.st_size
                entries.append(Entry(item.path, st.st_size, st.st_mtime))
        with os.scandir(self.tmp) as found:
            for item in found:
                try:
                    fd = os.open(item.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    if _lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                        os.unlink(item.path)  # its writer died mid-write
                        log.info("removed a partial data cache entry left by a dead writer")
                    else:
                        used += os.fstat(fd).st_size
                finally:
                    os.close(fd)
        return used, entries

    def _evict(self, entry: Entry) -> bool:
        """Remove an entry unless some process maps it (holds its shared lock)."""
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # someone else removed it meanwhile
        try:
            if not _lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            self.evictions += 1
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _index(self) -> Iterator[None]:
        """The host-wide lock over reservations, eviction and commits (held briefly)."""
        fd = os.open(os.path.join(self.locks, "index"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class Writer:
    """A new entry being written: :meth:`write` the bytes in order, then :meth:`commit`.
    Used as a context manager, it removes the partial entry if it is not committed."""

    def __init__(
        self, cache: DataCache, final: str, tmp: str, fd: int, cid: bytes, size: int
    ) -> None:
        self._cache = cache
        self._final = final
        self._tmp = tmp
        self._fd = fd
        self._cid = cid
        self.size = size
        self.written = 0
        self._hash = hashlib.sha256()
        self._done = False

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self.written + view.nbytes > self.size:
            raise SharedDataError(
                f"more data arrived than the {self.size} bytes of content id {self._cid.hex()}"
            )
        self._hash.update(view)  # releases the GIL: the keeper thread serves the socket
        while view:
            n = os.pwrite(self._fd, view, self.written)
            self.written += n
            view = view[n:]

    def commit(self) -> memoryview:
        """Check the content against its id, then publish the entry and return its mapping."""
        if self.written != self.size or self._hash.digest() != self._cid:
            raise SharedDataError(
                f"the data received for content id {self._cid.hex()[:16]}... does not match "
                "it: the client's buffer changed after the task was submitted (do not modify "
                "an argument until its task is done)"
            )
        with self._cache._index():  # the index lock: a scan must not take us for dead now
            _lock(self._fd, fcntl.LOCK_SH)  # as every mapping holds
            view = memoryview(mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY))
            os.replace(self._tmp, self._final)
        self._close()
        return view

    def abort(self) -> None:
        if not self._done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            os.close(self._fd)

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()
