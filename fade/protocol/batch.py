"""Task batches: SUBMIT, TASK, DONE and RESULT, and the records they carry.

The four share one layout::

    [header + u32 meta size + meta + inline, buffer frames...]

meta packs one record per item (with the sizes of its inline part and its
buffer count); inline is every item's inline bytes, concatenated. So a lone
small task is one frame, and so is a batch of a thousand: every frame costs a
send and a receive on every hop.

These are the hot path (several per task), kept apart from the rare JSON messages.
Task and result payloads are opaque to the broker: it forwards them without
unpickling or copying large buffers.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fade.errors import ProtocolError
from fade.protocol.envelope import _HEADERS, Command
from fade.protocol.frames import _U32, Frame, _bytes, frame_size
from fade.protocol.keys import NO_SCOPE

__all__ = [
    "BATCH_BYTES",
    "HEAD_ROOM",
    "SUBMIT_NATIVE",
    "DoneRecord",
    "Payload",
    "ResultRecord",
    "Status",
    "SubmitRecord",
    "TaskRecord",
    "chunked",
    "decode_done",
    "decode_result",
    "decode_submit",
    "decode_task",
    "encode_done",
    "encode_result",
    "encode_submit",
    "encode_task",
    "largest_part",
]

#: Room a batch's first frame needs beyond its items' inline bytes: the header, the meta
#: size and one record per item (the longest record is far under this).
HEAD_ROOM = 512
#: A SUBMIT flag: the task needs compiled packages of the client's, so only a worker of
#: the client's platform and ABI may run it (fade/packages.py).
SUBMIT_NATIVE = 1

#: A batch's first frame stays under this size (and under every peer's frame limit,
#: which applies to that one frame, not to each item in it).
BATCH_BYTES = 8 * 2**20

T = TypeVar("T")


class Status(enum.IntEnum):
    """How a task ended, in DONE and RESULT records."""

    OK = 0  # payload: the pickled return value
    RAISED = 1  # payload: the pickled (exception, traceback text, tracebacks.RemoteTrace)
    LOST = 2  # broker-made; payload: JSON about the lost worker
    RETURNED = 3  # worker hands the task back unrun; no payload
    REFUSED = 4  # broker-made; payload: JSON {"error": kind, "message": text}
    DECLINED = 5  # worker: its host cannot keep the task's code (a full cache disk);
    # payload as RAISED. The broker gives the task to another worker, or fails it with it


_STATUSES = {status.value: status for status in Status}  # faster than calling Status()


# task id, inline size, buffers, max attempts, timeout, priority, flags (SUBMIT_NATIVE),
# size of the resource spec
_SUBMIT = struct.Struct("<QIHHdhBH")
# key, inline size, buffers, timeout, data scope, size of the devices
_TASK = struct.Struct("<16sIHd8sH")
_DONE = struct.Struct("<16sBIH")  # key, status, inline size, buffers
_RESULT = struct.Struct("<QBIH")  # task id, status, inline size, buffers
_LONE_RESULT = struct.Struct("<IQBIH")  # a RESULT's capacity and its only record
_LONE_DONE = struct.Struct("<I16sBIH")  # a DONE's credits and its only record
_HEAD = 8  # a batch's first frame: the 4-byte header, then the u32 size of its meta


# The per-task records below are not frozen: a frozen dataclass's __init__ costs three
# times as much, several times per task. Nothing changes them once built.


@dataclass(slots=True)
class Payload:
    """A task's or result's data: small parts packed ``inline``, large buffers apart.

    In a batch, every payload's inline bytes travel together in one frame and
    each large buffer (a numpy array's memory) in a frame of its own, never copied.
    """

    inline: bytes
    buffers: tuple[Frame, ...] = ()


@dataclass(slots=True)
class SubmitRecord:
    """One task as a client submits it (the payload frames follow separately)."""

    task_id: int
    max_attempts: int  # 0: the broker's default
    timeout: float  # seconds; 0: none
    priority: int = 0  # higher runs first among this client's tasks (-32768..32767)
    #: The resources it needs, as canonical JSON ({"gpu": 1}); empty: none.
    resources: bytes = b""
    flags: int = 0  # SUBMIT_NATIVE


@dataclass(slots=True)
class TaskRecord:
    """One task as the broker hands it to a worker."""

    key: bytes
    timeout: float
    #: The devices it was given, as JSON: indices among its host's, per resource
    #: ({"gpu": [1]}: the worker sets CUDA_VISIBLE_DEVICES); empty: none.
    devices: bytes = b""
    scope: bytes = NO_SCOPE  # set by the broker: the client's data scope


@dataclass(slots=True)
class DoneRecord:
    """One result as a worker returns it."""

    key: bytes
    status: Status


@dataclass(slots=True)
class ResultRecord:
    """One result as the broker returns it to the client."""

    task_id: int
    status: Status


def chunked(
    items: Sequence[tuple[T, Payload]], limit: int = BATCH_BYTES
) -> list[list[tuple[T, Payload]]]:
    """Split items into batches whose first frame stays within ``limit`` bytes (an item
    larger than that travels alone)."""
    if len(items) == 1:  # a lone task or result: most messages
        return [list(items)]
    batches: list[list[tuple[T, Payload]]] = [[]]
    size = 0
    for item in items:
        inline = len(item[1].inline) + HEAD_ROOM
        if batches[-1] and size + inline > limit:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += inline
    return batches if batches[0] else []


def largest_part(payload: Payload) -> int:
    """The largest frame a message that carries ``payload`` alone has: its inline bytes
    travel in the first frame (with at most HEAD_ROOM more), each buffer in its own."""
    head = len(payload.inline) + HEAD_ROOM
    if not payload.buffers:
        return head
    return max(head, *(frame_size(buffer) for buffer in payload.buffers))


def _batch(command: Command, meta: bytes, payloads: Sequence[Payload]) -> list[Frame]:
    head = [_HEADERS[command], _U32.pack(len(meta)), meta]
    head.extend(payload.inline for payload in payloads)
    frames: list[Frame] = [b"".join(head)]
    for payload in payloads:
        frames.extend(payload.buffers)
    return frames


def encode_submit(tasks: Sequence[tuple[SubmitRecord, Payload]]) -> list[Frame]:
    meta = b"".join(
        _SUBMIT.pack(
            r.task_id,
            len(pl.inline),
            len(pl.buffers),
            r.max_attempts,
            r.timeout,
            r.priority,
            r.flags,
            len(r.resources),
        )
        + r.resources
        for r, pl in tasks
    )
    return _batch(Command.SUBMIT, meta, [pl for _, pl in tasks])


def decode_submit(body: Sequence[Frame]) -> list[tuple[SubmitRecord, Payload]]:
    meta, inline = _meta(body, "SUBMIT", 1)
    if len(meta) == _SUBMIT.size:  # a lone task, with no resource spec: most messages
        task_id, size, nbuf, attempts, timeout, priority, flags, _ = _SUBMIT.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "SUBMIT")
        return [(SubmitRecord(task_id, attempts, timeout, priority, flags=flags), payload)]
    records, sizes = [], []
    for (task_id, size, nbuf, attempts, timeout, priority, flags), spec in _tailed(
        meta, _SUBMIT, "SUBMIT"
    ):
        records.append(SubmitRecord(task_id, attempts, timeout, priority, spec, flags))
        sizes.append((size, nbuf))
    return list(zip(records, _split_payloads(inline, body[1:], sizes, "SUBMIT")))


def encode_task(tasks: Sequence[tuple[TaskRecord, Payload]]) -> list[Frame]:
    meta = b"".join(
        _TASK.pack(r.key, len(pl.inline), len(pl.buffers), r.timeout, r.scope, len(r.devices))
        + r.devices
        for r, pl in tasks
    )
    return _batch(Command.TASK, meta, [pl for _, pl in tasks])


def decode_task(body: Sequence[Frame]) -> list[tuple[TaskRecord, Payload]]:
    meta, inline = _meta(body, "TASK", 1)
    if len(meta) == _TASK.size:  # a lone task with no devices
        key, size, nbuf, timeout, scope, _ = _TASK.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "TASK")
        return [(TaskRecord(key, timeout, b"", scope), payload)]
    records, sizes = [], []
    for (key, size, nbuf, timeout, scope), devices in _tailed(meta, _TASK, "TASK"):
        records.append(TaskRecord(key, timeout, devices, scope))
        sizes.append((size, nbuf))
    return list(zip(records, _split_payloads(inline, body[1:], sizes, "TASK")))


def encode_done(credits: int, results: Sequence[tuple[DoneRecord, Payload]]) -> list[Frame]:
    """DONE: meta is the credits granted, then one record per result."""
    meta = _U32.pack(credits) + b"".join(
        _DONE.pack(r.key, r.status, len(pl.inline), len(pl.buffers)) for r, pl in results
    )
    return _batch(Command.DONE, meta, [pl for _, pl in results])


def decode_done(body: Sequence[Frame]) -> tuple[int, list[tuple[DoneRecord, Payload]]]:
    meta, inline = _meta(body, "DONE", 1)
    if len(meta) == _LONE_DONE.size:  # a lone result
        credits, key, status, size, nbuf = _LONE_DONE.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "DONE")
        return credits, [(DoneRecord(key, _status(status)), payload)]
    if len(meta) < _U32.size or (len(meta) - _U32.size) % _DONE.size:
        raise ProtocolError("DONE meta has a partial record")
    (credits,) = _U32.unpack_from(meta)
    records, sizes = [], []
    for key, status, size, nbuf in _DONE.iter_unpack(meta[_U32.size :]):
        records.append(DoneRecord(key, _status(status)))
        sizes.append((size, nbuf))
    return credits, list(zip(records, _split_payloads(inline, body[1:], sizes, "DONE")))


def encode_result(capacity: int, results: Sequence[tuple[ResultRecord, Payload]]) -> list[Frame]:
    """RESULT: meta is the pool's capacity, then one record per result."""
    meta = _U32.pack(capacity) + b"".join(
        _RESULT.pack(r.task_id, r.status, len(pl.inline), len(pl.buffers)) for r, pl in results
    )
    return _batch(Command.RESULT, meta, [pl for _, pl in results])


def decode_result(body: Sequence[Frame]) -> tuple[int, list[tuple[ResultRecord, Payload]]]:
    meta, inline = _meta(body, "RESULT", 1)
    if len(meta) == _LONE_RESULT.size:
        capacity, task_id, status, size, nbuf = _LONE_RESULT.unpack(meta)
        payload = _one_payload(inline, body[1:], size, nbuf, "RESULT")
        return capacity, [(ResultRecord(task_id, _status(status)), payload)]
    if len(meta) < _U32.size or (len(meta) - _U32.size) % _RESULT.size:
        raise ProtocolError("RESULT meta has a partial record")
    (capacity,) = _U32.unpack_from(meta)
    records, sizes = [], []
    for task_id, status, size, nbuf in _RESULT.iter_unpack(meta[_U32.size :]):
        records.append(ResultRecord(task_id, _status(status)))
        sizes.append((size, nbuf))
    return capacity, list(zip(records, _split_payloads(inline, body[1:], sizes, "RESULT")))


def _meta(body: Sequence[Frame], what: str, record_size: int) -> tuple[bytes, bytes]:
    """A batch's records and its items' inline bytes, cut from its first frame."""
    if not body:
        raise ProtocolError(f"{what} has no frames")
    head = _bytes(body[0])
    if len(head) < _HEAD:
        raise ProtocolError(f"{what} has no meta size")
    end = _HEAD + _U32.unpack_from(head, 4)[0]
    if end > len(head):
        raise ProtocolError(f"{what} meta runs past its frame")
    meta = head[_HEAD:end]
    if record_size > 1 and len(meta) % record_size:
        raise ProtocolError(f"{what} meta has a partial record")
    return meta, head[end:]


def _tailed(meta: bytes, layout: struct.Struct, what: str) -> list[tuple[tuple[Any, ...], bytes]]:
    """Records of a fixed layout whose last field is the size of bytes that follow it."""
    out = []
    offset, end = 0, len(meta)
    while offset < end:
        if offset + layout.size > end:
            raise ProtocolError(f"{what} meta has a partial record")
        *fields, tail = layout.unpack_from(meta, offset)
        offset += layout.size
        if offset + tail > end:
            raise ProtocolError(f"{what} record runs past its meta")
        out.append((tuple(fields), meta[offset : offset + tail]))
        offset += tail
    return out


def _one_payload(
    inline: bytes, buffers: Sequence[Frame], size: int, nbuf: int, what: str
) -> Payload:
    if size != len(inline) or nbuf != len(buffers):
        raise ProtocolError(f"{what} sizes do not match its records")
    return Payload(inline, tuple(buffers))


def _split_payloads(
    inline: bytes, buffers: Sequence[Frame], sizes: Sequence[tuple[int, int]], what: str
) -> list[Payload]:
    """Cut the inline bytes and the buffer frames back into one payload per record,
    checking that the sizes and counts add up exactly."""
    if sum(size for size, _ in sizes) != len(inline) or sum(n for _, n in sizes) != len(buffers):
        raise ProtocolError(f"{what} sizes do not match its records")
    out = []
    offset = frame = 0
    for size, nbuf in sizes:
        out.append(Payload(inline[offset : offset + size], tuple(buffers[frame : frame + nbuf])))
        offset += size
        frame += nbuf
    return out


def _status(value: int) -> Status:
    status = _STATUSES.get(value)
    if status is None:
        raise ProtocolError(f"unknown status {value}")
    return status
