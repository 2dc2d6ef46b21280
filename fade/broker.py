"""The broker: one ROUTER socket, one poll loop, no threads; decisions are the scheduler's.

::

    clients (DEALER)            broker (ROUTER)                         workers (DEALER)
      SUBMIT ----> handler --> Scheduler (fade/scheduler.py) ---- TASK ------> run
      RESULT <---- flush <---- Sends: tasks per worker,      <--- DONE(credits) --
                               results per client

* The loop: poll the socket (and the ZAP socket, and a wake-up pipe), hand each
  message to ``_on_<command>``, which checks it and calls the scheduler; then
  :meth:`Broker._flush` sends what the scheduler decided, and, when due, timed
  work runs: expiry, heartbeats, key re-reads, the published snapshot.
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

import collections
import itertools
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from fade import protocol as p
from fade import security
from fade._logutil import RateLimitedLog, printable
from fade._rate import Throughput
from fade._version import __version__
from fade.brokerpair import PairDuties
from fade.data import scope_of
from fade.errors import ProtocolError
from fade.liveness import Liveness
from fade.pair import Pair, Role
from fade.pairlink import PairLink
from fade.peers import Task, Worker
from fade.scheduler import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_CLIENT_BYTES,
    DEFAULT_MAX_CLIENT_TASKS,
    Refusal,
    Scheduler,
)
from fade.snapshot import snapshot
from fade.sockets import (
    DEFAULT_MAX_MESSAGE_SIZE,
    bind_router,
    has_input,
    recv_frames,
    send_frames,
)
from fade.wakeup import WakePipe

if TYPE_CHECKING:
    pass

__all__ = ["Broker", "main"]

log = logging.getLogger("fade.broker")

#: Seconds between two rounds of timed work (expiry, heartbeats), at least.
MIN_UPKEEP_GAP = 0.001
#: Seconds between the snapshots the HTTP endpoint serves.
PUBLISH_INTERVAL = 1.0
#: Seconds between the repeated warnings of a broker started with ``insecure``.
INSECURE_WARNING_PERIOD = 60.0
#: Code requests relayed to clients and not yet answered, at most (the oldest are forgotten).
MAX_RELAYS = 65536
#: Results a worker sent for tasks whose clients have not re-sent them yet (a fresh broker)
#: are kept for one to two of these (in seconds, at least two expiries): clients re-send
#: everything at once after their WELCOME.
ORPHAN_AGE = 5.0


class Broker(PairDuties):
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
        self._weights = weights
        self._max_client_tasks = max_client_tasks
        self._max_client_bytes = max_client_bytes
        self.scheduler = self._new_scheduler()
        self._clocks = Liveness(
            heartbeat_interval, p.expiry(heartbeat_interval, heartbeat_liveness)
        )
        #: The pair this broker is one of (None: it serves alone, always).
        self.pair: Pair | None = None
        self.peer_address = peer
        self._pair_link: PairLink | None = None
        self._init_pair()
        self._handlers = self._HANDLERS
        if peer is not None:
            role = Role.BACKUP if backup else Role.PRIMARY
            self.pair = Pair(role, heartbeat_interval, heartbeat_liveness, time.monotonic())
            self._handlers = self._STANDBY_HANDLERS
        self._parent_pid = parent_pid
        # ZAP's endpoint is one per context: a broker with keys gets a context of its own.
        self._own_context = own_context or (context is None and self.gate.keys is not None)
        self._context = context or (zmq.Context() if self._own_context else zmq.Context.instance())
        self._socket: zmq.Socket[bytes] | None = None
        self._sender: security.Peer | None = None  # the key of the message being handled
        self._replies = security.ReplyLimiter(heartbeat_interval)
        self._stopping = False
        self._wake = WakePipe()  # stop() may be called from a signal handler
        self._bad_input = RateLimitedLog(log)
        self._relays = _Relays()
        self._local: dict[bytes, Callable[[list[p.Frame]], None]] = {}
        self._local_results: dict[
            bytes, Callable[[int, list[tuple[p.ResultRecord, p.Payload]]], None]
        ] = {}
        self._next_upkeep = 0.0
        #: Payload bytes this broker sent on: to workers in TASK, to clients in RESULT,
        #: and relayed in CODE (shipped code and data fetched by content).
        self.relayed = {"task": 0, "result": 0, "code": 0}
        self._parked = _Parked()
        self.started = time.monotonic()
        self.throughput = Throughput(self.started)
        #: Seconds between snapshots published for other threads (None: never).
        self.publish_interval: float | None = None
        #: The latest published snapshot. The loop replaces it whole and never
        #: changes one it has published, so a reader thread needs no lock.
        self.published: dict[str, Any] | None = None
        self._next_publish = 0.0
        self._orphan_age = max(ORPHAN_AGE, 2 * self._clocks.expiry)
        self._next_ageing = self.started + self._orphan_age

    @property
    def socket(self) -> zmq.Socket[bytes] | None:
        """The ROUTER, once bound (for a loop that drives this broker itself)."""
        return self._socket

    @property
    def tasks_done(self) -> int:
        return self.scheduler.counts.done

    # -- life cycle ---------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the ROUTER socket; returns the endpoint actually bound."""
        self.gate.open(self._context)
        try:
            sock = bind_router(
                self._context,
                self.address,
                keys=self.gate.keys,
                max_message_size=self.max_message_size,
                keepalive=(max(1, round(self.interval)), self.liveness),
            )
        except zmq.ZMQError:
            self._close_security()
            raise
        self._socket = sock
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("fade-broker %s listening on %s", __version__, endpoint)
        if self.pair is not None and self.peer_address is not None:
            self._pair_link = PairLink(
                self._context,
                self.peer_address,
                keys=self.gate.keys,
                interval=self.interval,
                expiry=self._clocks.expiry,
                log=log,
            )
            log.info(
                "the %s of a pair with the broker at %s; serving no one until the pair "
                "agrees that this one is active",
                self.pair.role.value,
                self.peer_address,
            )
        self.gate.warn_if_insecure(time.monotonic())
        return endpoint

    def stop(self) -> None:
        """Ask the loop to end after its current pass; safe from a signal handler."""
        self._stopping = True
        self._wake.wake()

    def close(self) -> None:
        if self._pair_link is not None:
            self._pair_link.close()
            self._pair_link = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            self._wake.close()
        self._close_security()

    def _close_security(self) -> None:
        self.gate.close()
        if self._own_context:
            self._own_context = False
            self._context.term()

    def run(self) -> None:
        """Serve until :meth:`stop` is called (or the parent process dies)."""
        if self._socket is None:
            self.bind()
        sock = self._socket
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake.fd, zmq.POLLIN)
        zap = self.gate.zap
        if zap is not None:
            poller.register(zap.socket, zmq.POLLIN)
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

    def _upkeep(self, now: float) -> bool:
        """Expire, heartbeat, publish and re-read keys; False if our parent is gone."""
        self.throughput.record(now, self.tasks_done)
        if self.pair is not None:
            self._pair_upkeep(self.pair, now)
        self._purge_silent_peers(now)
        self._send_due_heartbeats(now)
        self._publish(now)
        if now >= self._next_ageing:
            self._next_ageing = now + self._orphan_age
            self.scheduler.age_orphans()
        if self._parked:
            self._unpark(now)
        self._drop_revoked(now)
        self.gate.warn_if_insecure(now)
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            log.info("parent process %d is gone; stopping", self._parent_pid)
            return False
        return True

    def _poll_timeout(self, now: float) -> float:
        due = self._clocks.next_due(now)
        if self.publish_interval is not None:
            due = min(due, max(0.0, self._next_publish - now))
        if self.pair is not None:
            due = min(due, self._pair_due(self.pair, now))
        return due

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
            message = p.parse(frames[1:])
            self._sender = self.gate.check(frames[0], identity, message)
            self._clocks.heard(identity, time.monotonic())
            handler = self._handlers.get(message.command)
            if handler is None:
                raise ProtocolError(f"{message.command.name} is not for the broker")
            handler(self, identity, message.body)
        except security.Refused as exc:
            self._bad_input.warning("refused a message from %s: %s", p.short_id(identity), exc)
            if exc.revoked:
                self._on_disconnect(identity, [])
            self._answer_error(identity, str(exc))
        except p.VersionMismatch as exc:
            self._bad_input.warning("dropped a message from %s: %s", p.short_id(identity), exc)
            reply = min(exc.version, p.VERSION) if exc.version <= p.LAST_STRICT_VERSION else None
            self._answer_error(identity, _version_text(exc.version), reply or p.VERSION)
        except (ProtocolError, Refusal) as exc:
            self._bad_input.warning("dropped a message from %s: %s", p.short_id(identity), exc)
            if p.speaks_fade(frames[1]) and _header_byte(frames[1]) != p.Command.ERROR:
                self._answer_error(identity, str(exc))
        finally:
            self._sender = None

    # -- a client in this very process (the embedded pool: fade/locallink.py) --------------

    def attach_local(
        self,
        identity: bytes,
        deliver: Callable[[list[p.Frame]], None],
        results: Callable[[int, list[tuple[p.ResultRecord, p.Payload]]], None],
    ) -> None:
        """Serve a client that lives in this process: what the broker sends it goes to
        ``deliver`` (in the thread that drives the broker), results to ``results`` as
        records, never through a socket; and it is never expired (it cannot be silent
        without its process being gone)."""
        self._local[identity] = deliver
        self._local_results[identity] = results

    def local_submit(self, identity: bytes, tasks: list[tuple[p.SubmitRecord, p.Payload]]) -> None:
        """A local client's tasks, as records: no SUBMIT to encode and decode."""
        if identity not in self.scheduler.clients:
            self._reset(identity)
            return
        self.scheduler.submit(identity, tasks)
        self._flush()

    def handle_local(self, identity: bytes, frames: list[p.Frame]) -> None:
        """A message from a local client, as if it had come through the socket."""
        message = p.parse(frames)
        handler = self._HANDLERS.get(message.command)
        if handler is None:
            raise ProtocolError(f"{message.command.name} is not for the broker")
        handler(self, identity, message.body)
        self._flush()

    def drain(self, sock: zmq.Socket[bytes]) -> None:
        """Handle what waits on the socket (for a loop that drives this broker itself)."""
        self._drain_socket(sock)

    def upkeep(self, now: float) -> float:
        """Timed work when it is due (for a loop that drives this broker itself); returns
        the seconds until it is due next."""
        if now >= self._next_upkeep:
            self._upkeep(now)
            self._next_upkeep = now + max(self._poll_timeout(now), MIN_UPKEEP_GAP)
        return max(0.0, self._next_upkeep - now)

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
                log.info("worker %s joined; %d workers", _name(worker), len(sched.workers))
        else:
            new = identity not in sched.clients
            sched.add_client(identity, hello, self._key_name())
            if new:
                who = _peer_name(identity, hello)
                log.info("client %s connected; %d clients", who, len(sched.clients))
        welcome = p.Welcome(
            self.broker_id, self.interval, self.liveness, sched.capacity, self.max_message_size
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
        if self._parked:
            self._unpark(time.monotonic())

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
                "worker %s handed back %d unstarted tasks; re-queued them", _name(worker), returned
            )
        sched.grant(identity, credits)

    def _on_drain(self, identity: bytes, body: list[p.Frame]) -> None:
        p.decode_drain(body)
        worker = self.scheduler.workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        self.scheduler.drain(identity)
        log.info("worker %s is draining (%d tasks held)", _name(worker), len(worker.tasks))
        # Messages on one connection are ordered: once this DRAIN reaches the
        # worker, it knows no further TASK is on its way.
        self._send(identity, p.encode(p.Command.DRAIN))

    def _on_disconnect(self, identity: bytes, body: list[p.Frame]) -> None:
        sched = self.scheduler
        worker = sched.workers.get(identity)
        if worker is not None:
            held = len(worker.tasks)
            log.info("worker %s left; re-queueing the %d tasks it held", _name(worker), held)
            sched.remove_worker(identity)
        client = sched.clients.get(identity)
        if client is not None:
            sched.remove_client(identity)
            who = _peer_name(identity, client.hello)
            log.info("client %s left; %d clients", who, len(sched.clients))
        self._clocks.forget(identity)

    def _on_obituary(self, identity: bytes, body: list[p.Frame]) -> None:
        dead, info = p.decode_obituary(body)
        worker = self.scheduler.workers.get(dead)
        if worker is not None:
            worker.exit.update({k: v for k, v in info.items() if k in ("exitcode", "signal")})
            self._lose_worker(worker, f"its process exited ({_exit_text(info)})")
            self._clocks.forget(dead)

    def _on_fetch(self, identity: bytes, body: list[p.Frame]) -> None:
        """A worker asks for the code of a task it holds: relay it to the task's client
        under a relay number (neither learns the other's identity)."""
        key, request_id, request = p.decode_fetch(body)
        worker = self.scheduler.workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        task = worker.tasks.get(key)
        if task is None and self.scheduler.holder(key) is worker:
            # A fresh broker: the worker holds the task, its client has not re-sent it
            # yet. Pass the request on when it does, rather than fail the task for it.
            self._parked.park(key, identity, request_id, request, time.monotonic())
            return
        if task is None or task.client.identity not in self.scheduler.clients:
            self._send(identity, p.encode_code(key, request_id, p.CodeStatus.GONE, []))
            return
        relay = self._relays.add(identity, key)
        self._send(task.client.identity, p.encode_fetch(relay, request_id, request))

    def _unpark(self, now: float) -> None:
        """Pass on the code requests whose tasks have come back; answer GONE to those
        whose worker left, or whose client did not come back in time. O(parked): only
        after a restart or a failover, for the few tasks fetching code then."""
        sched = self.scheduler
        for key, (asker, request_id, request, since) in list(self._parked.items()):
            worker = sched.workers.get(asker)
            task = worker.tasks.get(key) if worker is not None else None
            if task is not None and task.client.identity in sched.clients:
                del self._parked[key]
                relay = self._relays.add(asker, key)
                self._send(task.client.identity, p.encode_fetch(relay, request_id, request))
            elif worker is None or now - since > self._orphan_age:
                del self._parked[key]
                if worker is not None:
                    self._send(asker, p.encode_code(key, request_id, p.CodeStatus.GONE, []))

    def _on_code(self, identity: bytes, body: list[p.Frame]) -> None:
        """A client answers a FETCH: relay the answer to the worker that asked, if the
        task is still that worker's and this client's."""
        ref, request_id, status, frames = p.decode_code(body)
        if identity not in self.scheduler.clients:
            self._reset(identity)
            return
        asker = self._relays.take(ref)
        worker = self.scheduler.workers.get(asker[0]) if asker is not None else None
        task = worker.tasks.get(asker[1]) if worker is not None and asker is not None else None
        if worker is None or task is None or task.client.identity != identity:
            return  # the worker or its task is gone, or the relay was never this client's
        limit = worker.hello.max_message_size
        if limit and any(p.frame_size(f) > limit for f in frames):
            status = p.CodeStatus.MISSING
            frames = [f"the code has a frame over the worker's limit of {limit} bytes".encode()]
        self.relayed["code"] += sum(p.frame_size(f) for f in frames)
        self._send(worker.identity, p.encode_code(task.key, request_id, status, frames))

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
        p.Command.DISCONNECT: PairDuties._on_ignored,
    }

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(
            self.max_attempts,
            weights=self._weights,
            max_client_tasks=self._max_client_tasks,
            max_client_bytes=self._max_client_bytes,
        )

    def _forget_relays(self) -> None:
        self._relays = _Relays()
        self._parked = _Parked()

    # -- peers ----------------------------------------------------------------------------

    def _reset(self, identity: bytes) -> None:
        """Tell a peer we do not know it, so that it says HELLO again (rate-limited)."""
        if self._replies.allow(identity):
            self._send(identity, p.encode(p.Command.RESET))
        if not self._known(identity):
            self._clocks.forget(identity)

    def _lose_worker(self, worker: Worker, reason: str) -> None:
        held = len(worker.tasks)
        doomed = sum(t.losses + 1 >= t.max_attempts for t in worker.tasks.values())
        log.warning(
            "worker %s lost (%s); re-queueing %d of the %d tasks it held",
            _name(worker),
            reason,
            held - doomed,
            held,
        )
        for task in self.scheduler.remove_worker(worker.identity, lost=reason):
            if task.losses >= task.max_attempts:
                log.error(
                    "task %d of client %s failed: it lost its worker %d times, last %s (%s)",
                    task.task_id,
                    p.short_id(task.client.identity),
                    task.losses,
                    _name(worker),
                    reason,
                )

    def _purge_silent_peers(self, now: float) -> None:
        """Expire every peer not heard from within the expiry; O(expired)."""
        sched = self.scheduler
        for identity, silent in list(self._clocks.expired(now)):
            worker = sched.workers.get(identity)
            if worker is not None:
                self._lose_worker(worker, f"no heartbeat for {silent:.1f}s")
            client = sched.clients.get(identity)
            if client is not None:
                log.warning(
                    "client %s lost (no heartbeat for %.1fs); dropping its %d tasks",
                    _peer_name(identity, client.hello),
                    silent,
                    len(client.tasks),
                )
                sched.remove_client(identity)
        self._flush()

    def _send_due_heartbeats(self, now: float) -> None:
        capacity = p.encode_capacity(p.Command.HEARTBEAT, self.scheduler.capacity)
        plain = p.encode(p.Command.HEARTBEAT)
        for identity in self._clocks.due(now):
            self._send(identity, capacity if identity in self.scheduler.clients else plain)

    # -- output ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what the scheduler decided: STOPs and TASK batches to workers, RESULT
        batches and NOTICEs to clients, the capacity."""
        if not self.scheduler.has_sends():
            return
        sends = self.scheduler.take_sends()
        for identity, keys in sends.stops.items():
            self._send(identity, p.encode_stop(keys))
        for identity, tasks in sends.tasks.items():
            self._send_tasks(identity, tasks)
        for identity, notices in sends.notices.items():
            for message, task_ids in notices:
                self._send(identity, p.encode_notice(message, task_ids))
        capacity = self.scheduler.capacity
        for identity, results in sends.results.items():
            local = self._local_results.get(identity) if self._local_results else None
            if local is not None:
                local(capacity, results)
                continue
            limit = _batch_limit(self.scheduler.clients.get(identity))
            for batch in p.chunked(results, limit):
                frames = p.encode_result(capacity, batch)
                self.relayed["result"] += _size(frames)
                self._send(identity, frames)
        if sends.capacity_changed:
            beat = p.encode_capacity(p.Command.HEARTBEAT, capacity)
            for identity in self.scheduler.clients:
                self._send(identity, beat)

    def _send_tasks(self, identity: bytes, tasks: list[Task]) -> None:
        records = []
        owner, scope = None, p.NO_SCOPE
        for task in tasks:
            if task.client is not owner:  # a batch's tasks are mostly one client's
                owner = task.client
                scope = scope_of(owner.key_name, owner.hello.tag)
            records.append(
                (p.TaskRecord(task.key, task.timeout, task.devices, scope), task.payload)
            )
        limit = _batch_limit(self.scheduler.workers.get(identity))
        for batch in p.chunked(records, limit):
            frames = p.encode_task(batch)
            self.relayed["task"] += _size(frames)
            self._send(identity, frames)

    def _send(self, identity: bytes, frames: list[p.Frame]) -> None:
        local = self._local.get(identity) if self._local else None
        if local is not None:
            local(frames)
            return
        sock = self._socket
        assert sock is not None
        try:
            send_frames(sock, [identity, *frames])
        except zmq.ZMQError as exc:
            log.debug("could not send to %s: %s", p.short_id(identity), exc)
        self._clocks.told(identity, time.monotonic())

    # -- keys and warnings ------------------------------------------------------------------

    def _drop_revoked(self, now: float) -> None:
        """Disconnect the peers whose keys were revoked since the last check."""
        revoked = self.gate.revoked(now)
        if not revoked:
            return
        # A scan of all peers, but only when a key was revoked: rare.
        tag = slice(1, 1 + security.TAG_SIZE)
        for identity in [*self.scheduler.workers, *self.scheduler.clients]:
            peer = revoked.get(identity[tag])
            if peer is not None:
                log.warning(
                    "dropping %s %s: key %r revoked", peer.role, p.short_id(identity), peer.name
                )
                self._on_disconnect(identity, [])
        self._flush()

    # -- introspection (tests, status) ----------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The pool's state as JSON-ready data (fade/snapshot.py)."""
        return snapshot(self)

    def last_heard(self, identity: bytes, default: float) -> float:
        return self._clocks.last_heard(identity, default)

    def _publish(self, now: float) -> None:
        """Every ``publish_interval``, replace :attr:`published` with a fresh snapshot."""
        if self.publish_interval is None or now < self._next_publish:
            return
        self.published = self.snapshot()
        self._next_publish = now + self.publish_interval


def _size(frames: list[p.Frame]) -> int:
    """Bytes in a batch (its first frame is bytes; buffers follow, if any)."""
    total = len(frames[0])
    for frame in frames[1:]:
        total += p.frame_size(frame)
    return total


def _header_byte(frame: zmq.Frame) -> int:
    return frame.bytes[3] if len(frame) == 4 else -1


def _name(worker: Worker) -> str:
    return _peer_name(worker.identity, worker.hello)


def _peer_name(identity: bytes, hello: p.Hello) -> str:
    """How logs name a peer: short id @ host : pid (what fade-status shows), escaped."""
    return f"{p.short_id(identity)}@{printable(hello.host)}:{hello.pid}"


def _batch_limit(peer: Any) -> int:
    """The most bytes a batch's first frame may carry to this peer."""
    limit = peer.hello.max_message_size if peer is not None else 0
    return min(limit, p.BATCH_BYTES) if limit else p.BATCH_BYTES


class _Parked(collections.OrderedDict[bytes, tuple[bytes, int, p.Frame, float]]):
    """Code requests for tasks a worker holds whose clients have not re-sent them to this
    (fresh) broker yet: task key -> (the worker, request id, request, since). Bounded:
    the oldest are forgotten (their worker's wait for code times out). A dict, so that
    the check for any, made at every SUBMIT, costs no call."""

    def park(self, key: bytes, asker: bytes, request_id: int, request: p.Frame, now: float) -> None:
        self[key] = (asker, request_id, request, now)
        while len(self) > MAX_RELAYS:
            self.popitem(last=False)


class _Relays:
    """Code requests relayed to clients and not answered yet: relay number -> (the worker
    that asked, the key of its task). Bounded: the oldest are forgotten."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[int, tuple[bytes, bytes]] = collections.OrderedDict()
        self._numbers = itertools.count(1)

    def add(self, worker: bytes, key: bytes) -> bytes:
        number = next(self._numbers)
        self._open[number] = (worker, key)
        while len(self._open) > MAX_RELAYS:
            self._open.popitem(last=False)
        return number.to_bytes(8, "little")

    def take(self, ref: bytes) -> tuple[bytes, bytes] | None:
        if len(ref) != 8:
            return None
        return self._open.pop(int.from_bytes(ref, "little"), None)


def _version_text(version: int) -> str:
    return (
        f"protocol version {version} is not spoken here: this broker (fade {__version__}) "
        f"speaks protocol version {p.VERSION}; use the same fade version on every peer"
    )


def _exit_text(info: dict[str, Any]) -> str:
    if info.get("signal"):
        return f"killed by signal {info['signal']}"
    return f"exit code {info.get('exitcode')}"


# -- command line: fade/brokercli.py ------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fade-broker`` (the command line lives in fade/brokercli.py)."""
    from fade.brokercli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
