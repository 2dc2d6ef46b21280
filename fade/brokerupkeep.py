"""A broker's timed work, mixed into :class:`fade.broker.Broker`: what its loop does when
an interval is due rather than when a message comes.

::

    loop: poll(timeout = _poll_timeout) --> messages --> _upkeep when due:
        stall       --> the loop did not run: its peers' silence meanwhile does not count
        throughput  <-- tasks done so far
        pair        --> _pair_upkeep (fade/brokerpair.py)
        expiry      --> peers silent past interval x liveness are lost (fade/departures.py)
        heartbeats  --> peers told nothing for an interval (fade/brokerout.py)
        published   <-- a fresh snapshot every publish_interval, for HTTP threads
        orphans     --> results kept for tasks not re-sent yet are aged out
        parked      --> code requests whose tasks came back (fade/coderelay.py)
        keys        --> peers whose keys were revoked are dropped
        parent      --> gone: the loop ends

* Separate from the poll loop so that ``fade/broker.py`` reads as dispatch. Each
  step costs O(due peers) (fade/liveness.py), never a scan of all peers; a revoked
  key, rare, is the one scan.
* :meth:`upkeep` runs it for a loop that drives the broker itself (the embedded
  pool's client I/O thread, fade/locallink.py).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from fade import departures
from fade._logutil import RateLimitedLog

if TYPE_CHECKING:
    from fade import protocol as p
    from fade._rate import Throughput
    from fade.brokerout import Outbox
    from fade.coderelay import CodeRelay
    from fade.liveness import Liveness
    from fade.pair import Pair
    from fade.scheduler import Scheduler
    from fade.security import Gate

__all__ = ["MIN_UPKEEP_GAP", "ORPHAN_AGE", "UpkeepDuties"]

log = logging.getLogger("fade.broker")

#: Seconds between two rounds of timed work (expiry, heartbeats), at least.
MIN_UPKEEP_GAP = 0.001
#: Expiries (heartbeat interval x liveness) that tasks waiting for tasks of their own pool
#: must have held every worker before their clients are told of the deadlock (9 s by
#: default): long enough for a worker about to come, or a parent about to give up.
NESTED_WAIT_NOTICE = 3
#: Results a worker sent for tasks whose clients have not re-sent them yet (a fresh broker)
#: are kept for one to two of these (in seconds, at least two expiries): clients re-send
#: everything at once after their WELCOME.
ORPHAN_AGE = 5.0


class UpkeepDuties:
    """The timed part of a broker. Mixed into :class:`fade.broker.Broker`, which sets the
    attributes declared here and defines the methods stubbed below."""

    pair: Pair | None
    scheduler: Scheduler
    gate: Gate
    throughput: Throughput
    _clocks: Liveness
    _out: Outbox
    _code: CodeRelay
    _parent_pid: int | None

    if TYPE_CHECKING:

        @property
        def tasks_done(self) -> int: ...

        def snapshot(self) -> dict[str, Any]: ...

        def _flush(self) -> None: ...

        def _on_disconnect(self, identity: bytes, body: list[p.Frame]) -> None: ...

        def _pair_upkeep(self, pair: Pair, now: float) -> None: ...

        def _pair_due(self, pair: Pair, now: float) -> float: ...

    def _init_upkeep(self, now: float) -> None:
        self._next_upkeep = 0.0
        #: Seconds between snapshots published for other threads (None: never).
        self.publish_interval: float | None = None
        #: The latest published snapshot. The loop replaces it whole and never
        #: changes one it has published, so a reader thread needs no lock.
        self.published: dict[str, Any] | None = None
        self._next_publish = 0.0
        self._orphan_age = max(ORPHAN_AGE, 2 * self._clocks.expiry)
        self._next_ageing = now + self._orphan_age
        self._upkept_at = now
        self._busy_log = RateLimitedLog(log, burst=1, period=60.0)

    def upkeep(self, now: float) -> float:
        """Timed work when it is due (for a loop that drives this broker itself); returns
        the seconds until it is due next."""
        if now >= self._next_upkeep:
            self._upkeep(now)
            self._next_upkeep = now + max(self._poll_timeout(now), MIN_UPKEEP_GAP)
        return max(0.0, self._next_upkeep - now)

    def _upkeep(self, now: float) -> bool:
        """Expire, heartbeat, publish and re-read keys; False if our parent is gone."""
        self._forgive_own_stall(now)
        self.throughput.record(now, self.tasks_done)
        if self.pair is not None:
            self._pair_upkeep(self.pair, now)
        self._purge_silent_peers(now)
        self._out.heartbeats(self.scheduler, self._clocks.due(now))
        self._publish(now)
        if now >= self._next_ageing:
            self._next_ageing = now + self._orphan_age
            self.scheduler.age_orphans()
        self.scheduler.expire_declines()
        self.scheduler.check_nested_waits(NESTED_WAIT_NOTICE * self._clocks.expiry)
        if self._code.parked:
            self._code.unpark(self.scheduler, now)
        self._drop_revoked(now)
        self.gate.warn_if_insecure(now)
        if self._parent_pid is not None and os.getppid() != self._parent_pid:
            log.info("parent process %d is gone; stopping", self._parent_pid)
            return False
        return True

    def _forgive_own_stall(self, now: float) -> None:
        """Upkeep runs at least once an interval. When it comes later than that by more
        than an interval, this broker did not run (its process was stopped: a paused VM,
        a host asleep; or the embedded broker's client held the GIL): what its peers sent
        meanwhile waits unread, and their silence must not count, or every one of them
        is lost at once and the tasks of clients and workers alive are dropped."""
        late = now - self._upkept_at - self._clocks.interval
        self._upkept_at = now
        if late > self._clocks.interval:
            log.warning(
                "this broker did not run for %.1fs (stopped, or starved of CPU, or its "
                "process held the GIL): its peers' silence meanwhile does not count",
                late,
            )
            self._clocks.pause(late)

    def _poll_timeout(self, now: float) -> float:
        due = self._clocks.next_due(now)
        if self.publish_interval is not None:
            due = min(due, max(0.0, self._next_publish - now))
        if self.pair is not None:
            due = min(due, self._pair_due(self.pair, now))
        return due

    def _purge_silent_peers(self, now: float) -> None:
        """Expire every peer not heard from within the expiry; O(expired)."""
        for identity, silent in list(self._clocks.expired(now)):
            if not self._busy_client(identity, silent, now):
                departures.expire(self.scheduler, identity, silent)
        self._flush()

    def _busy_client(self, identity: bytes, silent: float, now: float) -> bool:
        """A silent client whose connection is up is busy, not gone: its code holds the
        GIL (a regular expression, a sort of a huge list) so that its I/O thread cannot
        run, or its process is stopped (Ctrl-Z). Its tasks run on, and it is heard from
        again when it can (a worker, in that case, its supervisor vouches for: ALIVE).
        One whose process ended has no connection, and is lost."""
        client = self.scheduler.clients.get(identity)
        if client is None or not self._out.connected(identity):
            return False
        self._clocks.heard(identity, now)
        self._busy_log.warning(
            "client %s silent for %.1fs, but connected: busy (its code may hold the GIL, "
            "or its process is stopped); its tasks go on",
            departures.peer_name(identity, client.hello),
            silent,
        )
        return True

    def _drop_revoked(self, now: float) -> None:
        """Disconnect the peers whose keys were revoked since the last check."""
        revoked = self.gate.revoked(now)
        if not revoked:
            return
        for identity in departures.revoked(self.scheduler, revoked):
            self._on_disconnect(identity, [])
        self._flush()

    def _publish(self, now: float) -> None:
        """Every ``publish_interval``, replace :attr:`published` with a fresh snapshot."""
        if self.publish_interval is None or now < self._next_publish:
            return
        self.published = self.snapshot()
        self._next_publish = now + self.publish_interval
