"""Turning calls and results into frames and back (cloudpickle, pickle protocol 5).

A task's payload (a :class:`fade.protocol.Payload`) packs inline
``code version | function | arguments`` and carries large buffers apart:

* the code version is the 16-byte id of the client's local code (see
  fade/shipping.py), or empty; workers set that code up before unpickling;
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
  cache before unpickling.

Inline layout: ``u8 code version size, u32 function size, u16 refs``, the refs
(``u16 position, 32-byte content id, u64 size`` each), the code version, the
function, the arguments.

A result payload is the pickled value inline, and its large buffers apart. An
exception payload is ``(exception, traceback text, RemoteTrace)`` (see
fade/tracebacks.py): the client shows the traceback with its own file names.

Code pickled by value (a function of ``__main__``, a lambda, a closure) keeps its
real file name: cloudpickle writes ``"<dynamic-code>"`` instead (to make equal
functions from different files pickle alike), which leaves a remote traceback
nothing to point at.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import types
import weakref
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
import cloudpickle.cloudpickle as _cloudpickle_impl

from fade import tracebacks
from fade.data import DataRef, DataShelf
from fade.errors import ResultDecodeError, SerializationError
from fade.protocol import Payload
from fade.shipping import client_file

__all__ = [
    "OUT_OF_BAND_MIN",
    "FunctionCache",
    "code_version",
    "data_refs",
    "dumps_call",
    "dumps_call_shared",
    "dumps_exception",
    "dumps_parts",
    "dumps_value",
    "loads_call",
    "loads_exception",
    "loads_value",
]

#: Buffers at least this large travel as their own zero-copy frames.
OUT_OF_BAND_MIN = 64 * 1024

Frame = Any  # bytes, memoryview or zmq.Frame: anything exposing the buffer protocol

_CALL = struct.Struct("<BIH")  # code version size, function pickle size, refs
_REF = struct.Struct("<H32sQ")  # position among the buffers, content id, size

_by_reference: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})
_CONTAINERS = frozenset({tuple, list})


def _is_plain(obj: Any, depth: int = 0) -> bool:
    """True for data the C pickler handles exactly as cloudpickle would (no code inside):
    scalars, strings, numpy arrays of numbers, and small tuples, lists and str-keyed dicts
    of those. Cheap enough to try on every call; anything else goes to cloudpickle."""
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if depth > 2:
        return False
    if kind in _CONTAINERS:
        return len(obj) <= 16 and all(_is_plain(x, depth + 1) for x in obj)
    if kind is dict:
        return len(obj) <= 16 and all(
            type(k) is str and _is_plain(v, depth + 1) for k, v in obj.items()
        )
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not obj.dtype.hasobject


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


def _cloudpickle(
    obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None
) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()


def _dumps(obj: Any, buffers: list[Any], shelf: DataShelf | None = None) -> bytes:
    """Pickle ``obj``: large buffers are appended to ``buffers``; with a ``shelf``, those it
    claims go there as a :class:`DataRef` instead (its position: its index in the list)."""

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if shelf is not None:
            cid = shelf.claim(buf)
            if cid is not None:
                buffers.append(DataRef(len(buffers), cid, raw.nbytes))
                return False  # out of band, by content
        if raw.nbytes >= OUT_OF_BAND_MIN:
            buffers.append(raw)
            return False  # out of band
        return True

    if _is_plain(obj):
        # About ten times cheaper than building a CloudPickler for each call.
        return pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    return _cloudpickle(obj, keep_large)


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
    try:
        cached = _by_reference.get(fn)
    except TypeError:  # not weak-referenceable (a bound method, a partial...)
        cached = None
    if cached is not None:
        return bytes(cached)
    try:
        data = _cloudpickle(fn)
    except Exception as exc:
        raise SerializationError(f"cannot pickle function {fn!r}: {exc}") from exc
    if _pickles_by_reference(fn):
        try:
            _by_reference[fn] = data
        except TypeError:
            pass
    return data


def dumps_call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], code: bytes = b""
) -> Payload:
    """The payload for calling ``fn(*args, **kwargs)`` remotely, every buffer in frames.
    Raises SerializationError."""
    return dumps_call_shared(fn, args, kwargs, code, None)[0]


def dumps_call_shared(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    code: bytes,
    shelf: DataShelf | None,
) -> tuple[Payload, Sequence[bytes]]:
    """The payload for calling ``fn(*args, **kwargs)``, with the buffers ``shelf`` claims
    sent by content; and their content ids, pinned on the shelf until released."""
    fn_bytes = dumps_function(fn)
    parts: list[Any] = []  # frames, and DataRefs where a buffer goes by content
    try:
        arg_bytes = _dumps((args, kwargs), parts, shelf)
    except Exception as exc:
        if shelf is not None:
            shelf.release([part.cid for part in parts if type(part) is DataRef])
        raise SerializationError(f"cannot pickle the arguments of {_fn_name(fn)}: {exc}") from exc
    refs = [part for part in parts if type(part) is DataRef] if parts else parts
    if not refs:  # the usual case: nothing more to pack
        head = _CALL.pack(len(code), len(fn_bytes), 0)
        return Payload(b"".join((head, code, fn_bytes, arg_bytes)), tuple(parts)), ()
    table = b"".join(_REF.pack(r.position, r.cid, r.size) for r in refs)
    head = _CALL.pack(len(code), len(fn_bytes), len(refs))
    inline = b"".join((head, table, code, fn_bytes, arg_bytes))
    frames = tuple(part for part in parts if type(part) is not DataRef)
    return Payload(inline, frames), [ref.cid for ref in refs]


def dumps_parts(value: Any) -> tuple[bytes, list[Any]]:
    """``value``'s pickle and its large buffers (for ``fade.share``)."""
    buffers: list[Any] = []
    try:
        return _dumps(value, buffers), buffers
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc


def _split_call(inline: bytes) -> tuple[bytes, bytes, bytes, int]:
    """(code version, function pickle, arguments pickle, number of refs)."""
    if len(inline) < _CALL.size:
        raise SerializationError("a task payload is too short")
    code_size, fn_size, nrefs = _CALL.unpack_from(inline)
    start = _CALL.size + nrefs * _REF.size
    code = inline[start : start + code_size]
    fn = inline[start + code_size : start + code_size + fn_size]
    return code, fn, inline[start + code_size + fn_size :], nrefs


def data_refs(payload: Payload) -> list[DataRef]:
    """The buffers a task payload names by content (empty for most tasks)."""
    inline = payload.inline
    if len(inline) < _CALL.size:
        raise SerializationError("a task payload is too short")
    nrefs = _CALL.unpack_from(inline)[2]
    if not nrefs:
        return []
    if len(inline) < _CALL.size + nrefs * _REF.size:
        raise SerializationError("a task payload's data refs run past it")
    refs = [
        DataRef(*fields)
        for fields in _REF.iter_unpack(inline[_CALL.size : _CALL.size + nrefs * _REF.size])
    ]
    total = len(payload.buffers) + nrefs
    if sorted(ref.position for ref in refs) != sorted(set(ref.position for ref in refs)) or any(
        ref.position >= total for ref in refs
    ):
        raise SerializationError("a task payload's data refs name impossible positions")
    return refs


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
    resolve: Callable[[list[DataRef]], Sequence[Any]] | None = None,
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Rebuild ``(fn, args, kwargs)`` from :func:`dumps_call`'s payload (once the code
    version it names is active). A payload that names data by content needs
    ``resolve``: given its refs (:func:`data_refs`), it returns their buffers in order."""
    code, fn_bytes, arg_bytes, nrefs = _split_call(payload.inline)
    fn = functions.load(code, fn_bytes)
    buffers = [_as_buffer(f) for f in payload.buffers]
    if nrefs:
        if resolve is None:
            raise SerializationError("a task names data by content and nothing resolves it")
        refs = data_refs(payload)
        data = resolve(refs)
        if len(data) != nrefs:
            raise SerializationError("a task's data by content was not resolved")
        for ref, view in sorted(zip(refs, data), key=lambda pair: pair[0].position):
            buffers.insert(ref.position, view)
    args, kwargs = pickle.loads(arg_bytes, buffers=buffers)
    return fn, args, kwargs


def code_version(payload: Payload) -> bytes:
    """The code version a task payload names (b"" for none)."""
    return _split_call(payload.inline)[0]


def dumps_value(value: Any) -> Payload:
    """The payload for a return value. Raises ResultDecodeError naming the cause."""
    buffers: list[Frame] = []
    try:
        data = _dumps(value, buffers)
    except Exception as exc:
        raise ResultDecodeError(
            f"the task's result of type {type(value).__qualname__} cannot be pickled: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return Payload(data, tuple(buffers))


def loads_value(payload: Payload) -> Any:
    try:
        return pickle.loads(payload.inline, buffers=[_as_buffer(f) for f in payload.buffers])
    except Exception as exc:
        raise ResultDecodeError(
            f"the task's result could not be unpickled here: {type(exc).__name__}: {exc}"
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
    except Exception as why:
        return ResultDecodeError(
            f"the task raised an exception that could not be unpickled here: "
            f"{type(why).__name__}: {why}"
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


def _as_buffer(frame: Frame) -> Any:
    buffer = getattr(frame, "buffer", None)
    return frame if buffer is None else buffer
