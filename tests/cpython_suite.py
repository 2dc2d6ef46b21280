"""CPython's own ``test_concurrent_futures``, run against ``fade.Executor``.

::

    python tests/cpython_suite.py [-k PATTERN] [--json FILE] [--suite PATH] [-v]

    the interpreter's suite ──> every class it builds for ProcessPoolExecutor("spawn")
        (test.test_concurrent_futures,    │  ProcessPoolSpawn<Mixin>Test = (<Mixin>, ProcessPoolSpawnMixin, BaseTestCase)
         or Debian's copy for 3.11)       ▼
                                   Fade<Mixin>Test = (<Mixin>, FadeMixin, BaseTestCase)
                                          │  executor_type: an embedded fade.Executor with the
                                          │  max_workers, initializer, initargs and
                                          ▼  max_tasks_per_child the test asks for
                                   unittest runs them; EXCLUDED tests are skipped with their reason

The suite is never copied into this repository: it is loaded at run time from
the interpreter's own ``test`` package (Python 3.13: ``test.test_concurrent_futures``),
or else from Debian's ``libpython3.X-testsuite`` (``/usr/lib/python3.X/test/``,
which is where Python 3.11's single-file ``test_concurrent_futures.py`` comes
from here). Run it under the interpreter whose suite it is, with fade installed.

Which tests run is the suite's own choice: every test class it generates for
``ProcessPoolExecutor`` with the spawn start method is rebuilt with fade in its
place (fade's workers are fresh interpreters, as spawned ones are). Tests that
do not apply to a pool that is not ``ProcessPoolExecutor`` are listed in
``EXCLUDED`` with the reason, and in docs/conformance.md.

The exit status is 0 when no test failed or errored, 1 when one did, NO_SUITE
when this interpreter has no test_concurrent_futures; ``--json`` writes the counts,
the outcome of every test, and the tracebacks of those that failed.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import unittest
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fade

#: Exit status when this interpreter's test_concurrent_futures cannot be found.
NO_SUITE = 2

#: Reasons a test does not apply, by the name of the suite's class that holds it
#: (the mixin before fade replaces the executor) and the test's name.
PRIVATE = "reads ProcessPoolExecutor's private attributes ({})"
SHARED = (
    "shares a multiprocessing {} with the task, which only the standard pool's own children can use"
)
CHILD = (
    "runs a child interpreter that imports the executor by name from concurrent.futures "
    "(`from concurrent.futures import {executor_type}`); fade's behaviour at interpreter exit "
    "is tested in tests/test_behaviour.py instead"
)
STDLIB = (
    "constructs concurrent.futures.ProcessPoolExecutor itself and reads its private attributes ({})"
)

EXCLUDED: dict[tuple[str, str], str] = {
    # ProcessPoolExecutor's private attributes.
    ("ProcessPoolExecutorTest", "test_killed_child"): PRIVATE.format("_processes"),
    ("ProcessPoolExecutorTest", "test_saturation"): PRIVATE.format("_processes")
    + "; "
    + SHARED.format("Semaphore"),
    ("ProcessPoolExecutorTest", "test_idle_process_reuse_one"): PRIVATE.format("_processes"),
    ("ProcessPoolExecutorTest", "test_idle_process_reuse_multiple"): PRIVATE.format("_processes"),
    ("ProcessPoolExecutorTest", "test_max_tasks_per_child"): PRIVATE.format("_processes")
    + "; tests/test_behaviour.py checks the same through the workers' process ids",
    ("ProcessPoolExecutorTest", "test_max_tasks_per_child_defaults_to_spawn_context"): (
        PRIVATE.format("_mp_context")
    ),
    ("ProcessPoolExecutorTest", "test_traceback"): (
        "asserts that the remote traceback's type is concurrent.futures.process._RemoteTraceback, "
        "a private class of the standard pool; fade's is fade.RemoteTraceback, with the same "
        "`tb` text and printing (tests/test_behaviour.py checks both)"
    ),
    ("ProcessPoolExecutorTest", "test_python_finalization_error"): (
        "patches threading's private _start_joinable_thread to fail ProcessPoolExecutor's "
        "second thread (its queue feeder thread): written against that pool's threads"
    ),
    ("ProcessPoolShutdownTest", "test_processes_terminate"): PRIVATE.format("_processes")
    + "; "
    + SHARED.format("Semaphore"),
    ("ProcessPoolShutdownTest", "test_context_manager_shutdown"): STDLIB.format("_processes"),
    ("ProcessPoolShutdownTest", "test_del_shutdown"): STDLIB.format(
        "_processes, _call_queue, _executor_manager_thread"
    ),
    ("ProcessPoolShutdownTest", "test_shutdown_no_wait"): STDLIB.format(
        "_processes, _call_queue, _executor_manager_thread"
    ),
    ("ExecutorDeadlockTest", "test_shutdown_deadlock_pickle"): PRIVATE.format(
        "_executor_manager_thread"
    ),
    ("ExecutorDeadlockTest", "test_gh105829_should_not_deadlock_if_wakeup_pipe_full"): (
        "patches ProcessPoolExecutor's private _ExecutorManagerThread and _ThreadWakeup; "
        "with fade the patches change nothing, so it would pass without testing anything"
    ),
    # Child interpreters that import the executor from concurrent.futures by name.
    ("ExecutorShutdownTest", "test_interpreter_shutdown"): CHILD,
    ("ExecutorShutdownTest", "test_submit_after_interpreter_shutdown"): CHILD,
    ("ExecutorShutdownTest", "test_hang_gh83386"): CHILD,
    # Multiprocessing managers shared with a task.
    ("ProcessPoolExecutorTest", "test_ressources_gced_in_workers"): SHARED.format("Manager"),
}


# -- finding the suite -------------------------------------------------------------------------


class NoSuiteError(Exception):
    """This interpreter has no test_concurrent_futures to run."""


def _debian_suite() -> Path | None:
    """Debian's libpython3.X-testsuite: /usr/lib/python3.X/test/test_concurrent_futures[.py]."""
    root = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/test")
    for candidate in (root / "test_concurrent_futures", root / "test_concurrent_futures.py"):
        if candidate.exists():
            return candidate
    return None


def find_suite(path: Path | None) -> Path | None:
    """Where the suite is: ``path`` if given; None for the interpreter's own test package;
    else Debian's copy. Raises NoSuiteError."""
    if path is not None:
        return path
    if importlib.util.find_spec("test.test_concurrent_futures") is not None:
        return None
    found = _debian_suite()
    if found is None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise NoSuiteError(
            f"no test_concurrent_futures for Python {sys.version.split()[0]}: not in its own "
            f"test package, nor in /usr/lib/python{version}/test (on Debian: apt-get install "
            f"libpython{version}-testsuite); or give --suite PATH"
        )
    return found


def load_suite(path: Path | None) -> list[Any]:
    """The suite's modules: the interpreter's own (``path`` None), or the one at ``path``."""
    if path is None:
        package = importlib.import_module("test.test_concurrent_futures")
        return _modules_of(package, "test.test_concurrent_futures")
    # Import it as test_concurrent_futures from a folder of our own that links to it, so
    # that the worker processes can import it too (they inherit this PYTHONPATH).
    folder = Path(tempfile.mkdtemp(prefix="fade-cpython-suite-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / path.name).symlink_to(path.resolve(), target_is_directory=path.is_dir())
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p
    )
    module = importlib.import_module("test_concurrent_futures")
    return _modules_of(module, "test_concurrent_futures")


def _modules_of(module: Any, name: str) -> list[Any]:
    if not hasattr(module, "__path__"):
        return [module]  # Python 3.11: one file
    found = []
    for entry in sorted(Path(module.__path__[0]).glob("test_*.py")):
        found.append(importlib.import_module(f"{name}.{entry.stem}"))
    return found


# -- fade in place of ProcessPoolExecutor ------------------------------------------------------


def fade_executor(
    max_workers: int | None = None,
    mp_context: Any = None,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
    *,
    max_tasks_per_child: int | None = None,
) -> fade.Executor:
    """ProcessPoolExecutor's signature, an embedded fade pool behind it. ``mp_context`` is
    ignored: fade's workers are always fresh interpreters, as with "spawn"."""
    kwargs: dict[str, Any] = {}
    if initializer is not None:
        kwargs.update(initializer=initializer, initargs=initargs)
    if max_tasks_per_child is not None:
        kwargs["max_tasks_per_child"] = max_tasks_per_child
    return fade.Executor(max_workers=max_workers, **kwargs)


def _fade_mixin(executor_mixin: type) -> type:
    """The suite's ExecutorMixin with fade as ``executor_type``. No ``ctx``: the tests then
    build the executor with no ``mp_context``, as for a pool that is not multiprocessing's."""

    def get_context(self: Any) -> Any:
        return multiprocessing.get_context("spawn")

    return type(
        "FadeMixin",
        (executor_mixin,),
        {"executor_type": staticmethod(fade_executor), "get_context": get_context},
    )


def fade_classes(modules: list[Any]) -> Iterator[type]:
    """Each test class the suite builds for ProcessPoolExecutor with "spawn", rebuilt with
    fade, the tests that do not apply marked skipped with their reason."""
    spawn = _spawn_mixin(modules)
    fade_mixin = _fade_mixin(spawn.__mro__[1])  # the suite's ExecutorMixin
    built: dict[str, type] = {}
    for module in modules:
        for name, cls in sorted(vars(module).items()):
            if not isinstance(cls, type) or spawn not in cls.__bases__:
                continue
            fade_name = "Fade" + name.removeprefix("ProcessPoolSpawn")
            if fade_name in built:
                continue  # the same class, imported into another module
            bases = tuple(fade_mixin if b is spawn else b for b in cls.__bases__)
            built[fade_name] = type(fade_name, bases, {"__module__": __name__})
            _exclude(built[fade_name], mixin=cls.__bases__[0])
    return iter(built.values())


def _spawn_mixin(modules: list[Any]) -> type:
    """The suite's ProcessPoolSpawnMixin (Python 3.12+: in its util module)."""
    for module in modules:
        for holder in (module, sys.modules.get(module.__name__.rpartition(".")[0] + ".util")):
            spawn = getattr(holder, "ProcessPoolSpawnMixin", None)
            if isinstance(spawn, type):
                return spawn
    raise NoSuiteError("the suite has no ProcessPoolSpawnMixin: an unknown layout")


def _exclude(cls: type, mixin: type) -> None:
    for klass in mixin.__mro__:
        for (holder, test), reason in EXCLUDED.items():
            if klass.__name__ == holder and hasattr(cls, test):
                skip = unittest.skip(f"excluded: {reason}")
                setattr(cls, test, skip(getattr(cls, test)))


# -- running -------------------------------------------------------------------------------------


class _Result(unittest.TextTestResult):
    """Also keeps every test's outcome, for the counts and --json."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.durations: dict[str, float] = {}

    def startTest(self, test: unittest.TestCase) -> None:
        self.started[test.id()] = time.monotonic()
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        self.durations[test.id()] = time.monotonic() - self.started.pop(test.id(), 0.0)
        self.outcomes.setdefault(test.id(), "passed")
        super().stopTest(test)

    def addError(self, test: Any, err: Any) -> None:
        self.outcomes[test.id()] = "error"
        super().addError(test, err)

    def addFailure(self, test: Any, err: Any) -> None:
        self.outcomes[test.id()] = "failed"
        super().addFailure(test, err)

    def addSkip(self, test: Any, reason: str) -> None:
        self.outcomes[test.id()] = "excluded" if _is_excluded(reason) else "skipped"
        super().addSkip(test, reason)

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        self.outcomes[test.id()] = "expected failure"
        super().addExpectedFailure(test, err)

    def addUnexpectedSuccess(self, test: Any) -> None:
        self.outcomes[test.id()] = "unexpected success"
        super().addUnexpectedSuccess(test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-k", dest="patterns", action="append", default=[], help="only tests whose id has this"
    )
    parser.add_argument("--suite", type=Path, help="the test_concurrent_futures[.py] to load")
    parser.add_argument("--json", type=Path, help="write the counts and outcomes here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        where = find_suite(args.suite)
    except NoSuiteError as exc:
        print(exc, file=sys.stderr)
        return NO_SUITE
    modules = load_suite(where)
    origin = str(where.resolve()) if where is not None else str(Path(modules[0].__file__).parent)

    suite = unittest.TestSuite()
    for cls in fade_classes(modules):
        for name in unittest.defaultTestLoader.getTestCaseNames(cls):
            test = cls(name)
            if not args.patterns or any(p in test.id() for p in args.patterns):
                suite.addTest(test)
    runner = unittest.TextTestRunner(
        resultclass=_Result, verbosity=2 if args.verbose else 1, stream=sys.stderr
    )
    started = time.monotonic()
    result = runner.run(suite)
    elapsed = time.monotonic() - started
    assert isinstance(result, _Result)
    report = _report(result, origin, elapsed)
    _print(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if result.wasSuccessful() else 1


def _report(result: _Result, origin: str, elapsed: float) -> dict[str, Any]:
    counts = Counter(result.outcomes.values())
    known = ("passed", "failed", "error", "skipped", "excluded")
    excluded = Counter(r.removeprefix("excluded: ") for _, r in result.skipped if _is_excluded(r))
    return {
        "python": sys.version.split()[0],
        "fade": fade.__version__,
        "suite": origin,
        "seconds": round(elapsed, 1),
        "tests": len(result.outcomes),
        "counts": {
            **{outcome: counts.get(outcome, 0) for outcome in known},
            "other": sum(n for outcome, n in counts.items() if outcome not in known),
        },
        "excluded_reasons": dict(excluded),
        "skip_reasons": dict(Counter(r for _, r in result.skipped if not _is_excluded(r))),
        "outcomes": result.outcomes,
        "problems": {test.id(): tb for test, tb in [*result.failures, *result.errors]},
        "durations": {test: round(d, 2) for test, d in result.durations.items()},
    }


def _is_excluded(reason: str) -> bool:
    return reason.startswith("excluded: ")


def _print(report: dict[str, Any]) -> None:
    print(f"\nCPython {report['python']}'s test_concurrent_futures against fade {report['fade']}")
    print(f"  suite    : {report['suite']}")
    print(f"  tests    : {report['tests']} in {report['seconds']:.0f} s")
    reasons = {"excluded": report["excluded_reasons"], "skipped": report["skip_reasons"]}
    for outcome, n in report["counts"].items():
        print(f"  {outcome:9}: {n}")
        for reason, count in sorted(reasons.get(outcome, {}).items()):
            print(f"    {count:3} x {reason}")


if __name__ == "__main__":
    sys.exit(main())
