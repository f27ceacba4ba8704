"""Handlers the runtime tests name as "module:function" strings; nothing else uses this module."""

from __future__ import annotations

from promptise_asgi.runtime import TriggerEvent

__all__ = ["NOT_CALLABLE", "Namespace", "record", "seen", "sync_handler"]

seen: list[str] = []
NOT_CALLABLE = 42


async def record(event: TriggerEvent) -> None:
    seen.append(event.event_id)


def sync_handler(event: TriggerEvent) -> None:
    seen.append(event.event_id)


class Namespace:
    @staticmethod
    async def handler(event: TriggerEvent) -> None:
        seen.append(event.event_id)
