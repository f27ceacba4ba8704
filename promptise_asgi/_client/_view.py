"""`ClusterView`: the cluster status a coordinator's change stream describes, kept up to date change by change.

What `promptise-asgi status --watch` draws from: a snapshot replaces it, then `node.joined`, `node.left`,
`node.health` and `node.processes` patch it, and the totals are counted again. Knows the message types only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._changes import Change

__all__ = ["ClusterView"]


class ClusterView:
    """A cluster status (`nodes` by id and the totals), as the last snapshot and the changes since make it.

    Args:
        clock: wall clock, for `last_seen` of a node whose health turns good.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.discovery: dict[str, Any] | None = None
        self._clock = clock

    def apply(self, change: Change) -> None:
        """Fold one change into the view (unknown types are ignored: a newer coordinator may send more)."""
        data = change.data
        if change.type == "snapshot":
            self.nodes = {str(node_id): dict(node) for node_id, node in data.get("nodes", {}).items()}
            self.discovery = data.get("discovery")
            return
        node_id = str(data.get("node_id", ""))
        if change.type == "node.joined":
            self.nodes[node_id] = {
                "node_id": node_id,
                "url": data.get("url", ""),
                "metadata": data.get("metadata", {}),
                "status": "unknown",
                "process_count": 0,
                "missed_check": False,
                "last_seen": None,
            }
        elif change.type == "node.left":
            self.nodes.pop(node_id, None)
        elif change.type == "node.health" and node_id in self.nodes:
            node = self.nodes[node_id]
            node["status"] = "healthy" if data.get("healthy") else "unhealthy"
            node["missed_check"] = bool(data.get("missed_check"))
            node["process_count"] = data.get("process_count", node.get("process_count", 0))
            node["last_error"] = data.get("error") or None
            if data.get("healthy") and not data.get("missed_check"):
                node["last_seen"] = self._clock()
        elif change.type == "node.processes" and node_id in self.nodes:
            self.nodes[node_id]["process_count"] = len(data.get("processes", []))

    def status(self) -> dict[str, Any]:
        """The view as a cluster status: `{"total_nodes", "healthy_nodes", "unhealthy_nodes", "total_processes",
        "nodes"}` (and `"discovery"` when the coordinator reports it)."""
        healthy = [node for node in self.nodes.values() if node.get("status") == "healthy"]
        status: dict[str, Any] = {
            "total_nodes": len(self.nodes),
            "healthy_nodes": len(healthy),
            "unhealthy_nodes": len(self.nodes) - len(healthy),
            "total_processes": sum(int(node.get("process_count") or 0) for node in healthy),
            "nodes": self.nodes,
        }
        if self.discovery is not None:
            status["discovery"] = self.discovery
        return status
