"""The broker's state in the Prometheus text format, built with ``prometheus-client``.

A custom collector turns one view of a snapshot (:func:`fade.web.public_view`
or :func:`fade.web.detail_view`) into metric families, so the numbers
Prometheus scrapes are the numbers ``fade-status`` and the dashboard show. Every
metric is an aggregate: no label names a worker, a client or a host. The
broker's version is a label of ``fade_broker_info`` only in the detail view
(a scrape that sends the token). ``prometheus-client`` is optional: install the
``metrics`` extra (``pip install 'fade[metrics]'``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from fade.errors import MissingExtraError
from fade.protocol import PAIR_STATES

__all__ = ["CONTENT_TYPE", "WORKER_STATES", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKER_STATES = ("idle", "busy", "draining")


def render(view: Mapping[str, Any]) -> bytes:
    """The metrics of ``view`` in the Prometheus text exposition format.

    Raises MissingExtraError if ``prometheus-client`` is not installed.
    """
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        raise MissingExtraError(
            "/metrics needs prometheus-client: pip install 'fade[metrics]'"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ViewCollector(view))
    data: bytes = generate_latest(registry)
    return data


class _ViewCollector:
    """A prometheus-client collector over one view (a fresh one per scrape)."""

    def __init__(self, view: Mapping[str, Any]) -> None:
        self._view = view

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        view = self._view
        workers = GaugeMetricFamily(
            "fade_workers", "Worker processes connected to the broker, by state", labels=["state"]
        )
        for name in WORKER_STATES:
            workers.add_metric([name], view["worker_states"].get(name, 0))
        yield workers
        gauges = [
            ("fade_tasks_queued", "Tasks at the broker waiting for a worker", view["queued"]),
            ("fade_tasks_running", "Tasks held by workers", view["running"]),
            (
                "fade_tasks_backlog",
                "Tasks clients hold back for want of room at the broker (scale on this too)",
                view.get("backlog", 0),
            ),
            ("fade_clients", "Clients (Executors) connected to the broker", view["client_count"]),
            ("fade_capacity", "Tasks the pool takes at once", view["capacity"]),
            ("fade_tasks_per_second", "Tasks finished per second, last minute", view["rate"]),
            ("fade_broker_uptime_seconds", "Seconds since the broker started", view["uptime"]),
        ]
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        done = CounterMetricFamily(
            "fade_tasks", "Tasks finished, by outcome", labels=["outcome"], unit=""
        )
        failed, lost = view["tasks_failed"], view["tasks_lost"]
        done.add_metric(["ok"], view["tasks_done"] - failed - lost)
        done.add_metric(["raised"], failed)
        done.add_metric(["lost"], lost)
        yield done
        info = {"broker_id": str(view["broker_id"])}
        if "version" in view:
            info["version"] = str(view["version"])
        yield InfoMetricFamily(
            "fade_broker", "The broker's id (and, with the token, version)", value=info
        )
        pair = view.get("pair")
        if isinstance(pair, Mapping):
            yield from _pair_metrics(pair)


def _pair_metrics(pair: Mapping[str, Any]) -> Iterator[Any]:
    """A broker of a pair (fade-broker --peer): whether it serves, and how it got there."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily(
        "fade_pair_active",
        "1 if this broker of a pair serves clients and workers now, 0 if it stands by",
        value=1 if pair.get("active") else 0,
    )
    states = GaugeMetricFamily(
        "fade_pair_state", "This broker's pair state (1 for the current one)", labels=["state"]
    )
    for name in PAIR_STATES:
        states.add_metric([name], 1 if pair.get("state") == name else 0)
    yield states
    yield GaugeMetricFamily(
        "fade_pair_term",
        "The takeover this broker's last active claim came from",
        value=pair.get("term", 0),
    )
    yield CounterMetricFamily(
        "fade_pair_takeovers",
        "Times this broker became the active one",
        value=pair.get("takeovers", 0),
    )
