"""Change streams without HTTP: `Change` records and `ChangeHub`, which numbers, remembers and fans them out.

A hub gives every change an id that only grows and starts above any id an earlier run could have issued (ids
follow the clock in microseconds), keeps a bounded history to resume from, and hands each subscriber its own
bounded buffer: a subscriber that falls further behind is cut off (it resumes by id), so a slow reader never
slows the publisher. A subscription resuming from an id the hub cannot replay from starts with a fresh
snapshot instead, so nobody is silently out of date. Used by the node and the coordinator alike; knows
nothing of HTTP, Starlette or SSE.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["Change", "ChangeHub", "Subscription"]

logger = logging.getLogger("promptise_asgi.changes")

DEFAULT_HISTORY = 2048
DEFAULT_BUFFER = 1024


@dataclass(frozen=True, slots=True)
class Change:
    """One change, as a stream delivers it.

    Attributes:
        id: an integer that only grows; resume after it with `Last-Event-ID`.
        type: what changed, e.g. `"snapshot"`, `"process.state"`, `"node.health"`.
        data: the change's JSON object.
    """

    id: int
    type: str
    data: dict[str, Any]


class Subscription:
    """One reader of a hub: the messages to send first, then what the hub publishes, until cut off or closed.

    Use it as an async context manager; `receive()` raises `anyio.EndOfStream` once the hub closed it (it fell
    behind, or the hub is shutting down) and everything buffered was read. `lagged` tells which.
    """

    def __init__(self, hub: ChangeHub, initial: list[Change], receive: MemoryObjectReceiveStream[Change]) -> None:
        self._hub = hub
        self._initial = deque(initial)
        self._receive = receive
        self.lagged = False

    async def receive(self) -> Change:
        """The next change (waiting for one); `anyio.EndOfStream` when the subscription is over."""
        if self._initial:
            return self._initial.popleft()
        return await self._receive.receive()

    async def aclose(self) -> None:
        """Stop receiving; the hub forgets this subscriber."""
        self._hub._forget(self)
        await self._receive.aclose()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class ChangeHub:
    """Numbers changes, keeps the last `history` of them, and fans each one out to every subscriber.

    Args:
        snapshot: builds the data of a `snapshot` message (the whole current state).
        history: how many recent changes a subscriber can resume from (at least 1,024).
        buffer: how many changes a subscriber may fall behind before it is cut off (at least 1,024).
        clock: wall clock in seconds; ids follow it in microseconds.

    Raises:
        ValueError: `history` or `buffer` below 1,024.
    """

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        *,
        history: int = DEFAULT_HISTORY,
        buffer: int = DEFAULT_BUFFER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if history < 1024 or buffer < 1024:
            raise ValueError("history and buffer must each hold at least 1024 changes")
        self._snapshot = snapshot
        self._clock = clock
        self._buffer = buffer
        self._history: deque[Change] = deque(maxlen=history)
        self._last_id = self._now_id()
        # Replay is possible from this id on: the hub's start, then the newest change the history let go of.
        self._forgotten = self._last_id
        self._subscribers: dict[Subscription, MemoryObjectSendStream[Change]] = {}
        self._closed = False

    @property
    def last_id(self) -> int:
        """The id of the newest change (or of the hub's start when nothing was published yet)."""
        return self._last_id

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closed

    @property
    def snapshot_builder(self) -> Callable[[], dict[str, Any]]:
        """What builds this hub's snapshots."""
        return self._snapshot

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscribers)

    def _now_id(self) -> int:
        return int(self._clock() * 1_000_000)

    def publish(self, type: str, data: dict[str, Any]) -> Change:
        """Number a change, remember it and hand it to every subscriber; never waits.

        A subscriber whose buffer is full is cut off (its stream ends after what it already holds).
        """
        self._last_id = max(self._last_id + 1, self._now_id())
        change = Change(self._last_id, type, data)
        if len(self._history) == self._history.maxlen:
            self._forgotten = self._history[0].id
        self._history.append(change)
        for subscription, send in list(self._subscribers.items()):
            try:
                send.send_nowait(change)
            except anyio.WouldBlock:
                subscription.lagged = True
                self._cut_off(subscription)
                logger.info("a change stream reader fell %d changes behind and was cut off", self._buffer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._cut_off(subscription)
        return change

    def snapshot(self) -> Change:
        """A `snapshot` change of the current state, with the newest id (resuming from it replays what follows)."""
        return Change(self._last_id, "snapshot", self._snapshot())

    def subscribe(self, last_event_id: int | None = None) -> Subscription:
        """Open a subscription: what came after `last_event_id` if the history still holds it, else a snapshot.

        An id older than the history, newer than the newest change, or None, starts with a fresh snapshot.

        Raises:
            anyio.ClosedResourceError: the hub is closed.
        """
        if self._closed:
            raise anyio.ClosedResourceError("the change stream is closed")
        initial = self._replay(last_event_id)
        if initial is None:
            initial = [self.snapshot()]
        send, receive = anyio.create_memory_object_stream[Change](self._buffer)
        subscription = Subscription(self, initial, receive)
        self._subscribers[subscription] = send
        return subscription

    def _replay(self, last_event_id: int | None) -> list[Change] | None:
        if last_event_id is None or last_event_id > self._last_id:
            return None
        if last_event_id < self._forgotten:
            return None  # from before this run, or older than what is remembered: something would be missing
        return [change for change in self._history if change.id > last_event_id]

    def _cut_off(self, subscription: Subscription) -> None:
        send = self._subscribers.pop(subscription, None)
        if send is not None:
            send.close()

    def _forget(self, subscription: Subscription) -> None:
        self._cut_off(subscription)

    def close(self) -> None:
        """End every subscription (each stream ends after what it holds) and refuse new ones."""
        self._closed = True
        for subscription in list(self._subscribers):
            self._cut_off(subscription)
