"""The scaler's loop: look, decide, act, every poll; and its trace.

::

    Scaler.step():  state = query broker      (unreachable: skip this round, change nothing)
                    listed = provider.jobs()  (failed: skip this round, change nothing)
                    obs = observer.observe(now, state, listed)
                    decision = policy.decide(obs)
                    cancel, drain, submit     (each logged with the policy's reason)
                    trace: one JSON line {"obs": ..., "decision": ...}

A round that cannot see both the broker and the scheduler changes nothing: the scaler
never acts on half a picture. The trace records what the policy saw and decided, so a
run can be replayed through the policy (tests/test_scale_policy.py does).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import IO, Any, Protocol

from fade.errors import FadeError, ProtocolError
from fade.scale.observe import Listed, Observer
from fade.scale.policy import Decision, Job, JobState, Observation, Policy

__all__ = ["Provider", "Scaler", "decision_from_dict", "observation_from_dict", "to_dict"]

log = logging.getLogger("fade.scale")

#: Seconds after a drain request before it is sent again to a job whose workers still
#: serve (a job whose script had not set its trap yet misses the signal).
DRAIN_RESEND = 10.0


class Provider(Protocol):
    """What the loop needs of a scheduler (fade/scale/slurm.py is one)."""

    label_prefix: str
    listing_grace: float  # seconds its job list may lag a submission

    def jobs(self) -> list[Listed]: ...
    def submit(self, count: int) -> list[str]: ...
    def cancel(self, ids: Sequence[str]) -> None: ...
    def drain(self, ids: Sequence[str]) -> None: ...


class Scaler:
    """One provider, one broker, one policy; :meth:`run` until :meth:`stop`."""

    def __init__(
        self,
        query: Callable[[], Mapping[str, Any]],
        provider: Provider,
        policy: Policy,
        *,
        trace: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.query = query
        self.provider = provider
        self.policy = policy
        self.observer = Observer(provider.label_prefix, provider.listing_grace)
        self.trace = trace
        self.clock = clock
        self.submitted = self.cancelled = self.drained = 0  # jobs, since start
        self._drains: dict[str, float] = {}  # job -> when we last asked it to drain
        self._stop = threading.Event()
        if trace is not None:  # the settings first, so that the trace can be replayed
            trace.write(json.dumps({"settings": asdict(policy.settings)}) + "\n")

    def run(self, poll: float) -> None:
        """Step every ``poll`` seconds until :meth:`stop` (a failed step is logged)."""
        while not self._stop.is_set():
            try:
                self.step()
            except FadeError as exc:
                log.warning("this round failed: %s", exc)
            self._stop.wait(poll)

    def stop(self) -> None:
        self._stop.set()

    def step(self) -> Decision | None:
        """One round; None if the broker or the scheduler could not be seen."""
        now = self.clock()
        try:
            state = self.query()
        except (FadeError, ProtocolError, OSError) as exc:
            log.warning("no state from the broker, so no change this round: %s", exc)
            return None
        listed = self.provider.jobs()
        obs = self.observer.observe(now, state, listed)
        decision = self.policy.decide(obs)
        self._write({"obs": to_dict(obs), "decision": to_dict(decision)})
        self._apply(decision, obs)
        self._resend_drains(obs)
        return decision

    def _apply(self, decision: Decision, obs: Observation) -> None:
        """Carry a decision out. A failed scancel (a job that ended meanwhile, say) is
        logged; a failed sbatch also makes the policy back off, and is traced."""
        if decision:
            log.info("%s", decision.reason)
        if decision.cancel:
            self.observer.ending(decision.cancel)
            if self._try(self.provider.cancel, decision.cancel, "cancel"):
                self.cancelled += len(decision.cancel)
                log.info("cancelled jobs %s", " ".join(decision.cancel))
        if decision.drain:
            self.observer.ending(decision.drain)
            self._drains.update(dict.fromkeys(decision.drain, obs.now))
            if self._try(self.provider.drain, decision.drain, "drain"):
                self.drained += len(decision.drain)
                log.info("draining jobs %s", " ".join(decision.drain))
        if decision.submit:
            try:
                ids = self.provider.submit(decision.submit)
            except FadeError as exc:
                log.error("could not submit jobs (trying again later): %s", exc)
                self.policy.submission_failed(obs.now)
                self._write({"submission_failed": obs.now})
                return
            self.observer.submitted(ids, obs.now)
            self.submitted += len(ids)
            log.info("submitted jobs %s", " ".join(ids))

    def _try(self, action: Callable[[Sequence[str]], None], ids: Sequence[str], what: str) -> bool:
        try:
            action(ids)
        except FadeError as exc:
            log.warning("could not %s jobs %s: %s", what, " ".join(ids), exc)
            return False
        return True

    def _write(self, record: dict[str, Any]) -> None:
        if self.trace is not None:
            self.trace.write(json.dumps(record) + "\n")
            self.trace.flush()

    def _resend_drains(self, obs: Observation) -> None:
        """Ask again the jobs told to drain whose workers still take tasks."""
        serving = {job.id for job in obs.jobs if job.state is JobState.DRAINING and job.workers}
        self._drains = {j: t for j, t in self._drains.items() if j in {x.id for x in obs.jobs}}
        again = [
            j
            for j, asked in self._drains.items()
            if j in serving and obs.now - asked >= DRAIN_RESEND
        ]
        if again:
            log.info("asking jobs %s again to drain", " ".join(again))
            self._drains.update(dict.fromkeys(again, obs.now))
            self._try(self.provider.drain, again, "drain")


# -- the trace ------------------------------------------------------------------------------


def to_dict(record: Observation | Decision) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, JobState):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    result: dict[str, Any] = plain(asdict(record))
    return result


def observation_from_dict(data: Mapping[str, Any]) -> Observation:
    jobs = tuple(Job(**{**job, "state": JobState(job["state"])}) for job in data.get("jobs", []))
    return Observation(**{**data, "jobs": jobs})


def decision_from_dict(data: Mapping[str, Any]) -> Decision:
    return Decision(
        submit=data.get("submit", 0),
        cancel=tuple(data.get("cancel", ())),
        drain=tuple(data.get("drain", ())),
        reason=data.get("reason", ""),
    )
