"""Code shipping's messages: FETCH and CODE, relayed by the broker.

A worker that lacks a task's code (fade/codecache.py) sends FETCH with the task's key;
the broker relays it to the task's client under a relay number of its own, and relays
the client's CODE back. The broker reads only the reference and the request id: the
request and the code are the client's and the worker's business. Apart because only
code shipping sends them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from fade.errors import ProtocolError
from fade.protocol.envelope import _HEADERS, Command
from fade.protocol.frames import _U32, _U64, Frame, _bytes, _json, _one_u32, _unjson
from fade.protocol.keys import KEY_SIZE

__all__ = [
    "CodeStatus",
    "decode_code",
    "decode_fetch",
    "encode_code",
    "encode_fetch",
    "pack_request",
    "unpack_request",
]


class CodeStatus(enum.IntEnum):
    """How a FETCH was answered, in CODE."""

    OK = 0  # frames: what was asked for
    MISSING = 1  # the client does not have it; frame: a reason
    GONE = 2  # broker-made: the client is not connected


def encode_fetch(ref: bytes, request_id: int, request: Frame) -> list[Frame]:
    """FETCH: [header, ref, request id, request]. From a worker, ``ref`` is the key of the
    task whose code it needs; from the broker to a client, a broker-made relay number."""
    return [_HEADERS[Command.FETCH], ref, _U32.pack(request_id), request]


def decode_fetch(body: Sequence[Frame]) -> tuple[bytes, int, Frame]:
    if len(body) != 3:
        raise ProtocolError(f"FETCH needs 3 frames, got {len(body)}")
    return _ref(body[0], "FETCH"), _one_u32(body[1:2], "FETCH"), body[2]


def pack_request(request: dict[str, Any]) -> bytes:
    return _json(request)


def unpack_request(frame: Frame) -> dict[str, Any]:
    return _unjson([frame], "FETCH request")


def encode_code(
    ref: bytes, request_id: int, status: CodeStatus, frames: Sequence[Frame]
) -> list[Frame]:
    """CODE: [header, ref, request id, status, frames...]; ``ref`` as in the FETCH answered."""
    return [_HEADERS[Command.CODE], ref, _U32.pack(request_id), bytes((status,)), *frames]


def decode_code(body: Sequence[Frame]) -> tuple[bytes, int, CodeStatus, list[Frame]]:
    if len(body) < 3:
        raise ProtocolError(f"CODE needs at least 3 frames, got {len(body)}")
    status = _bytes(body[2])
    if len(status) != 1 or status[0] not in CodeStatus._value2member_map_:
        raise ProtocolError("CODE has a bad status")
    return _ref(body[0], "CODE"), _one_u32(body[1:2], "CODE"), CodeStatus(status[0]), list(body[3:])


def _ref(frame: Frame, what: str) -> bytes:
    ref = _bytes(frame)
    if len(ref) not in (_U64.size, KEY_SIZE):
        raise ProtocolError(f"{what} has a bad reference ({len(ref)} bytes)")
    return ref
