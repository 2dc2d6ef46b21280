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

The byte layout of both payloads, and the tables in it, is fade/payload.py's.

:func:`dumps_tracked_call` also notes which modules the pickles refer to (for the
environment): a function pickled by reference names its module (cached with its
bytes); plain data names numpy if it holds an array; anything else is pickled by
a pickler that notes the module of every object, class and function it meets and
the names the code it pickles by value uses (``import x`` in a function body):
fade/pickling.py.

A result payload is the pickled value inline, and its large buffers apart (those in
shared memory listed in a table before the pickle). An exception payload is
``(exception, traceback text, RemoteTrace)`` (see fade/tracebacks.py): the client
shows the traceback with its own file names.

The readers of a task payload's tables (:func:`data_refs`, :func:`code_version`,
:func:`executor_setup`, ...) live in fade/payload.py and are re-exported here, where
the worker, the environments and many tests have always found them.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from fade import (
    errors,  # errors.ResultDecodeError, TaskDecodeError: imported when met
    tracebacks,
)
from fade.data import DataRef, DataShelf
from fade.errors import CodeShippingError, SerializationError
from fade.payload import (
    RESULT_SEGMENTS,
    ExecutorSetup,
    Resolver,
    code_version,
    data_refs,
    environment_of,
    executor_setup,
    insert_data,
    pack_call,
    pack_result,
    pack_setup,
    result_pickle,
    result_segments,
    segment_refs,
    split_call,
    with_data_inline,
)
from fade.pickling import ARRAYS, SCALARS, cloudpickle_dumps, is_plain, loads, pickles_by_reference
from fade.protocol import Payload
from fade.shipping import client_file
from fade.shm import ClientSegments, SegmentRef

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

#: Functions that pickle by reference (module-level: they live as long as their module),
#: with their pickle. A plain dict: a WeakKeyDictionary's get() makes a weak reference
#: each time, a third of a small task's pickling. Bounded, for code that makes many.
_by_reference: dict[Any, tuple[bytes, frozenset[str]]] = {}
_BY_REFERENCE_MAX = 4096

#: The modules a pickle refers to (see dumps_tracked_call); the two shared values are the
#: common cases, so that most submits build no set at all.
NO_MODULES: frozenset[str] = frozenset()
NUMPY: frozenset[str] = frozenset({"numpy"})


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
    plain = is_plain(obj)
    if plain:
        if plain == ARRAYS and modules is not None:
            modules.add("numpy")
        # About ten times cheaper than building a CloudPickler for each call.
        return pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    return cloudpickle_dumps(obj, keep_large, modules)


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
        data = cloudpickle_dumps(fn, None, modules)
    except Exception as exc:
        raise SerializationError(f"cannot pickle function {fn!r}: {exc}") from exc
    referred = _referred_modules(fn)
    if referred is not None:
        # The bytes name modules only; nothing else is pickled, nothing else is noted.
        found = (data, referred)
        if len(_by_reference) >= _BY_REFERENCE_MAX:
            _by_reference.clear()
        with contextlib.suppress(TypeError):
            _by_reference[fn] = found
        return found
    if len(data) >= LARGE_FUNCTION:
        _warn_large_function(fn, len(data))
    return data, frozenset(modules) if modules else NO_MODULES


def _referred_modules(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The modules ``fn`` pickles as names of, when its pickle is names only (so its bytes
    never change): a function by reference, or a ``functools.partial`` of one with such
    arguments (``Executor.map`` sends its chunks as ``partial(run_chunk, fn)``); else None."""
    if pickles_by_reference(fn):
        return frozenset({fn.__module__})
    if type(fn) is not functools.partial or fn.keywords or fn.__dict__:
        return None
    parts = (fn.func, *fn.args)
    if not all(pickles_by_reference(part) for part in parts):
        return None
    return frozenset(part.__module__ for part in parts)


#: Bytes from which a function pickled by value is worth a warning: a task's function is
#: pickled and sent again with every task (an argument's large buffers travel once per
#: host, by content, or through shared memory).
LARGE_FUNCTION = 1 << 20
#: Code objects warned about (bounded: a program makes few large functions).
_warned: set[types.CodeType] = set()
_WARNED_MAX = 1024


def _warn_large_function(fn: Callable[..., Any], size: int) -> None:
    """Warn once per function (its code) that it pickles to ``size`` bytes, naming the
    globals and closure variables that make it large, at the caller's line."""
    if type(fn) is functools.partial:  # map's chunks send partial(run_chunk, fn): name fn
        parts = (fn.func, *fn.args)
        by_value = [
            part for part in parts if hasattr(part, "__code__") and not pickles_by_reference(part)
        ]
        if len(by_value) != 1:
            return
        fn = by_value[0]
    code = getattr(fn, "__code__", None)
    if code is None or code in _warned or len(_warned) >= _WARNED_MAX:
        return
    _warned.add(code)
    large = ", ".join(f"{name} ({_megabytes(n)})" for name, n in _large_references(fn, size))
    warnings.warn(
        f"{_fn_name(fn)} is pickled by value with what it refers to, {_megabytes(size)}, and "
        f"every task carries that again{': ' + large if large else ''}. Pass large arrays "
        "as arguments instead (their buffers then travel once per host, by content, or "
        "through shared memory on one machine), wrap large data in fade.share(), or load "
        "it inside the task",
        errors.LargeFunctionWarning,
        stacklevel=_callers_level(),
    )


def _large_references(fn: Callable[..., Any], size: int) -> list[tuple[str, int]]:
    """The globals and closure variables of ``fn`` that pickle to a tenth of ``size`` or
    more, largest first (each pickled once more: this runs once per function)."""
    code = fn.__code__
    names: set[str] = set()
    stack = [code]
    while stack:  # names used by the function and the functions defined in it
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    referred = {n: fn.__globals__[n] for n in names if n in fn.__globals__}
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        with contextlib.suppress(ValueError):  # an empty cell
            referred[name] = cell.cell_contents
    owner = getattr(fn, "__self__", None)  # a bound method takes its instance along
    if owner is not None and not isinstance(owner, (type, types.ModuleType)):
        referred[f"its instance of {type(owner).__qualname__}"] = owner
    sizes = []
    for name, value in referred.items():
        if isinstance(value, types.ModuleType) or (callable(value) and value is not owner):
            continue
        try:
            n = len(cloudpickle.dumps(value, protocol=5))
        except Exception:
            continue
        if n * 10 >= size:
            sizes.append((name, n))
    return sorted(sizes, key=lambda item: -item[1])[:3]


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _callers_level() -> int:
    """The ``stacklevel`` of the first frame outside fade and concurrent.futures: the
    user's submit or map."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("fade.", "concurrent.futures")
    ):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


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
    if is_plain(call) == SCALARS:
        # The usual case: no buffer can be out of band, no module to note, nothing by
        # content or in shared memory; the C pickler alone, about a third of the
        # general path's cost.
        arg_bytes = pickle.dumps(call, protocol=5)
        env, flags = environment(fn_modules, NO_MODULES) if environment is not None else (b"", 0)
        return Payload(pack_call(code, env, setup, fn_bytes, arg_bytes)), flags, (), ()
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
    payload, pinned, names = _with_tables((code, env, setup, fn_bytes, arg_bytes), parts)
    return payload, flags, pinned, names


def _with_tables(
    sections: tuple[bytes, bytes, bytes, bytes, bytes], parts: list[Any]
) -> tuple[Payload, Sequence[bytes], Sequence[bytes]]:
    """The payload of a call's ``sections`` (code version, environment, setup, function,
    arguments) whose pickle left ``parts`` aside: frames, and the refs and segments its
    tables list; and the content ids and segment names those pinned."""
    if not parts or all(
        type(part) is not DataRef and type(part) is not SegmentRef for part in parts
    ):
        # the usual case: every buffer in a frame
        return Payload(pack_call(*sections), tuple(parts)), (), ()
    refs = [part for part in parts if type(part) is DataRef]
    segs = [part for part in parts if type(part) is SegmentRef]
    frames = tuple(
        part for part in parts if type(part) is not DataRef and type(part) is not SegmentRef
    )
    inline = pack_call(*sections, refs, segs)
    return Payload(inline, frames), [ref.cid for ref in refs], [seg.name for seg in segs]


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
    code, _, _, fn_bytes, arg_bytes, nrefs = split_call(payload.inline)
    try:
        fn = functions.load(code, fn_bytes)
    except (ModuleNotFoundError, CodeShippingError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # SystemExit too: a __reduce__ may run anything
        raise errors.TaskDecodeError(
            f"the task's function could not be unpickled on the worker: {_describe(exc)}"
        ) from exc
    buffers = [_as_buffer(f) for f in payload.buffers]
    if nrefs:
        insert_data(payload, buffers, resolve, resolve_segments)
    try:
        args, kwargs = loads(arg_bytes, buffers)
    except (ModuleNotFoundError, CodeShippingError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        raise errors.TaskDecodeError(
            f"the arguments of {_fn_name(fn)} could not be unpickled on the worker: "
            f"{_describe(exc)}"
        ) from exc
    return fn, args, kwargs


# -- the executor setup: initializer, initargs, max_tasks_per_child ------------------------------


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
    return pack_setup(executor_id, max_tasks, pickled)


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
        raise errors.ResultDecodeError(
            f"the task's result of type {type(value).__qualname__} cannot be pickled: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if segments is None or all(type(b) is not SegmentRef for b in buffers):
        return Payload(data, tuple(buffers))
    segs = [b for b in buffers if type(b) is SegmentRef]
    inline = pack_result(data, segs)
    return Payload(inline, tuple(b for b in buffers if type(b) is not SegmentRef))


def loads_value(payload: Payload, take: Callable[[SegmentRef], Any] | None = None) -> Any:
    """The task's result (its buffers in shared memory mapped by ``take``). Raises
    ResultDecodeError, also when unpickling raised a BaseException such as SystemExit
    (the client's I/O thread must survive it)."""
    data: bytes | memoryview = payload.inline
    buffers = [_as_buffer(f) for f in payload.buffers]
    try:
        if data[:1] == RESULT_SEGMENTS:
            segs = result_segments(payload)
            if not segs or take is None:
                raise errors.ResultDecodeError("the result's shared memory could not be read here")
            data = result_pickle(data, segs)
            for seg in sorted(segs, key=lambda s: s.position):
                if seg.position > len(buffers):
                    raise errors.ResultDecodeError("a result names an impossible buffer position")
                buffers.insert(seg.position, take(seg))
        return loads(data, buffers)
    except (KeyboardInterrupt, errors.ResultDecodeError):
        raise
    except BaseException as exc:
        raise errors.ResultDecodeError(
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
        return Payload(cloudpickle_dumps((exc, text, trace)))
    except Exception as why:
        stand_in = errors.ResultDecodeError(
            f"the task raised {type(exc).__qualname__}: {exc}, "
            f"which cannot be pickled ({type(why).__name__}: {why})"
        )
        return Payload(cloudpickle_dumps((stand_in, text, trace)))


def loads_exception(payload: Payload) -> BaseException:
    """The task's exception, with the remote traceback attached as ``__cause__`` (file
    names and source lines as this client knows them)."""
    try:
        exc, text, *more = loads(payload.inline)
    except KeyboardInterrupt:
        raise
    except BaseException as why:
        return errors.ResultDecodeError(
            f"the task raised an exception that could not be unpickled here: {_describe(why)}"
        )
    if not isinstance(exc, BaseException):
        return errors.ResultDecodeError(f"the worker sent {type(exc).__name__} as an exception")
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
