"""The broker's HTTP endpoint against a real pool: /status, /metrics, and the dashboard
page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tasks
from browser import Chromium
from conftest import INTERVAL, LIVENESS, Pool, free_port, wait_for

import fade
from fade.web import StatusServer, allowed_host_names, check_host, parse_address, read_token

pytestmark = pytest.mark.timeout(120)

#: Where the browser test leaves its screenshot (git-ignored), for people to look at.
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


class HttpPool(Pool):
    """A pool whose broker serves HTTP on a free loopback port, with a token."""

    http_port: int = 0
    token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def get(self, path: str, token: str | None = None) -> tuple[int, str, str]:
        """(status, content type, body) of a GET; HTTP errors are answers too."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    def status(self, detail: bool = True) -> dict[str, Any]:
        """/status: with the token (per-peer detail) unless not ``detail``."""
        code, _, body = self.get("status", self.token if detail else None)
        assert code == 200, body
        state: dict[str, Any] = json.loads(body)
        return state


def start_http_pool(pool: HttpPool, token_dir: Path, workers: int = 2) -> HttpPool:
    pool.http_port = free_port()
    pool.token = secrets.token_urlsafe(24)
    token_file = token_dir / "http.token"
    token_file.write_text(pool.token + "\n")
    token_file.chmod(0o600)
    pool.start_broker("--http", f"127.0.0.1:{pool.http_port}", "--http-token-file", str(token_file))
    for _ in range(workers):
        pool.start_worker()
    wait_for(lambda: _answers(pool), 20, "the HTTP endpoint")
    wait_for(lambda: len(pool.status()["workers"]) == workers, 20, f"{workers} workers")
    return pool


def _answers(pool: HttpPool) -> bool:
    try:
        return pool.get("status")[0] == 200
    except OSError:
        return False


@pytest.fixture
def http_pool(tmp_path: Path) -> Iterator[HttpPool]:
    pool = HttpPool()
    try:
        yield start_http_pool(pool, tmp_path)
    finally:
        pool.stop()


@pytest.fixture
def executor(http_pool: HttpPool) -> Iterator[fade.Executor]:
    ex = fade.Executor(http_pool.address, heartbeat_interval=INTERVAL, heartbeat_liveness=LIVENESS)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def wait_done(pool: HttpPool, count: int) -> dict[str, Any]:
    """The published state is up to a second old: wait until it shows ``count`` done."""
    wait_for(lambda: pool.status()["tasks_done"] == count, 10, f"/status to show {count} done")
    return pool.status()


# -- /status and /metrics ----------------------------------------------------------------


def test_status_endpoint_follows_the_pool(http_pool: HttpPool, executor: fade.Executor) -> None:
    code, content_type, _ = http_pool.get("status")
    assert (code, content_type) == (200, "application/json")
    before = http_pool.status()
    assert sorted(w["pid"] for w in before["workers"]) == sorted(http_pool.worker_pids())
    assert before["tasks_done"] == 0

    n = 40
    assert list(executor.map(tasks.square, range(n))) == [x * x for x in range(n)]
    state = wait_done(http_pool, n)
    assert sum(w["done"] for w in state["workers"]) == n
    assert len(state["clients"]) == 1 and state["queued"] == 0
    assert state["broker_id"] == before["broker_id"] and state["uptime"] > before["uptime"]
    # The same numbers for anyone, without the peers.
    public = http_pool.status(detail=False)
    assert (public["tasks_done"], public["worker_count"], public["client_count"]) == (n, 2, 1)
    assert public["worker_states"] == {"idle": 2, "busy": 0, "draining": 0}
    assert public["detail"] == "token" and "workers" not in public and "clients" not in public
    assert state["detail"] == "shown" and state["version"] == fade.__version__


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_counts_workers_and_tasks(
    http_pool: HttpPool, executor: fade.Executor
) -> None:
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    futures = [executor.submit(tasks.fail_on, x, 7) for x in range(30)]
    assert sum(f.exception(timeout=30) is not None for f in futures) == 1
    wait_done(http_pool, 30)

    code, content_type, text = http_pool.get("metrics")
    assert code == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples = _samples(text)
    workers = {s: samples["fade_workers", (("state", s),)] for s in ("idle", "busy", "draining")}
    assert workers == {"idle": 2, "busy": 0, "draining": 0}
    assert samples["fade_tasks_total", (("outcome", "ok"),)] == 29
    assert samples["fade_tasks_total", (("outcome", "raised"),)] == 1
    assert samples["fade_tasks_total", (("outcome", "lost"),)] == 0
    assert samples["fade_clients", ()] == 1
    assert samples["fade_tasks_queued", ()] == 0
    assert samples["fade_tasks_running", ()] == 0
    assert samples["fade_tasks_per_second", ()] > 0
    info = [labels for name, labels in samples if name == "fade_broker_info"]
    assert dict(info[0]) == {"broker_id": http_pool.status()["broker_id"]}
    # With the token, a scrape also learns the broker's version.
    code, _, text = http_pool.get("metrics", http_pool.token)
    info = [labels for name, labels in _samples(text) if name == "fade_broker_info"]
    assert code == 200 and dict(info[0])["version"] == fade.__version__


def test_metrics_without_prometheus_client_answer_501(pool: Pool, tmp_path: Path) -> None:
    # A package of that name that cannot be imported hides the installed one.
    hidden = tmp_path / "prometheus_client"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    http = HttpPool(port=pool.port)
    http.http_port = free_port()
    env_path = os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]])
    pool.broker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fade.broker",
            pool.address,
            "--http",
            f"127.0.0.1:{http.http_port}",
        ],
        env={**os.environ, "PYTHONPATH": env_path},
    )
    wait_for(lambda: _answers(http), 20, "the HTTP endpoint")
    code, _, body = http.get("metrics")
    assert code == 501
    assert "pip install 'fade[metrics]'" in body
    assert http.get("status")[0] == 200  # the rest still works


def test_unknown_path_is_404(http_pool: HttpPool) -> None:
    code, _, body = http_pool.get("nope")
    assert code == 404 and "/status" in body


def test_dashboard_page_is_self_contained(http_pool: HttpPool) -> None:
    with urllib.request.urlopen(http_pool.url, timeout=10) as response:
        page = response.read().decode()
        csp = response.headers["Content-Security-Policy"]
    assert "<script>" in page and 'fetch("status"' in page
    # Nothing loaded from elsewhere, and the browser is told to refuse it anyway.
    assert "http://" not in page and "https://" not in page and "src=" not in page
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_loopback_server_answers_only_to_loopback_names(http_pool: HttpPool) -> None:
    """A page on another site whose name is rebound to 127.0.0.1 must not read /status."""

    def status_as(host: str) -> int:
        request = urllib.request.Request(http_pool.url + "status", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                code: int = response.status
                return code
        except urllib.error.HTTPError as exc:
            return exc.code

    port = http_pool.http_port
    assert status_as(f"evil.example:{port}") == 403
    assert status_as("evil.example") == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert status_as(host) == 200, host


#: What every server answers to: loopback names and IP addresses.
OWN_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]", "10.1.2.3", "[fe80::1]"})


@pytest.mark.parametrize(
    ("allow", "answered"),
    [
        ((), OWN_NAMES),
        (("Fade.Example.",), OWN_NAMES | {"fade.example", "FADE.example."}),
        (("*",), None),  # any Host header, or none
    ],
)
def test_host_check_answers_own_names_ip_addresses_and_allowed_names(
    allow: tuple[str, ...], answered: frozenset[str] | None
) -> None:
    """IP addresses are always answered (no rebound DNS name is one); names only if allowed."""
    server = StatusServer("127.0.0.1", 0, lambda: {"broker_id": "b"}, allow_hosts=allow)
    url = server.start()
    names = {"127.0.0.1", "localhost", "[::1]", "10.1.2.3", "[fe80::1]", "fade.example"}
    names |= {"FADE.example.", "other.example", "evil.example", "localhost.x", ""}
    try:
        codes = {}
        for name in names:
            for host in (name, f"{name}:80") if name else ("",):
                request = urllib.request.Request(url + "status", headers={"Host": host})
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        codes[host] = response.status
                except urllib.error.HTTPError as exc:
                    codes[host] = exc.code
    finally:
        server.stop()
        server.stop()  # idempotent
    expected = {
        host: 200
        if answered is None or host.rpartition(":")[0] in answered or host in answered
        else 403
        for host in codes
    }
    assert codes == expected


def test_allowed_host_names() -> None:
    own = {"localhost", "127.0.0.1", "::1"}
    assert allowed_host_names("127.0.0.1") == own
    assert allowed_host_names("LocalHost.", ["[::1]", "Proxy.Example"]) == own | {"proxy.example"}
    assert allowed_host_names("127.0.0.1", ["a.example", "*"]) is None
    for wildcard in ("0.0.0.0", "::"):
        names = allowed_host_names(wildcard)
        assert names is not None and socket.gethostname().lower() in names


def test_http_token_file_is_checked_at_start(pool: Pool, tmp_path: Path) -> None:
    short = tmp_path / "short.token"
    short.write_text("secret\n")
    for token_file, message in ((short, "16 or more"), (tmp_path / "none", "cannot read")):
        result = subprocess.run(
            [sys.executable, "-m", "fade.broker", pool.address, "--http",
             f"127.0.0.1:{free_port()}", "--http-token-file", str(token_file)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert read_token(_write(tmp_path / "ok.token", " " + "t" * 16 + "\n")) == "t" * 16
    with pytest.raises(ValueError, match="printable ASCII"):
        read_token(_write(tmp_path / "spaced.token", "t" * 10 + " " + "t" * 10))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_http_options_need_http(pool: Pool) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fade.broker", pool.address, "--http-public"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "need --http" in result.stderr


def test_http_on_a_public_host_is_refused_without_the_flag(pool: Pool) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fade.broker", pool.address, "--http", f"0.0.0.0:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--http-public" in result.stderr


def test_http_port_clash_names_the_http_address(pool: Pool) -> None:
    """Found: a clash said "Address already in use" without saying which address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fade.broker", pool.address, "--http", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr, result.stderr
    assert "--http" in result.stderr and "not the broker's" in result.stderr, result.stderr
    assert "Address already in use" in result.stderr


def test_http_address_parsing_and_host_check() -> None:
    assert parse_address("127.0.0.1:8787") == ("127.0.0.1", 8787)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("8787", "host:", ":80", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)
    check_host("127.0.0.1", public=False)
    check_host("localhost", public=False)
    check_host("0.0.0.0", public=True)
    with pytest.raises(ValueError, match="--http-public"):
        check_host("0.0.0.0", public=False)


# -- the page in a real browser ---------------------------------------------------------------

WORKER_ROWS = "document.querySelectorAll('#workers-table tbody tr')"


def test_dashboard_in_headless_chromium(
    http_pool: HttpPool, executor: fade.Executor, browser: Chromium, tmp_path: Path
) -> None:
    browser.open(http_pool.url)
    page = browser.evaluate

    # Without the token: the numbers, no workers, and a form asking for the token.
    wait_for(
        lambda: page("document.getElementById('workers-count').textContent") == "2",
        30,
        "the page to count 2 workers",
    )
    assert page(f"{WORKER_ROWS}.length") == 0
    assert page("document.getElementById('workers-section').hidden") is True
    assert page("document.getElementById('token-form').hidden") is False
    assert "--http-token-file" in page("document.getElementById('access-text').textContent")
    browser.screenshot(ARTIFACTS / "dashboard-no-token.png")

    # A wrong token is refused and forgotten; the page keeps showing the numbers.
    enter_token(browser, "not-the-token-at-all")
    wait_for(
        lambda: page("document.getElementById('access-warning').hidden") is False,
        30,
        "the page to say the token was refused",
    )
    assert page("sessionStorage.length") == 0 and page(f"{WORKER_ROWS}.length") == 0
    assert page("document.getElementById('conn-text').textContent") == "live"

    # With the token, it shows the pool's two workers, by short id and pid.
    enter_token(browser, str(http_pool.token))
    wait_for(lambda: page(f"{WORKER_ROWS}.length") == 2, 30, "the page to list 2 workers")
    assert page("document.getElementById('access').hidden") is True
    state = http_pool.status()
    shown = page(f"Array.from({WORKER_ROWS}).map(r => r.dataset.id)")
    assert sorted(shown) == sorted(w["id"] for w in state["workers"])
    assert all(len(i) == 12 for i in shown)
    pids = page(f"Array.from({WORKER_ROWS}).map(r => Number(r.cells[2].textContent))")
    assert sorted(pids) == sorted(http_pool.worker_pids())
    assert page("document.getElementById('workers-count').textContent") == "2"
    assert page("document.getElementById('conn-text').textContent") == "live"
    assert page("document.getElementById('tasks-done').textContent") == "0"
    polls_before = int(page("document.body.dataset.polls"))

    # Tasks run while the same page stays open: its numbers must move by themselves.
    # The first tasks hold their workers until the page has shown them busy: on a
    # loaded machine the page's once-a-second poll could otherwise miss a short run
    # (seen in CI: 150 tasks of 20 ms, over before any poll saw a busy worker).
    n = 150
    go = tmp_path / "go"
    results: list[Any] = []
    runner = threading.Thread(
        target=lambda: results.extend(
            executor.map(tasks.sleep_once_path_exists, [str(go)] * n, [0.02] * n, range(n))
        )
    )
    runner.start()
    try:
        wait_for(
            lambda: page("document.querySelectorAll('.badge.busy').length") >= 1,
            30,
            "the page to show a busy worker",
        )
        busy_running = int(page("document.getElementById('running').textContent"))
        browser.screenshot(ARTIFACTS / "dashboard-busy.png")
    finally:
        go.touch()
        runner.join(60)
    assert results == list(range(n))
    assert busy_running >= 1

    wait_for(
        lambda: page("document.getElementById('tasks-done').textContent") == str(n),
        30,
        f"the page to count {n} tasks done",
    )
    # The plot draws whole seconds only: wait for the last one to be over.
    wait_for(lambda: page("document.getElementById('plot').dataset.total") == str(n), 10, "plot")
    assert float(page("document.getElementById('rate').textContent")) > 0
    assert int(page("document.getElementById('plot').dataset.max")) > 0
    assert page("document.getElementById('plot-line').getAttribute('d')").count("L") >= 10
    assert int(page("document.body.dataset.polls")) >= polls_before + 2
    assert page("document.getElementById('clients-count').textContent") == "1"
    png = browser.screenshot(ARTIFACTS / "dashboard.png")
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not browser.exceptions, browser.exceptions
    print(f"dashboard screenshots: {ARTIFACTS / 'dashboard.png'}, dashboard-busy.png")


def enter_token(browser: Chromium, token: str) -> None:
    """Type ``token`` into the page's form and submit it, as a person would."""
    browser.evaluate(
        f"document.getElementById('token-input').value = {json.dumps(token)}; "
        "document.getElementById('token-form').requestSubmit(); true"
    )


def test_dashboard_says_so_when_the_broker_is_gone(http_pool: HttpPool, browser: Chromium) -> None:
    browser.open(http_pool.url)
    conn = "document.getElementById('conn-text').textContent"
    wait_for(lambda: browser.evaluate(conn) == "live", 30, "the page to go live")
    http_pool.kill_broker()
    wait_for(
        lambda: browser.evaluate(conn).startswith("broker not answering"),
        30,
        "the page to notice the broker is gone",
    )
    assert browser.evaluate("document.getElementById('conn').className") == "down"
