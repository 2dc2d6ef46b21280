"""Small control bodies: the messages that steer the flow of tasks rather than carry them.

A worker's credits (READY), the pool's capacity and a client's backlog (in HEARTBEAT), a
worker's DRAIN, the payload of a task the broker refused, and stopping tasks: TERMINATE
from a client, STOP to a worker, and the NOTICE a client is told about its tasks. Each
body is a u32, a list of ids or keys, or a small JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fade.errors import ProtocolError
from fade.protocol.batch import Payload
from fade.protocol.envelope import _HEADERS, MAX_ERROR_TEXT, Command
from fade.protocol.frames import _U32, _U64, Frame, _json, _one_frame, _one_u32, _unjson
from fade.protocol.keys import KEY_SIZE

__all__ = [
    "MAX_BACKLOG",
    "decode_backlog",
    "decode_capacity",
    "decode_drain",
    "decode_notice",
    "decode_ready",
    "decode_refusal",
    "decode_stop",
    "decode_terminate",
    "encode_backlog",
    "encode_capacity",
    "encode_notice",
    "encode_ready",
    "encode_refusal",
    "encode_stop",
    "encode_terminate",
]

#: A client's backlog is reported up to this count (the most a u32 holds).
MAX_BACKLOG = 2**32 - 1


# -- small numeric bodies -------------------------------------------------------


def encode_ready(credits: int) -> list[Frame]:
    return [_HEADERS[Command.READY], _U32.pack(credits)]


def decode_ready(body: Sequence[Frame]) -> int:
    return _one_u32(body, "READY")


def encode_capacity(command: Command, capacity: int) -> list[Frame]:
    """HEARTBEAT from broker to client, telling the pool's current capacity."""
    return [_HEADERS[command], _U32.pack(capacity)]


def decode_capacity(body: Sequence[Frame]) -> int | None:
    """The capacity carried by a broker HEARTBEAT, or None when it carries none."""
    if not body:
        return None
    return _one_u32(body, "HEARTBEAT")


def encode_backlog(backlog: int) -> list[Frame]:
    """HEARTBEAT from client to broker, telling how many tasks it holds back for want of
    room at the broker (cut to MAX_BACKLOG). A broker of before this field ignores it."""
    return [_HEADERS[Command.HEARTBEAT], _U32.pack(min(max(backlog, 0), MAX_BACKLOG))]


def decode_backlog(body: Sequence[Frame]) -> int | None:
    """The backlog carried by a client HEARTBEAT, or None when it carries none."""
    if not body:
        return None
    return _one_u32(body, "HEARTBEAT")


def decode_drain(body: Sequence[Frame]) -> None:
    if body:
        raise ProtocolError("DRAIN carries no body")


# -- REFUSED: the payload of a task the broker refused ---------------------------------


def decode_refusal(payload: Payload) -> tuple[str, str]:
    """A REFUSED result's (kind, message); kinds are listed in docs/protocol.md."""
    try:
        data = json.loads(payload.inline)
        return str(data["error"]), str(data["message"])
    except (ValueError, KeyError, TypeError):
        return "unknown", "the broker refused the task"


def encode_refusal(kind: str, message: str) -> Payload:
    return Payload(_json({"error": kind, "message": message}))


# -- stopping tasks: TERMINATE, STOP; and NOTICE ----------------------------------------


def encode_terminate(task_ids: Sequence[int]) -> list[Frame]:
    """TERMINATE: the client's ids of tasks to stop, queued or running (u64 each)."""
    return [_HEADERS[Command.TERMINATE], b"".join(_U64.pack(i) for i in task_ids)]


def decode_terminate(body: Sequence[Frame]) -> list[int]:
    raw = _one_frame(body, "TERMINATE")
    if len(raw) % _U64.size:
        raise ProtocolError("TERMINATE body is not a whole number of u64 ids")
    return [i for (i,) in _U64.iter_unpack(raw)]


def encode_stop(keys: Sequence[bytes]) -> list[Frame]:
    """STOP: keys of tasks the worker holds that it must stop (running) or drop (not yet)."""
    return [_HEADERS[Command.STOP], b"".join(keys)]


def decode_stop(body: Sequence[Frame]) -> list[bytes]:
    raw = _one_frame(body, "STOP")
    if len(raw) % KEY_SIZE:
        raise ProtocolError("STOP body is not a whole number of task keys")
    return [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]


def encode_notice(message: str, task_ids: Sequence[int]) -> list[Frame]:
    """NOTICE: a warning about some of the client's tasks (they wait for resources no
    connected worker has, say); the client logs it."""
    return [_HEADERS[Command.NOTICE], _json({"message": message, "tasks": list(task_ids)})]


def decode_notice(body: Sequence[Frame]) -> tuple[str, list[int]]:
    data = _unjson(body, "NOTICE")
    message, tasks = data.get("message"), data.get("tasks", [])
    if not isinstance(message, str) or not isinstance(tasks, list):
        raise ProtocolError("NOTICE needs a message and a list of task ids")
    return message[: MAX_ERROR_TEXT * 5], [t for t in tasks if isinstance(t, int)]
