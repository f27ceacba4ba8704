"""The coordinator's health verdicts: polls for nodes without a fresh heartbeat digest, digests for the others.

`HealthKeeper` polls `/health` of the nodes it is given that have no fresh digest (concurrently, bounded by a
limiter, each within the probe's timeout), applies the flap rules `NodeInfo` holds, takes heartbeat digests,
and announces every change of a verdict (`node.health`) or of a node's processes (`node.processes`). Knows
the table, the probe and the change hub; nothing of HTTP routes, discovery or remote control.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from .._changes import ChangeHub
from .._errors import NodeError, NodeUnreachableError
from ._digest import Digest
from ._probe import HealthProbe
from ._table import NodeInfo, NodeTable

__all__ = ["HealthKeeper"]

logger = logging.getLogger("promptise_asgi.coordinator")


class HealthKeeper:
    """Checks nodes, takes their digests and announces what changed.

    Args:
        table: the node table (its totals are kept as verdicts change).
        probe: the `/health` client.
        changes: where `node.health` and `node.processes` are published.
        limiter: bounds the requests in flight.
        fresh_for: seconds a digest keeps a node from being polled (`health_check_interval`).
        node_timeout: seconds a healthy node that misses checks stays healthy.
        token_for: the bearer token to send to a node.
        clock: monotonic clock.
    """

    def __init__(
        self,
        table: NodeTable,
        probe: HealthProbe,
        changes: ChangeHub,
        limiter: anyio.CapacityLimiter,
        *,
        fresh_for: float,
        node_timeout: float,
        token_for: Callable[[NodeInfo], str | None],
        clock: Callable[[], float],
    ) -> None:
        self._table = table
        self._probe = probe
        self._changes = changes
        self._limiter = limiter
        self._fresh_for = fresh_for
        self._node_timeout = node_timeout
        self._token_for = token_for
        self._clock = clock

    async def check(self, infos: list[NodeInfo], processes: bool = False) -> dict[str, dict[str, Any]]:
        """Poll those of `infos` without a fresh digest at once.

        Args:
            infos: the nodes.
            processes: also read each healthy polled node's `/processes`, for `node.processes` changes.

        Returns:
            node id -> the answer (or error) of each node polled; a node not polled has its health in the table.
        """
        now = self._clock()
        results: dict[str, dict[str, Any]] = {}
        stale_nodes = [info for info in infos if not info.digest_fresh(now, self._fresh_for)]
        stale = iter(stale_nodes)

        async def worker() -> None:
            for info in stale:  # shared: each node is taken by one worker
                await self._check_one(info, results, processes)

        # As many workers as requests may be in flight, not a task per node: 10,000 tasks at once cost more
        # than the checks they wait for. A silent node holds up one worker, never the others.
        async with anyio.create_task_group() as tg:
            for _ in range(min(len(stale_nodes), int(self._limiter.total_tokens))):
                tg.start_soon(worker)
        return results

    async def _check_one(self, info: NodeInfo, results: dict[str, dict[str, Any]], processes: bool) -> None:
        before = info.health_fields()
        token = self._token_for(info)
        try:
            async with self._limiter:
                health = await self._probe.health(info.url, token)
        except Exception as exc:  # whatever one node does, the round (and status) goes on
            if not isinstance(exc, NodeError | NodeUnreachableError):
                logger.exception("health check of node %s failed unexpectedly", info.node_id)
            if info.record_miss(str(exc), self._clock(), self._node_timeout):
                logger.warning("node %s is unhealthy: %s", info.node_id, exc)
            results[info.node_id] = {"status": "unhealthy", "error": f"Health check failed: {exc}"}
        else:
            info.record_check(health, self._clock(), time.time())
            results[info.node_id] = health
            if processes:
                await self._learn_processes(info, token)
        self._changed(info, before)

    async def _learn_processes(self, info: NodeInfo, token: str | None) -> None:
        try:
            async with self._limiter:
                answer = await self._probe.get(info.url, "/processes", token)
        except Exception:  # the health verdict stands; the process list is learned next time
            return
        listed = answer.get("processes")
        if isinstance(listed, list):
            self.note_processes(info.node_id, listed)

    def note_processes(self, node_id: str, processes: list[Any]) -> None:
        """Record what a node runs and announce a change of its processes' names or states (a queue size alone
        changes nothing a `node.processes` reader is told)."""
        info = self._table.get(node_id)
        if info is None:
            return
        listed = [p for p in processes if isinstance(p, dict)]
        current = [{"name": str(p.get("name")), "state": str(p.get("state"))} for p in listed]
        info.processes = [
            {**named, "queue_size": p["queue_size"]} if isinstance(p.get("queue_size"), int) else named
            for named, p in zip(current, listed, strict=True)
        ]
        if current != info._announced:
            info._announced = current
            self._changes.publish("node.processes", {"node_id": node_id, "processes": current})

    def note_digest(self, node_id: str, digest: Digest) -> None:
        """A heartbeat's digest: the node is healthy from it, and runs what it lists."""
        info = self._table.get(node_id)
        if info is None:  # known to the backend, not (yet) to the table: its next registration brings it
            return
        before = info.health_fields()
        info.record_digest(digest, self._clock(), time.time())
        self._changed(info, before)
        if digest.processes is not None:
            self.note_processes(node_id, digest.processes)

    async def answers_as(self, info: NodeInfo) -> bool:
        """True when `info.url` answers `/health` now as node `info.node_id` (a live node, not a moved one)."""
        try:
            health = await self._probe.health(info.url, self._token_for(info))
        except Exception:
            return False
        return bool(health.get("node_id", info.node_id) == info.node_id)

    def _changed(self, info: NodeInfo, before: tuple[bool, bool, int, str]) -> None:
        self._table.recount(info)
        after = info.health_fields()
        if after != before and self._table.get(info.node_id) is info:
            healthy, missed, count, error = after
            self._changes.publish(
                "node.health",
                {"node_id": info.node_id, "healthy": healthy, "missed_check": missed, "process_count": count,
                 "error": error},
            )  # fmt: skip
