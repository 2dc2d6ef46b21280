"""The peer's end of the broker connection, shared by clients and workers.

::

    owner (client I/O thread, or the worker thread holding the socket)
      link.read(sock)  -> parse -> RESET: HELLO again     WELCOME: adopt the broker's
                                   ERROR: log, or fatal    heartbeat and frame limit,
                                   else: owner's _on_<command>       then the owner's
      link.upkeep(now) -> heartbeat when due; silent broker: reconnect; never
                          reached / gone too long: owner.on_unreachable(error)
      link.send(frames) -> never blocks: a dead connection is replaced

* One DEALER with a stable routing identity; a reconnection opens a new socket
  and says HELLO again, and the owner re-sends what the broker may have lost.
* Peers follow the heartbeat interval and liveness the broker announces in
  WELCOME, whatever their own defaults: both sides then agree on when a peer is dead.
* Nothing waits forever. A send that cannot be queued (libzmq ends a connection
  for good when it receives a frame over its limit) replaces the socket. A broker
  never reached within ``connect_timeout``, or silent for ``reconnect_timeout`` after
  it was reached, is reported once per outage to the owner as BrokerUnreachableError
  naming the address and the likely cause (the link keeps trying).
* An ERROR from a broker of another protocol version is fatal; others are logged.
* A broker pair (``"tcp://a:5555,tcp://b:5555"``, fade/pair.py): the link talks to
  one address at a time. A broker silent for interval x liveness is left for the
  next, and the HELLO there says how long it was silent (``left_silent``: a vote
  that the other is gone). A passive broker answers STANDBY: go to the next one
  at once (after a full round of them, an interval later), or, for a voter the
  broker expects to take over for soon, say HELLO there again after ``retry``.
  The owner sees a reconnection like any other: a new socket, then WELCOME.

Not thread-safe: the owner calls it only from the thread that holds the socket.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Mapping

import zmq

from fade import defaults, security
from fade import protocol as p
from fade._logutil import RateLimitedLog
from fade._version import __version__
from fade.errors import BrokerUnreachableError, FadeError, ProtocolError, ProtocolVersionError
from fade.sockets import check_endpoint, connect_dealer, has_input, recv_frames, send_frames

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_RECONNECT_TIMEOUT", "BrokerLink", "check_address"]

#: Seconds a peer waits for a broker it has never reached, or that stopped answering
#: (a restart), before saying so (fade/defaults.py).
DEFAULT_CONNECT_TIMEOUT = defaults.DEFAULT_CONNECT_TIMEOUT
DEFAULT_RECONNECT_TIMEOUT = defaults.DEFAULT_RECONNECT_TIMEOUT
#: Seconds between the checks no message waits for: handshake failures.
CHECK_INTERVAL = 0.1

Handler = Callable[[p.Message], None]

_TRANSPORTS = ("tcp", "ipc", "inproc")
_STANDBY = p.Command.STANDBY


def check_address(address: object) -> str:
    """The address if a DEALER can connect to it (several, comma-separated, for a pair of
    brokers); TypeError or ValueError naming what is wrong and the forms expected."""
    if not isinstance(address, str):
        raise TypeError(
            "the first argument of Executor() is the broker's address, a string such as "
            "'tcp://host:port' or 'ipc://path', or max_workers, an int; "
            f"not {type(address).__name__}"
        )
    for part in address.split(","):
        check_endpoint(part.strip())
    return address


def _unresolvable(address: str) -> str | None:
    """Why a tcp address's host name does not resolve, or None (blocking: connect only)."""
    transport, _, rest = address.partition("://")
    if transport != "tcp":
        return None
    host = rest.rpartition(":")[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        return f"the host name {host!r} does not resolve ({exc})"
    return None


class BrokerLink:
    """A DEALER to the broker, with liveness, reconnection and the common commands."""

    def __init__(
        self,
        address: str,
        *,
        identity: bytes,
        hello: Callable[[], p.Hello],
        handlers: Mapping[p.Command, Handler],
        on_welcome: Callable[[p.Welcome], None],
        on_fatal: Callable[[FadeError], None],
        on_unreachable: Callable[[BrokerUnreachableError | None], None],
        log: logging.Logger,
        keys: security.PeerKeys | None = None,
        max_message_size: int,
        interval: float = p.HEARTBEAT_INTERVAL,
        liveness: int = p.HEARTBEAT_LIVENESS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        linger_ms: int = 0,
        on_socket: Callable[[zmq.Socket[bytes] | None], None] | None = None,
    ) -> None:
        #: The brokers to try, in turn (one, or a pair's two); ``address`` is the current.
        self.addresses = address.split(",")
        self._at = 0
        self.address = self.addresses[0]
        self.identity = identity
        self.keys = keys
        self.max_message_size = max_message_size
        self.broker_max_message_size = 0  # 0 until a WELCOME says
        self.interval = interval
        self.expiry = p.expiry(interval, liveness)
        self.welcomed = False
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self._hello = hello
        self._handlers = handlers
        self._on_welcome = on_welcome
        self._on_fatal = on_fatal
        self._on_unreachable = on_unreachable
        self._log = log
        self._linger_ms = linger_ms
        self._on_socket = on_socket  # told of every new socket, and before one is closed
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket: zmq.Socket[bytes] | None = None
        self._watch: security.HandshakeWatch | None = None
        self._init_liveness(log)

    def _init_liveness(self, log: logging.Logger) -> None:
        """What the link knows of the broker's silence, its outages, and a pair's votes."""
        now = time.monotonic()
        self.heard = self.told = self._quiet_since = self._upkept_at = now
        self._last_word = now  # the last message received (a reconnection resets ``heard``)
        self.reached = False  # heard from the broker at least once
        self._outage: BrokerUnreachableError | None = None
        self._next_check = 0.0
        self._dns: str | None = None
        self._dead = False  # the socket can send nothing more: replace it
        self._connected_at = 0.0
        self._bad_input = RateLimitedLog(log)
        self._silence_log = RateLimitedLog(log, burst=1, period=10.0)
        # A broker pair: the vote we carry (when we left a silent broker, and how long
        # it had been silent), what to do about the last STANDBY, and when.
        self._vote: tuple[float, float] | None = None
        self._standbys = 0  # STANDBY answers since the last WELCOME
        self._standby_at: float | None = None  # the last one, for cause()
        self._move_at: float | None = None
        self._retry_here = False

    # -- connection -----------------------------------------------------------------------

    def connect(self) -> zmq.Socket[bytes]:
        """(Re)open the socket and say HELLO; returns the new socket."""
        self._close_socket()
        self._dead = False
        self._connected_at = time.monotonic()
        self._dns = _unresolvable(self.address)
        if self._dns is not None:
            self._silence_log.warning("cannot reach the broker at %s: %s", self.address, self._dns)
        sock = connect_dealer(
            self._context,
            self.address,
            identity=self.identity,
            linger_ms=self._linger_ms,
            keys=self.keys,
            max_message_size=self.max_message_size,
        )
        self._watch = security.HandshakeWatch(sock, self._log, self.keys)
        self.socket = sock
        if self._on_socket is not None:
            self._on_socket(sock)
        self.heard = time.monotonic()
        self.hello()
        return sock

    def hello(self) -> None:
        self.welcomed = False
        hello = self._hello()
        if self._vote is not None:
            hello = dataclasses.replace(hello, left_silent=round(max(self._vote[1], 0.001), 3))
        self.send(p.encode_hello(hello))

    def _next_address(self) -> None:
        self._at = (self._at + 1) % len(self.addresses)
        self.address = self.addresses[self._at]

    def close(self, linger_ms: int = 0) -> None:
        self._close_socket(linger_ms)
        self._context.term()

    def _close_socket(self, linger_ms: int = 0) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self.socket is not None:
            if self._on_socket is not None:
                self._on_socket(None)
            self.socket.close(linger=linger_ms)
            self.socket = None

    # -- output ---------------------------------------------------------------------------

    def send(self, frames: list[p.Frame]) -> None:
        """Queue a message for the broker, never blocking. A socket that cannot take it
        has lost its connection for good (libzmq ends a connection that received an
        oversized frame, or whose handshake failed): the message is dropped, and the
        socket is replaced at the next upkeep; the owner re-sends what it must after
        the WELCOME that follows."""
        sock = self.socket
        assert sock is not None
        if self._dead:
            return
        try:
            send_frames(sock, frames, block=False)
        except zmq.Again:
            self._dead = True
            self._silence_log.warning(
                "the connection to the broker at %s is gone for good (a handshake refused, "
                "or a frame over a peer's --max-message-size); opening a new one",
                self.address,
            )
            return
        self.told = time.monotonic()

    def submit(self, tasks: list[tuple[p.SubmitRecord, p.Payload]]) -> None:
        """Send tasks in one SUBMIT (LocalLink hands them over as records instead)."""
        self.send(p.encode_submit(tasks))

    # -- input ----------------------------------------------------------------------------

    def read(self, sock: zmq.Socket[bytes], known: bool = False, most: int = 1 << 30) -> None:
        """Handle up to ``most`` waiting messages; ``known``: a poll just saw one, so the
        first needs no check (asking EVENTS costs less than the zmq.Again a drained
        socket raises)."""
        while most > 0 and (known or has_input(sock)):
            known = False
            most -= 1
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            try:
                message = p.parse(frames)
                if message.command is _STANDBY:
                    self.heard = time.monotonic()  # alive, but not serving: not an answer
                else:
                    self._heard_now()
                self._handle(message)
            except ProtocolError as exc:
                self._heard_now()
                self._bad_input.warning("dropped a message from the broker: %s", exc)
            if sock is not self.socket:
                return  # a handler replaced the socket

    def _heard_now(self) -> None:
        self.heard = self._last_word = time.monotonic()
        self.reached = True
        if self._outage is not None:
            self._log.info("the broker at %s answers again", self.address)
            self._outage = None
            self._on_unreachable(None)

    def _handle(self, message: p.Message) -> None:
        command = message.command
        if command is p.Command.WELCOME:
            welcome = p.decode_welcome(message.body)
            self.interval = welcome.heartbeat_interval
            self.expiry = p.expiry(welcome.heartbeat_interval, welcome.heartbeat_liveness)
            self.broker_max_message_size = welcome.max_message_size
            self.welcomed = True
            self._vote = self._move_at = None
            self._standbys = 0
            self._on_welcome(welcome)
        elif command is p.Command.STANDBY:
            self._on_standby(p.decode_standby(message.body))
        elif command is p.Command.RESET:
            self._log.info("the broker does not know us (it may have restarted); registering again")
            self.hello()
        elif command is p.Command.ERROR:
            self._on_error(message)
        else:
            handler = self._handlers.get(command)
            if handler is None:
                raise ProtocolError(f"{command.name} is not for this peer")
            handler(message)

    def _on_standby(self, standby: p.Standby) -> None:
        """A passive broker of a pair: say HELLO again later, here or at the next one."""
        now = time.monotonic()
        self.welcomed = False
        self._standby_at = now
        vote = self._vote
        if standby.retry > 0 and vote is not None and now - vote[0] <= 2 * self.expiry:
            # It expects to serve us soon: it has not lost the other broker yet, and we
            # say the other is gone.
            self._move_at, self._retry_here = now + standby.retry, True
            return
        self._vote = None  # a vote is for the broker we left for silence, not this one
        self._standbys += 1
        if len(self.addresses) == 1:
            self._move_at, self._retry_here = now + self.interval, True
            return
        if self._standbys == 1:  # once per failover, not at every round
            self._log.info("the broker at %s stands by; trying the next one", self.address)
        # Neither serves after a full round: the pair is settling; do not spin.
        wait = self.interval if self._standbys >= len(self.addresses) else 0.0
        self._move_at, self._retry_here = now + wait, False

    def _on_error(self, message: p.Message) -> None:
        reason = p.decode_error(message.body)
        if message.version != p.VERSION:
            self._on_fatal(
                ProtocolVersionError(
                    f"this peer speaks fade protocol version {p.VERSION} (fade {__version__}); "
                    f"the broker at {self.address} speaks version {message.version}: {reason}"
                )
            )
            return
        self._bad_input.warning("the broker refused a message: %s", reason)

    # -- timed work -----------------------------------------------------------------------

    def upkeep(self, now: float) -> None:
        """Heartbeat when due; replace a socket whose broker went silent; report a broker
        that cannot be reached. Never blocks."""
        self._forgive_own_stall(now)
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL
            if self._watch is not None:
                self._watch.check()
        if self._move_at is not None and now >= self._move_at:
            self._move_at = None
            if self._retry_here:
                self.hello()
            else:
                self._next_address()
                self.connect()
        elif now - self.heard > self.expiry:
            self._report_silence(now)
            if len(self.addresses) > 1:
                self._vote = (now, now - self.heard)
                self._next_address()
            self.connect()
        elif self._dead:
            if now - self._connected_at >= self.interval:  # not in a tight loop
                self.connect()
        elif now - self.told >= self.interval:
            self.send(p.encode(p.Command.HEARTBEAT))
        self._check_outage(now)

    def _forgive_own_stall(self, now: float) -> None:
        """Upkeep runs at least once an interval. When it comes later than that by more
        than an interval, this thread did not run (the process was stopped, or code
        holding the GIL kept it out: a task, the client's own; or the host slept): what
        the broker sent meanwhile waits unread, and its silence must not count, towards
        a reconnection or an outage."""
        late = now - self._upkept_at - self.interval
        self._upkept_at = now
        if late > self.interval:
            self.heard += late
            self._last_word += late
            self._quiet_since += late

    def poll_timeout(self, now: float) -> float:
        """Seconds until upkeep has something to do (at most one interval)."""
        due = min(self.told + self.interval, self.heard + self.expiry)
        if self._move_at is not None:
            due = min(due, self._move_at)
        if self._dead:
            due = min(due, self._connected_at + self.interval)
        return max(0.0, min(due - now, self.interval))

    def _report_silence(self, now: float) -> None:
        silent = now - self._last_word
        if len(self.addresses) > 1:
            self._silence_log.warning(
                "the broker at %s has been silent for %.1fs; trying the next one",
                self.address,
                now - self.heard,
            )
        elif self.reached:
            self._silence_log.warning(
                "the broker at %s has been silent for %.1fs; reconnecting", self.address, silent
            )
        else:
            self._silence_log.warning(
                "no answer yet from a broker at %s (%.1fs); is it running there?",
                self.address,
                now - self._quiet_since,
            )

    def _check_outage(self, now: float) -> None:
        if self._outage is not None:
            return
        if self.reached:
            if now - self._last_word <= self.reconnect_timeout:
                return
            what = f"stopped answering {now - self._last_word:.0f}s ago"
        else:
            if now - self._quiet_since <= self.connect_timeout:
                return
            what = f"never answered in {now - self._quiet_since:.0f}s"
        self._outage = BrokerUnreachableError(
            f"the broker at {self.address} {what}: {self.cause()}"
        )
        self._log.error("%s", self._outage)
        self._on_unreachable(self._outage)

    def cause(self) -> str:
        if self._dns is not None:
            return self._dns
        handshake = self._watch.last_problem if self._watch is not None else None
        if handshake is not None:
            return handshake
        if self._standby_at is not None and time.monotonic() - self._standby_at < 2 * self.expiry:
            return (
                "the brokers answer that they stand by: neither is active (they cannot "
                "see each other, or the active one cannot be reached from here)"
            )
        return (
            "it is not running, not at that address, or not reachable from here "
            "(a firewall, a wrong host or port)"
        )

    def reset_outage_clock(self) -> None:
        """Count a new wait from now (e.g. the owner has new work after an outage)."""
        self._quiet_since = time.monotonic()
