"""The scheduler and the lifecycle tables as plain data: no sockets, no processes.

Every test drives :class:`fade.scheduler.Scheduler` through method calls and checks
what it decided to send (:class:`fade.scheduler.Sends`); the whole file runs in well
under two seconds.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from fade import protocol as p
from fade.lifecycle import (
    PROCESS_MOVES,
    TASK_MOVES,
    IllegalTransition,
    ProcessState,
    TaskState,
    move,
)
from fade.scheduler import Refusal, Scheduler, Sends

pytestmark = pytest.mark.timeout(10)

_ids = itertools.count(1)


LINUX = ("linux-x86_64", "cpython-311-x86_64-linux-gnu")
ARM = ("linux-aarch64", "cpython-311-aarch64-linux-gnu")


def client_hello(
    python: str = "3.11.7",
    tag: bytes | None = None,
    limit: int = 0,
    platform: tuple[str, str] = LINUX,
) -> p.ClientHello:
    return p.ClientHello(
        host="c",
        pid=1,
        version="0",
        python=python,
        implementation="cpython",
        tag=tag or next(_ids).to_bytes(p.TAG_SIZE, "little"),
        max_message_size=limit,
        platform=platform[0],
        abi=platform[1],
    )


def worker_hello(
    credits: int = 1,
    python: str = "3.11.2",
    holding: tuple[bytes, ...] = (),
    limit: int = 0,
    clients: tuple[str, ...] | None = None,
    platform: tuple[str, str] = LINUX,
    host: str = "w",
) -> p.WorkerHello:
    return p.WorkerHello(
        host=host,
        pid=2,
        version="0",
        python=python,
        implementation="cpython",
        credits=credits,
        holding=holding,
        max_message_size=limit,
        clients=clients,
        platform=platform[0],
        abi=platform[1],
    )


def records(
    *task_ids: int, size: int = 10, flags: int = 0
) -> list[tuple[p.SubmitRecord, p.Payload]]:
    return [(p.SubmitRecord(i, 0, 0.0, flags=flags), p.Payload(b"x" * size)) for i in task_ids]


def sent(sends: Sends) -> dict[bytes, list[int]]:
    """Task ids sent to each worker."""
    return {w: [t.task_id for t in tasks] for w, tasks in sends.tasks.items()}


def results(sends: Sends, client: bytes) -> dict[int, p.Status]:
    return {r.task_id: r.status for r, _ in sends.results.get(client, [])}


def ok(sched: Scheduler, worker: bytes, client: bytes, *task_ids: int, credits: int = 1) -> None:
    tag = sched.clients[client].hello.tag
    done = [(p.DoneRecord(p.task_key(tag, i), p.Status.OK), p.Payload(b"v")) for i in task_ids]
    sched.done(worker, done)
    sched.grant(worker, credits)


@pytest.fixture
def sched() -> Scheduler:
    return Scheduler(max_attempts=3)


# -- lifecycles ------------------------------------------------------------------------------


class Record:
    def __init__(self, state: TaskState | ProcessState) -> None:
        self.state = state


def test_task_table_allows_the_documented_moves_only() -> None:
    legal = {
        (TaskState.QUEUED, TaskState.RUNNING),
        (TaskState.QUEUED, TaskState.FAILED),
        (TaskState.QUEUED, TaskState.DROPPED),
        (TaskState.RUNNING, TaskState.QUEUED),
        (TaskState.RUNNING, TaskState.DONE),
        (TaskState.RUNNING, TaskState.FAILED),
        (TaskState.RUNNING, TaskState.LOST),
        (TaskState.RUNNING, TaskState.DROPPED),
    }
    for old, new in itertools.product(TaskState, TaskState):
        record = Record(old)
        if (old, new) in legal:
            move(record, new, TASK_MOVES)
            assert record.state is new
        else:
            with pytest.raises(IllegalTransition):
                move(record, new, TASK_MOVES)
            assert record.state is old


def test_process_table_goes_serving_draining_leaving() -> None:
    record = Record(ProcessState.SERVING)
    move(record, ProcessState.DRAINING, PROCESS_MOVES)
    with pytest.raises(IllegalTransition):
        move(record, ProcessState.SERVING, PROCESS_MOVES)
    move(record, ProcessState.LEAVING, PROCESS_MOVES)
    with pytest.raises(IllegalTransition):
        move(record, ProcessState.DRAINING, PROCESS_MOVES)
    move(Record(ProcessState.SERVING), ProcessState.LEAVING, PROCESS_MOVES)  # second signal


# -- dispatch ----------------------------------------------------------------------------------


def test_tasks_go_only_against_credits(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=2), None)
    sched.take_sends()
    sched.submit(b"C1", records(1, 2, 3, 4))
    assert sent(sched.take_sends()) == {b"W1": [1, 2]}
    assert sched.workers[b"W1"].credits == 0
    ok(sched, b"W1", b"C1", 1)
    sends = sched.take_sends()
    assert results(sends, b"C1") == {1: p.Status.OK} and sent(sends) == {b"W1": [3]}


def test_idle_workers_are_served_before_busy_ones(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=2), None)
    sched.submit(b"C1", records(1))
    assert sent(sched.take_sends()) == {b"W1": [1]}  # W1 now busy, with a credit left
    sched.add_worker(b"W2", worker_hello(credits=1), None)
    sched.submit(b"C1", records(2))
    assert sent(sched.take_sends()) == {b"W2": [2]}  # the idle one, not the busy one
    sched.submit(b"C1", records(3))
    assert sent(sched.take_sends()) == {b"W1": [3]}  # then busy ones with credit


def test_a_lost_workers_tasks_run_again_alone_as_suspects(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=3), None)
    sched.submit(b"C1", records(1, 2, 3))
    assert sent(sched.take_sends()) == {b"W1": [1, 2, 3]}
    sched.add_worker(b"W2", worker_hello(credits=4), None)
    sched.remove_worker(b"W1", lost="killed")
    # Each suspect goes alone to an idle worker: one now, W2 is then isolated.
    assert sent(sched.take_sends()) == {b"W2": [1]}
    worker = sched.workers[b"W2"]
    assert worker.isolated and worker.credits == 3
    sched.submit(b"C1", records(4))
    assert sent(sched.take_sends()) == {}  # not even a new task joins a suspect
    ok(sched, b"W2", b"C1", 1, credits=1)
    assert sent(sched.take_sends()) == {b"W2": [2]}
    assert [sched.tasks[k].losses for k in sched.tasks if sched.tasks[k].task_id in (2, 3)] == [
        1,
        1,
    ]


def test_a_task_that_keeps_killing_workers_is_lost(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    for n in range(3):
        worker = b"W%d" % n
        sched.add_worker(worker, worker_hello(), None)
        sched.submit(b"C1", records(1))  # a re-send is skipped; the suspect is dispatched
        assert sent(sched.take_sends()) == {worker: [1]}
        sched.remove_worker(worker, lost="segfault")
    sends = sched.take_sends()
    assert results(sends, b"C1") == {1: p.Status.LOST}
    report = sends.results[b"C1"][0][1].inline
    assert b'"attempts": 3' in report and b"segfault" in report
    assert sched.counts.lost == 1 and not sched.tasks


def test_a_worker_that_leaves_hands_back_without_a_loss(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=2), None)
    sched.submit(b"C1", records(1, 2))
    sched.take_sends()
    sched.drain(b"W1")
    sched.add_worker(b"W2", worker_hello(credits=2), None)
    sched.remove_worker(b"W1")
    assert sent(sched.take_sends()) == {b"W2": [1, 2]}
    assert all(task.losses == 0 for task in sched.tasks.values())


def test_draining_workers_get_nothing_and_count_no_capacity(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=2), None)
    capacity = sched.capacity
    sched.drain(b"W1")
    assert sched.capacity == capacity - 3
    sched.submit(b"C1", records(1))
    assert sent(sched.take_sends()) == {}


def test_returned_tasks_go_back_to_the_head_of_the_line(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=2), None)
    sched.submit(b"C1", records(1, 2, 3))
    sched.take_sends()
    tag = sched.clients[b"C1"].hello.tag
    back = [(p.DoneRecord(p.task_key(tag, 2), p.Status.RETURNED), p.Payload(b""))]
    assert sched.done(b"W1", back) == 1
    sched.grant(b"W1", 1)
    assert sent(sched.take_sends()) == {b"W1": [2]}


def test_a_client_that_leaves_drops_its_tasks(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=1), None)
    sched.submit(b"C1", records(1, 2, 3))
    sched.take_sends()
    key = p.task_key(sched.clients[b"C1"].hello.tag, 1)
    running = sched.remove_client(b"C1")
    assert [t.task_id for t in running] == [1]
    assert not sched.tasks and sched.workers[b"W1"].tasks == {}
    sched.add_client(b"C2", client_hello(), None)
    sched.submit(b"C2", records(9))
    assert sent(sched.take_sends()) == {}  # W1 still runs the dropped task: no credit
    sched.done(b"W1", [(p.DoneRecord(key, p.Status.OK), p.Payload(b"v"))])  # dropped...
    sched.grant(b"W1", 1)  # ... but its credit counts
    assert sent(sched.take_sends()) == {b"W1": [9]}


def test_clients_take_turns(sched: Scheduler) -> None:
    """With tasks of equal length, fair share by time is taking turns."""
    now = [0.0]
    sched.clock = lambda: now[0]
    sched.add_client(b"C1", client_hello(), None)
    sched.add_client(b"C2", client_hello(), None)
    sched.submit(b"C1", records(1, 2, 3))
    sched.submit(b"C2", records(1, 2, 3))
    sched.add_worker(b"W1", worker_hello(credits=1), None)
    order = []
    for _ in range(6):
        (_worker, tasks), = sched.take_sends().tasks.items()  # fmt: skip
        order.append(tasks[0].client.identity)
        now[0] += 1.0
        ok(sched, b"W1", tasks[0].client.identity, tasks[0].task_id)
    assert order == [b"C1", b"C2"] * 3


# -- who may do what ---------------------------------------------------------------------------


def test_only_the_assigned_worker_completes_a_task(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(), None)
    sched.add_worker(b"W2", worker_hello(), None)
    sched.submit(b"C1", records(1))
    (owner,) = sched.take_sends().tasks
    other = b"W2" if owner == b"W1" else b"W1"
    ok(sched, other, b"C1", 1)
    assert results(sched.take_sends(), b"C1") == {}  # refused: not its task
    ok(sched, owner, b"C1", 1)
    assert results(sched.take_sends(), b"C1") == {1: p.Status.OK}


def test_a_client_tag_belongs_to_the_client_that_said_it_first(sched: Scheduler) -> None:
    hello = client_hello()
    sched.add_client(b"C1", hello, None)
    with pytest.raises(Refusal):
        sched.add_client(b"C2", hello, None)
    sched.add_client(b"C1", hello, None)  # the same client again: fine
    sched.remove_client(b"C1")
    sched.add_client(b"C2", hello, None)  # free once its owner left


def test_tasks_no_connected_worker_could_run_are_refused_at_once(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(python="3.12.1"), None)
    sched.submit(b"C1", records(1))  # no worker yet: it waits
    assert not sched.take_sends().results
    sched.add_worker(b"W1", worker_hello(python="3.11.2"), None)
    sched.submit(b"C1", records(2))
    sends = sched.take_sends()
    assert results(sends, b"C1") == {2: p.Status.REFUSED} and not sends.tasks
    kind, message = p.decode_refusal(sends.results[b"C1"][0][1])
    assert kind == "incompatible"
    assert "client CPython 3.12" in message and "on host c" in message
    assert "workers: CPython 3.11" in message and "on host w" in message


def test_tasks_needing_compiled_packages_go_only_to_the_clients_platform(
    sched: Scheduler,
) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"ARM", worker_hello(credits=4, platform=ARM, host="h3"), None)
    sched.submit(b"C1", records(1))  # pure Python: any platform of its Python runs it
    assert sent(sched.take_sends()) == {b"ARM": [1]}
    sched.submit(b"C1", records(2, flags=p.SUBMIT_NATIVE))  # compiled: refused at once
    sends = sched.take_sends()
    assert results(sends, b"C1") == {2: p.Status.REFUSED} and not sends.tasks
    kind, message = p.decode_refusal(sends.results[b"C1"][0][1])
    assert kind == "incompatible" and "compiled packages" in message
    assert "client CPython 3.11 linux-x86_64" in message and "on host c" in message
    assert "CPython 3.11 linux-aarch64" in message and "on host h3" in message
    sched.add_worker(b"X86", worker_hello(credits=4, host="h4"), None)
    sched.submit(b"C1", records(3, 4, flags=p.SUBMIT_NATIVE))
    assert sent(sched.take_sends()) == {b"X86": [3, 4]}  # never the ARM worker


def test_a_worker_leaving_takes_its_host_out_of_refusals(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(python="3.12.1"), None)
    sched.add_worker(b"W1", worker_hello(host="gone"), None)
    sched.add_worker(b"W2", worker_hello(host="here"), None)
    sched.remove_worker(b"W1")
    sched.submit(b"C1", records(1))
    _, message = p.decode_refusal(sched.take_sends().results[b"C1"][0][1])
    assert "host here" in message and "gone" not in message


def test_workers_take_only_what_fits_their_frame_limit(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"SMALL", worker_hello(credits=4, limit=2000), None)
    sched.add_worker(b"BIG", worker_hello(credits=4), None)
    sched.submit(b"C1", records(1, size=5000))
    assert sent(sched.take_sends()) == {b"BIG": [1]}
    sched.remove_worker(b"BIG")
    sched.take_sends()
    sched.submit(b"C1", records(2, size=5000))
    sends = sched.take_sends()
    kind, _ = p.decode_refusal(sends.results[b"C1"][-1][1])
    assert kind == "too_large"


def test_a_result_too_large_for_its_client_fails_instead(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(limit=1000), None)
    sched.add_worker(b"W1", worker_hello(), None)
    sched.submit(b"C1", records(1))
    sched.take_sends()
    key = p.task_key(sched.clients[b"C1"].hello.tag, 1)
    sched.done(b"W1", [(p.DoneRecord(key, p.Status.OK), p.Payload(b"v" * 5000))])
    (record, payload), = sched.take_sends().results[b"C1"]  # fmt: skip
    assert record.status is p.Status.REFUSED
    assert p.decode_refusal(payload)[0] == "too_large"


def test_workers_serve_only_the_clients_they_name(sched: Scheduler) -> None:
    sched.add_client(b"A", client_hello(), "alice")
    sched.add_client(b"B", client_hello(), "bob")
    sched.add_worker(b"W1", worker_hello(credits=4, clients=("alice",)), None)
    sched.submit(b"B", records(1))
    assert results(sched.take_sends(), b"B") == {1: p.Status.REFUSED}
    sched.submit(b"A", records(1))
    assert sent(sched.take_sends()) == {b"W1": [1]}
    sched.add_worker(b"W2", worker_hello(credits=4), None)
    sched.submit(b"B", records(2))
    assert sent(sched.take_sends()) == {b"W2": [2]}


# -- reconnections and a new broker --------------------------------------------------------


def test_a_repeated_hello_requeues_what_the_worker_no_longer_holds(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=2), None)
    sched.submit(b"C1", records(1, 2))
    sched.take_sends()
    held = p.task_key(sched.clients[b"C1"].hello.tag, 1)
    sched.add_worker(b"W1", worker_hello(credits=1, holding=(held,)), None)
    assert sent(sched.take_sends()) == {b"W1": [2]}  # 2 was lost in flight: sent again
    assert sched.tasks[held].worker is sched.workers[b"W1"]


def test_tasks_a_worker_holds_are_its_own_again_under_a_new_broker(sched: Scheduler) -> None:
    """A fresh broker learns what workers hold from their HELLO; when the client re-sends
    those tasks they stay with their worker instead of running twice."""
    hello = client_hello()
    key = p.task_key(hello.tag, 7)
    sched.add_worker(b"W1", worker_hello(credits=0, holding=(key,)), None)
    sched.add_worker(b"W2", worker_hello(credits=1), None)
    sched.add_client(b"C1", hello, None)
    sched.submit(b"C1", records(7, 8))
    assert sent(sched.take_sends()) == {b"W2": [8]}
    assert sched.tasks[key].worker is sched.workers[b"W1"]
    ok(sched, b"W1", b"C1", 7)
    assert results(sched.take_sends(), b"C1") == {7: p.Status.OK}


def test_a_held_task_answered_before_its_client_re_sends_it_is_delivered(
    sched: Scheduler,
) -> None:
    """A fresh broker: the worker that holds task 7 finishes it before the client has
    re-sent it. The result waits for the client's copy of the task, which completes at
    once (it used to stay RUNNING on a worker that no longer held it: stuck for good)."""
    hello = client_hello()
    key = p.task_key(hello.tag, 7)
    sched.add_worker(b"W1", worker_hello(credits=1, holding=(key,)), None)
    sched.done(b"W1", [(p.DoneRecord(key, p.Status.OK), p.Payload(b"seven"))])
    sched.add_client(b"C1", hello, None)
    sched.submit(b"C1", records(7, 8))
    sends = sched.take_sends()
    assert sent(sends) == {b"W1": [8]}  # 7 does not run again
    [(record, payload)] = sends.results[b"C1"]
    assert (record.task_id, record.status, payload.inline) == (7, p.Status.OK, b"seven")
    assert key not in sched.tasks


def test_results_kept_for_a_client_are_forgotten_after_two_ageings(sched: Scheduler) -> None:
    hello = client_hello()
    key = p.task_key(hello.tag, 7)
    sched.add_worker(b"W1", worker_hello(credits=1, holding=(key,)), None)
    sched.done(b"W1", [(p.DoneRecord(key, p.Status.OK), p.Payload(b"seven"))])
    sched.age_orphans()
    sched.age_orphans()
    sched.add_client(b"C1", hello, None)
    sched.submit(b"C1", records(7))
    assert sent(sched.take_sends()) == {b"W1": [7]}  # runs again: nothing was kept


def test_an_unknown_result_from_a_worker_that_did_not_hold_it_is_dropped(
    sched: Scheduler,
) -> None:
    hello = client_hello()
    key = p.task_key(hello.tag, 7)
    sched.add_worker(b"W1", worker_hello(credits=1), None)
    sched.done(b"W1", [(p.DoneRecord(key, p.Status.OK), p.Payload(b"forged"))])
    sched.add_client(b"C1", hello, None)
    sched.submit(b"C1", records(7))
    assert sent(sched.take_sends()) == {b"W1": [7]}


def test_capacity_counts_credits_held_tasks_and_one_per_worker(sched: Scheduler) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(credits=3), None)
    assert sched.capacity == 4
    sched.submit(b"C1", records(1, 2))
    assert sched.capacity == 4  # 1 credit + 2 tasks + 1
    assert sched.take_sends().capacity_changed  # a worker joined
    sched.remove_worker(b"W1")
    assert sched.capacity == 0


# -- declines: a worker whose host cannot keep a client's code -------------------------------


def decline(sched: Scheduler, worker: bytes, client: bytes, task_id: int, credits: int = 1) -> None:
    tag = sched.clients[client].hello.tag
    error = p.Payload(b"the code cache is full")
    sched.done(worker, [(p.DoneRecord(p.task_key(tag, task_id), p.Status.DECLINED), error)])
    sched.grant(worker, credits)


def test_a_declined_task_goes_to_another_worker_and_the_decliner_gets_no_more_of_that_client() -> (
    None
):
    now = [100.0]
    sched = Scheduler(clock=lambda: now[0])
    sched.add_client(b"C1", client_hello(), None)
    sched.add_client(b"C2", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(), None)
    sched.add_worker(b"W2", worker_hello(), None)
    sched.submit(b"C1", records(1, 2, 3))
    assert sorted(sent(sched.take_sends()).values()) == [[1], [2]]
    holder = next(w for w in (b"W1", b"W2") if sched.workers[w].tasks)
    other = b"W2" if holder == b"W1" else b"W1"
    first = next(iter(sched.workers[holder].tasks.values())).task_id
    decline(sched, holder, b"C1", first)  # back in line, not failed; none of C1's for it
    sends = sched.take_sends()
    assert results(sends, b"C1") == {} and sent(sends) == {}
    sched.submit(b"C2", records(7))  # another client's task: the decliner takes it
    assert sent(sched.take_sends()) == {holder: [7]}
    ok(sched, other, b"C1", 3 - first)  # the other worker: the declined task next
    assert sent(sched.take_sends()) == {other: [first]}
    ok(sched, holder, b"C2", 7)
    assert sent(sched.take_sends()) == {}  # task 3 waits for the other worker
    now[0] += 61  # the period has passed: the decliner may try again
    sched.expire_declines()
    assert sent(sched.take_sends()) == {holder: [3]}


def test_when_every_worker_declined_a_clients_tasks_they_fail_with_its_error(
    sched: Scheduler,
) -> None:
    sched.add_client(b"C1", client_hello(), None)
    sched.add_client(b"C2", client_hello(), None)
    sched.add_worker(b"W1", worker_hello(), None)
    sched.submit(b"C1", records(1, 2, 3))
    sched.take_sends()
    decline(sched, b"W1", b"C1", 1)
    sends = sched.take_sends()
    raised = p.Status.RAISED
    assert results(sends, b"C1") == {1: raised, 2: raised, 3: raised}  # at once, all
    assert {bytes(pl.inline) for _, pl in sends.results[b"C1"]} == {b"the code cache is full"}
    sched.submit(b"C1", records(4))
    assert results(sched.take_sends(), b"C1") == {4: raised}
    sched.submit(b"C2", records(5))  # the worker serves other clients as before
    assert sent(sched.take_sends()) == {b"W1": [5]}
    sched.add_worker(b"W2", worker_hello(), None)  # a worker that has not declined
    sched.submit(b"C1", records(6))
    assert sent(sched.take_sends()) == {b"W2": [6]}


# -- tasks that wait for tasks of their own pool --------------------------------------------


def test_tasks_waiting_for_their_own_pool_on_every_worker_are_named_a_deadlock() -> None:
    now = [0.0]
    sched = Scheduler(clock=lambda: now[0])
    sched.add_worker(b"W1", worker_hello(host="h"), None)  # pid 2 on host h
    sched.add_client(b"C1", client_hello(), None)
    sched.submit(b"C1", records(1))  # the parent, on W1
    # The client the parent made, in W1's process: its task can go nowhere.
    sched.add_client(b"N1", dataclasses.replace(client_hello(), host="h", pid=2), None)
    sched.submit(b"N1", records(1))
    sched.take_sends()
    sched.check_nested_waits(after=5.0)
    assert not sched.take_sends().notices  # not yet: a worker may be about to come
    now[0] = 6.0
    sched.check_nested_waits(after=5.0)
    notices = sched.take_sends().notices
    assert [ids for _, ids in notices[b"N1"]] == [[1]]
    assert [ids for _, ids in notices[b"C1"]] == [[1]]
    assert "a deadlock" in notices[b"C1"][0][0] and "h:2" in notices[b"C1"][0][0]
    now[0] = 20.0
    sched.check_nested_waits(after=5.0)
    assert not sched.take_sends().notices  # said once
    sched.add_worker(b"W2", worker_hello(host="h2"), None)  # the child can run there
    assert sent(sched.take_sends()) == {b"W2": [1]}
    sched.check_nested_waits(after=5.0)
    assert not sched.take_sends().notices


def test_a_nested_client_with_a_free_worker_is_no_deadlock(sched: Scheduler) -> None:
    sched.add_worker(b"W1", worker_hello(host="h"), None)
    sched.add_worker(b"W2", worker_hello(credits=0, host="h2"), None)  # busy, will free
    sched.add_client(b"C1", client_hello(), None)
    sched.submit(b"C1", records(1))
    sched.add_client(b"N1", dataclasses.replace(client_hello(), host="h", pid=2), None)
    sched.submit(b"N1", records(1))
    sched.take_sends()
    sched.check_nested_waits(after=0.0)
    assert not sched.take_sends().notices
