"""Prometheus metrics for a node, from a registry owned by one app (no global state).

Values are read from `runtime.status()` at scrape time, so serving requests costs nothing extra.
Knows the status dict's keys, not the runtime's classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from ._shape import RuntimeLike

__all__ = ["build_registry", "metrics_endpoint"]

_STATES = ("created", "starting", "running", "stopping", "stopped", "failed")
_COUNTERS = (
    ("events_received", "Events accepted into the process queue."),
    ("events_handled", "Events whose handler returned."),
    ("events_failed", "Events whose handler raised."),
    ("events_refused", "Events refused because the process queue was full."),
    ("restart_count", "Restarts of the process."),
)


class _RuntimeCollector(Collector):
    def __init__(self, node_id: str, runtime: RuntimeLike) -> None:
        self.node_id = node_id
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        processes: dict[str, dict[str, Any]] = self.runtime.status().get("processes", {})
        yield InfoMetricFamily("promptise_node", "The node this runtime serves.", value={"node_id": self.node_id})
        count = GaugeMetricFamily("promptise_processes", "Processes in the runtime.")
        count.add_metric([], len(processes))
        yield count
        state = GaugeMetricFamily(
            "promptise_process_state", "1 for the state a process is in.", labels=["process", "state"]
        )
        queue = GaugeMetricFamily("promptise_process_queue_size", "Events waiting in the queue.", labels=["process"])
        for name, status in processes.items():
            current = str(status.get("state", ""))
            for known in _STATES:
                state.add_metric([name, known], 1.0 if current == known else 0.0)
            queue.add_metric([name], float(status.get("queue_size") or 0))
        yield state
        yield queue
        for key, doc in _COUNTERS:
            counter = CounterMetricFamily(f"promptise_process_{key}", doc, labels=["process"])
            for name, status in processes.items():
                value = status.get(key)
                if isinstance(value, int | float):
                    counter.add_metric([name], float(value))
            yield counter


def build_registry(node_id: str, runtime: RuntimeLike) -> CollectorRegistry:
    """Return a fresh registry exposing `runtime`'s processes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RuntimeCollector(node_id, runtime))
    return registry


async def metrics_endpoint(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
