"""fade from asyncio: awaitable results without a thread per future."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path

import ecosystem_tasks as et
import psutil
import pytest

import fade

pytestmark = pytest.mark.timeout(120)


def test_asubmit_results_and_errors(fade_executor: fade.Executor) -> None:
    async def main() -> None:
        assert await fade_executor.asubmit(et.add, 2, b=3) == 5
        values = await asyncio.gather(*(fade_executor.asubmit(et.square, i) for i in range(100)))
        assert values == [i * i for i in range(100)]
        with pytest.raises(ValueError, match=r"^bad value 3$") as info:
            await fade_executor.asubmit(et.fail_on, 3, 3)
        assert isinstance(info.value.__cause__, fade.RemoteTraceback)

    asyncio.run(main())


def test_asubmit_needs_a_running_loop(fade_executor: fade.Executor) -> None:
    with pytest.raises(RuntimeError, match="no running event loop"):
        fade_executor.asubmit(et.square, 2)


def test_run_in_executor_and_wrap_future(fade_executor: fade.Executor) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(fade_executor, et.square, 9) == 81
        # run_in_executor takes no keyword arguments; a partial carries them.
        add = functools.partial(et.add, b=10)
        assert await loop.run_in_executor(fade_executor, add, 1) == 11
        # The documented path for code that already holds a concurrent future.
        assert await asyncio.wrap_future(fade_executor.submit(et.square, 4)) == 16
        with pytest.raises(ValueError, match="bad value 1"):
            await loop.run_in_executor(fade_executor, et.fail_on, 1, 1)

    asyncio.run(main())


def test_many_awaits_do_not_start_a_thread_each(
    fade_executor: fade.Executor, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    me = psutil.Process()
    n = 500

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await fade_executor.asubmit(et.square, 1)  # connected, I/O thread running
        before = (threading.active_count(), me.num_threads())
        futures = [fade_executor.asubmit(et.wait_for_path, str(gate), i) for i in range(n)]
        futures += [
            loop.run_in_executor(fade_executor, et.wait_for_path, str(gate), i) for i in range(n)
        ]
        waiting = asyncio.gather(*futures)
        await asyncio.sleep(0.5)  # everything submitted and awaited, nothing done
        during = (threading.active_count(), me.num_threads())
        assert not waiting.done()
        gate.touch()
        assert await waiting == [*range(n), *range(n)]
        # A thread per future would add 1,000 here; allow a couple for the runtime.
        assert during[0] <= before[0] + 2, f"Python threads {before[0]} -> {during[0]}"
        assert during[1] <= before[1] + 2, f"OS threads {before[1]} -> {during[1]}"

    asyncio.run(main())


@pytest.mark.parametrize("how", ["wait_for", "run_ends"])
def test_a_cancelled_await_stops_its_running_task(how: str, tmp_path: Path) -> None:
    # A timeout (asyncio.wait_for) or the end of asyncio.run cancels what is still
    # awaited: the work is no longer wanted. Cancelling only kept it from starting; a
    # task already at the broker ran on, and held the pool's one worker for a minute.
    gate = tmp_path / "never-opened"

    async def time_out(ex: fade.Executor) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ex.asubmit(et.wait_for_path, str(gate), 1), 1.0)

    async def leave_it_pending(ex: fade.Executor) -> None:
        async def wait_on_it() -> None:
            await ex.asubmit(et.wait_for_path, str(gate), 1)

        waiting = asyncio.create_task(wait_on_it())
        await asyncio.sleep(1.0)  # it runs; asyncio.run then cancels the task awaiting it
        assert not waiting.done()

    with fade.Executor(max_workers=1) as ex:
        asyncio.run(time_out(ex) if how == "wait_for" else leave_it_pending(ex))
        # The one worker is free again (the task ran 60 s before).
        assert ex.submit(et.square, 3).result(timeout=30) == 9

        async def control() -> None:  # a task not yet started is cancelled, as before
            running = ex.asubmit(et.wait_for_path, str(gate), 1)
            queued = ex.asubmit(et.square, 4)
            await asyncio.sleep(0.5)
            queued.cancel()
            running.cancel()
            await asyncio.sleep(0.1)

        asyncio.run(control())
        assert ex.submit(et.square, 5).result(timeout=30) == 25
