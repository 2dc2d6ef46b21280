"""What checking the code cache costs a worker process (fade/codecache.py, fade/_codeimport.py).

    python benchmarks/codecache_check.py [--files N] [--kib K] [--switches N] [--json out.json]

Builds a local package of N modules of about K KiB each, ships two versions of
it into a fresh cache in this process (a fetch that asks a LocalCode directly,
no network), then measures:

* the first use of a version in a process: every file of its tree hashed against
  the manifest (what a worker pays once per version and process);
* a switch between the two versions: the modules dropped and the package imported
  again through fade's checking finder (every file read and hashed; compiled once
  per process, then reused);
* the same import from a plain folder with Python's own finder and its bytecode
  cache, as a baseline.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fade import codecache
from fade.shipping import LocalCode


def _make_package(root: Path, files: int, kib: int) -> str:
    name = "cachebench_pkg"
    (root / name).mkdir()
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(kib * 1024 // 30))
    imports = "".join(f"from . import mod{i}\n" for i in range(files))
    (root / name / "__init__.py").write_text(imports + "VERSION = 1\n")
    for i in range(files):
        (root / name / f"mod{i}.py").write_text(body)
    return name


def _purge(name: str) -> None:
    for module in [m for m in sys.modules if m.partition(".")[0] == name]:
        del sys.modules[module]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--kib", type=int, default=20)
    parser.add_argument("--switches", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        name = _make_package(root / "src", args.files, args.kib)
        sys.path.insert(0, str(root / "src"))
        pkg = importlib.import_module(name)
        local = LocalCode()
        first = local.version()
        init = root / "src" / name / "__init__.py"
        init.write_text(init.read_text().replace("VERSION = 1", "VERSION = 2"))
        importlib.reload(pkg)
        second = local.version()
        sys.path.remove(str(root / "src"))

        def fetch(_client: bytes, request: dict[str, object]) -> list[bytes]:
            if request["kind"] == "manifest":
                found = local.manifest_json(bytes.fromhex(str(request["version"])))
                assert found is not None
                return [found]
            blobs = local.blobs([str(h) for h in request["hashes"]])  # type: ignore[attr-defined]
            assert blobs is not None
            return blobs

        runner = codecache.CodeRunner(codecache.CodeCache(str(root / "cache")), fetch)
        for version in (first, second):  # fetched and built: not what is measured
            runner.ensure(version, b"client")
        manifest = runner.cache.manifest(first)
        assert manifest is not None
        size = sum(n for _, _, n in manifest.files)
        checks = []
        for _ in range(5):
            started = time.perf_counter()
            assert runner.cache.check(first, manifest) == []
            checks.append(time.perf_counter() - started)

        switches = []
        for i in range(args.switches):
            version = (first, second)[i % 2]
            started = time.perf_counter()
            runner.ensure(version, b"client")
            module = importlib.import_module(name)
            switches.append(time.perf_counter() - started)
            seen = module.VERSION
            assert seen == 1 + i % 2, "a switch did not give that version's modules"
        runner.ensure(b"", b"client")

        sys.path.insert(0, str(root / "src"))
        sys.dont_write_bytecode = False  # whatever PYTHONDONTWRITEBYTECODE says
        _purge(name)
        importlib.import_module(name)  # writes the bytecode cache
        plain = []
        for _ in range(args.switches):
            _purge(name)
            started = time.perf_counter()
            importlib.import_module(name)
            plain.append(time.perf_counter() - started)

    rows = {
        "first use of a version: check every file": statistics.median(checks) * 1e3,
        "switch + import, fade's checking finder": statistics.median(switches[2:]) * 1e3,
        "import from a plain folder (bytecode cache)": statistics.median(plain) * 1e3,
    }
    width = max(len(k) for k in rows) + 2
    print(f"a package of {args.files + 1} files, {size / 1024:.0f} KiB (ms, median)")
    for label, value in rows.items():
        print(f"  {label:<{width}}: {value:8.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"ms": rows, "bytes": size}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
