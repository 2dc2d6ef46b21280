"""The broker pair's state machine (fade/pair.py), without sockets or processes.

The tables are checked as data; then two :class:`fade.pair.Pair` objects are run on a
simulated clock, their reports carried by a simulated network that can delay, hold
back and cut them, through the failures the pair must survive.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest

from fade import protocol as p
from fade.lifecycle import IllegalTransition
from fade.pair import (
    BACKUP_MOVES,
    PRIMARY_MOVES,
    Change,
    Pair,
    PairEvent,
    PairState,
    Role,
    step,
)

INTERVAL = 1.0
LIVENESS = 3
EXPIRY = INTERVAL * LIVENESS
S, E = PairState, PairEvent
TABLES = {Role.PRIMARY: PRIMARY_MOVES, Role.BACKUP: BACKUP_MOVES}


# -- the tables -------------------------------------------------------------------------


def test_names_are_the_protocols() -> None:
    assert [s.value for s in PairState] == list(p.PAIR_STATES)
    assert [r.value for r in Role] == list(p.PAIR_ROLES)


@pytest.mark.parametrize("role", list(Role))
def test_every_event_has_a_move_except_a_rival_outranked_while_not_serving(role: Role) -> None:
    table = TABLES[role]
    missing = {(s, e) for s in PairState for e in PairEvent} - set(table)
    assert missing == {(s, E.PEER_OUTRANKED) for s in PairState if s is not S.ACTIVE}


def test_an_event_that_cannot_happen_raises() -> None:
    with pytest.raises(IllegalTransition, match="peer outranked in PASSIVE"):
        step(Role.PRIMARY, S.PASSIVE, E.PEER_OUTRANKED)


@pytest.mark.parametrize("role", list(Role))
def test_a_broker_starts_serving_only_by_the_rule(role: Role) -> None:
    """Rule 1: the primary, when the other says lately that it serves no one; rule 2:
    either, alone, and a vote. Nothing else starts a broker serving."""
    takeovers = {
        (old, event)
        for (old, event), new in TABLES[role].items()
        if new is S.ACTIVE and old is not S.ACTIVE
    }
    expected = {(S.ALONE, E.VOTE)}
    if role is Role.PRIMARY:
        expected |= {(state, E.PEER_IDLE) for state in (S.STARTING, S.PASSIVE, S.ALONE)}
    assert takeovers == expected


@pytest.mark.parametrize("role", list(Role))
def test_a_broker_that_hears_the_other_is_not_alone(role: Role) -> None:
    for event in (E.PEER_IDLE, E.PEER_HEARD, E.PEER_ACTIVE):
        assert step(role, S.ALONE, event) is not S.ALONE


@pytest.mark.parametrize("role", list(Role))
def test_a_serving_broker_stops_only_for_a_higher_claim_or_its_own_stall(role: Role) -> None:
    stops = {
        event
        for (old, event), new in TABLES[role].items()
        if old is S.ACTIVE and new is not S.ACTIVE
    }
    assert stops == {E.PEER_ACTIVE, E.STALLED}


@pytest.mark.parametrize("role", list(Role))
def test_a_broker_that_hears_an_active_one_never_serves(role: Role) -> None:
    for state in PairState:
        assert step(role, state, E.PEER_ACTIVE) is not S.ACTIVE


# -- a simulated pair ------------------------------------------------------------------------


@dataclass
class Node:
    """One broker: its Pair, whether its process runs, and what it was sent."""

    role: Role
    pair: Pair
    running: bool = True
    stopped_since: float | None = None  # not running since (frozen or dead)
    dead: bool = False
    last_pass: float = 0.0
    next_report: float = 0.0
    changes: list[Change] = field(default_factory=list)


class Sim:
    """Two brokers on a clock of our own; reports take ``delay`` seconds, or never arrive
    while the brokers are cut off from each other; a frozen broker receives what arrived
    meanwhile when it runs again, in order."""

    def __init__(self, seed: int = 0, delay: tuple[float, float] = (0.001, 0.01)) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.delay = delay
        self.cut = False
        self.nodes = {
            "a": Node(Role.PRIMARY, Pair(Role.PRIMARY, INTERVAL, LIVENESS, 0.0)),
            "b": Node(Role.BACKUP, Pair(Role.BACKUP, INTERVAL, LIVENESS, 0.0)),
        }
        self._wire: list[tuple[float, int, str, p.PairReport]] = []
        self._order = itertools.count()
        self._last: dict[str, float] = {}  # when the last message to each arrives
        self.both_served_at: float | None = None

    def other(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def state(self, name: str) -> PairState:
        return self.nodes[name].pair.state

    # -- what happens to the brokers --------------------------------------------------

    def freeze(self, name: str) -> None:
        node = self.nodes[name]
        node.running, node.stopped_since = False, self.now

    def thaw(self, name: str) -> None:
        node = self.nodes[name]
        node.running, node.stopped_since = True, None

    def kill(self, name: str) -> None:
        self.freeze(name)
        self.nodes[name].dead = True
        self._wire = [m for m in self._wire if m[2] != name]
        heapq.heapify(self._wire)

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        self.nodes[name] = Node(node.role, Pair(node.role, INTERVAL, LIVENESS, self.now))
        self.nodes[name].last_pass = self.now

    def vote(self, name: str) -> None:
        """A client or worker comes to ``name`` saying the other went silent on it."""
        node = self.nodes[name]
        if node.running:
            self._record(node, node.pair.vote(self.now))

    # -- the clock -------------------------------------------------------------------

    def run(self, seconds: float, tick: float = INTERVAL / 10) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + tick, 9)
            for name in ("a", "b"):
                self._pass(name)
            self._check()

    def _pass(self, name: str) -> None:
        node = self.nodes[name]
        if not node.running:
            return
        pair = node.pair
        # As the broker's loop: its own stall first, then what arrived, then upkeep.
        if self.now - node.last_pass > pair.late_limit():
            self._record(node, pair.stalled(self.now))
        node.last_pass = self.now
        due = sorted(m for m in self._wire if m[0] <= self.now and m[2] == name)
        if due:
            self._wire = [m for m in self._wire if m not in due]
            heapq.heapify(self._wire)
        for message in due:
            self._record(node, pair.heard(message[3], self.now))
        self._record(node, pair.upkeep(self.now))
        if self.now >= node.next_report:
            self._send(name)

    def _record(self, node: Node, changes: list[Change]) -> None:
        node.changes += changes
        if changes and node.running:
            self._send(self._name(node))

    def _name(self, node: Node) -> str:
        return next(name for name, n in self.nodes.items() if n is node)

    def _send(self, name: str) -> None:
        node = self.nodes[name]
        node.next_report = self.now + INTERVAL
        report = node.pair.report(self.now)
        if self.cut:
            return
        to = self.other(name)
        # One connection each way, in order (TCP): never before the one sent earlier.
        at = max(self.now + self.rng.uniform(*self.delay), self._last.get(to, 0.0))
        self._last[to] = at
        heapq.heappush(self._wire, (at, next(self._order), to, report))

    def _check(self) -> None:
        """No split brain: never two running brokers serving at once."""
        a, b = self.nodes["a"], self.nodes["b"]
        both = a.running and b.running and a.pair.serving and b.pair.serving
        if both and self.both_served_at is None:
            self.both_served_at = self.now


def started() -> Sim:
    sim = Sim()
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)
    return sim


# -- scenarios -------------------------------------------------------------------------------


def test_started_together_the_primary_serves() -> None:
    sim = started()
    assert sim.nodes["a"].pair.term == 1
    assert sim.both_served_at is None


def test_backup_started_first_waits_for_the_primary() -> None:
    sim = Sim()
    sim.kill("a")
    sim.run(INTERVAL)
    assert sim.state("b") is S.STARTING
    sim.restart("a")
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)


def test_a_lone_broker_serves_only_after_a_vote() -> None:
    sim = Sim()
    sim.kill("b")
    sim.run(EXPIRY + INTERVAL)
    assert sim.state("a") is S.ALONE  # no word from the backup: it might be serving
    sim.vote("a")
    assert sim.state("a") is S.ACTIVE


def test_the_backup_takes_over_when_the_active_dies_and_a_peer_says_so() -> None:
    sim = started()
    sim.kill("a")
    sim.run(EXPIRY / 2)
    assert sim.state("b") is S.PASSIVE
    sim.run(EXPIRY)
    assert sim.state("b") is S.ALONE  # lost its peer, but no one else said so yet
    sim.vote("b")
    assert sim.state("b") is S.ACTIVE
    assert sim.nodes["b"].pair.term == 2


def test_a_vote_that_comes_before_the_loss_counts_when_the_loss_comes() -> None:
    sim = started()
    sim.kill("a")
    sim.run(EXPIRY - INTERVAL)
    pair = sim.nodes["b"].pair
    sim.vote("b")  # a client noticed first
    assert pair.state is S.PASSIVE
    hint = pair.retry_hint(sim.now, voter=True)
    assert 0 < hint <= 1.1 * INTERVAL
    assert pair.retry_hint(sim.now, voter=False) == 0  # no vote: go to the other
    sim.run(hint)
    assert pair.state is S.ACTIVE


def test_a_stale_vote_does_not_count() -> None:
    sim = started()
    sim.vote("b")  # a client that cannot reach the active broker, which is alive
    assert sim.state("b") is S.PASSIVE
    sim.run(2 * EXPIRY)
    sim.kill("a")
    sim.run(EXPIRY + INTERVAL)
    assert sim.state("b") is S.ALONE


def test_the_old_primary_restarted_joins_as_passive_then_the_pool_fails_back() -> None:
    sim = started()
    sim.kill("a")
    sim.run(EXPIRY + INTERVAL)
    sim.vote("b")
    sim.restart("a")
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.PASSIVE, S.ACTIVE)
    sim.kill("b")
    sim.run(EXPIRY + INTERVAL)
    sim.vote("a")
    assert sim.state("a") is S.ACTIVE
    assert sim.nodes["a"].pair.term == 3
    assert sim.both_served_at is None


def test_the_primary_restarted_before_anyone_noticed_serves_again() -> None:
    sim = started()
    sim.kill("a")
    sim.restart("a")
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)
    assert sim.nodes["a"].pair.term == 1


def test_the_backup_started_long_before_the_primary_leaves_it_to_the_primary() -> None:
    sim = Sim()
    sim.kill("a")
    sim.run(3 * EXPIRY)
    assert sim.state("b") is S.ALONE
    sim.restart("a")
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)


def test_the_backup_restarted_while_the_primary_stands_by_leaves_it_to_the_primary() -> None:
    sim = started()
    sim.kill("a")
    sim.run(EXPIRY + INTERVAL)
    sim.vote("b")
    sim.restart("a")
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.PASSIVE, S.ACTIVE)
    sim.kill("b")
    sim.restart("b")
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)


def test_brokers_cut_off_from_each_other_keep_one_active() -> None:
    """Clients and workers still reach both, so none votes: no split brain."""
    sim = started()
    sim.cut = True
    sim.run(10 * EXPIRY)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.ALONE)
    sim.cut = False
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)
    assert sim.both_served_at is None


def test_a_restarted_broker_that_cannot_see_an_active_one_does_not_serve() -> None:
    sim = started()
    sim.kill("a")
    sim.run(EXPIRY + INTERVAL)
    sim.vote("b")
    sim.cut = True
    sim.restart("a")
    sim.run(10 * EXPIRY)
    assert (sim.state("a"), sim.state("b")) == (S.ALONE, S.ACTIVE)
    assert sim.both_served_at is None


def test_a_frozen_active_broker_stops_serving_when_it_wakes() -> None:
    """SIGSTOP for 10 s: the backup takes over; the reports that waited for the frozen
    broker (the backup was passive) must not make it serve again when it wakes."""
    sim = started()
    sim.freeze("a")
    sim.run(EXPIRY + INTERVAL)
    sim.vote("b")
    assert sim.state("b") is S.ACTIVE
    sim.run(10 - EXPIRY - INTERVAL)
    sim.thaw("a")
    sim.run(INTERVAL / 10)
    assert sim.state("a") is not S.ACTIVE
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.PASSIVE, S.ACTIVE)
    assert sim.both_served_at is None
    events = [c.event for c in sim.nodes["a"].changes]
    assert E.STALLED in events


def test_a_short_stall_hands_back_to_the_primary() -> None:
    sim = started()
    sim.freeze("a")
    sim.run(EXPIRY - INTERVAL / 2)  # late enough to doubt, too soon for anyone to vote
    sim.thaw("a")
    sim.run(4 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)


def test_a_report_held_up_in_the_network_cannot_start_a_broker_serving() -> None:
    sim = started()
    a, b = sim.nodes["a"].pair, sim.nodes["b"].pair
    old = b.report(sim.now)  # the backup, passive, acknowledging the primary
    sim.kill("a")
    sim.run(EXPIRY + INTERVAL)
    sim.vote("b")
    assert b.serving
    a_new = Pair(Role.PRIMARY, INTERVAL, LIVENESS, sim.now)
    a_new.peer_lost = True
    assert a_new.heard(old, sim.now) == []  # acknowledges another incarnation
    # Even for the same incarnation: an acknowledgement older than the expiry is stale.
    a.state = S.ALONE
    a.heard(old, sim.now)
    assert a.state is S.PASSIVE  # alive, so not alone; but not a reason to serve


def test_two_active_brokers_keep_the_later_takeover() -> None:
    """Clients cut off from one broker each (the failure the rule cannot prevent):
    when the brokers see each other again, the higher claim wins."""
    sim = started()
    sim.cut = True
    sim.run(EXPIRY + INTERVAL)
    sim.vote("b")
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.ACTIVE)
    sim.cut = False
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.PASSIVE, S.ACTIVE)


def test_equal_claims_go_to_the_primary() -> None:
    a = Pair(Role.PRIMARY, INTERVAL, LIVENESS, 0.0)
    b = Pair(Role.BACKUP, INTERVAL, LIVENESS, 0.0)
    for pair in (a, b):
        pair.upkeep(EXPIRY + 1)
        pair.vote(EXPIRY + 1)
    assert a.serving and b.serving and a.term == b.term == 1
    assert b.heard(a.report(EXPIRY + 1), EXPIRY + 1) == [Change(S.ACTIVE, S.PASSIVE, E.PEER_ACTIVE)]
    assert a.heard(b.report(EXPIRY + 1), EXPIRY + 1) == []
    assert a.serving


def test_two_primaries_say_what_is_wrong_and_neither_serves() -> None:
    a = Pair(Role.PRIMARY, INTERVAL, LIVENESS, 0.0)
    other = Pair(Role.PRIMARY, INTERVAL, LIVENESS, 0.0)
    assert a.heard(other.report(0.1), 0.1) == []
    assert a.misconfigured is not None and "--backup" in a.misconfigured
    assert a.state is S.STARTING


def test_two_passive_brokers_settle_on_the_primary() -> None:
    sim = started()
    a = sim.nodes["a"].pair
    a.state = S.PASSIVE  # as if it had yielded to a claim that then vanished
    a._first_in_state = a.reports + 1
    sim.run(3 * INTERVAL)
    assert (sim.state("a"), sim.state("b")) == (S.ACTIVE, S.PASSIVE)


# -- random failures ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_failures_never_make_two_running_brokers_serve(seed: int) -> None:
    """Freezes, kills, restarts and cuts between the brokers at random, with reports
    delayed up to the expiry; votes come only as in life: to one broker, when the other
    has not run for the expiry (so it has been silent to its clients). Never do both
    running brokers serve; and after the failures stop, exactly one serves."""
    sim = Sim(seed, delay=(0.001, EXPIRY))
    rng = sim.rng
    for _ in range(60):
        name = rng.choice("ab")
        node = sim.nodes[name]
        action = rng.choice(["freeze", "thaw", "kill", "restart", "cut", "heal", "wait"])
        if action == "freeze" and node.running:
            sim.freeze(name)
        elif action == "thaw" and not node.running and not node.dead:
            sim.thaw(name)
        elif action == "kill" and not node.dead:
            sim.kill(name)
        elif action == "restart" and node.dead:
            sim.restart(name)
        elif action == "cut":
            sim.cut = True
        elif action == "heal":
            sim.cut = False
        for _ in range(rng.randrange(1, 30)):
            sim.run(INTERVAL / 5)
            for voter_at in ("a", "b"):
                gone = sim.nodes[sim.other(voter_at)]
                if gone.stopped_since is not None and sim.now - gone.stopped_since > EXPIRY:
                    sim.vote(voter_at)
        assert sim.both_served_at is None, f"both served at {sim.both_served_at}"
    for name in ("a", "b"):
        if sim.nodes[name].dead:
            sim.restart(name)
        else:
            sim.thaw(name)
    sim.cut = False
    sim.delay = (0.001, 0.01)
    sim.run(5 * EXPIRY)
    assert sorted(s.value for s in (sim.state("a"), sim.state("b"))) == ["active", "passive"]
    assert sim.both_served_at is None
