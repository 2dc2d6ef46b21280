"""Client side of package shipping: the installed distributions each task needs, described.

::

    submit(fn, *args)
      serialization.dumps_tracked_call ── the modules the pickles name (a function by
        │                          reference: its module; plain data: numpy or nothing;
        │                          anything else: noted while cloudpickle pickles it)
      InstalledPackages.environment(modules) ── per submit: one dict look-up while the
        │   client imports nothing new; else, once per set of modules:
        │     module -> installed distribution (importlib.metadata), or a local module:
        │       its globals and the imports in its code, in turn
        │     + the distributions those require (Requires-Dist), never fade/pyzmq/cloudpickle
        │     -> Environment(this Python, [name, version, content id...]) -> id (16 bytes)
        ▼
    the task payload carries the environment's id; SUBMIT flags it NATIVE when a
    distribution holds compiled code. A worker that lacks the description asks back:
    FETCH environment ──> its JSON;  FETCH distribution ──> its file list (checked here:
    files as the RECORD says, no absolute path of this environment in them);
    FETCH files ──> their contents, a batch at a time

``ship_packages`` is ``"auto"`` (the above), a list of distribution names (exactly those,
for every task: nothing is looked for), or ``"off"`` (no InstalledPackages at all).
An editable install's code is local code (fade/shipping.py), not a package.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import sys
import threading
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fade import defaults
from fade import protocol as p
from fade.distributions import (
    NEVER_SHIP,
    NEVER_SHIP_MODULES,
    Distribution,
    Environment,
    Manifest,
    content_id,
    hash_matches,
    is_native,
    normalize,
    record_entries,
    this_python,
    top_level_modules,
)
from fade.shipping import _recorder

__all__ = ["DEFAULT_MAX_BYTES", "InstalledPackages"]

#: The most bytes of installed distributions that may travel to a worker for one task.
DEFAULT_MAX_BYTES = defaults.SHIP_PACKAGES_LIMIT

_IGNORED = frozenset({"__main__", "__mp_main__", "builtins", *sys.builtin_module_names})
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")

#: What environment() returns: the environment's id (b"" for none) and the SUBMIT flags.
Tracked = tuple[bytes, int]
_NONE: Tracked = (b"", 0)


class InstalledPackages:
    """Describes the installed distributions tasks need and serves them to the workers.

    :meth:`environment` is called on every submit and costs a dict look-up while the
    process imports nothing new; thread-safe.
    """

    def __init__(self, ship: str | Sequence[str] = "auto", max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.python = this_python()
        self._lock = threading.RLock()
        self._seen_modules = self._seen_local = -1  # len(sys.modules), local imports
        self._tracked: dict[tuple[frozenset[str], frozenset[str]], Tracked] = {}
        self._module_dists: dict[str, tuple[str, ...]] = {}  # installed modules: permanent
        self._local_dists: dict[str, tuple[str, ...]] = {}  # local modules: per generation
        self._dists: dict[str, Distribution | None] = {}
        self._requires: dict[str, tuple[str, ...]] = {}
        self._locations: dict[str, md.Distribution] = {}
        self._requirement_lines: dict[str, list[str]] = {}
        self._top_map: Mapping[str, list[str]] | None = None
        self._environments: dict[bytes, Environment] = {}
        self._manifests: dict[str, tuple[Manifest, dict[str, str]]] = {}  # id -> (files)
        self.stats = {
            "environments_served": 0,
            "manifests_served": 0,
            "files_served": 0,
            "bytes_served": 0,
        }
        self._fixed: Tracked | None = None
        if not isinstance(ship, str):
            self._fixed = self._track(self._named(ship))

    @property
    def noting(self) -> bool:
        """Whether submits must note the modules their pickles name."""
        return self._fixed is None

    # -- per submit ------------------------------------------------------------------------

    def environment(
        self, function_modules: frozenset[str], argument_modules: frozenset[str]
    ) -> Tracked:
        """The id of the environment a call needs (b"" for none) and its SUBMIT flags,
        given the modules its function and arguments refer to (serialization.Tracker).
        O(1) unless the process imported or reloaded modules since the last call."""
        fixed = self._fixed
        if fixed is not None:
            return fixed
        key = (function_modules, argument_modules)
        if len(sys.modules) == self._seen_modules and _recorder.generation == self._seen_local:
            found = self._tracked.get(key)
            if found is not None:
                return found
        with self._lock:
            seen = (len(sys.modules), _recorder.generation)
            if seen != (self._seen_modules, self._seen_local):
                # New modules may import new things: look at local modules again.
                self._tracked.clear()
                self._local_dists.clear()
                self._seen_modules, self._seen_local = seen
            found = self._tracked.get(key)
            if found is None:
                names: set[str] = set()
                for module in function_modules | argument_modules:
                    names.update(self._dists_of_module(module, set()))
                found = self._track(self._with_requirements(names))
                self._tracked[key] = found
            return found

    def _track(self, names: Iterable[str]) -> Tracked:
        dists = [d for d in (self._dist(n) for n in sorted(set(names))) if d is not None]
        if not dists:
            return _NONE
        env = Environment(self.python, tuple(dists), self.max_bytes)
        env_id = env.id
        self._environments.setdefault(env_id, env)
        return env_id, p.SUBMIT_NATIVE if env.native else 0

    def _named(self, names: Sequence[str]) -> list[str]:
        out = []
        for name in names:
            key = normalize(str(name))
            if key in NEVER_SHIP:
                raise ValueError(
                    f"ship_packages names {name!r}: fade, pyzmq and cloudpickle never travel"
                )
            if self._dist(key) is None:
                raise ValueError(
                    f"ship_packages names {name!r}, which is not an installed distribution "
                    "here (an editable install travels as local code)"
                )
            out.append(key)
        return out

    # -- which distributions a module needs ----------------------------------------------------

    def _dists_of_module(self, module: str, visiting: set[str]) -> tuple[str, ...]:
        top = module.partition(".")[0]
        found = self._module_dists.get(top)
        if found is not None:
            return found
        if top in _IGNORED or top in _STDLIB or top in NEVER_SHIP_MODULES:
            found = ()
        else:
            names = self.top_map().get(top, ())
            found = tuple(n for n in map(normalize, names) if self._dist(n) is not None)
            if not found and top in sys.modules:
                # Not installed (or an editable install): local code; what does it use?
                return self._local_deps(top, visiting)
        self._module_dists[top] = found
        return found

    def _local_deps(self, top: str, visiting: set[str]) -> tuple[str, ...]:
        """The installed distributions a local (not installed) package uses: the modules,
        functions, classes and objects its modules hold, and the modules its code imports."""
        found = self._local_dists.get(top)
        if found is not None:
            return found
        if top in visiting:
            return ()
        visiting.add(top)
        names: set[str] = set()
        installed = self.top_map()
        for name, module in list(sys.modules.items()):
            if module is None or (name != top and not name.startswith(top + ".")):
                continue
            for used in _names_used(module, installed):
                if used.partition(".")[0] != top:
                    names.update(self._dists_of_module(used, visiting))
        found = tuple(sorted(names))
        self._local_dists[top] = found
        return found

    def top_map(self) -> Mapping[str, list[str]]:
        """Top-level module -> the installed distributions that provide it."""
        found = self._top_map
        if found is None:
            found = self._top_map = _top_map()
        return found

    def _with_requirements(self, names: set[str]) -> set[str]:
        todo, seen = list(names), set(names)
        while todo:
            for dep in self._requirements(todo.pop()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    def _requirements(self, name: str) -> tuple[str, ...]:
        found = self._requires.get(name)
        if found is None:
            lines = self._requirement_lines.get(name)
            found = ()
            if lines is not None:
                deps = []
                for line in lines:
                    _, _, marker = line.partition(";")
                    match = _REQUIREMENT.match(line)
                    if match is None or "extra" in marker:
                        continue  # an optional extra's requirement
                    dep = normalize(match[1])
                    if self._dist(dep) is not None:
                        deps.append(dep)
                found = tuple(deps)
            self._requires[name] = found
        return found

    def _dist(self, name: str) -> Distribution | None:
        """The installed distribution ``name`` as it travels; None if it is not installed,
        is editable (local code), or is one of those that never travel."""
        if name in self._dists:
            return self._dists[name]
        found = None
        if name not in NEVER_SHIP:
            try:
                dist = md.distribution(name)
            except md.PackageNotFoundError:
                dist = None
            if dist is not None and not _editable(dist):
                # Parsed once: importlib.metadata parses METADATA again on every access
                # (name, version, requirements: three times, half a first submit's cost).
                meta = dist.metadata
                found = _describe(dist, meta)
                self._locations[name] = dist
                # From METADATA; an egg-info lists them in requires.txt (dist.requires)
                self._requirement_lines[name] = meta.get_all("Requires-Dist") or dist.requires or []
        self._dists[name] = found
        return found

    # -- serving workers (the client's I/O thread) -------------------------------------------

    def serve(self, request: dict[str, Any]) -> tuple[p.CodeStatus, list[bytes]]:
        """Answer a worker's FETCH for an environment, a distribution's files list, or files
        (on the client's I/O thread: whatever goes wrong becomes the answer, never raises)."""
        try:
            return self._serve(request)
        except Exception as exc:  # metadata or files that changed under us, say
            return p.CodeStatus.MISSING, [
                f"the client could not serve {request!r:.100}: {exc!r}".encode()
            ]

    def _serve(self, request: dict[str, Any]) -> tuple[p.CodeStatus, list[bytes]]:
        kind = request.get("kind")
        with self._lock:
            if kind == "environment":
                try:
                    env = self._environments.get(bytes.fromhex(str(request.get("id"))))
                except ValueError:
                    env = None
                if env is None:
                    return p.CodeStatus.MISSING, [b"unknown environment"]
                self.stats["environments_served"] += 1
                return p.CodeStatus.OK, [env.to_json()]
            found = self._manifest(str(request.get("name")), str(request.get("id")))
            if found is None:
                return p.CodeStatus.MISSING, [b"unknown distribution"]
            manifest, paths = found
            if kind == "distribution":
                self.stats["manifests_served"] += 1
                return p.CodeStatus.OK, [manifest.to_json()]
            wanted = request.get("paths")
            if kind == "files" and isinstance(wanted, list):
                return self._files(manifest, paths, [str(w) for w in wanted])
        return p.CodeStatus.MISSING, [b"malformed request"]

    def _manifest(self, name: str, dist_id: str) -> tuple[Manifest, dict[str, str]] | None:
        cached = self._manifests.get(dist_id)
        if cached is not None:
            return cached
        dist = self._dists.get(name)
        location = self._locations.get(name)
        if dist is None or location is None or dist.id != dist_id or dist.problem:
            return None
        found = _manifest_of(dist, location)
        self._manifests[dist_id] = found
        return found

    def _files(
        self, manifest: Manifest, paths: dict[str, str], wanted: list[str]
    ) -> tuple[p.CodeStatus, list[bytes]]:
        recorded = {path: digest for path, digest, _, _ in manifest.files}
        out = []
        for rel in wanted:
            if rel not in recorded:
                return p.CodeStatus.MISSING, [f"{rel} is not a file of {manifest.name}".encode()]
            try:
                with open(paths[rel], "rb") as f:
                    data = f.read()
            except OSError as exc:
                return p.CodeStatus.MISSING, [f"cannot read {rel}: {exc}".encode()]
            if not hash_matches(data, recorded[rel]):
                why = (
                    f"{manifest.name} {manifest.version}: its file {rel} on the client was "
                    "changed after it was installed (it does not match its RECORD); "
                    "reinstall it on the client"
                )
                return p.CodeStatus.MISSING, [why.encode()]
            out.append(data)
        self.stats["files_served"] += len(out)
        self.stats["bytes_served"] += sum(len(d) for d in out)
        return p.CodeStatus.OK, out


_top_maps: dict[tuple[str, ...], Mapping[str, list[str]]] = {}


def _top_map() -> Mapping[str, list[str]]:
    """Top-level module -> distributions (distributions.top_level_modules, which reads
    every distribution's top_level.txt or RECORD: milliseconds to tens of them): once per
    process and sys.path, not per Executor."""
    key = tuple(sys.path)
    found = _top_maps.get(key)
    if found is None:
        if len(_top_maps) > 8:
            _top_maps.clear()
        found = _top_maps[key] = top_level_modules(list(key))
    return found


def _names_used(module: types.ModuleType, installed: Mapping[str, list[str]]) -> set[str]:
    """The modules a module's namespace points at, and the installed top-level modules its
    functions' and classes' code names (``import x`` inside a function body)."""
    names: set[str] = set()
    own = module.__name__
    for value in list(vars(module).values()):
        kind = type(value)
        if kind is types.ModuleType:
            names.add(value.__name__)
            continue
        if kind is types.FunctionType or isinstance(value, type):
            where = getattr(value, "__module__", None)
            if isinstance(where, str):
                names.add(where)
            if where == own:
                for code in _code_of(value):
                    names.update(n for n in _all_names(code) if n in installed)
        else:
            names.add(kind.__module__)
    return names


def _code_of(value: Any) -> list[types.CodeType]:
    if isinstance(value, types.FunctionType):
        return [value.__code__]
    return [
        member.__code__ for member in vars(value).values() if isinstance(member, types.FunctionType)
    ]


def _all_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _all_names(const)
    return names


def _editable(dist: md.Distribution) -> bool:
    try:
        text = dist.read_text("direct_url.json")
        return bool(text and json.loads(text).get("dir_info", {}).get("editable"))
    except (ValueError, AttributeError):
        return False


def _info_dir(dist: md.Distribution) -> str:
    path = getattr(dist, "_path", None)  # a PathDistribution's dist-info folder
    return os.path.basename(str(path)) if path is not None else ""


def _describe(dist: md.Distribution, meta: md.PackageMetadata) -> Distribution:
    name, version = normalize(meta["Name"] or "?"), meta["Version"]
    record = dist.read_text("RECORD")
    if record is None:
        why = "it has no RECORD of its files (it was not installed from a wheel by pip)"
        return Distribution(name, version, "", False, 0, why)
    entries, problem = record_entries(record, _info_dir(dist))
    if problem:
        return Distribution(name, version, "", False, 0, problem)
    native = any(is_native(path) for path, _, _ in entries)
    size = sum(n for _, _, n in entries)
    return Distribution(name, version, content_id(entries), native, size)


def _manifest_of(dist: Distribution, location: md.Distribution) -> tuple[Manifest, dict[str, str]]:
    """The files of ``dist`` that travel, read once: each must match its RECORD, and none
    may hold this environment's absolute path (it would not exist on a worker)."""
    entries, _ = record_entries(location.read_text("RECORD") or "", _info_dir(location))
    root = str(location.locate_file(""))
    prefixes = [os.fsencode(os.path.realpath(root))]
    if sys.prefix != sys.base_prefix:  # a virtual environment: its own folder is telling
        prefixes.append(os.fsencode(os.path.realpath(sys.prefix)) + b"/")
    files, paths, problem = [], {}, ""
    for rel, digest, size in sorted(entries):
        path = os.path.join(root, *rel.split("/"))
        try:
            with open(path, "rb") as f:
                data = f.read()
            executable = bool(os.stat(path).st_mode & 0o111)
        except OSError as exc:
            problem = f"its file {rel} cannot be read on the client ({exc})"
            break
        if not hash_matches(data, digest):
            problem = (
                f"its file {rel} was changed after it was installed (it does not match its "
                "RECORD); reinstall it on the client"
            )
            break
        found = next((prefix for prefix in prefixes if prefix in data), None)
        if found is not None:
            problem = (
                f"it cannot be relocated: its file {rel} records the absolute path "
                f"{os.fsdecode(found).rstrip('/')} of the client's environment, which a worker "
                f"does not have; install {dist.label} on the workers"
            )
            break
        files.append((rel, digest, size, executable))
        paths[rel] = path
    if problem:
        return Manifest(dist.name, dist.version, dist.id, (), problem), {}
    return Manifest(dist.name, dist.version, dist.id, tuple(files)), paths
