"""`EventQueue`: the FIFO a process's events wait in.

A deque with a semaphore counting its items, so putting never blocks or allocates beyond the deque slot, and an
interrupted event can go back to the front. The bound is the caller's to enforce. Knows nothing of events.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Generic, TypeVar

import anyio

__all__ = ["EventQueue"]

T = TypeVar("T")


class EventQueue(Generic[T]):
    """A FIFO whose bound the caller enforces; `get()` waits for an item, everything else is immediate."""

    __slots__ = ("_available", "_items")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._available = anyio.Semaphore(0)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        self._items.append(item)
        self._available.release()

    def put_front(self, item: T) -> None:
        self._items.appendleft(item)
        self._available.release()

    async def get(self) -> T:
        # The semaphore counts items: once acquired, an item is guaranteed to be there, and a cancelled
        # acquire takes nothing, so a worker cancelled while waiting never loses an event.
        await self._available.acquire()
        return self._items.popleft()

    def peek(self, count: int) -> list[T]:
        """The next `count` items (fewer if the queue is shorter), left in the queue."""
        return list(islice(self._items, count))

    def remove(self, item: T) -> bool:
        """Take `item` out wherever it is; False if it is not queued (someone took it already)."""
        try:
            self._available.acquire_nowait()
        except anyio.WouldBlock:
            return False
        try:
            self._items.remove(item)
        except ValueError:
            self._available.release()
            return False
        return True

    def get_nowait(self) -> T | None:
        """Take the next item without yielding to the event loop, or None when the queue is empty."""
        try:
            self._available.acquire_nowait()
        except anyio.WouldBlock:
            return None
        return self._items.popleft()
