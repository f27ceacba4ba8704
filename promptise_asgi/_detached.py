"""Background tasks that outlive the call that started them, on asyncio and trio.

anyio has no detached-task API: a task group must be entered and left by the same task. The imperative
styles (`await rt.start_all()` then return; `await transport.start()` then return) need a task that keeps
running after the call, so the one task that owns such work is spawned with the backend's own primitive.
Both choices die with the host program: asyncio cancels leftover tasks when `asyncio.run` ends, and trio
cancels system tasks when the main task returns, so nothing leaks and the program can always exit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sniffio

__all__ = ["spawn_detached"]

logger = logging.getLogger("promptise_asgi")

_asyncio_tasks: set[Any] = set()


def spawn_detached(func: Callable[[], Awaitable[None]], name: str) -> None:
    """Run `func()` in a new task that is not tied to the caller's task group.

    An exception escaping `func` is logged, never propagated: nobody awaits a detached task, and on trio an
    error escaping a system task would crash the whole run.
    """
    cancelled = anyio.get_cancelled_exc_class()

    async def guarded() -> None:
        try:
            await func()
        except cancelled:
            raise
        except Exception:
            logger.exception("background task %s failed", name)

    if sniffio.current_async_library() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(guarded, name=name)
    else:
        import asyncio

        task = asyncio.get_running_loop().create_task(guarded(), name=name)
        _asyncio_tasks.add(task)  # the loop holds only a weak reference to tasks
        task.add_done_callback(_asyncio_tasks.discard)
