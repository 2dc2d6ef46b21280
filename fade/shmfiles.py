"""The files of shared memory and their locks: a slot written under an exclusive lock,
mapped copy-on-write under a shared one.

::

    ClientSegments.claim (fade/shm.py) ── write_all, holding the new slot's lock
    WorkerSegments (fade/shmworker.py) ── map_file: flock LOCK_SH, mmap MAP_PRIVATE
                                      └─ write_slot: flock LOCK_EX, then write a result
    a slot is reused only if lock() gets LOCK_EX: no mapping of it is alive

Every open checks that the path still names the file it opened (same_file): a slot
gets a new name each time it is reused, so a late opener of an old name must not use
the new content. Separate from fade/shm.py, which decides which slots exist, who owns
them and when they go: these are the few system calls that make sharing them safe,
used by both sides.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Any

__all__ = ["WRITE_CHUNK", "lock", "map_file", "same_file", "write_all", "write_slot"]

#: Bytes written per system call.
WRITE_CHUNK = 8 * 2**20


def write_all(fd: int, buffer: Any) -> None:
    view = memoryview(buffer).cast("B")
    offset = 0
    while offset < view.nbytes:
        offset += os.pwrite(fd, view[offset : offset + WRITE_CHUNK], offset)


def same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (slots are renamed when reused:
    a late opener of an old name must not use the new content)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def write_slot(path: str, buffer: Any) -> None:
    """Write ``buffer`` at the start of the slot at ``path`` (which must be at least that
    large), holding its lock: no one maps a slot while it is written. Raises OSError (a
    full tmpfs says ENOSPC here, never SIGBUS later)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if not lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) or not same_file(fd, path):
            raise OSError(errno.EBUSY, f"{path} is in use or was given to another")
        if os.fstat(fd).st_size < memoryview(buffer).nbytes:
            raise OSError(errno.EINVAL, f"{path} is too small")
        write_all(fd, buffer)
    finally:
        os.close(fd)


def map_file(path: str, size: int) -> memoryview:
    """The first ``size`` bytes of a slot as a writable, copy-on-write mapping
    (MAP_PRIVATE): reading costs no copy, and what a task writes changes its own pages
    only. The mapping holds a shared lock on the slot for as long as it lives (through the
    descriptor mmap keeps), so the slot is not reused meanwhile. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not lock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB) or not same_file(fd, path):
            raise OSError(errno.EBUSY, f"{path} is being written or was given to another")
        if os.fstat(fd).st_size < size:
            raise OSError(errno.EINVAL, f"{path} holds fewer than {size} bytes")
        if size == 0:
            return memoryview(bytearray())
        return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
    finally:
        os.close(fd)


def lock(fd: int, how: int = fcntl.LOCK_EX | fcntl.LOCK_NB) -> bool:
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        return False
    return True
