"""A broker pair: one broker serves, the other stands by and takes over (Binary Star).

::

    clients and workers: "tcp://a:5555,tcp://b:5555"
         |  to the broker they are on; if it goes silent for interval x liveness,
         |  to the other, saying so (HELLO left_silent=...): that is a *vote*
         v
    broker A (primary)  --PAIR every interval, and at each change-->  broker B (backup)
      ROUTER tcp://a:5555  <--PAIR----------------------------------  ROUTER tcp://b:5555
      ACTIVE: serves                                                  PASSIVE: answers every
                                                                      client and worker STANDBY
                                                                      ("go to the other one")

Each broker runs the machine below; it is plain data, driven by :class:`Pair` and
unit-tested without sockets (tests/test_pair.py). The broker's side of the wire is
fade/broker.py (``_on_pair``, ``_standby``), its link to the other broker
``PairLink`` in fade/brokerpair.py.

**States.** STARTING: just started, has not heard from the other broker, serves no
one. ACTIVE: serves. PASSIVE: hears the other broker, serves no one. ALONE: serves
no one and has not heard from the other broker for interval x liveness.

**The rule against split brain.** A broker that serves no one becomes ACTIVE only

1. if it is the primary, when the other broker says it serves no one either
   (starting, passive or alone), in a report that acknowledges one of ours sent in
   our current state and within the expiry: so the report is younger than the time
   the other would need to lose us and take over, and one queued while this broker
   was frozen, or held up in the network, cannot make it active. (The backup never
   takes over this way: when neither serves and both can see each other, the
   primary goes first, at start-up and after any restart.) Or,
2. either broker, when it has not heard from the other for the expiry (ALONE) *and*
   a client or worker comes to it saying that the other broker went silent on it
   too (a vote: two of three parties agree that the other is gone). Binary Star
   counts any client request as a vote; here a client that merely lists this broker
   first, or was sent on by the other broker, does not vote, so a restarted broker
   that cannot see its peer never takes clients away from an active one.

A broker whose own loop stopped for longer than its peers wait for it (SIGSTOP,
swapping) no longer knows whether it was replaced: it stops serving (STALLED: ALONE)
and asks again. When both claim ACTIVE (after a partition that cut clients off from
one broker each), the higher claim wins: the later takeover (``term``), then the
primary. Failure cases are in docs/reliability.md.
"""

from __future__ import annotations

import collections
import enum
import math
import os
from dataclasses import dataclass

from fade import protocol as p
from fade.lifecycle import IllegalTransition

__all__ = [
    "BACKUP_MOVES",
    "PRIMARY_MOVES",
    "Pair",
    "PairEvent",
    "PairState",
    "Role",
    "step",
]


class Role(enum.Enum):
    """How a broker of a pair was started: the primary settles ties."""

    PRIMARY = "primary"
    BACKUP = "backup"


class PairState(enum.Enum):
    """Where a broker of a pair stands; only ACTIVE serves clients and workers."""

    STARTING = "starting"  # has not heard from the other broker yet
    ACTIVE = "active"  # serves
    PASSIVE = "passive"  # hears the other broker; serves no one
    ALONE = "alone"  # serves no one and has lost the other broker: a vote makes it ACTIVE


class PairEvent(enum.Enum):
    """What can happen to a broker of a pair (see :meth:`Pair.heard` for how a report
    from the other broker becomes one)."""

    PEER_IDLE = "peer idle"  # it serves no one (starting, passive or alone), lately said
    PEER_HEARD = "peer heard"  # idle too, but its report may predate our state: it is alive
    PEER_ACTIVE = "peer active"  # it serves, and its claim is higher than ours
    PEER_OUTRANKED = "peer outranked"  # it serves, but we do with a higher claim: it yields
    PEER_LOST = "peer lost"  # nothing from it for interval x liveness
    VOTE = "vote"  # a client or worker says the other broker went silent on it
    STALLED = "stalled"  # our own loop stopped longer than our peers wait for us


_S, _E = PairState, PairEvent

#: The moves of the primary: (state, event) -> new state. Absent: the event cannot
#: happen in that state (Pair never makes it), and step() raises IllegalTransition.
PRIMARY_MOVES: dict[tuple[PairState, PairEvent], PairState] = {
    # Neither serves, and the other says so in a fresh report: the primary goes first.
    (_S.STARTING, _E.PEER_IDLE): _S.ACTIVE,
    (_S.STARTING, _E.PEER_HEARD): _S.STARTING,
    (_S.STARTING, _E.PEER_ACTIVE): _S.PASSIVE,
    (_S.STARTING, _E.PEER_LOST): _S.ALONE,
    (_S.STARTING, _E.VOTE): _S.STARTING,  # not lost yet: the voter may be wrong
    (_S.STARTING, _E.STALLED): _S.STARTING,
    (_S.ACTIVE, _E.PEER_IDLE): _S.ACTIVE,
    (_S.ACTIVE, _E.PEER_HEARD): _S.ACTIVE,
    (_S.ACTIVE, _E.PEER_ACTIVE): _S.PASSIVE,  # a later takeover: yield to it
    (_S.ACTIVE, _E.PEER_OUTRANKED): _S.ACTIVE,
    (_S.ACTIVE, _E.PEER_LOST): _S.ACTIVE,  # the other died: go on serving
    (_S.ACTIVE, _E.VOTE): _S.ACTIVE,
    (_S.ACTIVE, _E.STALLED): _S.ALONE,  # we may have been replaced meanwhile: ask
    (_S.PASSIVE, _E.PEER_IDLE): _S.ACTIVE,
    (_S.PASSIVE, _E.PEER_HEARD): _S.PASSIVE,
    (_S.PASSIVE, _E.PEER_ACTIVE): _S.PASSIVE,
    (_S.PASSIVE, _E.PEER_LOST): _S.ALONE,
    (_S.PASSIVE, _E.VOTE): _S.PASSIVE,  # the other is alive: the voter cannot reach it
    (_S.PASSIVE, _E.STALLED): _S.PASSIVE,
    (_S.ALONE, _E.PEER_IDLE): _S.ACTIVE,
    (_S.ALONE, _E.PEER_HEARD): _S.PASSIVE,  # not lost after all: votes no longer count
    (_S.ALONE, _E.PEER_ACTIVE): _S.PASSIVE,
    (_S.ALONE, _E.PEER_LOST): _S.ALONE,
    (_S.ALONE, _E.VOTE): _S.ACTIVE,  # two of three say the other is gone
    (_S.ALONE, _E.STALLED): _S.ALONE,
}

#: The backup's moves: the primary's, except that the backup never goes first.
BACKUP_MOVES: dict[tuple[PairState, PairEvent], PairState] = {
    **PRIMARY_MOVES,
    (_S.STARTING, _E.PEER_IDLE): _S.PASSIVE,
    (_S.PASSIVE, _E.PEER_IDLE): _S.PASSIVE,
    (_S.ALONE, _E.PEER_IDLE): _S.PASSIVE,
}

_MOVES = {Role.PRIMARY: PRIMARY_MOVES, Role.BACKUP: BACKUP_MOVES}


def step(role: Role, state: PairState, event: PairEvent) -> PairState:
    """The state ``event`` moves a broker of ``role`` to from ``state``; raises
    IllegalTransition for an event that cannot happen there (a bug)."""
    new = _MOVES[role].get((state, event))
    if new is None:
        raise IllegalTransition(f"pair {role.value}: {event.value} in {state.name}")
    return new


@dataclass(frozen=True, slots=True)
class Change:
    """A move the machine made, for the broker to act on and log."""

    old: PairState
    new: PairState
    event: PairEvent


class Pair:
    """One broker's view of the pair: its state, the other broker's last report, the
    votes it was given. No sockets, no clock of its own: every call says ``now``.

    :meth:`heard`, :meth:`vote`, :meth:`upkeep` and :meth:`stalled` return the
    changes (:class:`Change`) they made, in order, which the broker acts on; :meth:`report`
    is what it tells the other broker.
    """

    def __init__(self, role: Role, interval: float, liveness: int, now: float) -> None:
        self.role = role
        self.state = PairState.STARTING
        self.interval = interval
        self.expiry = p.expiry(interval, liveness)
        self.term = 0  # of our last active claim
        self.incarnation = os.urandom(8).hex()
        self.reports = 0  # reports made
        self._first_in_state = 1  # the number of the first report made in this state
        # When our last reports were made: an acknowledgement must name a recent one.
        self._made: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._kept = 2 * liveness + 16  # more than are made within the expiry
        self.peer: p.PairReport | None = None  # its last report
        self.peer_heard = now  # a start counts as a word: the loss is timed from it
        self.peer_lost = False
        self.voted = -math.inf  # when a client or worker last voted here
        self.takeovers = 0  # times this broker became active
        self.since = now  # in this state since
        self.misconfigured: str | None = None  # why the other broker's reports are ignored

    @property
    def serving(self) -> bool:
        return self.state is PairState.ACTIVE

    def report(self, now: float, workers: int = 0) -> p.PairReport:
        """The next report for the other broker (every interval, and after each change),
        saying how many ``workers`` are registered here."""
        self.reports += 1
        self._made[self.reports] = now
        while len(self._made) > self._kept:
            self._made.popitem(last=False)
        peer = self.peer
        ack = (peer.incarnation, peer.number) if peer is not None else None
        return p.PairReport(
            self.role.value,
            self.state.value,
            self.term,
            self.incarnation,
            self.reports,
            ack,
            workers,
        )

    # -- events -------------------------------------------------------------------------

    def heard(self, report: p.PairReport, now: float) -> list[Change]:
        """A report from the other broker."""
        if report.role == self.role.value:
            self.misconfigured = (
                f"the other broker was also started as the {self.role.value}: start one "
                "of the two with --backup and the other with --primary"
            )
            return []
        self.misconfigured = None
        self.peer = report
        self.peer_heard = now
        self.peer_lost = False
        return self._apply(self._event_for(report, now), now)

    def vote(self, now: float) -> list[Change]:
        """A client or worker came here because the other broker went silent on it."""
        self.voted = now
        return self._apply(PairEvent.VOTE, now)

    def upkeep(self, now: float) -> list[Change]:
        """Lose the other broker after the expiry; a vote given within the expiry before
        then still counts (the voter may have noticed first)."""
        if self.peer_lost or now - self.peer_heard <= self.expiry:
            return []
        self.peer_lost = True
        changes = self._apply(PairEvent.PEER_LOST, now)
        if now - self.voted <= self.expiry:
            changes += self._apply(PairEvent.VOTE, now)
        return changes

    def stalled(self, now: float) -> list[Change]:
        """Our loop did not run for longer than peers wait for us (see :meth:`late_limit`)."""
        return self._apply(PairEvent.STALLED, now)

    def next_due(self, now: float) -> float:
        """Seconds until :meth:`upkeep` may lose the other broker (at once: the takeover
        a vote waits for must not wait for the broker's next round of timed work)."""
        if self.peer_lost:
            return math.inf
        return max(0.0, self.peer_heard + self.expiry - now) + 0.001

    def late_limit(self) -> float:
        """How late a pass of the broker's loop may be before a peer may have given up
        on it: peers wait the expiry after the last message, sent at most an interval
        before the loop stopped."""
        return self.expiry - self.interval

    def retry_hint(self, now: float, voter: bool) -> float:
        """What STANDBY tells a peer: seconds after which to say HELLO here again, when
        a voter came before this broker lost the other (it will soon); 0: go to the other."""
        if not voter or self.state is PairState.ACTIVE or self.peer_lost:
            return 0.0
        left = self.peer_heard + self.expiry - now
        return min(self.interval, max(left, 0.0)) + self.interval / 10

    # -- the machine --------------------------------------------------------------------

    def _event_for(self, report: p.PairReport, now: float) -> PairEvent:
        """The event a report is. A report that the other serves no one counts as such
        only if it acknowledges a recent report of ours in our current state (rule 1 in
        the module docstring); otherwise it may be out of date, and says only that the
        other is alive."""
        if report.state == PairState.ACTIVE.value:
            if self.serving and self._outranks(report):
                return PairEvent.PEER_OUTRANKED
            return PairEvent.PEER_ACTIVE
        if not self._acknowledges(report, now):
            return PairEvent.PEER_HEARD
        return PairEvent.PEER_IDLE

    def _acknowledges(self, report: p.PairReport, now: float) -> bool:
        ack = report.ack
        if ack is None or ack[0] != self.incarnation or ack[1] < self._first_in_state:
            return False
        return self._made.get(ack[1], -math.inf) >= now - self.expiry

    def _outranks(self, report: p.PairReport) -> bool:
        """Whether our active claim is higher than the other's: the later takeover, then
        the primary."""
        ours = (self.term, self.role is Role.PRIMARY)
        return ours > (report.term, report.role == Role.PRIMARY.value)

    def _apply(self, event: PairEvent, now: float) -> list[Change]:
        old = self.state
        new = step(self.role, old, event)
        if new is old:
            return []
        self.state = new
        self._first_in_state = self.reports + 1
        self.since = now
        if new is PairState.ACTIVE:
            self.term = max(self.term, self.peer.term if self.peer is not None else 0) + 1
            self.takeovers += 1
        return [Change(old, new, event)]
