"""Importing shipped code from the cache: only the manifest's files, checked as they are read.

::

    import mylib.model
      └─ PathFinder: sys.path / mylib.__path__ entry under <cache>/trees/<V>/
           └─ path hook (first in sys.path_hooks) ─> TreeFinder(V, "mylib/")
                └─ "mylib/model.py" in V's manifest? ── no ──> not found
                     │ yes
                     └─ TreeLoader: read it; sha256 as in the manifest? ── no ──> CodeShippingError
                          │ yes
                          └─ compile (once per process and file content) ─> exec

Python's own finder would also load, from the same folder, a compiled extension
(``model.*.so`` comes before ``model.py``), a sourceless ``model.pyc`` or a stale
``__pycache__`` entry whose recorded timestamp matches: none of those is in the
manifest, so none of them is ever looked at here. A module is thus exactly the
source the client shipped, whatever else the folder holds, and nothing is
written into the tree (no ``__pycache__``).

Processes a task starts (``multiprocessing``, ``subprocess``) import from the
same folders with Python's ordinary finder: they get the files, unchecked.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from types import CodeType

from fade.errors import CodeShippingError

__all__ = ["TreeFiles", "TreeImporter"]

#: Compiled modules kept per process, by (content hash, path): re-importing after a
#: switch back to a version costs running the module, not compiling it again.
MAX_COMPILED = 4096


@dataclass(frozen=True, slots=True)
class TreeFiles:
    """What a verified tree may serve: file -> sha256 hex, and its folders."""

    files: dict[str, str]  # relative path ("mylib/model.py") -> sha256 hex
    folders: frozenset[str]  # "mylib", "mylib/data", ...

    @classmethod
    def of(cls, files: dict[str, str]) -> TreeFiles:
        folders: set[str] = set()
        for rel in files:
            parts = rel.split("/")[:-1]
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return cls(files, frozenset(folders))


class TreeImporter:
    """The path hook that serves ``<trees>/<version>/...`` from verified manifests.

    ``trusted`` maps a version's hex id to the files its tree may serve; a tree of a
    version not in it serves nothing (it is never handed to Python's own finder).
    ``on_mismatch(version_hex, message)`` is called when a file read does not match;
    ``wait_for_build(version_hex)`` returns once no process is (re)building that tree.
    """

    def __init__(
        self,
        trees: str,
        on_mismatch: Callable[[str, str], None],
        wait_for_build: Callable[[str], None],
    ) -> None:
        self.trees = os.path.join(os.path.abspath(trees), "")
        self.trusted: dict[str, TreeFiles] = {}
        self.on_mismatch = on_mismatch
        self.wait_for_build = wait_for_build
        self._compiled: dict[tuple[str, str], CodeType] = {}

    def hook(self, path: str) -> TreeFinder:
        """For ``sys.path_hooks``: claim every folder under the trees (ImportError: not ours)."""
        if not path.startswith(self.trees):
            raise ImportError("not a fade code tree")
        version, _, rel = path[len(self.trees) :].partition(os.sep)
        rel = rel.replace(os.sep, "/").strip("/")
        return TreeFinder(self, version, os.path.join(self.trees, version), rel)

    def compiled(self, digest: str, path: str, source: bytes) -> CodeType:
        key = (digest, path)
        code = self._compiled.get(key)
        if code is None:
            if len(self._compiled) >= MAX_COMPILED:
                self._compiled.clear()
            code = compile(source, path, "exec", dont_inherit=True)
            self._compiled[key] = code
        return code

    def checked_read(self, version: str, root: str, path: str) -> tuple[str, bytes]:
        """The content of a tree file and its hash, if the manifest lists it with that hash."""
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        tree = self.trusted.get(version)
        digest = tree.files.get(rel) if tree is not None else None
        if digest is None:
            raise CodeShippingError(
                f"{path} is not part of the code the client shipped (code version {version}); "
                "refusing to load it"
            )
        try:
            data = _read(path)
        except FileNotFoundError:
            # Another worker process of this host may be rebuilding the tree (it found
            # it changed): its files are back, checked, once it releases the lock.
            self.wait_for_build(version)
            try:
                data = _read(path)
            except OSError as exc:
                raise CodeShippingError(f"{path} is missing from the code cache: {exc}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            message = (
                f"{path} in the code cache does not match the content the client shipped "
                f"(it was changed after it was stored); refusing to run it. The next task "
                f"checks and rebuilds code version {version} from the client's files."
            )
            self.on_mismatch(version, message)
            raise CodeShippingError(message)
        return digest, data


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class TreeFinder:
    """Finds modules in one folder of one tree, among the manifest's files only."""

    def __init__(self, importer: TreeImporter, version: str, root: str, rel: str) -> None:
        self.importer = importer
        self.version = version
        self.root = root
        self.prefix = f"{rel}/" if rel else ""

    def find_spec(self, fullname: str, target: object = None) -> ModuleSpec | None:
        tree = self.importer.trusted.get(self.version)
        if tree is None:
            return None
        base = self.prefix + fullname.rpartition(".")[2]
        folder = os.path.join(self.root, *base.split("/"))
        if f"{base}/__init__.py" in tree.files:
            init = os.path.join(folder, "__init__.py")
            loader = TreeLoader(fullname, init, self)
            return importlib.util.spec_from_file_location(
                fullname, init, loader=loader, submodule_search_locations=[folder]
            )
        if f"{base}.py" in tree.files:
            path = f"{folder}.py"
            return importlib.util.spec_from_file_location(
                fullname, path, loader=TreeLoader(fullname, path, self)
            )
        if base in tree.folders:  # a namespace package's portion
            spec = ModuleSpec(fullname, None)
            spec.submodule_search_locations = [folder]
            return spec
        return None

    def invalidate_caches(self) -> None:
        """Nothing cached here: the manifest is the listing."""

    def iter_modules(self, prefix: str = "") -> Iterator[tuple[str, bool]]:
        """For ``pkgutil.iter_modules``: the modules and packages directly in this folder."""
        tree = self.importer.trusted.get(self.version)
        if tree is None:
            return
        seen = set()
        for rel in sorted(tree.files):
            if not rel.startswith(self.prefix):
                continue
            head, sep, rest = rel[len(self.prefix) :].partition("/")
            if sep and rest == "__init__.py" and head not in seen:
                seen.add(head)
                yield prefix + head, True
            elif not sep and head.endswith(".py") and head != "__init__.py":
                name = head[:-3]
                if name not in seen:
                    seen.add(name)
                    yield prefix + name, False


class TreeLoader(importlib.machinery.SourceFileLoader):
    """Loads a module from the checked source; never reads nor writes bytecode files."""

    def __init__(self, fullname: str, path: str, finder: TreeFinder) -> None:
        super().__init__(fullname, path)
        self._finder = finder

    def get_data(self, path: str) -> bytes:
        """Tree files come back only if they match the manifest (also for pkgutil.get_data)."""
        f = self._finder
        return f.importer.checked_read(f.version, f.root, str(path))[1]

    def get_code(self, fullname: str) -> CodeType:
        f = self._finder
        path = self.get_filename(fullname)
        digest, source = f.importer.checked_read(f.version, f.root, path)
        return f.importer.compiled(digest, path, source)
