"""The broker's optional HTTP endpoint (``fade-broker --http HOST:PORT``).

::

    broker loop --about once a second--> broker.published   (a new dict each time,
                                                            never changed after)
    HTTP threads --read the reference--> a view of it, built per request:
                                         GET /          the live dashboard (one page,
                                                        no data in it, no outside resources)
                                         GET /status    the view as JSON
                                         GET /metrics   Prometheus text (fade.metrics)

* The broker stays one poll loop that owns its socket. The HTTP server runs in
  daemon threads that only read the latest snapshot the loop published: they
  share no socket and need no lock (the loop replaces the reference; it never
  mutates a published dict).
* **Who may ask.** Off by default, and loopback only unless the operator says
  ``--http-public`` (``--keys`` does not imply it). Whatever the bind, only
  requests addressed to a name of this server are answered (loopback names, the
  ``--http`` host, any IP address, and the names given with
  ``--http-allow-host``), so a web page whose DNS name is rebound to the
  broker's address cannot read it through a visitor's browser.
* **What they see.** Aggregate numbers only (counts, rates, uptime): the
  :func:`public_view`. Per-peer detail (each worker's and client's host, pid and
  short id) and the broker's own version, address, host and pid need the token
  of ``--http-token-file`` in ``Authorization: Bearer TOKEN``: the
  :func:`detail_view`. Both are built field by field from the snapshot, so no
  routing identity, nor anything the snapshot gains later, reaches HTTP unless
  it is added here.
"""

from __future__ import annotations

import collections
import hmac
import http.server
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fade.errors import MissingExtraError
from fade.status import peer_id

__all__ = [
    "DETAIL_OFF",
    "DETAIL_SHOWN",
    "DETAIL_TOKEN",
    "MIN_TOKEN_LENGTH",
    "StatusServer",
    "allowed_host_names",
    "check_host",
    "detail_view",
    "parse_address",
    "public_view",
    "read_token",
]

log = logging.getLogger("fade.web")

#: What the dashboard may do: run its own inline script and style, and fetch
#: from this server. Nothing else, so it works (and leaks nothing) offline.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

#: Host header names every server answers to (its own host and the allowed names
#: are added; so is any IP address, which no rebound DNS name can be).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

#: A token shorter than this is refused: it could be guessed.
MIN_TOKEN_LENGTH = 16

#: The ``detail`` field of /status: per-peer detail is in this answer; it needs
#: the token; the server has no token, so no request gets it.
DETAIL_SHOWN, DETAIL_TOKEN, DETAIL_OFF = "shown", "token", "off"

#: Worker states always counted (as 0 when none is in them).
WORKER_STATES = ("idle", "busy", "draining")

#: The fields of the snapshot that are aggregate numbers, shown to anyone.
_PUBLIC_FIELDS = (
    "broker_id",
    "time",
    "uptime",
    "heartbeat_interval",
    "queued",
    "running",
    "backlog",
    "tasks_done",
    "tasks_failed",
    "tasks_lost",
    "capacity",
    "rate",
    "per_second",
)
_BROKER_FIELDS = ("version", "address", "host", "pid")
#: Of a broker pair's state (snapshot "pair"): what anyone is shown; the token adds
#: the other broker's address.
_PAIR_FIELDS = ("role", "state", "active", "term", "takeovers", "peer_state")
_WORKER_FIELDS = (
    "host", "pid", "label", "state", "running", "credits", "done", "last_heard", "resources",
    "free",
)  # fmt: skip
_CLIENT_FIELDS = (
    "host", "pid", "key", "tasks", "queued", "running", "backlog", "weight", "share",
    "waiting_for_resources",
)  # fmt: skip

StateSource = Callable[[], "Mapping[str, Any] | None"]


def public_view(state: Mapping[str, Any], detail: str = DETAIL_OFF) -> dict[str, Any]:
    """The aggregate numbers of a broker snapshot: what anyone who may ask is shown.

    ``detail`` says how per-peer detail could be had (:data:`DETAIL_TOKEN` or
    :data:`DETAIL_OFF`); the page uses it to ask for the token or not.
    """
    view = {name: state[name] for name in _PUBLIC_FIELDS if name in state}
    workers, clients = state.get("workers", []), state.get("clients", [])
    counts = collections.Counter(str(w.get("state")) for w in workers)
    view["worker_count"] = len(workers)
    view["worker_states"] = {name: counts.pop(name, 0) for name in WORKER_STATES} | dict(counts)
    view["client_count"] = len(clients)
    pair = state.get("pair")
    if isinstance(pair, Mapping):
        view["pair"] = {name: pair.get(name) for name in _PAIR_FIELDS}
    view["detail"] = detail
    return view


def detail_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`public_view`, the broker's version, address, host and pid, and each worker
    and client by short id (a hash of its identity), host, pid and counts.

    No routing identity, nor any part of one: a peer's ``id`` is :func:`fade.status.peer_id`.
    """
    view = public_view(state, DETAIL_SHOWN)
    view.update({name: state[name] for name in _BROKER_FIELDS if name in state})
    pair = state.get("pair")
    if isinstance(pair, Mapping) and "pair" in view:
        view["pair"]["peer_address"] = pair.get("peer_address")
    view["workers"] = [_peer(w, _WORKER_FIELDS) for w in state.get("workers", [])]
    view["clients"] = [_peer(c, _CLIENT_FIELDS) for c in state.get("clients", [])]
    return view


def _peer(entry: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    return {"id": peer_id(entry), **{name: entry.get(name) for name in fields}}


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
            f"HTTP host {host!r} is reachable from other machines ({', '.join(outside)}). "
            "Use a loopback host (127.0.0.1), or add --http-public if that is what you want "
            "(--keys does not cover HTTP; anyone who reaches it sees the pool's aggregate "
            "numbers, and per-peer detail only with --http-token-file's token)"
        )


def read_token(path: str | Path) -> str:
    """The token in the file at ``path`` (surrounding whitespace ignored); raises ValueError
    if it cannot be read or is too short or unfit for an HTTP header."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --http-token-file {str(path)!r}: {exc}") from None
    if len(token) < MIN_TOKEN_LENGTH or not all(33 <= ord(ch) < 127 for ch in token):
        raise ValueError(
            f"--http-token-file {str(path)!r} must hold one token of {MIN_TOKEN_LENGTH} or "
            "more printable ASCII characters and no spaces; make one with: python3 -c "
            "'import secrets; print(secrets.token_urlsafe(32))' > FILE && chmod 600 FILE"
        )
    return token


class StatusServer:
    """Serve the dashboard, /status and /metrics from ``state()`` on ``host:port``.

    Requests are answered only if addressed to a loopback name, ``host`` (for a
    wildcard ``host``, this machine's host name), an IP address, or a name in
    ``allow_hosts`` (``"*"`` in it: any name). Per-peer detail is served to
    requests carrying ``token`` (None: to none).
    """

    def __init__(
        self,
        host: str,
        port: int,
        state: StateSource,
        *,
        allow_hosts: Iterable[str] = (),
        token: str | None = None,
    ) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.state = state
        self._server.allowed_hosts = allowed_host_names(host, allow_hosts)
        self._server.token = token.encode() if token is not None else None
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


def allowed_host_names(host: str, allow_hosts: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host header names a server bound to ``host`` answers (besides IP addresses),
    or None for any name (``"*"`` in ``allow_hosts``)."""
    names = {_bare(host), *(_bare(name) for name in allow_hosts)}
    if "*" in names:
        return None
    if _bare(host) in ("", "0.0.0.0", "::"):
        names.add(_bare(socket.gethostname()))  # the name of "every interface"
    return LOOPBACK_NAMES | names


def _bare(name: str) -> str:
    """A host name as compared: lower case, without a trailing dot or IPv6 brackets."""
    name = name.strip().lower().rstrip(".")
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: StateSource
    allowed_hosts: frozenset[str] | None  # None: any Host header
    token: bytes | None  # None: per-peer detail is off


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET only; every answer is built from one published snapshot."""

    #: A connection that sends nothing for this long is closed, so idle
    #: connections cannot keep server threads forever.
    timeout = 30

    def version_string(self) -> str:
        return "fade"  # no version numbers of fade or Python for a scanner

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
        host = (self.headers.get("Host") or "").strip().lower()
        # "name:port", "[v6]:port" or a bare name: keep the name.
        if host.startswith("["):
            name = host[1:].partition("]")[0]
        else:
            name = host.rpartition(":")[0] if ":" in host else host
        name = name.rstrip(".")
        # An IP address cannot be a rebound DNS name: a page with that origin is ours.
        return bool(name) and (name in allowed or _is_ip_address(name))

    def do_GET(self) -> None:
        if not self._host_allowed():
            body = (
                b"this server answers only requests addressed to its own names "
                b"(see fade-broker --http-allow-host)\n"
            )
            self._send(403, "text/plain; charset=utf-8", body)
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", _dashboard(), csp=True)
        elif path in ("/status", "/metrics"):
            self._data(path)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /, /status or /metrics\n")

    def _data(self, path: str) -> None:
        detail = self._authorised()
        if detail is None:
            return
        state = self.state()
        if state is None:
            body = b'{"error": "the broker has not published its state yet"}'
            self._send(503, "application/json", body, retry_after=True)
            return
        if detail:
            view = detail_view(state)
        else:
            view = public_view(state, DETAIL_OFF if self._server().token is None else DETAIL_TOKEN)
        if path == "/status":
            self._send(200, "application/json", json.dumps(view).encode())
        else:
            self._metrics(view)

    def _authorised(self) -> bool | None:
        """True with the right token, False with none; None if refused (answered 401)."""
        header = self.headers.get("Authorization")
        if header is None:
            return False
        token = self._server().token
        scheme, _, credential = header.strip().partition(" ")
        if token is None:
            reason = (
                b"this endpoint has no token (fade-broker --http-token-file): "
                b"it serves aggregate numbers only; send no Authorization header\n"
            )
        elif scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode(errors="replace"), token
        ):
            return True
        else:
            reason = b"wrong token\n"
        self._send(401, "text/plain; charset=utf-8", reason, challenge=True)
        return None

    def _metrics(self, view: Mapping[str, Any]) -> None:
        from fade import metrics

        try:
            body = metrics.render(view)
        except MissingExtraError as exc:
            self._send(501, "text/plain; charset=utf-8", f"{exc}\n".encode())
            return
        self._send(200, metrics.CONTENT_TYPE, body)

    def _send(
        self,
        code: int,
        content_type: str,
        body: bytes,
        *,
        csp: bool = False,
        retry_after: bool = False,
        challenge: bool = False,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if csp:
            self.send_header("Content-Security-Policy", _CSP)
        if retry_after:
            self.send_header("Retry-After", "1")
        if challenge:
            self.send_header("WWW-Authenticate", 'Bearer realm="fade"')
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
