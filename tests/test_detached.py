"""Detached background tasks: they outlive their caller and never let an error escape unlogged."""

from __future__ import annotations

import logging

import anyio
import pytest

from promptise_asgi._detached import spawn_detached


async def test_outlives_the_caller_and_logs_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    ran = anyio.Event()
    failed = anyio.Event()

    async def works() -> None:
        ran.set()

    async def fails() -> None:
        try:
            raise RuntimeError("boom")
        finally:
            failed.set()

    async def caller() -> None:
        spawn_detached(works, name="works")
        spawn_detached(fails, name="fails")

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
    with anyio.fail_after(5):
        await ran.wait()
        await failed.wait()
        while not any("background task fails failed" in r.message for r in caplog.records):
            await anyio.sleep(0.01)
    assert caplog.records[-1].levelno == logging.ERROR


async def test_cancellation_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    scope = anyio.CancelScope()
    started, finished = anyio.Event(), anyio.Event()

    async def sleeper() -> None:
        try:
            with scope:
                started.set()
                await anyio.sleep_forever()
        finally:
            finished.set()

    spawn_detached(sleeper, name="sleeper")
    await started.wait()
    scope.cancel()
    with anyio.fail_after(5):
        await finished.wait()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
