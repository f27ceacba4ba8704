"""What a node tells its `/changes` readers (SPEC 13), derived from its runtime.

The built-in runtime reports processes added and removed and every state change through its observer hook;
counters are read once a second and sent per process only when they changed (coalesced: at most one message
per process per second, the latest values within about a second of the last change). A runtime without the
hook (the promptise runtime) is compared with its previous status once a second for all of it. Knows the
runtime only through the Protocols in `_shape`; nothing of HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio

from .._changes import ChangeHub
from .._detached import spawn_detached
from . import _promptise as promptise
from ._shape import ObservableRuntime, RuntimeLike

__all__ = ["COUNTERS", "NodeChanges"]

logger = logging.getLogger("promptise_asgi.transport")

COUNTERS = ("queue_size", "in_flight", "events_received", "events_handled", "events_failed")


class NodeChanges:
    """The change stream of one node: a `ChangeHub` fed from its runtime while the node runs.

    Args:
        runtime: the runtime whose changes are streamed.
        snapshot: builds a snapshot (the node's `/status` body).
        interval: seconds between two reads of the counters (and of everything, for a runtime without hooks).
    """

    def __init__(self, runtime: RuntimeLike, snapshot: Callable[[], dict[str, Any]], *, interval: float = 1.0) -> None:
        self.runtime = runtime
        self.hub = ChangeHub(snapshot)
        self.interval = interval
        self._counters: dict[str, dict[str, Any]] = {}
        self._states: dict[str, str] = {}
        self._unobserve: Callable[[], None] | None = None
        self._scope: anyio.CancelScope | None = None

    def publish(self, type: str, data: dict[str, Any]) -> None:
        """Send one change to every reader."""
        self.hub.publish(type, data)

    async def start(self) -> None:
        """Begin following the runtime (hooks where it has them, a once-a-second reading for the rest)."""
        if self._scope is not None:
            return
        if self.hub.closed:  # a node started again after a stop: readers reconnect and get a fresh snapshot
            self.hub = ChangeHub(self.hub.snapshot_builder)
        self._states = self._read_states()
        if isinstance(self.runtime, ObservableRuntime):
            self._unobserve = self.runtime.add_observer(self.publish)
        scope = self._scope = anyio.CancelScope()

        async def follow() -> None:
            with scope:
                while True:
                    await anyio.sleep(self.interval)
                    self.tick()

        spawn_detached(follow, name="promptise-asgi node changes")

    def tick(self) -> None:
        """One reading: counters that changed, and (without hooks) processes and states that changed."""
        processes = self.runtime.processes
        if self._unobserve is None:
            self._diff_processes()
        for name, process in list(processes.items()):
            try:
                status = process.status()
            except Exception:  # a foreign runtime's status is its own business: skip it this time
                logger.exception("status of process %r failed", name)
                continue
            counters = {key: status.get(key) for key in COUNTERS}
            if self._counters.get(name) != counters:
                self._counters[name] = counters
                self.publish("process.counters", {"name": name, **counters})
        for gone in set(self._counters) - set(processes):
            del self._counters[gone]

    def _read_states(self) -> dict[str, str]:
        return {name: promptise.state_name(process) for name, process in self.runtime.processes.items()}

    def _diff_processes(self) -> None:
        before, now = self._states, self._read_states()
        for name in now.keys() - before.keys():
            self.publish("process.added", {"name": name})
        for name, state in now.items():
            previous = before.get(name)
            if previous is not None and previous != state:
                self.publish("process.state", {"name": name, "state": state, "previous": previous})
        for name in before.keys() - now.keys():
            self.publish("process.removed", {"name": name})
        self._states = now

    def close_streams(self) -> None:
        """End every open stream (the node is stopping) and refuse new ones."""
        self.hub.close()

    async def stop(self) -> None:
        """Stop following the runtime and end every stream."""
        if self._unobserve is not None:
            self._unobserve()
            self._unobserve = None
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.cancel()
        self.close_streams()
