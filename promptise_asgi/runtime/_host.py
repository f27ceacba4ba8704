"""Where process tasks run: `TaskHost`, the task group that owns them, and `Run`, one start-to-stop cycle.

`TaskHost` gives the runtime an anyio task group either entered by the host program (`async with`) or owned by
one supervisor task (imperative style); `Run` holds the cancel scopes of one cycle. Nothing here knows what a
process, a trigger or HTTP is.
"""

from __future__ import annotations

from types import TracebackType

import anyio
from anyio.abc import TaskGroup

from .._detached import spawn_detached

__all__ = ["Run", "TaskHost"]


class Run:
    """One start-to-stop cycle: the scopes that stop its workers and triggers, and the event saying it ended.

    `draining` tells workers to cancel `workers` themselves once the queue is empty and nothing is in flight.
    `tasks` is the task group of the cycle's workers, for tasks that must end with them.
    """

    __slots__ = ("done", "draining", "tasks", "triggers", "workers")

    def __init__(self) -> None:
        self.workers = anyio.CancelScope()
        self.triggers = anyio.CancelScope()
        self.done = anyio.Event()
        self.draining = False
        self.tasks: TaskGroup | None = None


class TaskHost:
    """Owns the task group process tasks run in, for both runtime styles.

    Structured style: `enter()`/`exit()` are called from the host's `async with`, so the task group is the
    host's. Imperative style: the first `task_group()` call spawns one supervisor task that enters a task group
    and sleeps until `close()` cancels it.
    """

    def __init__(self) -> None:
        self._tg: TaskGroup | None = None
        self._structured = False
        self._ready: anyio.Event | None = None
        self._done: anyio.Event | None = None
        self._stop_scope: anyio.CancelScope | None = None

    @property
    def active(self) -> bool:
        """True while a task group (structured or supervised) is open or being opened."""
        return self._tg is not None or self._ready is not None

    async def enter(self) -> None:
        if self.active:
            raise RuntimeError("runtime already running: use `async with` or the imperative style, not both")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._structured = True

    async def exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tg = self._tg
        assert tg is not None and self._structured
        try:
            return bool(await tg.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            # Task groups wrap the host body's own exception in a group; when nothing else failed, give the
            # host its exception back so `except LookupError:` around `async with AgentRuntime()` still works.
            if exc is None or group.exceptions != (exc,):
                raise
        finally:
            self._tg = None
            self._structured = False
        raise exc

    async def task_group(self) -> TaskGroup:
        """Return the open task group, spawning the supervisor first if no `async with` opened one."""
        if self._tg is not None:
            return self._tg
        if self._ready is None:
            self._ready = anyio.Event()
            self._done = anyio.Event()
            self._stop_scope = anyio.CancelScope()
            spawn_detached(self._supervise, name="promptise-asgi runtime supervisor")
        await self._ready.wait()
        assert self._tg is not None
        return self._tg

    async def _supervise(self) -> None:
        ready, done, stop_scope = self._ready, self._done, self._stop_scope
        assert ready is not None and done is not None and stop_scope is not None
        try:
            with stop_scope:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    ready.set()
                    await anyio.sleep_forever()
        finally:
            self._tg = None
            self._ready = None
            done.set()

    async def close(self) -> None:
        """Cancel and wait for the supervisor (imperative style); a no-op when there is none."""
        if self._structured or self._ready is None:
            return
        done, stop_scope = self._done, self._stop_scope
        assert done is not None and stop_scope is not None
        # Cancelling the scope works even before the supervisor has entered it.
        stop_scope.cancel()
        await done.wait()
