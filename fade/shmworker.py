"""A worker's side of shared memory (fade/shm.py): where a task's client keeps its slots,
mapping a task's argument slots, and writing its large results into slots the client gives.

::

    Worker._call ── WorkerSegments.resolve(key, segments)
                      place(key): asked once per client, FETCH {"kind": "segments"};
                        here only if same boot id, and that st_dev and st_ino at that path
                      here: map_file (MAP_PRIVATE, holding the slot's shared lock)
                      not here (or it cannot be opened): FETCH {"kind": "segment"} ...
    Worker._execute ── dumps_value(value, WorkerSegments.write)
                      a buffer >= the client's threshold, client here: FETCH {"kind": "slot"},
                      write_slot (holding its exclusive lock); else a frame

The main thread waits for each answer while the keeper thread serves the socket, as for
code (fade/worker.py, ``Worker._fetch``).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fade.datafetch import download
from fade.errors import FadeError, SharedDataError
from fade.shm import (
    DEFAULT_THRESHOLD,
    FOLDER_PATTERN,
    NAME_SIZE,
    SLOT_PREFIX,
    SegmentRef,
    boot_id,
)
from fade.shmfiles import map_file, write_slot

__all__ = ["WorkerSegments"]

log = logging.getLogger("fade.shm")

#: Asks the client of task ``key`` for something: (key, request) -> frames.
Fetch = Callable[[bytes, dict[str, object]], list[bytes]]


@dataclass(frozen=True, slots=True)
class _Place:
    """A client's folder as this worker sees it."""

    path: str
    threshold: int


class WorkerSegments:
    """Maps a task's argument segments (or fetches their bytes when its client's folder is
    not here) and writes its results into that folder (``enabled``: the fast paths are
    on). Main thread only."""

    def __init__(
        self, fetch: Fetch, frame_limit: Callable[[], int], *, enabled: bool = True
    ) -> None:
        self._fetch = fetch
        self._frame_limit = frame_limit
        self.enabled = enabled
        self._places: OrderedDict[bytes, _Place | None] = OrderedDict()  # client tag -> place
        self.mapped = 0
        self.fetched = 0
        self.written = 0

    def place(self, key: bytes) -> _Place | None:
        """Where the client of task ``key`` keeps its segments, if that folder is on this
        host and this user may write it (asked once per client); None otherwise."""
        tag = key[:8]
        if tag in self._places:
            self._places.move_to_end(tag)
            return self._places[tag]
        found = self._ask(key) if self.enabled else None
        self._places[tag] = found
        if len(self._places) > 256:
            self._places.popitem(last=False)
        return found

    def _ask(self, key: bytes) -> _Place | None:
        try:
            frames = self._fetch(key, {"kind": "segments"})
            answer = json.loads(frames[0])
            path, boot = str(answer["dir"]), str(answer["boot"])
            dev, ino, threshold = int(answer["dev"]), int(answer["ino"]), int(answer["threshold"])
        except (FadeError, LookupError, TypeError, ValueError) as exc:
            log.debug("the client's shared memory is not for us: %s", exc)
            return None
        if not boot or boot != boot_id() or not FOLDER_PATTERN.fullmatch(os.path.basename(path)):
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None  # another /dev/shm (a container), or another machine
        if (st.st_dev, st.st_ino) != (dev, ino) or st.st_uid != os.geteuid():
            return None
        return _Place(path, max(threshold, 1))

    def resolve(self, key: bytes, refs: Sequence[SegmentRef]) -> list[memoryview]:
        """Each argument segment's buffer, in order: mapped if its folder is here, else
        fetched from the client through the broker. Raises SharedDataError."""
        place = self.place(key)
        views = []
        for ref in refs:
            view = None
            if place is not None:
                try:
                    view = map_file(
                        os.path.join(place.path, SLOT_PREFIX + ref.name.hex()), ref.size
                    )
                    self.mapped += 1
                except OSError as exc:
                    log.info("cannot map an argument segment (%s): fetching it", exc)
            if view is None:
                view = self._download(key, ref)
            views.append(view)
        return views

    def _download(self, key: bytes, ref: SegmentRef) -> memoryview:
        if ref.size == 0:
            return memoryview(bytearray())
        try:
            memory = mmap.mmap(-1, ref.size)
        except (OSError, OverflowError, ValueError) as exc:
            raise SharedDataError(
                f"cannot hold {ref.size} bytes of task data here: {exc}"
            ) from None
        fields: dict[str, object] = {"kind": "segment", "name": ref.name.hex()}
        at = 0

        def sink(frame: Any) -> None:
            nonlocal at
            view = memoryview(frame).cast("B")
            memory[at : at + view.nbytes] = view
            at += view.nbytes

        download(self._fetch, key, fields, ref.size, self._frame_limit(), sink)
        self.fetched += 1
        return memoryview(memory)

    def write(self, key: bytes, raw: memoryview) -> bytes | None:
        """Write a large result buffer of task ``key`` into a slot its client gives it: the
        slot's name, or None (it goes as a frame: shared memory is off, the client's
        folder is not here, the buffer is under the client's threshold, or no slot)."""
        if not self.enabled or (key[:8] not in self._places and raw.nbytes < DEFAULT_THRESHOLD):
            return None  # (a client is asked where its slots are at its first large result)
        where = self.place(key)
        if where is None or raw.nbytes < where.threshold:
            return None
        task_id = int.from_bytes(key[8:16], "little")
        try:
            frames = self._fetch(key, {"kind": "slot", "task": task_id, "size": raw.nbytes})
            name = bytes.fromhex(frames[0].decode())
            if len(name) != NAME_SIZE:
                raise ValueError("a slot name of the wrong size")
            write_slot(os.path.join(where.path, SLOT_PREFIX + name.hex()), raw)
        except (FadeError, OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
            log.info("a %d-byte result buffer goes as a frame: %s", raw.nbytes, exc)
            return None
        self.written += 1
        return name
