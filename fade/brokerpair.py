"""What a broker does as one of a pair (``--peer``): the handlers and timed work of its
pair state, mixed into :class:`fade.broker.Broker`. The state machine is fade/pair.py.

::

    PAIR from the other broker --> _on_pair --> Pair.heard --.
    HELLO with a vote ----------> _on_hello_standby -> vote -+--> _pair_changed:
    upkeep: loss, a stalled loop -> Pair.upkeep / stalled ---'      ACTIVE: serve (a fresh
                                                                      broker id; clients wait
                                                                      for the workers)
                                                                    left ACTIVE: _stand_by
                                                                    always: report at once
    not serving: every client and worker message --> STANDBY ("go to the other one")

* Not serving, the broker keeps nothing of any client or worker: its handler table
  is ``_STANDBY_HANDLERS`` (a vote, STATUS and PAIR aside, everything is answered
  STANDBY, OBITUARY and DISCONNECT are dropped). Serving, it is ``_ACTIVE_HANDLERS``:
  a lone broker's, and PAIR. The switch costs nothing per message.
* Just after a takeover, client HELLOs wait unanswered until as many workers as the
  other broker last reported have registered, or an interval has passed: the workers
  say what they hold first, so the tasks clients re-send go back to the workers
  running them (fade/scheduler.py) instead of running twice. A broker reports within
  a tenth of an interval after a worker joins, so that count is current.
* A loop that did not run for longer than peers wait for it (SIGSTOP, swapping) may
  have been replaced: it stops serving and asks (STALLED), checked after each poll
  and at each upkeep.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

from fade import protocol as p
from fade._logutil import printable
from fade.liveness import Liveness
from fade.pair import Change, Pair, PairState
from fade.security import Peer, ReplyLimiter

if TYPE_CHECKING:
    from fade._logutil import RateLimitedLog
    from fade.pairlink import PairLink
    from fade.scheduler import Scheduler

__all__ = ["PairDuties"]

log = logging.getLogger("fade.broker")

Handlers = dict[p.Command, Any]


class PairDuties:
    """The pair part of a broker. Mixed into :class:`fade.broker.Broker`, which sets the
    attributes declared here and defines the methods stubbed below."""

    pair: Pair | None
    peer_address: str | None
    scheduler: Scheduler
    broker_id: str
    interval: float
    _pair_link: PairLink | None
    _clocks: Liveness
    _replies: ReplyLimiter
    _bad_input: RateLimitedLog
    _sender: Peer | None
    _handlers: Handlers
    _ACTIVE_HANDLERS: Handlers
    _STANDBY_HANDLERS: Handlers

    if TYPE_CHECKING:

        def _send(self, identity: bytes, frames: list[p.Frame]) -> None: ...

        def _on_hello(self, identity: bytes, body: list[p.Frame]) -> None: ...

        def _new_scheduler(self) -> Scheduler: ...

        def _forget_relays(self) -> None: ...

    def _init_pair(self) -> None:
        # After a takeover: client HELLOs wait until then, or until this many workers are
        # back; the HELLOs waiting, with the key each came with.
        self._settle: tuple[float, int] | None = None
        self._waiting: dict[bytes, tuple[list[p.Frame], Peer | None]] = {}
        self._last_upkeep = time.monotonic()
        #: The loop's timed work must run by then (a report made due sooner).
        self.upkeep_by = math.inf

    # -- handlers ---------------------------------------------------------------------------

    def _on_pair(self, identity: bytes, body: list[p.Frame]) -> None:
        """A report from the other broker of our pair."""
        report = p.decode_pair(body)
        self._clocks.forget(identity)  # the other broker is no client or worker of ours
        pair = self.pair
        assert pair is not None  # a lone broker's handlers have no PAIR
        self._pair_changed(pair.heard(report, time.monotonic()))
        if pair.misconfigured is not None:
            self._bad_input.warning("ignoring the other broker's reports: %s", pair.misconfigured)

    def _on_hello_standby(self, identity: bytes, body: list[p.Frame]) -> None:
        """HELLO while not serving: a vote may make us active; else, STANDBY."""
        hello = p.decode_hello(body)
        pair = self.pair
        assert pair is not None
        now = time.monotonic()
        voter = hello.left_silent > 0
        if voter:
            log.info(
                "%s %s@%s:%s says the other broker has been silent to it for %.1fs",
                hello.role,
                p.short_id(identity),
                printable(hello.host),
                hello.pid,
                hello.left_silent,
            )
            self._pair_changed(pair.vote(now))
        if pair.serving:
            self._on_hello_active(identity, body)
            return
        # Never rate-limited: a voter told to come back soon must get its answer then.
        standby = p.Standby(pair.state.value, pair.retry_hint(now, voter))
        self._send(identity, p.encode_standby(standby))
        self._clocks.forget(identity)

    def _on_hello_active(self, identity: bytes, body: list[p.Frame]) -> None:
        """HELLO to a broker of a pair that serves; just after a takeover, a client's
        waits until the workers are back (module docstring). A worker that joins is
        reported to the other broker soon: it is how many that one waits for if it takes
        over (a failover shortly after a start must not find 0 there)."""
        if p.decode_hello(body).role == "client":
            if self._settle is not None:
                self._waiting[identity] = (body, self._sender)
                self._clocks.forget(identity)
                return
            self._on_hello(identity, body)
            return
        self._on_hello(identity, body)
        now = time.monotonic()
        if self._pair_link is not None:
            self._pair_link.hasten(now, self.interval / 10)
            self.upkeep_by = min(self.upkeep_by, now + self.interval / 10)
        self._settle_if_due(now)

    def _on_standby(self, identity: bytes, body: list[p.Frame]) -> None:
        """Anything else from a client or worker while not serving: go to the other broker."""
        assert self.pair is not None
        if self._replies.allow(identity):
            self._send(identity, p.encode_standby(p.Standby(self.pair.state.value)))
        self._clocks.forget(identity)

    def _on_ignored(self, identity: bytes, body: list[p.Frame]) -> None:
        """OBITUARY and DISCONNECT while not serving: supervisors tell both brokers."""
        self._clocks.forget(identity)

    # -- moves of the pair's state ------------------------------------------------------------

    def _pair_changed(self, changes: list[Change]) -> None:
        """Act on the moves of our pair's state: serve, or stop serving; tell the other."""
        for change in changes:
            self._pair_moved(change)

    def _pair_moved(self, change: Change) -> None:
        pair = self.pair
        assert pair is not None
        log.warning(
            "pair: %s -> %s (%s)%s",
            change.old.value,
            change.new.value,
            change.event.value,
            f"; serving as the active broker, term {pair.term}"
            if change.new is PairState.ACTIVE
            else "",
        )
        now = time.monotonic()
        if change.new is PairState.ACTIVE:
            # A fresh id: peers that knew this broker before it stood by must not take
            # its state for the one they left.
            self.broker_id = uuid.uuid4().hex
            self._handlers = self._ACTIVE_HANDLERS
            expected = pair.peer.workers if pair.peer is not None else 0
            self._settle = (now + self.interval, expected) if expected else None
        elif change.old is PairState.ACTIVE:
            self._stand_by()
        if self._pair_link is not None:
            self._pair_link.send(pair.report(now, len(self.scheduler.workers)), now)

    def _stand_by(self) -> None:
        """Stop serving: send every client and worker to the other broker and forget them
        (the clients re-send their unfinished tasks there, the workers say what they hold)."""
        assert self.pair is not None
        sched = self.scheduler
        standby = p.encode_standby(p.Standby(self.pair.state.value))
        for identity in [*sched.workers, *sched.clients, *self._waiting]:
            self._send(identity, standby)
        log.warning(
            "sent %d workers and %d clients to the other broker; dropped the %d tasks "
            "held here (their clients re-send them there)",
            len(sched.workers),
            len(sched.clients) + len(self._waiting),
            len(sched.tasks),
        )
        self.scheduler = self._new_scheduler()
        self.scheduler.counts = sched.counts  # the totals status shows go on counting
        self._clocks = Liveness(self.interval, self._clocks.expiry)
        self._forget_relays()
        self._settle = None
        self._waiting.clear()
        self._handlers = self._STANDBY_HANDLERS

    def _settle_if_due(self, now: float) -> None:
        """End the wait after a takeover once the workers are back or the time is up, and
        welcome the clients that waited."""
        settle = self._settle
        if settle is None or (now < settle[0] and len(self.scheduler.workers) < settle[1]):
            return
        self._settle = None
        waiting, self._waiting = self._waiting, {}
        for identity, (body, sender) in waiting.items():
            self._sender = sender  # the key its HELLO came with, as when it came
            try:
                self._on_hello(identity, body)
            finally:
                self._sender = None

    # -- timed work ---------------------------------------------------------------------------

    def _pair_upkeep(self, pair: Pair, now: float) -> None:
        # Upkeep heartbeats every peer: if it did not run for longer than the expiry
        # (the loop was stopped while it handled messages), peers may have given up on us.
        if now - self._last_upkeep > pair.expiry:
            self._stalled(pair, now, now - self._last_upkeep)
        self._last_upkeep = now
        self.upkeep_by = math.inf
        self._pair_changed(pair.upkeep(now))
        self._settle_if_due(now)
        link = self._pair_link
        if link is not None:
            link.check()
            if link.due(now):
                link.send(pair.report(now, len(self.scheduler.workers)), now)

    def _pair_due(self, pair: Pair, now: float) -> float:
        """Seconds until the pair has timed work: a report, a loss, the end of a wait."""
        due = pair.next_due(now)
        if self._pair_link is not None:
            due = min(due, self._pair_link.next_due(now))
        if self._settle is not None:
            due = min(due, max(0.0, self._settle[0] - now))
        return due

    def _check_stall(self, pair: Pair, deadline: float) -> None:
        """After each poll: if this loop stopped past ``deadline`` for longer than our
        peers wait for us, they may have gone to the other broker; stop serving and ask."""
        now = time.monotonic()
        if now - deadline > pair.late_limit():
            self._stalled(pair, now, now - deadline)

    def _stalled(self, pair: Pair, now: float, late: float) -> None:
        changes = pair.stalled(now)
        if changes:
            log.warning(
                "this broker did not run for %.1fs (stopped, or starved of CPU): its "
                "peers may have gone to the other broker; serving no one until the "
                "pair agrees again",
                late,
            )
            self._pair_changed(changes)
