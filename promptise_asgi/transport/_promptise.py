"""The one place where the transport adapts to a runtime that is not ours, chiefly `promptise` 1.10.

The transport calls these helpers instead of touching a process or runtime for anything whose meaning
differs between runtimes: which `TriggerEvent` class to build, how a state reads as text, whether a
start or stop changed anything, and how a full queue is reported. The real `promptise` runtime is
recognised by the module its classes live in and is never imported here at module import time (it is
optional and large); nothing here knows about HTTP.

Differences handled, as found in `promptise` 1.10.1:
- `AgentRuntime.start_process` on a process that is up raises its state machine's `StateError` (a
  `ValueError`); `start_process`/`stop_process` return `None`, so "changed" is read from the states.
- `stop_process` on a never-started (`created`) process moves it to `stopped`: reported as unchanged.
- `AgentProcess.inject` on a full queue (1000 events, fixed) does not raise: it dead-letters the event.
- It has no event store: no idempotency keys, and its in-memory `dead_letters` list is its own business.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._errors import QueueFullError
from ._shape import RuntimeLike, StoreProcess

__all__ = [
    "event_id_of",
    "inject",
    "is_promptise",
    "make_event",
    "queue_full_retry_after",
    "restart_process",
    "start_process",
    "state_name",
    "stop_process",
    "store_process",
]

# States in which a process is already up; promptise allows no transition to "starting" from any of them.
_UP_STATES = frozenset({"running", "starting", "suspended", "awaiting"})
# States with nothing to stop: a stop from them changes nothing a user cares about.
_DOWN_STATES = frozenset({"created", "stopped", "stopping"})
# promptise 1.10 hard-codes its trigger queue bound and exposes it nowhere public.
_PROMPTISE_MAX_QUEUE = 1000


def is_promptise(obj: Any) -> bool:
    """Tell whether `obj` is (or derives from) a class of the `promptise` package.

    Args:
        obj: a process, runtime or event.

    Returns:
        True when any class in its MRO lives in `promptise` or one of its submodules.
    """
    klass = type(obj)
    known = _PROMPTISE_CLASSES.get(klass)
    if known is None:  # asked on every injected event, about a handful of classes: remember the answer
        known = _PROMPTISE_CLASSES[klass] = any(c.__module__.partition(".")[0] == "promptise" for c in klass.__mro__)
    return known


_PROMPTISE_CLASSES: dict[type, bool] = {}
_EVENT_CLASSES: dict[type, Any] = {}


def _event_class(process: Any) -> Any:
    event_class = _EVENT_CLASSES.get(type(process))
    if event_class is None:
        module = "promptise.runtime" if is_promptise(process) else "promptise_asgi.runtime"
        event_class = _EVENT_CLASSES[type(process)] = importlib.import_module(module).TriggerEvent
    return event_class


def make_event(
    process: Any, *, trigger_id: str, trigger_type: str, payload: dict[str, Any], metadata: dict[str, Any]
) -> Any:
    """Build a trigger event of the class `process`'s runtime expects.

    Args:
        process: the process the event is for.
        trigger_id: what produced the event.
        trigger_type: the kind of trigger.
        payload: the event data.
        metadata: extra context.

    Returns:
        A `promptise.runtime.TriggerEvent` for a promptise process, else a
        `promptise_asgi.runtime.TriggerEvent`; either gets a fresh `event_id`.
    """
    return _event_class(process)(trigger_id=trigger_id, trigger_type=trigger_type, payload=payload, metadata=metadata)


def event_id_of(event: Any) -> str:
    """Return the id of an event built by `make_event`."""
    return str(event.event_id)


def state_name(process: Any) -> str:
    """Return a process's state as plain text (`"running"`), whether it is a str enum or a string."""
    state = process.state
    return str(getattr(state, "value", state))


async def start_process(runtime: RuntimeLike, name: str) -> bool:
    """Start a process unless it is already up.

    Args:
        runtime: the runtime holding the process.
        name: the process name.

    Returns:
        Whether the call changed anything: the runtime's own answer when it returns a bool, else whether
        the state moved. A process already up is not started again (promptise would raise).

    Raises:
        KeyError: no such process.
        Exception: whatever the runtime raises when the start fails.
    """
    process = runtime.get_process(name)
    before = state_name(process)
    if before in _UP_STATES:
        return False
    try:
        result = await runtime.start_process(name)
    except ValueError:
        # promptise's StateError: a concurrent request started it between our check and our call.
        if state_name(process) in _UP_STATES:
            return False
        raise
    if isinstance(result, bool):
        return result
    return state_name(process) != before


async def stop_process(runtime: RuntimeLike, name: str) -> bool:
    """Stop a process; stopping one that is not up is harmless and reported as unchanged.

    The runtime is called in every state, so a never-started promptise process ends `stopped` as it did
    with the original transport, and a `failed` one has its leftovers torn down.

    Args:
        runtime: the runtime holding the process.
        name: the process name.

    Returns:
        The runtime's own answer when it returns a bool, else True when the process was up (or failed)
        and its state moved.

    Raises:
        KeyError: no such process.
    """
    process = runtime.get_process(name)
    before = state_name(process)
    result = await runtime.stop_process(name)
    if isinstance(result, bool):
        return result
    return before not in _DOWN_STATES and state_name(process) != before


async def restart_process(runtime: RuntimeLike, name: str) -> None:
    """Restart a process (stop if up, then start); both runtimes accept it in every settled state.

    Raises:
        KeyError: no such process.
        Exception: whatever the runtime raises when the new start fails.
    """
    await runtime.restart_process(name)


async def inject(process: Any, event: Any) -> None:
    """Queue `event` on `process`, refusing it when the queue is full whatever the runtime.

    promptise dead-letters an event that finds its queue full instead of raising; that event is turned
    into the same `QueueFullError` our runtime raises, so the caller can refuse it (it stays counted in
    promptise's `dead_letter_count`, never silently lost).

    Raises:
        QueueFullError: the process queue is full.
    """
    await process.inject(event)
    if is_promptise(process):
        letters = process.dead_letters
        if letters and letters[-1]["event"] is event and letters[-1]["reason"] == "queue full":
            raise QueueFullError(str(process.name), _PROMPTISE_MAX_QUEUE)


def store_process(process: Any) -> StoreProcess | None:
    """Return `process` if its events live in an event store (dead letters, idempotency keys), else None.

    Args:
        process: a process of any runtime.
    """
    if is_promptise(process) or not isinstance(process, StoreProcess):
        return None
    return process


def queue_full_retry_after(exc: BaseException) -> float | None:
    """Return the seconds to send in `Retry-After` if `exc` reports a full queue, else None.

    Args:
        exc: an exception raised by `inject`.
    """
    return exc.retry_after if isinstance(exc, QueueFullError) else None
