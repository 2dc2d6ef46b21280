"""Which pickler fade uses, and what it notes while pickling (for fade/serialization.py).

::

    serialization._dumps(obj)
      is_plain(obj)? ── scalars, strings, numeric arrays, small containers of those
        yes: pickle.dumps (the C pickler; about ten times cheaper than a CloudPickler)
        no:  cloudpickle_dumps(obj, modules=...)
               _Pickler: cloudpickle's, but code pickled by value keeps its file name
               _NotingPickler: also notes the modules of what it meets (fade/packages.py)

Separate from fade/serialization.py, which decides what goes where (frames, content
refs, shared memory) and lays out payloads: this module only knows how an object
becomes bytes, and which modules those bytes refer to.

Unpickling is ``pickle.loads``, with one second try: an exception whose ``__init__``
needs more than its ``args`` (``def __init__(self, part, detail)`` calling
``super().__init__(f"{part}: {detail}")``) cannot be rebuilt by calling its class
with ``args``, which is what pickle does (bpo-32696); :func:`loads` then builds it
without its ``__init__``, as the exception it was (type, ``args``, attributes), so the
caller can still catch it by its type.

Code pickled by value (a function of ``__main__``, a lambda, a closure) keeps its
real file name: cloudpickle writes ``"<dynamic-code>"`` instead (to make equal
functions from different files pickle alike), which leaves a remote traceback
nothing to point at.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import cloudpickle

# fade uses cloudpickle 3's pickler and reducers: an older one (left by pip install
# --no-deps, a PYTHONPATH or another package manager) failed only later, a function
# pickled by value at a time, naming cloudpickle's internals and not the fix.
if int(cloudpickle.__version__.split(".")[0]) < 3:
    raise ImportError(
        f"fade needs cloudpickle 3 or later, and this Python ({sys.executable}) has "
        f"cloudpickle {cloudpickle.__version__} from {cloudpickle.__file__}: install a "
        f"newer one with pip install 'cloudpickle>=3'"
    )

import cloudpickle.cloudpickle as _cloudpickle_impl  # after the check

__all__ = [
    "ARRAYS",
    "NOT_PLAIN",
    "SCALARS",
    "cloudpickle_dumps",
    "is_plain",
    "loads",
    "pickles_by_reference",
]

_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})
#: What :func:`is_plain` finds: not plain, scalars only, numpy arrays too.
NOT_PLAIN, SCALARS, ARRAYS = 0, 1, 2


def is_plain(obj: Any, depth: int = 0) -> int:
    """Non-zero for data the C pickler handles exactly as cloudpickle would (no code
    inside): scalars, strings, numpy arrays of numbers, and small tuples, lists and
    str-keyed dicts of those; ARRAYS when it holds a numpy array. Cheap enough to try on
    every call (no generators, scalars checked in line); anything else goes to cloudpickle."""
    kind = type(obj)
    if kind in _PLAIN:
        return SCALARS
    if depth > 2:
        return NOT_PLAIN
    if kind is tuple or kind is list:
        items = obj
    elif kind is dict:
        for key in obj:
            if type(key) is not str:
                return NOT_PLAIN
        items = obj.values()
    elif kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not obj.dtype.hasobject:
        return ARRAYS
    else:
        return NOT_PLAIN
    if len(obj) > 16:
        return NOT_PLAIN
    found = SCALARS
    for item in items:
        if type(item) in _PLAIN:
            continue
        plain = is_plain(item, depth + 1)
        if not plain:
            return NOT_PLAIN
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


def cloudpickle_dumps(
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


def pickles_by_reference(fn: Any) -> bool:
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


def loads(data: bytes | memoryview, buffers: list[Any] | tuple[Any, ...] = ()) -> Any:
    """``pickle.loads``; if that fails, once more with exceptions rebuilt without their
    ``__init__`` (see the module's text). The first failure is raised if that fails too."""
    try:
        return pickle.loads(data, buffers=buffers)
    except (ImportError, pickle.UnpicklingError):
        raise  # a missing module or broken bytes: a second try cannot do better
    except Exception as first:
        try:
            return _ExceptionRebuildingUnpickler(io.BytesIO(data), buffers=buffers).load()
        except Exception:
            raise first from None


class _ExceptionRebuildingUnpickler(pickle._Unpickler):  # the Python one: its opcodes are methods
    """An unpickler that rebuilds an exception its class refuses to take back (only used
    after the C unpickler failed: it is many times slower)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_reduce(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]  # set by load()
        args = stack.pop()
        func = stack[-1]
        try:
            stack[-1] = func(*args)
        except Exception:
            if not (isinstance(func, type) and issubclass(func, BaseException)):
                raise
            # What BaseException.__reduce__ gave: the class and its args; the attributes
            # follow (BUILD) and are set as usual. __new__ stores args and runs no __init__.
            stack[-1] = func.__new__(func, *args)

    dispatch[pickle.REDUCE[0]] = _load_reduce  # type: ignore[assignment]  # a subclass's method
