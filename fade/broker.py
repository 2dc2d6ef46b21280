"""The broker: one ROUTER socket, one poll loop, no threads.

::

    clients (DEALER)                 broker (ROUTER)                 workers (DEALER)
      SUBMIT --------> tasks{key} + queue / suspects ---- TASK ------->  run
      RESULT <-------- route by key <------------------- DONE(credits) <-
                       ready workers: idle first, then busy-with-credit

* A worker receives tasks only against credits it granted (READY, DONE); a
  worker holding nothing is served before one that is busy.
* Payloads are forwarded as the frames they arrived in: never unpickled, never
  copied.
* A lost worker's tasks are re-queued as *suspects*: each runs alone on an
  idle worker, so a task that kills its worker cannot take innocent neighbours
  down with it; after ``max_attempts`` losses it fails with Status.LOST.
* Every message from a peer counts as a heartbeat; peers silent for
  interval x liveness are expired. Expiry and heartbeat bookkeeping use
  ordered dicts kept in time order, so each pass costs O(due peers), not
  O(all peers).
* With keys (``--keys DIR``) only authorised CurveZMQ keys connect, and every
  message is checked against its key's role (fade/security.py). Without keys
  the broker serves only loopback or ipc addresses, unless told ``insecure``.
* Bad input is dropped, logged (rate-limited) and, if its sender speaks fade,
  answered with ERROR; replies to bad or unknown input are rate-limited too.
"""

from __future__ import annotations

import argparse
import collections
import enum
import json
import logging
import math
import os
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from fade import protocol as p
from fade import security
from fade._env import default_address
from fade._logutil import OneLineFormatter, RateLimitedLog, printable, short_id
from fade._rate import Throughput
from fade._version import __version__
from fade.errors import ProtocolError, SecurityError
from fade.sockets import (
    DEFAULT_MAX_MESSAGE_SIZE,
    bind_router,
    has_input,
    parse_size,
    recv_frames,
    send_frames,
)

if TYPE_CHECKING:
    from fade.web import StatusServer

__all__ = ["Broker", "main"]

log = logging.getLogger("fade.broker")

#: A worker may not grant itself more than this many outstanding tasks.
MAX_CREDITS = 4096
DEFAULT_MAX_ATTEMPTS = 3
#: Seconds between two rounds of timed work (expiry, heartbeats), at least.
MIN_UPKEEP_GAP = 0.001
#: Seconds between the snapshots the HTTP endpoint serves.
PUBLISH_INTERVAL = 1.0

#: Seconds between the repeated warnings of a broker started with ``insecure``.
INSECURE_WARNING_PERIOD = 60.0

_TASK_ID = struct.Struct("<Q")


class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # finished, failed or dropped: no longer owned by the broker


class WorkerState(enum.Enum):
    READY = "ready"
    DRAINING = "draining"


@dataclass(slots=True, eq=False)
class _Task:
    key: bytes
    client: bytes
    task_id: int
    payload: p.Payload
    timeout: float
    max_attempts: int
    state: TaskState = TaskState.QUEUED
    worker: bytes | None = None
    losses: int = 0


@dataclass(slots=True, eq=False)
class _Worker:
    identity: bytes
    info: dict[str, Any]
    credits: int = 0
    tasks: dict[bytes, _Task] = field(default_factory=dict)
    state: WorkerState = WorkerState.READY
    isolated: bool = False  # running a suspect task alone: no other work meanwhile
    counted: int = 0  # this worker's share of the pool capacity, as last counted
    done: int = 0


@dataclass(slots=True, eq=False)
class _Client:
    identity: bytes
    info: dict[str, Any]
    keys: set[bytes] = field(default_factory=set)


class Broker:
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
    ) -> None:
        if heartbeat_interval <= 0 or heartbeat_liveness < 1:
            raise ValueError("heartbeat interval must be > 0 and liveness >= 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if max_message_size < 1:
            raise ValueError("max_message_size must be at least 1 byte")
        # Checked before anything is bound: a refused broker never listens.
        security.check_address(address, keys, insecure)
        self._keys = security.load_broker_keys(keys) if keys is not None else None
        self._insecure = insecure and keys is None and not security.is_local_address(address)
        self._insecure_period = insecure_warning_period
        self._insecure_due = 0.0
        self.max_message_size = max_message_size
        self.address = address
        self.broker_id = uuid.uuid4().hex
        self.interval = heartbeat_interval
        self.liveness = heartbeat_liveness
        self.max_attempts = max_attempts
        self._expiry = p.expiry(heartbeat_interval, heartbeat_liveness)
        self._parent_pid = parent_pid
        # ZAP's endpoint is one per context: a broker with keys gets a context of its own.
        self._own_context = context is None and self._keys is not None
        self._context = context or (zmq.Context() if self._own_context else zmq.Context.instance())
        self._socket: zmq.Socket[bytes] | None = None
        self._zap: security.ZapHandler | None = None
        self._guard: security.Guard | None = None
        self._keys_checked = 0.0
        self._replies = security.ReplyLimiter(heartbeat_interval)
        self._stopping = False
        # stop() may be called from a signal handler: it pokes this pipe so the
        # poll returns at once instead of at the end of its timeout.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._bad_input = RateLimitedLog(log)

        self._tasks: dict[bytes, _Task] = {}
        self._queue: collections.deque[_Task] = collections.deque()
        self._suspects: collections.deque[_Task] = collections.deque()
        self._workers: dict[bytes, _Worker] = {}
        self._clients: dict[bytes, _Client] = {}
        self._idle: dict[bytes, None] = {}  # ready, credits > 0, holding nothing
        self._busy: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._heard: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._told: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._capacity = 0
        self._outbox: dict[bytes, list[tuple[p.ResultRecord, p.Payload]]] = {}
        self.started = time.monotonic()
        self.tasks_done = 0
        self.tasks_failed = 0  # of tasks_done: raised an exception
        self.tasks_lost = 0  # of tasks_done: lost their worker max_attempts times
        self._throughput = Throughput(self.started)
        #: Seconds between snapshots published for other threads (None: never).
        self.publish_interval: float | None = None
        #: The latest published snapshot. The loop replaces it whole and never
        #: changes one it has published, so a reader thread needs no lock.
        self.published: dict[str, Any] | None = None
        self._next_publish = 0.0

    # -- life cycle ---------------------------------------------------------------

    def bind(self) -> str:
        """Bind the ROUTER socket; returns the endpoint actually bound."""
        if self._keys is not None:
            # The authenticator must be listening before the first peer can connect.
            keyring = security.KeyRing(self._keys.directory)
            self._zap = security.ZapHandler(self._context, keyring)
            self._guard = security.Guard(keyring)
        try:
            sock = bind_router(
                self._context, self.address, keys=self._keys, max_message_size=self.max_message_size
            )
        except zmq.ZMQError:
            self._close_security()
            raise
        self._socket = sock
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("fade-broker %s listening on %s", __version__, endpoint)
        if self._keys is not None:
            log.info("CURVE keys on: accepting the keys authorised in %s", self._keys.directory)
        self._warn_if_insecure(time.monotonic())
        return endpoint

    def stop(self) -> None:
        """Ask the loop to end after its current pass; safe from a signal handler."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._close_security()

    def _close_security(self) -> None:
        if self._zap is not None:
            self._zap.close()
            self._zap = None
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
        poller.register(self._wake_r, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap.socket, zmq.POLLIN)
        next_upkeep = 0.0
        try:
            while not self._stopping:
                timeout = max(0.0, next_upkeep - time.monotonic())
                events = dict(poller.poll(math.ceil(timeout * 1000)))
                if self._zap is not None and events.get(self._zap.socket):
                    self._zap.handle()
                if events.get(sock):
                    self._drain_socket(sock)
                self._flush_results()
                now = time.monotonic()
                # Timed work only when some is due: a busy broker would otherwise spend
                # as long on it as on the messages themselves.
                if now >= next_upkeep:
                    if not self._upkeep(now):
                        break
                    next_upkeep = now + max(self._poll_timeout(), MIN_UPKEEP_GAP)
        finally:
            self.close()

    def _upkeep(self, now: float) -> bool:
        """Expire, heartbeat, publish and re-read keys; False if our parent is gone."""
        self._throughput.record(now, self.tasks_done)
        self._purge_silent_peers(now)
        self._send_due_heartbeats(now)
        self._publish(now)
        self._check_keys(now)
        self._warn_if_insecure(now)
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            log.info("parent process %d is gone; stopping", self._parent_pid)
            return False
        return True

    def _poll_timeout(self) -> float:
        """Seconds until the next heartbeat or expiry is due (at most one interval)."""
        now = time.monotonic()
        due = now + self.interval
        if self._told:
            due = min(due, next(iter(self._told.values())) + self.interval)
        if self._heard:
            due = min(due, next(iter(self._heard.values())) + self._expiry)
        if self.publish_interval is not None:
            due = min(due, self._next_publish)
        return max(0.0, min(due - now, self.interval))

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
        if len(self._tasks) <= 1:
            return
        for _ in range(999):
            if not has_input(sock):
                return
            self._handle(recv_frames(sock))

    # -- dispatch on command --------------------------------------------------------

    def _handle(self, frames: Sequence[zmq.Frame]) -> None:
        if len(frames) < 2:
            self._bad_input.warning("dropped a message with no body")
            return
        identity = frames[0].bytes
        try:
            message = p.parse(frames[1:])
            if self._guard is not None:
                self._guard.check(frames[0], identity, message)
            self._heard_from(identity)
            handler = self._HANDLERS.get(message.command)
            if handler is None:
                raise ProtocolError(f"{message.command.name} is not for the broker")
            handler(self, identity, message.body)
        except security.Refused as exc:
            self._bad_input.warning("refused a message from %s: %s", identity.hex(), exc)
            if exc.revoked:
                self._on_disconnect(identity, [])
            self._answer_error(identity, str(exc))
        except ProtocolError as exc:
            self._bad_input.warning("dropped a message from %s: %s", identity.hex(), exc)
            if p.speaks_fade(frames[1]) and _header_byte(frames[1]) != p.Command.ERROR:
                self._answer_error(identity, str(exc))

    def _answer_error(self, identity: bytes, reason: str) -> None:
        """Tell a peer why its message was dropped (rate-limited, and no heartbeat follows)."""
        if self._replies.allow(identity):
            self._send(identity, p.encode_error(reason))
            if identity not in self._workers and identity not in self._clients:
                self._forget_peer(identity)

    def _on_hello(self, identity: bytes, body: list[p.Frame]) -> None:
        hello = p.decode_hello(body)
        if hello.role == "worker":
            self._register_worker(identity, hello.info)
        else:
            self._register_client(identity, hello.info)
        self._send(
            identity,
            p.encode_welcome(
                p.Welcome(
                    self.broker_id,
                    self.interval,
                    self.liveness,
                    self._capacity,
                    self.max_message_size,
                )
            ),
        )
        self._dispatch()

    def _on_heartbeat(self, identity: bytes, body: list[p.Frame]) -> None:
        if identity not in self._workers and identity not in self._clients:
            self._reset(identity)

    def _on_ready(self, identity: bytes, body: list[p.Frame]) -> None:
        credits = p.decode_ready(body)
        worker = self._workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        self._grant(worker, credits)
        self._dispatch()

    def _on_submit(self, identity: bytes, body: list[p.Frame]) -> None:
        tasks = p.decode_submit(body)
        client = self._clients.get(identity)
        if client is None:
            # Unknown client (e.g. this broker restarted): it will re-send
            # everything after the WELCOME that follows our RESET.
            self._reset(identity)
            return
        for record, payload in tasks:
            key = identity + _TASK_ID.pack(record.task_id)
            if key in self._tasks:
                continue  # a re-send of a task we already hold
            task = _Task(
                key=key,
                client=identity,
                task_id=record.task_id,
                payload=payload,
                timeout=record.timeout,
                max_attempts=record.max_attempts or self.max_attempts,
            )
            self._tasks[key] = task
            client.keys.add(key)
            self._queue.append(task)
        self._dispatch()

    def _on_done(self, identity: bytes, body: list[p.Frame]) -> None:
        credits, results = p.decode_done(body)
        worker = self._workers.get(identity)
        returned = 0
        for record, payload in results:
            task = self._tasks.get(record.key)
            if task is None:
                continue  # late or duplicate: someone else already answered
            if record.status is p.Status.RETURNED:
                if task.worker == identity and task.state is TaskState.RUNNING:
                    self._unassign(task)
                    self._enqueue_again(task)
                    returned += 1
                continue
            self._complete(task, record.status, payload, sender=identity)
            if worker is not None:
                worker.done += 1
        if returned:
            who = _name(worker) if worker is not None else short_id(identity)
            log.info("worker %s handed back %d unstarted tasks; re-queued them", who, returned)
        if worker is None:
            self._reset(identity)
            return
        self._grant(worker, credits)
        self._dispatch()

    def _on_drain(self, identity: bytes, body: list[p.Frame]) -> None:
        p.decode_drain(body)
        worker = self._workers.get(identity)
        if worker is None:
            self._reset(identity)
            return
        worker.state = WorkerState.DRAINING
        self._file(worker)
        log.info("worker %s is draining (%d tasks held)", _name(worker), len(worker.tasks))
        # Messages on one connection are ordered: once this DRAIN reaches the
        # worker, it knows no further TASK is on its way.
        self._send(identity, p.encode(p.Command.DRAIN))

    def _on_disconnect(self, identity: bytes, body: list[p.Frame]) -> None:
        worker = self._workers.get(identity)
        if worker is not None:
            log.info(
                "worker %s left; re-queueing the %d tasks it held", _name(worker), len(worker.tasks)
            )
            for task in list(worker.tasks.values()):
                self._unassign(task)
                self._enqueue_again(task)
            self._forget_worker(worker)
        client = self._clients.get(identity)
        if client is not None:
            log.info(
                "client %s left; %d clients",
                _peer_name(identity, client.info),
                len(self._clients) - 1,
            )
            self._forget_client(client)
        self._forget_peer(identity)

    def _on_obituary(self, identity: bytes, body: list[p.Frame]) -> None:
        dead, info = p.decode_obituary(body)
        worker = self._workers.get(dead)
        if worker is not None:
            worker.info.update({k: v for k, v in info.items() if k in ("exitcode", "signal")})
            self._lose_worker(worker, f"its process exited ({_exit_text(info)})")
            self._dispatch()

    def _on_fetch(self, identity: bytes, body: list[p.Frame]) -> None:
        """A worker asks a client for code: relay it, or answer GONE for a missing client."""
        client, request_id, request = p.decode_fetch(body)
        if identity not in self._workers:
            self._reset(identity)
            return
        if client not in self._clients:
            self._send(identity, p.encode_code(client, request_id, p.CodeStatus.GONE, []))
            return
        self._send(client, p.encode_fetch(identity, request_id, request))

    def _on_code(self, identity: bytes, body: list[p.Frame]) -> None:
        """A client answers a worker's FETCH: relay the answer as it came."""
        worker, request_id, status, frames = p.decode_code(body)
        if identity not in self._clients:
            self._reset(identity)
            return
        self._send(worker, p.encode_code(identity, request_id, status, frames))

    def _on_status(self, identity: bytes, body: list[p.Frame]) -> None:
        p.decode_status(body)
        self._send(identity, p.encode_state(self.snapshot()))
        if identity not in self._workers and identity not in self._clients:
            # An operator's one-off question: keep no heartbeat state for it.
            self._forget_peer(identity)

    _HANDLERS = {
        p.Command.HELLO: _on_hello,
        p.Command.HEARTBEAT: _on_heartbeat,
        p.Command.READY: _on_ready,
        p.Command.SUBMIT: _on_submit,
        p.Command.DONE: _on_done,
        p.Command.DRAIN: _on_drain,
        p.Command.DISCONNECT: _on_disconnect,
        p.Command.OBITUARY: _on_obituary,
        p.Command.FETCH: _on_fetch,
        p.Command.CODE: _on_code,
        p.Command.STATUS: _on_status,
    }

    # -- peers --------------------------------------------------------------------------

    def _register_worker(self, identity: bytes, info: dict[str, Any]) -> None:
        if identity in self._clients:
            self._forget_client(self._clients[identity])
        credits = _int_field(info, "credits", 1)
        holding = info.pop("holding", None)
        worker = self._workers.get(identity)
        if worker is None:
            worker = _Worker(identity=identity, info=info)
            self._workers[identity] = worker
            log.info("worker %s joined; %d workers", _name(worker), len(self._workers))
        elif holding is not None:
            self._requeue_unheld(worker, holding)
        worker.info.update(info)
        worker.state = WorkerState.READY
        worker.credits = 0
        self._grant(worker, credits)
        self._broadcast_capacity()

    def _requeue_unheld(self, worker: _Worker, holding: object) -> None:
        """A worker that says HELLO again lists the tasks it holds; any other task we had
        given it was lost in flight with its old socket, so it goes back in the queue."""
        if not isinstance(holding, list) or not all(isinstance(k, str) for k in holding):
            raise ProtocolError("HELLO field 'holding' must be a list of hex task keys")
        held = set(holding)
        lost = [task for task in worker.tasks.values() if task.key.hex() not in held]
        for task in lost:
            self._unassign(task)
            self._enqueue_again(task)
        if lost:
            log.info("worker %s came back without %d tasks; re-queued", _name(worker), len(lost))

    def _register_client(self, identity: bytes, info: dict[str, Any]) -> None:
        if identity in self._workers:
            self._lose_worker(self._workers[identity], "it re-registered as a client")
        if identity not in self._clients:
            self._clients[identity] = _Client(identity=identity, info=info)
            log.info(
                "client %s connected; %d clients", _peer_name(identity, info), len(self._clients)
            )

    def _heard_from(self, identity: bytes) -> None:
        heard = self._heard
        heard[identity] = time.monotonic()
        heard.move_to_end(identity)

    def _forget_peer(self, identity: bytes) -> None:
        self._heard.pop(identity, None)
        self._told.pop(identity, None)

    def _reset(self, identity: bytes) -> None:
        """Tell a peer we do not know it, so that it says HELLO again (rate-limited)."""
        if self._replies.allow(identity):
            self._send(identity, p.encode(p.Command.RESET))
        if identity not in self._workers and identity not in self._clients:
            self._forget_peer(identity)

    def _purge_silent_peers(self, now: float) -> None:
        """Expire every peer not heard from within the expiry; oldest first, so O(expired)."""
        deadline = now - self._expiry
        heard = self._heard
        lost = False
        while heard:
            identity, last = next(iter(heard.items()))
            if last > deadline:
                break
            lost = True
            del heard[identity]
            self._told.pop(identity, None)
            worker = self._workers.get(identity)
            if worker is not None:
                self._lose_worker(worker, f"no heartbeat for {now - last:.1f}s")
            client = self._clients.get(identity)
            if client is not None:
                log.warning(
                    "client %s lost (no heartbeat for %.1fs); dropping its %d tasks",
                    _peer_name(identity, client.info),
                    now - last,
                    len(client.keys),
                )
                self._forget_client(client)
        if lost:
            self._dispatch()  # a lost worker's tasks are queued again

    def _send_due_heartbeats(self, now: float) -> None:
        told = self._told
        due = now - self.interval
        while told:
            identity, last = next(iter(told.items()))
            if last > due:
                break
            if identity in self._clients:
                self._send(identity, p.encode_capacity(p.Command.HEARTBEAT, self._capacity))
            else:
                self._send(identity, p.encode(p.Command.HEARTBEAT))

    def _broadcast_capacity(self) -> None:
        """Tell every client the pool's size changed, so their windows follow it."""
        for identity in self._clients:
            self._send(identity, p.encode_capacity(p.Command.HEARTBEAT, self._capacity))

    # -- keys and warnings ------------------------------------------------------------

    def _check_keys(self, now: float) -> None:
        """Once per heartbeat interval: pick up added and revoked keys, drop revoked peers."""
        if self._guard is None or now - self._keys_checked < self.interval:
            return
        self._keys_checked = now
        keyring = self._guard.keyring
        keyring.refresh()
        revoked = {peer.tag: peer for peer in keyring.take_revoked()}
        if not revoked:
            return
        # A scan of all peers, but only when a key was revoked: rare.
        tag = slice(1, 1 + security.TAG_SIZE)
        for identity in [*self._workers, *self._clients]:
            peer = revoked.get(identity[tag])
            if peer is not None:
                log.warning("dropping %s %s: key %r revoked", peer.role, identity.hex(), peer.name)
                self._on_disconnect(identity, [])

    def _warn_if_insecure(self, now: float) -> None:
        if self._insecure and now >= self._insecure_due:
            self._insecure_due = now + self._insecure_period
            log.warning(
                "INSECURE: serving %s without keys: anyone who can reach it can run any "
                "code on every worker (fade-keys init DIR, then --keys DIR)",
                self.address,
            )

    # -- workers and credits ----------------------------------------------------------

    def _grant(self, worker: _Worker, credits: int) -> None:
        worker.credits = min(worker.credits + credits, MAX_CREDITS)
        self._file(worker)

    def _file(self, worker: _Worker) -> None:
        """The one place that decides which dispatch set a worker belongs to."""
        identity = worker.identity
        self._idle.pop(identity, None)
        self._busy.pop(identity, None)
        ready = worker.state is WorkerState.READY and not worker.isolated
        if ready and worker.credits > 0:
            if worker.tasks:
                self._busy[identity] = None
            else:
                self._idle[identity] = None
        share = worker.credits + len(worker.tasks) + 1 if worker.state is WorkerState.READY else 0
        self._capacity += share - worker.counted
        worker.counted = share

    def _forget_worker(self, worker: _Worker) -> None:
        worker.state = WorkerState.DRAINING
        worker.credits = 0
        worker.tasks.clear()
        self._file(worker)
        del self._workers[worker.identity]
        self._forget_peer(worker.identity)
        self._broadcast_capacity()

    def _lose_worker(self, worker: _Worker, reason: str) -> None:
        """A worker died: re-queue what it held as suspects, or fail those out of attempts."""
        held = list(worker.tasks.values())
        doomed = sum(task.losses + 1 >= task.max_attempts for task in held)
        log.warning(
            "worker %s lost (%s); re-queueing %d of the %d tasks it held",
            _name(worker),
            reason,
            len(held) - doomed,
            len(held),
        )
        for task in held:
            self._unassign(task)
            task.losses += 1
            if task.losses >= task.max_attempts:
                log.error(
                    "task %d of client %s failed: it lost its worker %d times, last %s (%s)",
                    task.task_id,
                    short_id(task.client),
                    task.losses,
                    _name(worker),
                    reason,
                )
                self._complete(task, p.Status.LOST, self._lost_report(task, worker, reason))
            else:
                task.state = TaskState.QUEUED
                self._suspects.append(task)
        self._forget_worker(worker)

    def _lost_report(self, task: _Task, worker: _Worker, reason: str) -> p.Payload:
        info = worker.info
        report = {
            "attempts": task.losses,
            "identity": worker.identity.hex(),
            "host": info.get("host"),
            "pid": info.get("pid"),
            "exitcode": info.get("exitcode"),
            "signal": info.get("signal"),
            "reason": reason,
        }
        return p.Payload(json.dumps(report).encode())

    # -- tasks ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued tasks to workers with credit: suspects alone to idle workers first."""
        while self._suspects and self._idle:
            task = self._suspects.popleft()
            if task.state is not TaskState.QUEUED:
                continue
            worker = self._workers[next(iter(self._idle))]
            worker.isolated = True
            self._assign(worker, [task])
        while self._queue and (self._idle or self._busy):
            identity = next(iter(self._idle)) if self._idle else next(iter(self._busy))
            worker = self._workers[identity]
            batch = self._take(worker.credits)
            if batch:
                self._assign(worker, batch)

    def _take(self, limit: int) -> list[_Task]:
        batch: list[_Task] = []
        queue = self._queue
        while queue and len(batch) < limit:
            task = queue.popleft()
            if task.state is TaskState.QUEUED:
                batch.append(task)
        return batch

    def _assign(self, worker: _Worker, batch: list[_Task]) -> None:
        records = []
        for task in batch:
            task.state = TaskState.RUNNING
            task.worker = worker.identity
            worker.tasks[task.key] = task
            records.append((p.TaskRecord(task.key, task.timeout), task.payload))
        worker.credits -= len(batch)
        self._file(worker)
        for part in p.chunked(records):
            self._send(worker.identity, p.encode_task(part))

    def _unassign(self, task: _Task, sender: bytes | None = None) -> None:
        """Take a task off its worker. That worker is filed again at once, unless it is
        ``sender``, whose message's handler files it once it has handled them all."""
        if task.worker is not None:
            worker = self._workers.get(task.worker)
            if worker is not None and worker.tasks.pop(task.key, None) is not None:
                if not worker.tasks:
                    worker.isolated = False
                if task.worker != sender:
                    self._file(worker)
            task.worker = None

    def _enqueue_again(self, task: _Task) -> None:
        """Put a task back at the head of the line (it was handed back, not lost)."""
        task.state = TaskState.QUEUED
        if task.losses:
            self._suspects.appendleft(task)
        else:
            self._queue.appendleft(task)

    def _complete(
        self, task: _Task, status: p.Status, payload: p.Payload, sender: bytes | None = None
    ) -> None:
        """Remove a finished task everywhere and queue its result for its client
        (``sender``: as in _unassign)."""
        self._unassign(task, sender)
        task.state = TaskState.DONE
        del self._tasks[task.key]
        self.tasks_done += 1
        if status is p.Status.RAISED:
            self.tasks_failed += 1
        elif status is p.Status.LOST:
            self.tasks_lost += 1
        client = self._clients.get(task.client)
        if client is None:
            return
        client.keys.discard(task.key)
        record = p.ResultRecord(task.task_id, status)
        self._outbox.setdefault(task.client, []).append((record, payload))

    def _flush_results(self) -> None:
        """Send each client one RESULT message with everything finished this pass."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for identity, results in outbox.items():
            for batch in p.chunked(results):
                self._send(identity, p.encode_result(self._capacity, batch))

    def _forget_client(self, client: _Client) -> None:
        for key in client.keys:
            task = self._tasks.pop(key, None)
            if task is not None:
                self._unassign(task)
                task.state = TaskState.DONE
        client.keys.clear()
        self._outbox.pop(client.identity, None)
        del self._clients[client.identity]
        self._forget_peer(client.identity)

    # -- output -----------------------------------------------------------------------------

    def _send(self, identity: bytes, frames: list[p.Frame]) -> None:
        sock = self._socket
        assert sock is not None
        try:
            send_frames(sock, [identity, *frames])
        except zmq.ZMQError as exc:
            log.debug("could not send to %s: %s", identity.hex(), exc)
            return
        told = self._told
        told[identity] = time.monotonic()
        told.move_to_end(identity)

    # -- introspection (tests, status) ---------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready picture of the pool, for status tools; O(workers + clients).

        The keys are described in docs/operating.md; tools may rely on them.
        """
        now = time.monotonic()
        # Completions are counted at each upkeep, which may not have run since the last
        # ones: count them now, or the rate would lag what tasks_done says.
        self._throughput.record(now, self.tasks_done)
        heard = self._heard
        running = sum(len(w.tasks) for w in self._workers.values())
        return {
            "broker_id": self.broker_id,
            "version": __version__,
            "address": self.address,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            "uptime": now - self.started,
            "heartbeat_interval": self.interval,
            "workers": [
                {
                    "identity": w.identity.hex(),
                    "host": w.info.get("host"),
                    "pid": w.info.get("pid"),
                    "state": _worker_state(w),
                    "running": len(w.tasks),
                    "credits": w.credits,
                    "done": w.done,
                    "last_heard": now - heard.get(w.identity, now),
                }
                for w in self._workers.values()
            ],
            "clients": [
                {
                    "identity": c.identity.hex(),
                    "host": c.info.get("host"),
                    "pid": c.info.get("pid"),
                    "tasks": len(c.keys),
                }
                for c in self._clients.values()
            ],
            # The queues may still hold tasks dropped since (they are skipped
            # lazily), so count what the broker owns instead.
            "queued": len(self._tasks) - running,
            "running": running,
            "tasks_done": self.tasks_done,
            "tasks_failed": self.tasks_failed,
            "tasks_lost": self.tasks_lost,
            "capacity": self._capacity,
            "rate": self._throughput.rate(now),
            "per_second": self._throughput.series(now),
        }

    def _publish(self, now: float) -> None:
        """Every ``publish_interval``, replace :attr:`published` with a fresh snapshot."""
        if self.publish_interval is None or now < self._next_publish:
            return
        self.published = self.snapshot()
        self._next_publish = now + self.publish_interval


def _header_byte(frame: zmq.Frame) -> int:
    return frame.bytes[3] if len(frame) == 4 else -1


def _worker_state(worker: _Worker) -> str:
    if worker.state is WorkerState.DRAINING:
        return "draining"
    return "busy" if worker.tasks else "idle"


def _name(worker: _Worker) -> str:
    return _peer_name(worker.identity, worker.info)


def _peer_name(identity: bytes, info: dict[str, Any]) -> str:
    """How logs name a peer: short id @ host : pid (what fade-status shows), escaped."""
    return f"{short_id(identity)}@{printable(info.get('host'))}:{printable(info.get('pid'))}"


def _int_field(info: dict[str, Any], name: str, default: int) -> int:
    value = info.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CREDITS:
        raise ProtocolError(f"HELLO field {name!r} must be an int in 0..{MAX_CREDITS}")
    return value


def _exit_text(info: dict[str, Any]) -> str:
    if info.get("signal"):
        return f"killed by signal {info['signal']}"
    return f"exit code {info.get('exitcode')}"


# -- command line -------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fade-broker", description="Run a fade broker that clients and workers connect to."
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=default_address(),
        help="ZeroMQ endpoint to bind (default %(default)s; FADE_ADDRESS sets it)",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=p.HEARTBEAT_INTERVAL)
    parser.add_argument("--heartbeat-liveness", type=int, default=p.HEARTBEAT_LIVENESS)
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="worker losses a task may suffer before it fails (default %(default)s)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=None,
        help="serve a live dashboard, /status (JSON) and /metrics (Prometheus) on this "
        "address; off by default",
    )
    parser.add_argument(
        "--http-public",
        action="store_true",
        help="allow --http on a host other machines can reach (--keys does not imply it: "
        "keys cover the broker's ZeroMQ port, not HTTP)",
    )
    parser.add_argument(
        "--http-allow-host",
        metavar="NAME",
        action="append",
        default=[],
        help="also answer HTTP requests addressed to this host name, as behind a proxy "
        "(repeat for more; '*' answers any name and turns off the DNS-rebinding check)",
    )
    parser.add_argument(
        "--http-token-file",
        metavar="FILE",
        default=None,
        help="a file holding a secret token of 16 or more characters: requests that send "
        "'Authorization: Bearer TOKEN' also see each worker and client (host, pid, short "
        "id); without it the HTTP endpoint shows aggregate numbers only",
    )
    parser.add_argument(
        "--keys",
        metavar="DIR",
        default=None,
        help="accept only the CurveZMQ keys authorised in DIR (made by `fade-keys init DIR`)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve a network address without keys (anyone reaching it can run code)",
    )
    parser.add_argument(
        "--max-message-size",
        type=parse_size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        metavar="BYTES",
        help="largest frame accepted, e.g. 64M or 2G (default 1G); a peer sending more "
        "is disconnected",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--insecure-warning-period",
        type=float,
        default=INSECURE_WARNING_PERIOD,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"fade {__version__}")
    args = parser.parse_args(argv)
    if not args.http and (args.http_public or args.http_allow_host or args.http_token_file):
        parser.error("--http-public, --http-allow-host and --http-token-file need --http")
    return args


def _raise_open_file_limit() -> None:
    """Every connected peer costs the broker a file descriptor: allow as many as the
    system does, since the common default of 1024 would cap a pool at ~1000 workers."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
        except (ValueError, OSError):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fade-broker``."""
    args = _parse_args(argv)
    _raise_open_file_limit()
    handler = logging.StreamHandler()
    # One line per record, whatever text a peer managed to get into a message.
    handler.setFormatter(
        OneLineFormatter(
            f"%(asctime)s fade-broker[{os.getpid()}@{socket.gethostname()}] "
            "%(levelname)s %(message)s"
        )
    )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    broker: Broker | None = None
    try:
        broker = Broker(
            args.address,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_liveness=args.heartbeat_liveness,
            max_attempts=args.max_attempts,
            parent_pid=args.parent_pid,
            keys=args.keys,
            insecure=args.insecure,
            max_message_size=args.max_message_size,
            insecure_warning_period=args.insecure_warning_period,
        )
        broker.bind()
        web = _start_http(broker, args) if args.http else None
    except (ValueError, OSError, zmq.ZMQError, SecurityError) as exc:
        print(f"fade-broker: {exc}", file=sys.stderr)
        if broker is not None:
            broker.close()
        return 2
    running = broker
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: running.stop())
    try:
        running.run()
    finally:
        if web is not None:
            web.stop()
    log.info("fade-broker stopped")
    return 0


def _start_http(broker: Broker, args: argparse.Namespace) -> StatusServer:
    """Serve the broker's published snapshots over HTTP from a daemon thread.

    Raises ValueError or OSError with a message for the operator.
    """
    from fade.web import StatusServer, check_host, parse_address, read_token

    host, port = parse_address(args.http)
    # Reachable from other machines only when the operator says so: keys protect
    # the ZeroMQ port, not this one.
    check_host(host, public=args.http_public)
    token = read_token(args.http_token_file) if args.http_token_file else None
    broker.publish_interval = PUBLISH_INTERVAL
    broker.published = broker.snapshot()
    try:
        server = StatusServer(
            host, port, lambda: broker.published, allow_hosts=args.http_allow_host, token=token
        )
    except OSError as exc:
        raise OSError(
            f"cannot serve HTTP on {args.http} (the --http address, not the broker's "
            f"{broker.address}): {exc.strerror or exc}"
        ) from None
    url = server.start()
    log.info(
        "dashboard at %s (JSON at %sstatus, Prometheus at %smetrics); per-peer detail %s",
        url,
        url,
        url,
        f"for the token in {args.http_token_file}" if token else "off (no --http-token-file)",
    )
    return server


if __name__ == "__main__":
    sys.exit(main())
