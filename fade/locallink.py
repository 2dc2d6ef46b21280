"""The embedded pool's broker, in the client's own process: one process and one hop fewer.

::

    client process                                                  worker processes
      your thread ─┐
      I/O thread ──┴─ baton ─> LocalLink ─ direct calls ─> Broker ── ROUTER (ipc) ── DEALER
                                   ^                         │
                                   └── what the broker sends the client ("deliver")

``fade.Executor()`` with no address used to start a broker process and talk to it over
ipc: every task crossed two extra sockets and a third process, and the pool could not
answer before the broker process had started. Here the broker (the same
:class:`fade.broker.Broker`, scheduler, liveness and all: heartbeats, re-runs, suspects,
poison limits) is an object the client's I/O thread drives: a SUBMIT is a method call,
a RESULT comes back through a callback, and only the workers are across a socket.

:class:`LocalLink` offers what :class:`fade.clientio.ClientIO` and
:mod:`fade.fastpath` use of :class:`fade.link.BrokerLink`; its ``socket`` is the
broker's ROUTER, which the I/O thread sleeps on and, holding the baton, serves. The
client is never expired (it is this process) and sends no heartbeats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import zmq

from fade import protocol as p
from fade.broker import Broker
from fade.errors import BrokerUnreachableError, FadeError, ProtocolError

__all__ = ["LocalLink"]

Handler = Callable[[p.Message], None]


class LocalLink:
    """The client's link to a broker that lives in this process."""

    def __init__(
        self,
        broker: Broker,
        *,
        identity: bytes,
        hello: Callable[[], p.Hello],
        handlers: Mapping[p.Command, Handler],
        on_welcome: Callable[[p.Welcome], None],
        on_fatal: Callable[[FadeError], None],
        on_unreachable: Callable[[BrokerUnreachableError | None], None],
        on_socket: Callable[[zmq.Socket[bytes] | None], None] | None,
        log: logging.Logger,
        on_results: Callable[[int, list[tuple[p.ResultRecord, p.Payload]]], None],
    ) -> None:
        self.broker = broker
        self.address = broker.address
        self.identity = identity
        self.broker_max_message_size = broker.max_message_size
        self.interval = broker.interval
        self.welcomed = False
        self.reached = True  # it is right here
        self.socket: zmq.Socket[bytes] | None = None
        self._hello = hello
        self._handlers = handlers
        self._on_welcome = on_welcome
        self._on_fatal = on_fatal
        self._on_socket = on_socket
        self._log = log
        broker.attach_local(identity, self._deliver, on_results)

    def connect(self) -> zmq.Socket[bytes]:
        """Bind the broker's socket (once) and say HELLO."""
        if self.socket is None:
            self.broker.bind()
            self.socket = self.broker.socket
            if self._on_socket is not None:
                self._on_socket(self.socket)
        self.hello()
        assert self.socket is not None
        return self.socket

    def hello(self) -> None:
        self.welcomed = False
        self.send(p.encode_hello(self._hello()))

    def send(self, frames: list[p.Frame]) -> None:
        """Hand a message to the broker; what it answers is delivered before this returns."""
        try:
            self.broker.handle_local(self.identity, frames)
        except ProtocolError as exc:  # our own message: a bug, but never a wedged client
            self._log.error("the local broker refused our message: %s", exc)

    def submit(self, tasks: list[tuple[p.SubmitRecord, p.Payload]]) -> None:
        """Hand tasks to the broker as records (no SUBMIT to encode and decode)."""
        self.broker.local_submit(self.identity, tasks)

    def read(self, sock: zmq.Socket[bytes], known: bool = False, most: int = 1 << 30) -> None:
        """Serve the broker's socket: the workers' messages (results reach us through
        ``_deliver`` meanwhile)."""
        self.broker.drain(sock)

    def upkeep(self, now: float) -> None:
        self.broker.upkeep(now)

    def poll_timeout(self, now: float) -> float:
        return self.broker.upkeep(now)

    def close(self, linger_ms: int = 0) -> None:
        if self.socket is not None and self._on_socket is not None:
            self._on_socket(None)
        self.socket = None
        self.broker.close()

    def cause(self) -> str:
        return "the embedded pool's workers have not started"

    def _deliver(self, frames: list[p.Frame]) -> None:
        """What the broker sends us, handled at once (in the thread driving the broker)."""
        try:
            message = p.parse(frames)
            if message.command is p.Command.WELCOME:
                welcome = p.decode_welcome(message.body)
                self.broker_max_message_size = welcome.max_message_size
                self.welcomed = True
                self._on_welcome(welcome)
            elif message.command is p.Command.ERROR:
                self._log.error("the local broker says: %s", p.decode_error(message.body))
            elif message.command is p.Command.RESET:
                self.hello()
            else:
                handler = self._handlers.get(message.command)
                if handler is not None:
                    handler(message)
        except ProtocolError as exc:
            self._log.error("a message from the local broker did not parse: %s", exc)
