"""The pieces of data by content, without a pool: the host's cache (fade/datacache.py), the
client's shelf (fade/data.py) and the task payload's refs (fade/serialization.py).

Processes appear only where the cache is shared: several writers at once, and one killed.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import pickle
import signal
import stat
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import tasks

from fade import protocol as p
from fade import serialization as ser
from fade.data import DataShelf, content_id, scope_of, share
from fade.datacache import DataCache
from fade.errors import SharedDataError

KB = 1024
SCOPE = b"s" * 8


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def put(cache: DataCache, data: bytes, scope: bytes = SCOPE) -> memoryview | None:
    return cache.put(scope, content_id(data), data)


# -- the host cache ----------------------------------------------------------------------


def test_an_entry_comes_back_mapped_and_a_task_may_change_its_copy(tmp_path: Path) -> None:
    cache = DataCache(str(tmp_path / "c"), 10 * KB)
    data = blob(3 * KB)
    assert put(cache, data) is not None
    view = cache.open(SCOPE, content_id(data), len(data))
    assert view is not None and bytes(view) == data
    view[0] ^= 0xFF  # copy-on-write: the entry itself never changes
    again = cache.open(SCOPE, content_id(data), len(data))
    assert again is not None and bytes(again) == data
    assert cache.open(b"t" * 8, content_id(data), len(data)) is None  # another scope: nothing


def test_the_cache_is_private_and_refuses_a_folder_others_may_write(tmp_path: Path) -> None:
    cache = DataCache(str(tmp_path / "c"), KB)
    for folder in (cache.root, cache.entries, cache.tmp, cache.locks):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    put(cache, blob(100))
    (entry,) = os.listdir(cache.entries)
    assert stat.S_IMODE(os.stat(os.path.join(cache.entries, entry)).st_mode) == 0o600
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    with pytest.raises(SharedDataError, match="others may write"):
        DataCache(str(open_folder), KB)


def test_least_recently_used_entries_are_evicted_to_stay_within_the_bound(tmp_path: Path) -> None:
    cache = DataCache(str(tmp_path / "c"), 10 * KB)
    blobs = [blob(3 * KB, i) for i in range(4)]
    for data in blobs[:3]:
        put(cache, data)
        time.sleep(0.01)  # distinct LRU clocks
    # Using the oldest makes the second the least recently used.
    assert cache.open(SCOPE, content_id(blobs[0]), 3 * KB) is not None
    gc.collect()
    put(cache, blobs[3])
    present = [cache.open(SCOPE, content_id(b), 3 * KB) is not None for b in blobs]
    assert present == [True, False, True, True]
    assert cache.usage() <= 10 * KB
    assert cache.evictions == 1


def test_a_mapped_entry_is_never_evicted(tmp_path: Path) -> None:
    cache = DataCache(str(tmp_path / "c"), 10 * KB)
    a, b = blob(6 * KB, 1), blob(6 * KB, 2)
    held = put(cache, a)  # a task still has it mapped
    assert held is not None
    assert cache.create(SCOPE, content_id(b), len(b)) is None  # cannot fit without evicting a
    del held
    gc.collect()
    assert put(cache, b) is not None  # now a may go
    assert cache.open(SCOPE, content_id(a), len(a)) is None
    assert cache.usage() <= 10 * KB


def test_an_entry_larger_than_the_cache_is_refused(tmp_path: Path) -> None:
    cache = DataCache(str(tmp_path / "c"), 10 * KB)
    assert cache.create(SCOPE, b"x" * 32, 11 * KB) is None
    assert DataCache(str(tmp_path / "none"), 0).create(SCOPE, b"x" * 32, 1) is None


def test_content_that_does_not_match_its_id_is_never_published(tmp_path: Path) -> None:
    cache = DataCache(str(tmp_path / "c"), 10 * KB)
    data = blob(2 * KB)
    writer = cache.create(SCOPE, content_id(data), len(data))
    assert writer is not None
    with pytest.raises(SharedDataError, match="does not match"), writer:
        writer.write(data[:-1] + b"?")
        writer.commit()
    assert os.listdir(cache.entries) == [] and os.listdir(cache.tmp) == []
    assert cache.usage() == 0


def test_an_entry_from_before_a_reboot_is_checked_and_removed_if_damaged(
    tmp_path: Path,
) -> None:
    cache = DataCache(str(tmp_path / "c"), 10 * KB)
    good, bad = blob(KB, 1), blob(KB, 2)
    put(cache, good)
    put(cache, bad)
    with open(cache.path(SCOPE, content_id(bad)), "r+b") as f:
        f.write(b"\0" * 100)  # what a power cut can leave of unsynced data
    assert cache.open(SCOPE, content_id(bad), KB) is not None  # this boot: trusted
    cache._booted = time.time() + 3600  # as if every entry predates this boot
    assert cache.open(SCOPE, content_id(bad), KB) is None
    assert not os.path.exists(cache.path(SCOPE, content_id(bad)))
    view = cache.open(SCOPE, content_id(good), KB)
    assert view is not None and bytes(view) == good


def _write_and_die(root: str, data: bytes) -> None:
    cache = DataCache(root, 10 * KB)
    writer = cache.create(SCOPE, content_id(data), len(data))
    assert writer is not None
    writer.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_writer_killed_mid_write_leaves_nothing_anyone_reads(tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    data = blob(4 * KB)
    child = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(root, data))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    cache = DataCache(root, 10 * KB)
    assert len(os.listdir(cache.tmp)) == 1  # the partial entry, under a name nobody opens
    assert cache.open(SCOPE, content_id(data), len(data)) is None
    assert cache.usage() == 0  # the scan removed it: its writer's lock died with it
    assert os.listdir(cache.tmp) == []
    view = put(cache, data)
    assert view is not None and bytes(view) == data


def _hammer(root: str, seed: int, rounds: int) -> None:
    cache = DataCache(root, 64 * KB)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        data = blob(int(rng.integers(1, 12)) * KB, int(rng.integers(0, 12)))
        cid = content_id(data)
        view = cache.open(SCOPE, cid, len(data))
        if view is None:
            with cache.fetching(SCOPE, cid):
                view = cache.open(SCOPE, cid, len(data)) or cache.put(SCOPE, cid, data)
        if view is not None and hashlib.sha256(view).digest() != cid:
            os._exit(3)  # a reader saw a damaged entry
        del view
        if cache.usage() > 64 * KB:  # a consistent count: usage() holds the index lock
            os._exit(4)
    os._exit(0)


def test_concurrent_writers_and_readers_never_see_a_damaged_entry(tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    DataCache(root, 64 * KB)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hammer, args=(root, seed, 150)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    cache = DataCache(root, 64 * KB)
    assert cache.usage() <= 64 * KB
    for name in os.listdir(cache.entries):
        cid = bytes.fromhex(name.split("-")[1])
        assert hashlib.sha256(Path(cache.entries, name).read_bytes()).digest() == cid


# -- the client's shelf ------------------------------------------------------------------


def test_a_large_buffer_is_hashed_once_while_tasks_keep_it(tmp_path: Path) -> None:
    shelf = DataShelf(threshold=64 * KB)
    small = np.zeros(1000)
    big = np.arange(100_000, dtype=np.float64)
    assert shelf.claim(pickle.PickleBuffer(small)) is None
    cid = shelf.claim(pickle.PickleBuffer(big))
    assert cid == hashlib.sha256(big.tobytes()).digest()
    assert shelf.claim(pickle.PickleBuffer(big)) == cid
    assert shelf.hashed == 1 and shelf.held() == big.nbytes
    shelf.release([cid])
    assert shelf.held() == big.nbytes  # one task still names it
    shelf.release([cid])
    assert shelf.held() == 0
    assert shelf.claim(pickle.PickleBuffer(big)) == cid and shelf.hashed == 2  # hashed afresh


def test_the_shelf_keeps_buffers_only_while_tasks_need_them() -> None:
    shelf = DataShelf(threshold=64 * KB)
    big = np.ones(100_000)
    alive = weakref.ref(big)
    payload, pinned = ser.dumps_call_shared(sum, (big,), {}, b"", shelf)
    del big, payload
    gc.collect()
    assert alive() is not None  # kept, not copied: the task is pending
    shelf.release(pinned)
    gc.collect()
    assert alive() is None


def test_the_shelf_serves_ranges_in_chunks_and_nothing_it_does_not_keep() -> None:
    shelf = DataShelf(threshold=1)
    data = bytearray(blob(10 * KB))
    cid = shelf.claim(pickle.PickleBuffer(data))
    assert cid is not None
    ok, frames = shelf.serve({"id": cid.hex(), "offset": 1000, "size": 5000, "chunk": 2048})
    assert ok and [len(f) for f in frames] == [2048, 2048, 904]
    assert b"".join(bytes(f) for f in frames) == bytes(data[1000:6000])
    ok, why = shelf.serve({"id": "00" * 32, "offset": 0, "size": 1, "chunk": 1})
    assert not ok and b"keeps no data" in why[0]
    for bad in (
        {"id": cid.hex(), "offset": 0, "size": 10 * KB + 1, "chunk": 4096},
        {"id": cid.hex(), "offset": -1, "size": 10, "chunk": 4096},
        {"id": cid.hex(), "offset": 0, "size": 10 * KB, "chunk": 1},
        {"id": "zz", "offset": 0, "size": 1, "chunk": 1},
        {"offset": 0},
    ):
        assert not shelf.serve(bad)[0]


# -- payloads ----------------------------------------------------------------------------


def test_refs_take_their_place_among_the_frames() -> None:
    shelf = DataShelf(threshold=200 * KB)
    parts = [np.full(20_000, 1.0), np.full(40_000, 2.0), np.full(50_000, 3.0), np.full(10, 4.0)]
    payload, pinned = ser.dumps_call_shared(tuple, (parts,), {}, b"", shelf)
    refs = ser.data_refs(payload)
    assert [r.position for r in refs] == [1, 2] and len(payload.buffers) == 1
    assert len(pinned) == 2
    with pytest.raises(ser.SerializationError, match="nothing resolves it"):
        ser.loads_call(payload, ser.FunctionCache())
    data = [memoryview(np.full(40_000, 2.0)).cast("B"), memoryview(np.full(50_000, 3.0)).cast("B")]
    asked = []
    _, args, _ = ser.loads_call(payload, ser.FunctionCache(), lambda r: asked.append(r) or data)
    assert asked == [refs]
    (rebuilt,) = args
    assert [float(a[0]) for a in rebuilt] == [1.0, 2.0, 3.0, 4.0]
    small, no_refs = ser.dumps_call_shared(tuple, ([1, 2],), {}, b"", shelf)
    assert ser.data_refs(small) == [] and not no_refs


def test_refs_live_beside_a_setup_and_an_environment_and_can_be_inlined() -> None:
    """Every section of a task payload at once: code version, environment, executor
    setup and data by content; then the refs turned into plain frames (what a worker
    hands an environment process, which has no data cache)."""
    shelf = DataShelf(threshold=200 * KB)
    big = np.full(50_000, 7.0)
    setup = ser.dumps_setup(b"e" * 16, tasks.init, ("x",), 3)

    def environment(fn_modules: frozenset[str], arg_modules: frozenset[str]) -> tuple[bytes, int]:
        assert "numpy" in arg_modules
        return b"n" * 16, 0

    payload, _, pinned, _ = ser.dumps_task(
        tasks.add, (big, 1), {}, b"v" * 16, setup=setup, environment=environment, shelf=shelf
    )
    assert len(pinned) == 1 and payload.buffers == ()
    assert ser.code_version(payload) == b"v" * 16
    assert ser.environment_of(payload) == b"n" * 16
    parsed = ser.executor_setup(payload)
    assert parsed is not None and parsed.max_tasks == 3
    (ref,) = ser.data_refs(payload)
    assert ref.position == 0 and ref.size == big.nbytes
    data = [memoryview(big).cast("B")]
    plain = ser.with_data_inline(payload, lambda refs: data)
    assert ser.data_refs(plain) == [] and len(plain.buffers) == 1
    assert ser.environment_of(plain) == b"n" * 16 and ser.executor_setup(plain) == parsed
    for each in (payload, plain):
        fn, args, _ = ser.loads_call(each, ser.FunctionCache(), lambda refs: data)
        assert fn is tasks.add and float(args[0][0]) == 7.0 and args[1] == 1
    assert ser.with_data_inline(plain, lambda refs: []) is plain  # nothing to do


def test_a_shared_object_travels_whole_by_content_and_rebuilds_on_its_parts() -> None:
    model = {"weights": np.arange(10.0), "name": "m"}
    handle = share(model)
    assert handle.value is model and len(handle.content_ids) == 1  # small: one part
    shelf = DataShelf(threshold=None)  # automatic sending off: share still goes by content
    payload, pinned = ser.dumps_call_shared(len, (handle,), {}, b"", shelf)
    refs = ser.data_refs(payload)
    assert [r.cid for r in refs] == list(handle.content_ids) == pinned
    ok, frames = shelf.serve(
        {"id": refs[0].cid.hex(), "offset": 0, "size": refs[0].size, "chunk": 1 << 20}
    )
    assert ok
    _, args, _ = ser.loads_call(payload, ser.FunctionCache(), lambda _: [b"".join(frames)])
    assert args[0]["name"] == "m" and list(args[0]["weights"]) == list(range(10))


def test_the_broker_gives_each_task_its_clients_scope() -> None:
    record = p.TaskRecord(b"k" * 16, 1.5, scope=scope_of("alice", b"t" * 8))
    ((decoded, _),) = p.decode_task(p.encode_task([(record, p.Payload(b"x"))]))
    assert decoded.scope == scope_of("alice", b"t" * 8)
    assert scope_of("alice", b"a" * 8) == scope_of("alice", b"b" * 8)  # one key, one scope
    assert scope_of("alice", b"t" * 8) != scope_of("bob", b"t" * 8)
    assert scope_of(None, b"a" * 8) != scope_of(None, b"b" * 8)  # no keys: one session
