"""Handlers referenced by examples/promptise.toml as "examples.handlers:<name>"."""

from __future__ import annotations

import logging

from promptise_asgi.runtime import TriggerEvent

logger = logging.getLogger("examples.handlers")


async def echo(event: TriggerEvent) -> None:
    """Log the event; a real handler would call a model, a tool, a queue..."""
    logger.info("echo %s from %s: %s", event.event_id, event.trigger_type, event.payload)
