"""The coordinator's link to its discovery backend: calls bounded in time, outages reported, the table kept in step.

`BackendLink` awaits every backend call within a timeout and remembers whether the backend answers (what a
status shows as `"discovery"`). It keeps the node table in step in one of two ways: by following the backend's
`watch()` (etcd), which costs one listing of the registry at the start and one after a gap the watch cannot
bridge itself (a compaction), never one per round; or, for a backend that cannot be watched, by listing it and
applying the differences. Knows the discovery Protocols; of the coordinator only the three callables it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from .._errors import ClusterFullError, DiscoveryUnavailableError
from ..discovery import DiscoveredNode, NodeChange, ProcessDiscovery, ReportsWatchError, SupportsWatch

__all__ = ["BackendHealth", "BackendLink"]

logger = logging.getLogger("promptise_asgi.coordinator")

T = TypeVar("T")

# Pauses between attempts to follow a watch that failed (listing each round meanwhile).
_FIRST_RETRY = 0.5
_LONGEST_RETRY = 30.0


class BackendHealth:
    """Whether the discovery backend answered last time, and since when it has not (for status)."""

    __slots__ = ("error", "since")

    def __init__(self) -> None:
        self.error: str | None = None
        self.since: float | None = None

    def ok(self) -> None:
        if self.error is not None:
            logger.warning("discovery backend answers again (it failed for %.1fs)", time.time() - (self.since or 0))
        self.error = self.since = None

    def failed(self, reason: str) -> None:
        if self.error is None:
            logger.warning("discovery backend unavailable, answering from the last known nodes: %s", reason)
            self.since = time.time()
        self.error = reason

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.error is None, "error": self.error, "since": self.since}


class BackendLink:
    """Calls a discovery backend for the coordinator and keeps its node table in step with it.

    Args:
        discovery: the backend.
        timeout: seconds one call may take before the backend counts as unavailable.
        accept: adds or updates a node the backend lists (raises ValueError or ClusterFullError to refuse it).
        drop: removes a node the backend no longer lists (a no-op for nodes registered in process).
        held: the nodes the table holds from the backend, as the backend would list them.
        held_ids: their ids.
    """

    def __init__(
        self,
        discovery: ProcessDiscovery,
        timeout: float,
        *,
        accept: Callable[[DiscoveredNode], None],
        drop: Callable[[str], None],
        held: Callable[[], list[DiscoveredNode]],
        held_ids: Callable[[], list[str]],
    ) -> None:
        self.discovery = discovery
        self.timeout = timeout
        self.health = BackendHealth()
        self.following = False  # True while a watch keeps the table: no listing needed
        self._accept = accept
        self._drop = drop
        self._held = held
        self._held_ids = held_ids  # the same nodes' ids: no record to build per node at every round
        self._skipped: dict[str, str] = {}  # entries refused, by id (to log each one once)
        self._watch_error: str | None = None  # the watch trouble last reported in `health`
        self._reports = discovery if isinstance(discovery, ReportsWatchError) else None  # asked once: not cheap

    async def call(self, call: Awaitable[T]) -> T:
        """Await a backend call within `timeout`, reporting failures as unavailability.

        Raises:
            DiscoveryUnavailableError: the backend failed or did not answer in time.
        """
        try:
            with anyio.fail_after(self.timeout):
                result = await call
        except TimeoutError:
            reason = f"no answer within {self.timeout:g}s"
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
        else:
            self.health.ok()
            return result
        self.health.failed(reason)
        raise DiscoveryUnavailableError(reason)

    def note_watch(self) -> None:
        """Report in `health` when a followed watch cannot reach the backend, and when it can again."""
        if not self.following or self._reports is None:
            return
        error = self._reports.watch_error
        if error != self._watch_error:
            if error is None:
                self.health.ok()
            else:
                self.health.failed(error)
            self._watch_error = error

    async def sync(self) -> None:
        """Bring the table in step: nothing to do while a watch keeps it, else list the backend.

        A backend that fails, or does not answer within `timeout`, leaves the table as it was.
        """
        if self.following:
            self.note_watch()
            return
        try:
            listed = await self.call(self.discovery.discover())
        except DiscoveryUnavailableError:
            return
        seen = set()
        for node in listed:
            seen.add(node.node_id)
            self._take(node)
        for node_id in self._held_ids():
            if node_id not in seen:
                self._drop(node_id)
        if len(self._skipped) > len(seen):
            self._skipped = {n: u for n, u in self._skipped.items() if n in seen}

    def _take(self, node: DiscoveredNode) -> None:
        try:
            self._accept(node)
        except (ValueError, ClusterFullError) as exc:
            if self._skipped.get(node.node_id) != node.url:
                logger.warning("discovery lists node %r, which is not accepted: %s", node.node_id, exc)
                self._skipped[node.node_id] = node.url

    def start_following(self) -> bool:
        """Whether the backend can be watched; if so, rounds stop listing it from now on (call `follow` next)."""
        self.following = isinstance(self.discovery, SupportsWatch)
        return self.following

    async def follow(self) -> None:
        """Keep the table from the backend's watch until cancelled.

        Each start of the watch hands it the table's picture, so the watch's first reading of the registry
        brings the table exact (joins for what is new or changed, leaves for what is gone); after that only
        changes flow. When the watch fails, rounds list the backend again until it runs anew.
        """
        watchable = self.discovery
        assert isinstance(watchable, SupportsWatch)
        delay = _FIRST_RETRY
        while True:
            self.following = True
            try:
                changes = watchable.watch(include_existing=True, known=self._held())
            except TypeError:  # a backend written before `known` existed: list it each round instead
                logger.warning("discovery backend %r cannot resume a watch; listing it each round", watchable)
                self.following = False
                return
            reason = "the watch ended"
            try:
                async for change in changes:
                    self._apply(change)
                    delay = _FIRST_RETRY
            except Exception as exc:  # whatever the backend does, the table falls back to listing
                reason = str(exc) or type(exc).__name__
            finally:
                close = getattr(changes, "aclose", None)  # an async generator's: ends its open stream now
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()
            self.following = False
            logger.warning("discovery watch stopped (%s); listing the backend each round until it runs again", reason)
            await anyio.sleep(delay)
            delay = min(delay * 2, _LONGEST_RETRY)

    def _apply(self, change: NodeChange) -> None:
        if change.kind == "join" and change.node is not None:
            self._take(change.node)
        elif change.kind == "leave":
            self._drop(change.node_id)
