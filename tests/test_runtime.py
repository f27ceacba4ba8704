"""Tests for the built-in agent runtime (SPEC 2.1), on asyncio and trio."""

from __future__ import annotations

import functools
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import handlers_for_tests
import pytest
from support import WAIT, make_store, wait_for

from promptise_asgi import _errors, runtime
from promptise_asgi.runtime import (
    AgentProcess,
    AgentRuntime,
    ProcessConfig,
    ProcessState,
    QueueFullError,
    TriggerConfig,
    TriggerEvent,
)
from promptise_asgi.store import EventStore
from promptise_asgi.transport._shape import ProcessLike, RuntimeLike


class Recorder:
    """An async handler that records event ids and can be held at a gate."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()

    async def __call__(self, event: TriggerEvent) -> None:
        self.started.append(event.event_id)
        self.entered.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except BaseException:
                self.cancelled.append(event.event_id)
                raise
        self.seen.append(event.event_id)


def ev(trigger_id: str = "remote", **kwargs: Any) -> TriggerEvent:
    return TriggerEvent(trigger_id, **kwargs)


# -- public API ---------------------------------------------------------------------------------------------


def test_public_names_and_protocols() -> None:
    assert set(runtime.__all__) == {
        "AgentProcess",
        "AgentRuntime",
        "ProcessConfig",
        "ProcessState",
        "QueueFullError",
        "TriggerConfig",
        "TriggerEvent",
    }
    assert runtime.QueueFullError is _errors.QueueFullError
    assert ProcessState("running") is ProcessState.RUNNING and isinstance(ProcessState.RUNNING, str)
    assert [s.value for s in ProcessState] == ["created", "starting", "running", "stopping", "stopped", "failed"]


async def test_runtime_and_process_satisfy_the_transport_protocols(event_store: EventStore) -> None:
    rt = AgentRuntime(store=event_store)
    process = await rt.add_process("p")
    assert isinstance(rt, RuntimeLike)
    assert isinstance(process, ProcessLike)


def test_trigger_event_defaults_and_to_dict() -> None:
    a, b = TriggerEvent("t"), TriggerEvent("t")
    assert a.trigger_type == "" and a.payload == {} and a.metadata == {}
    assert a.payload is not b.payload
    assert a.event_id != b.event_id and len(a.event_id) == 36
    assert a.timestamp.tzinfo is UTC
    d = TriggerEvent("x", "remote", {"k": 1}, {"m": 2}).to_dict()
    assert d["trigger_id"] == "x" and d["trigger_type"] == "remote"
    assert d["payload"] == {"k": 1} and d["metadata"] == {"m": 2}
    assert datetime.fromisoformat(d["timestamp"]).tzinfo is not None


# -- config validation ---------------------------------------------------------------------------------------


async def _async_handler(event: TriggerEvent) -> None:
    pass


def _sync_handler(event: TriggerEvent) -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"max_queue": 0}, "max_queue"),
        ({"drain_timeout": -1}, "drain_timeout"),
        ({"drain_timeout": float("nan")}, "drain_timeout"),
        ({"drain_timeout": "5"}, "drain_timeout"),
    ],
)
def test_process_config_rejects_bad_fields(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ProcessConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"type": "webhook"}, "type"),
        ({"type": "cron"}, "cron_expression"),
        ({"type": "cron", "cron_expression": "not a cron"}, "cron_expression"),
        ({"type": "cron", "cron_expression": "61 * * * *"}, "cron_expression"),
        ({"type": "interval"}, "interval_seconds"),
        ({"type": "interval", "interval_seconds": 0}, "interval_seconds"),
        ({"type": "interval", "interval_seconds": "2"}, "interval_seconds"),
        ({"type": "interval", "interval_seconds": float("inf")}, "interval_seconds"),
        ({"type": "interval", "interval_seconds": True}, "interval_seconds"),
    ],
)
def test_trigger_config_rejects_bad_fields(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TriggerConfig(**kwargs)


def test_config_defaults_and_accepted_forms() -> None:
    config = ProcessConfig()
    assert (config.handler, config.instructions, config.model, config.triggers) == (None, "", None, [])
    assert (config.concurrency, config.max_queue, config.drain_timeout) == (1, 1000, 5.0)
    assert TriggerConfig(type="interval", interval_seconds=2).interval_seconds == 2.0
    assert TriggerConfig(type="event").to_dict() == {
        "type": "event",
        "cron_expression": None,
        "interval_seconds": None,
    }
    # Mappings (as read from TOML) become TriggerConfigs.
    config = ProcessConfig(triggers=[{"type": "cron", "cron_expression": "*/5 * * * *"}])  # type: ignore[list-item]
    assert config.triggers == [TriggerConfig(type="cron", cron_expression="*/5 * * * *")]

    class AsyncCallable:
        async def __call__(self, event: TriggerEvent) -> None:
            pass

    for handler in (_async_handler, AsyncCallable(), functools.partial(_async_handler), "m:f"):
        ProcessConfig(handler=handler)


@pytest.mark.parametrize("handler", [_sync_handler, 42, lambda event: None])
def test_process_config_rejects_non_async_handlers(handler: Any) -> None:
    with pytest.raises(TypeError, match="handler"):
        ProcessConfig(handler=handler)


def test_process_config_rejects_bad_trigger_items() -> None:
    with pytest.raises(TypeError, match="triggers"):
        ProcessConfig(triggers=["cron"])  # type: ignore[list-item]


# -- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a/b", "/", 3, None])
async def test_bad_names_are_refused(name: Any, event_store: EventStore) -> None:
    rt = AgentRuntime(store=event_store)
    with pytest.raises(ValueError, match="name"):
        await rt.add_process(name)
    assert rt.status() == {"process_count": 0, "processes": {}}


async def test_duplicate_and_unknown_names(event_store: EventStore) -> None:
    rt = AgentRuntime(store=event_store)
    first = await rt.add_process("watcher")
    with pytest.raises(ValueError, match="'watcher' already exists"):
        await rt.add_process("watcher")
    assert rt.get_process("watcher") is first
    with pytest.raises(KeyError) as info:
        rt.get_process("nope")
    assert info.value.args[0] == "Process 'nope' not found"
    for op in (rt.start_process, rt.stop_process, rt.restart_process, rt.remove_process):
        with pytest.raises(KeyError, match="Process 'nope' not found"):
            await op("nope")


async def test_processes_is_a_read_only_view_in_insertion_order(event_store: EventStore) -> None:
    rt = AgentRuntime(store=event_store)
    for name in ("zeta", "alpha", "with space", "naïve"):
        await rt.add_process(name)
    assert list(rt.processes) == ["zeta", "alpha", "with space", "naïve"]
    with pytest.raises(TypeError):
        rt.processes["x"] = rt.processes["zeta"]  # type: ignore[index]
    await rt.remove_process("alpha")
    assert list(rt.processes) == ["zeta", "with space", "naïve"]
    assert rt.status()["process_count"] == 3


# -- events and handlers -------------------------------------------------------------------------------------


async def test_process_without_handler_records_events(event_store: EventStore) -> None:
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("recorder")
        await rt.start_process("recorder")
        events = [ev(payload={"i": i}) for i in range(3)]
        for event in events:
            await process.inject(event)
        await wait_for(lambda: process.status()["events_handled"] == 3)
        status = process.status()
        assert status["events_received"] == 3
        assert status["last_event_id"] == events[-1].event_id
        assert status["handler"] is None


async def test_raising_handler_is_counted_and_the_process_keeps_running(
    caplog: pytest.LogCaptureFixture, event_store: EventStore
) -> None:
    handled: list[str] = []

    async def handler(event: TriggerEvent) -> None:
        if event.payload.get("fail"):
            raise RuntimeError("boom")
        handled.append(event.event_id)

    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=handler))
        await process.start()
        with caplog.at_level(logging.ERROR, logger="promptise_asgi.runtime"):
            await process.inject(ev(payload={"fail": True}))
            good = ev()
            await process.inject(good)
            await wait_for(lambda: handled == [good.event_id])
        status = process.status()
        assert status["state"] == "running"
        assert status["events_failed"] == 1 and status["events_handled"] == 1
        assert status["last_error"] == "RuntimeError: boom"
        assert any("handler failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_inject_refuses_anything_but_a_trigger_event(event_store: EventStore) -> None:
    rt = AgentRuntime(store=event_store)
    process = await rt.add_process("p")
    with pytest.raises(TypeError, match="TriggerEvent"):
        await process.inject({"trigger_id": "x"})  # type: ignore[arg-type]
    assert process.status()["events_received"] == 0


async def test_full_queue_refuses_with_queue_full_error_and_loses_nothing(event_store: EventStore) -> None:
    recorder = Recorder()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, max_queue=2))
        accepted = [ev(), ev()]
        for event in accepted:
            await process.inject(event)
        with pytest.raises(QueueFullError) as info:
            await process.inject(ev())
        assert info.value.process == "p" and info.value.max_queue == 2 and info.value.retry_after > 0
        assert "queue is full" in str(info.value)
        status = process.status()
        assert (status["queue_size"], status["events_received"], status["events_refused"]) == (2, 2, 1)

        # While running, with the handler held, the queue bound still holds.
        recorder.gate = anyio.Event()
        await process.start()
        await recorder.entered.wait()
        extra = ev()
        await process.inject(extra)  # one slot freed by the held event
        with pytest.raises(QueueFullError):
            await process.inject(ev())
        recorder.gate.set()
        expected = [e.event_id for e in [*accepted, extra]]
        await wait_for(lambda: recorder.seen == expected)
        status = process.status()
        assert status["events_received"] == status["events_handled"] == 3
        assert status["events_refused"] == 2


async def test_concurrency_runs_that_many_handlers_at_once(event_store: EventStore) -> None:
    recorder = Recorder()
    recorder.gate = anyio.Event()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, concurrency=3))
        await process.start()
        for _ in range(5):
            await process.inject(ev())
        await wait_for(lambda: len(recorder.started) == 3)
        status = process.status()
        assert (status["in_flight"], status["queue_size"], status["concurrency"]) == (3, 2, 3)
        recorder.gate.set()
        await wait_for(lambda: len(recorder.seen) == 5)


# -- lifecycle -----------------------------------------------------------------------------------------------


async def test_start_and_stop_are_idempotent_and_report_change(event_store: EventStore) -> None:
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p")
        assert process.state is ProcessState.CREATED
        assert await rt.stop_process("p") is False
        assert process.status()["state"] == "created"
        assert await rt.start_process("p") is True
        process_id = process.process_id
        assert await rt.start_process("p") is False
        assert process.status()["state"] == "running"
        assert await process.stop() is True
        assert await process.stop() is False
        assert process.status()["state"] == "stopped"
        assert process.process_id == process_id


async def test_stop_lets_the_running_handler_finish_and_drains_the_queue(event_store: EventStore) -> None:
    recorder = Recorder()
    recorder.gate = anyio.Event()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, drain_timeout=WAIT))
        await process.start()
        events = [ev() for _ in range(3)]
        for event in events:
            await process.inject(event)
        await recorder.entered.wait()
        result: list[bool] = []

        async def stop() -> None:
            result.append(await process.stop())

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            await wait_for(lambda: process.state is ProcessState.STOPPING)
            assert process.status()["uptime_seconds"] is None
            recorder.gate.set()
        assert result == [True]
        assert recorder.seen == [e.event_id for e in events]
        assert recorder.cancelled == []
        status = process.status()
        assert (status["state"], status["queue_size"], status["events_handled"]) == ("stopped", 0, 3)


async def test_drain_timeout_requeues_the_interrupted_event_at_the_front(
    caplog: pytest.LogCaptureFixture, event_store: EventStore
) -> None:
    recorder = Recorder()
    recorder.gate = anyio.Event()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, drain_timeout=0.05))
        await process.start()
        first, second = ev(), ev()
        await process.inject(first)
        await process.inject(second)
        await recorder.entered.wait()
        with caplog.at_level(logging.WARNING, logger="promptise_asgi.runtime"):
            assert await process.stop() is True
        assert recorder.cancelled == [first.event_id]
        status = process.status()
        assert (status["state"], status["queue_size"], status["in_flight"]) == ("stopped", 2, 0)
        assert status["events_requeued"] == 1 and status["events_handled"] == 0
        [line] = [r.getMessage() for r in caplog.records if "stopped with" in r.getMessage()]
        assert "2 event(s) left" in line and "1 cut off while being handled, put back first" in line
        kept = "loses them if the runtime exits" if event_store.kind == "memory" else "stay queued in the event store"
        assert kept in line

        recorder.gate = None
        await process.start()
        await wait_for(lambda: len(recorder.seen) == 2)
        assert recorder.seen == [first.event_id, second.event_id]


async def test_zero_drain_timeout_stops_at_once_keeping_events_queued(event_store: EventStore) -> None:
    recorder = Recorder()
    recorder.gate = anyio.Event()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, drain_timeout=0, concurrency=2))
        await process.start()
        events = [ev() for _ in range(4)]
        for event in events:
            await process.inject(event)
        await wait_for(lambda: len(recorder.started) == 2)
        await process.stop()
        assert process.status()["queue_size"] == 4
        recorder.gate = None
        await process.start()
        await wait_for(lambda: len(recorder.seen) == 4)
        # Interrupted events come back first, in the order they were taken.
        assert recorder.seen[:2] == [e.event_id for e in events[:2]]
        assert sorted(recorder.seen) == sorted(e.event_id for e in events)


async def test_events_injected_before_start_or_while_stopped_are_handled_after_start(event_store: EventStore) -> None:
    recorder = Recorder()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder))
        early = ev()
        await process.inject(early)
        assert process.status()["queue_size"] == 1
        await process.start()
        await wait_for(lambda: recorder.seen == [early.event_id])
        await process.stop()
        late = [ev() for _ in range(3)]
        for event in late:
            await process.inject(event)
        status = process.status()
        assert (status["queue_size"], status["events_handled"]) == (3, 1)
        await process.start()
        await wait_for(lambda: len(recorder.seen) == 4)
        assert recorder.seen[1:] == [e.event_id for e in late]


async def test_restart_keeps_queued_events_and_counts(event_store: EventStore) -> None:
    recorder = Recorder()
    recorder.gate = anyio.Event()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, drain_timeout=0))
        # Restart of a never-started process starts it.
        await rt.restart_process("p")
        assert process.state is ProcessState.RUNNING
        events = [ev() for _ in range(3)]
        for event in events:
            await process.inject(event)
        await recorder.entered.wait()
        await rt.restart_process("p")
        assert process.status()["restart_count"] == 2
        recorder.gate.set()
        await wait_for(lambda: len(recorder.seen) == 3)
        assert recorder.seen == [e.event_id for e in events]
        assert process.state is ProcessState.RUNNING


async def test_concurrent_lifecycle_operations_leave_a_consistent_state(event_store: EventStore) -> None:
    handled: list[str] = []

    async def handler(event: TriggerEvent) -> None:
        await anyio.lowlevel.checkpoint()
        handled.append(event.event_id)

    rng = random.Random(1234)
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=handler, concurrency=2, drain_timeout=WAIT))
        injected: list[str] = []

        async def storm(op: str) -> None:
            for _ in range(3):
                event = ev()
                await process.inject(event)
                injected.append(event.event_id)
                if op == "start":
                    await rt.start_process("p")
                elif op == "stop":
                    await rt.stop_process("p")
                else:
                    await rt.restart_process("p")
                status = process.status()
                assert status["state"] in {"created", "starting", "running", "stopping", "stopped"}
                assert (status["uptime_seconds"] is None) == (status["state"] != "running")

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(storm, rng.choice(["start", "stop", "restart"]))
        await rt.start_process("p")
        await wait_for(lambda: len(handled) == len(injected))
        await rt.stop_process("p")
        status = process.status()
        assert sorted(handled) == sorted(injected)  # each exactly once
        assert status["events_received"] == status["events_handled"] == 150
        assert (status["state"], status["in_flight"], status["queue_size"]) == ("stopped", 0, 0)


async def test_stop_cancelled_mid_drain_still_stops_and_keeps_the_event(event_store: EventStore) -> None:
    recorder = Recorder()
    recorder.gate = anyio.Event()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, drain_timeout=WAIT))
        await process.start()
        event = ev()
        await process.inject(event)
        await recorder.entered.wait()
        with anyio.move_on_after(0.05):
            await process.stop()
        # Starting again waits for the cut-off workers, then hands the event to new ones.
        recorder.gate = None
        await process.start()
        await wait_for(lambda: recorder.seen == [event.event_id])
        assert recorder.cancelled == [event.event_id]


async def test_remove_process_stops_it_first(event_store: EventStore) -> None:
    recorder = Recorder()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder))
        await process.start()
        await process.inject(ev())
        await rt.remove_process("p")
        assert process.state is ProcessState.STOPPED
        assert len(recorder.seen) == 1
        assert "p" not in rt.processes
        with pytest.raises(RuntimeError, match="removed"):
            await process.start()
        # The name can be reused, and removing concurrently twice is harmless.
        await rt.add_process("p")
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.remove_process, "p")
            tg.start_soon(rt.remove_process, "p")
        assert "p" not in rt.processes


# -- handlers named by string ----------------------------------------------------------------------------------


async def test_handler_by_module_function_string(event_store: EventStore) -> None:
    handlers_for_tests.seen.clear()
    async with AgentRuntime(store=event_store) as rt:
        for name, handler in (("a", "handlers_for_tests:record"), ("b", "handlers_for_tests:Namespace.handler")):
            process = await rt.add_process(name, ProcessConfig(handler=handler))
            await process.start()
            await process.inject(ev(trigger_id=name))
            assert process.status()["handler"] == handler
        await wait_for(lambda: len(handlers_for_tests.seen) == 2)


@pytest.mark.parametrize(
    "handler",
    [
        "no_colon",
        ":record",
        "handlers_for_tests:",
        "no_such_module_for_promptise_tests:record",
        "handlers_for_tests:missing",
        "handlers_for_tests:NOT_CALLABLE",
        "handlers_for_tests:sync_handler",
    ],
)
async def test_bad_handler_string_fails_start_and_leaves_the_process_failed(
    handler: str, event_store: EventStore
) -> None:
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=handler))
        await process.inject(ev())
        with pytest.raises(ValueError, match=repr(handler).replace("(", r"\(")):
            await rt.start_process("p")
        status = process.status()
        assert status["state"] == "failed"
        assert status["last_error"].startswith("ValueError: ") and handler in status["last_error"]
        assert await process.stop() is False
        # Fixing the config and starting again works, and the queued event survives.
        process.config.handler = "handlers_for_tests:record"
        assert await process.start() is True
        await wait_for(lambda: process.status()["events_handled"] == 1)


async def test_start_all_starts_every_good_process_then_raises_the_first_error(event_store: EventStore) -> None:
    async with AgentRuntime(store=event_store) as rt:
        await rt.add_process("bad", ProcessConfig(handler="no_colon"))
        good = await rt.add_process("good")
        with pytest.raises(ValueError, match="no_colon"):
            await rt.start_all()
        assert good.state is ProcessState.RUNNING
        assert rt.get_process("bad").state is ProcessState.FAILED


# -- triggers ------------------------------------------------------------------------------------------------


async def test_interval_trigger_fires_only_while_running(event_store: EventStore) -> None:
    recorder = Recorder()
    trigger = TriggerConfig(type="interval", interval_seconds=0.01)
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("ticker", ProcessConfig(handler=recorder, triggers=[trigger]))
        await anyio.sleep(0.1)  # checking an absence: ten periods pass with nothing queued
        assert process.status()["events_received"] == 0
        assert process.status()["triggers"][0]["next_fire_at"] is None
        await process.start()
        await wait_for(lambda: len(recorder.seen) >= 2)
        status = process.status()
        assert status["triggers"][0]["trigger_id"] == "ticker:interval:0"
        assert status["triggers"][0]["next_fire_at"] is not None
        await process.stop()
        received = process.status()["events_received"]
        await anyio.sleep(0.1)
        assert process.status()["events_received"] == received
        assert process.status()["triggers"][0]["next_fire_at"] is None


async def test_interval_trigger_event_shape(event_store: EventStore) -> None:
    got: list[TriggerEvent] = []
    done = anyio.Event()

    async def handler(event: TriggerEvent) -> None:
        got.append(event)
        done.set()

    triggers = [TriggerConfig(type="event"), TriggerConfig(type="interval", interval_seconds=0.01)]
    async with AgentRuntime(store=event_store) as rt:
        await rt.add_process("p", ProcessConfig(handler=handler, triggers=triggers))
        await rt.start_all()
        with anyio.fail_after(WAIT):
            await done.wait()
    event = got[0]
    assert (event.trigger_id, event.trigger_type, event.payload) == ("p:interval:1", "interval", {})


async def test_trigger_refuses_and_counts_events_when_the_queue_is_full(
    caplog: pytest.LogCaptureFixture, event_store: EventStore
) -> None:
    recorder = Recorder()
    recorder.gate = anyio.Event()
    trigger = TriggerConfig(type="interval", interval_seconds=0.005)
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder, triggers=[trigger], max_queue=1))
        with caplog.at_level(logging.WARNING, logger="promptise_asgi.runtime"):
            await process.start()
            await wait_for(lambda: process.status()["events_refused"] >= 2)
        assert process.status()["queue_size"] == 1
        assert any("queue is full" in r.getMessage() for r in caplog.records)
        recorder.gate.set()


def _clock_at(moment: datetime) -> tuple[Callable[[], float], list[float]]:
    """A wall clock that runs at real speed from `moment`; shift it by changing offset[0]."""
    offset = [moment.timestamp() - time.time()]
    return (lambda: time.time() + offset[0]), offset


async def test_cron_trigger_fires_on_schedule_from_the_wall_clock(event_store: EventStore) -> None:
    got: list[TriggerEvent] = []
    done = anyio.Event()

    async def handler(event: TriggerEvent) -> None:
        got.append(event)
        done.set()

    clock, _ = _clock_at(datetime(2026, 1, 1, 12, 4, 59, 900000, tzinfo=UTC))
    trigger = TriggerConfig(type="cron", cron_expression="*/5 * * * *")
    async with AgentRuntime(clock=clock, store=event_store) as rt:
        process = await rt.add_process("cronjob", ProcessConfig(handler=handler, triggers=[trigger]))
        await process.start()
        with anyio.fail_after(WAIT):
            await done.wait()
        assert (got[0].trigger_id, got[0].trigger_type) == ("cronjob:cron:0", "cron")
        # Fired once for 12:05; the next one is 12:10.
        await wait_for(lambda: process.status()["triggers"][0]["next_fire_at"] != "2026-01-01T12:05:00+00:00")
        assert process.status()["triggers"][0]["next_fire_at"] == "2026-01-01T12:10:00+00:00"
        assert len(got) == 1


async def test_cron_trigger_follows_a_wall_clock_step(monkeypatch: pytest.MonkeyPatch, event_store: EventStore) -> None:
    monkeypatch.setattr(runtime._triggers, "CRON_MAX_SLEEP", 0.01)
    done = anyio.Event()

    async def handler(event: TriggerEvent) -> None:
        done.set()

    clock, offset = _clock_at(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC))
    trigger = TriggerConfig(type="cron", cron_expression="*/5 * * * *")
    async with AgentRuntime(clock=clock, store=event_store) as rt:
        process = await rt.add_process("cronjob", ProcessConfig(handler=handler, triggers=[trigger]))
        await process.start()
        await wait_for(lambda: process.status()["triggers"][0]["next_fire_at"] is not None)
        assert process.status()["triggers"][0]["next_fire_at"] == "2026-01-01T12:05:00+00:00"
        assert process.status()["events_received"] == 0
        offset[0] += 270  # the clock jumps to 12:05:00
        with anyio.fail_after(WAIT):
            await done.wait()
        assert process.status()["events_received"] == 1


# -- runtime styles ------------------------------------------------------------------------------------------


async def test_structured_style_stops_everything_on_exit(event_store: EventStore) -> None:
    recorder = Recorder()
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("p", ProcessConfig(handler=recorder))
        await rt.start_all()
        for _ in range(3):
            await process.inject(ev())
    assert process.state is ProcessState.STOPPED
    assert len(recorder.seen) == 3  # drained on exit
    with pytest.raises(RuntimeError, match="already running"):
        async with rt, rt:
            pass


async def test_structured_style_propagates_the_body_error_after_stopping(event_store: EventStore) -> None:
    with pytest.raises(LookupError):
        async with AgentRuntime(store=event_store) as rt:
            process = await rt.add_process("p")
            await rt.start_all()
            raise LookupError("from the body")
    assert process.state is ProcessState.STOPPED


async def test_imperative_style_and_aclose(event_store: EventStore) -> None:
    recorder = Recorder()
    rt = AgentRuntime(store=event_store)
    process = await rt.add_process("p", ProcessConfig(handler=recorder))
    await rt.start_all()
    await process.inject(ev())
    await wait_for(lambda: len(recorder.seen) == 1)
    await rt.stop_all()
    assert process.state is ProcessState.STOPPED
    # The runtime can be started again, then closed in one call.
    await rt.start_all()
    await process.inject(ev())
    await rt.aclose()
    assert process.state is ProcessState.STOPPED and len(recorder.seen) == 2
    await rt.aclose()  # closing twice is harmless


async def test_imperative_style_starts_processes_concurrently(event_store: EventStore) -> None:
    rt = AgentRuntime(store=event_store)
    names = [f"p{i}" for i in range(5)]
    for name in names:
        await rt.add_process(name)
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(rt.start_process, name)
    assert {p.state for p in rt.processes.values()} == {ProcessState.RUNNING}
    await rt.aclose()
    assert {p.state for p in rt.processes.values()} == {ProcessState.STOPPED}


class Fatal(BaseException):
    """Not an Exception: like KeyboardInterrupt, a handler raising it must not be swallowed."""


async def test_handler_base_exception_is_not_swallowed(event_store: EventStore) -> None:
    async def handler(event: TriggerEvent) -> None:
        raise Fatal

    with pytest.raises(BaseExceptionGroup) as info:
        async with AgentRuntime(store=event_store) as rt:
            process = await rt.add_process("p", ProcessConfig(handler=handler))
            await process.start()
            await process.inject(ev())
            await anyio.sleep_forever()
    assert info.group_contains(Fatal)
    assert process.state is ProcessState.STOPPED


async def test_standalone_process_runs_without_a_runtime() -> None:
    recorder = Recorder()
    process = AgentProcess("solo", ProcessConfig(handler=recorder))
    assert await process.start() is True
    await process.inject(ev())
    await wait_for(lambda: len(recorder.seen) == 1)
    assert await process.stop() is True


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_runtime_and_process_can_be_built_outside_an_event_loop(backend: str, store_kind: str, tmp_path: Path) -> None:
    # Hosts build the runtime at import time or in sync setup code, before any loop runs.
    rt = AgentRuntime(store=make_store(store_kind, tmp_path))
    solo = AgentProcess("solo")

    async def main() -> None:
        process = await rt.add_process("p")
        await rt.start_all()
        await process.inject(ev())
        await solo.start()
        await solo.inject(ev())
        await wait_for(lambda: process.status()["events_handled"] == solo.status()["events_handled"] == 1)
        await solo.stop()
        await rt.aclose()

    anyio.run(main, backend=backend)
    assert rt.get_process("p").state is solo.state is ProcessState.STOPPED


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_imperative_style_without_stop_lets_the_program_exit(backend: str, store_kind: str, tmp_path: Path) -> None:
    outcome: dict[str, Any] = {}
    event_store = make_store(store_kind, tmp_path)

    async def main() -> None:
        done = anyio.Event()

        async def handler(event: TriggerEvent) -> None:
            done.set()

        rt = AgentRuntime(store=event_store)
        trigger = TriggerConfig(type="interval", interval_seconds=0.01)
        outcome["process"] = await rt.add_process("p", ProcessConfig(handler=handler, triggers=[trigger]))
        await rt.start_all()
        with anyio.fail_after(WAIT):
            await done.wait()
        # Returns with the process still running and no stop_all().

    def run() -> None:
        try:
            anyio.run(main, backend=backend)
        except BaseException as exc:  # reported below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "anyio.run did not return: a runtime task kept the loop alive"
    assert "error" not in outcome, outcome.get("error")
    # The loop's teardown cancelled the process tasks, which left the process in a consistent state.
    assert outcome["process"].state is ProcessState.STOPPED


# -- status --------------------------------------------------------------------------------------------------


async def test_status_fields(event_store: EventStore) -> None:
    trigger = TriggerConfig(type="cron", cron_expression="0 * * * *")
    config = ProcessConfig(
        handler=_async_handler, instructions="Monitor data.", model="openai:gpt-4o", triggers=[trigger], max_queue=7
    )
    async with AgentRuntime(store=event_store) as rt:
        process = await rt.add_process("watcher", config)
        status = process.status()
        assert status["name"] == process.name == "watcher" and status["process_id"] == process.process_id
        assert status["state"] == "created" and isinstance(status["state"], str)
        assert (status["instructions"], status["model"]) == ("Monitor data.", "openai:gpt-4o")
        assert (status["max_queue"], status["concurrency"], status["queue_size"]) == (7, 1, 0)
        assert status["uptime_seconds"] is None and status["restart_count"] == 0
        assert status["last_error"] is None and status["last_event_id"] is None
        assert status["handler"].endswith(":_async_handler")
        assert status["triggers"] == [
            {
                "type": "cron",
                "cron_expression": "0 * * * *",
                "interval_seconds": None,
                "trigger_id": "watcher:cron:0",
                "next_fire_at": None,
            }
        ]
        for key in ("events_received", "events_handled", "events_failed", "events_refused", "events_requeued"):
            assert status[key] == 0
        await process.start()
        running = process.status()
        assert running["state"] == "running" and running["uptime_seconds"] >= 0
        await wait_for(lambda: process.status()["triggers"][0]["next_fire_at"] is not None)
        whole = rt.status()
        assert whole["process_count"] == 1 and list(whole["processes"]) == ["watcher"]
        assert whole["processes"]["watcher"]["process_id"] == process.process_id


async def test_a_busy_worker_takes_events_in_batches_and_still_yields(event_store: EventStore) -> None:

    handled: list[int] = []

    async def handler(event: TriggerEvent) -> None:
        handled.append(event.payload["i"])  # never awaits: only the worker itself can yield

    runtime = AgentRuntime(store=event_store)
    process = await runtime.add_process("w", ProcessConfig(handler=handler, max_queue=1000))
    for i in range(500):
        await process.inject(TriggerEvent("t", payload={"i": i}))
    observed: list[int] = []
    async with anyio.create_task_group() as tg:

        async def observe() -> None:
            while len(handled) < 500:
                observed.append(len(handled))
                await anyio.lowlevel.checkpoint()

        tg.start_soon(observe)
        await runtime.start_all()
    await runtime.stop_all()
    assert handled == list(range(500))
    steps = [b - a for a, b in itertools.pairwise(observed)]
    # The worker took more than one event per turn, yet other tasks got turns while the queue drained
    # (at most WORK_BATCH events per worker turn means several turns for 500 events).
    assert max(steps) > 1
    assert len({count for count in observed if 0 < count < 500}) >= 2


def test_event_ids_are_unique_uuid4_strings_and_not_shared_after_fork() -> None:
    import os
    import uuid

    ids = [TriggerEvent("t").event_id for _ in range(2000)]
    assert len(set(ids)) == 2000
    for event_id in ids[:600]:
        parsed = uuid.UUID(event_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == event_id
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and exits
        os.write(write, TriggerEvent("t").event_id.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child_id != TriggerEvent("t").event_id


async def test_removing_a_process_with_queued_events_says_so(
    caplog: pytest.LogCaptureFixture, event_store: EventStore
) -> None:
    runtime = AgentRuntime(store=event_store)
    process = await runtime.add_process("w", ProcessConfig())
    for _ in range(3):
        await process.inject(TriggerEvent("t"))
    await runtime.remove_process("w")
    if event_store.durable:
        where = f"stay in the event store {event_store.location} for the next process of this name"
        assert f"Process 'w': 3 queued event(s) {where}" in caplog.messages
        # They are delivered to the next process of that name, in this runtime too.
        again = await runtime.add_process("w", ProcessConfig())
        assert again.status()["queue_size"] == again.status()["events_recovered"] == 3
    else:
        assert "Process 'w': 3 queued event(s) discarded with the process, which was removed" in caplog.messages
    with pytest.raises(RuntimeError, match="removed"):
        await process.inject(TriggerEvent("t"))
    await runtime.aclose()


class TestHonestExit:
    """SPEC 18: a memory-store runtime that exits with events left says how many it discards, never 'later';
    a durable store says that it keeps them, and does."""

    async def test_a_stopped_process_queue_is_reported_discarded_at_exit(
        self, caplog: pytest.LogCaptureFixture, event_store: EventStore
    ) -> None:
        caplog.set_level(logging.WARNING, logger="promptise_asgi.runtime")
        async with AgentRuntime(store=event_store) as rt:
            process = await rt.add_process("idle", ProcessConfig())
            for _ in range(4):
                await process.inject(TriggerEvent("t"))  # never started: these only wait
        if event_store.durable:
            assert caplog.messages == [
                f"Process 'idle': 4 queued event(s) stay in the event store {event_store.location} for the next run"
            ]
            assert process.status()["events_discarded"] == 0
            async with AgentRuntime(store=event_store) as rt:
                assert (await rt.add_process("idle", ProcessConfig())).status()["queue_size"] == 4
            return
        assert caplog.messages == [
            "Process 'idle': 4 queued event(s) discarded at exit: the memory store keeps no events across an exit"
        ]
        assert process.status()["events_discarded"] == 4 and process.status()["queue_size"] == 0

    async def test_drain_timeout_at_exit_reports_discards_and_no_promise(
        self, caplog: pytest.LogCaptureFixture, event_store: EventStore
    ) -> None:
        caplog.set_level(logging.WARNING, logger="promptise_asgi.runtime")
        recorder = Recorder()
        recorder.gate = anyio.Event()  # the handler never finishes: the drain timeout cuts it off
        runtime = AgentRuntime(store=event_store)
        process = await runtime.add_process("slow", ProcessConfig(handler=recorder, drain_timeout=0.05))
        await runtime.start_all()
        for _ in range(3):
            await process.inject(ev())
        await recorder.entered.wait()
        await runtime.aclose()
        if event_store.durable:
            assert caplog.messages == [
                f"Process 'slow': 3 queued event(s) stay in the event store {event_store.location} for the next run"
            ]
            # The next runtime delivers all three, the one cut off first, as its second attempt.
            recorder.gate = None
            async with AgentRuntime(store=event_store) as rt:
                again = await rt.add_process("slow", ProcessConfig(handler=recorder))
                await rt.start_all()
                await wait_for(lambda: len(recorder.seen) == 3)
            assert recorder.seen[0] == recorder.cancelled[0]
            assert again.status()["events_redelivered"] == 1
            return
        assert caplog.messages == [
            "Process 'slow': 3 queued event(s) discarded at exit: the memory store keeps no events across an exit"
        ]
        assert not any("starts again" in message or "next start" in message for message in caplog.messages)

    async def test_nothing_is_logged_when_nothing_is_left(
        self, caplog: pytest.LogCaptureFixture, event_store: EventStore
    ) -> None:
        caplog.set_level(logging.WARNING, logger="promptise_asgi.runtime")
        recorder = Recorder()
        async with AgentRuntime(store=event_store) as rt:
            process = await rt.add_process("quick", ProcessConfig(handler=recorder))
            await process.start()
            await process.inject(ev())
        assert len(recorder.seen) == 1
        assert caplog.messages == []


async def test_async_with_after_imperative_use_once_everything_is_stopped(event_store: EventStore) -> None:
    runtime = AgentRuntime(store=event_store)
    await runtime.add_process("w", ProcessConfig())
    await runtime.start_all()
    await runtime.stop_all()
    async with runtime:
        await runtime.start_all()
        assert runtime.get_process("w").state == "running"
    assert runtime.get_process("w").state == "stopped"


class TestObservers:
    """The hook a transport streams changes from (SPEC 13): added, removed and every state change."""

    async def test_an_observer_sees_processes_come_go_and_change_state(self, event_store: EventStore) -> None:
        seen: list[tuple[str, dict[str, Any]]] = []
        rt = AgentRuntime(store=event_store)
        remove = rt.add_observer(lambda change, data: seen.append((change, data)))
        process = await rt.add_process("p", ProcessConfig())
        await process.start()
        await process.stop()
        await rt.remove_process("p")
        assert seen == [
            ("process.added", {"name": "p"}),
            ("process.state", {"name": "p", "state": "starting", "previous": "created"}),
            ("process.state", {"name": "p", "state": "running", "previous": "starting"}),
            ("process.state", {"name": "p", "state": "stopping", "previous": "running"}),
            ("process.state", {"name": "p", "state": "stopped", "previous": "stopping"}),
            ("process.removed", {"name": "p"}),
        ]
        remove()
        await rt.add_process("q", ProcessConfig())
        assert len(seen) == 6  # removed observers hear nothing more
        remove()  # removing twice is harmless

    async def test_a_failing_start_is_observed_and_a_failing_observer_is_only_logged(
        self, caplog: pytest.LogCaptureFixture, event_store: EventStore
    ) -> None:
        seen: list[str] = []

        def broken(change: str, data: dict[str, Any]) -> None:
            raise RuntimeError("observer bug")

        rt = AgentRuntime(store=event_store)
        rt.add_observer(broken)
        rt.add_observer(lambda change, data: seen.append(data.get("state", change)))
        process = await rt.add_process("p", ProcessConfig(handler="no_such_module:handler"))
        with pytest.raises(ValueError, match="no_such_module"):
            await process.start()
        assert seen == ["process.added", "starting", "failed"]
        assert process.state == "failed"
        assert any("observer" in record.getMessage() for record in caplog.records)
