"""A worker's side of data by content: a task's buffers come from the host's cache, or
from the task's client (through the broker) when the host lacks them.

::

    Worker._call ── refs = serialization.data_refs(payload)
                    DataFetcher.resolve(scope, task key, refs)
                      DataCache.open(scope, id) ──hit──> the mapping (zero-copy)
                      miss: DataCache.fetching(scope, id)   one process per host fetches;
                              open again                    the others wait, then find it
                              DataCache.create              space reserved (or, if it cannot
                                                            fit, private memory for this task)
                              FETCH {"kind": "data"} ...    windows of chunks, each chunk
                                                            within every peer's frame limit
                              Writer.commit                 hash checked, renamed, mapped

The main thread waits for each answer while the keeper thread serves the socket
(heartbeats go on), exactly as for code (fade/worker.py, ``Worker._fetch``).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from fade._logutil import RateLimitedLog
from fade.data import DataRef
from fade.datacache import FILE_SYSTEM_FAILURES, DataCache, Writer
from fade.errors import SharedDataError

__all__ = ["CHUNK", "WINDOW_CHUNKS", "DataFetcher", "download"]

log = logging.getLogger("fade.worker")

#: The largest frame a data answer carries (smaller if a peer's frame limit is).
CHUNK = 8 * 2**20
#: Chunks asked for in one FETCH: a window of at most CHUNK x WINDOW_CHUNKS bytes.
WINDOW_CHUNKS = 16
#: Bytes a frame limit leaves for what is not data (CURVE's envelope, say).
FRAME_ROOM = 1024

#: Asks the client of task ``key`` for something: (key, request) -> frames.
Fetch = Callable[[bytes, dict[str, object]], list[bytes]]


class _Memory:
    """Where an entry that cannot be cached goes: private memory, for this task only."""

    def __init__(self, cid: bytes, size: int) -> None:
        try:
            self._map = mmap.mmap(-1, size)
        except (OSError, OverflowError, ValueError) as exc:
            raise SharedDataError(f"cannot hold {size} bytes of task data here: {exc}") from None
        self._cid = cid
        self.size = size
        self.written = 0
        self._hash = hashlib.sha256()

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.written + view.nbytes > self.size:
            raise SharedDataError(f"more data arrived than the {self.size} bytes asked for")
        self._hash.update(view)
        self._map[self.written : self.written + view.nbytes] = view
        self.written += view.nbytes

    def commit(self) -> memoryview:
        if self.written != self.size or self._hash.digest() != self._cid:
            raise SharedDataError(
                f"the data received for content id {self._cid.hex()[:16]}... does not match "
                "it: the client's buffer changed after the task was submitted"
            )
        return memoryview(self._map)

    def __enter__(self) -> _Memory:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


class DataFetcher:
    """Resolves a task's data refs to buffers (one worker process)."""

    def __init__(self, cache: DataCache, fetch: Fetch, frame_limit: Callable[[], int]) -> None:
        self.cache = cache
        self._fetch = fetch
        self._frame_limit = frame_limit  # the smallest frame limit on the way here; 0: none
        self._refusals = RateLimitedLog(log, burst=3, period=60.0)  # a full disk stays full
        self.hits = 0
        self.fetched = 0  # entries fetched by this process
        self.fetched_bytes = 0
        self.uncached = 0  # entries too large for the cache, held in memory for one task

    def resolve(self, scope: bytes, key: bytes, refs: Sequence[DataRef]) -> list[memoryview]:
        """Each ref's buffer, in order; raises SharedDataError."""
        return [self._one(scope, key, ref) for ref in refs]

    def _one(self, scope: bytes, key: bytes, ref: DataRef) -> memoryview:
        if ref.size == 0:
            return memoryview(bytearray())
        view = self.cache.open(scope, ref.cid, ref.size)
        if view is not None:
            self.hits += 1
            return view
        with self.cache.fetching(scope, ref.cid):
            view = self.cache.open(scope, ref.cid, ref.size)  # fetched meanwhile by another
            if view is not None:
                self.hits += 1
                return view
            try:
                writer = self.cache.create(scope, ref.cid, ref.size)
            except OSError as exc:
                self._cache_failed(exc, ref)
                writer = None
            sink: Writer | _Memory
            if writer is None:
                self.uncached += 1
                log.log(
                    logging.INFO if self.cache.limit else logging.DEBUG,  # 0: asked for
                    "%d bytes of task data do not fit in the data cache (%d bytes, the rest "
                    "in use): holding them in memory for this task",
                    ref.size,
                    self.cache.limit,
                )
                sink = _Memory(ref.cid, ref.size)
            else:
                sink = writer
            try:
                with sink:
                    self._download(key, ref, sink)
                    view = sink.commit()
            except OSError as exc:
                if isinstance(sink, _Memory):
                    raise
                self._cache_failed(exc, ref)  # the writer removed its partial entry
                self.uncached += 1
                with _Memory(ref.cid, ref.size) as memory:
                    self._download(key, ref, memory)
                    view = memory.commit()
        self.fetched += 1
        self.fetched_bytes += ref.size
        return view

    def _cache_failed(self, exc: OSError, ref: DataRef) -> None:
        """The cache's file system refused (full, over quota, read-only): the data is an
        argument the task needs, the cache only saves fetching it again. Hold it in
        memory, and say what is wrong, and where, so that it can be mended."""
        if exc.errno not in FILE_SYSTEM_FAILURES:
            raise exc
        self._refusals.warning(
            "the data cache %s cannot take %d bytes of task data (%s): holding them in "
            "memory for this task. Make room there, or start the worker with "
            "--data-cache-dir on another file system",
            self.cache.root,
            ref.size,
            exc.strerror or exc,
        )

    def _download(self, key: bytes, ref: DataRef, sink: Writer | _Memory) -> None:
        fields: dict[str, object] = {"kind": "data", "id": ref.cid.hex()}
        download(self._fetch, key, fields, ref.size, self._frame_limit(), sink.write)


def download(
    fetch: Fetch,
    key: bytes,
    fields: dict[str, object],
    size: int,
    frame_limit: int,
    sink: Callable[[Any], None],
) -> None:
    """Fetch ``size`` bytes from the client of task ``key`` (the request ``fields`` plus
    offset, size and chunk) in windows of chunks, each within ``frame_limit`` (0: none),
    giving each frame to ``sink`` in order. Raises SharedDataError."""
    chunk = min(CHUNK, max(1, frame_limit - FRAME_ROOM)) if frame_limit else CHUNK
    offset = 0
    while offset < size:
        window = min(size - offset, chunk * WINDOW_CHUNKS)
        request = {**fields, "offset": offset, "size": window, "chunk": chunk}
        frames = fetch(key, request)
        got = sum(len(frame) for frame in frames)
        if got != window or any(len(frame) > chunk for frame in frames):
            raise SharedDataError(
                f"the client answered a request for {window} bytes of task data with {got}"
            )
        for frame in frames:
            sink(frame)
        offset += window
