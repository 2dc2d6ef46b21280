"""A broker driven by another loop, serving a client in its own process: the embedded
pool (fade/embedded.py, fade/locallink.py). Mixed into :class:`fade.broker.Broker`.

::

    client I/O thread (fade/locallink.py)                     Broker
      bind(), socket ------------------------------------> the ROUTER, for its own poll
      attach_local(identity, deliver, results) ----------> Outbox: no socket to this client
      local_submit(identity, records) -------------------> Scheduler.submit, then flush
      handle_local(identity, frames) --------------------> the lone broker's handlers
      drain(socket) / upkeep(now) -----------------------> what run() would do in a pass
      deliver(frames), results(capacity, records) <------ what the broker sends it

* Separate from the poll loop (fade/broker.py): this is the broker's surface for a
  caller that owns the thread, not part of its own loop.
* The local client is never expired: it cannot be silent without its process being
  gone. It speaks to a lone broker (the embedded pool has no pair).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from fade import protocol as p
from fade.errors import ProtocolError

if TYPE_CHECKING:
    from fade.brokerout import LocalResults, Outbox
    from fade.scheduler import Scheduler

__all__ = ["LocalDuties"]


class LocalDuties:
    """The embedded pool's part of a broker. Mixed into :class:`fade.broker.Broker`,
    which sets the attributes declared here and defines the methods stubbed below."""

    scheduler: Scheduler
    _out: Outbox
    _HANDLERS: dict[p.Command, Any]

    @property
    def socket(self) -> zmq.Socket[bytes] | None:
        """The ROUTER, once bound (for a loop that drives this broker itself)."""
        return self._out.socket

    if TYPE_CHECKING:

        def _reset(self, identity: bytes) -> None: ...

        def _flush(self) -> None: ...

        def _drain_socket(self, sock: zmq.Socket[bytes]) -> None: ...

    def attach_local(
        self,
        identity: bytes,
        deliver: Callable[[list[p.Frame]], None],
        results: LocalResults,
    ) -> None:
        """Serve a client that lives in this process: what the broker sends it goes to
        ``deliver`` (in the thread that drives the broker), results to ``results`` as
        records, never through a socket; and it is never expired (it cannot be silent
        without its process being gone)."""
        self._out.attach_local(identity, deliver, results)

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
