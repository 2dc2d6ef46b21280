"""The broker: one ROUTER socket, one poll loop, no threads; decisions are the scheduler's.

::

    clients (DEALER)            broker (ROUTER)                         workers (DEALER)
      SUBMIT ----> handler --> Scheduler (fade/scheduler.py) ---- TASK ------> run
      RESULT <---- flush <---- Sends: tasks per worker,      <--- DONE(credits) --
                               results per client

* The loop: poll the socket (and the ZAP socket, and a wake-up pipe), hand each
  message to ``_on_<command>``, which checks it and calls the scheduler; then
  the Outbox (fade/brokerout.py) sends what the scheduler decided, and, when due,
  timed work runs (fade/brokerupkeep.py): expiry, heartbeats, key re-reads, the
  published snapshot.
* Around the loop, each in its own module: the sockets and their context
  (fade/brokersockets.py), FETCH/CODE routing (fade/coderelay.py), what departing
  peers log and tell the scheduler (fade/departures.py), the surface for a loop that
  drives this broker itself (fade/brokerlocal.py), the pair (fade/brokerpair.py).
* Payloads are forwarded as the frames they arrived in: never unpickled, never
  copied. Batches are cut to each receiver's frame limit (said in its HELLO).
* Every message from a peer counts as a heartbeat; peers silent for
  interval x liveness are expired (fade/liveness.py). Peers follow the interval
  and liveness this broker announces in WELCOME.
* With keys (``--keys DIR``) only authorised CurveZMQ keys connect, and every
  message is checked against its key's role (fade/security.py). Without keys
  the broker serves only loopback or ipc addresses, unless told ``insecure``.
* No peer learns another's routing identity: workers see task keys (a client's
  tag, bound to that client, and a task id), clients see relay numbers for code
  requests, and status shows short ids that are hashes of identities.
* Bad input is dropped, logged (rate-limited) and, if its sender speaks fade,
  answered with ERROR in a version it can read; replies are rate-limited too.
* With ``peer`` (``--peer ADDRESS``) it is one broker of a pair (fade/pair.py): it
  serves only while its pair's state is ACTIVE; otherwise it answers clients and
  workers STANDBY and keeps no state of theirs. Its reports reach the other broker
  through a PairLink (fade/pairlink.py) and are read here, by ``_on_pair``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from fade import departures, security
from fade import protocol as p
from fade._logutil import RateLimitedLog
from fade._rate import Throughput
from fade._version import __version__
from fade.brokerlocal import LocalDuties
from fade.brokerout import Outbox
from fade.brokerpair import PairDuties
from fade.brokersockets import BrokerSockets
from fade.brokerupkeep import MIN_UPKEEP_GAP, UpkeepDuties
from fade.coderelay import CodeRelay
from fade.departures import peer_name, worker_name
from fade.errors import ProtocolError
from fade.liveness import Liveness
from fade.pair import Pair, Role
from fade.pairlink import PairLink
from fade.scheduler import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_CLIENT_BYTES,
    DEFAULT_MAX_CLIENT_TASKS,
    Refusal,
    Scheduler,
)
from fade.snapshot import snapshot
from fade.sockets import DEFAULT_MAX_MESSAGE_SIZE, has_input, recv_frames

__all__ = ["Broker", "main"]

log = logging.getLogger("fade.broker")

#: Seconds between the snapshots the HTTP endpoint serves.
PUBLISH_INTERVAL = 1.0
#: Seconds between the repeated warnings of a broker started with ``insecure``.
INSECURE_WARNING_PERIOD = 60.0
#: The first byte of the identities ZeroMQ makes up (0, then a counter); fade's peers
#: name themselves, each identity starting with its role (fade/launch.py).
MADE_UP = b"\x00"


class Broker(PairDuties, UpkeepDuties, LocalDuties):
    """A fade broker bound to ``address``. Call :meth:`run`; :meth:`stop` ends it."""

    def __init__(
        self,
        address: str = p.DEFAULT_ADDRESS,
        *,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        parent_pid: int | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        insecure_warning_period: float = INSECURE_WARNING_PERIOD,
        weights: dict[str, float] | None = None,
        max_client_tasks: int = DEFAULT_MAX_CLIENT_TASKS,
        max_client_bytes: int = DEFAULT_MAX_CLIENT_BYTES,
        own_context: bool = False,
        peer: str | None = None,
        backup: bool = False,
    ) -> None:
        if heartbeat_interval <= 0 or heartbeat_liveness < 1:
            raise ValueError("heartbeat interval must be > 0 and liveness >= 1")
        if max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 byte")
        self.gate = security.Gate(
            address,
            keys,
            insecure,
            interval=heartbeat_interval,
            warning_period=insecure_warning_period,
            pair=peer is not None,
        )
        self.max_message_size = max_message_size
        self.address = address
        self.broker_id = uuid.uuid4().hex
        self.interval = heartbeat_interval
        self.liveness = heartbeat_liveness
        self.max_attempts = max_attempts
        self._limits = (weights, max_client_tasks, max_client_bytes)
        self.scheduler = self._new_scheduler()
        self._parent_pid = parent_pid
        self._sockets = BrokerSockets(self.gate, context, own_context)
        self._init_loop()
        self._init_roles(peer, backup)

    def _init_loop(self) -> None:
        """The loop's state: clocks, outbox, code relay, timed work, what it publishes."""
        expiry = p.expiry(self.interval, self.liveness)
        self._clocks = Liveness(self.interval, expiry)
        # Through self: a broker of a pair replaces its clocks when it stands by.
        self._out = Outbox(lambda identity, now: self._clocks.told(identity, now))
        #: Payload bytes sent on, by kind (the outbox counts them; status shows them).
        self.relayed = self._out.relayed
        self._sender: security.Peer | None = None  # the key of the message being handled
        self._replies = security.ReplyLimiter(self.interval)
        self._stopping = False
        self._bad_input = RateLimitedLog(log)
        self.started = time.monotonic()
        self.throughput = Throughput(self.started)
        self._init_upkeep(self.started)
        self._code = CodeRelay(self._out, self._orphan_age)

    def _init_roles(self, peer: str | None, backup: bool) -> None:
        """Alone, or one broker of a pair with the broker at ``peer`` (fade/brokerpair.py)."""
        #: The pair this broker is one of (None: it serves alone, always).
        self.pair: Pair | None = None
        self.peer_address = peer
        self._pair_link: PairLink | None = None
        self._init_pair()
        self._handlers = self._HANDLERS
        if peer is not None:
            role = Role.BACKUP if backup else Role.PRIMARY
            self.pair = Pair(role, self.interval, self.liveness, time.monotonic())
            self._handlers = self._STANDBY_HANDLERS

    @property
    def tasks_done(self) -> int:
        return self.scheduler.counts.done

    # -- life cycle ---------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the ROUTER socket; returns the endpoint actually bound."""
        keepalive = (max(1, round(self.interval)), self.liveness)
        sock = self._sockets.bind(self.address, self.max_message_size, keepalive)
        self._out.socket = sock
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("fade-broker %s listening on %s", __version__, endpoint)
        if self.pair is not None and self.peer_address is not None:
            self._pair_link = self._sockets.pair_link(
                self.pair, self.peer_address, self.interval, self._clocks.expiry
            )
        self.gate.warn_if_insecure(time.monotonic())
        return endpoint

    def stop(self) -> None:
        """Ask the loop to end after its current pass; safe from a signal handler."""
        self._stopping = True
        self._sockets.wake.wake()

    def close(self) -> None:
        if self._pair_link is not None:
            self._pair_link.close()
            self._pair_link = None
        self._out.socket = None
        self._sockets.close()

    def run(self) -> None:
        """Serve until :meth:`stop` is called (or the parent process dies)."""
        if self._out.socket is None:
            self.bind()
        sock = self._out.socket
        assert sock is not None
        poller = self._sockets.poller()
        zap = self.gate.zap
        pair = self.pair
        next_upkeep = time.monotonic()
        try:
            while not self._stopping:
                timeout = max(0.0, next_upkeep - time.monotonic())
                events = dict(poller.poll(math.ceil(timeout * 1000)))
                if pair is not None:
                    self._check_stall(pair, next_upkeep)
                if zap is not None and events.get(zap.socket):
                    zap.handle()
                if events.get(sock):
                    self._drain_socket(sock)
                    if pair is not None and self.upkeep_by < next_upkeep:
                        next_upkeep = self.upkeep_by
                now = time.monotonic()
                # Timed work only when some is due: a busy broker would otherwise spend
                # as long on it as on the messages themselves.
                if now >= next_upkeep:
                    if not self._upkeep(now):
                        break
                    next_upkeep = now + max(self._poll_timeout(now), MIN_UPKEEP_GAP)
        finally:
            self.close()

    def _drain_socket(self, sock: zmq.Socket[bytes]) -> None:
        """Handle the message the poll saw and, unless at most one task is in the pool,
        whatever else waits (up to a bound). Checking for more costs a system call per
        message: under load it batches results; a lone task has nothing to batch with,
        and the next poll sees any message that came meanwhile."""
        try:
            frames = recv_frames(sock)
        except zmq.Again:
            return
        self._handle(frames)
        if len(self.scheduler.tasks) > 1:
            for _ in range(999):
                if not has_input(sock):
                    break
                self._handle(recv_frames(sock))
        self._flush()

    # -- dispatch on command --------------------------------------------------------------

    def _handle(self, frames: Sequence[zmq.Frame]) -> None:
        if len(frames) < 2:
            self._bad_input.warning("dropped a message with no body")
            return
        identity = frames[0].bytes
        try:
            message = p.parse(frames[1:])  # a newer peer's version is answered first
            if identity[:1] == MADE_UP and message.command is not p.Command.STATUS:
                self._made_up(identity, message)
                return
            self._sender = self.gate.check(frames[0], identity, message)
            self._clocks.heard(identity, time.monotonic())
            handler = self._handlers.get(message.command)
            if handler is None:
                raise ProtocolError(f"{message.command.name} is not for the broker")
            handler(self, identity, message.body)
        except (ProtocolError, Refusal) as exc:  # a Refused or a VersionMismatch, too
            self._dropped(identity, frames[1], exc)
        finally:
            self._sender = None

    def _made_up(self, identity: bytes, message: p.Message) -> None:
        """A message under an identity ZeroMQ made up, dropped. Mostly what was left in a
        connection whose identity its peer took over when it reconnected
        (ROUTER_HANDOVER): ZeroMQ renames the old one and hands us the rest of it. That
        is stale (the peer says on its new connection what counts: HELLO, what it
        holds), and taken for a peer of its own it became a worker that was never
        there, which tasks went to and were lost. Else a socket that set no identity
        (a peer must: the broker knows it by it across reconnections): its HELLO is told
        why. STATUS, which registers nothing, is answered."""
        log.debug("dropped a %s under an identity ZeroMQ made up", message.command.name)
        if message.command is p.Command.HELLO:
            self._answer_error(
                identity,
                "a peer must set a routing identity of its own on its socket "
                "(zmq.IDENTITY; docs/protocol.md)",
            )

    def _dropped(self, identity: bytes, head: zmq.Frame, exc: Exception) -> None:
        """Log a dropped message (rate-limited); answer ERROR if its sender can read it."""
        verb = "refused" if isinstance(exc, security.Refused) else "dropped"
        self._bad_input.warning("%s a message from %s: %s", verb, p.short_id(identity), exc)
        if isinstance(exc, security.Refused) and exc.revoked:
            self._on_disconnect(identity, [])
        answer = _error_reply(exc, head)
        if answer is not None:
            self._answer_error(identity, *answer)

    def _answer_error(self, identity: bytes, reason: str, version: int = p.VERSION) -> None:
        """Tell a peer why its message was dropped (rate-limited, and no heartbeat follows)."""
        if self._replies.allow(identity):
            self._send(identity, p.encode_error(reason, version))
            if not self._known(identity):
                self._clocks.forget(identity)

    def _known(self, identity: bytes) -> bool:
        return identity in self.scheduler.workers or identity in self.scheduler.clients

    def _key_name(self) -> str | None:
        return self._sender.name if self._sender is not None else None

    def _on_hello(self, identity: bytes, body: list[p.Frame]) -> None:
        hello = p.decode_hello(body)
        sched = self.scheduler
        if isinstance(hello, p.WorkerHello):
            new = identity not in sched.workers
            worker = sched.add_worker(identity, hello, self._key_name())
            if new:
                log.info("worker %s joined; %d workers", worker_name(worker), len(sched.workers))
        else:
            new = identity not in sched.clients
            sched.add_client(identity, hello, self._key_name())
            if new:
                who = peer_name(identity, hello)
                log.info("client %s connected; %d clients", who, len(sched.clients))
        welcome = p.Welcome(
            self.broker_id,
            self.interval,
            self.liveness,
            sched.capacity,
            self.max_message_size,
            sched.max_client_tasks,
        )
        self._send(identity, p.encode_welcome(welcome))

    def _on_heartbeat(self, identity: bytes, body: list[p.Frame]) -> None:
        backlog = p.decode_backlog(body)
        if not self._known(identity):
            self._reset(identity)
            return
        client = self.scheduler.clients.get(identity)
        if client is not None and backlog is not None:
            client.backlog = backlog  # for fade-status and scalers (fade/scale)

    def _on_ready(self, identity: bytes, body: list[p.Frame]) -> None:
        credits = p.decode_ready(body)
        if identity not in self.scheduler.workers:
            self._reset(identity)
            return
        self.scheduler.grant(identity, credits)

    def _on_submit(self, identity: bytes, body: list[p.Frame]) -> None:
        tasks = p.decode_submit(body)
        if identity not in self.scheduler.clients:
            # Unknown client (e.g. this broker restarted): it will re-send
            # everything after the WELCOME that follows our RESET.
            self._reset(identity)
            return
        self.scheduler.submit(identity, tasks)
        if self._code.parked:
            self._code.unpark(self.scheduler, time.monotonic())

    def _on_terminate(self, identity: bytes, body: list[p.Frame]) -> None:
        task_ids = p.decode_terminate(body)
        if identity not in self.scheduler.clients:
            self._reset(identity)
            return
        self.scheduler.terminate(identity, task_ids)

    def _on_done(self, identity: bytes, body: list[p.Frame]) -> None:
        credits, results = p.decode_done(body)
        sched = self.scheduler
        returned = sched.done(identity, results)
        worker = sched.workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        if returned:
            log.info(
                "worker %s handed back %d unstarted tasks; re-queued them",
                worker_name(worker),
                returned,
            )
        sched.grant(identity, credits)

    def _on_drain(self, identity: bytes, body: list[p.Frame]) -> None:
        p.decode_drain(body)
        worker = self.scheduler.workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        self.scheduler.drain(identity)
        log.info("worker %s is draining (%d tasks held)", worker_name(worker), len(worker.tasks))
        # Messages on one connection are ordered: once this DRAIN reaches the
        # worker, it knows no further TASK is on its way.
        self._send(identity, p.encode(p.Command.DRAIN))

    def _on_disconnect(self, identity: bytes, body: list[p.Frame]) -> None:
        departures.leave(self.scheduler, identity)
        self._clocks.forget(identity)

    def _on_obituary(self, identity: bytes, body: list[p.Frame]) -> None:
        dead, info = p.decode_obituary(body)
        if departures.obituary(self.scheduler, dead, info):
            self._clocks.forget(dead)

    def _on_alive(self, identity: bytes, body: list[p.Frame]) -> None:
        """A supervisor vouches for its worker processes: they live and run (not stopped),
        so one silent meanwhile is busy, not gone: a task holding the GIL in native code
        keeps its heartbeats from being sent, not its process from working."""
        now = time.monotonic()
        workers = self.scheduler.workers
        for worker in p.decode_alive(body):
            if worker in workers:
                self._clocks.heard(worker, now)
        if not self._known(identity):
            self._clocks.forget(identity)  # a supervisor: no heartbeats, no expiry

    def _on_fetch(self, identity: bytes, body: list[p.Frame]) -> None:
        """A worker asks for the code of a task it holds (fade/coderelay.py)."""
        key, request_id, request = p.decode_fetch(body)
        worker = self.scheduler.workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        self._code.fetch(self.scheduler, worker, key, request_id, request, time.monotonic())

    def _on_code(self, identity: bytes, body: list[p.Frame]) -> None:
        """A client answers a FETCH (fade/coderelay.py)."""
        ref, request_id, status, frames = p.decode_code(body)
        if identity not in self.scheduler.clients:
            self._reset(identity)
            return
        self._code.answer(self.scheduler, identity, ref, request_id, status, frames)

    def _on_environments(self, identity: bytes, body: list[p.Frame]) -> None:
        """A worker's package environments and cache, kept for fade-status."""
        report = p.decode_environments(body)
        worker = self.scheduler.workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        worker.environments = report

    def _on_status(self, identity: bytes, body: list[p.Frame]) -> None:
        p.decode_status(body)
        self._send(identity, p.encode_state(self.snapshot()))
        if not self._known(identity):
            # An operator's one-off question: keep no heartbeat state for it.
            self._clocks.forget(identity)

    _HANDLERS = {
        p.Command.HELLO: _on_hello,
        p.Command.HEARTBEAT: _on_heartbeat,
        p.Command.READY: _on_ready,
        p.Command.SUBMIT: _on_submit,
        p.Command.TERMINATE: _on_terminate,
        p.Command.DONE: _on_done,
        p.Command.DRAIN: _on_drain,
        p.Command.DISCONNECT: _on_disconnect,
        p.Command.OBITUARY: _on_obituary,
        p.Command.ALIVE: _on_alive,
        p.Command.FETCH: _on_fetch,
        p.Command.CODE: _on_code,
        p.Command.ENVIRONMENTS: _on_environments,
        p.Command.STATUS: _on_status,
    }

    #: A broker of a pair that serves: as alone, and its pair's reports (fade/brokerpair.py).
    _ACTIVE_HANDLERS = {
        **_HANDLERS,
        p.Command.HELLO: PairDuties._on_hello_active,
        p.Command.PAIR: PairDuties._on_pair,
    }
    #: A broker of a pair that does not serve keeps nothing of any client or worker.
    _STANDBY_HANDLERS = {
        **dict.fromkeys(_HANDLERS, PairDuties._on_standby),
        p.Command.HELLO: PairDuties._on_hello_standby,
        p.Command.STATUS: _on_status,
        p.Command.PAIR: PairDuties._on_pair,
        p.Command.OBITUARY: PairDuties._on_ignored,
        p.Command.ALIVE: PairDuties._on_ignored,
        p.Command.DISCONNECT: PairDuties._on_ignored,
    }

    def _new_scheduler(self) -> Scheduler:
        weights, max_tasks, max_bytes = self._limits
        return Scheduler(
            self.max_attempts,
            weights=weights,
            max_client_tasks=max_tasks,
            max_client_bytes=max_bytes,
        )

    def _forget_relays(self) -> None:
        self._code.forget()

    # -- peers ----------------------------------------------------------------------------

    def _reset(self, identity: bytes) -> None:
        """Tell a peer we do not know it, so that it says HELLO again (rate-limited)."""
        if self._replies.allow(identity):
            self._send(identity, p.encode(p.Command.RESET))
        if not self._known(identity):
            self._clocks.forget(identity)

    # -- output (fade/brokerout.py) -------------------------------------------------------

    def _flush(self) -> None:
        """Send what the scheduler decided."""
        self._out.flush(self.scheduler)

    def _send(self, identity: bytes, frames: list[p.Frame]) -> None:
        self._out.send(identity, frames)

    # -- introspection (tests, status) ----------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The pool's state as JSON-ready data (fade/snapshot.py)."""
        return snapshot(self)

    def last_heard(self, identity: bytes, default: float) -> float:
        return self._clocks.last_heard(identity, default)


def _error_reply(exc: Exception, head: zmq.Frame) -> tuple[str, int] | None:
    """The ERROR that answers a message dropped for ``exc``, as (reason, version) in a
    version its sender reads; None if it gets none (it does not speak fade, or is an
    ERROR itself: two peers must not answer each other's errors forever)."""
    if isinstance(exc, security.Refused):
        return str(exc), p.VERSION
    if isinstance(exc, p.VersionMismatch):
        reply = min(exc.version, p.VERSION) if exc.version <= p.LAST_STRICT_VERSION else None
        return _version_text(exc.version), reply or p.VERSION
    if p.speaks_fade(head) and _header_byte(head) != p.Command.ERROR:
        return str(exc), p.VERSION
    return None


def _header_byte(frame: zmq.Frame) -> int:
    return frame.bytes[3] if len(frame) == 4 else -1


def _version_text(version: int) -> str:
    return (
        f"protocol version {version} is not spoken here: this broker (fade {__version__}) "
        f"speaks protocol version {p.VERSION}; use the same fade version on every peer"
    )


# -- command line: fade/brokercli.py ------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fade-broker`` (the command line lives in fade/brokercli.py)."""
    from fade.brokercli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
