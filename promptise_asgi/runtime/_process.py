"""`AgentProcess`: one named worker that handles `TriggerEvent`s from its own bounded queue, on anyio.

A running process runs `concurrency` worker tasks pulling events from its queue, fed by `inject()` and by its
cron and interval triggers; start, stop and restart are serialised by a lock, and stop drains for
`drain_timeout`. A handler that raises is retried with backoff, then its event becomes a dead letter. What the
event store must hear of is told to the process's `Ledger`. Knows nothing of HTTP or of the runtime that holds
it (it gets a `TaskHost` to run in, and the runtime's store).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from .._errors import EventStoreError, QueueFullError
from .._validation import check_count, check_idempotency_key
from ..store import DeadLetter, EventRecord, EventStore, IdempotencyKey, MemoryStore
from ._host import Run, TaskHost
from ._ledger import WORK_BATCH, Ledger
from ._models import (
    Handler,
    ProcessConfig,
    ProcessState,
    TriggerEvent,
    callable_name,
    check_process_name,
    describe_error,
    event_fields,
    event_from_fields,
    fingerprint_of,
    iso_utc,
    resolve_handler,
    retry_delay,
)
from ._queue import EventQueue
from ._triggers import Triggers

__all__ = ["AgentProcess", "Notify"]

# How a process tells its runtime that something observers care about happened: (change type, its data).
Notify = Callable[[str, dict[str, Any]], None]

logger = logging.getLogger("promptise_asgi.runtime")

# A worker whose store failed waits this long before it tries to mark events in flight again.
STORE_RETRY_DELAY = 1.0

_RUNNING = ProcessState.RUNNING


class AgentProcess:
    """A named worker that handles `TriggerEvent`s from its own bounded queue.

    Usually created by `AgentRuntime.add_process`, which gives it the runtime's event store. A process created
    on its own runs its tasks under a private supervisor, as the imperative runtime style does, with a
    `MemoryStore` of its own.

    Args:
        name: the process name (non-empty, no `/`).
        config: the process config; defaults to `ProcessConfig()` (no handler, no triggers).
        clock: wall clock in epoch seconds, used for cron schedules.
    """

    def __init__(
        self,
        name: str,
        config: ProcessConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        _host: TaskHost | None = None,
        _notify: Notify | None = None,
        _store: EventStore | None = None,
    ) -> None:
        check_process_name(name)
        self._name = name
        self._process_id = str(uuid.uuid4())
        self._config = config if config is not None else ProcessConfig()
        self._clock = clock
        # A process created on its own owns its supervisor and closes it on stop; one from a runtime shares it.
        self._owns_host = _host is None
        self._host = _host if _host is not None else TaskHost()
        self._state = ProcessState.CREATED
        self._notify = _notify
        self._lock = anyio.Lock()
        self._queue: EventQueue[TriggerEvent] = EventQueue()
        self._max_queue = self._config.max_queue
        self._handler: Handler | None = None
        # Events being handled, keyed by take order: what is left here when workers are cancelled goes back to
        # the front of the queue in that order.
        self._in_flight: dict[int, TriggerEvent] = {}
        self._taken = 0
        self._run: Run | None = None
        self._started_at: float | None = None
        self._triggers = Triggers(name, self._config.triggers, clock, self._fire)
        self._removed = False
        self._events_received = 0
        self._events_handled = 0
        self._events_failed = 0
        self._events_refused = 0
        self._events_requeued = 0
        self._events_discarded = 0
        self._restart_count = 0
        self._last_error: str | None = None
        self._last_event_id: str | None = None
        self._events_retried = 0
        self._store = _store if _store is not None else MemoryStore()
        self._durable = self._store.durable
        self._ledger = Ledger(name, self._config, self._store, clock)

    @property
    def name(self) -> str:
        """The process name."""
        return self._name

    @property
    def process_id(self) -> str:
        """A uuid4 string, fixed for the life of this object."""
        return self._process_id

    @property
    def state(self) -> ProcessState:
        """The lifecycle state."""
        return self._state

    @property
    def config(self) -> ProcessConfig:
        """The config this process was created with."""
        return self._config

    async def inject(
        self, event: TriggerEvent, *, idempotency_key: str | None = None, fingerprint: str | None = None
    ) -> str:
        """Queue an event; it is handled now if the process is running, else after the next start.

        With a durable store (`SQLiteStore`) the event is committed to it when this returns, and survives a
        crash of the process.

        Args:
            event: the event.
            idempotency_key: 1-255 printable ASCII characters. If this process accepted the same key within
                `idempotency_ttl`, nothing is queued and the first event's id is returned.
            fingerprint: what the request looked like, compared for a key seen before (default: a hash of
                the event's trigger_id, trigger_type, payload and metadata).

        Returns:
            The id of the accepted event: `event.event_id`, or the first event's id for a key seen before.

        Raises:
            QueueFullError: the queue holds `max_queue` events; the event was not accepted.
            IdempotencyKeyConflictError: the key was accepted with a different fingerprint.
            EventStoreError: the store could not commit the event; it was not accepted.
            TypeError: `event` is not a `TriggerEvent`.
            ValueError: a bad key; or with a durable store, an event id this process holds already, or a
                payload that is not JSON.
            RuntimeError: the process was removed from its runtime.
        """
        if not isinstance(event, TriggerEvent):
            raise TypeError(f"inject() needs a TriggerEvent, got {type(event).__name__}")
        if self._removed:
            raise RuntimeError(f"Process '{self._name}' was removed from its runtime; it takes no more events")
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._events_refused += 1
            raise QueueFullError(self._name, self._max_queue)
        if idempotency_key is None and not self._durable:
            queue.put(event)
            self._events_received += 1
            return event.event_id
        return await self._accept(event, idempotency_key, fingerprint)

    async def _accept(self, event: TriggerEvent, key: str | None, fingerprint: str | None) -> str:
        ledger = self._ledger
        event_id = event.event_id
        if self._durable and event_id in ledger.held:
            raise ValueError(f"Process '{self._name}' already holds an event with id {event_id!r}")
        record = EventRecord(self._name, event_id, event_fields(event))
        if key is None:
            # Queued before the commit, with no checkpoint between: the queue's order is the order of the
            # store's writes, which is acceptance order. The worker's in-flight mark is written after this
            # event, so no handler sees it before it is committed.
            ledger.held.add(event_id)
            self._queue.put(event)
            self._events_received += 1
            try:
                await self._store.add(record)
            except Exception:
                # Not accepted: take it back. A worker may have been handed it already; it skips events the
                # ledger does not hold.
                ledger.held.discard(event_id)
                self._events_received -= 1
                self._queue.remove(event)
                raise
            return event_id
        stored_key = IdempotencyKey(
            check_idempotency_key(key),
            fingerprint if fingerprint is not None else fingerprint_of(event),
            self._clock() + self._config.idempotency_ttl,
        )
        owner = await self._store.add(record, stored_key)
        if owner != event_id:
            return owner
        if self._durable:
            ledger.held.add(event_id)
        self._queue.put(event)
        self._events_received += 1
        return event_id

    async def start(self) -> bool:
        """Start the workers and triggers; a no-op for a running process.

        Returns:
            True if the process was started, False if it was already running.

        Raises:
            ValueError: a `"module:function"` handler cannot be resolved (the process is left `failed`).
            RuntimeError: the process was removed from its runtime.
        """
        async with self._lock:
            return await self._start_locked()

    async def stop(self) -> bool:
        """Stop triggers at once, let queued and running events finish for up to `drain_timeout`, then stop.

        Events still queued (and any whose handler was cut off by the deadline, put back at the front) stay
        queued for the next start.

        Returns:
            True if the process was stopped, False if it was not running.
        """
        async with self._lock:
            changed = await self._stop_locked()
            if self._owns_host:
                await self._host.close()
            return changed

    async def _stop_at_exit(self) -> None:
        async with self._lock:
            await self._stop_locked(exiting=True)
            if self._owns_host:
                await self._host.close()

    async def restart(self) -> None:
        """Stop (if running) then start, as one operation; counts in `restart_count`."""
        async with self._lock:
            await self._stop_locked()
            await self._start_locked()
            self._restart_count += 1

    def status(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this process's state, counters and config."""
        config = self._config
        started_at = self._started_at
        running = self._state is _RUNNING and started_at is not None
        triggers = []
        for index, trigger in enumerate(config.triggers):
            entry = trigger.to_dict()
            entry["trigger_id"] = f"{self._name}:{trigger.type}:{index}"
            next_fire = self._triggers.next_fire[index] if running else None
            entry["next_fire_at"] = iso_utc(next_fire)
            triggers.append(entry)
        handler = config.handler
        return {
            "name": self._name,
            "process_id": self._process_id,
            "state": self._state.value,
            "queue_size": len(self._queue),
            "max_queue": self._max_queue,
            "concurrency": config.concurrency,
            "in_flight": len(self._in_flight),
            "events_received": self._events_received,
            "events_handled": self._events_handled,
            "events_failed": self._events_failed,
            "events_refused": self._events_refused,
            "events_requeued": self._events_requeued,
            "events_discarded": self._events_discarded,
            "events_retried": self._events_retried,
            **self._ledger.status(),
            "last_error": self._last_error,
            "last_event_id": self._last_event_id,
            "uptime_seconds": time.monotonic() - started_at if started_at is not None and running else None,
            "restart_count": self._restart_count,
            "triggers": triggers,
            "handler": handler if isinstance(handler, str) or handler is None else callable_name(handler),
            "instructions": config.instructions,
            "model": config.model,
        }

    # -- lifecycle (callers hold self._lock) -----------------------------------------------------------------

    def _set_state(self, state: ProcessState) -> None:
        previous = self._state
        self._state = state
        if self._notify is not None and state is not previous:
            self._notify("process.state", {"name": self._name, "state": state.value, "previous": previous.value})

    async def _start_locked(self) -> bool:
        if self._removed:
            raise RuntimeError(f"Process '{self._name}' was removed from its runtime")
        if self._state is _RUNNING:
            return False
        previous = self._run
        if previous is not None and not previous.done.is_set():
            # A stop that was itself cancelled left the old workers winding down: let them finish first.
            previous.workers.cancel()
            await previous.done.wait()
        self._set_state(ProcessState.STARTING)
        try:
            self._handler = resolve_handler(self._config.handler)
        except ValueError as exc:
            self._set_state(ProcessState.FAILED)
            self._last_error = describe_error(exc)
            logger.error("Process %r failed to start: %s", self._name, exc)
            raise
        run = self._run = Run()
        self._triggers.reset()
        try:
            task_group = await self._host.task_group()
            await task_group.start(self._run_body, run)
        finally:
            if self._state is ProcessState.STARTING:
                self._set_state(ProcessState.STOPPED)
        return True

    async def _stop_locked(self, *, exiting: bool = False) -> bool:
        if self._state is not _RUNNING:
            return False
        self._set_state(ProcessState.STOPPING)
        run = self._run
        assert run is not None
        requeued = self._events_requeued
        try:
            run.triggers.cancel()
            run.draining = True
            if not self._in_flight and not len(self._queue):
                run.workers.cancel()
            with anyio.move_on_after(self._config.drain_timeout):
                await run.done.wait()
        finally:
            # Past the deadline (or if this stop is cancelled): cut the workers off; `_run_body` puts their
            # events back at the front of the queue and marks the process stopped.
            run.workers.cancel()
        await run.done.wait()
        if self._durable:
            await self._store.flush()  # what the cut-off workers handed back is committed before stop returns
        left = len(self._queue)
        if left and not exiting:  # at an exit, the runtime reports what it discards or keeps instead
            if self._durable:
                where = f"stay queued in the event store {self._store.location} and run when the process starts again"
            else:
                where = (
                    "stay queued in memory and run if the process starts again; the memory store loses them if "
                    "the runtime exits first"
                )
            logger.warning(
                "Process %r stopped with %d event(s) left after drain_timeout=%ss (%d cut off while being handled, "
                "put back first): they %s",
                self._name,
                left,
                self._config.drain_timeout,
                self._events_requeued - requeued,
                where,
            )
        return True

    async def _run_body(self, run: Run, *, task_status: TaskStatus[None]) -> None:
        try:
            with run.workers:
                async with anyio.create_task_group() as tg:
                    run.tasks = tg
                    # Events a crash cut off go one at a time, so a crash in one of them is counted for it alone.
                    solo = bool(self._ledger.suspects)
                    for _ in range(1 if solo else self._config.concurrency):
                        tg.start_soon(self._work, run, solo)
                    if self._triggers.scheduled:
                        tg.start_soon(self._triggers.run, run.triggers)
                    self._set_state(_RUNNING)
                    self._started_at = time.monotonic()
                    task_status.started()
        finally:
            run.tasks = None
            self._requeue_interrupted()
            self._set_state(ProcessState.STOPPED)
            self._started_at = None
            self._triggers.reset()
            run.done.set()

    def _requeue_interrupted(self) -> None:
        interrupted = list(self._in_flight.items())
        self._in_flight.clear()
        for _, event in reversed(interrupted):
            self._queue.put_front(event)
        self._ledger.release(interrupted)
        self._events_requeued += len(interrupted)

    def _discard_queued(self, why: str) -> int:
        """Drop every queued event (the runtime is going away), count them and say so; returns how many."""
        left = len(self._queue)
        if left:
            self._queue = EventQueue()
            self._events_discarded += left
            logger.warning("Process %r: %d queued event(s) discarded %s", self._name, left, why)
        return left

    def _leave(self, why: str) -> None:
        """The runtime exits, or this process leaves it: say what happens to the events it still holds.

        The memory store discards them (counted); a durable store keeps them for the next runtime, or for the
        next process of this name.
        """
        if not self._durable:
            self._discard_queued(why)
            return
        left = len(self._queue)
        if left:
            logger.warning(
                "Process %r: %d queued event(s) stay in the event store %s %s",
                self._name,
                left,
                self._store.location,
                "for the next process of this name" if self._removed else "for the next run",
            )
        if self._removed:
            self._queue = EventQueue()
            self._ledger.forget_queued()

    async def _recover(self) -> list[DeadLetter]:
        """Queue the events the store kept for this name, before any new one; returns the ones it gave up."""
        return await self._ledger.recover(self._queue)

    def _announce(self, letters: list[DeadLetter]) -> None:
        if self._notify is not None:
            for letter in letters:
                self._notify(
                    "process.dead_letter", {"name": self._name, "event_id": letter.event_id, "reason": letter.reason}
                )

    # -- dead letters ----------------------------------------------------------------------------------------

    async def list_dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` dead letters of this process, oldest first.

        Each is `{"event_id", "event", "attempts", "reason", "error", "dead_at"}`: `reason` is `"error"` (the
        handler raised `max_attempts` times; `error` is the last error) or `"interrupted"` (its delivery was cut
        off by `poison_after` crashes in a row); `dead_at` is ISO 8601.

        Raises:
            ValueError: `limit` is not an integer >= 1.
        """
        check_count("limit", limit)
        return [letter.to_dict() for letter in await self._store.dead_letters(self._name, limit)]

    async def retry_dead_letter(self, event_id: str) -> bool:
        """Queue a dead letter again, with its id, behind the events queued now; its retries start afresh.

        Returns:
            False if this process has no dead letter with that id.

        Raises:
            QueueFullError: the queue is full; the dead letter stays.
            ValueError: the process holds an event with that id already (a durable store).
            RuntimeError: the process was removed from its runtime.
        """
        if self._removed:
            raise RuntimeError(f"Process '{self._name}' was removed from its runtime; it takes no more events")
        if len(self._queue) >= self._max_queue:
            self._events_refused += 1
            raise QueueFullError(self._name, self._max_queue)
        ledger = self._ledger
        if self._durable and event_id in ledger.held:
            raise ValueError(f"Process '{self._name}' already holds an event with id {event_id!r}")
        record = await self._store.requeue_dead_letter(self._name, event_id)
        if record is None:
            return False
        ledger.dead_letters -= 1
        if self._durable:
            ledger.held.add(event_id)
        self._queue.put(event_from_fields(record.event_id, record.fields, record.attempts))
        self._events_received += 1
        return True

    async def delete_dead_letter(self, event_id: str) -> bool:
        """Delete a dead letter for good; False if this process has none with that id."""
        deleted = await self._store.delete_dead_letter(self._name, event_id)
        if deleted:
            self._ledger.dead_letters -= 1
        return deleted

    # -- workers ---------------------------------------------------------------------------------------------

    async def _work(self, run: Run, solo: bool = False) -> None:
        queue = self._queue
        in_flight = self._in_flight
        ledger = self._ledger
        durable = self._durable
        cut = ledger.cut
        errors = ledger.errors
        batch = 0
        while True:
            while durable and ledger.waiting and ledger.others_ready():
                # Workers holding events of a window this worker saw committed start them before this one takes
                # more from the queue, so deliveries start in the order they were taken.
                await anyio.lowlevel.checkpoint()
            # Under load, taking one event per event-loop turn lets a busy server accept events far faster
            # than they are handled (the queue fills and callers get 429s): take up to WORK_BATCH queued events
            # in a row without yielding, then wait (and yield) like everyone else.
            event = queue.get_nowait() if batch < WORK_BATCH else None
            if event is None:
                batch = 0
                if durable and not len(queue):
                    await self._store.flush()  # deliveries that ended are committed before this worker idles
                event = await queue.get()
            batch += 1
            self._taken += 1
            ticket = self._taken
            if durable and event.event_id not in ledger.held:
                continue  # its store write failed after it was queued: it was never accepted
            in_flight[ticket] = event
            if durable and not await ledger.mark(event, ticket, queue):
                del in_flight[ticket]
                queue.put_front(event)
                await anyio.sleep(STORE_RETRY_DELAY)
                continue
            if cut:
                ledger.delivering(event)
            handler = self._handler
            if handler is None:
                self._events_handled += 1
                if durable or errors:
                    ledger.finished(event)
            else:
                try:
                    await handler(event)
                except Exception as exc:
                    # Shielded: an event whose handler has returned is not cut off by a stop mid-bookkeeping.
                    with anyio.CancelScope(shield=True):
                        await self._handler_failed(run, event, exc)
                else:
                    self._events_handled += 1
                    if durable or errors:  # the memory store's hot path has nothing to settle
                        ledger.finished(event)
            # Not reached when the handler is cancelled: the event stays in `in_flight` to be requeued.
            del in_flight[ticket]
            self._last_event_id = event.event_id
            if solo and not ledger.suspects:
                solo = False
                tasks = run.tasks
                assert tasks is not None
                for _ in range(self._config.concurrency - 1):
                    tasks.start_soon(self._work, run, False)
            if run.draining and not in_flight and not len(queue):
                run.workers.cancel()

    async def _handler_failed(self, run: Run, event: TriggerEvent, exc: Exception) -> None:
        config = self._config
        self._last_error = describe_error(exc)
        errors = self._ledger.errors.get(event.event_id, 0) + 1
        logger.exception(
            "Process %r handler failed on event %s (attempt %d, error %d of max_attempts=%d)",
            self._name,
            event.event_id,
            event.attempt,
            errors,
            config.max_attempts,
        )
        if errors < config.max_attempts:
            self._events_retried += 1
            self._ledger.failed(event, errors)
            tasks = run.tasks
            assert tasks is not None
            tasks.start_soon(self._ledger.retry_later, event, retry_delay(config.retry_backoff, errors), self._queue)
            return
        self._events_failed += 1
        letter = await self._ledger.bury(event, "error", self._last_error)
        if letter is not None:
            logger.warning(
                "Process %r: event %s moved to the dead letters after %d failed attempt(s)",
                self._name,
                event.event_id,
                errors,
            )
            self._announce([letter])

    # -- triggers --------------------------------------------------------------------------------------------

    async def _fire(self, trigger_id: str, trigger_type: str) -> None:
        if len(self._queue) >= self._max_queue:
            self._events_refused += 1
            logger.warning(
                "Process %r: trigger %s refused an event, the queue is full (%d)",
                self._name,
                trigger_id,
                self._max_queue,
            )
            return
        event = TriggerEvent(trigger_id=trigger_id, trigger_type=trigger_type)
        if not self._durable:
            self._queue.put(event)
            self._events_received += 1
            return
        try:
            await self._accept(event, None, None)
        except EventStoreError as exc:
            logger.error("Process %r: trigger %s could not queue an event: %s", self._name, trigger_id, exc)
