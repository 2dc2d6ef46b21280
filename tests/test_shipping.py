"""The user's own code reaches workers that have never seen it.

Every package here lives in a temporary directory that only this (client)
process has on ``sys.path``: the workers' environment does not name it, and
their working directory is elsewhere.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import tasks
from conftest import INTERVAL, Pool

import fade

pytestmark = pytest.mark.timeout(90)

MakePackage = Callable[[dict[str, str]], str]


@pytest.fixture
def make_package(tmp_path: Path) -> Iterator[MakePackage]:
    """Write a package under a fresh name into a directory only the client sees."""
    root = tmp_path / "client-only"
    root.mkdir()
    sys.path.insert(0, str(root))
    names: list[str] = []

    def make(files: dict[str, str]) -> str:
        name = f"pkg_{uuid.uuid4().hex[:8]}"
        for rel, text in files.items():
            path = root / rel.replace("PKG", name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).replace("PKG", name))
        names.append(name)
        importlib.invalidate_caches()
        return name

    yield make
    sys.path.remove(str(root))
    for mod in [m for m in sys.modules if m.partition(".")[0] in names]:
        del sys.modules[mod]


@pytest.fixture
def code_pool(pool: Pool, tmp_path: Path) -> Pool:
    """A broker and two workers with their own, empty, code cache."""
    pool.code_cache = str(tmp_path / "worker-code-cache")  # type: ignore[attr-defined]
    pool.start_broker()
    pool.start_worker(2, None, "--code-cache", pool.code_cache)  # type: ignore[attr-defined]
    pool.wait_workers(2)
    return pool


def _executor(pool: Pool, **kwargs: object) -> fade.Executor:
    return fade.Executor(pool.address, heartbeat_interval=INTERVAL, **kwargs)  # type: ignore[arg-type]


PACKAGE = {
    "PKG/__init__.py": """
        from .core import double, Point, SCALE
        from . import data
        """,
    "PKG/core.py": """
        from dataclasses import dataclass
        from .helpers import offset

        SCALE = 10

        @dataclass
        class Point:
            x: int
            y: int

            def moved(self, by):
                return Point(self.x + by, self.y + by)

        def double(x):
            from .helpers import twice  # a relative import inside a function body
            return twice(x) + offset()

        def scale(p):
            return Point(p.x * SCALE, p.y * SCALE)
        """,
    "PKG/helpers.py": """
        def twice(x):
            return 2 * x

        def offset():
            return 0
        """,
    "PKG/data.py": """
        import importlib.resources
        import os

        def by_file():
            with open(os.path.join(os.path.dirname(__file__), "files", "words.txt")) as f:
                return f.read().split()

        def by_resources():
            return (importlib.resources.files(__package__) / "files" / "words.txt").read_text().split()
        """,
    "PKG/files/words.txt": "alpha beta gamma\n",
    "PKG/.hidden": "never travels\n",
    "PKG/__pycache__/junk.txt": "never travels\n",
    "PKG/.git/config": "never travels\n",
}


def test_package_with_relative_imports_classes_and_data(
    code_pool: Pool, make_package: MakePackage
) -> None:
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    core = importlib.import_module(f"{name}.core")
    with _executor(code_pool) as ex:
        assert ex.submit(pkg.double, 21).result(timeout=30) == 42
        point = ex.submit(core.scale, pkg.Point(1, 2)).result(timeout=30)
        assert isinstance(point, pkg.Point) and point == pkg.Point(10, 20)
        moved = ex.submit(pkg.Point.moved, pkg.Point(1, 1), 2).result(timeout=30)
        assert isinstance(moved, core.Point) and moved == core.Point(3, 3)
        assert ex.submit(pkg.data.by_file).result(timeout=30) == ["alpha", "beta", "gamma"]
        assert ex.submit(pkg.data.by_resources).result(timeout=30) == ["alpha", "beta", "gamma"]
        assert ex.submit(getattr, core, "SCALE").result(timeout=30) == 10
        files = {f[0] for f in ex._code._current.files}  # type: ignore[union-attr]
    assert f"{name}/files/words.txt" in files
    assert not any(".hidden" in f or "__pycache__" in f or ".git" in f for f in files)
    assert not any(f.startswith(("numpy", "zmq", "fade/")) for f in files)


def test_second_task_sends_no_code_and_an_edit_sends_one_file(
    code_pool: Pool, make_package: MakePackage, tmp_path: Path
) -> None:
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    helpers = importlib.import_module(f"{name}.helpers")
    with _executor(code_pool) as ex:
        code = ex._code
        assert code is not None
        assert ex.submit(pkg.double, 1).result(timeout=30) == 2
        first = dict(code.stats)
        assert first["blobs_served"] >= 6  # the package's files, once
        assert list(ex.map(pkg.double, range(50))) == [2 * x for x in range(50)]
        assert code.stats == first, "later tasks of the same version sent code again"

        path = Path(helpers.__file__)
        path.write_text(path.read_text().replace("return 0", "return 1000"))
        importlib.reload(helpers)
        # Both worker processes of the host get tasks of the new version at once.
        assert list(ex.map(pkg.double, range(40))) == [2 * x + 1000 for x in range(40)]
        after = code.stats
        # One manifest and only the edited file's content, once for the host.
        assert after["manifests_served"] - first["manifests_served"] == 1
        assert after["blobs_served"] - first["blobs_served"] == 1
        assert after["bytes_served"] - first["bytes_served"] == len(path.read_bytes())


def test_workers_stay_idle_between_tasks_after_fetching_code(
    code_pool: Pool, make_package: MakePackage
) -> None:
    """A worker's first task of a new version fetches twice (the manifest, then the
    files). Once the keeper thread left a flag of the second fetch set and then spun,
    which took the GIL from the main thread for up to 5 ms per task (a 3 ms median
    round trip) for as long as tasks kept coming."""
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    with _executor(code_pool) as ex:
        futures = [ex.submit(pkg.double, i) for i in range(8)]  # both workers fetch
        assert [f.result(timeout=30) for f in futures] == [2 * i for i in range(8)]
        workers = [psutil.Process(pid) for pid in code_pool.worker_pids()]
        assert len(workers) == 2
        before = sum(sum(w.cpu_times()[:2]) for w in workers)
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # a task every 20 ms keeps the keeper awake
            assert ex.submit(pkg.double, 1).result(timeout=30) == 2
            time.sleep(0.02)
        busy = sum(sum(w.cpu_times()[:2]) for w in workers) - before
    # Each task costs the worker about a millisecond; a spinning keeper, the whole time.
    assert busy < 0.5, f"the workers used {busy:.2f} s of CPU in 2 s of mostly idle time"


def test_file_edited_but_not_reloaded_does_not_change_what_workers_run(
    code_pool: Pool, make_package: MakePackage
) -> None:
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    helpers = importlib.import_module(f"{name}.helpers")
    with _executor(code_pool) as ex:
        assert ex.submit(pkg.double, 5).result(timeout=30) == 10
        path = Path(helpers.__file__)
        path.write_text(path.read_text().replace("return 0", "return 7"))
        # A new module imported afterwards changes the version, but helpers.py still
        # travels as the client imported it.
        importlib.import_module(f"{name}.data")
        importlib.import_module("json.tool")
        assert pkg.double(5) == 10
        assert ex.submit(pkg.double, 5).result(timeout=30) == 10


def test_two_clients_with_different_versions_side_by_side(code_pool: Pool, tmp_path: Path) -> None:
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(
        f"""
        import sys, fade
        sys.path.insert(0, sys.argv[1])
        import {name}
        with fade.Executor({code_pool.address!r}, heartbeat_interval={INTERVAL}) as ex:
            seen = set(ex.map({name}.version, range(300)))
        print(sorted(seen))
        """
    )
    procs = []
    for version in ("one", "two"):
        base = tmp_path / version
        (base / name).mkdir(parents=True)
        (base / name / "__init__.py").write_text(
            f"import time\ndef version(_):\n    time.sleep(0.002)\n    return {version!r}\n"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, str(base)], stdout=subprocess.PIPE, text=True
            )
        )
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert outputs == ["['one']", "['two']"]


def test_main_module_functions_lambdas_and_classes_using_local_modules(
    code_pool: Pool, make_package: MakePackage, tmp_path: Path
) -> None:
    name = make_package(PACKAGE)
    client_only = sys.path[0]
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {client_only!r})
        import fade, {name}
        from {name}.core import SCALE

        class Local:
            def __init__(self, v):
                self.v = v

        def uses_package(x):
            return {name}.double(x) * SCALE

        with fade.Executor({code_pool.address!r}, heartbeat_interval={INTERVAL}) as ex:
            assert ex.submit(uses_package, 2).result(timeout=30) == 40
            assert ex.submit(lambda p: p.moved(1), {name}.Point(0, 0)).result(30) == {name}.Point(1, 1)
            local = ex.submit(lambda v: Local(v + 1), 1).result(timeout=30)
            assert isinstance(local, Local) and local.v == 2
        print("ok")
        """
    )
    for how in ("file", "stdin"):
        if how == "file":
            path = tmp_path / "main_script.py"
            path.write_text(script)
            out = subprocess.run(
                [sys.executable, str(path)], capture_output=True, text=True, timeout=60
            )
        else:  # an interactive-like session: __main__ has no file
            out = subprocess.run(
                [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=60
            )
        assert out.stdout.strip() == "ok", out.stderr


def test_installed_packages_travel_by_reference(code_pool: Pool) -> None:
    import numpy as np

    with _executor(code_pool) as ex:
        assert ex.submit(np.sum, np.arange(10)).result(timeout=30) == 45
        manifest = ex._code._current  # type: ignore[union-attr]
        roots = set(manifest.roots) if manifest else set()
    assert not roots & {"numpy", "zmq", "cloudpickle", "pytest", "fade"}


def test_missing_installed_package_names_the_distribution_and_host(
    code_pool: Pool, tmp_path: Path
) -> None:
    # An installed distribution (with its dist-info) that only the client has.
    site = tmp_path / "client-site"
    (site / "fadefakedep").mkdir(parents=True)
    (site / "fadefakedep" / "__init__.py").write_text("def answer():\n    return 42\n")
    info = site / "fade_fake_dep-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fade-fake-dep\nVersion: 1.2.3\n")
    (info / "top_level.txt").write_text("fadefakedep\n")
    (info / "RECORD").write_text("fadefakedep/__init__.py,,\n")
    sys.path.insert(0, str(site))
    try:
        import fadefakedep  # type: ignore[import-not-found]

        with _executor(code_pool) as ex:
            with pytest.raises(fade.MissingDependencyError) as err:
                ex.submit(fadefakedep.answer).result(timeout=30)
            assert "fadefakedep" not in (ex._code._current.roots if ex._code._current else ())  # type: ignore[union-attr]
        message = str(err.value)
        assert "fade-fake-dep 1.2.3" in message and "on host" in message
        assert isinstance(err.value, ModuleNotFoundError)
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("fadefakedep", None)


def _build_extension(directory: Path, name: str) -> None:
    source = directory / f"{name}.c"
    source.write_text(
        textwrap.dedent(
            f"""
            #include <Python.h>
            static PyObject *answer(PyObject *self, PyObject *args) {{ return PyLong_FromLong(42); }}
            static PyMethodDef methods[] = {{{{"answer", answer, METH_NOARGS, ""}}, {{NULL, NULL, 0, NULL}}}};
            static struct PyModuleDef module = {{PyModuleDef_HEAD_INIT, "{name}", NULL, -1, methods}};
            PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModule_Create(&module); }}
            """
        )
    )
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    include = sysconfig.get_paths()["include"]
    try:
        subprocess.run(
            [
                "cc",
                "-shared",
                "-fPIC",
                f"-I{include}",
                str(source),
                "-o",
                str(directory / f"{name}{suffix}"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler or Python headers to build a test extension: {exc}")


def test_local_compiled_extension_is_refused(code_pool: Pool, make_package: MakePackage) -> None:
    name = make_package({"PKG/__init__.py": "from .fast import answer\n", "PKG/py.py": "X = 1\n"})
    _build_extension(Path(sys.path[0]) / name, "fast")
    importlib.invalidate_caches()
    pkg = importlib.import_module(name)
    assert pkg.answer() == 42
    with _executor(code_pool) as ex:
        with pytest.raises(fade.CodeShippingError, match="compiled extension"):
            ex.submit(pkg.answer).result(timeout=0)
        # Code that does not need the extension still runs.
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3


def test_size_cap_is_a_clear_error(code_pool: Pool, make_package: MakePackage) -> None:
    name = make_package(
        {"PKG/__init__.py": "def f():\n    return 1\n", "PKG/big.bin": "x" * 200_000}
    )
    pkg = importlib.import_module(name)
    with (
        _executor(code_pool, ship_code_limit=100_000) as ex,
        pytest.raises(fade.CodeShippingError, match=r"ship_code_limit"),
    ):
        ex.submit(pkg.f).result(timeout=0)


def test_ship_code_off_sends_nothing(code_pool: Pool, make_package: MakePackage) -> None:
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    with _executor(code_pool, ship_code="off") as ex, pytest.raises(ModuleNotFoundError):
        ex.submit(pkg.double, 1).result(timeout=30)


def test_pinned_code_ignores_later_reloads(code_pool: Pool, make_package: MakePackage) -> None:
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    helpers = importlib.import_module(f"{name}.helpers")
    with _executor(code_pool, ship_code="pin") as ex:
        assert ex.submit(pkg.double, 1).result(timeout=30) == 2
        path = Path(helpers.__file__)
        path.write_text(path.read_text().replace("return 0", "return 5"))
        importlib.reload(helpers)
        assert ex.submit(pkg.double, 1).result(timeout=30) == 2


def test_worker_restart_reuses_its_disk_cache(code_pool: Pool, make_package: MakePackage) -> None:
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    with _executor(code_pool) as ex:
        assert ex.submit(pkg.double, 3).result(timeout=30) == 6
        served = dict(ex._code.stats)  # type: ignore[union-attr]
        supervisor = code_pool.workers.pop()
        supervisor.terminate()
        supervisor.wait(timeout=30)
        code_pool.start_worker(2, None, "--code-cache", code_pool.code_cache)  # type: ignore[attr-defined]
        code_pool.wait_workers(2)
        assert list(ex.map(pkg.double, range(20))) == [2 * x for x in range(20)]
        assert ex._code.stats == served, "restarted workers fetched code they had on disk"  # type: ignore[union-attr]


def test_module_state_lives_per_worker_process(code_pool: Pool, make_package: MakePackage) -> None:
    name = make_package(
        {
            "PKG/__init__.py": "calls = []\ndef count():\n    calls.append(1)\n    return len(calls)\n"
        }
    )
    pkg = importlib.import_module(name)
    with _executor(code_pool) as ex:
        counts = [ex.submit(pkg.count).result(timeout=30) for _ in range(10)]
    # Each worker process keeps its own module state; it is never sent back.
    assert max(counts) > 1 and sum(counts) > 10
    assert pkg.calls == []


def test_embedded_pool_ships_code_too(make_package: MakePackage) -> None:
    name = make_package(PACKAGE)
    pkg = importlib.import_module(name)
    with fade.Executor(max_workers=2, heartbeat_interval=INTERVAL) as ex:
        assert list(ex.map(pkg.double, range(10))) == [2 * x for x in range(10)]
