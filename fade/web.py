"""The broker's optional HTTP endpoint (``fade-broker --http HOST:PORT``).

::

    broker loop --about once a second--> broker.published   (a new dict each time,
                                                            never changed after)
    HTTP threads --read the reference--> GET /          the live dashboard (one page,
                                                        no outside resources)
                                         GET /status    that dict as JSON
                                         GET /metrics   Prometheus text (fade.metrics)

* The broker stays one poll loop that owns its socket. The HTTP server runs in
  daemon threads that only read the latest snapshot the loop published: they
  share no socket and need no lock (the loop replaces the reference; it never
  mutates a published dict).
* Off by default, and loopback only unless the operator says ``--http-public``:
  the pages are read-only, but they name every host and process of the pool.
  A loopback server also answers only requests addressed to a loopback name,
  so a web page whose DNS name is rebound to 127.0.0.1 cannot read it.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from fade.errors import MissingExtraError

__all__ = ["StatusServer", "check_host", "parse_address"]

log = logging.getLogger("fade.web")

#: What the dashboard may do: run its own inline script and style, and fetch
#: from this server. Nothing else, so it works (and leaks nothing) offline.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

#: Host header names a loopback-only server answers to (its own host is added).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

StateSource = Callable[[], "Mapping[str, Any] | None"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6HOST]:PORT``) as a (host, port) pair; raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--http wants HOST:PORT, such as 127.0.0.1:8787, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def check_host(host: str, *, public: bool) -> None:
    """Refuse a host that is not loopback unless ``public``; raises ValueError."""
    if public:
        return
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve HTTP host {host!r}: {exc}") from None
    outside = sorted({str(i[4][0]) for i in infos if not ipaddress.ip_address(i[4][0]).is_loopback})
    if outside:
        raise ValueError(
            f"HTTP host {host!r} is reachable from other machines ({', '.join(outside)}); "
            "the status pages name every host and process of the pool. Use a loopback "
            "host (127.0.0.1), or add --http-public if that is what you want"
        )


class StatusServer:
    """Serve the dashboard, /status and /metrics from ``state()`` on ``host:port``."""

    def __init__(self, host: str, port: int, state: StateSource, *, public: bool = False) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.state = state
        self._server.allowed_hosts = None if public else LOOPBACK_NAMES | {host.lower()}
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="fade-http",
            daemon=True,
        )
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> str:
        """Start serving in a daemon thread; returns the dashboard's URL."""
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and close the listening socket; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: StateSource
    allowed_hosts: frozenset[str] | None  # None: any Host header


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET only; every answer is built from one published snapshot."""

    server_version = "fade"

    def state(self) -> Mapping[str, Any] | None:
        return self._server().state()

    def _server(self) -> _Server:
        server = self.server
        assert isinstance(server, _Server)
        return server

    def _host_allowed(self) -> bool:
        allowed = self._server().allowed_hosts
        if allowed is None:
            return True
        host = (self.headers.get("Host") or "").lower()
        # "name:port", "[v6]:port" or a bare name: keep the name.
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0]
        return (name or host) in allowed

    def do_GET(self) -> None:
        if not self._host_allowed():
            body = b"this server answers only to loopback names (start it with --http-public)\n"
            self._send(403, "text/plain; charset=utf-8", body)
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", _dashboard(), csp=True)
        elif path == "/status":
            self._status()
        elif path == "/metrics":
            self._metrics()
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /, /status or /metrics\n")

    def _status(self) -> None:
        state = self.state()
        if state is None:
            self._unavailable()
            return
        self._send(200, "application/json", json.dumps(state).encode())

    def _metrics(self) -> None:
        from fade import metrics

        state = self.state()
        if state is None:
            self._unavailable()
            return
        try:
            body = metrics.render(state)
        except MissingExtraError as exc:
            self._send(501, "text/plain; charset=utf-8", f"{exc}\n".encode())
            return
        self._send(200, metrics.CONTENT_TYPE, body)

    def _unavailable(self) -> None:
        body = b'{"error": "the broker has not published its state yet"}'
        self._send(503, "application/json", body, retry_after=True)

    def _send(
        self,
        code: int,
        content_type: str,
        body: bytes,
        *,
        csp: bool = False,
        retry_after: bool = False,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if csp:
            self.send_header("Content-Security-Policy", _CSP)
        if retry_after:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes and dashboard polls every second: not for the operator's log.
        log.debug("%s %s", self.address_string(), format % args)


_page: bytes | None = None


def _dashboard() -> bytes:
    global _page
    if _page is None:
        _page = resources.files("fade").joinpath("dashboard.html").read_bytes()
    return _page
