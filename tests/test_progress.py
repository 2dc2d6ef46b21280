"""Progress bars (tqdm) for maps and for waiting on futures, on a real pool."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest
import tasks
from conftest import INTERVAL, LIVENESS, Pool

import fade
from fade.errors import MissingExtraError

pytestmark = pytest.mark.timeout(90)
pytest.importorskip("tqdm", reason="the progress extra is not installed")

#: tqdm's "[elapsed<remaining, rate]": the time left is there.
TIMES = re.compile(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+task/s\]")


def final_line(err: str) -> str:
    """The bar as last drawn (tqdm redraws in place with carriage returns)."""
    return err.replace("\n", "\r").rstrip("\r").split("\r")[-1]


def test_map_progress_counts_every_call(
    fade_executor: fade.Executor, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 120
    assert list(fade_executor.map(tasks.square, range(n), progress=True)) == [
        x * x for x in range(n)
    ]
    bar = final_line(capsys.readouterr().err)
    assert bar.startswith("square: 100%|"), bar
    assert f" {n}/{n} " in bar and TIMES.search(bar), bar


def test_chunked_map_progress_counts_calls_not_chunks(
    fade_executor: fade.Executor, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 95
    results = fade_executor.map(tasks.add, range(n), range(n), chunksize=10, progress=True)
    assert list(results) == [2 * x for x in range(n)]
    bar = final_line(capsys.readouterr().err)
    assert f" {n}/{n} " in bar, bar


def test_map_progress_without_a_length_counts_without_a_total(
    fade_executor: fade.Executor, capsys: pytest.CaptureFixture[str]
) -> None:
    values = (x for x in range(30))
    assert list(fade_executor.map(tasks.identity, values, progress=True)) == list(range(30))
    bar = final_line(capsys.readouterr().err)
    assert re.match(r"identity: 30task \[", bar), bar


def test_as_completed_progress(
    fade_executor: fade.Executor, capsys: pytest.CaptureFixture[str]
) -> None:
    futures = [fade_executor.submit(tasks.sleep_and_return, 0.01, i) for i in range(40)]
    seen = [f.result() for f in fade.as_completed(futures, timeout=60, progress=True)]
    assert sorted(seen) == list(range(40))
    bar = final_line(capsys.readouterr().err)
    assert bar.startswith("100%|") and " 40/40 " in bar and TIMES.search(bar), bar


def test_as_completed_without_progress_draws_nothing(
    fade_executor: fade.Executor, capsys: pytest.CaptureFixture[str]
) -> None:
    futures = [fade_executor.submit(tasks.square, i) for i in range(5)]
    assert sorted(f.result() for f in fade.as_completed(futures)) == [0, 1, 4, 9, 16]
    assert capsys.readouterr().err == ""


def test_progress_without_tqdm_names_the_extra(
    fade_executor: fade.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # "import tqdm.auto" now fails
    with pytest.raises(MissingExtraError, match=r"pip install 'fade\[progress\]'"):
        fade_executor.map(tasks.square, range(3), progress=True)
    with pytest.raises(ImportError):
        fade.as_completed([fade_executor.submit(tasks.square, 2)], progress=True)


def test_progress_bar_redraws_in_place_in_a_terminal(pool: Pool) -> None:
    """In a real (pseudo-)terminal the bar is redrawn on one line as tasks finish."""
    pool.start_broker()
    pool.start_worker(processes=2)
    script = textwrap.dedent(
        f"""
        import fade, tasks
        with fade.Executor({pool.address!r}, heartbeat_interval={INTERVAL},
                           heartbeat_liveness={LIVENESS}) as ex:
            list(ex.map(tasks.sleep_and_return, [0.02] * 100, progress=True))
        """
    )
    controller, terminal = pty.openpty()
    # A new pseudo-terminal is 0 columns wide; give it a size as a terminal window has.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=terminal, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the child has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert child.wait(timeout=30) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    draws = [d for d in text.split("\r") if "sleep_and_return:" in d]
    # Several redraws, on one line, counting up to the end.
    assert len(draws) >= 3, text
    counts = [int(m.group(1)) for d in draws if (m := re.search(r"\| *(\d+)/100 ", d))]
    assert counts == sorted(counts) and counts[0] < 100 and counts[-1] == 100, text


def test_bar_shows_every_call_done_even_before_the_last_callback_ran(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A waiter can get a result before the future's done-callbacks have run (they run
    # after the waiters wake). At the end of a map the bar must still read n/n.
    import concurrent.futures as cf

    from fade.progress import ProgressBar

    bar = ProgressBar(3)
    futures: list[cf.Future[int]] = [cf.Future() for _ in range(2)]
    bar.track(futures[0], 1)
    bar.track(futures[1], 2)
    futures[0].set_result(1)  # its callback counts 1; the other's is "still on its way"
    bar.close(all_done=True)
    futures[1].set_result(2)  # a late callback after close changes nothing
    assert " 3/3 " in final_line(capsys.readouterr().err)
