"""The runtime's value types: process states, trigger events, trigger and process configs, handler resolution.

These are plain dataclasses validated at construction, so a bad config fails where it is written. Nothing here
starts a task or touches an event loop, and nothing here knows about HTTP or about the transport.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeAlias

from croniter import croniter

from .._validation import check_count, check_seconds

__all__ = [
    "Handler",
    "ProcessConfig",
    "ProcessState",
    "TriggerConfig",
    "TriggerEvent",
    "callable_name",
    "check_process_name",
    "describe_error",
    "event_fields",
    "event_from_fields",
    "fingerprint_of",
    "iso_utc",
    "resolve_handler",
    "retry_delay",
]

TRIGGER_TYPES = ("cron", "interval", "event")


class ProcessState(StrEnum):
    """Lifecycle state of an `AgentProcess`; the value is the lowercase name shown in status."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class _EventIds:
    """uuid4 strings from one `os.urandom` read per 256 ids.

    `uuid.uuid4()` reads the kernel's random source for every id and builds a `UUID` object; on the event
    path that was a tenth of a node's CPU under load. Same randomness, same RFC 4122 version-4 format.
    """

    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def __call__(self) -> str:
        if self._offset >= len(self._buffer):
            self._buffer = os.urandom(16 * 256)
            self._offset = 0
        h = self._buffer[self._offset : self._offset + 16].hex()
        self._offset += 16
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"

    def reset(self) -> None:
        self._buffer = b""
        self._offset = 0


_new_event_id = _EventIds()
# A forked child must not hand out the ids left in its parent's buffer.
os.register_at_fork(after_in_child=_new_event_id.reset)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class TriggerEvent:
    """One unit of work for a process: injected over HTTP or produced by a cron/interval trigger.

    Attributes:
        trigger_id: what produced the event (`"remote"` for HTTP, `"<process>:<type>:<index>"` for triggers).
        trigger_type: the kind of trigger (`"cron"`, `"interval"`, `"remote"`...).
        payload: the event's data.
        metadata: free-form data about the event.
        event_id: a uuid4 string, unique per event.
        timestamp: when the event was created (UTC).
        attempt: which delivery this is, 1 on the first. More than 1 means an earlier delivery may have run
            (partly or wholly): it raised and is retried, or it was cut off by a crash or a stop. Delivery is
            at-least-once, so a handler with side effects dedupes by `event_id`.
    """

    trigger_id: str
    trigger_type: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=_new_event_id)
    timestamp: datetime = field(default_factory=_utc_now)
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this event (timestamp in ISO 8601)."""
        return {
            "trigger_id": self.trigger_id,
            "trigger_type": self.trigger_type,
            "payload": self.payload,
            "metadata": self.metadata,
            "event_id": self.event_id,
            "timestamp": self.timestamp.isoformat(),
            "attempt": self.attempt,
        }


Handler: TypeAlias = Callable[[TriggerEvent], Awaitable[Any]]


@dataclass(slots=True)
class TriggerConfig:
    """What makes a process receive events besides injection.

    Args:
        type: `"cron"` (needs `cron_expression`), `"interval"` (needs `interval_seconds`) or `"event"`
            (the process is driven by injected events only; injection works for every process anyway).
        cron_expression: a cron expression (5 fields, or 6 with seconds), evaluated in UTC.
        interval_seconds: the period of an interval trigger, greater than 0.

    Raises:
        ValueError: unknown `type`, missing or invalid `cron_expression` / `interval_seconds`.
    """

    type: str
    cron_expression: str | None = None
    interval_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.type not in TRIGGER_TYPES:
            allowed = ", ".join(TRIGGER_TYPES)
            raise ValueError(f"TriggerConfig.type must be one of {allowed}, got {self.type!r}")
        if self.type == "cron":
            expr = self.cron_expression
            if not isinstance(expr, str) or not croniter.is_valid(expr):
                raise ValueError(f"TriggerConfig.cron_expression is not a valid cron expression: {expr!r}")
        elif self.type == "interval":
            self.interval_seconds = check_seconds("TriggerConfig.interval_seconds", self.interval_seconds)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this trigger."""
        return {
            "type": self.type,
            "cron_expression": self.cron_expression,
            "interval_seconds": self.interval_seconds,
        }


def _is_async_callable(obj: object) -> bool:
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - callable() cannot say whether __call__ is async
    return call is not None and inspect.iscoroutinefunction(call)


@dataclass(slots=True)
class ProcessConfig:
    """How a process behaves: its handler, triggers, concurrency, queue bound and drain time.

    Args:
        handler: an async callable `handler(event)` or a `"module:function"` string resolved at start;
            None makes a process that only records the events it receives.
        instructions: kept and shown in status (configs written for the original `promptise` still load).
        model: kept and shown in status.
        triggers: `TriggerConfig`s (mappings of their keyword arguments are accepted too).
        concurrency: how many events are handled at the same time (>= 1).
        max_queue: how many events may wait (>= 1); an injection beyond it is refused.
        drain_timeout: seconds `stop()` lets queued and running events finish (>= 0).
        max_attempts: tries an event's handler gets (>= 1): an event whose handler raises is delivered again
            until it has raised this many times, then it moves to the dead letters with reason `"error"`.
        retry_backoff: seconds before the first retry (>= 0); each next one waits twice as long, at most 30 s.
        poison_after: crashes in a row an event's delivery may cut off (>= 1) before the next runtime moves it
            to the dead letters with reason `"interrupted"` instead of delivering it again.
        max_dead_letters: dead letters kept (>= 1); beyond it the oldest are dropped, with a log line.
        idempotency_ttl: seconds an idempotency key is remembered after its event was accepted (> 0).

    Raises:
        ValueError: a field is out of range; the message names it.
        TypeError: `handler` is neither None, a string nor an async callable.
    """

    handler: Handler | str | None = None
    instructions: str = ""
    model: str | None = None
    triggers: list[TriggerConfig] = field(default_factory=list)
    concurrency: int = 1
    max_queue: int = 1000
    drain_timeout: float = 5.0
    max_attempts: int = 1
    retry_backoff: float = 0.5
    poison_after: int = 3
    max_dead_letters: int = 10_000
    idempotency_ttl: float = 86400.0

    def __post_init__(self) -> None:
        handler = self.handler
        if handler is not None and not isinstance(handler, str) and not _is_async_callable(handler):
            raise TypeError(f"ProcessConfig.handler must be an async callable or 'module:function', got {handler!r}")
        check_count("ProcessConfig.concurrency", self.concurrency)
        check_count("ProcessConfig.max_queue", self.max_queue)
        self.drain_timeout = check_seconds("ProcessConfig.drain_timeout", self.drain_timeout, zero_ok=True)
        check_count("ProcessConfig.max_attempts", self.max_attempts)
        self.retry_backoff = check_seconds("ProcessConfig.retry_backoff", self.retry_backoff, zero_ok=True)
        check_count("ProcessConfig.poison_after", self.poison_after)
        check_count("ProcessConfig.max_dead_letters", self.max_dead_letters)
        self.idempotency_ttl = check_seconds("ProcessConfig.idempotency_ttl", self.idempotency_ttl)
        triggers: list[TriggerConfig] = []
        for trigger in self.triggers:
            if isinstance(trigger, Mapping):
                trigger = TriggerConfig(**trigger)
            elif not isinstance(trigger, TriggerConfig):
                raise TypeError(f"ProcessConfig.triggers items must be TriggerConfig, got {trigger!r}")
            triggers.append(trigger)
        self.triggers = triggers


def resolve_handler(handler: Handler | str | None) -> Handler | None:
    """Return the async callable a config names, importing a `"module:function"` string.

    Raises:
        ValueError: the string is malformed, its module cannot be imported, or the attribute is missing or is
            not an async callable; the message names the string.
    """
    if not isinstance(handler, str):
        return handler
    module_name, sep, attr_path = handler.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"handler {handler!r} is not of the form 'module:function'")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"handler {handler!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"handler {handler!r}: {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise ValueError(f"handler {handler!r} is not callable")
    if not _is_async_callable(target):
        raise ValueError(f"handler {handler!r} is not an async callable (async def)")
    return target


def check_process_name(name: object) -> None:
    """Raise ValueError unless `name` is a non-empty string without `/` (names are URL path segments)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"process name must be a non-empty string without '/', got {name!r}")


# Retries wait retry_backoff, then twice as long each time, but never longer than this.
MAX_RETRY_DELAY = 30.0


def retry_delay(backoff: float, errors: int) -> float:
    """Seconds to wait before delivering again an event whose handler raised `errors` times in a row."""
    return float(min(backoff * 2.0 ** (errors - 1), MAX_RETRY_DELAY))


def event_fields(event: TriggerEvent) -> dict[str, Any]:
    """The fields of an event a store keeps besides its id, JSON-ready (timestamp in ISO 8601)."""
    return {
        "trigger_id": event.trigger_id,
        "trigger_type": event.trigger_type,
        "payload": event.payload,
        "metadata": event.metadata,
        "timestamp": event.timestamp.isoformat(),
    }


def event_from_fields(event_id: str, fields: Mapping[str, Any], attempts: int) -> TriggerEvent:
    """Rebuild an event a store kept; `attempts` deliveries were started, so this one is number attempts + 1."""
    stamp = fields.get("timestamp")
    return TriggerEvent(
        trigger_id=str(fields.get("trigger_id", "")),
        trigger_type=str(fields.get("trigger_type", "")),
        payload=dict(fields.get("payload") or {}),
        metadata=dict(fields.get("metadata") or {}),
        event_id=event_id,
        timestamp=datetime.fromisoformat(stamp) if isinstance(stamp, str) else _utc_now(),
        attempt=attempts + 1,
    )


def fingerprint_of(event: TriggerEvent) -> str:
    """What an event looks like to an idempotency key: a hash of its fields as canonical JSON."""
    fields = [event.trigger_id, event.trigger_type, event.payload, event.metadata]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def iso_utc(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def callable_name(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{name}" if module else str(name)
