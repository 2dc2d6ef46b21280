"""Worker side of code shipping: a private, checked cache on disk, and switching versions.

::

    task(version V, client C) ─ same V and C as the last task? ──yes──> unpickle and run
        │ no: forget the unpickled functions; drop the modules of the shipped names
        ▼
    tree for V on disk? ──no──> FETCH manifest V from C (through the broker): its id must be V
        │                         FETCH the files this host lacks (or has with other content);
        │                         a file over the frame limit on the way in pieces (blob_range)
        │                         build trees/V from objects/ atomically
        ▼
    first use of V in this process: every file hashed against the manifest, nothing else
        │   in the tree ──mismatch──> log, discard the tree, fetch and build it again
        ▼
    activate V: its tree first on sys.path; imports from it go through fade/_codeimport.py,
    which loads only the manifest's files and checks each one's hash as it reads it

    <cache>/objects/ab/abcdef...   one file per content hash, shared by every version
    <cache>/trees/<V>/             the files of version V, as a sys.path entry

**Trust.** The cache holds code this worker will run, so only this user may
write it: it is created private (folders 0700, files 0600), and a cache folder
that belongs to another user or that group or others may write is refused with
an error that names it. Content is never trusted for being on disk: a manifest
must hash to its version id, every object and tree file to its manifest entry;
a tampered entry is rebuilt from the client's files, or the task fails with
``CodeShippingError``; the tampered code never runs.

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
import logging
import os
import pwd
import shutil
import socket
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

from fade._codeimport import TreeFiles, TreeImporter
from fade.datacache import FILE_SYSTEM_FAILURES
from fade.errors import CodeShippingError
from fade.serialization import FunctionCache

try:
    import fcntl
except ImportError:  # not POSIX: builds may race, harmlessly (atomic renames)
    fcntl = None  # type: ignore[assignment]
from fade.shipping import Manifest

__all__ = ["CodeCache", "CodeRunner", "check_private_dir", "default_cache_dir"]

log = logging.getLogger("fade.codecache")

#: A function that asks the task's client for something: (a reference to the task or its
#: client, request) -> frames.
Fetch = Callable[[bytes, dict[str, object]], list[bytes]]
#: Bytes of a frame limit left for the CODE message's own fields around a file's piece.
FRAME_HEAD_ROOM = 4096

MANIFEST_FILE = ".fade-manifest.json"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FADE_CODE_CACHE") or os.path.join(base, "fade", "code")


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_private_dir(path: str) -> None:
    """Create ``path`` (0700) or accept it if it is this user's and no one else may write
    it; a folder others may read is made private. Raises CodeShippingError naming the fix."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CodeShippingError(f"the code cache {path} is not a folder")
    me = os.geteuid()
    if st.st_uid != me:
        raise CodeShippingError(
            f"refusing the code cache folder {path}: it belongs to {_user(st.st_uid)}, not to "
            f"{_user(me)} who runs this worker, and its owner could change the code this worker "
            "runs. Remove it (as its owner), or give this worker a folder of its own with "
            "--code-cache DIR or FADE_CODE_CACHE."
        )
    if st.st_mode & 0o022:
        raise CodeShippingError(
            f"refusing the code cache folder {path}: group or others may write to it (mode "
            f"{stat.S_IMODE(st.st_mode):o}), so they could change the code this worker runs. "
            f"Make it private with `chmod 700 {path}` (and check what it holds), or give this "
            "worker another folder with --code-cache DIR or FADE_CODE_CACHE."
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours, only readable by others: shipped code stays private


def _makedirs_private(path: str) -> None:
    """``os.makedirs`` that gives every folder it creates mode 0700."""
    if os.path.isdir(path):
        return
    _makedirs_private(os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


class CodeCache:
    """The on-disk store of one host (its folder checked by :func:`check_private_dir`)."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_cache_dir())
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        check_private_dir(self.root)
        self.objects = os.path.join(self.root, "objects")
        self.trees = os.path.join(self.root, "trees")
        self.locks = os.path.join(self.root, "locks")
        for directory in (self.objects, self.trees, self.locks):
            check_private_dir(directory)

    @contextlib.contextmanager
    def lock(self, version: bytes) -> Iterator[None]:
        """Hold the host-wide lock for building ``version`` (advisory, via flock)."""
        fd = os.open(os.path.join(self.locks, version.hex()), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def tree(self, version: bytes) -> str | None:
        path = os.path.join(self.trees, version.hex())
        return path if os.path.isdir(path) else None

    def manifest(self, version: bytes) -> Manifest | None:
        """The tree's manifest, or None if it is missing or does not hash to ``version``."""
        try:
            with open(os.path.join(self.trees, version.hex(), MANIFEST_FILE), "rb") as f:
                data = f.read()
        except OSError:
            return None
        if hashlib.sha256(data).digest()[:16] != version:
            return None
        return Manifest.from_json(data)

    def _object(self, digest: str) -> str:
        return os.path.join(self.objects, digest[:2], digest)

    def missing(self, manifest: Manifest) -> list[str]:
        """Hashes whose object is absent or holds other content (which is removed)."""
        out = []
        for digest in dict.fromkeys(digest for _, digest, _ in manifest.files):
            path = self._object(digest)
            if _hash_file(path) != digest:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                out.append(digest)
        return out

    def store(self, digests: Sequence[str], blobs: Sequence[bytes]) -> None:
        if len(digests) != len(blobs):
            raise CodeShippingError("the client sent a different number of files than asked")
        for digest, blob in zip(digests, blobs):
            if hashlib.sha256(blob).hexdigest() != digest:
                raise CodeShippingError(f"a shipped file does not match its hash {digest}")
            path = self._object(digest)
            _makedirs_private(os.path.dirname(path))
            _write_atomically(path, blob)

    def build(self, version: bytes, manifest_json: bytes, manifest: Manifest) -> str:
        final = os.path.join(self.trees, version.hex())
        staging = tempfile.mkdtemp(prefix=".build-", dir=self.trees)
        try:
            for rel, digest, _ in manifest.files:
                target = os.path.join(staging, *rel.split("/"))
                _makedirs_private(os.path.dirname(target))
                try:
                    os.link(self._object(digest), target)
                except OSError:
                    with open(self._object(digest), "rb") as f:
                        _write_atomically(target, f.read())
            _write_atomically(os.path.join(staging, MANIFEST_FILE), manifest_json)
            try:
                os.rename(staging, final)
            except OSError:
                if not os.path.isdir(final):  # not another process winning the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def check(self, version: bytes, manifest: Manifest) -> list[str]:
        """What is wrong with the tree of ``version``: files that differ from the
        manifest, are missing, or are there without being in it (empty: all is well)."""
        tree = os.path.join(self.trees, version.hex())
        expected = {rel: digest for rel, digest, _ in manifest.files}
        problems = []
        for rel, digest in expected.items():
            path = os.path.join(tree, *rel.split("/"))
            try:
                regular = stat.S_ISREG(os.lstat(path).st_mode)
            except OSError:
                regular = False
            if not regular:
                problems.append(f"{rel}: missing or not a regular file")
            elif _hash_file(path) != digest:
                problems.append(f"{rel}: content differs from the manifest")
        for dirpath, dirnames, filenames in os.walk(tree):
            # Python's own import (in processes a task starts) may cache bytecode here;
            # fade's import never reads it.
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in filenames + links:
                rel = os.path.relpath(os.path.join(dirpath, name), tree).replace(os.sep, "/")
                if rel not in expected and rel != MANIFEST_FILE:
                    problems.append(f"{rel}: not part of the manifest")
        return problems

    def discard(self, version: bytes) -> None:
        """Remove a tree that failed its check (renamed first: readers never see half of it)."""
        tree = os.path.join(self.trees, version.hex())
        doomed = os.path.join(self.trees, f".discarded-{version.hex()}-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(tree, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _hash_file(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a half-written file would hold the space
            os.unlink(tmp)
        raise


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
        self,
        cache: CodeCache,
        fetch: Fetch,
        functions: FunctionCache | None = None,
        frame_limit: Callable[[], int] = lambda: 0,
    ) -> None:
        self.cache = cache
        self._fetch = fetch
        self._frame_limit = frame_limit  # the smallest between the client and us (0: none)
        self.functions = functions if functions is not None else FunctionCache()
        self.active = b""
        self._client = b""
        self._tree: str | None = None
        self._roots: tuple[str, ...] = ()
        self._refuser: _Refuser | None = None
        self.fetches = 0
        self.switches = 0
        self.rebuilds = 0
        self._manifests: dict[bytes, Manifest] = {}  # of the trees checked in this process
        self._importer = TreeImporter(cache.trees, self._on_mismatch, self._wait_for_build)
        sys.path_hooks.insert(0, self._importer.hook)

    def ensure(self, version: bytes, client: bytes, ref: bytes | None = None) -> None:
        """Activate ``version`` for ``client`` (fetching it first if this host lacks it,
        naming ``ref`` to the fetch function: by default the client). O(1) when both
        are the previous task's."""
        if version == self.active and client == self._client:
            return
        fetch_ref = client if ref is None else ref
        self.switches += 1
        self.functions.clear()
        self._client = b""  # until the switch succeeds: a failed one is tried again
        if version == self.active and version.hex() in self._importer.trusted:
            _purge(self._roots)  # same code, another client: fresh modules all the same
        elif not version:
            self._deactivate()
        else:
            manifest = self._trusted_manifest(version, fetch_ref)
            self._activate(version, os.path.join(self.cache.trees, version.hex()), manifest)
        self._client = client

    def _trusted_manifest(self, version: bytes, client: bytes) -> Manifest:
        """The manifest of a tree that passed its check in this process (built, fetched or
        rebuilt as needed)."""
        manifest = self._manifests.get(version)
        if manifest is not None and version.hex() in self._importer.trusted:
            return manifest
        # One process per host downloads a version; the others wait for it and then
        # find it on disk, so code crosses the network once per host.
        with self.cache.lock(version):
            manifest = self.cache.manifest(version)
            if manifest is None:
                if self.cache.tree(version) is not None:
                    self._discard(version, ["its manifest does not match the version id"])
                manifest = self._download(version, client)
            problems = self.cache.check(version, manifest)
            if problems:
                self._discard(version, problems)
                manifest = self._download(version, client)
                problems = self.cache.check(version, manifest)
                if problems:
                    raise CodeShippingError(
                        f"the code cache {self.cache.root} changes under this worker: code "
                        f"version {version.hex()} failed its check again after a rebuild "
                        f"({'; '.join(problems[:3])}); refusing to run it"
                    )
        files = {rel: digest for rel, digest, _ in manifest.files}
        self._importer.trusted[version.hex()] = TreeFiles.of(files)
        self._manifests[version] = manifest
        return manifest

    def _discard(self, version: bytes, problems: list[str]) -> None:
        log.warning(
            "code version %s in the cache %s failed its check (%s); rebuilding it from the "
            "client's files",
            version.hex(),
            self.cache.root,
            "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""),
        )
        self.rebuilds += 1
        self.cache.discard(version)

    def _on_mismatch(self, version: str, message: str) -> None:
        """A file changed after its tree was checked: check it again before the next task
        (called in the middle of an import, which then fails: nothing else is changed here)."""
        log.warning("%s", message)
        self._importer.trusted.pop(version, None)
        self._client = b""

    def _wait_for_build(self, version: str) -> None:
        with self.cache.lock(bytes.fromhex(version)):
            pass

    def _download(self, version: bytes, client: bytes) -> Manifest:
        self.fetches += 1
        (manifest_json,) = self._fetch(client, {"kind": "manifest", "version": version.hex()})
        if hashlib.sha256(manifest_json).digest()[:16] != version:
            raise CodeShippingError("the client's manifest does not match its version id")
        manifest = Manifest.from_json(manifest_json)
        try:
            missing = self.cache.missing(manifest)
            if missing:
                self._fetch_files(client, missing, manifest)
            self.cache.build(version, manifest_json, manifest)
        except OSError as exc:
            if exc.errno not in FILE_SYSTEM_FAILURES:
                raise
            raise self._cache_failure(exc, manifest) from exc
        return manifest

    def _cache_failure(self, exc: OSError, manifest: Manifest) -> CodeShippingError:
        size = sum(size for _, _, size in manifest.files)
        return CodeShippingError(
            f"the code cache {self.cache.root} on host {socket.gethostname()} cannot take "
            f"this client's code ({len(manifest.files)} files, {size} bytes): "
            f"{exc.strerror or exc}. Make room there, or give the worker a cache folder on "
            f"another file system with fade-worker --code-cache DIR (or FADE_CODE_CACHE)"
        )

    def _fetch_files(self, client: bytes, missing: list[str], manifest: Manifest) -> None:
        """The files this host lacks: together, each in one frame, but a file over the
        frame limit in pieces that fit (a frame over a peer's limit costs the sender its
        connection, and the task would wait for ever)."""
        piece = self._frame_limit() - FRAME_HEAD_ROOM
        sizes = {digest: size for _, digest, size in manifest.files}
        large = [d for d in missing if piece > 0 and sizes.get(d, 0) > piece]
        whole = [d for d in missing if d not in large]
        if whole:
            self.cache.store(whole, self._fetch(client, {"kind": "blobs", "hashes": whole}))
        for digest in large:
            parts = []
            for offset in range(0, sizes[digest], piece):
                request = {"kind": "blob_range", "hash": digest, "offset": offset, "size": piece}
                (part,) = self._fetch(client, request)
                parts.append(part)
            self.cache.store([digest], [b"".join(parts)])

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

    def managed_path(self) -> str | None:
        """The ``sys.path`` entry activation put first (the active tree), if any."""
        return self._tree


def _purge(roots: Sequence[str]) -> None:
    """Forget every loaded module under these top-level names."""
    tops = set(roots)
    for name in [n for n in sys.modules if n.partition(".")[0] in tops]:
        del sys.modules[name]
