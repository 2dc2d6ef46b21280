"""A broker's link to the other broker of its pair: a DEALER that carries its PAIR reports.

::

    broker A loop --every interval, and at once on a change--> PairLink.send(report)
        DEALER (identity "P...") --PAIR--> broker B's ROUTER --> Broker._on_pair --> Pair.heard
    broker B does the same towards A: each direction is one socket, and nothing is
    ever sent back on it.

* The reports travel on the brokers' own ROUTERs: a pair needs no second port, and
  a report proves that the other broker's main socket is up, which is what clients
  and workers reach too.
* A report is worth sending only while it is fresh: nothing queues for a connection
  that is down, and ZMTP heartbeats end one whose other end stopped answering
  (``sockets.connect_dealer``'s ``lossy``). A report that cannot be queued is
  dropped; the next one says it all.
* With keys, the link authenticates with the broker's own key pair, which both
  brokers hold (they serve the same key folder); each admits that key, and only
  that key, as its pair's (role ``broker``, allowed PAIR and STATUS only:
  fade/security.py). Whoever lacks the broker's secret key cannot pose as the other
  broker, and the other broker proves it holds it, as to any peer.
"""

from __future__ import annotations

import logging
import math

import zmq

from fade import protocol as p
from fade import security
from fade._logutil import RateLimitedLog
from fade.keyfiles import BrokerKeys, PeerKeys
from fade.sockets import connect_dealer, send_frames

__all__ = ["PairLink", "pair_keys"]


def pair_keys(keys: BrokerKeys) -> PeerKeys:
    """The key file a broker's pair link connects with: the broker's own pair."""
    return PeerKeys(
        role="broker",
        name="pair",
        public=keys.public,
        secret=keys.secret,
        broker=keys.public,
        path=str(keys.directory),
    )


class PairLink:
    """Sends this broker's reports to the other broker at ``address``; never reads."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        address: str,
        *,
        keys: BrokerKeys | None,
        interval: float,
        expiry: float,
        log: logging.Logger,
    ) -> None:
        self.address = address
        self.interval = interval
        peer_keys = pair_keys(keys) if keys is not None else None
        self._socket = connect_dealer(
            context,
            address,
            identity=security.peer_identity(b"P", peer_keys),
            keys=peer_keys,
            lossy=(max(1, int(interval * 1000)), max(1, int(expiry * 1000))),
        )
        self._watch = security.HandshakeWatch(self._socket, log, peer_keys)
        self._refused = RateLimitedLog(log, burst=1, period=30.0)
        self._keyed = keys is not None
        self._next = -math.inf  # when the next report is due

    def send(self, report: p.PairReport, now: float) -> None:
        """Queue a report, never blocking; dropped if the other broker is not connected."""
        try:
            send_frames(self._socket, p.encode_pair(report), block=False)
        except zmq.Again:
            pass
        self._next = now + self.interval

    def hasten(self, now: float, within: float) -> None:
        """Make the next report due within ``within`` seconds (news the other needs soon)."""
        self._next = min(self._next, now + within)

    def due(self, now: float) -> bool:
        return now >= self._next

    def next_due(self, now: float) -> float:
        """Seconds until the next report is due."""
        return max(0.0, self._next - now)

    def check(self) -> None:
        """Log why the other broker refuses our handshake, if it does (wrong keys)."""
        failures = self._watch.failures()
        if failures:
            need = (
                "both brokers must be started with --keys and copies of the same key "
                "folder (the same broker key pair)"
                if self._keyed
                else "both brokers must be started with --keys, or both without"
            )
            self._refused.warning(
                "the other broker of the pair, at %s, refused our handshake (%s): %s",
                self.address,
                failures[-1],
                need,
            )

    def close(self) -> None:
        self._watch.close()
        self._socket.close(linger=0)
