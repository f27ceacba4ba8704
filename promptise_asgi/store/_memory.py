"""`MemoryStore`: the library's default store, which keeps nothing across an exit.

Events live only in the runtime's queues (the store is not `durable`, so the runtime writes no event here);
this store keeps what the runtime has nowhere else to put: dead letters and idempotency keys, in memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ._base import DeadLetter, Delivery, EventRecord, IdempotencyKey, Recovery, key_owner

__all__ = ["MemoryStore"]


class MemoryStore:
    """An event store in memory: nothing survives the process, and nothing is written to disk.

    Events stay in the runtime's queues, as they always did; dead letters and idempotency keys are kept here
    for as long as the runtime lives. The default of `AgentRuntime(store=None)`.

    Args:
        clock: wall clock in epoch seconds, for idempotency key expiry (injectable for tests).
    """

    kind = "memory"
    durable = False
    location = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._dead: dict[str, OrderedDict[str, DeadLetter]] = {}
        # Per process, in the order keys were accepted; with one ttl per process that is also expiry order.
        self._keys: dict[str, OrderedDict[str, tuple[str, str, float]]] = {}

    async def open(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to release: dead letters and keys stay for as long as this object lives."""

    async def recover(self, process: str, *, poison_after: int, max_dead_letters: int) -> Recovery:
        """Nothing was kept but the dead letters of a process of that name added earlier to this runtime."""
        return Recovery(dead_letters=len(self._dead.get(process, ())))

    async def add(self, record: EventRecord, key: IdempotencyKey | None = None) -> str:
        """Remember the key, if any (the event itself stays in the runtime's queue)."""
        if key is None:
            return record.event_id
        keys = self._keys.setdefault(record.process, OrderedDict())
        now = self._clock()
        while keys:
            oldest = next(iter(keys.values()))
            if oldest[2] > now:
                break
            keys.popitem(last=False)
        known = keys.get(key.key)
        if known is not None and known[2] <= now:  # a process re-added with a shorter ttl left it behind
            del keys[key.key]
            known = None
        owner = key_owner(record.process, key, None if known is None else known[:2], record.event_id)
        if known is None:
            keys[key.key] = (record.event_id, key.fingerprint, key.expires_at)
        return owner

    async def start_deliveries(self, process: str, deliveries: Sequence[Delivery]) -> None:
        """Nothing to mark: a crash loses the events anyway."""

    def finish_delivery(self, process: str, event_id: str) -> None:
        """Nothing to forget."""

    def release(self, process: str, deliveries: Sequence[tuple[str, int, bool]]) -> None:
        """Nothing to release."""

    def record_failure(self, process: str, event_id: str, *, attempts: int, errors: int) -> None:
        """Nothing to record."""

    async def flush(self) -> None:
        """Nothing is ever queued."""

    async def move_to_dead_letters(self, letter: DeadLetter, *, max_dead_letters: int) -> int:
        """Append a dead letter, dropping the oldest beyond `max_dead_letters`; returns how many were dropped."""
        letters = self._dead.setdefault(letter.process, OrderedDict())
        letters.pop(letter.event_id, None)
        letters[letter.event_id] = letter
        dropped = 0
        while len(letters) > max_dead_letters:
            letters.popitem(last=False)
            dropped += 1
        return dropped

    async def dead_letters(self, process: str, limit: int) -> list[DeadLetter]:
        """The newest `limit` dead letters, oldest first."""
        letters = list(self._dead[process].values()) if process in self._dead else []
        return letters[-limit:] if limit > 0 else []

    async def requeue_dead_letter(self, process: str, event_id: str) -> EventRecord | None:
        """Take a dead letter out, as a record to queue again; None if unknown."""
        letters = self._dead.get(process)
        letter = None if letters is None else letters.pop(event_id, None)
        if letter is None:
            return None
        return EventRecord(process, event_id, letter.fields, attempts=letter.attempts)

    async def delete_dead_letter(self, process: str, event_id: str) -> bool:
        """Delete a dead letter; False if unknown."""
        letters = self._dead.get(process)
        return letters is not None and letters.pop(event_id, None) is not None

    async def pending_counts(self) -> dict[str, int]:
        """None: events are not kept here."""
        return {}
