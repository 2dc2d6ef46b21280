"""A broker pair's messages: PAIR between the two brokers, STANDBY to their peers.

fade/pair.py decides (a state machine with no sockets); this module only says what the
brokers tell each other, and what a passive broker tells a client or worker that comes
to it. Apart from the rest because only a pair (``--peer``) ever sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fade.errors import ProtocolError
from fade.protocol.envelope import _HEADERS, Command
from fade.protocol.frames import Frame, _json, _unjson

__all__ = [
    "PAIR_ROLES",
    "PAIR_STATES",
    "PairReport",
    "Standby",
    "decode_pair",
    "decode_standby",
    "encode_pair",
    "encode_standby",
]

#: The roles a pair's brokers are started in, and the states they report.
PAIR_ROLES = ("primary", "backup")
PAIR_STATES = ("starting", "active", "passive", "alone")


@dataclass(frozen=True, slots=True)
class PairReport:
    """What a broker of a pair tells the other, every interval and at each change."""

    role: str  # one of PAIR_ROLES
    state: str  # one of PAIR_STATES
    term: int  # the takeover its last active claim came from: the higher claim wins
    incarnation: str  # random for each broker process: tells a restarted broker apart
    number: int  # counts this incarnation's reports
    #: (incarnation, number) of the last report heard from the other broker; None: none yet.
    ack: tuple[str, int] | None = None
    workers: int = 0  # worker processes registered here (an active broker has some)


def encode_pair(report: PairReport) -> list[Frame]:
    fields: dict[str, Any] = {
        "role": report.role,
        "state": report.state,
        "term": report.term,
        "incarnation": report.incarnation,
        "number": report.number,
        "workers": report.workers,
    }
    if report.ack is not None:
        fields["ack"] = list(report.ack)
    return [_HEADERS[Command.PAIR], _json(fields)]


def decode_pair(body: Sequence[Frame]) -> PairReport:
    data = _unjson(body, "PAIR")
    role, state = data.get("role"), data.get("state")
    if role not in PAIR_ROLES or state not in PAIR_STATES:
        raise ProtocolError(f"PAIR with unknown role {role!r} or state {state!r}")
    incarnation = data.get("incarnation")
    if not isinstance(incarnation, str):
        raise ProtocolError("PAIR needs an incarnation (text)")
    ack = data.get("ack")
    if ack is not None:
        if not (isinstance(ack, list) and len(ack) == 2 and isinstance(ack[0], str)):
            raise ProtocolError("PAIR field 'ack' must be [incarnation, number]")
        ack = (ack[0][:64], _pair_count(ack[1], "ack"))
    term, number = _pair_count(data.get("term"), "term"), _pair_count(data.get("number"), "number")
    workers = _pair_count(data.get("workers", 0), "workers")
    return PairReport(role, state, term, incarnation[:64], number, ack, workers)


@dataclass(frozen=True, slots=True)
class Standby:
    """A passive broker's answer to a client or worker: it serves no one."""

    state: str  # one of PAIR_STATES (never "active")
    #: Seconds after which to say HELLO here again: this broker expects to take over
    #: by then (a voter came before it lost the other); 0: go to the other broker.
    retry: float = 0.0


def encode_standby(standby: Standby) -> list[Frame]:
    return [_HEADERS[Command.STANDBY], _json({"state": standby.state, "retry": standby.retry})]


def decode_standby(body: Sequence[Frame]) -> Standby:
    data = _unjson(body, "STANDBY")
    state, retry = data.get("state"), data.get("retry", 0.0)
    if state not in PAIR_STATES or isinstance(retry, bool) or not isinstance(retry, int | float):
        raise ProtocolError("STANDBY needs a pair state and a retry time")
    # A broker that asks for more than a minute is wrong; never wait on its word alone.
    return Standby(state, min(max(float(retry), 0.0), 60.0))


def _pair_count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise ProtocolError(f"PAIR field {name!r} must be a count")
    return value
