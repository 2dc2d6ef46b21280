"""Large buffers through shared memory between a client and the workers of its host
(fade/shm.py): zero copies, copy-on-write, fallbacks, and nothing left in /dev/shm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import arraytasks
import numpy as np
import pytest
import tasks
from conftest import INTERVAL, LIVENESS, Pool, fade_env, kill_tree, wait_for

import fade
from fade import serialization as ser
from fade import shm
from fade.data import DataRef

pytestmark = pytest.mark.timeout(120)

BIG = 2 * shm.DEFAULT_THRESHOLD  # goes through shared memory
SMALL = shm.DEFAULT_THRESHOLD // 2  # goes as a frame


def our_folders() -> set[str]:
    """The segment folders of this user in /dev/shm now."""
    root = Path(shm.root())
    return {
        entry.name
        for entry in root.glob(f"{shm.FOLDER_PREFIX}*")
        if entry.stat().st_uid == os.geteuid()
    }


def embedded(**kwargs: object) -> fade.Executor:
    return fade.Executor(
        max_workers=2, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS, **kwargs
    )


@pytest.fixture
def ex() -> Iterator[fade.Executor]:
    executor = embedded()
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def segments_of(executor: fade.Executor) -> shm.ClientSegments:
    segments = executor._segments
    assert segments is not None
    return segments


def slot_of(view_or_path: object) -> str:
    path = view_or_path if isinstance(view_or_path, str) else tasks.backing_file(view_or_path)
    return os.path.basename(path).split()[0]


# -- the path ---------------------------------------------------------------------------------


def test_arguments_and_results_are_mapped_not_copied(ex: fade.Executor) -> None:
    data = np.arange(BIG // 8, dtype=np.float64)
    where, back = ex.submit(tasks.backing_and_back, data).result(timeout=60)
    segments = segments_of(ex)
    folder = segments.folder()
    assert folder is not None
    # The worker's argument is a mapping of a slot of the client's folder...
    assert where.startswith(os.path.join(folder.path, "s-")), where
    # ...and the client's result a mapping of another, which the worker wrote.
    assert tasks.backing_file(back).startswith(os.path.join(folder.path, "s-"))
    assert slot_of(back) != slot_of(where)
    assert np.array_equal(back, data)
    back[0] = 42.0  # writable: the client's own pages, copy-on-write
    assert segments.written == 1 and segments.mapped == 1 and segments.reused == 0
    # A slot nobody maps is reused (renamed): the argument's; the one our result maps is
    # not, so the second result needs a new slot.
    held = slot_of(back)
    where, again = ex.submit(tasks.backing_and_back, data).result(timeout=60)
    assert segments.reused == 1 and held not in (slot_of(where), slot_of(again))
    del again  # (its future may still be referenced for a moment in the I/O thread)
    where, again = ex.submit(tasks.backing_and_back, data).result(timeout=60)
    assert segments.reused >= 2 and held not in (slot_of(where), slot_of(again))
    assert back[0] == 42.0 and again[0] == 0.0
    assert held in segments.files()


def test_small_buffers_still_travel_as_frames(ex: fade.Executor) -> None:
    data = np.ones(SMALL, dtype=np.uint8)
    where, back = ex.submit(tasks.backing_and_back, data).result(timeout=60)
    assert not where.startswith(shm.root())
    assert np.array_equal(back, data)
    assert segments_of(ex).written == 0 and segments_of(ex).mapped == 0


def test_a_task_that_changes_its_argument_changes_only_its_own_view(ex: fade.Executor) -> None:
    data = np.zeros(BIG // 8, dtype=np.float64)
    # Two pending tasks name one buffer: one segment, each task its own copy-on-write view.
    futures = [ex.submit(tasks.scribble_and_sum, {"a": data}) for _ in range(4)]
    assert [f.result(timeout=60) for f in futures] == [float(data.size)] * 4
    assert not data.any()
    assert segments_of(ex).written <= 4
    # A task that keeps its argument after it ends keeps the slot from being reused.


def test_a_slot_a_task_kept_is_not_reused() -> None:
    with fade.Executor(
        max_workers=1, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as executor:
        ones = np.ones(BIG, dtype=np.uint8)
        assert executor.submit(tasks.keep, ones).result(timeout=60) == BIG
        # The argument's slot is free for the client, but the worker still maps it.
        zeros = np.zeros(BIG, dtype=np.uint8)
        assert executor.submit(tasks.checksum, zeros).result(timeout=60) == float(BIG)
        assert segments_of(executor).reused == 0
        assert executor.submit(tasks.kept_sums).result(timeout=60) == [float(BIG)]


def test_an_argument_is_written_once_while_tasks_name_it(ex: fade.Executor) -> None:
    data = np.ones(BIG, dtype=np.uint8)
    futures = [ex.submit(tasks.checksum, data, 0.5) for _ in range(6)]
    assert segments_of(ex).written == 1
    assert segments_of(ex).held() == 1
    expected = float(data[::4096].sum()) + data.size
    assert [f.result(timeout=60) for f in futures] == [expected] * 6
    wait_for(lambda: segments_of(ex).held() == 0, 10, "the pin to go")
    segments_of(ex).idle = 0.1
    wait_for(lambda: segments_of(ex).files() == [], 10, "the idle slot to be removed")


def test_results_made_by_the_task_come_through_shared_memory(ex: fade.Executor) -> None:
    result = ex.submit(arraytasks.ones, 3 * BIG).result(timeout=60)
    assert result.nbytes == 3 * BIG and int(result.sum()) == 3 * BIG
    assert tasks.backing_file(result).startswith(shm.root())


def test_fade_share_handles_still_travel_by_content(ex: fade.Executor) -> None:
    data = np.ones(BIG, dtype=np.uint8)
    handle = fade.share(data)
    assert ex.submit(tasks.checksum, handle).result(timeout=60) == tasks.checksum(data)
    assert segments_of(ex).written == 0


# -- nothing left behind ----------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_nothing_is_left_after_1000_round_trips() -> None:
    before = our_folders()
    executor = embedded()
    data = np.ones(BIG, dtype=np.uint8)
    try:
        for i in range(1000):
            data[0] = i % 256
            back = executor.submit(tasks.identity, data).result(timeout=60)
            assert back[0] == i % 256
            del back
        segments = segments_of(executor)
        assert segments.written == 1000 and segments.mapped == 1000
        assert segments.reused >= 1900  # a few new slots, then the same ones again and again
        assert len(segments.files()) <= 4
        segments.idle = 0.1
        wait_for(lambda: segments.files() == [], 10, "the idle slots to be removed")
        folder = segments.folder()
        assert folder is not None
        name = os.path.basename(folder.path)
    finally:
        executor.shutdown(wait=True)
    assert name not in our_folders()
    assert our_folders() <= before


@pytest.mark.parametrize("when", ["after-writing", "mid-write"])
def test_a_worker_killed_before_its_done_leaves_nothing(
    ex: fade.Executor, tmp_path: Path, when: str
) -> None:
    """SIGKILL the worker after it wrote a result's segment (or while it writes it),
    before its DONE: the task runs again elsewhere, and the partial or orphan segment is
    removed once the future is done."""
    marker = str(tmp_path / "marker")
    segments = segments_of(ex)
    segments.idle = 0.5
    if when == "after-writing":
        size = BIG
        future = ex.submit(arraytasks.big_then_stall, size, marker)
    else:
        size = 512 * 2**20  # long enough to write that the kill lands during it
        future = ex.submit(arraytasks.stall_then_big, size, marker)
    wait_for(lambda: os.path.exists(marker) and Path(marker).read_text(), 60, "the marker")
    pid = int(Path(marker).read_text())
    folder = segments.folder()
    assert folder is not None

    def result_file() -> str | None:  # the slot given to the result: the only file
        return next(iter(segments.files()), None)

    wait_for(result_file, 60, "the result segment to appear")
    os.kill(pid, signal.SIGSTOP)
    name = result_file()
    assert name is not None
    # A new slot is sparse: its pages are allocated as the worker writes them.
    written = os.stat(os.path.join(folder.path, name)).st_blocks * 512
    os.kill(pid, signal.SIGKILL)
    if when == "after-writing":
        assert written >= size
    else:
        assert written < size, "the write finished before the kill: not mid-write"
    value = future.result(timeout=60)  # re-run on another worker process
    array = value[0] if when == "after-writing" else value[1]
    assert array.nbytes == size
    del value, array
    wait_for(lambda: segments.files() == [], 10, "the dead worker's slot to be removed")


CLIENT = """
import sys, time
import numpy as np
import fade, tasks, arraytasks
address = sys.argv[1] if len(sys.argv) > 1 else None
kwargs = dict(heartbeat_interval=0.2, heartbeat_liveness=3)
ex = fade.Executor(address, **kwargs) if address else fade.Executor(max_workers=2, **kwargs)
data = np.ones({big}, dtype=np.uint8)
ex.submit(arraytasks.ones, {big}).result(timeout=60)  # the folder exists now
pending = [ex.submit(tasks.checksum, data, 60.0), ex.submit(arraytasks.ones, {big})]
time.sleep(0.5)
print(ex._segments.folder().path, flush=True)
print(" ".join(str(pid) for pid in (ex._pool.pids if ex._pool else [])), flush=True)
time.sleep(120)
"""


def run_client(*argv: str) -> tuple[subprocess.Popen[str], str, list[int]]:
    script = textwrap.dedent(CLIENT.format(big=BIG))
    client = subprocess.Popen(
        [sys.executable, "-c", script, *argv], stdout=subprocess.PIPE, text=True, env=fade_env()
    )
    assert client.stdout is not None
    folder = client.stdout.readline().strip()
    pids = [int(x) for x in client.stdout.readline().split()]
    return client, folder, pids


def test_a_killed_clients_embedded_workers_remove_its_segments() -> None:
    client, folder, pids = run_client()
    try:
        assert os.path.isdir(folder) and pids
        assert any(name.startswith("s-") for name in os.listdir(folder))
        os.kill(client.pid, signal.SIGKILL)  # the client alone: its workers watch it
        client.wait()
        wait_for(lambda: not os.path.exists(folder), 30, "the workers to remove its folder")
        wait_for(lambda: not any(_alive(pid) for pid in pids), 30, "the workers to exit")
    finally:
        for pid in pids:
            kill_tree(pid)
        kill_tree(client.pid)


def test_a_killed_clients_segments_are_swept_by_a_worker_supervisor(pool: Pool) -> None:
    pool.start_broker()
    pool.start_worker(1)
    pool.wait_workers(1)
    client, folder, _ = run_client(pool.address)
    try:
        assert os.path.isdir(folder)
        os.kill(client.pid, signal.SIGKILL)
        client.wait()
        wait_for(lambda: not os.path.exists(folder), 30, "the supervisor's sweep")
    finally:
        kill_tree(client.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_sweep_removes_only_folders_whose_owner_is_gone(tmp_path: Path) -> None:
    mine = shm.Folder.create(str(tmp_path))
    assert mine is not None
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fade import shm; "
            f"f = shm.Folder.create({str(tmp_path)!r}); print(f.path, flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=fade_env(),
    )
    try:
        assert child.stdout is not None
        theirs = child.stdout.readline().strip()
        assert shm.sweep(str(tmp_path)) == 0  # both owners alive
        child.kill()
        child.wait()
        assert shm.sweep(str(tmp_path)) == 1
        assert not os.path.exists(theirs) and os.path.isdir(mine.path)
    finally:
        kill_tree(child.pid)
        mine.close()
    assert not os.path.exists(mine.path)


# -- falling back -----------------------------------------------------------------------------


def test_workers_with_the_fast_paths_off_fetch_arguments_and_send_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client writes segments; its workers (FADE_FAST_PATHS=0 in their environment)
    do not map them: they fetch the bytes through the broker and send results as frames."""
    monkeypatch.setenv("FADE_FAST_PATHS", "0")
    with embedded(fast_paths=True, shared_memory=True) as executor:
        data = np.arange(BIG, dtype=np.uint8)
        where, back = executor.submit(tasks.backing_and_back, data).result(timeout=60)
        assert not where.startswith(shm.root())
        assert np.array_equal(back, data)
        segments = segments_of(executor)
        assert segments.written == 1 and segments.mapped == 0


@pytest.mark.parametrize("setting", ["env", "argument"])
def test_the_switch_turns_shared_memory_off(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    if setting == "env":
        monkeypatch.setenv("FADE_FAST_PATHS", "0")
        executor = embedded()
    else:
        executor = embedded(shared_memory=False)
    with executor:
        assert executor._segments is None
        data = np.arange(BIG, dtype=np.uint8)
        where, back = executor.submit(tasks.backing_and_back, data).result(timeout=60)
        assert not where.startswith(shm.root())
        assert not tasks.backing_file(back).startswith(shm.root())


def _unshare_works() -> bool:
    try:
        return (
            subprocess.run(
                ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                capture_output=True,
                timeout=10,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_worker_with_another_dev_shm_fetches_arguments_and_sends_frames(pool: Pool) -> None:
    """Same kernel (same boot id), another /dev/shm, as a container has: the worker must
    not take the client's folder for its own; its tasks still run, through the broker."""
    if not _unshare_works():
        pytest.skip("needs unshare -m and mount (root)")
    pool.start_broker()
    with fade.Executor(
        pool.address,
        heartbeat_interval=INTERVAL,
        heartbeat_liveness=LIVENESS,
        shared_memory=True,
        share_threshold=None,
    ) as executor:
        folder = segments_of(executor).folder()
        assert folder is not None
        worker = [sys.executable, "-m", "fade.worker", pool.address, "--processes", "1"]
        worker += pool._timing()
        # A folder of the same path in the other /dev/shm, locked as if its owner lived
        # (by the supervisor, through fd 9, or its sweep would remove it): a path is no
        # proof of a place; its st_dev is.
        command = (
            f"mount -t tmpfs tmpfs /dev/shm && mkdir -m 700 {folder.path} && "
            f"exec 9<{folder.path} && flock -n 9 && exec {' '.join(worker)}"
        )
        pool.workers.append(
            subprocess.Popen(["unshare", "-m", "sh", "-c", command], env=fade_env())
        )
        pool.wait_workers(1)
        data = np.arange(BIG, dtype=np.uint8)
        where, back = executor.submit(tasks.backing_and_back, data).result(timeout=60)
        segments = segments_of(executor)
        assert segments.written == 1  # eager: the argument went into a segment
        assert not where.startswith(shm.root())  # fetched, not mapped
        assert np.array_equal(back, data)
        assert segments.mapped == 0  # the result came as a frame
        assert not tasks.backing_file(back).startswith(shm.root())


def test_a_tcp_worker_on_this_host_sends_results_through_shared_memory(pool: Pool) -> None:
    pool.start_broker()
    pool.start_worker(1)
    pool.wait_workers(1)
    with fade.Executor(
        pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS
    ) as executor:
        result = executor.submit(arraytasks.ones, BIG).result(timeout=60)
        assert tasks.backing_file(result).startswith(shm.root())
        segments = segments_of(executor)
        assert segments.mapped == 1 and segments.written == 0  # arguments: as before
        data = np.arange(BIG, dtype=np.uint8)
        # A pool at an address sends arguments as before: by content from share_threshold.
        _, back = executor.submit(tasks.backing_and_back, data).result(timeout=60)
        assert np.array_equal(back, data)


# -- the formats ------------------------------------------------------------------------------


def test_a_payload_carries_refs_segments_and_a_setup_together() -> None:
    seg_name, cid = os.urandom(shm.NAME_SIZE), os.urandom(32)
    small = np.zeros(70_000, np.uint8)
    setup = ser.dumps_setup(os.urandom(16), None, (), 3)

    class Segments(shm.ClientSegments):
        def claim(self, raw: memoryview) -> bytes | None:
            return seg_name if raw.nbytes == 6 * 2**18 else None

    class Shelf(fade.data.DataShelf):  # as if the second array were a fade.share part
        def claim_shared(self, buffer: object) -> bytes | None:
            return cid if buffer.raw().nbytes == 5 * 2**18 else None  # type: ignore[attr-defined]

    by_content = np.full(5 * 2**18, 1, np.uint8)
    in_memory = np.full(6 * 2**18, 2, np.uint8)
    payload, _, pinned, segs = ser.dumps_task(
        tasks.add,
        (small, by_content, in_memory),
        {},
        b"c" * 16,
        setup=setup,
        shelf=Shelf(threshold=1),
        segments=Segments(eager=True),
    )
    assert pinned == [cid] and segs == [seg_name]
    assert len(payload.buffers) == 1  # only the small array is a frame
    assert ser.data_refs(payload) == [DataRef(1, cid, by_content.nbytes)]
    assert ser.segment_refs(payload) == [shm.SegmentRef(2, seg_name, in_memory.nbytes)]
    assert ser.code_version(payload) == b"c" * 16
    described = ser.executor_setup(payload)
    assert described is not None and described.max_tasks == 3
    inlined = ser.with_data_inline(payload, lambda refs: [by_content], lambda segs: [in_memory])
    assert ser.data_refs(inlined) == [] and ser.segment_refs(inlined) == []
    assert ser.executor_setup(inlined) == described
    for each in (payload, inlined):
        fn, args, _ = ser.loads_call(
            each, ser.FunctionCache(), lambda refs: [by_content], lambda segs: [in_memory]
        )
        assert fn is tasks.add
        assert [a.nbytes for a in args] == [70_000, by_content.nbytes, in_memory.nbytes]
        assert int(args[2][0]) == 2


def test_a_result_with_segments_round_trips() -> None:
    names: list[bytes] = []

    def segment(raw: memoryview) -> bytes | None:
        if raw.nbytes < BIG:
            return None
        names.append(os.urandom(shm.NAME_SIZE))
        return names[-1]

    big, small = np.full(BIG, 7, np.uint8), np.full(70_000, 3, np.uint8)
    payload = ser.dumps_value((small, big, "x"), segment)
    assert payload.inline[:1] == b"S" and len(payload.buffers) == 1
    refs = ser.result_segments(payload)
    assert refs == [shm.SegmentRef(1, names[0], BIG)]
    value = ser.loads_value(payload, lambda ref: memoryview(big))
    assert value[2] == "x" and int(value[1][0]) == 7 and int(value[0][0]) == 3
    with pytest.raises(fade.ResultDecodeError):
        ser.loads_value(payload)  # segments and nothing to map them
    plain = ser.dumps_value((small, "x"), segment)
    assert plain.inline[:1] != b"S" and ser.result_segments(plain) == []
