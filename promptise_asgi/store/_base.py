"""The event store's contract: the `EventStore` Protocol and the plain records a store keeps.

A store keeps what a runtime must not lose: the events it accepted and has not finished (by process name, in
acceptance order, with their delivery counts), its dead letters and its idempotency keys. It holds plain records
(names, ids, JSON-ready dicts, counts) and knows nothing of `TriggerEvent`, of processes, of the runtime or of
HTTP: the runtime converts, so it can depend on a store without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from .._errors import IdempotencyKeyConflictError

__all__ = ["DeadLetter", "Delivery", "EventRecord", "EventStore", "IdempotencyKey", "Recovery", "key_owner"]

# (event id, the number of deliveries started for it once this one starts or is released)
Delivery = tuple[str, int]


@dataclass(slots=True)
class EventRecord:
    """One accepted event, as a store keeps it until its delivery ends.

    Attributes:
        process: the name of the process it was accepted for (names survive a restart; process ids do not).
        event_id: its id, unique among the events a process holds.
        fields: its other fields, JSON-ready: trigger_id, trigger_type, payload, metadata, timestamp (ISO 8601).
        attempts: deliveries started so far.
        errors: deliveries whose handler raised since it was last queued by hand.
        crashes: deliveries in a row cut off by a crash (the runtime died while it was in flight).
        cut: whether its last delivery was cut off (by a crash or a stop) rather than ended.
    """

    process: str
    event_id: str
    fields: dict[str, Any]
    attempts: int = 0
    errors: int = 0
    crashes: int = 0
    cut: bool = False


@dataclass(slots=True)
class DeadLetter:
    """An event that will not be delivered again unless someone asks: its handler kept failing, or it kept
    killing the runtime.

    Attributes:
        process: the process name.
        event_id: the event's id.
        fields: the event's other fields, as in `EventRecord`.
        attempts: deliveries started before it was given up.
        reason: `"error"` (the handler raised `max_attempts` times) or `"interrupted"` (its delivery was cut
            off by `poison_after` crashes in a row).
        error: the last error text for reason `"error"`, else None.
        dead_at: when it was given up, epoch seconds.
    """

    process: str
    event_id: str
    fields: dict[str, Any]
    attempts: int
    reason: str
    error: str | None
    dead_at: float

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form the HTTP API lists: the event, its attempts, the reason and when."""
        return {
            "event_id": self.event_id,
            "event": {**self.fields, "event_id": self.event_id},
            "attempts": self.attempts,
            "reason": self.reason,
            "error": self.error,
            "dead_at": datetime.fromtimestamp(self.dead_at, UTC).isoformat(),
        }


@dataclass(slots=True)
class IdempotencyKey:
    """An idempotency key that comes with an event: a second event with the same key is not queued.

    Attributes:
        key: the key (1-255 printable ASCII characters).
        fingerprint: what the event's request looked like (a hash); the same key with another fingerprint is
            a conflict.
        expires_at: until when the key is remembered, epoch seconds.
    """

    key: str
    fingerprint: str
    expires_at: float


@dataclass(slots=True)
class Recovery:
    """What a store held for one process name when the process was added.

    Attributes:
        pending: events to deliver, in acceptance order (`crashes > 0`: cut off by a crash at least once).
        dead: events moved to the dead letters by this recovery (reason `"interrupted"`).
        dead_letters: how many dead letters the process has now.
        dropped: the oldest dead letters dropped by this recovery to keep `max_dead_letters`.
    """

    pending: list[EventRecord] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dead_letters: int = 0
    dropped: int = 0


def key_owner(process: str, key: IdempotencyKey, known: tuple[str, str] | None, event_id: str) -> str:
    """The event a key belongs to: `event_id` for a new key, the first event's id for one seen before.

    Args:
        process: the process name (for the error).
        key: the key that comes with the event `event_id`.
        known: (event id, fingerprint) stored for this key and not expired, or None.
        event_id: the id of the event being added.

    Raises:
        IdempotencyKeyConflictError: the key is known with another fingerprint.
    """
    if known is None:
        return event_id
    if known[1] != key.fingerprint:
        raise IdempotencyKeyConflictError(process, key.key, known[0])
    return known[0]


@runtime_checkable
class EventStore(Protocol):
    """Where a runtime keeps accepted events, dead letters and idempotency keys.

    The runtime calls a store from one event loop. Methods that return nothing and are not async queue a
    write for the next commit (a later awaited call, or `flush()`); awaited writes return once committed.
    Writes are applied in the order they are made.
    """

    @property
    def kind(self) -> str:
        """A short name shown in process status: `"memory"` or `"sqlite"`."""

    @property
    def durable(self) -> bool:
        """Whether events survive the runtime. False: events live only in the runtime's queues, and the
        runtime does not write them here (only dead letters and idempotency keys)."""

    @property
    def location(self) -> str:
        """Where the data lives, for log lines (a file path, or `"memory"`)."""

    async def open(self) -> None:
        """Make the store usable; opening an open store does nothing.

        Raises:
            StoreLockedError: another live runtime uses the same store.
        """

    async def close(self) -> None:
        """Commit what is queued and release the store; it opens again on next use."""

    async def recover(self, process: str, *, poison_after: int, max_dead_letters: int) -> Recovery:
        """Take over the events kept for `process`: those in flight when a runtime died count one more crash,
        and move to the dead letters (reason `"interrupted"`) once they reach `poison_after`."""

    async def add(self, record: EventRecord, key: IdempotencyKey | None = None) -> str:
        """Keep an accepted event (a durable store), together with its key; returns once committed.

        Returns:
            `record.event_id`, or for a key already kept, the id of the event first added with it (and then
            `record` is not kept).

        Raises:
            IdempotencyKeyConflictError: the key is known with another fingerprint.
            EventStoreError: the write failed; the event is not kept.
        """

    async def start_deliveries(self, process: str, deliveries: Sequence[Delivery]) -> None:
        """Mark events in flight before their handler runs; returns once committed."""

    def finish_delivery(self, process: str, event_id: str) -> None:
        """Forget an event whose delivery ended (handled, or moved on by the runtime)."""

    def release(self, process: str, deliveries: Sequence[tuple[str, int, bool]]) -> None:
        """Put events marked in flight back to waiting: (event id, deliveries started, last one cut off)."""

    def record_failure(self, process: str, event_id: str, *, attempts: int, errors: int) -> None:
        """An event's handler raised and it will be delivered again: it waits, with its counts."""

    async def flush(self) -> None:
        """Commit every write queued so far."""

    async def move_to_dead_letters(self, letter: DeadLetter, *, max_dead_letters: int) -> int:
        """Move an event to its process's dead letters; returns how many of the oldest were dropped to keep
        at most `max_dead_letters`."""

    async def dead_letters(self, process: str, limit: int) -> list[DeadLetter]:
        """The newest `limit` dead letters of a process, oldest first."""

    async def requeue_dead_letter(self, process: str, event_id: str) -> EventRecord | None:
        """Move a dead letter back to the events to deliver, after every event held now, with fresh error
        and crash counts; None if there is no such dead letter."""

    async def delete_dead_letter(self, process: str, event_id: str) -> bool:
        """Delete a dead letter; False if there is no such dead letter."""

    async def pending_counts(self) -> dict[str, int]:
        """How many events are kept per process name."""
