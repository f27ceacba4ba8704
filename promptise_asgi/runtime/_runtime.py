"""`AgentRuntime`: the named `AgentProcess`es of one node, started, stopped and restarted by name or all at once.

Runs on asyncio and trio, in `async with` or imperative style (process tasks then live under one supervisor task
that dies with the host's event loop). Accepted events are kept in the runtime's event store (`MemoryStore` by
default, `SQLiteStore` to survive a crash). Knows nothing of HTTP: the transport drives it through its Protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any

import anyio

from ..store import EventStore, MemoryStore
from ._host import TaskHost
from ._models import ProcessConfig, ProcessState, check_process_name
from ._process import AgentProcess, Notify

__all__ = ["AgentRuntime"]

logger = logging.getLogger("promptise_asgi.runtime")

_RUNNING = ProcessState.RUNNING


class AgentRuntime:
    """A set of named `AgentProcess`es on one node.

    Use it as `async with AgentRuntime() as rt:` (stops every process on exit), or imperatively:
    `rt = AgentRuntime()`, `await rt.start_all()`, ..., `await rt.stop_all()` (or `await rt.aclose()`). In the
    imperative style process tasks run under one supervisor task that ends with the host's event loop, so
    forgetting to stop never keeps a program from exiting.

    Changes can be observed with `add_observer`: a plain callable, told of processes added and removed, of
    every state change and of every dead letter, so a transport can stream them without polling (it knows
    nothing of HTTP).

    Args:
        clock: wall clock in epoch seconds, used for cron schedules (injectable for tests).
        store: where accepted events, dead letters and idempotency keys are kept. None means a `MemoryStore`
            (nothing survives the process). With a `SQLiteStore` an accepted event survives a crash: the next
            runtime on the same file delivers it again when a process of its name is added. The store opens
            when the first process is added (a file another live runtime holds fails there) and closes when
            the runtime exits.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, store: EventStore | None = None) -> None:
        self._processes: dict[str, AgentProcess] = {}
        self._view: Mapping[str, AgentProcess] = MappingProxyType(self._processes)
        self._clock = clock
        self._host = TaskHost()
        self._observers: list[Notify] = []
        self._store: EventStore = store if store is not None else MemoryStore()

    @property
    def store(self) -> EventStore:
        """The event store this runtime keeps accepted events in."""
        return self._store

    def add_observer(self, observer: Notify) -> Callable[[], None]:
        """Call `observer(change, data)` on every change, until the returned function is called.

        Changes: `"process.added"` / `"process.removed"` `{"name"}`, `"process.state"`
        `{"name", "state", "previous"}` (`state` and `previous` are `ProcessState` values) and
        `"process.dead_letter"` `{"name", "event_id", "reason"}` (`reason`: `"error"` or `"interrupted"`). The
        observer runs synchronously inside the runtime, so it must return at once (queue the change, never
        wait) and must not raise; an exception it raises is logged and the runtime goes on.

        Returns:
            A function that removes the observer.
        """
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def _notify(self, change: str, data: dict[str, Any]) -> None:
        for observer in self._observers:
            try:
                observer(change, data)
            except Exception:
                logger.exception("runtime observer %r failed on %s", observer, change)

    @property
    def processes(self) -> Mapping[str, AgentProcess]:
        """A read-only view of the processes by name, in insertion order."""
        return self._view

    async def add_process(self, name: str, config: ProcessConfig | None = None) -> AgentProcess:
        """Create a process (state `created`); it runs after `start_process(name)` or `start_all()`.

        Events the store kept for this name (a durable store, after a crash or a stop) are queued first, in the
        order they were accepted; an event cut off by `poison_after` crashes in a row becomes a dead letter.

        Raises:
            ValueError: the name is empty, contains `/`, or is already used.
            StoreLockedError: the store's file is held by another live runtime.
            EventStoreError: the store cannot be opened or read.
        """
        check_process_name(name)
        if name in self._processes:
            raise ValueError(f"Process '{name}' already exists")
        await self._store.open()
        process = AgentProcess(
            name, config, clock=self._clock, _host=self._host, _notify=self._notify, _store=self._store
        )
        # Before the process is visible: what was kept is queued ahead of any event injected from now on.
        given_up = await process._recover()
        if name in self._processes:
            raise ValueError(f"Process '{name}' already exists")
        self._processes[name] = process
        self._notify("process.added", {"name": name})
        process._announce(given_up)
        return process

    async def remove_process(self, name: str) -> None:
        """Stop a process (draining it as `stop()` does) and remove it.

        Raises:
            KeyError: no process has that name.
        """
        process = self.get_process(name)
        async with process._lock:
            await process._stop_locked(exiting=True)
            process._removed = True
            if self._processes.get(name) is process:
                del self._processes[name]
                self._notify("process.removed", {"name": name})
            # Nothing accepted disappears without a trace: these never ran, and they go with the process (or,
            # with a durable store, stay there for the next process of this name).
            process._leave("with the process, which was removed")

    def get_process(self, name: str) -> AgentProcess:
        """Return the process called `name`.

        Raises:
            KeyError: `Process '<name>' not found`.
        """
        try:
            return self._processes[name]
        except KeyError:
            raise KeyError(f"Process '{name}' not found") from None

    async def start_process(self, name: str) -> bool:
        """Start a process by name; returns False if it was already running (see `AgentProcess.start`)."""
        return await self.get_process(name).start()

    async def stop_process(self, name: str) -> bool:
        """Stop a process by name; returns False if it was not running (see `AgentProcess.stop`)."""
        return await self.get_process(name).stop()

    async def restart_process(self, name: str) -> None:
        """Restart a process by name (see `AgentProcess.restart`)."""
        await self.get_process(name).restart()

    async def start_all(self) -> None:
        """Start every process, in insertion order.

        Every process is tried; if some fail to start, the first error is raised once all have been tried.
        Events the store keeps for names this runtime has no process for are logged: they stay in the store
        until a process of that name is added.
        """
        await self._store.open()
        for name, count in (await self._store.pending_counts()).items():
            if name not in self._processes:
                logger.warning(
                    "event store %s holds %d event(s) for process %r, which this runtime does not have: they stay "
                    "there and are delivered when a process of that name is added",
                    self._store.location,
                    count,
                    name,
                )
        first_error: Exception | None = None
        for process in list(self._processes.values()):
            try:
                await process.start()
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    async def stop_all(self) -> None:
        """Stop every process concurrently, so drain timeouts overlap instead of adding up.

        Events left after a process's `drain_timeout` stay queued (in memory, and in a durable store) for its
        next start (logged).
        """
        async with anyio.create_task_group() as tg:
            for process in list(self._processes.values()):
                tg.start_soon(process.stop)

    async def aclose(self) -> None:
        """Stop every process and close the task group the processes ran in (shared by both styles).

        This is the runtime's exit: events still queued (left after `drain_timeout`, or injected into a stopped
        process) are discarded by the memory store, with one log line per process saying how many, since it
        keeps nothing across an exit; a durable store keeps them for the next run (also logged). The store is
        closed (it opens again if the runtime is used again). `async with` ends the same way.
        """
        try:
            await self._exit()
        finally:
            await self._host.close()

    async def _exit(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for process in list(self._processes.values()):
                    tg.start_soon(process._stop_at_exit)
        finally:
            for process in self._processes.values():
                process._leave("at exit: the memory store keeps no events across an exit")
            with anyio.CancelScope(shield=True):
                await self._store.close()

    def status(self) -> dict[str, Any]:
        """Return `{"process_count": N, "processes": {name: process status}}`."""
        return {
            "process_count": len(self._processes),
            "processes": {name: process.status() for name, process in self._processes.items()},
        }

    async def __aenter__(self) -> AgentRuntime:
        if self._host.active and not any(p.state == _RUNNING for p in self._processes.values()):
            # Used imperatively before (a RuntimeTransport, or start_all/stop_all) and idle now: hand the
            # processes over to this block instead of refusing with "already running".
            await self._host.close()
        await self._host.enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            await self._exit()
        finally:
            suppress = await self._host.exit(exc_type, exc, tb)
        return suppress
