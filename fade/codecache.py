"""Worker side of code shipping: a content-addressed cache on disk, and switching versions.

::

    task(version V) ─> tree for V on disk? ──yes──> activate V ─> unpickle and run
                           │ no
                           ├─ FETCH manifest V from the task's client (through the broker)
                           ├─ FETCH the blobs this host lacks (only changed files travel)
                           └─ build trees/V from objects/ atomically ─> activate V

    <cache>/objects/ab/abcdef...   one file per content hash, shared by every version
    <cache>/trees/<V>/             the files of version V, as a sys.path entry

Several worker processes on one host share the cache: every file and tree is
written under a temporary name and renamed into place, so a reader never sees a
partial one and two writers of the same content simply agree.

*Activating* a version puts its tree first on ``sys.path`` and drops the
modules of the previous version (and any other copy of the same top-level
names) from ``sys.modules``, so two clients with different versions of one
package never see each other's code. Module-level state lives as long as one
client's tasks of one version follow each other in that worker process; a
switch of version or of client imports the modules afresh and forgets the
unpickled functions that held the old ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.abc
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

from fade.errors import CodeShippingError
from fade.serialization import FunctionCache

try:
    import fcntl
except ImportError:  # not POSIX: builds may race, harmlessly (atomic renames)
    fcntl = None  # type: ignore[assignment]
from fade.shipping import Manifest

__all__ = ["CodeCache", "CodeRunner", "default_cache_dir"]

#: A function that asks the task's client for something: (client identity, request) -> frames.
Fetch = Callable[[bytes, dict[str, object]], list[bytes]]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FADE_CODE_CACHE") or os.path.join(base, "fade", "code")


class CodeCache:
    """The on-disk store of one host."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root or default_cache_dir()
        self.objects = os.path.join(self.root, "objects")
        self.trees = os.path.join(self.root, "trees")
        self.locks = os.path.join(self.root, "locks")
        for directory in (self.objects, self.trees, self.locks):
            os.makedirs(directory, exist_ok=True)

    @contextlib.contextmanager
    def lock(self, version: bytes) -> Iterator[None]:
        """Hold the host-wide lock for building ``version`` (advisory, via flock)."""
        path = os.path.join(self.locks, version.hex())
        with open(path, "a+b") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def tree(self, version: bytes) -> str | None:
        path = os.path.join(self.trees, version.hex())
        return path if os.path.isdir(path) else None

    def manifest(self, version: bytes) -> Manifest:
        with open(os.path.join(self.trees, version.hex(), ".fade-manifest.json"), "rb") as f:
            return Manifest.from_json(f.read())

    def _object(self, digest: str) -> str:
        return os.path.join(self.objects, digest[:2], digest)

    def missing(self, manifest: Manifest) -> list[str]:
        wanted = dict.fromkeys(digest for _, digest, _ in manifest.files)
        return [d for d in wanted if not os.path.exists(self._object(d))]

    def store(self, digests: Sequence[str], blobs: Sequence[bytes]) -> None:
        if len(digests) != len(blobs):
            raise CodeShippingError("the client sent a different number of files than asked")
        for digest, blob in zip(digests, blobs):
            if hashlib.sha256(blob).hexdigest() != digest:
                raise CodeShippingError(f"a shipped file does not match its hash {digest}")
            path = self._object(digest)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_atomically(path, blob)

    def build(self, version: bytes, manifest_json: bytes, manifest: Manifest) -> str:
        final = os.path.join(self.trees, version.hex())
        staging = tempfile.mkdtemp(prefix=".build-", dir=self.trees)
        try:
            for rel, digest, _ in manifest.files:
                target = os.path.join(staging, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    os.link(self._object(digest), target)
                except OSError:
                    shutil.copyfile(self._object(digest), target)
            _write_atomically(os.path.join(staging, ".fade-manifest.json"), manifest_json)
            try:
                os.rename(staging, final)
            except OSError:
                if not os.path.isdir(final):  # not another process winning the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _Refuser(importlib.abc.MetaPathFinder):
    """Turns the import of a module that could not travel into a clear error."""

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = reasons

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        reason = self.reasons.get(fullname)
        if reason is not None:
            raise CodeShippingError(
                f"module {fullname!r} could not travel from the client to this worker: {reason}"
                f". Install it on the workers."
            )
        return None


class CodeRunner:
    """Makes a task's code version the active one in this worker process.

    A task runs with exactly the modules of its own code version, imported afresh
    for its client: whenever the version *or the client* differs from the previous
    task's, the modules of the shipped top-level names are dropped from
    ``sys.modules`` and the unpickled functions cached in ``functions`` are
    forgotten (they hold the dropped modules' globals), so nothing of an earlier
    version or another client's run is reachable from the new task's code.
    """

    def __init__(
        self, cache: CodeCache, fetch: Fetch, functions: FunctionCache | None = None
    ) -> None:
        self.cache = cache
        self._fetch = fetch
        self.functions = functions if functions is not None else FunctionCache()
        self.active = b""
        self._client = b""
        self._tree: str | None = None
        self._roots: tuple[str, ...] = ()
        self._refuser: _Refuser | None = None
        self.fetches = 0
        self.switches = 0

    def ensure(self, version: bytes, client: bytes) -> None:
        """Activate ``version`` for ``client`` (fetching it from ``client`` first if this
        host lacks it). O(1) when both are the previous task's."""
        if version == self.active and client == self._client:
            return
        self.switches += 1
        self.functions.clear()
        self._client = b""  # until the switch succeeds: a failed one is tried again
        if version == self.active:
            _purge(self._roots)  # same code, another client: fresh modules all the same
        elif not version:
            self._deactivate()
        else:
            tree = self.cache.tree(version)
            if tree is None:
                # One process per host downloads a version; the others wait for it and
                # then find it on disk, so code crosses the network once per host.
                with self.cache.lock(version):
                    tree = self.cache.tree(version) or self._download(version, client)
            self._activate(version, tree, self.cache.manifest(version))
        self._client = client

    def _download(self, version: bytes, client: bytes) -> str:
        self.fetches += 1
        (manifest_json,) = self._fetch(client, {"kind": "manifest", "version": version.hex()})
        if hashlib.sha256(manifest_json).digest()[:16] != version:
            raise CodeShippingError("the client's manifest does not match its version id")
        manifest = Manifest.from_json(manifest_json)
        missing = self.cache.missing(manifest)
        if missing:
            blobs = self._fetch(client, {"kind": "blobs", "hashes": missing})
            self.cache.store(missing, blobs)
        return self.cache.build(version, manifest_json, manifest)

    def _activate(self, version: bytes, tree: str, manifest: Manifest) -> None:
        self._deactivate()
        _purge(manifest.roots)
        sys.path.insert(0, tree)
        importlib.invalidate_caches()
        if manifest.unshippable:
            self._refuser = _Refuser(manifest.unshippable)
            sys.meta_path.insert(0, self._refuser)
        self.active, self._tree, self._roots = version, tree, manifest.roots

    def _deactivate(self) -> None:
        if self._tree is not None and self._tree in sys.path:
            sys.path.remove(self._tree)
        if self._refuser is not None and self._refuser in sys.meta_path:
            sys.meta_path.remove(self._refuser)
        _purge(self._roots)
        self.active, self._tree, self._roots, self._refuser = b"", None, (), None


def _purge(roots: Sequence[str]) -> None:
    """Forget every loaded module under these top-level names."""
    tops = set(roots)
    for name in [n for n in sys.modules if n.partition(".")[0] in tops]:
        del sys.modules[name]
