"""The byte layout of task and result payloads: their tables, built and read in one place.

::

    serialization.dumps_task ── pack_call(code, env, setup, fn, args, refs, segs) ──> inline
    worker: code_version, environment_of, executor_setup, data_refs, segment_refs
            split_call + insert_data (serialization.loads_call) <── inline + frames
    serialization.dumps_value ── pack_result(pickle, segs) ──> inline
    client: result_segments, result_pickle (serialization.loads_value) <── inline

Separate from fade/serialization.py, which pickles and unpickles: this module knows
where each part of a payload sits and checks it, and nothing about pickles. A worker
reads a task's code version, environment, setup and tables before it unpickles anything.

Task inline layout: ``u8 code version size (| 0x80: a setup follows, | 0x40: segments
follow), u8 environment size, u32 function size, u16 refs``; ``u32 setup size`` and
``u16 segments`` when the flags say so; the refs (``u16 position, 32-byte content id,
u64 size`` each); the segments (``u16 position, 16-byte name, u64 size`` each); then
the code version, the environment, the setup, the function and the arguments. The
setup is ``16-byte executor id, u32 max_tasks_per_child`` and the pickled
``(initializer, initargs)``.

A result payload is the pickled value inline, and its large buffers apart; when some
of them travel through shared memory, the inline starts with ``b"S"``, ``u16
segments`` and their table (a pickle never starts with ``S``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fade.data import DataRef
from fade.errors import SerializationError
from fade.protocol import Payload
from fade.shm import SEGMENT_SIZE, SegmentRef, pack_table, unpack_table

__all__ = [
    "RESULT_SEGMENTS",
    "ExecutorSetup",
    "Resolver",
    "code_version",
    "data_refs",
    "environment_of",
    "executor_setup",
    "insert_data",
    "pack_call",
    "pack_result",
    "pack_setup",
    "result_pickle",
    "result_segments",
    "segment_refs",
    "split_call",
    "with_data_inline",
]

#: code version size (| _HAS_SETUP), environment size, function pickle size, refs
_CALL = struct.Struct("<BBIH")
#: In the code version size byte (which is 0 or 16): an executor setup follows the header;
#: a segment table follows the refs.
_HAS_SETUP = 0x80
_HAS_SEGMENTS = 0x40
_SIZE_BITS = 0x3F
_SETUP_SIZE = struct.Struct("<I")
_COUNT = struct.Struct("<H")
#: A result whose buffers are partly in shared memory starts with this, then its table.
RESULT_SEGMENTS = b"S"
_SETUP = struct.Struct("<16sI")  # executor id, max_tasks_per_child (0: no limit)
_REF = struct.Struct("<H32sQ")  # position among the buffers, content id, size


def pack_call(
    code: bytes,
    env: bytes,
    setup: bytes,
    fn_bytes: bytes,
    arg_bytes: bytes,
    refs: Sequence[DataRef] = (),
    segs: Sequence[SegmentRef] = (),
) -> bytes:
    """A task payload's inline bytes: header, [setup size], [segments], refs, segments,
    code version, environment, setup, function, arguments (see the module's docstring)."""
    table = b"".join([_REF.pack(r.position, r.cid, r.size) for r in refs]) if refs else b""
    if setup or segs:
        flags = (_HAS_SETUP if setup else 0) | (_HAS_SEGMENTS if segs else 0)
        head = _CALL.pack(len(code) | flags, len(env), len(fn_bytes), len(refs))
        if setup:
            head += _SETUP_SIZE.pack(len(setup))
        if segs:
            head += _COUNT.pack(len(segs))
            table += pack_table(segs)
        return b"".join((head, table, code, env, setup, fn_bytes, arg_bytes))
    head = _CALL.pack(len(code), len(env), len(fn_bytes), len(refs))
    return b"".join((head, table, code, env, fn_bytes, arg_bytes))


def _header(inline: bytes) -> tuple[int, int, int, int, int, int, int]:
    """(code version size, environment size, function size, refs, segments, setup size,
    where the tables start) of a task payload's inline bytes."""
    if len(inline) < _CALL.size:
        raise SerializationError("a task payload is too short")
    code_size, env_size, fn_size, nrefs = _CALL.unpack_from(inline)
    at = _CALL.size
    setup_size = nsegs = 0
    if code_size & _HAS_SETUP:
        if len(inline) < at + _SETUP_SIZE.size:
            raise SerializationError("a task payload is too short")
        (setup_size,) = _SETUP_SIZE.unpack_from(inline, at)
        at += _SETUP_SIZE.size
    if code_size & _HAS_SEGMENTS:
        if len(inline) < at + _COUNT.size:
            raise SerializationError("a task payload is too short")
        (nsegs,) = _COUNT.unpack_from(inline, at)
        at += _COUNT.size
    return code_size & _SIZE_BITS, env_size, fn_size, nrefs, nsegs, setup_size, at


def split_call(inline: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes, int]:
    """(code version, environment, executor setup, function pickle, arguments pickle,
    number of refs and segments)."""
    start, env, setup, fn, args, tables = _sections(inline)
    parts = inline[start:env], inline[env:setup], inline[setup:fn], inline[fn:args], inline[args:]
    return (*parts, tables)


def _sections(inline: bytes) -> tuple[int, int, int, int, int, int]:
    """Where a task payload's code version, environment, setup, function and arguments
    start, and its number of refs and segments. The worker reads the code version and
    the environment before the call: one section each, not copies of all five (the
    arguments may be large)."""
    code_size, env_size, fn_size, nrefs, nsegs, setup_size, start = _header(inline)
    start += nrefs * _REF.size + nsegs * SEGMENT_SIZE
    env = start + code_size
    setup = env + env_size
    fn = setup + setup_size
    args = fn + fn_size
    if args > len(inline):
        raise SerializationError("a task payload is shorter than its header says")
    return start, env, setup, fn, args, nrefs + nsegs


def _tables(payload: Payload) -> tuple[list[DataRef], list[SegmentRef]]:
    """The buffers a task payload names by content, and those in shared memory (both
    empty for most tasks)."""
    inline = payload.inline
    _, _, _, nrefs, nsegs, _, start = _header(inline)
    if not nrefs and not nsegs:
        return [], []
    end = start + nrefs * _REF.size
    if len(inline) < end + nsegs * SEGMENT_SIZE:
        raise SerializationError("a task payload's data refs run past it")
    refs = [DataRef(*fields) for fields in _REF.iter_unpack(inline[start:end])]
    segs = unpack_table(inline, nsegs, end) if nsegs else []
    total = len(payload.buffers) + nrefs + nsegs
    positions = [ref.position for ref in refs] + [seg.position for seg in segs]
    if len(set(positions)) != len(positions) or any(pos >= total for pos in positions):
        raise SerializationError("a task payload's data refs name impossible positions")
    return refs, segs


def data_refs(payload: Payload) -> list[DataRef]:
    """The buffers a task payload names by content (empty for most tasks)."""
    return _tables(payload)[0]


def segment_refs(payload: Payload) -> list[SegmentRef]:
    """The buffers a task payload has in shared memory (empty for most tasks)."""
    return _tables(payload)[1]


#: Given a task's refs (or segments), their buffers in order.
Resolver = Callable[[list[Any]], Sequence[Any]]


def with_data_inline(
    payload: Payload, resolve: Resolver, resolve_segments: Resolver | None = None
) -> Payload:
    """``payload`` with the buffers it names by content or has in shared memory resolved
    and carried as plain frames: for a process that has no data cache of its own."""
    refs, segs = _tables(payload)
    if not refs and not segs:
        return payload
    buffers = list(payload.buffers)
    insert_data(payload, buffers, resolve, resolve_segments)
    inline = payload.inline
    code_size, env_size, fn_size, nrefs = _CALL.unpack_from(inline)
    *_, start = _header(inline)
    head = _CALL.pack(code_size & ~_HAS_SEGMENTS, env_size, fn_size, 0)
    if code_size & _HAS_SETUP:
        head += inline[_CALL.size : _CALL.size + _SETUP_SIZE.size]
    rest = inline[start + nrefs * _REF.size + len(segs) * SEGMENT_SIZE :]
    return Payload(head + rest, tuple(buffers))


def insert_data(
    payload: Payload,
    buffers: list[Any],
    resolve: Resolver | None,
    resolve_segments: Resolver | None = None,
) -> None:
    """Put the buffers the payload names by content or has in shared memory in their
    places among ``buffers``."""
    refs, segs = _tables(payload)
    placed: list[tuple[int, Any]] = []
    tables: list[tuple[list[Any], Resolver | None, str]] = [
        (refs, resolve, "data by content"),
        (segs, resolve_segments, "shared memory"),
    ]
    for table, resolver, what in tables:
        if not table:
            continue
        if resolver is None:
            raise SerializationError(f"a task has {what} and nothing resolves it")
        data = resolver(table)
        if len(data) != len(table):
            raise SerializationError(f"a task's {what} was not resolved")
        placed += [(ref.position, view) for ref, view in zip(table, data)]
    for position, view in sorted(placed, key=lambda pair: pair[0]):
        buffers.insert(position, view)


def code_version(payload: Payload) -> bytes:
    """The code version a task payload names (b"" for none)."""
    inline = payload.inline
    start, env = _sections(inline)[:2]
    return inline[start:env]


def environment_of(payload: Payload) -> bytes:
    """The package environment a task payload names (b"" for none)."""
    inline = payload.inline
    env, setup = _sections(inline)[1:3]
    return inline[env:setup]


# -- the executor setup: initializer, initargs, max_tasks_per_child ------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorSetup:
    """What a task payload says about its executor's set-up (see fade/initializer.py)."""

    executor_id: bytes
    max_tasks: int  # tasks of this executor a worker process runs before it retires; 0: no limit
    initializer: bytes  # pickled (initializer, initargs); b"" for none


def pack_setup(executor_id: bytes, max_tasks: int, initializer: bytes) -> bytes:
    """The setup section of every task of one executor (see the module's docstring)."""
    return _SETUP.pack(executor_id, max_tasks) + initializer


def executor_setup(payload: Payload) -> ExecutorSetup | None:
    """The setup a task payload carries; None for a task of an executor without one."""
    if not payload.inline or not payload.inline[0] & _HAS_SETUP:
        return None
    inline = payload.inline
    start, end = _sections(inline)[2:4]
    setup = inline[start:end]
    if len(setup) < _SETUP.size:
        raise SerializationError("a task's executor setup is too short")
    executor_id, max_tasks = _SETUP.unpack_from(setup)
    return ExecutorSetup(executor_id, max_tasks, setup[_SETUP.size :])


# -- results -------------------------------------------------------------------------------------


def pack_result(data: bytes, segs: Sequence[SegmentRef]) -> bytes:
    """A result's inline bytes: its pickle, after the table of the buffers it has in
    shared memory (just the pickle when it has none)."""
    if not segs:
        return data
    return RESULT_SEGMENTS + _COUNT.pack(len(segs)) + pack_table(segs) + data


def result_segments(payload: Payload) -> list[SegmentRef]:
    """The buffers a result has in shared memory (empty for most); [] if malformed."""
    inline = payload.inline
    if inline[:1] != RESULT_SEGMENTS or len(inline) < 1 + _COUNT.size:
        return []
    (count,) = _COUNT.unpack_from(inline, 1)
    try:
        return unpack_table(inline, count, 1 + _COUNT.size)
    except ValueError:
        return []


def result_pickle(inline: bytes | memoryview, segs: Sequence[SegmentRef]) -> memoryview:
    """The pickle of a result whose inline starts with the table of ``segs``."""
    return memoryview(inline)[1 + _COUNT.size + len(segs) * SEGMENT_SIZE :]
