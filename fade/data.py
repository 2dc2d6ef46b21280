"""Large arguments by content: a task names its big buffers by a hash, and each worker host
fetches each one once.

::

    client                                broker                       worker host
    submit(f, big) --pickle--> buffer >= share_threshold (or a fade.share part)
      DataShelf.claim: sha256 once while a pending task keeps it; kept, not copied
      TASK inline: refs [(position, content id, size)] --> TASK + scope of the client -->
                                                             DataCache.open(scope, id)
                                                               hit: mapped, zero-copy
    DataShelf.serve <-- FETCH {"kind": "data", ...} <------- miss: FETCH in windows,
      memoryview slices, each <= every peer's frame limit --> written, hashed, renamed
    future done: DataShelf.release (the buffer is let go)

* **Content id**: the SHA-256 of the buffer's bytes. The client hashes a buffer when a
  task first names it and remembers the hash (keyed by the exporting object) for as
  long as a pending task keeps that buffer; a buffer it no longer keeps is hashed again
  at its next submit. Arguments are not copied at submit, as before: a buffer changed
  before its task is done may give that task old content, or fail it with
  SharedDataError (the hash no longer matches), never silently mixed bytes.
* **Scope**: the broker tags every TASK with its client's scope (:func:`scope_of`): a
  hash of the client's key name on a keyed pool, of its tag otherwise. Workers file
  entries under (scope, content id), so naming another client's content id finds
  nothing, and the broker relays a FETCH only to the task's own client. See
  docs/security.md.
* :func:`share` makes the same explicit: ``ex.submit(f, fade.share(model), x)``
  sends ``model`` (pickled once, every part of it by content) and ``f`` receives the
  object itself.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fade import defaults

__all__ = [
    "CONTENT_ID_SIZE",
    "DEFAULT_SHARE_THRESHOLD",
    "SCOPE_SIZE",
    "DataRef",
    "DataShelf",
    "Shared",
    "content_id",
    "scope_of",
    "share",
]

#: Argument buffers of at least this many bytes travel by content (``share_threshold``).
DEFAULT_SHARE_THRESHOLD = defaults.DEFAULT_SHARE_THRESHOLD
CONTENT_ID_SIZE = 32
SCOPE_SIZE = 8
#: A data request is answered with at most this many frames.
MAX_CHUNKS = 4096

T = TypeVar("T")


def content_id(buffer: Any) -> bytes:
    """The id of a buffer's content: its SHA-256 (hashlib releases the GIL meanwhile)."""
    return hashlib.sha256(buffer).digest()


@functools.lru_cache(maxsize=4096)
def scope_of(key_name: str | None, tag: bytes) -> bytes:
    """The scope a broker gives a client's tasks: from its key name on a keyed pool (so
    every session of one key shares its cache entries), else from its tag (one session)."""
    if key_name is not None:
        return hashlib.blake2b(
            key_name.encode(), digest_size=SCOPE_SIZE, person=b"fade-key-scope"
        ).digest()
    return hashlib.blake2b(tag, digest_size=SCOPE_SIZE, person=b"fade-tag-scope").digest()


@dataclass(frozen=True, slots=True)
class DataRef:
    """One buffer of a task sent by content: its place among the pickle's out-of-band
    buffers, its content id and its size."""

    position: int
    cid: bytes
    size: int


@dataclass(slots=True)
class _Pin:
    """A buffer the client keeps for its pending tasks: one view per exporting object
    whose hash is remembered (each view keeps its object alive, so its id stays its own)."""

    views: dict[tuple[int, int], memoryview] = field(default_factory=dict)
    count: int = 0  # pending tasks that name it


class DataShelf:
    """The client's side: which buffers go by content, and keeping them for the workers.

    ``threshold``: buffers of at least this many bytes go by content; None: only the
    parts of :func:`share` handles do. Thread-safe: submit threads claim, the I/O thread
    serves and releases.
    """

    def __init__(self, threshold: int | None = DEFAULT_SHARE_THRESHOLD) -> None:
        if threshold is not None and threshold < 1:
            raise ValueError("share_threshold must be at least 1 byte (or None)")
        self.threshold = threshold
        self._lock = threading.Lock()
        self._pins: dict[bytes, _Pin] = {}
        self._known: dict[tuple[int, int], bytes] = {}  # (id of exporter, size) -> content id
        self.hashed = 0  # buffers hashed (a claim that found the hash remembered does not)

    def claim_shared(self, buffer: pickle.PickleBuffer) -> bytes | None:
        """:meth:`claim` for the parts of ``fade.share`` handles only (where what goes by
        its size alone travels through shared memory instead: fade/shm.py)."""
        if id(buffer) not in _shared_parts:
            return None
        return self.claim(buffer)

    def claim(self, buffer: pickle.PickleBuffer) -> bytes | None:
        """The content id under which ``buffer`` travels, pinned for one more task; None:
        it travels as a frame. Release every id returned, once, with :meth:`release`."""
        raw = buffer.raw()
        cid = _shared_parts.get(id(buffer))
        key = (id(raw.obj), raw.nbytes)
        if cid is None:
            if self.threshold is None or raw.nbytes < self.threshold:
                return None
            with self._lock:
                cid = self._known.get(key)
                if cid is not None:
                    self._pins[cid].count += 1
                    return cid
            cid = content_id(raw)  # outside the lock: other submits go on meanwhile
            self.hashed += 1
        with self._lock:
            pin = self._pins.get(cid)
            if pin is None:
                pin = self._pins[cid] = _Pin()
            if key not in pin.views:
                pin.views[key] = raw
                self._known[key] = cid
            pin.count += 1
        return cid

    def release(self, cids: Sequence[bytes]) -> None:
        """A task that named these is done (or was never sent): let go of what no pending
        task needs any more."""
        with self._lock:
            for cid in cids:
                pin = self._pins.get(cid)
                if pin is None:
                    continue
                pin.count -= 1
                if pin.count <= 0:
                    del self._pins[cid]
                    for key in pin.views:
                        if self._known.get(key) == cid:
                            del self._known[key]

    def held(self) -> int:
        """Bytes kept for pending tasks (not copies: the callers' own buffers)."""
        with self._lock:
            return sum(next(iter(pin.views.values())).nbytes for pin in self._pins.values())

    def serve(self, request: dict[str, Any]) -> tuple[bool, list[Any]]:
        """Answer a worker's ``{"kind": "data", "id", "offset", "size", "chunk"}``: (True,
        the bytes asked for in frames of at most ``chunk`` bytes, not copied) or (False,
        [reason])."""
        try:
            cid = bytes.fromhex(str(request["id"]))
            offset, size, chunk = (int(request[k]) for k in ("offset", "size", "chunk"))
        except (KeyError, TypeError, ValueError):
            return False, [b"malformed data request"]
        with self._lock:
            pin = self._pins.get(cid)
            view = next(iter(pin.views.values())) if pin is not None else None
        if view is None:
            return False, [
                b"this client keeps no data with that content id (no pending task of "
                b"this client names it)"
            ]
        if offset < 0 or size < 1 or chunk < 1 or offset + size > view.nbytes:
            return False, [b"data request out of range"]
        if -(-size // chunk) > MAX_CHUNKS:
            return False, [b"data request in too many chunks"]
        return True, [
            view[at : min(at + chunk, offset + size)] for at in range(offset, offset + size, chunk)
        ]


# -- fade.share -------------------------------------------------------------------------

#: id of a Shared handle's PickleBuffer -> its content id, while the handle lives.
_shared_parts: dict[int, bytes] = {}


def _forget_parts(ids: list[int]) -> None:
    for part in ids:
        _shared_parts.pop(part, None)


class Shared(Generic[T]):
    """An object that tasks receive by content: see :func:`share`."""

    __slots__ = ("__weakref__", "content_ids", "nbytes", "parts", "value")

    def __init__(self, value: T) -> None:
        from fade.serialization import dumps_parts

        head, buffers = dumps_parts(value)
        views = [memoryview(head), *(memoryview(b).cast("B") for b in buffers)]
        self.value = value
        self.parts = tuple(pickle.PickleBuffer(v) for v in views)
        self.content_ids = tuple(content_id(v) for v in views)
        self.nbytes = sum(v.nbytes for v in views)
        for part, cid in zip(self.parts, self.content_ids):
            _shared_parts[id(part)] = cid
        weakref.finalize(self, _forget_parts, [id(part) for part in self.parts])

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if isinstance(protocol, int) and protocol < 5:  # no out-of-band buffers: copies
            return (_rebuild, tuple(bytes(part.raw()) for part in self.parts))
        return (_rebuild, self.parts)

    def __repr__(self) -> str:
        return f"fade.Shared({type(self.value).__qualname__}, {self.nbytes} bytes)"


def _rebuild(head: Any, *buffers: Any) -> Any:
    """On the worker: the shared object, rebuilt on its parts (mapped from the host's
    cache: numpy arrays are not copied)."""
    return pickle.loads(head, buffers=buffers)


def share(value: T) -> Shared[T]:
    """A handle that sends ``value`` to every task by content: pickled once, here, each of
    its parts (its pickle and its large buffers) hashed once and sent to each worker host
    at most once, however many tasks name it, and whatever their size. A task given the
    handle as an argument (at any depth) receives ``value`` itself.

    ``value`` is not copied: do not change it while tasks that use it are pending.
    """
    return Shared(value)
