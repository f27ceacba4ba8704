"""`Ledger`: what one process's events owe its event store, and the writes that settle the account.

A process tells its ledger about an event at each point a durable store must know of: accepted, about to be
delivered (marked in flight, in one commit for a window of queued events, before any handler runs), delivered,
failed and waiting for a retry, cut off by a stop, given up as a dead letter, recovered after a crash. Over a
store that is not durable the ledger writes no events; it still keeps what a memory store can promise (dead
letters, idempotency keys, redelivery counts). Knows nothing of HTTP, of triggers or of the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio

from .._errors import EventStoreError
from ..store import DeadLetter, EventStore
from ._models import ProcessConfig, TriggerEvent, event_fields, event_from_fields
from ._queue import EventQueue

__all__ = ["WORK_BATCH", "Ledger"]

logger = logging.getLogger("promptise_asgi.runtime")

# Events a worker takes in a row without yielding, and the most it marks in flight in one commit.
WORK_BATCH = 64


class _Mark:
    """The in-flight mark of a window of events: set once committed (or failed)."""

    __slots__ = ("done", "failed")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.failed = False


class Ledger:
    """One process's account with its event store.

    Args:
        name: the process name (the store's key: process ids change per run).
        config: the process config (retry, poison and dead-letter limits).
        store: the runtime's store.
        clock: wall clock in epoch seconds, for dead letter times.
    """

    def __init__(self, name: str, config: ProcessConfig, store: EventStore, clock: Callable[[], float]) -> None:
        self.name = name
        self.config = config
        self.store = store
        self.durable = store.durable
        self.clock = clock
        # Ids of the events a durable store keeps for this process: a second event with one of them is refused.
        self.held: set[str] = set()
        # Queued events whose in-flight mark is committed or on its way, with that mark.
        self.marked: dict[str, tuple[TriggerEvent, _Mark]] = {}
        # In-flight tickets whose handler has not started, and the mark they wait for.
        self.waiting: dict[int, _Mark] = {}
        # Events a crash cut off: delivered one at a time, so only the one that kills the runtime counts a crash.
        self.suspects: set[str] = set()
        # Events whose last delivery was cut off: the next delivery counts as a redelivery.
        self.cut: set[str] = set()
        # Times the handler raised on events that are waiting for a retry or being retried.
        self.errors: dict[str, int] = {}
        self.retrying: dict[str, TriggerEvent] = {}
        self.dead_letters = 0
        self.dropped = 0
        self.recovered = 0
        self.redelivered = 0

    # -- recovery --------------------------------------------------------------------------------------------

    async def recover(self, queue: EventQueue[TriggerEvent]) -> list[DeadLetter]:
        """Queue what the store kept for this name, in acceptance order; returns the events it gave up."""
        recovery = await self.store.recover(
            self.name, poison_after=self.config.poison_after, max_dead_letters=self.config.max_dead_letters
        )
        for record in recovery.pending:
            event = event_from_fields(record.event_id, record.fields, record.attempts)
            queue.put(event)
            self.held.add(record.event_id)
            if record.errors:
                self.errors[record.event_id] = record.errors
            if record.crashes:
                self.suspects.add(record.event_id)
            if record.cut:
                self.cut.add(record.event_id)
        self.recovered += len(recovery.pending)
        self.dead_letters = recovery.dead_letters
        self._count_dropped(recovery.dropped)
        if recovery.pending:
            crashed = f" ({len(self.suspects)} cut off by a crash, delivered one at a time)" if self.suspects else ""
            logger.warning(
                "Process %r: %d event(s) recovered from the event store %s, delivered before new ones%s",
                self.name,
                len(recovery.pending),
                self.store.location,
                crashed,
            )
        for letter in recovery.dead:
            logger.error(
                "Process %r: event %s moved to the dead letters: its delivery was cut off by a crash "
                "poison_after=%d times in a row",
                self.name,
                letter.event_id,
                self.config.poison_after,
            )
        return recovery.dead

    # -- delivery --------------------------------------------------------------------------------------------

    async def mark(self, event: TriggerEvent, ticket: int, queue: EventQueue[TriggerEvent]) -> bool:
        """Return once `event` is marked in flight in the store; False if the store failed (nothing changed).

        The first worker to take an unmarked event marks a window of up to `WORK_BATCH` events from the front
        of the queue in one commit, so the workers taking the next ones find them marked. A suspect (cut off
        by a crash) is marked alone and never joins a window.
        """
        entry = self.marked.pop(event.event_id, None)
        if entry is not None:
            mark = entry[1]
            if not mark.done.is_set():
                self.waiting[ticket] = mark
                await mark.done.wait()  # cancelled here: the ticket stays waiting, its handler never started
                del self.waiting[ticket]
            return not mark.failed
        window = [event]
        if event.event_id not in self.suspects:
            for queued in queue.peek(WORK_BATCH - 1):
                if queued.event_id in self.suspects:
                    break
                window.append(queued)
        mark = _Mark()
        for queued in window[1:]:
            self.marked[queued.event_id] = (queued, mark)
        self.waiting[ticket] = mark
        try:
            # Shielded: a stop waits for this commit, so the store and this ledger agree on what is in flight.
            with anyio.CancelScope(shield=True):
                await self.store.start_deliveries(self.name, [(e.event_id, e.attempt) for e in window])
        except EventStoreError as exc:
            mark.failed = True
            del self.waiting[ticket]
            for queued in window[1:]:
                self.marked.pop(queued.event_id, None)
            logger.error("Process %r: cannot mark events in flight, delivery paused: %s", self.name, exc)
            return False
        finally:
            mark.done.set()
        del self.waiting[ticket]
        return True

    def others_ready(self) -> bool:
        """Whether a worker holds an event whose mark is committed but has not started it yet."""
        return any(mark.done.is_set() for mark in self.waiting.values())

    def delivering(self, event: TriggerEvent) -> None:
        """A delivery starts: count it as a redelivery if the last one was cut off."""
        if event.event_id in self.cut:
            self.cut.discard(event.event_id)
            self.redelivered += 1

    def finished(self, event: TriggerEvent) -> None:
        """A delivery ended for good: the store forgets the event."""
        event_id = event.event_id
        self.errors.pop(event_id, None)
        self.suspects.discard(event_id)
        if self.durable:
            self.held.discard(event_id)
            self.store.finish_delivery(self.name, event_id)

    def failed(self, event: TriggerEvent, errors: int) -> None:
        """The handler raised and the event will be delivered again: it waits as delivery `attempt + 1`."""
        event_id = event.event_id
        self.errors[event_id] = errors
        self.suspects.discard(event_id)
        if self.durable:
            self.store.record_failure(self.name, event_id, attempts=event.attempt, errors=errors)
        event.attempt += 1

    async def retry_later(self, event: TriggerEvent, delay: float, queue: EventQueue[TriggerEvent]) -> None:
        """Queue a failed event again after `delay` seconds (at once if the workers stop meanwhile)."""
        self.retrying[event.event_id] = event
        try:
            await anyio.sleep(delay)
        finally:
            # Also when the workers stop: the event waits in the queue for the next start, not in a timer.
            if self.retrying.pop(event.event_id, None) is not None:
                queue.put(event)

    async def bury(self, event: TriggerEvent, reason: str, error: str | None) -> DeadLetter | None:
        """Move an event to the dead letters; None if the store failed (a durable one still holds the event,
        which the next runtime delivers again)."""
        event_id = event.event_id
        self.errors.pop(event_id, None)
        self.suspects.discard(event_id)
        self.cut.discard(event_id)
        self.held.discard(event_id)
        letter = DeadLetter(self.name, event_id, event_fields(event), event.attempt, reason, error, self.clock())
        try:
            dropped = await self.store.move_to_dead_letters(letter, max_dead_letters=self.config.max_dead_letters)
        except (EventStoreError, ValueError) as exc:
            logger.error("Process %r: cannot move event %s to the dead letters: %s", self.name, event_id, exc)
            return None
        self.dead_letters += 1 - dropped
        self._count_dropped(dropped)
        return letter

    def _count_dropped(self, dropped: int) -> None:
        if dropped:
            self.dropped += dropped
            logger.warning(
                "Process %r: dropped the %d oldest dead letter(s) to keep max_dead_letters=%d (%d dropped so far)",
                self.name,
                dropped,
                self.config.max_dead_letters,
                self.dropped,
            )

    def release(self, interrupted: list[tuple[int, TriggerEvent]]) -> None:
        """Workers stopped: in-flight events and events marked ahead of them wait again.

        A delivery whose handler had started was cut off: its event comes back as the next attempt. One whose
        handler had not started (its mark was not yet committed, or it was only marked ahead) keeps its number.
        """
        releases: list[tuple[str, int, bool]] = []
        for ticket, event in interrupted:
            if ticket in self.waiting:
                releases.append((event.event_id, event.attempt - 1, event.event_id in self.cut))
                continue
            releases.append((event.event_id, event.attempt, True))
            self.cut.add(event.event_id)
            event.attempt += 1
        for event, _ in self.marked.values():
            releases.append((event.event_id, event.attempt - 1, event.event_id in self.cut))
        self.marked.clear()
        self.waiting.clear()
        if self.durable and releases:
            self.store.release(self.name, releases)

    def forget_queued(self) -> None:
        """The process left its runtime: what it held stays in a durable store, for a process of its name."""
        self.held.clear()
        self.suspects.clear()
        self.cut.clear()
        self.errors.clear()

    def status(self) -> dict[str, Any]:
        """The ledger's part of the process status."""
        return {
            "store": self.store.kind,
            "events_recovered": self.recovered,
            "events_redelivered": self.redelivered,
            "retrying": len(self.retrying),
            "dead_letters": self.dead_letters,
            "dead_letters_dropped": self.dropped,
        }
