"""Reports: OBITUARY, ALIVE, ENVIRONMENTS, STATUS and STATE.

What a supervisor says of a worker process that died or of those that live (ALIVE: a
list of identities, the one report that is not JSON), what a worker has of installed
packages (fade/environments.py), and the pool's state for operators' tools
(fade/status.py). Each body is one JSON object, checked on the way in. None is on a
task's path, so they are apart from the batches and from the handshake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fade.errors import ProtocolError
from fade.protocol.envelope import _HEADERS, Command
from fade.protocol.frames import Frame, _bytes, _json, _unjson, frame_size

__all__ = [
    "ALIVE_LIMIT",
    "ENVIRONMENTS_LIMIT",
    "decode_alive",
    "decode_environments",
    "decode_obituary",
    "decode_state",
    "decode_status",
    "encode_alive",
    "encode_environments",
    "encode_obituary",
    "encode_state",
    "encode_status",
]

# -- OBITUARY: a supervisor's word that a worker process died ---------------------


def encode_obituary(identity: bytes, info: dict[str, Any]) -> list[Frame]:
    return [_HEADERS[Command.OBITUARY], identity, _json(info)]


def decode_obituary(body: Sequence[Frame]) -> tuple[bytes, dict[str, Any]]:
    if len(body) != 2:
        raise ProtocolError(f"OBITUARY needs 2 frames, got {len(body)}")
    return _bytes(body[0]), _unjson(body[1:], "OBITUARY")


# -- ALIVE: a supervisor's word that its worker processes live and run --------------------

#: The most identities one ALIVE may name (a supervisor of more sends several).
ALIVE_LIMIT = 1024


def encode_alive(identities: Sequence[bytes]) -> list[Frame]:
    return [_HEADERS[Command.ALIVE], *identities]


def decode_alive(body: Sequence[Frame]) -> list[bytes]:
    if len(body) > ALIVE_LIMIT:
        raise ProtocolError(f"ALIVE names at most {ALIVE_LIMIT} workers, got {len(body)}")
    identities = [_bytes(frame) for frame in body]
    if any(not 1 <= len(identity) <= 255 for identity in identities):
        raise ProtocolError("ALIVE names an identity that is empty or over 255 bytes")
    return identities


# -- ENVIRONMENTS: what a worker has of installed packages (fade/environments.py) --------

#: An ENVIRONMENTS body is at most this many bytes; longer lists are cut by the worker.
ENVIRONMENTS_LIMIT = 64 * 1024
_ENV_TEXT = 200  # the longest string in it


def encode_environments(report: dict[str, Any]) -> list[Frame]:
    """ENVIRONMENTS: one JSON object, ``{"environments": [{"id", "packages", "where",
    "tasks"}...], "cache": {"distributions": [[name, version, bytes]...], "bytes",
    "limit"}}`` (see docs/protocol.md)."""
    return [_HEADERS[Command.ENVIRONMENTS], _json(report)]


def decode_environments(body: Sequence[Frame]) -> dict[str, Any]:
    """A checked ENVIRONMENTS report, rebuilt from its known keys only."""
    if len(body) == 1 and frame_size(body[0]) > ENVIRONMENTS_LIMIT:
        raise ProtocolError(f"ENVIRONMENTS is over {ENVIRONMENTS_LIMIT} bytes")
    data = _unjson(body, "ENVIRONMENTS")
    try:
        environments = [
            {
                "id": _text(env["id"]),
                "packages": [_text(p) for p in _items(env["packages"], 256)],
                "where": _text(env["where"]),
                "tasks": _count(env["tasks"]),
            }
            for env in _items(data.get("environments", []), 64)
        ]
        cache = data.get("cache", {})
        if not isinstance(cache, dict):
            raise TypeError("cache")
        cached = [
            [_text(name), _text(version), _count(size)]
            for name, version, size in _items(cache.get("distributions", []), 512)
        ]
        totals = {k: _count(cache.get(k, 0)) for k in ("bytes", "limit")}
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed ENVIRONMENTS ({exc})") from None
    return {"environments": environments, "cache": {"distributions": cached, **totals}}


def _items(value: object, most: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise TypeError(f"a list of at most {most} items expected")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > _ENV_TEXT:
        raise TypeError(f"a string of at most {_ENV_TEXT} characters expected")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("a count expected")
    return value


# -- STATUS / STATE (operators' tools; see fade/status.py) -------------------------


def encode_status() -> list[Frame]:
    """STATUS: no body. Any peer may ask, without HELLO; the broker answers STATE."""
    return [_HEADERS[Command.STATUS]]


def decode_status(body: Sequence[Frame]) -> None:
    if body:
        raise ProtocolError("STATUS carries no body")


def encode_state(state: dict[str, Any]) -> list[Frame]:
    """STATE: one JSON object, the broker's :meth:`~fade.broker.Broker.snapshot`."""
    return [_HEADERS[Command.STATE], _json(state)]


def decode_state(body: Sequence[Frame]) -> dict[str, Any]:
    data = _unjson(body, "STATE")
    for name, kind in (("broker_id", str), ("workers", list), ("tasks_done", int)):
        if not isinstance(data.get(name), kind):
            raise ProtocolError(f"STATE lacks {name!r} or it is not a {kind.__name__}")
    return data
