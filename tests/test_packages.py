"""Installed packages travel: distributions only the client has, or has at another version.

The client is this test process: each test installs hand-made distributions
(tests/dists.py, a RECORD with hashes as pip writes it) into a folder that only
this process has on ``sys.path``. Workers run this machine's Python with their own
code and package cache. tests/test_packages_venv.py does the same with real wheels
installed by pip into two virtual environments.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tasks
import zmq
from conftest import INTERVAL, Pool, kill_tree, raw_hello, wait_for
from dists import build_extension, build_library, make_dist, tree_of

import fade
from fade import protocol as p
from fade import serialization as ser
from fade.distributions import (
    Distribution,
    content_id,
    normalize,
    record_entries,
    top_level_modules,
)
from fade.packages import InstalledPackages
from fade.pkgcache import PackageCache
from fade.status import format_status, query

pytestmark = pytest.mark.timeout(120)


@dataclass
class Site:
    """A folder of distributions on this (client) process's sys.path only."""

    path: Path
    names: list[str]

    def add(self, name: str, version: str, files: dict[str, bytes | str], **kw: object) -> None:
        make_dist(self.path, name, version, files, **kw)  # type: ignore[arg-type]
        self.names += [p.split("/")[0].removesuffix(".py") for p in files]

    def module(self, name: str) -> object:
        importlib.invalidate_caches()
        return importlib.import_module(name)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "client-site"
    root.mkdir()
    sys.path.insert(0, str(root))
    made = Site(root, [])
    yield made
    sys.path.remove(str(root))
    for mod in [m for m in sys.modules if m.partition(".")[0] in made.names]:
        del sys.modules[mod]
    importlib.invalidate_caches()


@dataclass
class PackagePool:
    pool: Pool
    cache: Path

    def worker(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.pool.start_worker(1, env, "--code-cache", str(self.cache), *extra)

    def executor(self, **kwargs: object) -> fade.Executor:
        return fade.Executor(self.pool.address, heartbeat_interval=INTERVAL, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def packages(pool: Pool, tmp_path: Path) -> PackagePool:
    """A broker; the test starts workers (each with this test's own cache)."""
    pool.start_broker()
    return PackagePool(pool, tmp_path / "worker-cache")


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def _module(name: str, version: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        import importlib.metadata, os
        VERSION = {version!r}
        def where():
            return VERSION, importlib.metadata.version({name!r}), __file__, os.getpid()
        """
    ) + textwrap.dedent(extra)


# -- what travels, and how often ----------------------------------------------------------------


def test_the_top_level_map_is_what_importlib_metadata_says(tmp_path: Path) -> None:
    # fade reads it itself (a third of the cost); the standard library is the judge, here on
    # a site folder with each kind of distribution, and on this interpreter's own.
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    make_dist(tmp_path, "Pack-Age", "1.0", {"pack_age/__init__.py": "", "pack_age/m.py": ""})
    make_dist(tmp_path, "single", "2.0", {"single.py": "", "__pycache__/single.cpython.pyc": ""})
    make_dist(tmp_path, "two-tops", "1.0", {"alpha/__init__.py": "", "beta.py": "", "x.txt": ""})
    declared = make_dist(tmp_path, "declared", "1.0", {"decl/__init__.py": ""})
    (declared / "top_level.txt").write_text("decl\nhidden\n")
    make_dist(tmp_path, "native", "1.0", {f"fast{ext}": ""})
    make_dist(tmp_path, "shared-a", "1.0", {"ns/a/__init__.py": ""})
    make_dist(tmp_path, "shared-b", "1.0", {"ns/b/__init__.py": ""})
    expected = {
        "pack_age": ["pack-age"], "single": ["single"], "alpha": ["two-tops"],
        "beta": ["two-tops"], "decl": ["declared"], "hidden": ["declared"],
        "fast": ["native"], "ns": ["shared-a", "shared-b"],
    }  # fmt: skip
    assert _sorted(top_level_modules([str(tmp_path)])) == expected
    stdlib = _stdlib_map([str(tmp_path)])
    assert stdlib == {top: expected[top] for top in stdlib}
    assert set(expected) - set(stdlib) <= {"fast"}  # 3.11 infers no extension module
    # And on this interpreter's own installation (where fade may also find extension
    # modules that 3.11 does not infer).
    ours, stdlib = _sorted(top_level_modules(sys.path)), _stdlib_map(sys.path)
    assert {top: ours.get(top) for top in stdlib} == stdlib


@pytest.mark.parametrize(
    ("imports", "absent"),
    [
        ("import fade.worker", ("importlib.metadata", "multiprocessing")),
        ("import fade; fade.Executor", ("multiprocessing",)),
    ],
    ids=["worker", "client"],
)
def test_start_up_leaves_out_what_it_seldom_needs(imports: str, absent: tuple[str, ...]) -> None:
    # A worker reads installed distributions only for a task whose packages differ
    # (importlib.metadata: 10 ms of its start), and fade's errors that are also
    # BrokenProcessPool import multiprocessing only when one is met (10-15 ms, worker and
    # client): both on the way to the first result.
    code = f"import sys; {imports}; print(sorted(set({absent!r}) & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_errors_made_on_first_use_are_fade_errors_and_broken_process_pools() -> None:
    import pickle
    from concurrent.futures.process import BrokenProcessPool

    from fade import errors

    for name in ("ResultDecodeError", "TaskDecodeError", "WorkerLostError"):
        error = getattr(fade, name)
        assert error is getattr(errors, name) and error.__module__ == "fade.errors"
        assert issubclass(error, fade.FadeError) and issubclass(error, BrokenProcessPool)
        again = pickle.loads(pickle.dumps(error("why")))  # by reference, as results travel
        assert type(again) is error and str(again) == "why"
    assert issubclass(fade.ResultDecodeError, pickle.PicklingError)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchError'"):
        errors.NoSuchError  # noqa: B018


def _sorted(found: dict[str, list[str]]) -> dict[str, list[str]]:
    return {top: sorted(names) for top, names in found.items()}


def _stdlib_map(path: list[str]) -> dict[str, list[str]]:
    """importlib.metadata.packages_distributions(), for ``path`` instead of sys.path."""
    found: dict[str, set[str]] = {}
    saved = sys.path[:]
    sys.path[:] = path
    try:
        for top, names in importlib.metadata.packages_distributions().items():
            found.setdefault(top, set()).update(normalize(n) for n in names)
    finally:
        sys.path[:] = saved
    return {top: sorted(names) for top, names in found.items()}


def test_a_distribution_only_the_client_has_travels_once_per_host(
    packages: PackagePool, site: Site
) -> None:
    mod = _unique("fadepure")
    site.add(f"{mod}-dist", "2.0", {f"{mod}/__init__.py": _module(f"{mod}-dist", "2.0")})
    pkg = site.module(mod)
    first = packages.worker()
    packages.pool.wait_workers(1)
    with packages.executor() as ex:
        version, meta, where, pid = ex.submit(pkg.where).result(timeout=60)  # type: ignore[attr-defined]
        assert (version, meta) == ("2.0", "2.0")
        assert where.startswith(str(packages.cache / "packages" / "dists"))
        assert pid not in packages.pool.worker_pids()  # an environment process ran it
        stats = dict(ex._packages.stats)  # type: ignore[union-attr]
        assert stats["manifests_served"] == 1 and stats["files_served"] >= 1
        assert ex.submit(pkg.where).result(timeout=60)[3] == pid  # type: ignore[attr-defined]
        assert ex.submit(tasks.add, 1, 2).result(timeout=60) == 3
        assert ex._packages.stats == stats, "a second task fetched again"  # type: ignore[union-attr]

        # Another worker process of the same host: the cache is on disk, nothing travels.
        packages.worker()
        packages.pool.wait_workers(2)
        kill_tree(first.pid)
        first.wait()
        wait_for(lambda: len(query(packages.pool.address)["workers"]) == 1, 30, "one worker")
        version, _, where, pid2 = ex.submit(pkg.where).result(timeout=60)  # type: ignore[attr-defined]
        assert version == "2.0" and pid2 != pid
        assert ex._packages.stats == stats, "a second worker process fetched again"  # type: ignore[union-attr]


def test_a_package_file_over_the_brokers_frame_limit_fails_the_task_and_says_why(
    pool: Pool, site: Site, tmp_path: Path
) -> None:
    # The client answered with the whole file, over the broker's --max-message-size: the
    # broker dropped the client's connection, and the task waited for ever.
    mod = _unique("fadebig")
    files = {f"{mod}/__init__.py": _module(f"{mod}-dist", "1.0"), f"{mod}/big.bin": "x" * (2 << 20)}
    site.add(f"{mod}-dist", "1.0", files)
    pkg = site.module(mod)
    pool.start_broker("--max-message-size", "1M")
    pool.start_worker(1, None, "--code-cache", str(tmp_path / "worker-cache"))
    pool.wait_workers(1)
    with fade.Executor(pool.address, heartbeat_interval=INTERVAL) as ex:
        with pytest.raises(fade.FadeError, match="over the broker's frame limit") as info:
            ex.submit(pkg.where).result(timeout=60)  # type: ignore[attr-defined]
        assert "--max-message-size" in str(info.value)
        assert ex.submit(tasks.add, 1, 2).result(timeout=30) == 3


def test_a_worker_with_another_version_runs_the_clients_and_its_own_side_by_side(
    packages: PackagePool, site: Site, tmp_path: Path
) -> None:
    """The worker has 1.0; this client 2.0; another client, like the worker, 1.0. Their
    tasks interleave on one worker process: each sees its own client's version."""
    name = _unique("fadever")
    old = tmp_path / "worker-site"
    make_dist(old, f"{name}-dist", "1.0", {f"{name}/__init__.py": _module(f"{name}-dist", "1.0")})
    site.add(f"{name}-dist", "2.0", {f"{name}/__init__.py": _module(f"{name}-dist", "2.0")})
    env = {"PYTHONPATH": os.pathsep.join([str(old), os.environ["PYTHONPATH"]])}
    packages.worker(env=env)
    (worker_pid,) = packages.pool.wait_workers(1)
    other = textwrap.dedent(
        f"""
        import json, sys, fade, {name}
        with fade.Executor({packages.pool.address!r}, heartbeat_interval={INTERVAL}) as ex:
            print(json.dumps([f.result(timeout=60)[::3] for f in [ex.submit({name}.where) for _ in range(40)]]))
        """
    )
    their = subprocess.Popen(
        [sys.executable, "-c", other], env={**os.environ, **env}, stdout=subprocess.PIPE, text=True
    )
    pkg = site.module(name)
    with packages.executor() as ex:
        ours = [ex.submit(pkg.where) for _ in range(40)]  # type: ignore[attr-defined]
        seen = {f.result(timeout=60)[::3] for f in ours}
    theirs = {tuple(x) for x in __import__("json").loads(their.communicate(timeout=60)[0])}
    assert {version for version, _ in seen} == {"2.0"}
    assert theirs == {("1.0", worker_pid)}  # the worker's own version, in the worker itself
    assert all(pid != worker_pid for _, pid in seen)


def test_local_code_that_uses_a_shipped_package_runs_in_its_environment_process(
    packages: PackagePool, site: Site, tmp_path: Path
) -> None:
    """The environment process fetches the client's local code through its worker
    process's broker link, and that code imports the shipped distribution."""
    dist, local = _unique("fadeused"), _unique("fadelocal")
    site.add(f"{dist}-dist", "5.0", {f"{dist}/__init__.py": "VALUE = 5\n"})
    code = tmp_path / "local-code"
    (code / local).mkdir(parents=True)
    (code / local / "__init__.py").write_text(
        f"import os\nimport {dist}\ndef work(x):\n    return x * {dist}.VALUE, os.getpid()\n"
    )
    sys.path.insert(0, str(code))
    try:
        pkg = site.module(local)
        packages.worker()
        (worker_pid,) = packages.pool.wait_workers(1)
        with packages.executor() as ex:
            value, pid = ex.submit(pkg.work, 3).result(timeout=60)  # type: ignore[attr-defined]
            assert value == 15 and pid != worker_pid
            assert ex._code.stats["manifests_served"] == 1  # type: ignore[union-attr]
            env = _envs(ex)[0]
        assert [d.label for d in env.distributions] == [f"{dist}-dist 5.0"]
    finally:
        sys.path.remove(str(code))
        sys.modules.pop(local, None)


def test_the_workers_current_folder_is_on_no_path_the_tasks_import_from(
    packages: PackagePool, site: Site, tmp_path: Path
) -> None:
    # A worker's current folder is not its code: a module there named like one of
    # Python's own (or like the task's) must not be imported, neither by the worker
    # process (started with "python -m", which put the folder first; now with the path
    # of fade-worker, which has its bin folder there) nor by the environment process
    # that runs a task with shipped packages (its "python -c" did the same).
    here = tmp_path / "worker-cwd"
    here.mkdir()
    probe = _unique("fadecwdprobe")
    (here / f"{probe}.py").write_text("")
    mod = _unique("fadecwd")
    site.add(
        f"{mod}-dist",
        "1.0",
        {
            f"{mod}/__init__.py": _module(
                f"{mod}-dist",
                "1.0",
                """
                def sees(name):
                    import importlib.util
                    return importlib.util.find_spec(name) is not None, os.getcwd(), os.getpid()
                """,
            )
        },
    )
    pkg = site.module(mod)
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "fade-worker"),
            packages.pool.address,
            "--processes",
            "1",
            "--code-cache",
            str(packages.cache),
            *packages.pool._timing(),
        ],
        cwd=here,
    )
    packages.pool.workers.append(worker)
    (worker_pid,) = packages.pool.wait_workers(1)
    with packages.executor() as ex:
        # The worker process itself (tasks.find_module runs there: nothing to ship) ...
        assert ex.submit(tasks.sees_module, probe).result(timeout=60) == (
            False,
            str(here),
            worker_pid,
        )
        # ... and an environment process (the package only this client has).
        seen, cwd, pid = ex.submit(pkg.sees, probe).result(timeout=60)  # type: ignore[attr-defined]
        assert (seen, cwd) == (False, str(here)) and pid != worker_pid


def _environment_process_for(
    packages: PackagePool, site: Site, prefix: str, extra: str
) -> tuple[Any, int]:
    """A package only the client has, its module with ``extra`` (so its functions run in
    an environment process), and the pid of the one worker process started for it."""
    mod = _unique(prefix)
    site.add(f"{mod}-dist", "1.0", {f"{mod}/__init__.py": _module(f"{mod}-dist", "1.0", extra)})
    packages.worker()
    (worker_pid,) = packages.pool.wait_workers(1)
    return site.module(mod), worker_pid


def test_a_process_an_environment_process_forks_has_pythons_own_signal_handlers(
    packages: PackagePool, site: Site
) -> None:
    # As in a worker process (test_hardening.py): SIGINT was ignored there (SIG_IGN, which
    # even survives exec), so a forked child could not be interrupted.
    pkg, worker_pid = _environment_process_for(
        packages,
        site,
        "fadesig",
        """
        def forked_signals():
            import tasks
            return tasks.signal_forked_children(), os.getpid()
        """,
    )
    with packages.executor() as ex:
        codes, pid = ex.submit(pkg.forked_signals).result(timeout=60)  # type: ignore[attr-defined]
    assert pid != worker_pid  # an environment process ran it
    assert codes == (-signal.SIGTERM, 1)


def test_a_forked_child_that_comes_back_into_an_environment_process_ends_there(
    packages: PackagePool, site: Site
) -> None:
    # As in a worker process (test_hardening.py): the child went on serving the worker's
    # socket pair, and its parent waited for it, with the task, for ever.
    pkg, worker_pid = _environment_process_for(
        packages,
        site,
        "fadefork",
        """
        def fork_three_ways():
            import tasks
            ways = ("return", "raise", "exit")
            return [tasks.fork_and_come_back(how) for how in ways], os.getpid()
        """,
    )
    with packages.executor() as ex:
        outcomes, pid = ex.submit(pkg.fork_three_ways).result(timeout=60)  # type: ignore[attr-defined]
        assert ex.submit(pkg.fork_three_ways).result(timeout=60)[1] == pid  # type: ignore[attr-defined]
    assert pid != worker_pid  # an environment process ran it
    assert outcomes == [("parent", 0), ("parent", 1), ("parent", 3)]


def test_requirements_travel_with_what_requires_them(packages: PackagePool, site: Site) -> None:
    base, top = _unique("fadebase"), _unique("fadetop")
    site.add(f"{base}-dist", "3.1", {f"{base}/__init__.py": "def value():\n    return 31\n"})
    site.add(
        f"{top}-dist",
        "1.0",
        {f"{top}/__init__.py": f"import {base}\ndef go():\n    return {base}.value() + 1\n"},
        requires=(f"{base}-dist>=3", "never-installed-dist; extra == 'x'"),
    )
    pkg = site.module(top)
    packages.worker()
    packages.pool.wait_workers(1)
    with packages.executor() as ex:
        assert ex.submit(pkg.go).result(timeout=60) == 32  # type: ignore[attr-defined]
        env = next(iter(ex._packages._environments.values()))  # type: ignore[union-attr]
    assert [d.label for d in env.distributions] == [f"{base}-dist 3.1", f"{top}-dist 1.0"]


# -- the cache --------------------------------------------------------------------------------


def test_the_cache_bound_evicts_the_least_recently_used(packages: PackagePool, site: Site) -> None:
    names = {}
    for letter in "abc":
        name = _unique(f"fadelru{letter}")
        site.add(
            f"{name}-dist",
            "1.0",
            {f"{name}/__init__.py": "X = 1\n", f"{name}/blob.bin": os.urandom(2**20)},
        )
        names[letter] = site.module(name)
    packages.worker("--package-cache-size", str(int(2.5 * 2**20)))
    packages.pool.wait_workers(1)

    def cached() -> set[str]:
        ids = {d.id: d.name for d in PackageCache(str(packages.cache)).listing()}
        return {n.removeprefix("fadelru")[0] for n in ids.values()}

    with packages.executor() as ex:
        get = lambda letter: ex.submit(getattr, names[letter], "X").result(timeout=60)  # noqa: E731
        stats = ex._packages.stats  # type: ignore[union-attr]
        assert get("a") == get("b") == 1
        assert cached() == {"a", "b"}
        assert get("c") == 1
        assert cached() == {"b", "c"}  # a was the least recently used
        assert get("b") == 1  # b is now more recent than c
        manifests = stats["manifests_served"]
        assert get("a") == 1  # fetched again; c goes
        assert cached() == {"a", "b"}
        assert stats["manifests_served"] == manifests + 1
        assert get("c") == 1  # c fetched again, evicting b; its environment process too
        assert cached() == {"a", "c"}
        assert get("b") == 1


def test_a_worker_killed_mid_download_leaves_no_cache_entry(
    packages: PackagePool, site: Site
) -> None:
    name = _unique("fadebig")
    files: dict[str, bytes | str] = {f"{name}/__init__.py": "X = 5\n"}
    files.update({f"{name}/part{i}.bin": os.urandom(8 * 2**20) for i in range(5)})
    site.add(f"{name}-dist", "1.0", files)
    pkg = site.module(name)
    worker = packages.worker()
    packages.pool.wait_workers(1)
    dists = packages.cache / "packages" / "dists"
    with packages.executor() as ex:
        served = ex._packages  # type: ignore[union-attr]
        serve = served.serve

        def slowly(request: dict[str, object]) -> tuple[p.CodeStatus, list[bytes]]:
            if request.get("kind") == "files":
                time.sleep(0.25)  # one batch at a time: the download takes a while
            return serve(request)

        served.serve = slowly  # type: ignore[method-assign]
        future = ex.submit(getattr, pkg, "X")
        wait_for(
            lambda: any(
                n.startswith(".staging-") and any((dists / n).rglob("part*.bin"))
                for n in tree_of(packages.cache)
            ),
            60,
            "a download under way",
        )
        kill_tree(worker.pid)  # the supervisor and its worker process, mid-download
        worker.wait()
        left = tree_of(packages.cache)
        assert all(n.startswith(".") for n in left), left  # a staging folder, never a tree
        served.serve = serve  # type: ignore[method-assign]
        packages.worker()
        assert future.result(timeout=60) == 5  # re-queued, fetched afresh, runs
    (tree,) = tree_of(packages.cache)  # the staging folder is gone, the tree complete
    (dist,) = [d for d in _envs(ex)[0].distributions]
    assert tree == dist.id and PackageCache(str(packages.cache)).check(dist) == []


def _envs(ex: fade.Executor) -> list:  # type: ignore[type-arg]
    return list(ex._packages._environments.values())  # type: ignore[union-attr]


def test_a_distribution_larger_than_the_workers_cache_fails_naming_the_option(
    packages: PackagePool, site: Site
) -> None:
    name = _unique("fadehuge")
    site.add(
        f"{name}-dist", "1.0", {f"{name}/__init__.py": "X = 1\n", f"{name}/b": os.urandom(2**20)}
    )
    pkg = site.module(name)
    packages.worker("--package-cache-size", "100000")
    packages.pool.wait_workers(1)
    with packages.executor() as ex:
        with pytest.raises(
            fade.PackageShippingError, match=f"{name}-dist 1.0 is 1.0 MiB.*--package-cache-size"
        ):
            ex.submit(getattr, pkg, "X").result(timeout=60)
        assert ex.submit(tasks.add, 2, 2).result(timeout=60) == 4


def test_a_full_package_cache_disk_fails_the_task_naming_the_folder(
    packages: PackagePool, site: Site, small_file_system: Path
) -> None:
    name = _unique("fadefull")
    site.add(
        f"{name}-dist", "1.0", {f"{name}/__init__.py": "X = 1\n", f"{name}/b": os.urandom(2**19)}
    )
    pkg = site.module(name)
    packages.cache = small_file_system
    packages.worker()
    packages.pool.wait_workers(1)
    with packages.executor() as ex, pytest.raises(fade.PackageShippingError) as info:
        ex.submit(getattr, pkg, "X").result(timeout=60)
    message = str(info.value)
    assert f"{name}-dist 1.0" in message and "No space left on device" in message, message
    assert str(small_file_system) in message and "--code-cache" in message, message
    assert not [p for p in small_file_system.rglob(".staging-*")]  # its space given back


# -- controls and what cannot travel -------------------------------------------------------------


def test_over_the_clients_limit_fails_naming_the_packages(
    packages: PackagePool, site: Site
) -> None:
    name = _unique("fadelimit")
    site.add(
        f"{name}-dist", "1.0", {f"{name}/__init__.py": "X = 1\n", f"{name}/b": os.urandom(4096)}
    )
    pkg = site.module(name)
    packages.worker()
    packages.pool.wait_workers(1)
    with (
        packages.executor(ship_packages_limit=1000) as ex,
        pytest.raises(fade.PackageShippingError, match=f"{name}-dist 1.0.*ship_packages_limit"),
    ):
        ex.submit(getattr, pkg, "X").result(timeout=60)


def test_ship_packages_off_or_a_list(packages: PackagePool, site: Site) -> None:
    name, other = _unique("fadeoff"), _unique("fadelisted")
    site.add(
        f"{name}-dist",
        "1.0",
        {
            f"{name}/__init__.py": "X = 1\ndef lazy():\n    import "
            + other
            + "\n    return "
            + other
            + ".Y\n"
        },
    )
    site.add(f"{other}-dist", "1.0", {f"{other}/__init__.py": "Y = 2\n"})
    pkg = site.module(name)
    packages.worker()
    packages.pool.wait_workers(1)
    missing = pytest.raises(fade.MissingDependencyError, match=f"{name}-dist 1.0.*ship_packages")
    with packages.executor(ship_packages="off") as ex, missing:
        ex.submit(getattr, pkg, "X").result(timeout=60)
    # A list ships exactly those, for every task, whatever the task names.
    with packages.executor(ship_packages=[f"{name}-dist", f"{other.upper()}_dist"]) as ex:
        assert ex.submit(pkg.lazy).result(timeout=60) == 2  # type: ignore[attr-defined]
        assert ex.submit(tasks.add, 1, 1).result(timeout=60) == 2
    with pytest.raises(ValueError, match="never travel"):
        fade.Executor(packages.pool.address, ship_packages=["pyzmq"])
    with pytest.raises(ValueError, match="not an installed distribution"):
        fade.Executor(packages.pool.address, ship_packages=["no-such-dist-anywhere"])
    with pytest.raises(ValueError, match="ship_packages must be"):
        fade.Executor(packages.pool.address, ship_packages="sometimes")


def test_a_distribution_that_records_the_clients_path_cannot_be_relocated(
    packages: PackagePool, site: Site
) -> None:
    name = _unique("fadepath")
    here = os.path.realpath(site.path)
    site.add(
        f"{name}-dist",
        "1.0",
        {f"{name}/__init__.py": "X = 1\n", f"{name}/_paths.py": f"DATA = {here + '/' + name!r}\n"},
    )
    pkg = site.module(name)
    packages.worker()
    packages.pool.wait_workers(1)
    with packages.executor() as ex, pytest.raises(fade.PackageShippingError) as caught:
        ex.submit(getattr, pkg, "X").result(timeout=60)
    message = str(caught.value)
    assert f"{name}-dist 1.0 cannot travel" in message and "cannot be relocated" in message
    assert f"{name}/_paths.py records the absolute path {here}" in message


def test_a_distribution_without_file_hashes_cannot_travel_and_says_so(
    packages: PackagePool, site: Site
) -> None:
    name = _unique("fadenohash")
    site.add(f"{name}-dist", "1.0", {f"{name}/__init__.py": "X = 1\n"}, hashes=False)
    pkg = site.module(name)
    packages.worker()
    packages.pool.wait_workers(1)
    with packages.executor() as ex, pytest.raises(fade.MissingDependencyError) as caught:
        ex.submit(getattr, pkg, "X").result(timeout=60)
    message = str(caught.value)
    assert f"does not have {name}-dist" in message and "without a usable hash" in message
    assert f"Install {name}-dist 1.0 on the workers" in message


def test_a_compiled_package_needing_a_library_the_worker_lacks_fails_naming_both(
    packages: PackagePool, tmp_path: Path
) -> None:
    """The client finds libfadeneed.so through LD_LIBRARY_PATH; the worker host has no
    such library: the extension travels, and fails to load there, saying why."""
    name = _unique("fadeneed")
    libs, site = tmp_path / "libs", tmp_path / "site"
    (libs).mkdir()
    (site / name).mkdir(parents=True)
    try:
        build_library(libs, "fadeneed")
        ext = build_extension(
            site / name, "_fast", "fade_need()", libraries=("fadeneed",), library_dir=libs
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler or Python headers: {exc}")
    make_dist(
        site,
        f"{name}-dist",
        "1.0",
        {
            f"{name}/__init__.py": "from ._fast import answer\n",
            f"{name}/{ext.name}": ext.read_bytes(),
        },
    )
    packages.worker()
    packages.pool.wait_workers(1)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        import fade, {name}
        assert {name}.answer() == 7
        with fade.Executor({packages.pool.address!r}, heartbeat_interval={INTERVAL}) as ex:
            try:
                ex.submit({name}.answer).result(timeout=60)
            except fade.PackageShippingError as exc:
                print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "LD_LIBRARY_PATH": str(libs)},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert f"{name}-dist 1.0, shipped from the client, does not load on host" in out.stdout, (
        out.stderr
    )
    assert "libfadeneed.so" in out.stdout and "system library" in out.stdout


# -- compatibility, before anything runs -------------------------------------------------------------


class FakeWorker(threading.Thread):
    """A hand-made worker peer of another platform: it heartbeats and notes the commands it
    gets (its thread alone touches its socket)."""

    def __init__(self, address: str, **hello: str) -> None:
        super().__init__(daemon=True)
        self.address, self.hello = address, hello
        self.got: list[p.Command] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.IDENTITY, b"W" + os.urandom(15))
        sock.connect(self.address)
        sock.send_multipart(raw_hello("worker", **self.hello))
        while not self.stopping.is_set():
            if sock.poll(50):
                self.got.append(p.parse(sock.recv_multipart()).command)
            sock.send_multipart(p.encode(p.Command.HEARTBEAT))
        context.destroy(linger=0)


def test_a_task_needing_compiled_packages_never_reaches_another_platform(
    packages: PackagePool, site: Site
) -> None:
    """A worker of another platform (a hand-made peer saying linux-aarch64) may get pure
    tasks but never a compiled one: that is refused at once, naming both sides."""
    name = _unique("fadenative")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    site.add(
        f"{name}-dist",
        "1.0",
        {f"{name}/__init__.py": "X = 3\n", f"{name}/_speedups{suffix}": b"\x7fELF not loaded"},
    )
    pkg = site.module(name)
    arm = FakeWorker(
        packages.pool.address, host="h3", platform="linux-aarch64", abi="cpython-311-aarch64-gnu"
    )
    arm.start()
    try:
        wait_for(lambda: p.Command.WELCOME in arm.got, 10, "the fake worker's WELCOME")
        with packages.executor() as ex:
            with pytest.raises(fade.IncompatibleWorkerError) as caught:
                ex.submit(getattr, pkg, "X").result(timeout=30)
            message = str(caught.value)
            assert "compiled packages" in message and "host h3" in message
            assert f"client CPython 3.{sys.version_info[1]} {sysconfig.get_platform()}" in message
            assert "linux-aarch64" in message
            assert p.Command.TASK not in arm.got
            packages.worker()  # a worker of the client's platform: the compiled task runs
            wait_for(lambda: len(query(packages.pool.address)["workers"]) == 2, 30, "2 workers")
            assert ex.submit(getattr, pkg, "X").result(timeout=60) == 3
            assert p.Command.TASK not in arm.got
    finally:
        arm.stopping.set()
        arm.join(timeout=10)


# -- an environment process that dies, and what fade-status shows ---------------------------------------


def test_an_environment_process_killed_by_its_task_counts_as_a_lost_worker(
    packages: PackagePool, site: Site
) -> None:
    name = _unique("fadecrash")
    site.add(
        f"{name}-dist",
        "1.0",
        {
            f"{name}/__init__.py": "import os, signal\ndef die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        },
    )
    pkg = site.module(name)
    packages.worker()
    packages.pool.wait_workers(1)
    with packages.executor(max_attempts=1) as ex:
        with pytest.raises(fade.WorkerLostError, match="killed by SIGKILL"):
            ex.submit(pkg.die).result(timeout=60)  # type: ignore[attr-defined]
        packages.pool.wait_workers(1)  # replaced by its supervisor
        assert ex.submit(tasks.add, 1, 2).result(timeout=60) == 3


def test_fade_status_shows_each_workers_environments_and_cache(
    packages: PackagePool, site: Site
) -> None:
    name = _unique("fadeshown")
    site.add(f"{name}-dist", "4.2", {f"{name}/__init__.py": "X = 1\n"})
    pkg = site.module(name)
    packages.worker()
    packages.pool.wait_workers(1)
    with packages.executor() as ex:
        assert ex.submit(getattr, pkg, "X").result(timeout=60) == 1
        env_id = next(iter(ex._packages._environments)).hex()[:12]  # type: ignore[union-attr]

        def shown() -> str:
            return format_status(query(packages.pool.address))

        wait_for(lambda: "process" in shown(), 30, "the report of the environment process")
        text = shown()
    row = next(line for line in text.splitlines() if env_id in line)
    assert f"{name}-dist 4.2" in row and "process" in row
    cache_row = next(
        line
        for line in text.splitlines()
        if line.startswith(socket.gethostname()) and "MiB" in line
    )
    assert f"{name}-dist 4.2" in cache_row


# -- the client's description, without processes ------------------------------------------------------


def test_what_the_client_describes_for_a_call(site: Site) -> None:
    name, lazy = _unique("fadedesc"), _unique("fadelazy")
    site.add(f"{name}-dist", "1.0", {f"{name}/__init__.py": "def f(x):\n    return x\n"})
    site.add(f"{lazy}-dist", "1.0", {f"{lazy}/__init__.py": "Z = 1\n"})
    pkg = site.module(name)
    tracker = InstalledPackages()

    def described(fn: Callable[..., object], *args: object) -> list[str]:
        payload, _ = ser.dumps_tracked_call(fn, args, {}, b"", tracker.environment)
        env_id = ser.environment_of(payload)
        env = tracker._environments.get(env_id)
        return [d.name for d in env.distributions] if env else []

    assert described(tasks.add, 1, 2) == []
    assert described(pkg.f, 1) == [f"{name}-dist"]  # type: ignore[attr-defined]
    assert described(tasks.identity, pkg) == [f"{name}-dist"]  # a module as an argument
    code = f"lambda: __import__('os') and None\ndef g():\n    import {lazy}\n    return {lazy}.Z\n"
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(code, "<test>", "exec"), namespace)
    assert described(namespace["g"]) == [f"{lazy}-dist"]  # an import inside a function body
    import numpy

    assert "numpy" in described(tasks.identity, numpy.arange(3))
    assert described(tasks.identity, [1, "x", {"a": 2.0}]) == []
    assert described(tasks.identity, zmq) == []  # fade, pyzmq and cloudpickle never travel


def test_the_content_id_ignores_what_the_installer_adds() -> None:
    record = textwrap.dedent(
        """\
        pkg/__init__.py,sha256=abc,10
        pkg/__pycache__/__init__.cpython-311.pyc,,
        pkg-1.0.dist-info/METADATA,sha256=def,20
        pkg-1.0.dist-info/INSTALLER,sha256=ghi,4
        pkg-1.0.dist-info/direct_url.json,sha256=jkl,40
        pkg-1.0.dist-info/RECORD,,
        ../../../bin/pkg-tool,sha256=mno,99
        """
    )
    entries, problem = record_entries(record, "pkg-1.0.dist-info")
    assert problem == "" and entries == [
        ("pkg/__init__.py", "sha256=abc", 10),
        ("pkg-1.0.dist-info/METADATA", "sha256=def", 20),
    ]
    elsewhere = record.replace("sha256=ghi,4", "sha256=zzz,9").replace("mno,99", "qqq,77")
    assert content_id(record_entries(elsewhere, "pkg-1.0.dist-info")[0]) == content_id(entries)
    _, problem = record_entries("pkg/a.py,,\n", "pkg-1.0.dist-info")
    assert "without a usable hash" in problem
    with pytest.raises(ValueError):
        Distribution.from_dict(
            {
                "name": "../x",
                "version": "1",
                "id": "0" * 32,
                "native": False,
                "size": 1,
                "problem": "",
            }
        )


def test_a_tree_a_task_uses_is_never_evicted_and_dead_downloads_are_cleared(
    site: Site, tmp_path: Path
) -> None:
    """The cache on its own, served by a client's InstalledPackages: no processes."""
    names = []
    for letter in "abc":
        name = _unique(f"fadeuse{letter}")
        files = {f"{name}/__init__.py": "X = 1\n", f"{name}/blob.bin": os.urandom(2**20)}
        site.add(f"{name}-dist", "1.0", files)
        names.append(f"{name}-dist")
    client = InstalledPackages(names)
    env = next(iter(client._environments.values()))
    a, b, c = sorted(env.distributions, key=lambda d: names.index(d.name))

    def ask(request: dict[str, object]) -> list[bytes]:
        status, frames = client.serve(request)
        assert status is p.CodeStatus.OK, frames
        return frames

    cache = PackageCache(str(tmp_path / "cache"), max_bytes=int(2.5 * 2**20))
    dead = Path(cache.dists) / f".staging-{a.id}-deadbeef"
    (dead / "half").mkdir(parents=True)  # what a download that died leaves
    cache.provide(a, ask)
    assert not dead.exists() and cache.check(a) == []
    cache.provide(b, ask)
    with cache.using([a.id]) as present:  # a task runs with a (the least recently used)
        assert present
        os.utime(cache.tree(a.id), (0, 0))  # and make it the oldest by far
        cache.provide(c, ask)
    assert {d.id for d in cache.listing()} == {a.id, c.id}  # b went, not a
    with cache.using([b.id]) as present:
        assert not present  # evicted: its environment process would be replaced
