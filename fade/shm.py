"""Large buffers through shared memory, between a client and the workers of its host.

::

    client (fade/client.py, clientio.py)                        worker process (fade/worker.py)
    submit(f, big) --pickle--> buffer >= threshold (embedded pool, or shared_memory=True)
      ClientSegments.claim: copied once into a slot, a file of the client's folder
      <root>/fade-seg-<pid>-<random>/s-<name>; pinned while a pending task names it
      TASK inline: segments [(position, name, size)] -----------> WorkerSegments.resolve
                                                                   where are its slots?
      ClientSegments.describe <-- FETCH {"kind": "segments"} ----- (once per client)
      {dir, boot, dev, ino, threshold} ------------------------>  same boot id, and the folder
                                                                   at that path has that st_dev
                                                                   and st_ino: mmap MAP_PRIVATE
                                                                   (no copy; writes stay private)
      ClientSegments.serve  <-- FETCH {"kind": "segment"} ------- otherwise: its bytes, through
                                                                   the broker
                                                                 result buffer >= threshold, and
      ClientSegments.reserve <-- FETCH {"kind": "slot"} --------- the client's folder is here:
      a slot for that task ------------------------------------>   written into the slot
      loads_value: mapped <------- RESULT "S" + table ------------ (else frames, as ever)

**Slots are reused.** On a tmpfs, writing into new pages costs several times what a
copy into pages it has costs (measured: 17 against 7 ms for 50 MB, and far more on a
busy machine): so a slot whose task is done is kept (FREE_BYTES at most, for IDLE
seconds) and written again. Two rules make that safe. Every mapping holds a shared
``flock`` on its slot for as long as it lives (through the descriptor mmap keeps), and
a slot is reused only if an exclusive lock can be had: never while a worker, a task
that kept its argument, or the caller's result array maps it. And a slot gets a new
name each time it is reused: a late worker (one given up for lost, still alive) that
opens the old name finds nothing, and one that opened it before takes its lock after
the new writer let go, sees the name gone, and stops. The files themselves, written
and mapped under those locks, are fade/shmfiles.py's.

**Same host** is decided by what a different mount of the folder changes: the worker
compares the boot id, and the ``st_dev`` and ``st_ino`` the client saw for its folder
with what it sees at that path. Containers or network namespaces that share the
kernel but not ``/dev/shm`` see another device (or nothing) there, and fall back.
**Nothing left behind.** Each folder is locked (``flock``) by its owner for as long as
it lives: the lock is released by the kernel however the owner ends, SIGKILL
included, and in every pid namespace alike. :func:`sweep` removes the folders whose lock
it can take: run by every new Executor, by a ``fade-worker`` supervisor every
SWEEP_INTERVAL, and by an embedded pool's workers when their parent dies. A client
removes its own folder when it shuts down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any

from fade import errors  # errors.ResultDecodeError: imported when met
from fade.shmfiles import lock, map_file, write_all

__all__ = [
    "DEFAULT_THRESHOLD",
    "ROOT_ENV",
    "SWEEP_INTERVAL",
    "ClientSegments",
    "Folder",
    "SegmentRef",
    "boot_id",
    "sweep",
]

log = logging.getLogger("fade.shm")

#: Where segment folders go, unless $FADE_SHM_DIR says otherwise (a tmpfs: memory).
DEFAULT_ROOT = "/dev/shm"
ROOT_ENV = "FADE_SHM_DIR"
#: Buffers of at least this many bytes travel through shared memory; smaller ones cost
#: less as frames (benchmarks/shm_threshold.py: a round trip through shared memory has a
#: fixed cost of about 0.5 ms here, one more request included, against a copy less per
#: side; frames win up to 1 MiB, shared memory from 4 MiB when results are kept).
DEFAULT_THRESHOLD = 2 * 2**20
#: Seconds between sweeps of leftovers (a client's results; a supervisor's dead owners).
SWEEP_INTERVAL = 1.0
#: A folder still being set up (before its lock is taken) is left alone this long.
NEW_AGE = 60.0
NAME_SIZE = 16

#: Free slots kept for reuse: at most this many bytes, each for at most IDLE seconds.
FREE_BYTES = 512 * 2**20
IDLE = 5.0
#: The largest result slot a worker may ask for.
MAX_SLOT = 2**40
PAGE = mmap.PAGESIZE

FOLDER_PREFIX = "fade-seg-"
_NEW_PREFIX = ".fade-seg-new-"
FOLDER_PATTERN = re.compile(r"fade-seg-\d+-[A-Za-z0-9_]+")
SLOT_PREFIX = "s-"


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One out-of-band buffer that travels through shared memory: its place among the
    pickle's buffers, its segment's name (NAME_SIZE bytes) and its size."""

    position: int
    name: bytes
    size: int


def root() -> str:
    return os.environ.get(ROOT_ENV) or DEFAULT_ROOT


_boot: str | None = None


def boot_id() -> str:
    """This kernel's boot id ("" where there is none: then no folder is taken as local)."""
    global _boot
    if _boot is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _boot = f.read().strip()
        except OSError:
            _boot = ""
    return _boot


# -- folders (their slot files and locks: fade/shmfiles.py) ---------------------------------


class Folder:
    """A folder of segments owned by this process, locked for as long as it lives."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._owner = os.getpid()
        st = os.fstat(fd)
        self.description = {
            "dir": path,
            "boot": boot_id(),
            "dev": st.st_dev,
            "ino": st.st_ino,
        }

    @classmethod
    def create(cls, base: str | None = None) -> Folder | None:
        """A new folder under ``base`` (default :func:`root`); None if it cannot be made
        there (no /dev/shm on this system, say)."""
        base = base or root()
        try:
            # Made under a name sweeps skip, locked, then renamed: a sweep can never take
            # a folder for abandoned between its creation and its lock.
            new = tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=base)
            fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            lock(fd)
            suffix = os.path.basename(new)[len(_NEW_PREFIX) :]
            path = os.path.join(base, f"{FOLDER_PREFIX}{os.getpid()}-{suffix}")
            os.rename(new, path)
        except OSError as exc:
            log.info("no shared memory for large buffers (%s): they travel as frames", exc)
            return None
        return cls(path, fd)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def close(self) -> None:
        """Remove the folder and everything in it (in the process that made it only)."""
        if self._fd < 0 or os.getpid() != self._owner:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)
        self._fd = -1


def sweep(base: str | None = None) -> int:
    """Remove the segment folders of this user whose owner is gone (their lock is free);
    returns how many. Never raises."""
    base = base or root()
    removed = 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0
    uid = os.geteuid()
    now = time.time()
    for entry in entries:
        try:
            if entry.name.startswith(_NEW_PREFIX):
                st = entry.stat(follow_symlinks=False)
                if st.st_uid == uid and now - st.st_mtime > NEW_AGE:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
                continue
            if not FOLDER_PATTERN.fullmatch(entry.name):
                continue
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != uid or not stat.S_ISDIR(st.st_mode):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if lock(fd):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
            finally:
                os.close(fd)
        except OSError:
            continue
    if removed:
        log.info("removed %d shared-memory folders left by processes that are gone", removed)
    return removed


# -- the client's side -----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Slot:
    """A file of the client's folder that carries one buffer at a time, reused: writing
    into pages a tmpfs already has costs a copy; new pages cost several times more."""

    name: bytes  # its file is s-<name hex>; a new name each time it is reused
    capacity: int
    used: float = 0.0  # when it was last given back (time.monotonic())


@dataclass(slots=True)
class _Pin:
    slot: _Slot
    count: int
    key: tuple[int, int]
    view: memoryview  # keeps the exporting object alive, so that its id stays its own


class ClientSegments:
    """A client's slots in shared memory, in one folder made at first use: its arguments
    (``eager``: written at submit; on the embedded pool, whose workers all share this
    machine) and the results its workers on this host write. Thread-safe: submit threads
    claim, the I/O thread serves workers, takes results, releases and sweeps.

    A slot is reused only when no process maps it (each mapping holds a shared lock on
    it) and under a new name (a late opener of the old one finds nothing). Free slots are
    kept up to FREE_BYTES, and removed once idle for ``idle`` seconds or at close."""

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, *, eager: bool) -> None:
        self.threshold = threshold
        self.eager = eager
        self.idle = IDLE
        self._lock = threading.Lock()
        self._folder: Folder | None = None
        self._failed = False
        self._free: list[_Slot] = []
        self._pins: dict[bytes, _Pin] = {}  # argument slots by name
        self._known: dict[tuple[int, int], bytes] = {}  # (id of exporter, size) -> name
        self._reserved: dict[int, list[_Slot]] = {}  # result slots given out, by task id
        self.written = 0  # arguments written
        self.mapped = 0  # results mapped
        self.reused = 0  # slots reused rather than made

    def usable(self) -> bool:
        """False once its folder could not be made (no /dev/shm here, say)."""
        return not self._failed

    def folder(self) -> Folder | None:
        with self._lock:
            if self._folder is None and not self._failed:
                self._folder = Folder.create()
                self._failed = self._folder is None
            return self._folder

    def _path(self, folder: Folder, name: bytes) -> str:
        return folder.file(SLOT_PREFIX + name.hex())

    def _slot(self, folder: Folder, size: int) -> tuple[_Slot, int] | None:
        """A free slot that fits ``size`` and that nobody maps, renamed, with its descriptor
        (holding its lock: close it when done); or None. Holding ``_lock``."""
        fits = sorted(
            (s for s in self._free if size <= s.capacity <= 2 * size + PAGE),
            key=lambda s: s.capacity,
        )
        for slot in fits:
            old = self._path(folder, slot.name)
            try:
                fd = os.open(old, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                self._free.remove(slot)
                continue
            if not lock(fd):
                os.close(fd)  # a worker, or one of our own results, still maps it
                continue
            self._free.remove(slot)
            slot.name = os.urandom(NAME_SIZE)
            try:
                os.rename(old, self._path(folder, slot.name))
            except OSError:
                os.close(fd)
                continue
            self.reused += 1
            return slot, fd
        return None

    def _new_slot(self, folder: Folder, size: int) -> tuple[_Slot, int]:
        """A new slot file of ``size`` bytes (sparse until written), with its descriptor."""
        slot = _Slot(os.urandom(NAME_SIZE), size)
        path = self._path(folder, slot.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        lock(fd)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            _unlink(path)
            raise
        return slot, fd

    def _give_back(self, slots: Sequence[_Slot]) -> None:
        """Holding ``_lock``: these may be reused once nobody maps them."""
        now = time.monotonic()
        for slot in slots:
            slot.used = now
            self._free.append(slot)

    # -- arguments ---------------------------------------------------------------------

    def claim(self, raw: memoryview) -> bytes | None:
        """The slot ``raw`` travels in, pinned for one more task (release it with
        :meth:`release`); None: it travels otherwise (too small, or no shared memory)."""
        if not self.eager or raw.nbytes < self.threshold:
            return None
        key = (id(raw.obj), raw.nbytes)
        with self._lock:
            name = self._known.get(key)
            if name is not None:
                self._pins[name].count += 1
                return name
        folder = self.folder()
        if folder is None:
            return None
        try:
            with self._lock:
                found = self._slot(folder, raw.nbytes) or self._new_slot(folder, raw.nbytes)
            slot, fd = found
        except OSError as exc:
            log.info("a %d-byte argument travels as a frame: %s", raw.nbytes, exc)
            return None
        try:
            write_all(fd, raw)  # outside the lock; the slot's own lock is held
        except OSError as exc:
            log.info("a %d-byte argument travels as a frame: %s", raw.nbytes, exc)
            _unlink(self._path(folder, slot.name))
            return None
        finally:
            os.close(fd)
        with self._lock:
            self.written += 1
            if key in self._known:  # another thread wrote the same buffer meanwhile
                self._give_back([slot])
                name = self._known[key]
                self._pins[name].count += 1
                return name
            self._pins[slot.name] = _Pin(slot, 1, key, raw)
            self._known[key] = slot.name
        return slot.name

    def release(self, names: Sequence[bytes]) -> None:
        """A task that named these is done (or was never sent): what no pending task names
        any more may be reused (once no worker maps it)."""
        with self._lock:
            for name in names:
                pin = self._pins.get(name)
                if pin is None:
                    continue
                pin.count -= 1
                if pin.count <= 0:
                    del self._pins[name]
                    if self._known.get(pin.key) == name:
                        del self._known[pin.key]
                    self._give_back([pin.slot])

    def held(self) -> int:
        """Argument slots kept for pending tasks."""
        with self._lock:
            return len(self._pins)

    # -- answering workers --------------------------------------------------------------

    def describe(self) -> tuple[bool, list[bytes]]:
        """Where this client's segments are (a worker's ``{"kind": "segments"}``)."""
        folder = self.folder()
        if folder is None:
            return False, [b"this client has no shared memory"]
        answer = {**folder.description, "threshold": self.threshold}
        return True, [json.dumps(answer).encode()]

    def reserve(self, task_id: int, request: dict[str, Any]) -> tuple[bool, list[bytes]]:
        """A slot for a result of task ``task_id`` (pending: the caller checks),
        ``{"kind": "slot", "size": N}``: its name, which that task's result may name."""
        try:
            size = int(request["size"])
        except (KeyError, TypeError, ValueError):
            return False, [b"malformed slot request"]
        folder = self._folder
        if folder is None or not 0 < size <= MAX_SLOT:
            return False, [b"no slot of that size here"]
        try:
            with self._lock:
                slot, fd = self._slot(folder, size) or self._new_slot(folder, size)
                os.close(fd)
                self._reserved.setdefault(task_id, []).append(slot)
        except OSError as exc:
            return False, [f"no slot: {exc}".encode()]
        return True, [slot.name.hex().encode()]

    def serve(self, request: dict[str, Any]) -> tuple[bool, list[bytes]]:
        """The bytes of an argument slot, for a worker that cannot map it:
        ``{"kind": "segment", "name", "offset", "size", "chunk"}``."""
        try:
            name = bytes.fromhex(str(request["name"]))
            offset, size, chunk = (int(request[k]) for k in ("offset", "size", "chunk"))
        except (KeyError, TypeError, ValueError):
            return False, [b"malformed segment request"]
        with self._lock:
            pin = self._pins.get(name)
            folder = self._folder
        if pin is None or folder is None:
            return False, [b"this client keeps no such segment (no pending task names it)"]
        if offset < 0 or size < 1 or chunk < 1 or offset + size > pin.view.nbytes:
            return False, [b"segment request out of range"]
        if -(-size // chunk) > 4096:
            return False, [b"segment request in too many chunks"]
        try:
            fd = os.open(self._path(folder, pin.slot.name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return False, [f"cannot read the segment: {exc}".encode()]
        try:
            return True, [
                os.pread(fd, min(chunk, offset + size - at), at)
                for at in range(offset, offset + size, chunk)
            ]
        finally:
            os.close(fd)

    # -- results ------------------------------------------------------------------------

    def taker(self, task_id: int) -> Callable[[SegmentRef], memoryview]:
        """What maps task ``task_id``'s result slots: only those reserved for it."""

        def take(ref: SegmentRef) -> memoryview:
            with self._lock:
                slots = self._reserved.get(task_id, [])
                slot = next((s for s in slots if s.name == ref.name), None)
                folder = self._folder
            if slot is None or folder is None:
                raise errors.ResultDecodeError("a result names shared memory not given to its task")
            try:
                view = map_file(self._path(folder, slot.name), ref.size)
            except OSError as exc:
                raise errors.ResultDecodeError(
                    f"the task's result in shared memory could not be read: {exc}"
                ) from None
            self.mapped += 1
            return view  # its slot is reused once this mapping is gone (its lock says)

        return take

    def done(self, task_id: int) -> None:
        """Task ``task_id`` has its outcome: its result slots may be reused once unmapped
        (a slot given to an attempt that never answered too: renamed before reuse, so a
        late writer finds nothing, and locked while written, so no reuse meanwhile)."""
        if self._reserved:
            with self._lock:
                slots = self._reserved.pop(task_id, None)
                if slots:
                    self._give_back(slots)

    def sweep(self, pending: Container[int]) -> int:
        """Give back the result slots of tasks no longer pending (a result the broker
        dropped, say), and remove free slots idle for ``idle`` seconds or beyond
        FREE_BYTES; returns how many were removed."""
        now = time.monotonic()
        with self._lock:
            for task_id in [t for t in self._reserved if t not in pending]:
                self._give_back(self._reserved.pop(task_id))
            keep, drop, kept = [], [], 0
            for slot in sorted(self._free, key=lambda s: -s.used):
                if now - slot.used < self.idle and kept + slot.capacity <= FREE_BYTES:
                    keep.append(slot)
                    kept += slot.capacity
                else:
                    drop.append(slot)
            self._free = keep
            folder = self._folder
        if folder is not None:
            for slot in drop:  # a mapping keeps its pages: removing is safe at any time
                _unlink(self._path(folder, slot.name))
        return len(drop)

    def files(self) -> list[str]:
        """What the folder holds now (tests, diagnostics)."""
        folder = self._folder
        if folder is None:
            return []
        with contextlib.suppress(OSError):
            return sorted(os.listdir(folder.path))
        return []

    def close(self) -> None:
        with self._lock:
            folder, self._folder = self._folder, None
            self._failed = True
            self._pins.clear()
            self._known.clear()
            self._free.clear()
            self._reserved.clear()
        if folder is not None:
            folder.close()


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def pack_table(refs: Sequence[SegmentRef]) -> bytes:
    return b"".join([_SEG.pack(r.position, r.name, r.size) for r in refs])


def unpack_table(data: bytes, count: int, at: int) -> list[SegmentRef]:
    end = at + count * _SEG.size
    if len(data) < end:
        raise ValueError("a segment table runs past its payload")
    return [SegmentRef(*fields) for fields in _SEG.iter_unpack(data[at:end])]


#: position among the buffers, name, size
_SEG = struct.Struct(f"<H{NAME_SIZE}sQ")
SEGMENT_SIZE = _SEG.size
