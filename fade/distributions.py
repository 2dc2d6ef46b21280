"""Installed distributions and environments as fade describes them, on both sides.

::

    client (fade/packages.py)                      worker (fade/environments.py)
    Distribution: name, version, content id  ──>   has it (name and version)? run here
      id = hash of its RECORD's files entries       lacks it or has another version:
    Environment: the client's Python + the           fetch its Manifest (checked against
      distributions a task needs; id = its hash      the id), then its files (each checked
      (16 bytes, in every task payload)              against its RECORD hash)

A distribution's *content id* is computed from its ``RECORD`` (the list of files
an installer wrote, with their hashes and sizes) restricted to what travels: the
files under its ``site-packages`` folder, without what the installer adds
(``INSTALLER``, ``REQUESTED``, ``direct_url.json``, bytecode) and without what lies
outside (scripts, whose first line names the interpreter). The same wheel installed
in two environments therefore has the same id, and the id is cheap: one small file
read, no file hashed. The files themselves are hashed only when a worker asks for
them, and checked against the RECORD there and on the worker.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.machinery
import json
import platform
import re
import sys
import sysconfig
from dataclasses import dataclass
from typing import Any

from fade.errors import PackageShippingError

__all__ = [
    "NEVER_SHIP",
    "NEVER_SHIP_MODULES",
    "Distribution",
    "Environment",
    "Manifest",
    "PythonInfo",
    "content_id",
    "hash_matches",
    "is_native",
    "normalize",
    "record_entries",
    "this_python",
    "top_level_modules",
]

#: Distributions that never travel: every worker has its own fade and fade's dependencies.
NEVER_SHIP = frozenset({"fade", "pyzmq", "cloudpickle"})
#: Their top-level modules.
NEVER_SHIP_MODULES = frozenset({"fade", "zmq", "cloudpickle"})
#: Files of a dist-info folder that an installer writes: not part of what travels.
_INSTALLER_FILES = frozenset(
    {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "RECORD.jws", "RECORD.p7s"}
)
_NATIVE = (*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd", ".dylib", ".dll")
_NATIVE_LIBRARY = re.compile(r"\.so(\.\d+)+$")  # libfoo.so.1.2, bundled in pkg.libs/
_HASHES = frozenset({"sha256", "sha384", "sha512"})
#: Longest first: ".cpython-311-x86_64-linux-gnu.so" before ".so".
_MODULE_SUFFIXES = sorted(set(importlib.machinery.all_suffixes()), key=len, reverse=True)


def top_level_modules(path: list[str] | None = None) -> dict[str, list[str]]:
    """Top-level module -> the (normalized) names of the installed distributions on
    ``path`` (default sys.path) that provide it.

    What ``importlib.metadata.packages_distributions()`` answers, at a third of its cost
    (a client pays it before its first task leaves): a distribution's ``top_level.txt``
    where it has one, else the first part of each path in its ``RECORD``, read as text
    rather than as one ``PackagePath`` object per file (a large distribution lists
    thousands). Modules inferred from a RECORD include extension modules, as Python
    3.12's inference does and 3.11's does not."""
    import importlib.metadata as md  # here: workers import this module, and seldom need it

    found: dict[str, list[str]] = {}
    for dist in md.distributions(path=sys.path if path is None else path):
        # The name from the dist-info folder's name (where the distribution has it),
        # rather than from parsing its METADATA: most of the cost otherwise.
        name = normalize(getattr(dist, "_normalized_name", None) or dist.metadata["Name"] or "")
        if not name:
            continue
        declared = dist.read_text("top_level.txt")
        if declared is not None:
            tops = set(declared.split())
        else:
            tops = _inferred_tops(dist.read_text("RECORD") or "")
        for top in tops:
            names = found.setdefault(top, [])
            if name not in names:
                names.append(name)
    return found


def _inferred_tops(record: str) -> set[str]:
    """The importable top-level names a RECORD's paths start with."""
    tops = set()
    for line in record.splitlines():
        path = line.partition(",")[0].strip('"')
        head, sep, _ = path.partition("/")
        if sep:
            if "." not in head and head != "__pycache__":
                tops.add(head)  # a package folder (a dist-info or data folder has a dot)
            continue
        module = _module_name(head)
        if module is not None:
            tops.add(module)
    return tops


def _module_name(filename: str) -> str | None:
    """``x`` for ``x.py`` or ``x.cpython-311-x86_64-linux-gnu.so``; None for other files."""
    for suffix in _MODULE_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            return stem if stem and "." not in stem else None
    return None


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares them: "Foo_Bar.baz" -> "foo-bar-baz"."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, slots=True)
class PythonInfo:
    """What a distribution's files may need of the Python that runs them."""

    implementation: str  # "cpython"
    version: str  # "3.11.7"
    platform: str  # sysconfig.get_platform(): "linux-x86_64"
    abi: str  # SOABI: "cpython-311-x86_64-linux-gnu"

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    def describe(self) -> str:
        """ "CPython 3.11 linux-x86_64 (ABI cpython-311-x86_64-linux-gnu)"."""
        names = {"cpython": "CPython", "pypy": "PyPy", "graalpy": "GraalPy"}
        name = names.get(self.implementation, self.implementation)
        return f"{name} {self.minor} {self.platform or '?'} (ABI {self.abi or '?'})"

    def runs_pickles_of(self, other: PythonInfo) -> bool:
        return (self.implementation, self.minor) == (other.implementation, other.minor)

    def loads_extensions_of(self, other: PythonInfo) -> bool:
        return self.runs_pickles_of(other) and (self.platform, self.abi) == (
            other.platform,
            other.abi,
        )


def this_python() -> PythonInfo:
    return PythonInfo(
        sys.implementation.name,
        platform.python_version(),
        sysconfig.get_platform(),
        str(sysconfig.get_config_var("SOABI") or ""),
    )


@dataclass(frozen=True, slots=True)
class Distribution:
    """One installed distribution a task needs, as the client has it."""

    name: str  # normalized
    version: str
    id: str  # content id, 32 hex digits ("" when it cannot travel)
    native: bool  # holds compiled code: needs the client's platform and ABI
    size: int  # bytes of the files that travel
    problem: str = ""  # why it cannot travel; "" when it can

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "id": self.id,
            "native": self.native,
            "size": self.size,
            "problem": self.problem,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Distribution:
        if not isinstance(data, dict):
            raise TypeError("a distribution is a JSON object")
        dist = cls(
            str(data["name"]),
            str(data["version"]),
            str(data["id"]),
            bool(data["native"]),
            int(data["size"]),
            str(data["problem"]),
        )
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", dist.name) or not (
            dist.problem or re.fullmatch(r"[0-9a-f]{32}", dist.id)
        ):
            raise ValueError(f"bad distribution name or id: {dist.name!r} {dist.id!r}")
        return dist


@dataclass(frozen=True, slots=True)
class Environment:
    """The client's Python and the installed distributions a task needs; its ``id`` (16
    bytes) is what each task carries."""

    python: PythonInfo
    distributions: tuple[Distribution, ...]
    limit: int  # the most bytes of distributions that may travel to a worker for it

    def to_json(self) -> bytes:
        data = {
            "format": 1,
            "python": {
                "implementation": self.python.implementation,
                "version": self.python.version,
                "platform": self.python.platform,
                "abi": self.python.abi,
            },
            "limit": self.limit,
            "distributions": [d.to_dict() for d in self.distributions],
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @property
    def id(self) -> bytes:
        return hashlib.sha256(self.to_json()).digest()[:16]

    @property
    def native(self) -> bool:
        return any(d.native for d in self.distributions)

    @classmethod
    def from_json(cls, data: bytes, env_id: bytes) -> Environment:
        """The environment ``data`` describes, if it hashes to ``env_id``; raises
        PackageShippingError if not, or if it does not parse."""
        if hashlib.sha256(data).digest()[:16] != env_id:
            raise PackageShippingError("an environment description does not match its id")
        try:
            raw = json.loads(data)
            python = PythonInfo(**{k: str(raw["python"][k]) for k in PythonInfo.__slots__})
            dists = tuple(Distribution.from_dict(d) for d in raw["distributions"])
            return cls(python, dists, int(raw["limit"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageShippingError(f"an environment description did not parse: {exc}") from None


@dataclass(frozen=True, slots=True)
class Manifest:
    """The files of one distribution that travel: (path, RECORD hash, size, executable)."""

    name: str
    version: str
    id: str
    files: tuple[tuple[str, str, int, bool], ...]
    problem: str = ""  # it cannot travel after all: why (read from its files)

    def to_json(self) -> bytes:
        data = {
            "name": self.name,
            "version": self.version,
            "id": self.id,
            "files": [list(f) for f in self.files],
            "problem": self.problem,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, dist: Distribution) -> Manifest:
        """The manifest of ``dist``, checked: its files hash to ``dist.id``, and every path
        stays inside the tree. Raises PackageShippingError."""
        try:
            raw = json.loads(data)
            files = tuple((str(p), str(h), int(n), bool(x)) for p, h, n, x in raw["files"])
            manifest = cls(str(raw["name"]), str(raw["version"]), str(raw["id"]), files)
            problem = str(raw.get("problem", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageShippingError(
                f"the client's file list of {dist.label} did not parse: {exc}"
            ) from None
        if problem:
            raise PackageShippingError(f"{dist.label} cannot travel to the workers: {problem}")
        if content_id([(p, h, n) for p, h, n, _ in files]) != dist.id or manifest.id != dist.id:
            raise PackageShippingError(
                f"the client's file list of {dist.label} does not match its content id"
            )
        for path, *_ in files:
            _check_relative(path)
        return manifest


def _check_relative(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise PackageShippingError(f"refusing an unsafe path in a distribution: {path!r}")


def record_entries(text: str, info_dir: str) -> tuple[list[tuple[str, str, int]], str]:
    """The files of a RECORD that travel, as (path, hash, size), and a problem ("" when
    every one of them has a usable hash and size). ``info_dir`` is the dist-info folder's
    name (its installer-written files are left out)."""
    entries: list[tuple[str, str, int]] = []
    for line in text.splitlines():
        path, _, rest = line.partition(",")
        if path.startswith('"'):  # csv quoting: a path with a comma in it
            return [], f"its RECORD has a quoted path ({line[:80]})"
        if not path or path.startswith(("/", "../")) or "/__pycache__/" in f"/{path}":
            continue
        head, _, name = path.rpartition("/")
        if head == info_dir and name in _INSTALLER_FILES:
            continue
        if path.endswith((".pyc", ".pyo")):
            continue
        digest, _, size = rest.partition(",")
        algorithm = digest.partition("=")[0]
        if algorithm not in _HASHES or not size.isdigit():
            return [], f"its RECORD lists {path} without a usable hash and size"
        entries.append((path, digest, int(size)))
    if not entries:
        return [], "its RECORD lists no files"
    return entries, ""


def content_id(entries: list[tuple[str, str, int]]) -> str:
    """The content id of a distribution's files: 32 hex digits."""
    text = "\n".join(f"{p},{h},{n}" for p, h, n in sorted(entries))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def is_native(path: str) -> bool:
    return path.endswith(_NATIVE) or bool(_NATIVE_LIBRARY.search(path))


def hash_matches(data: bytes, recorded: str) -> bool:
    """Whether ``data`` has the RECORD hash ``recorded`` ("sha256=<urlsafe base64>")."""
    algorithm, _, value = recorded.partition("=")
    if algorithm not in _HASHES:
        return False
    digest = hashlib.new(algorithm, data).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == value
