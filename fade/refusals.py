"""What the scheduler tells a client about a task it refuses or loses: the texts, each
naming both sides and what to do, and the report of a lost task.

Separate from fade/scheduler.py, which decides *that* a task is refused (and is read
for its decisions): these are the words, which only change for the people reading
them. Every function returns the text (or payload) and decides nothing.
"""

from __future__ import annotations

import collections
import json

from fade import protocol as p
from fade.peers import Client, Task, Worker, WorkerClass

__all__ = [
    "incompatible",
    "lost_report",
    "nested_deadlock",
    "over_quota",
    "result_too_large",
    "too_large",
    "unsatisfiable",
]


def lost_report(task: Task, worker: Worker, reason: str) -> p.Payload:
    report = {
        "attempts": task.losses,
        "worker": p.short_id(worker.identity),
        "host": worker.hello.host,
        "pid": worker.hello.pid,
        "exitcode": worker.exit.get("exitcode"),
        "signal": worker.exit.get("signal"),
        "reason": reason,
    }
    return p.Payload(json.dumps(report).encode())


def incompatible(
    client: Client, kinds: dict[WorkerClass, collections.Counter[str]], native: bool = False
) -> str:
    """Why no worker can run a task, naming both sides: "client CPython 3.12 linux-x86_64
    on host a; workers: CPython 3.11 linux-x86_64 on host h3"."""
    me = f"client {_python_name(client.python)} {_platform_name(client.platform)}"
    me += f" on host {client.hello.host}"
    sides: dict[str, collections.Counter[str]] = {}
    for kind, hosts in kinds.items():
        sides.setdefault(
            f"{_python_name(kind.python)} {_platform_name(kind.platform)}", collections.Counter()
        ).update(hosts)
    workers = "; ".join(
        f"{side} on "
        + ", ".join(f"host {h}" for h in sorted(hosts)[:3])
        + (f" and {len(hosts) - 3} more hosts" if len(hosts) > 3 else "")
        for side, hosts in sorted(sides.items())
    )
    if native:
        return (
            f"no connected worker can run this task: it needs compiled packages of the "
            f"client's ({me}), and the workers that serve it are of another platform or ABI "
            f"(workers: {workers}); start workers on the client's platform, or install those "
            "packages on the workers and leave them out with fade.Executor(ship_packages=...)"
        )
    if client.python not in {kind.python for kind in kinds}:
        return (
            f"no connected worker can run this task: {me}; workers: {workers}. Start "
            f"workers with {_python_name(client.python)}, or run the client with the "
            "workers' Python"
        )
    who = f"key {client.key_name!r}" if client.key_name else "clients without keys"
    return (
        f"no connected worker serves this client ({who}): the workers of its Python "
        "were started with --serve-clients for other keys"
    )


def _python_name(python: str) -> str:
    """ "cpython 3.12" -> "CPython 3.12" (as people write it)."""
    implementation, _, version = python.partition(" ")
    names = {"cpython": "CPython", "pypy": "PyPy", "graalpy": "GraalPy"}
    return f"{names.get(implementation, implementation)} {version}"


def _platform_name(platform: tuple[str, str]) -> str:
    name, abi = platform
    return f"{name or 'unknown platform'} (ABI {abi or 'unknown'})"


def unsatisfiable(spec: bytes) -> str:
    return (
        f"no connected worker has the resources these tasks ask for ({spec.decode()}): "
        "they wait until one that has them joins (fade-worker --resources)"
    )


def over_quota(client: Client, max_tasks: int, max_bytes: int) -> str:
    return (
        f"this client holds {len(client.tasks)} tasks ({client.held_bytes} bytes) at the "
        f"broker, over its limit of {max_tasks} tasks and "
        f"{max_bytes} bytes (fade-broker --max-client-tasks, "
        "--max-client-bytes): wait for results before submitting more"
    )


def result_too_large(payload: p.Payload, limit: int) -> str:
    return (
        f"the task's result has a {p.largest_part(payload)}-byte frame; this client accepts "
        f"at most {limit} (max_message_size of the Executor): raise it"
    )


def too_large(largest: int, limit: int) -> str:
    return (
        f"the task has a {largest}-byte frame; the workers accept at most {limit} "
        "(their --max-message-size): raise it on the workers"
    )


def nested_deadlock(workers: list[Worker], parent: bool) -> str:
    """Why tasks that wait for tasks of their own pool, on every worker, cannot finish:
    said to the waiting tasks' clients (``parent``) and to the clients inside them."""
    names = ", ".join(f"{p.short_id(w.identity)}@{w.hello.host}:{w.hello.pid}" for w in workers[:3])
    if len(workers) > 3:
        names += f" and {len(workers) - 3} more"
    what = (
        "the task waits for tasks it submitted to this pool, and every worker that could "
        "run those is busy with a task that waits the same way"
        if parent
        else "these tasks cannot start: every worker that could run them is busy with a "
        "task that waits for tasks it submitted to this pool"
    )
    return (
        f"{what} (workers {names}): none can finish, a deadlock. Give the pool more "
        "workers than tasks that wait so, or do not wait in a task for tasks of its "
        "own pool"
    )
