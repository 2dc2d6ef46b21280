"""Turning calls and results into frames and back (cloudpickle, pickle protocol 5).

A task's payload (a :class:`fade.protocol.Payload`) packs inline
``code version | environment | [executor setup] | function | arguments`` and
carries large buffers apart:

* the code version is the 16-byte id of the client's local code (see
  fade/shipping.py), or empty; workers set that code up before unpickling;
* the environment is the 16-byte id of the installed distributions the task
  needs (fade/packages.py), or empty; a worker that lacks some runs the task in
  a process that has them (fade/environments.py);
* the executor setup is there only for an Executor made with ``initializer``
  or ``max_tasks_per_child``: its id, the task limit and the pickled
  ``(initializer, initargs)``, which a worker runs once (fade/initializer.py).
  A flag in the header says it is there;
* the function is pickled on its own, so its bytes can be reused: a function
  that pickles *by reference* (an importable module-level function) always
  pickles to the same bytes, and those are cached per function object;
  workers cache what they unpickle by those bytes;
* the arguments ``(args, kwargs)`` are pickled with protocol 5; every buffer of
  at least ``OUT_OF_BAND_MIN`` bytes (a large numpy array's data) becomes a frame of
  its own, sent without copying and rebuilt without copying;
* except buffers that travel *by content* (fade/data.py): those of at least the
  client's ``share_threshold`` and the parts of ``fade.share`` handles. The inline
  header lists them as refs (position among the buffers, content id, size) and no
  frame carries them; the worker puts in their place the mappings of its host's
  cache before unpickling;
* and buffers that travel *through shared memory* (fade/shm.py: the embedded pool's
  buffers of at least its threshold): the header lists them as segments (position,
  16-byte segment name, size); the worker maps them from its client's folder.

Inline layout: ``u8 code version size (| 0x80: a setup follows, | 0x40: segments
follow), u8 environment size, u32 function size, u16 refs``; ``u32 setup size`` and
``u16 segments`` when the flags say so; the refs (``u16 position, 32-byte content id,
u64 size`` each); the segments (``u16 position, 16-byte name, u64 size`` each); then
the code version, the environment, the setup, the function and the arguments.

:func:`dumps_tracked_call` also notes which modules the pickles refer to (for the
environment): a function pickled by reference names its module (cached with its
bytes); plain data names numpy if it holds an array; anything else is pickled by
a pickler that notes the module of every object, class and function it meets and
the names the code it pickles by value uses (``import x`` in a function body).

A result payload is the pickled value inline, and its large buffers apart; when some
of them travel through shared memory, the inline starts with ``b"S"``, ``u16
segments`` and their table (a pickle never starts with ``S``). An exception payload
is ``(exception, traceback text, RemoteTrace)`` (see
fade/tracebacks.py): the client shows the traceback with its own file names.

Code pickled by value (a function of ``__main__``, a lambda, a closure) keeps its
real file name: cloudpickle writes ``"<dynamic-code>"`` instead (to make equal
functions from different files pickle alike), which leaves a remote traceback
nothing to point at.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import sys
import types
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle
import cloudpickle.cloudpickle as _cloudpickle_impl

from fade import tracebacks
from fade.data import DataRef, DataShelf
from fade.errors import CodeShippingError, ResultDecodeError, SerializationError, TaskDecodeError
from fade.protocol import Payload
from fade.shipping import client_file
from fade.shm import SEGMENT_SIZE, ClientSegments, SegmentRef, pack_table, unpack_table

__all__ = [
    "OUT_OF_BAND_MIN",
    "ExecutorSetup",
    "FunctionCache",
    "Tracker",
    "code_version",
    "data_refs",
    "dumps_call",
    "dumps_call_shared",
    "dumps_exception",
    "dumps_parts",
    "dumps_setup",
    "dumps_task",
    "dumps_tracked_call",
    "dumps_value",
    "environment_of",
    "executor_setup",
    "loads_call",
    "loads_exception",
    "loads_initializer",
    "loads_value",
    "result_segments",
    "segment_refs",
    "with_data_inline",
]

#: Buffers at least this large travel as their own zero-copy frames.
OUT_OF_BAND_MIN = 64 * 1024

Frame = Any  # bytes, memoryview or zmq.Frame: anything exposing the buffer protocol

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
_RESULT_SEGMENTS = b"S"
_SETUP = struct.Struct("<16sI")  # executor id, max_tasks_per_child (0: no limit)
_REF = struct.Struct("<H32sQ")  # position among the buffers, content id, size

#: Functions that pickle by reference (module-level: they live as long as their module),
#: with their pickle. A plain dict: a WeakKeyDictionary's get() makes a weak reference
#: each time, a third of a small task's pickling. Bounded, for code that makes many.
_by_reference: dict[Any, tuple[bytes, frozenset[str]]] = {}
_BY_REFERENCE_MAX = 4096

#: The modules a pickle refers to (see dumps_tracked_call); the two shared values are the
#: common cases, so that most submits build no set at all.
NO_MODULES: frozenset[str] = frozenset()
NUMPY: frozenset[str] = frozenset({"numpy"})

_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})
_NOT_PLAIN, _SCALARS, _ARRAYS = 0, 1, 2


def _is_plain(obj: Any, depth: int = 0) -> int:
    """Non-zero for data the C pickler handles exactly as cloudpickle would (no code
    inside): scalars, strings, numpy arrays of numbers, and small tuples, lists and
    str-keyed dicts of those; _ARRAYS when it holds a numpy array. Cheap enough to try on
    every call (no generators, scalars checked in line); anything else goes to cloudpickle."""
    kind = type(obj)
    if kind in _PLAIN:
        return _SCALARS
    if depth > 2:
        return _NOT_PLAIN
    if kind is tuple or kind is list:
        items = obj
    elif kind is dict:
        for key in obj:
            if type(key) is not str:
                return _NOT_PLAIN
        items = obj.values()
    elif kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not obj.dtype.hasobject:
        return _ARRAYS
    else:
        return _NOT_PLAIN
    if len(obj) > 16:
        return _NOT_PLAIN
    found = _SCALARS
    for item in items:
        if type(item) in _PLAIN:
            continue
        plain = _is_plain(item, depth + 1)
        if not plain:
            return _NOT_PLAIN
        if plain > found:
            found = plain
    return found


def _reduce_code(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with its file name left as it is."""
    rebuild, args = _cloudpickle_impl._code_reduce(code)
    if "<dynamic-code>" in args:
        at = args.index("<dynamic-code>")  # co_filename: the first string argument
        args = (*args[:at], code.co_filename, *args[at + 1 :])
    return rebuild, args


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, but code pickled by value keeps its file name."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


#: cloudpickle's own reducer_override handles classes and functions only (with these
#: two helpers) and leaves everything else to the pickler: _NotingPickler then does the
#: same itself, saving a Python call per object. Checked, not assumed: another
#: cloudpickle gets its reducer_override called as it is.
_CLOUDPICKLE_DISPATCH = {"_class_reduce", "_function_reduce"} <= set(
    cloudpickle.Pickler.reducer_override.__code__.co_names
)


class _NotingPickler(_Pickler):
    """Also notes the module of every object, class and function it pickles, and the
    names used by the code it pickles by value (``import x`` in a function body is one of
    them); fade/packages.py keeps those of installed packages. Set ``modules`` and
    ``kinds`` (empty sets) before pickling; :meth:`noted` says what was seen."""

    modules: set[str]
    kinds: set[type]  # of the other objects: their modules, looked up once each

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.FunctionType:
            module = obj.__module__
            if isinstance(module, str):
                self.modules.add(module)
            if _CLOUDPICKLE_DISPATCH:
                return self._function_reduce(obj)
        elif isinstance(obj, type):
            module = obj.__module__
            if isinstance(module, str):
                self.modules.add(module)
            if _CLOUDPICKLE_DISPATCH:
                return _cloudpickle_impl._class_reduce(obj)
        elif kind is types.CodeType:
            self.modules.update(obj.co_names)
        elif kind is types.ModuleType:
            self.modules.add(obj.__name__)
        else:
            self.kinds.add(kind)
        if _CLOUDPICKLE_DISPATCH:
            return NotImplemented
        return _Pickler.reducer_override(self, obj)

    def noted(self) -> set[str]:
        """Every module noted (once the pickle is done)."""
        for kind in self.kinds:
            module = getattr(kind, "__module__", None)
            if isinstance(module, str):
                self.modules.add(module)
        return self.modules


def _cloudpickle(
    obj: Any,
    buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None,
    modules: set[str] | None = None,
) -> bytes:
    out = io.BytesIO()
    if modules is None:
        _Pickler(out, protocol=5, buffer_callback=buffer_callback).dump(obj)
    else:
        pickler = _NotingPickler(out, protocol=5, buffer_callback=buffer_callback)
        pickler.modules, pickler.kinds = modules, set()
        pickler.dump(obj)
        pickler.noted()
    return out.getvalue()


def _dumps(
    obj: Any,
    buffers: list[Any],
    modules: set[str] | None = None,
    shelf: DataShelf | None = None,
    segments: Segmenter | None = None,
) -> bytes:
    """Pickle ``obj``: large buffers are appended to ``buffers``; with a ``shelf``, those it
    claims go there as a :class:`DataRef` instead (its position: its index in the list),
    and with ``segments``, those it writes into shared memory as a SegmentRef.
    With ``modules``, the modules the pickle refers to are added to it."""
    keep_large = _keeper(buffers, shelf, segments)
    plain = _is_plain(obj)
    if plain:
        if plain == _ARRAYS and modules is not None:
            modules.add("numpy")
        # About ten times cheaper than building a CloudPickler for each call.
        return pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    return _cloudpickle(obj, keep_large, modules)


#: Given a large buffer, the name of the segment it now travels in, or None.
Segmenter = Callable[[memoryview], "bytes | None"]


def _keeper(
    buffers: list[Any], shelf: DataShelf | None, segments: Segmenter | None = None
) -> Callable[[pickle.PickleBuffer], bool]:
    """The pickler's buffer callback: large buffers go to ``buffers`` (by content when
    ``shelf`` claims them, in shared memory when ``segments`` takes them), small ones
    stay in the pickle. With ``segments``, only ``fade.share`` parts go by content, and
    large buffers through shared memory (or as frames: the segments decide)."""

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if shelf is not None:
            cid = shelf.claim(buf) if segments is None else shelf.claim_shared(buf)
            if cid is not None:
                buffers.append(DataRef(len(buffers), cid, raw.nbytes))
                return False  # out of band, by content
        if segments is not None and raw.nbytes >= OUT_OF_BAND_MIN:
            name = segments(raw)
            if name is not None:
                buffers.append(SegmentRef(len(buffers), name, raw.nbytes))
                return False  # out of band, in shared memory
        if raw.nbytes >= OUT_OF_BAND_MIN:
            buffers.append(raw)
            return False  # out of band
        return True

    return keep_large


def _pickles_by_reference(fn: Any) -> bool:
    """True when cloudpickle would store ``fn`` as module + name (so its bytes never change)."""
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__" or "<" in qualname:
        return False
    if module_name in cloudpickle.list_registry_pickle_by_value():
        return False
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """The function's pickle; cached when it pickles by reference (the bytes cannot go stale)."""
    return _function_pickle(fn, False)[0]


def _function_pickle(fn: Callable[..., Any], noting: bool) -> tuple[bytes, frozenset[str]]:
    """The function's pickle and (``noting``) the modules it refers to."""
    try:
        cached = _by_reference.get(fn)
    except TypeError:  # an unhashable callable object
        cached = None
    if cached is not None:
        return cached
    modules: set[str] | None = set() if noting else None
    try:
        data = _cloudpickle(fn, None, modules)
    except Exception as exc:
        raise SerializationError(f"cannot pickle function {fn!r}: {exc}") from exc
    if _pickles_by_reference(fn):
        # The bytes name the module; nothing else is pickled, nothing else is noted.
        found = (data, frozenset({fn.__module__}))
        if len(_by_reference) >= _BY_REFERENCE_MAX:
            _by_reference.clear()
        with contextlib.suppress(TypeError):
            _by_reference[fn] = found
        return found
    return data, frozenset(modules) if modules else NO_MODULES


#: Given the modules a call's function and arguments refer to: the id of the package
#: environment the task needs (b"" for none) and its SUBMIT flags (fade/packages.py).
Tracker = Callable[[frozenset[str], frozenset[str]], tuple[bytes, int]]


def dumps_task(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    code: bytes = b"",
    *,
    setup: bytes = b"",
    environment: Tracker | None = None,
    noting: bool = True,
    shelf: DataShelf | None = None,
    segments: ClientSegments | None = None,
) -> tuple[Payload, int, Sequence[bytes], Sequence[bytes]]:
    """The payload for calling ``fn(*args, **kwargs)`` remotely, with the executor's
    ``setup`` (:func:`dumps_setup`) if it has one. With ``environment``, the modules
    the pickles refer to (unless ``noting`` is False) go to it, and the id it gives
    goes in the payload; with ``shelf``, the buffers it claims travel by content; with
    ``segments`` (eager), large buffers travel through shared memory.

    Returns the payload, its SUBMIT flags, the content ids it pinned on ``shelf`` and
    the segments it pinned on ``segments`` (release both once the task is done).
    Raises SerializationError."""
    tracking = noting and environment is not None
    fn_bytes, fn_modules = _function_pickle(fn, tracking)
    call = (args, kwargs)
    if _is_plain(call) == _SCALARS:
        # The usual case: no buffer can be out of band, no module to note, nothing by
        # content or in shared memory; the C pickler alone, about a third of the
        # general path's cost.
        arg_bytes = pickle.dumps(call, protocol=5)
        env, flags = environment(fn_modules, NO_MODULES) if environment is not None else (b"", 0)
        return Payload(_inline(code, env, setup, fn_bytes, arg_bytes)), flags, (), ()
    parts: list[Any] = []  # frames, DataRefs (by content), SegmentRefs (shared memory)
    modules: set[str] | None = set() if tracking else None
    # Without a usable shared memory (no /dev/shm), by content as ever.
    eager = segments is not None and segments.eager and segments.usable()
    segmenter = segments.claim if segments is not None and eager else None
    try:
        arg_bytes = _dumps(call, parts, modules, shelf, segmenter)
    except Exception as exc:
        _release(parts, shelf, segments)
        raise SerializationError(f"cannot pickle the arguments of {_fn_name(fn)}: {exc}") from exc
    env, flags = b"", 0
    if environment is not None:
        env, flags = environment(fn_modules, _frozen(modules))
    if not parts or all(
        type(part) is not DataRef and type(part) is not SegmentRef for part in parts
    ):
        # the usual case: every buffer in a frame
        return Payload(_inline(code, env, setup, fn_bytes, arg_bytes), tuple(parts)), flags, (), ()
    refs = [part for part in parts if type(part) is DataRef]
    segs = [part for part in parts if type(part) is SegmentRef]
    frames = tuple(
        part for part in parts if type(part) is not DataRef and type(part) is not SegmentRef
    )
    inline = _inline(code, env, setup, fn_bytes, arg_bytes, refs, segs)
    return Payload(inline, frames), flags, [ref.cid for ref in refs], [seg.name for seg in segs]


def _release(parts: list[Any], shelf: DataShelf | None, segments: ClientSegments | None) -> None:
    """Let go of what a payload that will not be sent pinned."""
    if shelf is not None:
        shelf.release([part.cid for part in parts if type(part) is DataRef])
    if segments is not None:
        segments.release([part.name for part in parts if type(part) is SegmentRef])


def _frozen(modules: set[str] | None) -> frozenset[str]:
    """The shared value for the common cases, so that most submits build no set."""
    if not modules:
        return NO_MODULES
    if modules == NUMPY:
        return NUMPY
    return frozenset(modules)


def dumps_tracked_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    code: bytes,
    environment: Tracker,
    noting: bool = True,
    setup: bytes = b"",
) -> tuple[Payload, int]:
    """:func:`dumps_task` naming the task's package environment: the payload and the
    SUBMIT flags."""
    payload, flags, _, _ = dumps_task(
        fn, args, kwargs, code, setup=setup, environment=environment, noting=noting
    )
    return payload, flags


def dumps_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    code: bytes = b"",
    setup: bytes = b"",
) -> Payload:
    """The payload for calling ``fn(*args, **kwargs)`` remotely, every buffer in frames.
    Raises SerializationError."""
    return dumps_task(fn, args, kwargs, code, setup=setup)[0]


def dumps_call_shared(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    code: bytes,
    shelf: DataShelf | None,
) -> tuple[Payload, Sequence[bytes]]:
    """The payload for calling ``fn(*args, **kwargs)``, with the buffers ``shelf`` claims
    sent by content; and their content ids, pinned on the shelf until released."""
    payload, _, pinned, _ = dumps_task(fn, args, kwargs, code, shelf=shelf)
    return payload, pinned


def dumps_parts(value: Any) -> tuple[bytes, list[Any]]:
    """``value``'s pickle and its large buffers (for ``fade.share``)."""
    buffers: list[Any] = []
    try:
        return _dumps(value, buffers), buffers
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc


def _inline(
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


def _split_call(inline: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes, int]:
    """(code version, environment, executor setup, function pickle, arguments pickle,
    number of refs and segments)."""
    code_size, env_size, fn_size, nrefs, nsegs, setup_size, start = _header(inline)
    start += nrefs * _REF.size + nsegs * SEGMENT_SIZE
    env = start + code_size
    setup = env + env_size
    fn = setup + setup_size
    args = fn + fn_size
    if args > len(inline):
        raise SerializationError("a task payload is shorter than its header says")
    parts = inline[start:env], inline[env:setup], inline[setup:fn], inline[fn:args], inline[args:]
    return (*parts, nrefs + nsegs)


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
    _insert_data(payload, buffers, resolve, resolve_segments)
    inline = payload.inline
    code_size, env_size, fn_size, nrefs = _CALL.unpack_from(inline)
    *_, start = _header(inline)
    head = _CALL.pack(code_size & ~_HAS_SEGMENTS, env_size, fn_size, 0)
    if code_size & _HAS_SETUP:
        head += inline[_CALL.size : _CALL.size + _SETUP_SIZE.size]
    rest = inline[start + nrefs * _REF.size + len(segs) * SEGMENT_SIZE :]
    return Payload(head + rest, tuple(buffers))


class FunctionCache:
    """Worker-side cache from (code version, function pickle) to the function (LRU).

    The same pickle (``mypkg.f`` by reference) means a different function under
    another code version, hence the version in the key. A function also holds its
    module's globals: the code runner clears this cache whenever it drops modules
    (fade/codecache.py), or a later task would run a dropped module's function with
    that module's stale state and classes.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._cache: OrderedDict[tuple[bytes, bytes], Callable[..., Any]] = OrderedDict()

    def load(self, code: bytes, data: bytes) -> Callable[..., Any]:
        key = (code, data)
        fn = self._cache.get(key)
        if fn is None:
            fn = pickle.loads(data)
            self._cache[key] = fn
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return fn

    def clear(self) -> None:
        self._cache.clear()


def loads_call(
    payload: Payload,
    functions: FunctionCache,
    resolve: Resolver | None = None,
    resolve_segments: Resolver | None = None,
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Rebuild ``(fn, args, kwargs)`` from :func:`dumps_call`'s payload (once the code
    version it names is active). A payload that names data by content needs
    ``resolve``: given its refs (:func:`data_refs`), it returns their buffers in order;
    one with buffers in shared memory, ``resolve_segments`` likewise.

    Raises TaskDecodeError (its cause says why), ModuleNotFoundError when the task needs
    a module this worker lacks, CodeShippingError when its shipped code cannot be used
    here (that says why already), or what ``resolve`` raises."""
    code, _, _, fn_bytes, arg_bytes, nrefs = _split_call(payload.inline)
    try:
        fn = functions.load(code, fn_bytes)
    except (ModuleNotFoundError, CodeShippingError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # SystemExit too: a __reduce__ may run anything
        raise TaskDecodeError(
            f"the task's function could not be unpickled on the worker: {_describe(exc)}"
        ) from exc
    buffers = [_as_buffer(f) for f in payload.buffers]
    if nrefs:
        _insert_data(payload, buffers, resolve, resolve_segments)
    try:
        args, kwargs = pickle.loads(arg_bytes, buffers=buffers)
    except (ModuleNotFoundError, CodeShippingError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        raise TaskDecodeError(
            f"the arguments of {_fn_name(fn)} could not be unpickled on the worker: "
            f"{_describe(exc)}"
        ) from exc
    return fn, args, kwargs


def _insert_data(
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
    return _split_call(payload.inline)[0]


def environment_of(payload: Payload) -> bytes:
    """The package environment a task payload names (b"" for none)."""
    return _split_call(payload.inline)[1]


# -- the executor setup: initializer, initargs, max_tasks_per_child ------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorSetup:
    """What a task payload says about its executor's set-up (see fade/initializer.py)."""

    executor_id: bytes
    max_tasks: int  # tasks of this executor a worker process runs before it retires; 0: no limit
    initializer: bytes  # pickled (initializer, initargs); b"" for none


def dumps_setup(
    executor_id: bytes,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    max_tasks: int,
) -> bytes:
    """The setup section of every task of one executor. Raises SerializationError."""
    pickled = b""
    if initializer is not None:
        try:
            pickled = cloudpickle.dumps((initializer, initargs), protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle the initializer {_fn_name(initializer)} or its initargs: {exc}"
            ) from exc
    return _SETUP.pack(executor_id, max_tasks) + pickled


def executor_setup(payload: Payload) -> ExecutorSetup | None:
    """The setup a task payload carries; None for a task of an executor without one."""
    if not payload.inline or not payload.inline[0] & _HAS_SETUP:
        return None
    setup = _split_call(payload.inline)[2]
    if len(setup) < _SETUP.size:
        raise SerializationError("a task's executor setup is too short")
    executor_id, max_tasks = _SETUP.unpack_from(setup)
    return ExecutorSetup(executor_id, max_tasks, setup[_SETUP.size :])


def loads_initializer(data: bytes) -> tuple[Callable[..., object], tuple[Any, ...]]:
    """``(initializer, initargs)`` from :func:`dumps_setup` (may raise anything unpickling does)."""
    initializer, initargs = pickle.loads(data)
    return initializer, tuple(initargs)


def dumps_value(value: Any, segments: Segmenter | None = None) -> Payload:
    """The payload for a return value; with ``segments``, the large buffers it takes
    travel through shared memory. Raises ResultDecodeError naming the cause."""
    buffers: list[Any] = []
    try:
        data = _dumps(value, buffers, segments=segments)
    except Exception as exc:
        raise ResultDecodeError(
            f"the task's result of type {type(value).__qualname__} cannot be pickled: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if segments is None or all(type(b) is not SegmentRef for b in buffers):
        return Payload(data, tuple(buffers))
    segs = [b for b in buffers if type(b) is SegmentRef]
    head = _RESULT_SEGMENTS + _COUNT.pack(len(segs)) + pack_table(segs)
    return Payload(head + data, tuple(b for b in buffers if type(b) is not SegmentRef))


def result_segments(payload: Payload) -> list[SegmentRef]:
    """The buffers a result has in shared memory (empty for most); [] if malformed."""
    inline = payload.inline
    if inline[:1] != _RESULT_SEGMENTS or len(inline) < 1 + _COUNT.size:
        return []
    (count,) = _COUNT.unpack_from(inline, 1)
    try:
        return unpack_table(inline, count, 1 + _COUNT.size)
    except ValueError:
        return []


def loads_value(payload: Payload, take: Callable[[SegmentRef], Any] | None = None) -> Any:
    """The task's result (its buffers in shared memory mapped by ``take``). Raises
    ResultDecodeError, also when unpickling raised a BaseException such as SystemExit
    (the client's I/O thread must survive it)."""
    data: bytes | memoryview = payload.inline
    buffers = [_as_buffer(f) for f in payload.buffers]
    try:
        if data[:1] == _RESULT_SEGMENTS:
            segs = result_segments(payload)
            if not segs or take is None:
                raise ResultDecodeError("the result's shared memory could not be read here")
            data = memoryview(data)[1 + _COUNT.size + len(segs) * SEGMENT_SIZE :]
            for seg in sorted(segs, key=lambda s: s.position):
                if seg.position > len(buffers):
                    raise ResultDecodeError("a result names an impossible buffer position")
                buffers.insert(seg.position, take(seg))
        return pickle.loads(data, buffers=buffers)
    except (KeyboardInterrupt, ResultDecodeError):
        raise
    except BaseException as exc:
        raise ResultDecodeError(
            f"the task's result could not be unpickled here: {_describe(exc)}"
        ) from exc


def dumps_exception(exc: BaseException) -> Payload:
    """Frames for an exception raised by a task, with its traceback (text and structure).

    An exception that cannot be pickled is replaced by a ResultDecodeError that
    names its type and message, so the client still learns what happened.
    """
    trace = tracebacks.capture(exc)
    text = trace.render()[0]
    try:
        return Payload(_cloudpickle((exc, text, trace)))
    except Exception as why:
        stand_in = ResultDecodeError(
            f"the task raised {type(exc).__qualname__}: {exc}, "
            f"which cannot be pickled ({type(why).__name__}: {why})"
        )
        return Payload(_cloudpickle((stand_in, text, trace)))


def loads_exception(payload: Payload) -> BaseException:
    """The task's exception, with the remote traceback attached as ``__cause__`` (file
    names and source lines as this client knows them)."""
    try:
        exc, text, *more = pickle.loads(payload.inline)
    except KeyboardInterrupt:
        raise
    except BaseException as why:
        return ResultDecodeError(
            f"the task raised an exception that could not be unpickled here: {_describe(why)}"
        )
    if not isinstance(exc, BaseException):
        return ResultDecodeError(f"the worker sent {type(exc).__name__} as an exception")
    trace = more[0] if more and isinstance(more[0], tracebacks.RemoteTrace) else str(text)
    exc.__cause__ = remote_cause(trace)
    return exc


def remote_cause(trace: tracebacks.RemoteTrace | str) -> BaseException:
    """A task's remote traceback as this client shows it (also for chunked maps)."""
    return tracebacks.remote_cause(trace, client_file)


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _as_buffer(frame: Frame) -> Any:
    buffer = getattr(frame, "buffer", None)
    return frame if buffer is None else buffer
