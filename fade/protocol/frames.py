"""Frames: the helpers every codec of fade's protocol shares.

A frame is what a socket sends or gives: bytes, a memoryview or a zmq.Frame. These
helpers turn one into bytes without copying more than they must, measure it, and check
the shape of small bodies (one frame, a u32, a JSON object). They know no command, so
that each message family's module uses one copy of them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any, Union

import zmq

from fade.errors import ProtocolError

__all__ = [
    "Frame",
    "frame_size",
]

Frame = Union[bytes, zmq.Frame, memoryview]  # noqa: UP007 (a runtime alias on 3.10)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _bytes(frame: Frame) -> bytes:
    if isinstance(frame, zmq.Frame):  # what a socket gives: tested first
        return frame.bytes
    if isinstance(frame, bytes):
        return frame
    return bytes(frame)


def frame_size(frame: Frame) -> int:
    """Bytes in a frame (bytes, memoryview or zmq.Frame), without copying it."""
    if isinstance(frame, zmq.Frame):
        return frame.buffer.nbytes
    return memoryview(frame).nbytes


def _head(frame: Frame, size: int) -> bytes:
    """The first ``size`` bytes of a frame, without copying the rest."""
    if isinstance(frame, zmq.Frame):
        return bytes(frame.buffer[:size])
    if isinstance(frame, bytes):
        return frame[:size]
    return bytes(frame[:size])


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _unjson(body: Sequence[Frame], what: str) -> dict[str, Any]:
    if len(body) != 1:
        raise ProtocolError(f"{what} needs 1 body frame, got {len(body)}")
    try:
        data = json.loads(_bytes(body[0]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what} body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} body is not a JSON object")
    return data


def _one_frame(body: Sequence[Frame], what: str) -> bytes:
    if len(body) != 1:
        raise ProtocolError(f"{what} needs 1 body frame, got {len(body)}")
    return _bytes(body[0])


def _one_u32(body: Sequence[Frame], what: str) -> int:
    if len(body) != 1:
        raise ProtocolError(f"{what} needs 1 body frame, got {len(body)}")
    raw = _bytes(body[0])
    if len(raw) != _U32.size:
        raise ProtocolError(f"{what} body must be 4 bytes, got {len(raw)}")
    value: int = _U32.unpack(raw)[0]
    return value
