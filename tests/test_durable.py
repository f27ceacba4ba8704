"""The runtime on an event store (SPEC 12): recovery after a crash, retries, dead letters, idempotency keys.

A crash is simulated in process by copying the committed state of a live SQLite store (what `kill -9` leaves)
and starting a new runtime on the copy; tests/test_crash.py kills real node processes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import WAIT, crash_copy, wait_for

from promptise_asgi.runtime import AgentRuntime, ProcessConfig, QueueFullError, TriggerConfig, TriggerEvent
from promptise_asgi.runtime import _process as process_module
from promptise_asgi.runtime._models import MAX_RETRY_DELAY, retry_delay
from promptise_asgi.runtime._queue import EventQueue
from promptise_asgi.store import (
    EventStore,
    EventStoreError,
    IdempotencyKeyConflictError,
    MemoryStore,
    SQLiteStore,
)


class Deliveries:
    """A handler recording (event id, attempt) per delivery; `block` holds the events it names forever."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.block: set[str] = set()
        self.blocked = anyio.Event()

    async def __call__(self, event: TriggerEvent) -> None:
        self.seen.append((event.event_id, event.attempt))
        if event.event_id in self.block or event.payload.get("block"):
            self.blocked.set()
            await anyio.sleep_forever()

    @property
    def ids(self) -> list[str]:
        return [event_id for event_id, _ in self.seen]


def ev(index: int = 0, **payload: Any) -> TriggerEvent:
    return TriggerEvent("t", "remote", {"i": index, **payload})


async def crashed_while(path: Path, handler: Deliveries, events: list[TriggerEvent]) -> Path:
    """Run a runtime on the store `path` (queueing `events`) until `handler` blocks; return the store a crash at
    that moment leaves (a copy beside it)."""
    runtime = AgentRuntime(store=SQLiteStore(path))
    process = await runtime.add_process("w", ProcessConfig(handler=handler, drain_timeout=0))
    for event in events:
        await process.inject(event)
    await runtime.start_all()
    with anyio.fail_after(WAIT):
        await handler.blocked.wait()
    copy = crash_copy(path, path.with_name(f"{path.stem}-crashed.sqlite3"))
    await runtime.aclose()
    return copy


class TestRecovery:
    async def test_queued_and_in_flight_events_go_to_the_next_runtime_first_in_acceptance_order(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        first = Deliveries()
        events = [ev(i) for i in range(5)]
        first.block.add(events[1].event_id)
        crashed = await crashed_while(tmp_path / "a.sqlite3", first, events)
        assert first.ids == [e.event_id for e in events[:2]]

        again = Deliveries()
        caplog.set_level(logging.WARNING, logger="promptise_asgi.runtime")
        async with AgentRuntime(store=SQLiteStore(crashed)) as runtime:
            process = await runtime.add_process("w", ProcessConfig(handler=again, concurrency=3))
            status = process.status()
            assert (status["store"], status["queue_size"], status["events_recovered"]) == ("sqlite", 5, 5)
            late = ev(99)
            await process.inject(late)
            await runtime.start_all()
            await wait_for(lambda: len(again.seen) == 6)
            status = process.status()
        # At least once: event 0 was handled before the crash, but its end was not committed yet.
        assert again.ids == [e.event_id for e in [*events, late]]
        # Events the crash found in flight come back as a later attempt; the new one is a first delivery.
        assert again.seen[1] == (events[1].event_id, 2) and again.seen[-1] == (late.event_id, 1)
        assert status["events_redelivered"] == sum(1 for _, attempt in again.seen if attempt > 1) >= 2
        assert any("5 event(s) recovered from the event store" in m for m in caplog.messages)

    async def test_an_event_that_keeps_killing_the_runtime_becomes_a_dead_letter(self, tmp_path: Path) -> None:
        poison, innocent = ev(0, block=True), ev(1)
        store = await crashed_while(tmp_path / "r.sqlite3", Deliveries(), [poison, innocent])
        for round_ in (1, 2):
            # Cut off by a crash: delivered alone, so only the event that crashes counts the crash.
            handler = Deliveries()
            store = await crashed_while(store, handler, [])
            assert handler.seen == [(poison.event_id, round_ + 1)]
        seen: list[Any] = []
        survivor = Deliveries()
        async with AgentRuntime(store=SQLiteStore(store)) as runtime:
            runtime.add_observer(lambda change, data: seen.append((change, data)))
            process = await runtime.add_process("w", ProcessConfig(handler=survivor))
            await runtime.start_all()
            await wait_for(lambda: survivor.ids == [innocent.event_id])
            [letter] = await process.list_dead_letters()
            assert process.status()["dead_letters"] == 1
        assert (letter["event_id"], letter["reason"], letter["error"], letter["attempts"]) == (
            poison.event_id,
            "interrupted",
            None,
            3,
        )
        assert letter["event"]["payload"] == {"i": 0, "block": True}
        assert ("process.dead_letter", {"name": "w", "event_id": poison.event_id, "reason": "interrupted"}) in seen
        assert seen.index(("process.added", {"name": "w"})) < len(seen) - 1

    async def test_a_failed_event_keeps_its_error_count_and_a_window_stops_at_a_suspect(self, tmp_path: Path) -> None:
        failing, blocking = ev(0), ev(1, block=True)
        errors: list[tuple[str, int]] = []

        class FailsFirst(Deliveries):
            async def __call__(self, event: TriggerEvent) -> None:
                if event.event_id == failing.event_id:
                    errors.append((event.event_id, event.attempt))
                    raise RuntimeError("once more")
                await super().__call__(event)

        path = tmp_path / "e.sqlite3"
        handler = FailsFirst()
        runtime = AgentRuntime(store=SQLiteStore(path))
        config = ProcessConfig(handler=handler, max_attempts=2, retry_backoff=MAX_RETRY_DELAY, drain_timeout=0)
        process = await runtime.add_process("w", config)
        await process.inject(failing)
        await runtime.start_all()
        await wait_for(lambda: process.status()["retrying"] == 1)
        await process.inject(blocking)
        with anyio.fail_after(WAIT):
            await handler.blocked.wait()
        crashed = crash_copy(path, tmp_path / "e-crashed.sqlite3")
        await runtime.aclose()

        # The failed event waits (one error down), the blocked one was cut off by the crash.
        again = FailsFirst()
        async with AgentRuntime(store=SQLiteStore(crashed)) as runtime:
            process = await runtime.add_process("w", ProcessConfig(handler=again, max_attempts=2, drain_timeout=0))
            await runtime.start_all()
            await wait_for(lambda: process.status()["dead_letters"] == 1 and len(again.seen) == 1)
            [letter] = await process.list_dead_letters()
        # Its second error is its last (max_attempts=2): the error count came back with it.
        assert errors == [(failing.event_id, 1), (failing.event_id, 2)] and letter["event_id"] == failing.event_id
        assert again.seen == [(blocking.event_id, 2)]

    async def test_events_of_a_name_the_runtime_lacks_wait_in_the_store_and_are_logged(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / "o.sqlite3"
        async with AgentRuntime(store=SQLiteStore(path)) as runtime:
            process = await runtime.add_process("gone", ProcessConfig())
            for index in range(3):
                await process.inject(ev(index))
        handler = Deliveries()
        async with AgentRuntime(store=SQLiteStore(path)) as runtime:
            await runtime.add_process("other", ProcessConfig())
            caplog.set_level(logging.WARNING, logger="promptise_asgi.runtime")
            await runtime.start_all()
            assert any("holds 3 event(s) for process 'gone'" in message for message in caplog.messages)
            await runtime.add_process("gone", ProcessConfig(handler=handler))
            await runtime.start_process("gone")
            await wait_for(lambda: len(handler.seen) == 3)


class TestRetries:
    async def test_a_raising_handler_is_retried_with_backoff_then_succeeds(self, event_store: EventStore) -> None:
        times: list[float] = []

        async def flaky(event: TriggerEvent) -> None:
            times.append(anyio.current_time())
            if event.attempt < 3:
                raise RuntimeError(f"attempt {event.attempt}")

        async with AgentRuntime(store=event_store) as runtime:
            process = await runtime.add_process("w", ProcessConfig(handler=flaky, max_attempts=3, retry_backoff=0.05))
            await runtime.start_all()
            await process.inject(ev())
            await wait_for(lambda: process.status()["events_handled"] == 1)
            status = process.status()
        assert len(times) == 3
        assert times[1] - times[0] >= 0.05 and times[2] - times[1] >= 0.1  # doubles each time
        assert (status["events_retried"], status["events_failed"], status["dead_letters"]) == (2, 0, 0)
        assert status["last_error"] == "RuntimeError: attempt 2"

    def test_backoff_doubles_and_is_capped(self) -> None:
        assert [retry_delay(0.5, n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
        assert retry_delay(0.5, 30) == MAX_RETRY_DELAY == 30.0
        assert retry_delay(0, 5) == 0

    async def test_an_event_that_always_fails_becomes_a_dead_letter_and_can_be_retried_or_deleted(
        self, event_store: EventStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        attempts: list[int] = []
        healed = anyio.Event()

        async def failing(event: TriggerEvent) -> None:
            attempts.append(event.attempt)
            if not healed.is_set():
                raise ValueError("bad payload")

        seen: list[tuple[str, dict[str, Any]]] = []
        async with AgentRuntime(store=event_store) as runtime:
            runtime.add_observer(lambda change, data: seen.append((change, data)))
            process = await runtime.add_process("w", ProcessConfig(handler=failing, max_attempts=2, retry_backoff=0))
            await runtime.start_all()
            doomed, other = ev(1), ev(2)
            await process.inject(doomed)
            await process.inject(other)
            await wait_for(lambda: process.status()["dead_letters"] == 2)
            # Their retries raced (backoff 0), so they died in either order.
            letters = {letter["event_id"]: letter for letter in await process.list_dead_letters()}
            assert set(letters) == {doomed.event_id, other.event_id}
            letter = letters[doomed.event_id]
            assert letter["reason"] == "error" and letter["error"] == "ValueError: bad payload"
            assert letter["attempts"] == 2 and letter["event"]["payload"] == {"i": 1}
            assert ("process.dead_letter", {"name": "w", "event_id": doomed.event_id, "reason": "error"}) in seen
            status = process.status()
            assert (status["events_failed"], status["events_retried"], status["events_handled"]) == (2, 2, 0)

            healed.set()
            assert await process.retry_dead_letter(doomed.event_id) is True
            await wait_for(lambda: process.status()["events_handled"] == 1)
            assert await process.retry_dead_letter(doomed.event_id) is False
            assert attempts[-1] == 3  # deliveries keep counting across a retry by hand
            assert await process.delete_dead_letter(other.event_id) is True
            assert await process.delete_dead_letter(other.event_id) is False
            assert await process.list_dead_letters() == [] and process.status()["dead_letters"] == 0
        assert any("moved to the dead letters after 2 failed attempt(s)" in m for m in caplog.messages)

    async def test_dead_letters_are_capped_with_a_log_line_and_a_count(
        self, event_store: EventStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def failing(event: TriggerEvent) -> None:
            raise RuntimeError("no")

        async with AgentRuntime(store=event_store) as runtime:
            config = ProcessConfig(handler=failing, max_dead_letters=2)
            process = await runtime.add_process("w", config)
            await runtime.start_all()
            events = [ev(i) for i in range(3)]
            for event in events:
                await process.inject(event)
            await wait_for(lambda: process.status()["dead_letters_dropped"] == 1)
            assert process.status()["dead_letters"] == 2
            letters = await process.list_dead_letters(limit=5)
            assert [letter["event_id"] for letter in letters] == [e.event_id for e in events[1:]]
            assert [letter["event_id"] for letter in await process.list_dead_letters(limit=1)] == [events[2].event_id]
            with pytest.raises(ValueError, match="limit"):
                await process.list_dead_letters(limit=0)
        assert any("dropped the 1 oldest dead letter(s) to keep max_dead_letters=2" in m for m in caplog.messages)

    async def test_a_retry_waiting_at_stop_waits_in_the_queue_instead(self, event_store: EventStore) -> None:
        calls: list[int] = []

        async def failing(event: TriggerEvent) -> None:
            calls.append(event.attempt)
            raise RuntimeError("later")

        async with AgentRuntime(store=event_store) as runtime:
            config = ProcessConfig(handler=failing, max_attempts=5, retry_backoff=MAX_RETRY_DELAY)
            process = await runtime.add_process("w", config)
            await runtime.start_all()
            await process.inject(ev())
            await wait_for(lambda: process.status()["retrying"] == 1)
            await runtime.stop_all()
            status = process.status()
            assert (status["retrying"], status["queue_size"], calls) == (0, 1, [1])

    async def test_retrying_a_dead_letter_respects_the_queue_bound(self, event_store: EventStore) -> None:
        runtime = AgentRuntime(store=event_store)
        process = await runtime.add_process("w", ProcessConfig(max_queue=1))
        await process.inject(ev())
        with pytest.raises(QueueFullError):
            await process.retry_dead_letter("any")
        assert process.status()["events_refused"] == 1
        await runtime.remove_process("w")
        with pytest.raises(RuntimeError, match="removed"):
            await process.retry_dead_letter("any")
        await runtime.aclose()


class TestIdempotencyKeys:
    async def test_a_key_queues_one_event_and_answers_its_id(self, event_store: EventStore) -> None:
        runtime = AgentRuntime(store=event_store)
        process = await runtime.add_process("w", ProcessConfig())
        first, second, third = ev(1), ev(1), ev(2)
        assert await process.inject(first, idempotency_key="k") == first.event_id
        assert await process.inject(second, idempotency_key="k") == first.event_id
        with pytest.raises(IdempotencyKeyConflictError):
            await process.inject(third, idempotency_key="k")
        # A caller's own fingerprint (the HTTP API's: the request body) replaces the event's.
        assert await process.inject(third, idempotency_key="k2", fingerprint="body") == third.event_id
        assert await process.inject(ev(3), idempotency_key="k2", fingerprint="body") == third.event_id
        with pytest.raises(ValueError, match="Idempotency-Key"):
            await process.inject(ev(), idempotency_key="é")
        assert process.status()["queue_size"] == process.status()["events_received"] == 2
        await runtime.aclose()


class TestStoreFailures:
    async def test_an_event_the_store_cannot_commit_is_not_accepted(self) -> None:
        class FullDisk(MemoryStore):
            durable = True  # type: ignore[assignment]

            async def add(self, record: Any, key: Any = None) -> str:
                raise EventStoreError("event store x: a write failed (disk full)")

        runtime = AgentRuntime(store=FullDisk())
        process = await runtime.add_process("w", ProcessConfig())
        with pytest.raises(EventStoreError, match="disk full"):
            await process.inject(ev())
        assert process.status()["queue_size"] == process.status()["events_received"] == 0
        await runtime.aclose()

    async def test_a_store_that_cannot_mark_pauses_delivery_until_it_can(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.setattr(process_module, "STORE_RETRY_DELAY", 0.01)

        class Flaky(MemoryStore):
            durable = True  # type: ignore[assignment]
            failures = 2

            async def start_deliveries(self, process: str, deliveries: Any) -> None:
                if self.failures:
                    self.failures -= 1
                    raise EventStoreError("busy")

            async def move_to_dead_letters(self, letter: Any, *, max_dead_letters: int) -> int:
                raise EventStoreError("cannot bury")

        async def failing(event: TriggerEvent) -> None:
            if event.payload.get("fail"):
                raise RuntimeError("no")

        handler = Deliveries()
        async with AgentRuntime(store=Flaky()) as runtime:
            process = await runtime.add_process("w", ProcessConfig(handler=handler, concurrency=2))
            broken = await runtime.add_process("b", ProcessConfig(handler=failing))
            await runtime.start_all()
            await process.inject(ev(1))
            await process.inject(ev(2))
            await wait_for(lambda: len(handler.seen) == 2)
            await broken.inject(ev(fail=True))
            await wait_for(lambda: broken.status()["events_failed"] == 1)
            assert broken.status()["dead_letters"] == 0
        assert any("cannot mark events in flight" in m for m in caplog.messages)
        assert any("cannot move event" in m for m in caplog.messages)

    async def test_a_stop_while_workers_wait_for_a_mark_hands_back_what_never_started(self) -> None:
        gate = anyio.Event()
        released: list[tuple[str, int, bool]] = []

        class SlowDisk(MemoryStore):
            durable = True  # type: ignore[assignment]

            async def start_deliveries(self, process: str, deliveries: Any) -> None:
                await gate.wait()

            def release(self, process: str, deliveries: Any) -> None:
                released.extend(deliveries)

        handler = Deliveries()
        runtime = AgentRuntime(store=SlowDisk())
        process = await runtime.add_process("w", ProcessConfig(handler=handler, concurrency=2, drain_timeout=0))
        first, second, third = ev(1), ev(2), ev(3)
        for event in (first, second, third):
            await process.inject(event)
        await runtime.start_all()
        await wait_for(lambda: process.status()["in_flight"] == 2)  # one marks the window, one waits for it
        async with anyio.create_task_group() as tg:
            tg.start_soon(process.stop)
            await wait_for(lambda: process.state == "stopping")
            gate.set()
        # The worker that marked the window had its handler called before the stop reached it.
        assert handler.ids == [first.event_id]
        by_id = {event_id: (attempts, cut) for event_id, attempts, cut in released}
        # The waiting worker's event and the one marked ahead never started: they keep their delivery number.
        assert by_id[second.event_id] == (0, False) and by_id[third.event_id] == (0, False)
        assert process.status()["queue_size"] == 2
        await runtime.aclose()

    async def test_a_trigger_whose_event_the_store_refuses_logs_it(self, caplog: pytest.LogCaptureFixture) -> None:
        class FullDisk(MemoryStore):
            durable = True  # type: ignore[assignment]

            async def add(self, record: Any, key: Any = None) -> str:
                raise EventStoreError("disk full")

        trigger = TriggerConfig(type="interval", interval_seconds=0.01)
        async with AgentRuntime(store=FullDisk()) as runtime:
            process = await runtime.add_process("w", ProcessConfig(triggers=[trigger]))
            await runtime.start_all()
            await wait_for(lambda: any("could not queue an event: disk full" in m for m in caplog.messages))
            assert process.status()["events_received"] == 0

    async def test_a_queue_removes_only_what_it_holds(self) -> None:
        queue: EventQueue[str] = EventQueue()
        queue.put("a")
        assert queue.remove("b") is False and len(queue) == 1
        assert queue.remove("a") is True and queue.remove("a") is False and len(queue) == 0

    async def test_a_durable_process_refuses_a_second_event_with_an_id_it_holds(self, tmp_path: Path) -> None:
        async with AgentRuntime(store=SQLiteStore(tmp_path / "ids.sqlite3")) as runtime:
            process = await runtime.add_process("w", ProcessConfig())
            event = ev()
            await process.inject(event)
            with pytest.raises(ValueError, match="already holds an event"):
                await process.inject(TriggerEvent("t", event_id=event.event_id))
            with pytest.raises(ValueError, match="already holds an event"):
                await process.retry_dead_letter(event.event_id)
            with pytest.raises(ValueError, match="JSON"):
                await process.inject(TriggerEvent("t", payload={"x": object()}))
            assert process.status()["queue_size"] == 1
