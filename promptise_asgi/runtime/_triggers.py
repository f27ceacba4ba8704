"""`Triggers`: the cron and interval schedules of one process, and when each fires next.

A running process runs its triggers' loops under one cancel scope; each loop calls the process's `fire`
callback when its trigger is due. Knows nothing of queues, stores, HTTP or the runtime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import anyio
from croniter import croniter

from ._models import TriggerConfig

__all__ = ["CRON_MAX_SLEEP", "Triggers"]

# A cron wait re-reads the wall clock at least this often, so a clock step (NTP, suspend/resume) delays a fire
# by at most this much instead of by the whole original wait.
CRON_MAX_SLEEP = 30.0

Fire = Callable[[str, str], Awaitable[None]]


class Triggers:
    """The triggers of the process `name`; `fire(trigger_id, trigger_type)` is awaited when one is due.

    Args:
        name: the process name, for trigger ids (`"<name>:<type>:<index>"`).
        configs: the process's triggers.
        clock: wall clock in epoch seconds (cron schedules, next fire times).
        fire: what to do when a trigger is due.
    """

    def __init__(self, name: str, configs: Sequence[TriggerConfig], clock: Callable[[], float], fire: Fire) -> None:
        self._name = name
        self._configs = list(configs)
        self._clock = clock
        self._fire = fire
        self.next_fire: list[float | None] = [None] * len(self._configs)

    @property
    def scheduled(self) -> bool:
        """Whether any trigger fires on its own (cron or interval), so there are loops to run."""
        return any(trigger.type != "event" for trigger in self._configs)

    def reset(self) -> None:
        """Forget the next fire times (the process stopped)."""
        self.next_fire = [None] * len(self._configs)

    async def run(self, scope: anyio.CancelScope) -> None:
        """Run every scheduled trigger until `scope` is cancelled."""
        with scope:
            async with anyio.create_task_group() as tg:
                for index, trigger in enumerate(self._configs):
                    if trigger.type == "interval":
                        tg.start_soon(self._interval_loop, index, trigger)
                    elif trigger.type == "cron":
                        tg.start_soon(self._cron_loop, index, trigger)

    async def _interval_loop(self, index: int, trigger: TriggerConfig) -> None:
        period = trigger.interval_seconds
        assert period is not None
        trigger_id = f"{self._name}:interval:{index}"
        deadline = anyio.current_time() + period
        while True:
            self.next_fire[index] = self._clock() + (deadline - anyio.current_time())
            await anyio.sleep_until(deadline)
            await self._fire(trigger_id, "interval")
            # Skip ticks missed while the loop was blocked instead of firing a burst to catch up.
            deadline = max(deadline + period, anyio.current_time())

    async def _cron_loop(self, index: int, trigger: TriggerConfig) -> None:
        expression = trigger.cron_expression
        assert expression is not None
        trigger_id = f"{self._name}:cron:{index}"
        last_fire = float("-inf")
        while True:
            base = max(self._clock(), last_fire)
            fire_at = croniter(expression, datetime.fromtimestamp(base, UTC)).get_next(float)
            self.next_fire[index] = fire_at
            # Bounded sleeps that re-read the wall clock, not an event: only time makes a cron trigger due.
            while (remaining := fire_at - self._clock()) > 0:  # noqa: ASYNC110
                await anyio.sleep(min(remaining, CRON_MAX_SLEEP))
            await self._fire(trigger_id, "cron")
            last_fire = fire_at
