"""The user's own code reaches workers that have never seen it.

Every package here lives in a temporary directory that only this (client)
process has on ``sys.path``: the workers' environment does not name it, and
their working directory is elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import py_compile
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import tasks
from conftest import INTERVAL, Pool, kill_tree, wait_for

import fade
from fade.status import query

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


def test_a_full_code_cache_fails_the_task_naming_the_folder_and_the_fix(
    pool: Pool, make_package: MakePackage, small_file_system: Path
) -> None:
    # It failed with a bare "OSError: [Errno 28] No space left on device" from deep in
    # the cache, and left the half-written file taking the space.
    name = make_package(
        {"PKG/__init__.py": "def f():\n    return 1\n", "PKG/big.bin": "x" * 400_000}
    )
    pkg = importlib.import_module(name)
    pool.start_broker()
    full_cache = small_file_system
    pool.start_worker(1, None, "--code-cache", str(full_cache))
    pool.wait_workers(1)
    with _executor(pool) as ex:
        with pytest.raises(fade.CodeShippingError) as info:
            ex.submit(pkg.f).result(timeout=60)
        message = str(info.value)
        assert "No space left on device" in message and str(full_cache) in message, message
        assert "--code-cache" in message, message
        # Its next tasks fail as promptly: no other worker can take them.
        started = time.monotonic()
        for future in [ex.submit(pkg.f) for _ in range(5)]:
            with pytest.raises(fade.CodeShippingError, match="No space left on device"):
                future.result(timeout=30)
        assert time.monotonic() - started < 20
    leftovers = [p.name for p in full_cache.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    with _executor(pool, ship_code="off") as ex:  # the worker itself is fine
        assert ex.submit(abs, -2).result(timeout=30) == 2


@pytest.mark.timeout(120)
def test_a_worker_whose_code_cache_is_full_leaves_the_clients_tasks_to_another(
    pool: Pool,
    make_package: MakePackage,
    small_file_system: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # The worker with the full disk failed each task of the client at once and took the
    # next: a black hole that failed about half of a map while a worker with room stood
    # by. Its host cannot keep the code, so the task is another worker's to run.
    name = make_package(
        {
            "PKG/__init__.py": "import os\ndef pid(x):\n    return x, os.getpid()\n",
            "PKG/big.bin": "x" * 400_000,
        }
    )
    pkg = importlib.import_module(name)
    pool.start_broker()
    pool.start_worker(1, None, "--code-cache", str(small_file_system))
    full = pool.wait_workers(1)
    pool.start_worker(1, None, "--code-cache", str(tmp_path / "roomy"))
    both = pool.wait_workers(2)
    (roomy,) = set(both) - set(full)
    wait_for(lambda: len(query(pool.address)["workers"]) == 2, 30, "both at the broker")
    with _executor(pool) as ex:
        results = list(ex.map(pkg.pid, range(40)))
        assert [x for x, _ in results] == list(range(40))
        assert {pid for _, pid in results} == {roomy}
        assert ex.submit(pkg.pid, 1).result(timeout=30) == (1, roomy)
    logged = capfd.readouterr().err
    assert f"the code cache {small_file_system}" in logged, logged
    assert "another worker" in logged, logged


def test_a_file_over_the_brokers_frame_limit_travels_in_pieces(
    pool: Pool, make_package: MakePackage, tmp_path: Path
) -> None:
    # A local package with a 3 MB data file, a broker with --max-message-size 1M: the
    # client's answer with the whole file cost it its connection to the broker, and the
    # task waited for ever.
    data = os.urandom(3_000_000).hex()  # 6 MB of text, different in every piece
    name = make_package(
        {
            "PKG/__init__.py": """
                import hashlib, os
                def digest():
                    with open(os.path.join(os.path.dirname(__file__), "big.txt"), "rb") as f:
                        return hashlib.sha256(f.read()).hexdigest()
                """,
            "PKG/big.txt": data,
        }
    )
    pkg = importlib.import_module(name)
    pool.start_broker("--max-message-size", "1M")
    pool.start_worker(1, None, "--code-cache", str(tmp_path / "worker-code-cache"))
    pool.wait_workers(1)
    with _executor(pool) as ex:
        expected = hashlib.sha256(data.encode()).hexdigest()
        assert ex.submit(pkg.digest).result(timeout=60) == expected
        assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


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


# -- switching between versions (issue 13.1) ---------------------------------------------------

MYLIB = {
    "mylib/__init__.py": "",
    "mylib/model.py": """
        import json
        import os
        from dataclasses import dataclass

        CALLS = 0  # module-level state: starts afresh whenever the worker switches code

        @dataclass
        class Params:
            x: int

        @dataclass
        class Result:
            value: int
            calls: int
            pid: int
            is_params: bool

        def simulate(p):
            global CALLS
            CALLS += 1
            with open(os.path.join(os.path.dirname(__file__), "data", "coeffs.json")) as f:
                a = json.load(f)["a"]
            return Result(a * p.x, CALLS, os.getpid(), isinstance(p, Params))
        """,
    "mylib/data/coeffs.json": '{"a": 1}\n',
}

SIMULATE = """
import json, pickle, sys
import fade
import mylib.model
from mylib.model import Params, simulate

with fade.Executor(sys.argv[1], heartbeat_interval=float(sys.argv[2])) as ex:
    results = list(ex.map(simulate, [Params(x) for x in range(6)]))
try:
    pickle.dumps(results)
    pickles = "ok"
except Exception as exc:
    pickles = f"{type(exc).__name__}: {exc}"
print(json.dumps({
    "values": [r.value for r in results],
    "calls": [[r.pid, r.calls] for r in results],
    "is_params": all(r.is_params for r in results),
    "same_class": all(type(r) is mylib.model.Result for r in results),
    "pickles": pickles,
}))
"""


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _run_simulate(project: Path, address: str) -> dict[str, object]:
    """One run of the user's script, as a client process of its own."""
    out = subprocess.run(
        [sys.executable, "simulate.py", address, str(INTERVAL)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(240)
@pytest.mark.parametrize("order", ["ABA", "ABAB", "AABBA"])
def test_switching_versions_runs_exactly_each_versions_modules(
    pool: Pool, tmp_path: Path, order: str
) -> None:
    """The issue's scenario: a long-running fade-worker; a script run again and again as
    a new client process while a data file of its package is edited and reverted."""
    project = tmp_path / "project"
    _write_tree(project, MYLIB)
    (project / "simulate.py").write_text(SIMULATE)
    pool.start_broker()
    pool.start_worker(2, None, "--code-cache", str(tmp_path / "cache"))
    pool.wait_workers(2)
    coefficient = {"A": 1, "B": 2}
    for run, version in enumerate(order):
        (project / "mylib/data/coeffs.json").write_text(f'{{"a": {coefficient[version]}}}\n')
        seen = _run_simulate(project, pool.address)
        where = f"run {run + 1} ({version}) of {order}: {seen}"
        assert seen["values"] == [coefficient[version] * x for x in range(6)], where
        assert seen["is_params"] is True, where
        assert seen["same_class"] is True, where
        assert seen["pickles"] == "ok", where
        # Fresh module state: in each worker process this run's calls count 1, 2, 3...
        per_process: dict[int, list[int]] = {}
        for pid, calls in seen["calls"]:  # type: ignore[attr-defined]
            per_process.setdefault(pid, []).append(calls)
        for calls in per_process.values():
            assert sorted(calls) == list(range(1, len(calls) + 1)), where


# -- the code cache is trusted only for what it proves (issue 14.5) ----------------------------

OUTCOMES = """
import json, sys
import fade
from mylib.model import Params, simulate

outcomes = []
with fade.Executor(sys.argv[1], heartbeat_interval=float(sys.argv[2])) as ex:
    for future in [ex.submit(simulate, Params(x)) for x in range(6)]:
        try:
            outcomes.append(["ok", future.result(timeout=30).value])
        except Exception as exc:
            outcomes.append([type(exc).__name__, str(exc)])
print(json.dumps(outcomes))
"""

EVIL = """
import os
open({marker!r}, "w").write("the tampered code ran in pid %d" % os.getpid())

class Params:
    pass

def simulate(p):
    return -1
"""


@dataclass
class CachePool:
    """The user's project, a broker and one fade-worker (2 processes) with its own cache."""

    pool: Pool
    project: Path
    cache: Path
    marker: Path

    def restart_workers(self) -> None:
        for worker in self.pool.workers:
            kill_tree(worker.pid)
            worker.wait()
        self.pool.workers.clear()
        self.pool.start_worker(2, None, "--code-cache", str(self.cache))
        self.pool.wait_workers(2)

    def run(self) -> list[list[object]]:
        out = subprocess.run(
            [sys.executable, "outcomes.py", self.pool.address, str(INTERVAL)],
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        outcomes: list[list[object]] = json.loads(out.stdout.strip().splitlines()[-1])
        assert not self.marker.exists(), self.marker.read_text()
        return outcomes

    def object_path(self, rel: str) -> Path:
        digest = hashlib.sha256((self.project / rel).read_bytes()).hexdigest()
        return self.cache / "objects" / digest[:2] / digest

    def tree_paths(self, rel: str) -> list[Path]:
        return sorted((self.cache / "trees").glob(f"*/{rel}"))

    def evil(self) -> str:
        return textwrap.dedent(EVIL.format(marker=str(self.marker)))


@pytest.fixture
def cache_pool(pool: Pool, tmp_path: Path) -> CachePool:
    project = tmp_path / "project"
    _write_tree(project, MYLIB)
    (project / "outcomes.py").write_text(OUTCOMES)
    pool.start_broker()
    cp = CachePool(pool, project, tmp_path / "cache", tmp_path / "PWNED")
    pool.start_worker(2, None, "--code-cache", str(cp.cache))
    pool.wait_workers(2)
    return cp


GOOD = [["ok", x] for x in range(6)]


def test_code_cache_is_private(cache_pool: CachePool) -> None:
    assert cache_pool.run() == GOOD
    modes = {
        str(path.relative_to(cache_pool.cache)): stat.S_IMODE(path.lstat().st_mode)
        for path in [cache_pool.cache, *cache_pool.cache.rglob("*")]
    }
    assert len(modes) > 8
    assert {path: mode for path, mode in modes.items() if mode & 0o077} == {}


def _worker_refuses(pool: Pool, cache: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fade.worker", pool.address, "--code-cache", str(cache)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    return out.stderr


def test_code_cache_of_another_user_or_writable_by_others_is_refused(
    pool: Pool, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a folder that belongs to another user needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)  # nobody
    message = _worker_refuses(pool, theirs)
    assert str(theirs) in message and "uid 65534" in message and "--code-cache" in message

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    message = _worker_refuses(pool, shared)
    assert str(shared) in message and f"chmod 700 {shared}" in message
    assert not (shared / "objects").exists()


def test_a_worker_of_another_user_refuses_a_cache_made_by_this_one(
    pool: Pool, tmp_path: Path
) -> None:
    """The other direction: a worker started as nobody (setpriv) meets a cache folder that
    this user made (and opened to it with a+rx, as a careless admin might)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a worker as another user")
    cache = tmp_path / "root-made"
    cache.mkdir()
    cache.chmod(0o755)
    tmp_path.chmod(0o755)
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            # Only to read this (root's) Python and fade: it writes nothing with it.
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            sys.executable,
            "-m",
            "fade.worker",
            pool.address,
            "--code-cache",
            str(cache),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert out.returncode == 2, out.stderr
    assert str(cache) in out.stderr and "uid 0" in out.stderr


def test_tampered_object_is_fetched_again_not_run(cache_pool: CachePool) -> None:
    assert cache_pool.run() == GOOD
    obj = cache_pool.object_path("mylib/model.py")
    replacement = obj.with_suffix(".new")
    replacement.write_text(cache_pool.evil())
    os.replace(replacement, obj)  # a new inode: the built tree keeps the real file
    # A new version that shares model.py: its tree is built from the objects.
    (cache_pool.project / "mylib/data/coeffs.json").write_text('{"a": 3}\n')
    assert cache_pool.run() == [["ok", 3 * x] for x in range(6)]
    assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name


def test_tampered_tree_file_is_rebuilt_not_run(cache_pool: CachePool) -> None:
    assert cache_pool.run() == GOOD
    (tree_file,) = cache_pool.tree_paths("mylib/model.py")
    tree_file.write_text(cache_pool.evil())  # in place: its object (same inode) too
    cache_pool.restart_workers()  # fresh processes check the tree on first use
    assert cache_pool.run() == GOOD
    assert "def simulate(p):\n    return -1" not in tree_file.read_text()


def test_planted_bytecode_in_a_tree_is_never_loaded(cache_pool: CachePool) -> None:
    """A __pycache__ entry whose header matches the source's mtime and size is what
    Python's own import would load instead of the source."""
    assert cache_pool.run() == GOOD
    (tree_file,) = cache_pool.tree_paths("mylib/model.py")
    evil = tree_file.parent / "evil_source.py"
    evil.write_text(cache_pool.evil())
    pyc = Path(importlib.util.cache_from_source(str(tree_file)))
    pyc.parent.mkdir(exist_ok=True)
    py_compile.compile(str(evil), cfile=str(pyc), doraise=True)
    evil.unlink()
    st = tree_file.stat()
    data = bytearray(pyc.read_bytes())
    data[8:16] = struct.pack("<II", int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    pyc.write_bytes(bytes(data))
    cache_pool.restart_workers()
    assert cache_pool.run() == GOOD


def test_tree_file_tampered_while_in_use_fails_clearly_then_recovers(
    cache_pool: CachePool,
) -> None:
    assert cache_pool.run() == GOOD
    (tree_file,) = cache_pool.tree_paths("mylib/model.py")
    tree_file.write_text(cache_pool.evil())
    # The worker processes checked this tree already; the next run re-imports (another
    # client) and reads the changed file: those tasks fail, none runs the tampered code.
    outcomes = cache_pool.run()
    failed = [o for o in outcomes if o[0] != "ok"]
    assert failed, outcomes
    for outcome in failed:
        assert outcome[0] == "CodeShippingError" and "does not match" in str(outcome[1])
    assert [o for o in outcomes if o[0] == "ok"] == [o for o in GOOD if o in outcomes]
    # And the tree is checked and rebuilt before the next task of that version.
    assert cache_pool.run() == GOOD


# -- remote tracebacks show the user's files (issue 13.3) -------------------------------------


def _frame_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]


def _assert_points_at(text: str, path: str, function: str, source: str) -> None:
    """The traceback has ``File "path", line N, in function`` followed by that line's source,
    N being where ``source`` is in the client's file."""
    lines = Path(path).read_text().splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if line.strip() == source)
    expected = f'File "{path}", line {lineno}, in {function}'
    text_lines = [line.strip() for line in text.splitlines()]
    assert expected in text_lines, text
    assert text_lines[text_lines.index(expected) + 1] == source, text


FAILING = {
    "PKG/__init__.py": "",
    "PKG/model.py": """
        from OTHER.checks import check

        def simulate(x):
            return check(x) * 2

        def fail(x):
            raise ValueError(f"bad x: {x}")
        """,
}
CHECKS = {
    "PKG/__init__.py": "",
    "PKG/checks.py": """
        def check(x):
            if x < 0:
                raise ValueError(f"negative: {x}")
            return x
        """,
}


def test_traceback_of_a_shipped_module_shows_the_clients_files(
    code_pool: Pool, make_package: MakePackage
) -> None:
    other = make_package(CHECKS)
    name = make_package({k: v.replace("OTHER", other) for k, v in FAILING.items()})
    model = importlib.import_module(f"{name}.model")
    checks = importlib.import_module(f"{other}.checks")
    with _executor(code_pool) as ex:
        with pytest.raises(ValueError, match="bad x: 3") as err:
            ex.submit(model.fail, 3).result(timeout=30)
        cause = err.value.__cause__
        assert isinstance(cause, fade.RemoteTraceback)
        _assert_points_at(cause.tb, model.__file__, "fail", 'raise ValueError(f"bad x: {x}")')
        assert "trees" not in cause.tb and str(code_pool.code_cache) not in cause.tb  # type: ignore[attr-defined]
        assert (model.__file__, "fail") in {(f[0], f[2]) for f in cause.frames}

        # A call across two local packages: both frames are the client's files.
        with pytest.raises(ValueError, match="negative: -1") as err:
            ex.submit(model.simulate, -1).result(timeout=30)
        text = err.value.__cause__.tb  # type: ignore[union-attr]
        _assert_points_at(text, model.__file__, "simulate", "return check(x) * 2")
        _assert_points_at(text, checks.__file__, "check", 'raise ValueError(f"negative: {x}")')
        assert "trees" not in text

        # The same through a chunked map.
        with pytest.raises(ValueError, match="negative: -1") as err:
            list(ex.map(model.simulate, [1, 2, -1, 3], chunksize=2))
        text = err.value.__cause__.tb  # type: ignore[union-attr]
        _assert_points_at(text, checks.__file__, "check", 'raise ValueError(f"negative: {x}")')

        # Lines come from the code that ran, even once the file is edited afterwards.
        Path(model.__file__).write_text("# edited\n" * 20)
        with pytest.raises(ValueError) as err:
            ex.submit(model.fail, 4).result(timeout=30)
        assert 'raise ValueError(f"bad x: {x}")' in err.value.__cause__.tb  # type: ignore[union-attr]


MAIN_FAILING = """
import sys
import fade
sys.path.insert(0, sys.argv[2])
from {name}.model import simulate

def run(x):
    def inner(y):
        return simulate(y) + 1
    return inner(x)

with fade.Executor(sys.argv[1], heartbeat_interval={interval}) as ex:
    try:
        ex.submit(run, -5).result(timeout=30)
    except ValueError as exc:
        print(exc.__cause__)
"""


def test_traceback_of_main_functions_and_closures_shows_the_script(
    code_pool: Pool, make_package: MakePackage, tmp_path: Path
) -> None:
    other = make_package(CHECKS)
    name = make_package({k: v.replace("OTHER", other) for k, v in FAILING.items()})
    base = sys.path[0]
    script = tmp_path / "user_script.py"
    script.write_text(MAIN_FAILING.format(name=name, interval=INTERVAL))
    out = subprocess.run(
        [sys.executable, str(script), code_pool.address, base],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "<dynamic-code>" not in text, text
    _assert_points_at(text, str(script), "run", "return inner(x)")
    _assert_points_at(text, str(script), "inner", "return simulate(y) + 1")
    _assert_points_at(text, f"{base}/{name}/model.py", "simulate", "return check(x) * 2")
    _assert_points_at(
        text, f"{base}/{other}/checks.py", "check", 'raise ValueError(f"negative: {x}")'
    )


def test_client_fills_in_source_lines_the_worker_does_not_have(tmp_path: Path) -> None:
    """A frame whose file exists only on the client (a script on the user's laptop)."""
    from fade.tracebacks import capture

    user_file = tmp_path / "laptop.py"
    user_file.write_text("def f(x):\n    return 1 // x\n")
    namespace: dict[str, object] = {}
    exec(compile("def f(x):\n    return 1 // x\n", "/nonexistent/laptop.py", "exec"), namespace)
    try:
        namespace["f"](0)  # type: ignore[operator]
    except ZeroDivisionError as exc:
        trace = capture(exc)
    assert trace.frames[-1] == ("/nonexistent/laptop.py", 2, "f", "")
    text, frames = trace.render(lambda p: (str(user_file), None) if "laptop" in p else None)
    assert f'  File "{user_file}", line 2, in f\n    return 1 // x\n' in text
    assert frames[-1] == (str(user_file), 2, "f", "return 1 // x")
    assert "ZeroDivisionError" in text and "nonexistent" not in text


# -- a task's changes to its worker process do not reach the next task (issue 14.6) ------------


def test_next_task_sees_the_workers_own_cwd_environment_path_and_builtins(
    pool: Pool, tmp_path: Path
) -> None:
    pool.start_broker()
    pool.start_worker(1, None, "--code-cache", str(tmp_path / "cache"))
    pool.wait_workers(1)
    elsewhere = tmp_path / "tenant-a"
    elsewhere.mkdir()
    with _executor(pool) as tenant_b:
        before = tenant_b.submit(tasks.worker_state).result(timeout=30)
    assert before["secret"] is None and before["leaked"] is False
    with _executor(pool) as tenant_a:
        assert (
            tenant_a.submit(tasks.change_worker_state, str(elsewhere)).result(30) == before["pid"]
        )
    with _executor(pool) as tenant_b:
        after = tenant_b.submit(tasks.worker_state).result(timeout=30)
    assert after == before


# -- a function that carries large data with it ---------------------------------------------

_LARGE_GLOBAL = bytearray(3 << 20)


def test_a_function_carrying_large_data_is_warned_about_once_at_the_callers_line() -> None:
    """A closure or ``__main__`` function is pickled by value with what it refers to, and
    every task carries it again (40 tasks of a function reading a 50 MB array global took
    6.6 s on the embedded pool, 0.04 s with it as an argument): say so once, naming what is
    large and what to do instead."""
    import warnings

    table = bytearray(2 << 20)

    def lookup(i: int) -> int:  # a closure: pickled by value
        return len(table) + len(_LARGE_GLOBAL) + i

    def small(i: int) -> int:
        return i + 1

    with fade.Executor(max_workers=1) as ex, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ex.submit(small, 1).result(timeout=30) == 2  # positive control: no warning
        assert not [w for w in seen if w.category is fade.LargeFunctionWarning]
        here = sys._getframe().f_lineno + 1
        assert ex.submit(lookup, 1).result(timeout=30) == (5 << 20) + 1
        assert list(ex.map(lookup, [2, 3])) == [(5 << 20) + 2, (5 << 20) + 3]
    warned = [w for w in seen if w.category is fade.LargeFunctionWarning]
    assert len(warned) == 1, [str(w.message) for w in warned]
    message = str(warned[0].message)
    assert "lookup is pickled by value" in message and "5.2 MB" in message, message
    assert "_LARGE_GLOBAL (3.1 MB)" in message and "table (2.1 MB)" in message, message
    assert "fade.share()" in message, message
    assert (warned[0].filename, warned[0].lineno) == (__file__, here)


def test_a_map_in_chunks_of_a_function_carrying_large_data_is_warned_about() -> None:
    # map(chunksize=...) sends partial(run_chunk, fn): the warning names fn.
    import warnings

    table = bytearray(2 << 20)

    def lookup(i: int) -> int:
        return len(table) + i

    with fade.Executor(max_workers=1) as ex, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        here = sys._getframe().f_lineno + 1
        assert list(ex.map(lookup, [1, 2, 3], chunksize=2)) == [(2 << 20) + i for i in (1, 2, 3)]
    warned = [w for w in seen if w.category is fade.LargeFunctionWarning]
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert "lookup is pickled by value" in str(warned[0].message)
    assert "table (2.1 MB)" in str(warned[0].message)
    assert (warned[0].filename, warned[0].lineno) == (__file__, here)


def test_a_bound_method_carrying_a_large_instance_names_the_instance() -> None:
    import warnings

    class Model:  # local: pickled by value, with its instance
        def __init__(self) -> None:
            self.weights = bytearray(2 << 20)

        def predict(self, x: int) -> int:
            return len(self.weights) + x

    model = Model()
    with fade.Executor(max_workers=1) as ex, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ex.submit(model.predict, 1).result(timeout=30) == (2 << 20) + 1
    warned = [str(w.message) for w in seen if w.category is fade.LargeFunctionWarning]
    assert len(warned) == 1 and "its instance of " in warned[0], warned
