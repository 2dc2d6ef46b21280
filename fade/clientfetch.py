"""The client's answers to FETCH: what a worker asks of the client that submitted its task.

::

    worker --FETCH(kind, ...)--> broker --> ClientIO._on_fetch --answer()--> (status, frames)

      manifest, blobs                    its local code (fade/shipping.py)
      environment, distribution, files   its installed packages (fade/packages.py)
      data                               arguments sent by content (fade/data.py)
      segments, segment, slot            shared memory (fade/shm.py)

Each answer is OK, or MISSING with a reason: a request this client cannot serve (it
ships no code, no packages...) is answered, never dropped.

Separate from fade/clientio.py, which moves messages: this only reads the client's
stores. It runs on the I/O thread (holding the socket), as every handler does.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from fade import protocol as p
from fade.data import DataShelf
from fade.packages import InstalledPackages
from fade.shipping import LocalCode
from fade.shm import ClientSegments

__all__ = ["answer"]

_PACKAGE_REQUESTS = frozenset({"environment", "distribution", "files"})


def answer(
    request: dict[str, Any],
    *,
    code: LocalCode | None,
    packages: InstalledPackages | None,
    shelf: DataShelf | None,
    segments: ClientSegments | None,
    pending: Container[int],
) -> tuple[p.CodeStatus, list[bytes]]:
    """The answer to ``request``, from what this client has (None: it has none of that);
    ``pending``: the ids of its tasks that have no result yet."""
    kind = request.get("kind")
    status, frames = p.CodeStatus.MISSING, [b"this client ships no code"]
    if kind in _PACKAGE_REQUESTS:
        frames = [b"this client ships no packages"]
        if packages is not None:
            status, frames = packages.serve(request)
    elif kind == "data":
        frames = [b"this client sends no data by content"]
        if shelf is not None:
            ok, frames = shelf.serve(request)
            status = p.CodeStatus.OK if ok else p.CodeStatus.MISSING
    elif kind in ("segments", "segment", "slot"):
        frames = [b"this client uses no shared memory"]
        if segments is not None:
            if kind == "segments":
                ok, frames = segments.describe()
            elif kind == "segment":
                ok, frames = segments.serve(request)
            else:
                ok, frames = _reserve(segments, request, pending)
            status = p.CodeStatus.OK if ok else p.CodeStatus.MISSING
    elif code is not None:
        status, frames = _serve(code, request)
    return status, frames


def _reserve(
    segments: ClientSegments, request: dict[str, Any], pending: Container[int]
) -> tuple[bool, list[bytes]]:
    """A slot in shared memory for a result of a task of ours that is still pending."""
    task_id = request.get("task")
    if not isinstance(task_id, int) or task_id not in pending:
        return False, [b"no such task pending"]
    return segments.reserve(task_id, request)


def _serve(code: LocalCode, request: dict[str, Any]) -> tuple[p.CodeStatus, list[bytes]]:
    kind = request.get("kind")
    if kind == "manifest":
        try:
            manifest = code.manifest_json(bytes.fromhex(str(request.get("version"))))
        except ValueError:
            manifest = None
        if manifest is not None:
            return p.CodeStatus.OK, [manifest]
        return p.CodeStatus.MISSING, [b"unknown code version"]
    if kind == "blob_range":
        digest, offset, size = request.get("hash"), request.get("offset"), request.get("size")
        if isinstance(digest, str) and isinstance(offset, int) and isinstance(size, int):
            piece = code.blob_range(digest, offset, size)
            if piece is not None:
                return p.CodeStatus.OK, [piece]
            return p.CodeStatus.MISSING, [b"unknown file hash or range"]
        return p.CodeStatus.MISSING, [b"malformed request"]
    hashes = request.get("hashes")
    if kind == "blobs" and isinstance(hashes, list):
        blobs = code.blobs([str(h) for h in hashes])
        if blobs is not None:
            return p.CodeStatus.OK, blobs
        return p.CodeStatus.MISSING, [b"unknown file hash"]
    return p.CodeStatus.MISSING, [b"malformed request"]
