"""What a RESULT means for its future, and the completing of futures.

::

    RESULT record + payload --outcome()--> (True, value) | (False, exception) --deliver()--> Future

* ``outcome`` never raises: a result that cannot be unpickled, a refusal, a lost
  worker each become the exception the future fails with, named for what happened
  (a MissingDependencyError also names the distribution this client has the module
  from).
* ``deliver`` runs outside the baton (fade/fastpath.py), so a done-callback may submit.

Separate from fade/clientio.py, which moves messages: this is only what they mean.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Callable
from typing import Any

from fade import errors  # errors.ResultDecodeError, WorkerLostError: imported when met
from fade import protocol as p
from fade import serialization as ser
from fade.errors import (
    FadeError,
    IncompatibleWorkerError,
    MessageTooLargeError,
    MissingDependencyError,
    ProtocolError,
    QuotaExceededError,
    TaskTerminatedError,
)

__all__ = ["Outcome", "deliver", "outcome"]

#: A future and what completes it: (future, True, value) or (future, False, exception).
Outcome = tuple["cf.Future[Any]", bool, Any]


def deliver(ready: list[Outcome]) -> None:
    """Complete the futures whose results came in (outside the baton, so a done-callback
    may submit)."""
    for future, ok, value in ready:
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except cf.InvalidStateError:
            pass  # completed meanwhile (failed with its broken pool, terminated...)
    # Hold no result past its delivery (the loop keeps this list while it sleeps): a
    # result in shared memory keeps its slot from reuse for as long as it is referenced.
    ready.clear()


def outcome(
    status: p.Status, payload: p.Payload, take: Callable[[Any], Any] | None = None
) -> tuple[bool, Any]:
    """What a result record means for its future: (True, value) or (False, exception);
    ``take`` maps what the result has in shared memory."""
    if status is p.Status.OK:
        try:
            return True, ser.loads_value(payload, take)
        except FadeError as exc:
            return False, exc
        except BaseException as exc:  # unpickling ran code that raised SystemExit...
            error = errors.ResultDecodeError(
                f"unpickling the task's result raised {type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            return False, error
    if status is p.Status.RAISED:
        return False, _name_distribution(ser.loads_exception(payload))
    if status is p.Status.LOST:
        return False, _lost_error(payload)
    if status is p.Status.REFUSED:
        return False, _refusal_error(payload)
    return False, ProtocolError(f"unexpected result status {status.name}")


_REFUSALS: dict[str, Callable[[str], FadeError]] = {
    "too_large": MessageTooLargeError,
    "incompatible": IncompatibleWorkerError,
    "terminated": TaskTerminatedError,
    "quota": QuotaExceededError,
}


def _refusal_error(payload: p.Payload) -> FadeError:
    kind, message = p.decode_refusal(payload)
    return _REFUSALS.get(kind, FadeError)(message)


def _name_distribution(exc: BaseException) -> BaseException:
    """Add to a worker's MissingDependencyError the distribution the client has it from
    (unless the worker named it already)."""
    if not isinstance(exc, MissingDependencyError) or not exc.module or exc.distribution:
        return exc
    top = exc.module.partition(".")[0]
    try:
        import importlib.metadata as md

        dists = md.packages_distributions().get(top, [])
    except Exception:  # metadata is advisory; never hide the real error
        dists = []
    if dists:
        versions = ", ".join(f"{d} {_version_of(d)}" for d in dists)
        hint = (
            f"; this client has it from the distribution {versions}: install that on the "
            "workers, or name it in fade.Executor(ship_packages=[...]) to ship it"
        )
    else:
        hint = "; install it on the workers"
    enriched = MissingDependencyError(str(exc) + hint, module=exc.module, host=exc.host)
    enriched.__cause__ = exc.__cause__
    return enriched


def _version_of(distribution: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return "?"


def _lost_error(payload: p.Payload) -> errors.WorkerLostError:
    try:
        info = json.loads(payload.inline)
    except ValueError:
        return errors.WorkerLostError("the task's worker was lost too many times")
    where = f"worker {info.get('worker', '?')} on host {info.get('host')} pid {info.get('pid')}"
    if info.get("signal"):
        where += f", killed by {info['signal']}"
    elif info.get("exitcode") is not None:
        where += f", exit code {info['exitcode']}"
    return errors.WorkerLostError(
        f"the task was attempted {info.get('attempts')} times and lost its worker each time "
        f"(it may crash its worker: a segfault, os._exit, running out of memory); "
        f"last seen: {where} ({info.get('reason')})"
    )
