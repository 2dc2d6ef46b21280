"""How many of a client's tasks may be at the broker at once: the client window.

::

    broker ── capacity (WELCOME, RESULT, HEARTBEAT) ──> Window.capacity
    RESULT batches ── Window.results(n, now) ──> rate of results while tasks are out
    ClientIO._send_tasks: room = Window.size() - tasks out

The broker's *capacity* (fade/roster.py) is what its ready workers hold and have asked
for, plus one each. Workers size what they ask for to cover their own round trip to the
broker; nothing in it covers the client's: a result travels worker -> broker -> client,
and the task that takes its place client -> broker -> worker. With tasks shorter than
that trip, a window of exactly the capacity left the broker nothing to send when a
worker asked, and the workers waited on the client. Measured on loopback: a worker
running 0.5 ms tasks found no task waiting at 98% of its starts, its credits unused;
with the client 2 ms away (one way), 1 ms tasks on two workers ran at 0.53 of the pool's
speed and 0.5 ms tasks on one at 0.41.

So the window adds what the pool gets through of this client's work in HORIZON
seconds, at the rate its results came back. The rate grows with the window: while the
client's round trip is shorter than HORIZON, more room brings results sooner, which
brings more room, until the workers, not the trip, set the pace. Slow tasks add
nothing (tasks of a second on two workers add 0.1 task): tasks at the broker count as
running and can no longer be cancelled, and for them the extra tasks would buy nothing.
Each burst (tasks sent when none was out) starts from the capacity alone. The
horizon never takes the window past the quota of tasks the broker allows a client
(``--max-client-tasks``, announced in WELCOME): it would refuse them.

Plain data, no sockets or threads: the client's I/O thread (and its waiting thread,
holding the baton) update and ask it.
"""

from __future__ import annotations

__all__ = ["HORIZON", "MAX_EXTRA", "Window"]

#: Seconds of this client's results the window keeps queued at the broker beyond the
#: capacity: above the round trip of a client on the same network (0.1-10 ms).
HORIZON = 0.05
#: The most tasks the horizon adds.
MAX_EXTRA = 4096
#: Seconds over which the rate of results is measured before it is updated.
RATE_PERIOD = 0.05


class Window:
    """The capacity the broker reports and the rate this client's results come back."""

    __slots__ = ("_count", "_since", "capacity", "quota", "rate")

    def __init__(self) -> None:
        self.capacity = 0
        self.quota = 0  # the broker's max_client_tasks, if it said (0: not said)
        self.rate = 0.0  # results per second, while tasks were out
        self._since = 0.0  # start of the current measurement
        self._count = 0

    def size(self) -> int:
        """Tasks this client may have at the broker."""
        if not self.capacity:  # no worker: nothing is sent, whatever the rate was
            return 0
        extra = min(MAX_EXTRA, int(self.rate * HORIZON))
        if self.quota:  # what the broker would refuse is not worth sending
            extra = max(0, min(extra, self.quota - self.capacity))
        return self.capacity + extra

    def sending(self, out: int, now: float) -> None:
        """Tasks are about to leave with ``out`` already at the broker. A burst after an
        idle spell (nothing out) starts from the capacity alone: the rate of an earlier
        burst says nothing of this one's tasks, which could be slow."""
        if not out:
            self.rate, self._since, self._count = 0.0, now, 0

    def results(self, count: int, now: float) -> None:
        """``count`` results came back."""
        self._count += count
        elapsed = now - self._since
        if elapsed >= RATE_PERIOD:
            sample = self._count / elapsed
            self.rate = sample if not self.rate else (self.rate + sample) / 2
            self._since, self._count = now, 0
