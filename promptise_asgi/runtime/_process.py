"""`AgentProcess`: one named worker that handles `TriggerEvent`s from its own bounded queue, on anyio.

A running process runs `concurrency` worker tasks pulling events from its queue, fed by `inject()` and by its
cron and interval triggers; start, stop and restart are serialised by a lock, and stop drains for
`drain_timeout`. Knows nothing of HTTP or of the runtime that holds it (it gets a `TaskHost` to run in).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus
from croniter import croniter

from .._errors import QueueFullError
from ._host import Run, TaskHost
from ._models import (
    Handler,
    ProcessConfig,
    ProcessState,
    TriggerConfig,
    TriggerEvent,
    callable_name,
    check_process_name,
    describe_error,
    iso_utc,
    resolve_handler,
)
from ._queue import EventQueue

__all__ = ["AgentProcess", "Notify"]

# How a process tells its runtime that something observers care about happened: (change type, its data).
Notify = Callable[[str, dict[str, Any]], None]

logger = logging.getLogger("promptise_asgi.runtime")

# A cron wait re-reads the wall clock at least this often, so a clock step (NTP, suspend/resume) delays a fire
# by at most this much instead of by the whole original wait.
CRON_MAX_SLEEP = 30.0
WORK_BATCH = 64

_RUNNING = ProcessState.RUNNING


class AgentProcess:
    """A named worker that handles `TriggerEvent`s from its own bounded queue.

    Usually created by `AgentRuntime.add_process`. A process created on its own runs its tasks under a private
    supervisor, as the imperative runtime style does.

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
        self._next_fire: list[float | None] = [None] * len(self._config.triggers)
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

    async def inject(self, event: TriggerEvent) -> None:
        """Queue an event; it is handled now if the process is running, else after the next start.

        Raises:
            QueueFullError: the queue holds `max_queue` events; the event was not accepted.
            TypeError: `event` is not a `TriggerEvent`.
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
        queue.put(event)
        self._events_received += 1

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
            next_fire = self._next_fire[index] if running and index < len(self._next_fire) else None
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
        self._next_fire = [None] * len(self._config.triggers)
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
        left = len(self._queue)
        if left and not exiting:  # at an exit, the runtime reports what it discards instead
            logger.warning(
                "Process %r stopped with %d event(s) left after drain_timeout=%ss (%d cut off while being handled, "
                "put back first): they stay queued in memory and run if the process starts again; the memory "
                "store loses them if the runtime exits first",
                self._name,
                left,
                self._config.drain_timeout,
                self._events_requeued - requeued,
            )
        return True

    async def _run_body(self, run: Run, *, task_status: TaskStatus[None]) -> None:
        try:
            with run.workers:
                async with anyio.create_task_group() as tg:
                    for _ in range(self._config.concurrency):
                        tg.start_soon(self._work, run)
                    if any(trigger.type != "event" for trigger in self._config.triggers):
                        tg.start_soon(self._run_triggers, run)
                    self._set_state(_RUNNING)
                    self._started_at = time.monotonic()
                    task_status.started()
        finally:
            self._requeue_interrupted()
            self._set_state(ProcessState.STOPPED)
            self._started_at = None
            self._next_fire = [None] * len(self._next_fire)
            run.done.set()

    def _requeue_interrupted(self) -> None:
        interrupted = list(self._in_flight.values())
        self._in_flight.clear()
        for event in reversed(interrupted):
            self._queue.put_front(event)
        self._events_requeued += len(interrupted)

    def _discard_queued(self, why: str) -> int:
        """Drop every queued event (the runtime is going away), count them and say so; returns how many."""
        left = len(self._queue)
        if left:
            self._queue = EventQueue()
            self._events_discarded += left
            logger.warning("Process %r: %d queued event(s) discarded %s", self._name, left, why)
        return left

    # -- workers ---------------------------------------------------------------------------------------------

    async def _work(self, run: Run) -> None:
        queue = self._queue
        in_flight = self._in_flight
        batch = 0
        while True:
            # Under load, taking one event per event-loop turn lets a busy server accept events far faster
            # than they are handled (the queue fills and callers get 429s): take up to WORK_BATCH queued events
            # in a row without yielding, then wait (and yield) like everyone else.
            event = queue.get_nowait() if batch < WORK_BATCH else None
            if event is None:
                batch = 0
                event = await queue.get()
            batch += 1
            self._taken += 1
            ticket = self._taken
            in_flight[ticket] = event
            handler = self._handler
            if handler is None:
                self._events_handled += 1
            else:
                try:
                    await handler(event)
                except Exception as exc:
                    self._events_failed += 1
                    self._last_error = describe_error(exc)
                    logger.exception("Process %r handler failed on event %s", self._name, event.event_id)
                else:
                    self._events_handled += 1
            # Not reached when the handler is cancelled: the event stays in `in_flight` to be requeued.
            del in_flight[ticket]
            self._last_event_id = event.event_id
            if run.draining and not in_flight and not len(queue):
                run.workers.cancel()

    # -- triggers --------------------------------------------------------------------------------------------

    async def _run_triggers(self, run: Run) -> None:
        with run.triggers:
            async with anyio.create_task_group() as tg:
                for index, trigger in enumerate(self._config.triggers):
                    if trigger.type == "interval":
                        tg.start_soon(self._interval_loop, index, trigger)
                    elif trigger.type == "cron":
                        tg.start_soon(self._cron_loop, index, trigger)

    async def _interval_loop(self, index: int, trigger: TriggerConfig) -> None:
        period = trigger.interval_seconds
        assert period is not None
        trigger_id = f"{self._name}:interval:{index}"
        deadline = anyio.current_time() + period
        while True:
            self._next_fire[index] = self._clock() + (deadline - anyio.current_time())
            await anyio.sleep_until(deadline)
            self._fire(trigger_id, "interval")
            # Skip ticks missed while the loop was blocked instead of firing a burst to catch up.
            deadline = max(deadline + period, anyio.current_time())

    async def _cron_loop(self, index: int, trigger: TriggerConfig) -> None:
        expression = trigger.cron_expression
        assert expression is not None
        trigger_id = f"{self._name}:cron:{index}"
        last_fire = float("-inf")
        while True:
            base = max(self._clock(), last_fire)
            fire_at = croniter(expression, datetime.fromtimestamp(base, UTC)).get_next(float)
            self._next_fire[index] = fire_at
            # Bounded sleeps that re-read the wall clock, not an event: only time makes a cron trigger due.
            while (remaining := fire_at - self._clock()) > 0:  # noqa: ASYNC110
                await anyio.sleep(min(remaining, CRON_MAX_SLEEP))
            self._fire(trigger_id, "cron")
            last_fire = fire_at

    def _fire(self, trigger_id: str, trigger_type: str) -> None:
        if len(self._queue) >= self._max_queue:
            self._events_refused += 1
            logger.warning(
                "Process %r: trigger %s refused an event, the queue is full (%d)",
                self._name,
                trigger_id,
                self._max_queue,
            )
            return
        self._queue.put(TriggerEvent(trigger_id=trigger_id, trigger_type=trigger_type))
        self._events_received += 1
