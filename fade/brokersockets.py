"""The broker's sockets and the one context they share, opened in order and closed once.

::

    BrokerSockets.bind --> Gate.open (the ZAP handler, with keys) --> the ROUTER
                 .pair_link --> a PairLink to the other broker of a pair (fade/pairlink.py)
                 .poller ----> the ROUTER, the wake-up pipe, the ZAP socket
                 .close -----> all of them, then the context if it is the broker's own

* Separate from the poll loop (fade/broker.py): which sockets exist and in which
  order they open and close is setup, not dispatch.
* ZAP's endpoint is one per context: a broker with keys gets a context of its own,
  terminated when it closes.
* The wake-up pipe is how :meth:`fade.broker.Broker.stop` ends a poll at once, even
  from a signal handler.
"""

from __future__ import annotations

import logging

import zmq

from fade import security
from fade.pair import Pair
from fade.pairlink import PairLink
from fade.sockets import bind_router
from fade.wakeup import WakePipe

__all__ = ["BrokerSockets"]

log = logging.getLogger("fade.broker")


class BrokerSockets:
    """The ROUTER (once bound), the gate's ZAP handler, the wake-up pipe, the context."""

    def __init__(
        self,
        gate: security.Gate,
        context: zmq.Context[zmq.Socket[bytes]] | None,
        own_context: bool,
    ) -> None:
        self.gate = gate
        # ZAP's endpoint is one per context: a broker with keys gets a context of its own.
        self._own_context = own_context or (context is None and gate.keys is not None)
        self.context = context or (zmq.Context() if self._own_context else zmq.Context.instance())
        self.router: zmq.Socket[bytes] | None = None
        self.wake = WakePipe()  # stop() may be called from a signal handler

    def bind(
        self, address: str, max_message_size: int, keepalive: tuple[int, int]
    ) -> zmq.Socket[bytes]:
        """Open the gate, then bind the ROUTER; on failure, close what was opened."""
        self.gate.open(self.context)
        try:
            self.router = bind_router(
                self.context,
                address,
                keys=self.gate.keys,
                max_message_size=max_message_size,
                keepalive=keepalive,
            )
        except zmq.ZMQError:
            self._close_security()
            raise
        return self.router

    def pair_link(self, pair: Pair, peer: str, interval: float, expiry: float) -> PairLink:
        """The link to the other broker of ``pair``, at ``peer``."""
        link = PairLink(
            self.context, peer, keys=self.gate.keys, interval=interval, expiry=expiry, log=log
        )
        log.info(
            "the %s of a pair with the broker at %s; serving no one until the pair "
            "agrees that this one is active",
            pair.role.value,
            peer,
        )
        return link

    def poller(self) -> zmq.Poller:
        """A poller on the ROUTER, the wake-up pipe and, with keys, the ZAP socket."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake.fd, zmq.POLLIN)
        if self.gate.zap is not None:
            poller.register(self.gate.zap.socket, zmq.POLLIN)
        return poller

    def close(self) -> None:
        """Close the ROUTER, the pipe, the gate and an own context; idempotent."""
        if self.router is not None:
            self.router.close(linger=0)
            self.router = None
            self.wake.close()
        self._close_security()

    def _close_security(self) -> None:
        self.gate.close()
        if self._own_context:
            self._own_context = False
            self.context.term()
