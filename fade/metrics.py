"""The broker's state in the Prometheus text format, built with ``prometheus-client``.

A custom collector turns one snapshot (:meth:`fade.broker.Broker.snapshot`)
into metric families, so the numbers Prometheus scrapes are the numbers
``fade-status`` and the dashboard show. ``prometheus-client`` is optional:
install the ``metrics`` extra (``pip install 'fade[metrics]'``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from fade.errors import MissingExtraError

__all__ = ["CONTENT_TYPE", "WORKER_STATES", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKER_STATES = ("idle", "busy", "draining")


def render(state: Mapping[str, Any]) -> bytes:
    """The metrics of ``state`` in the Prometheus text exposition format.

    Raises MissingExtraError if ``prometheus-client`` is not installed.
    """
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        raise MissingExtraError(
            "/metrics needs prometheus-client: pip install 'fade[metrics]'"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(state))
    data: bytes = generate_latest(registry)
    return data


class _SnapshotCollector:
    """A prometheus-client collector over one snapshot (a fresh one per scrape)."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self._state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        state = self._state
        workers = GaugeMetricFamily(
            "fade_workers", "Worker processes connected to the broker, by state", labels=["state"]
        )
        for name in WORKER_STATES:
            count = sum(w.get("state") == name for w in state["workers"])
            workers.add_metric([name], count)
        yield workers
        gauges = [
            ("fade_tasks_queued", "Tasks at the broker waiting for a worker", state["queued"]),
            ("fade_tasks_running", "Tasks held by workers", state["running"]),
            ("fade_clients", "Clients (Executors) connected to the broker", len(state["clients"])),
            ("fade_capacity", "Tasks the pool takes at once", state["capacity"]),
            ("fade_tasks_per_second", "Tasks finished per second, last minute", state["rate"]),
            ("fade_broker_uptime_seconds", "Seconds since the broker started", state["uptime"]),
        ]
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        done = CounterMetricFamily(
            "fade_tasks", "Tasks finished, by outcome", labels=["outcome"], unit=""
        )
        failed, lost = state["tasks_failed"], state["tasks_lost"]
        done.add_metric(["ok"], state["tasks_done"] - failed - lost)
        done.add_metric(["raised"], failed)
        done.add_metric(["lost"], lost)
        yield done
        yield InfoMetricFamily(
            "fade_broker",
            "The broker's version and id",
            value={"version": str(state["version"]), "broker_id": str(state["broker_id"])},
        )
