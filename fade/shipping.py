"""Client side of code shipping: the user's own modules travel to the workers by themselves.

::

    import hook ── records the source of every local module as it is imported (or reloaded)
        │
    LocalCode.version() ── per submit: O(1) unless modules were imported or reloaded since
        │                   └─ recompute: which modules are local, their package files,
        │                      content hashes ─> Manifest (id = hash of its content)
        ▼
    task payload carries the 16-byte manifest id; a worker that lacks it asks back:
    FETCH manifest ──> Manifest JSON;  FETCH blobs [sha256...] ──> file contents

*Local* means not installed in the Python environment: not under the standard
library or site-packages, and not owned by a (non-editable) installed
distribution. A package beside the script, a directory on ``sys.path`` and an
editable checkout are local; numpy is not, and travels by reference as always.

What travels is what the client runs: a module's source is recorded when it is
imported (or reloaded), so editing a file on disk without reloading it does
not change what the workers run. Data files inside a local package travel too
(read when the package is first shipped, and again whenever the code version
changes). ``.git``, ``__pycache__`` and hidden files never travel; compiled
extensions cannot.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import re
import sys
import sysconfig
import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

from fade import defaults
from fade.errors import CodeShippingError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "LocalCode",
    "Manifest",
    "client_file",
    "install_import_hook",
    "recorder_generation",
    "uninstall_import_hook",
]

#: The most code and data one client ships, unless told otherwise.
DEFAULT_MAX_BYTES = defaults.SHIP_CODE_LIMIT
#: Never shipped: workers have fade installed.
NEVER_SHIP = frozenset({"fade", "__main__", "__mp_main__"})
_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)
_SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "node_modules"})


def _installed_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    try:
        import site

        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # some embedded interpreters lack them
        pass
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


_INSTALLED = _installed_prefixes()


def _under_installed(path: str) -> bool:
    return os.path.realpath(path).startswith(_INSTALLED)


# -- recording sources at import time ----------------------------------------------------


class _SourceRecorder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds nothing itself, but notes the source of local
    ``.py`` modules as the other finders find them (imports and reloads alike)."""

    def __init__(self) -> None:
        self.sources: dict[str, bytes] = {}  # origin path -> source bytes
        self.generation = 0
        self._busy = threading.local()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            spec = self._find_elsewhere(fullname, path, target)
        finally:
            self._busy.active = False
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            self._record(spec.origin)
        return spec

    def _find_elsewhere(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _record(self, origin: str) -> None:
        if _under_installed(origin):
            return
        try:
            with open(origin, "rb") as f:
                self.sources[origin] = f.read()
        except OSError:
            return
        self.generation += 1


_recorder = _SourceRecorder()


def recorder_generation() -> int:
    """Changes whenever a local module is imported or reloaded."""
    return _recorder.generation


def uninstall_import_hook() -> None:
    """Stop recording (worker processes, which only import code that was shipped)."""
    while _recorder in sys.meta_path:
        sys.meta_path.remove(_recorder)


def install_import_hook() -> None:
    """Start recording local module sources (idempotent; done when fade is imported)."""
    if _recorder not in sys.meta_path:
        sys.meta_path.insert(0, _recorder)


# -- the manifest -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Manifest:
    """One version of the client's local code: files by content hash."""

    files: tuple[tuple[str, str, int], ...]  # (relative path, sha256 hex, size)
    roots: tuple[str, ...]  # top-level module names it provides
    unshippable: dict[str, str] = field(default_factory=dict)  # module -> why not

    def to_json(self) -> bytes:
        data = {
            "files": [list(f) for f in self.files],
            "roots": list(self.roots),
            "unshippable": self.unshippable,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @property
    def id(self) -> bytes:
        return hashlib.sha256(self.to_json()).digest()[:16]

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            files = tuple((str(p), str(h), int(n)) for p, h, n in raw["files"])
            roots = tuple(str(r) for r in raw["roots"])
            unshippable = {str(k): str(v) for k, v in raw["unshippable"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CodeShippingError(f"a code manifest did not parse: {exc}") from None
        for path, _, _ in files:
            _check_relative(path)
        return cls(files, roots, unshippable)


def _base_of(top: str, where: str, is_package: bool) -> str:
    """The sys.path entry a top-level module was found in."""
    directory = os.path.dirname(where)
    if is_package and os.path.basename(where) != top:  # where is __init__.py
        directory = os.path.dirname(directory)
    return directory


def _check_relative(path: str) -> None:
    """Refuse paths that would escape the code tree on the worker."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise CodeShippingError(f"refusing an unsafe path in a code manifest: {path!r}")


@dataclass(slots=True)
class _Root:
    """A top-level local module: a single file or a package directory."""

    name: str
    base: str  # the directory that holds it (what is on sys.path)
    paths: list[str]  # files (single module) or directories (package; several if namespace)
    is_package: bool


class LocalCode:
    """Tracks the client's local code and answers the workers' FETCH requests.

    :meth:`version` is called on every submit and costs O(1) while nothing was
    imported or reloaded; thread-safe.
    """

    def __init__(self, *, pinned: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.pinned = pinned
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._seen: tuple[int, int] = (-1, -1)  # (len(sys.modules), recorder generation)
        self._current: Manifest | None = None
        self._current_id = b""
        self._manifests: dict[bytes, Manifest] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 hex -> content (every version served)
        self._hash_cache: dict[tuple[str, int, int], tuple[str, bytes]] = {}
        self._installed_names: dict[str, bool] = {}
        self._origins: dict[str, str] = {}  # relative path in a manifest -> our file
        self.stats = {"manifests_served": 0, "blobs_served": 0, "bytes_served": 0}
        _instances.add(self)

    # -- per submit --------------------------------------------------------------------

    def version(self) -> bytes:
        """The current code version's id (16 bytes), or b"" when there is no local code."""
        seen = (len(sys.modules), _recorder.generation)
        if seen == self._seen or (self.pinned and self._current is not None):
            return self._current_id
        with self._lock:
            if seen != self._seen:
                manifest = self._compute()
                self._seen = seen
                self._current = manifest
                self._current_id = manifest.id if manifest.files else b""
                self._manifests[self._current_id] = manifest
        return self._current_id

    def check_function(self, fn: Any) -> None:
        """Fail at once when the function itself lives in code that cannot travel."""
        manifest = self._current
        module = getattr(fn, "__module__", None)
        if manifest is None or not module:
            return
        reason = manifest.unshippable.get(module)
        if reason is not None:
            raise CodeShippingError(
                f"{getattr(fn, '__qualname__', fn)!r} is in module {module!r}, which cannot "
                f"travel to the workers: {reason}. Install it on the workers (for example "
                f"with pip) or turn code shipping off with fade.Executor(ship_code='off')."
            )

    # -- serving workers ------------------------------------------------------------------

    def manifest_json(self, version: bytes) -> bytes | None:
        manifest = self._manifests.get(version)
        if manifest is None:
            return None
        self.stats["manifests_served"] += 1
        return manifest.to_json()

    def blobs(self, hashes: Sequence[str]) -> list[bytes] | None:
        try:
            found = [self._blobs[h] for h in hashes]
        except KeyError:
            return None
        self.stats["blobs_served"] += len(found)
        self.stats["bytes_served"] += sum(len(b) for b in found)
        return found

    def blob_range(self, digest: str, offset: int, size: int) -> bytes | None:
        """``size`` bytes of a file from ``offset``: a file over a frame limit travels in
        pieces (fade/codecache.py)."""
        content = self._blobs.get(digest)
        if content is None or offset < 0 or size <= 0 or offset >= len(content):
            return None
        self.stats["bytes_served"] += min(size, len(content) - offset)
        return content[offset : offset + size]

    def file_of(self, version: bytes, rel: str) -> tuple[str, list[str]] | None:
        """Our file for a path of a version we shipped, and its lines as they were shipped."""
        manifest = self._manifests.get(version)
        if manifest is None:
            return None
        digest = next((d for path, d, _ in manifest.files if path == rel), None)
        content = self._blobs.get(digest) if digest is not None else None
        if content is None:
            return None
        path = self._origins.get(rel, rel)
        return path, content.decode("utf-8", errors="replace").splitlines()

    # -- computing a version -------------------------------------------------------------------

    def _compute(self) -> Manifest:
        roots: dict[str, _Root] = {}
        unshippable: dict[str, str] = {}
        for name, module in list(sys.modules.items()):
            top = name.partition(".")[0]
            # By its top-level module: a package comes after its submodules in sys.modules
            # (moved to the end once imported), and a submodule's folder is not where the
            # package's dist-info is.
            if top in NEVER_SHIP or module is None:
                continue
            if self._is_installed(top, sys.modules.get(top) or module):
                continue
            origin = getattr(module, "__file__", None)
            if origin and origin.endswith(_EXTENSIONS):
                unshippable[name] = f"it is a compiled extension ({origin})"
                continue
            root = roots.get(top) or self._root_of(top)
            if root is not None:
                roots[top] = root
        files: list[tuple[str, str, int]] = []
        total = 0
        for root in sorted(roots.values(), key=lambda r: r.name):
            for rel, path in self._files_of(root):
                self._origins[rel] = path
                digest, content = self._content(path)
                self._blobs[digest] = content
                files.append((rel, digest, len(content)))
                total += len(content)
                if total > self.max_bytes:
                    raise CodeShippingError(
                        f"the local code to ship is over {self.max_bytes // 2**20} MiB "
                        f"(at {path}); move large data out of your packages, raise "
                        f"fade.Executor(ship_code_limit=...), or install the package on the "
                        f"workers"
                    )
        return Manifest(tuple(sorted(files)), tuple(sorted(roots)), unshippable)

    def _is_installed(self, top: str, module: ModuleType) -> bool:
        cached = self._installed_names.get(top)
        if cached is not None:
            return cached
        origin = getattr(module, "__file__", None)
        paths = list(getattr(module, "__path__", None) or [])
        where = origin or (paths[0] if paths else None)
        if where is None or _under_installed(where):  # built-in or frozen: part of the interpreter
            installed = True
        else:
            installed = _owned_by_installed_distribution(top, _base_of(top, where, bool(paths)))
        self._installed_names[top] = installed
        return installed

    def _root_of(self, top: str) -> _Root | None:
        module = sys.modules.get(top)
        if module is None:
            return None
        paths = [p for p in (getattr(module, "__path__", None) or []) if os.path.isdir(p)]
        if paths:
            return _Root(top, os.path.dirname(paths[0]), paths, True)
        origin = getattr(module, "__file__", None)
        if origin and origin.endswith(".py") and os.path.isfile(origin):
            return _Root(top, os.path.dirname(origin), [origin], False)
        return None

    def _files_of(self, root: _Root) -> list[tuple[str, str]]:
        if not root.is_package:
            return [(os.path.basename(root.paths[0]), root.paths[0])]
        out = []
        for directory in root.paths:
            for dirpath, dirnames, filenames in os.walk(directory):
                dirnames[:] = sorted(
                    d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                )
                for name in sorted(filenames):
                    if name.startswith(".") or name.endswith((".pyc", ".pyo", *_EXTENSIONS)):
                        continue
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, os.path.dirname(directory))
                    out.append((rel.replace(os.sep, "/"), path))
        return out

    def _content(self, path: str) -> tuple[str, bytes]:
        """The bytes to ship for ``path``: its source as imported if it is a module."""
        recorded = _recorder.sources.get(path)
        if recorded is not None:
            return hashlib.sha256(recorded).hexdigest(), recorded
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CodeShippingError(f"cannot read local file {path}: {exc}") from None
        key = (path, st.st_mtime_ns, st.st_size)
        cached = self._hash_cache.get(key)
        if cached is None:
            with open(path, "rb") as f:
                content = f.read()
            _warn_if_edited_since_import(path, st)
            cached = (hashlib.sha256(content).hexdigest(), content)
            self._hash_cache[key] = cached
        return cached


_instances: weakref.WeakSet[LocalCode] = weakref.WeakSet()
#: A file of a worker's code tree: <cache>/trees/<version hex>/<path in the manifest>.
_TREE_FILE = re.compile(r"[/\\]trees[/\\]([0-9a-f]{32})[/\\](.+)$")


def client_file(path: str) -> tuple[str, list[str] | None] | None:
    """This process's own file for a file name in a worker's traceback, with its lines:
    a file of a code tree this process shipped (lines as shipped), or one of its local
    modules (lines as imported). None: not ours, leave it as it is."""
    match = _TREE_FILE.search(path)
    if match is not None:
        version, rel = bytes.fromhex(match[1]), match[2].replace("\\", "/")
        for code in list(_instances):
            found = code.file_of(version, rel)
            if found is not None:
                return found
        return None
    recorded = _recorder.sources.get(path)
    if recorded is not None:
        return path, recorded.decode("utf-8", errors="replace").splitlines()
    return None  # the script itself, say: its lines come from linecache


def _warn_if_edited_since_import(path: str, st: os.stat_result) -> None:
    """A module imported before fade was: if its file changed since, say so (not silently)."""
    if not path.endswith(".py"):
        return
    module = next(
        (m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == path), None
    )
    cached = getattr(module, "__cached__", None)
    if not cached:
        return
    try:
        with open(cached, "rb") as f:
            header = f.read(16)
    except OSError:
        return
    if len(header) == 16 and int.from_bytes(header[4:8], "little") == 0:
        mtime = int.from_bytes(header[8:12], "little")
        size = int.from_bytes(header[12:16], "little")
        if (mtime, size) != (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF):
            warnings.warn(
                f"{path} changed on disk after it was imported; the workers will run the "
                f"file as it is now. Reload the module (importlib.reload) to run the same code "
                f"here and there.",
                RuntimeWarning,
                stacklevel=4,
            )


def _owned_by_installed_distribution(top: str, base: str) -> bool:
    """True if a distribution installed beside the module (its ``*.dist-info`` in the same
    ``sys.path`` entry) provides it. An editable install keeps its metadata in
    site-packages and its code elsewhere, so its code counts as local."""
    import importlib.metadata as md

    for dist in md.distributions(path=[base]):
        names = set((dist.read_text("top_level.txt") or "").split())
        for file in dist.files or ():
            first = file.parts[0] if file.parts else ""
            names.add(first[:-3] if first.endswith(".py") else first)
        if top in names:
            return True
    return False
