"""A small epidemic model (SIR) for the parameter sweep example.

This is an ordinary local module next to ``parameter_sweep.py``: the workers do
not have it installed, so the sweep only runs if fade ships it to them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    beta: float
    gamma: float
    peak_infected: float  # the largest infected fraction of the population
    peak_day: int
    never_infected: float  # fraction never infected by the last day


def simulate(beta: float, gamma: float, days: int = 365, steps_per_day: int = 20) -> Outcome:
    """Integrate the SIR equations (forward Euler) from 0.1 % infected."""
    s, i, r = 0.999, 0.001, 0.0
    dt = 1.0 / steps_per_day
    peak, peak_day = i, 0
    for day in range(days):
        for _ in range(steps_per_day):
            infections = beta * s * i * dt
            recoveries = gamma * i * dt
            s, i, r = s - infections, i + infections - recoveries, r + recoveries
        if i > peak:
            peak, peak_day = i, day + 1
    return Outcome(beta, gamma, peak, peak_day, s)
