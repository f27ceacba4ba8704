"""The shape of a runtime, as the HTTP transport sees it.

The transport talks to a runtime only through these Protocols, so it works over the built-in
`promptise_asgi.runtime.AgentRuntime` and over the real `promptise` `AgentRuntime` (1.10.x) alike.
Nothing here knows about HTTP, and nothing here imports a concrete runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["ClosableRuntime", "ObservableRuntime", "ProcessLike", "RuntimeLike", "StoreProcess"]


@runtime_checkable
class ProcessLike(Protocol):
    """One managed process: what the transport reads and calls on it."""

    @property
    def process_id(self) -> str: ...

    @property
    def state(self) -> Any:
        """A `str` enum (or anything with a `.value` string) naming the lifecycle state."""

    def status(self) -> dict[str, Any]: ...

    async def inject(self, event: Any) -> Any: ...


@runtime_checkable
class RuntimeLike(Protocol):
    """A runtime of named processes that can be started, stopped and restarted by name, or all at once."""

    @property
    def processes(self) -> Mapping[str, Any]: ...

    def get_process(self, name: str) -> Any: ...

    def status(self) -> dict[str, Any]: ...

    async def start_process(self, name: str) -> Any: ...

    async def stop_process(self, name: str) -> Any: ...

    async def restart_process(self, name: str) -> Any: ...

    async def start_all(self) -> Any: ...

    async def stop_all(self) -> Any: ...


@runtime_checkable
class ClosableRuntime(Protocol):
    """A runtime with an exit of its own (the built-in one): `aclose()` stops everything and releases it."""

    async def aclose(self) -> Any: ...


@runtime_checkable
class ObservableRuntime(Protocol):
    """A runtime that tells observers of processes added and removed and of state changes (the built-in one)."""

    def add_observer(self, observer: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]: ...


@runtime_checkable
class StoreProcess(Protocol):
    """A process whose events live in an event store (the built-in runtime's): it takes idempotency keys and
    keeps dead letters. The real `promptise` runtime owns its queue and has none of this."""

    async def inject(self, event: Any, *, idempotency_key: str | None = None, fingerprint: str | None = None) -> str:
        """Queue an event once per key; returns the id of the event the key belongs to."""

    async def list_dead_letters(self, limit: int = 100) -> list[dict[str, Any]]: ...

    async def retry_dead_letter(self, event_id: str) -> bool: ...

    async def delete_dead_letter(self, event_id: str) -> bool: ...
