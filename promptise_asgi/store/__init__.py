"""Event stores: where a runtime keeps the events it accepted, its dead letters and its idempotency keys.

`MemoryStore` (the default) keeps events in the runtime's memory only; `SQLiteStore` keeps them in a SQLite
file, so an event answered 202 survives a crash of the node and is delivered again by the next runtime on the
same file. Both implement the `EventStore` Protocol. A store holds plain records and knows nothing of the
runtime or of HTTP. `SQLiteStore` loads on first use, so a runtime on the memory store loads no SQLite code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import EventStoreError, IdempotencyKeyConflictError, StoreLockedError
from ._base import DeadLetter, EventRecord, EventStore, IdempotencyKey, Recovery
from ._memory import MemoryStore

if TYPE_CHECKING:
    from ._sqlite import SQLiteStore

__all__ = [
    "DeadLetter",
    "EventRecord",
    "EventStore",
    "EventStoreError",
    "IdempotencyKey",
    "IdempotencyKeyConflictError",
    "MemoryStore",
    "Recovery",
    "SQLiteStore",
    "StoreLockedError",
]


def __getattr__(name: str) -> Any:
    if name == "SQLiteStore":
        from ._sqlite import SQLiteStore

        globals()[name] = SQLiteStore
        return SQLiteStore
    raise AttributeError(f"module 'promptise_asgi.store' has no attribute {name!r}")
