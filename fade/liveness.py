"""The broker's clocks for its peers: when each was last heard from and last told something.

Both are dicts kept in time order (a touched peer moves to the end), so the
peers due for expiry or for a heartbeat are always at the front: each pass costs
O(due peers), never O(all peers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

__all__ = ["Liveness"]


class Liveness:
    """Heard/told clocks with the broker's interval and expiry."""

    def __init__(self, interval: float, expiry: float) -> None:
        self.interval = interval
        self.expiry = expiry
        self._heard: OrderedDict[bytes, float] = OrderedDict()
        self._told: OrderedDict[bytes, float] = OrderedDict()

    def heard(self, identity: bytes, now: float) -> None:
        heard = self._heard
        heard[identity] = now
        heard.move_to_end(identity)

    def told(self, identity: bytes, now: float) -> None:
        told = self._told
        told[identity] = now
        told.move_to_end(identity)

    def forget(self, identity: bytes) -> None:
        self._heard.pop(identity, None)
        self._told.pop(identity, None)

    def pause(self, seconds: float) -> None:
        """Count ``seconds`` as heard from every peer: the broker itself did not run for
        as long (it could not hear them). Once per such stall: O(peers)."""
        heard = self._heard
        for identity in heard:
            heard[identity] += seconds

    def last_heard(self, identity: bytes, default: float) -> float:
        return self._heard.get(identity, default)

    def expired(self, now: float) -> Iterator[tuple[bytes, float]]:
        """Pop and yield (identity, seconds silent) for every peer silent past the expiry."""
        deadline = now - self.expiry
        heard = self._heard
        while heard:
            identity, last = next(iter(heard.items()))
            if last > deadline:
                return
            del heard[identity]
            self._told.pop(identity, None)
            yield identity, now - last

    def due(self, now: float) -> list[bytes]:
        """Peers told nothing for an interval (they need a heartbeat). Each is moved to the
        end as if told now, so this returns even if sending to them fails."""
        due = now - self.interval
        told = self._told
        out = []
        while told:
            identity, last = next(iter(told.items()))
            if last > due:
                break
            told[identity] = now
            told.move_to_end(identity)
            out.append(identity)
        return out

    def next_due(self, now: float) -> float:
        """Seconds until the next heartbeat or expiry (at most one interval)."""
        due = now + self.interval
        if self._told:
            due = min(due, next(iter(self._told.values())) + self.interval)
        if self._heard:
            due = min(due, next(iter(self._heard.values())) + self.expiry)
        return max(0.0, min(due - now, self.interval))
