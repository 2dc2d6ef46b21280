"""Turn the runners' results into the printed report and the JSON document.

    {system: SystemResult} ──> results_table()      one row per metric, one column per system
                           ──> status_lines()       ok / error / timeout / skipped, and why
                           ──> ratios()             fade's figure / each baseline's, per metric
                           ──> evaluate_targets()   the issue's targets, each PASS or MISS

A ratio is always fade / baseline. For throughput (higher is better) > 1 means fade is faster; for
latency and start-up time (lower is better) < 1 means fade is faster. Each target states its own
direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.metrics import METRICS, Metric
from benchmarks.systems import BASELINES, FADE_SYSTEMS

__all__ = [
    "TARGETS",
    "SystemResult",
    "Target",
    "evaluate_targets",
    "format_number",
    "ratio_tables",
    "ratios",
    "results_table",
    "status_lines",
    "target_lines",
]

METRIC_BY_KEY = {m.key: m for m in METRICS}


@dataclass(slots=True)
class SystemResult:
    """What bench.py learned about one system."""

    status: str  # "ok", "error", "timeout" or "skipped"
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    runs: dict[str, list[float]] = field(default_factory=dict)  # a repeated step's runs
    errors: dict[str, str] = field(default_factory=dict)  # failed step -> error
    elapsed_s: float | None = None
    log_tail: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # processes bench.py had to kill
    sizes: dict[str, int] | None = None  # what it ran, when not the mode's sizes


@dataclass(frozen=True, slots=True)
class Target:
    """``system``'s ``metric`` (divided by ``baseline``'s, if any) must be ``op`` ``threshold``."""

    system: str
    metric: str
    baseline: str | None
    op: str  # ">=" or "<="
    threshold: float

    def describe(self) -> str:
        label = METRIC_BY_KEY[self.metric].label
        op = "≥" if self.op == ">=" else "≤"
        if self.baseline is None:
            unit = METRIC_BY_KEY[self.metric].unit
            return f"{self.system} {label} {op} {self.threshold:g} {unit}"
        return f"{self.system} {label} {op} {self.threshold:g}x {self.baseline}"


# From the issues. On one machine (issue 18), the embedded pool against the pool users already
# have, ProcessPoolExecutor, and against Ray's shared-memory object store for 50 MB; the TCP
# pool against raw pyzmq, the like-for-like transport (issue 8).
TARGETS: tuple[Target, ...] = (
    Target("fade-embedded", "startup_s", None, "<=", 0.2),
    Target("fade-embedded", "lat_median_us", "processpool", "<=", 1.2),
    Target("fade-embedded", "big_mbps", "processpool", ">=", 3.0),
    Target("fade-embedded", "big_mbps", "ray", ">=", 1.5),
    Target("fade-embedded", "submit_tps", "processpool", ">=", 3.0),
    Target("fade-embedded", "map_c100_tps", "processpool", ">=", 1.5),
    Target("fade-tcp", "submit_tps", "processpool", ">=", 1.25),
    Target("fade-tcp", "submit_tps", "raw-zmq", ">=", 0.4),
    Target("fade-tcp", "map_c100_tps", "processpool", ">=", 1.0),
    Target("fade-tcp", "lat_median_us", "raw-zmq", "<=", 1.3),
    Target("fade-tcp", "big_mbps", "raw-zmq", ">=", 0.8),
)


def format_number(value: float) -> str:
    """Three significant figures, thousands separated: 523,114 / 363 / 41.2 / 0.276."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _cell(result: SystemResult, key: str) -> str:
    if key in result.metrics:
        return format_number(result.metrics[key])
    if result.status == "ok":
        return "-"
    return "error" if result.status == "error" else result.status


def _align(rows: Sequence[Sequence[str]], left: int = 2) -> list[str]:
    """Left-align the first ``left`` columns, right-align the rest."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def results_table(results: dict[str, SystemResult]) -> list[str]:
    """Metrics down, systems across, fade first."""
    header = ["metric", "unit", *results]
    rows = [[m.label, m.unit, *(_cell(r, m.key) for r in results.values())] for m in METRICS]
    return _align([header, *rows])


def status_lines(results: dict[str, SystemResult]) -> list[str]:
    width = max(len(name) for name in results)
    lines = []
    for name, result in results.items():
        detail = result.status
        if result.elapsed_s is not None:
            detail += f" ({result.elapsed_s:.1f} s)"
        if result.sizes:
            detail += f" with N={result.sizes['tasks']:,}, M={result.sizes['calls']:,}"
        if result.reason:
            detail += f": {result.reason}"
        if result.leftovers:
            detail += f"; left {len(result.leftovers)} process(es) running, killed"
        lines.append(f"{name.ljust(width)} : {detail}")
    return lines


def _ratio(metric: Metric, fade: SystemResult, base: SystemResult) -> float | None:
    a, b = fade.metrics.get(metric.key), base.metrics.get(metric.key)
    return a / b if a is not None and b else None


def ratios(results: dict[str, SystemResult]) -> dict[str, dict[str, dict[str, float]]]:
    """``{fade system: {baseline: {metric: fade / baseline}}}`` wherever both figures exist."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for fade in (s for s in FADE_SYSTEMS if s in results):
        for base in (s for s in BASELINES if s in results):
            for metric in METRICS:
                value = _ratio(metric, results[fade], results[base])
                if value is not None:
                    out.setdefault(fade, {}).setdefault(base, {})[metric.key] = value
    return out


def ratio_tables(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One block per fade system: metrics down, baselines across."""
    lines: list[str] = []
    for fade, by_base in table.items():
        header = [f"{fade} / baseline", "better", *by_base]
        rows = [
            [
                m.label,
                "higher" if m.higher_is_better else "lower",
                *(_times(by_base[b].get(m.key)) for b in by_base),
            ]
            for m in METRICS
        ]
        lines += ["", *_align([header, *rows])]
    return lines


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def evaluate_targets(
    results: dict[str, SystemResult], table: dict[str, dict[str, dict[str, float]]]
) -> list[dict[str, Any]]:
    """Each target with its measured value (None when a figure is missing) and PASS or MISS."""
    evaluated = []
    for target in TARGETS:
        if target.baseline is None:
            value = results.get(target.system, SystemResult("skipped")).metrics.get(target.metric)
        else:
            value = table.get(target.system, {}).get(target.baseline, {}).get(target.metric)
        passed = value is not None and (
            value >= target.threshold if target.op == ">=" else value <= target.threshold
        )
        evaluated.append(
            {
                "target": target.describe(),
                "system": target.system,
                "metric": target.metric,
                "baseline": target.baseline,
                "op": target.op,
                "threshold": target.threshold,
                "value": value,
                "result": "PASS" if passed else "MISS",
            }
        )
    return evaluated


def target_lines(evaluated: list[dict[str, Any]]) -> list[str]:
    """``target : measured  PASS|MISS`` lines; a missing figure reads "no data"."""
    rows = []
    for item in evaluated:
        unit = METRIC_BY_KEY[item["metric"]].unit
        if item["value"] is None:
            measured = "no data"
        elif item["baseline"] is None:
            measured = f"{format_number(item['value'])} {unit}"
        else:
            measured = _times(item["value"])
        rows.append([item["target"], ":", measured, item["result"]])
    return _align(rows, left=2)
