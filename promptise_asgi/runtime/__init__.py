"""The built-in agent runtime: named processes that handle events from a bounded queue, on anyio.

`AgentRuntime` holds `AgentProcess`es by name; each running process runs `concurrency` workers pulling
`TriggerEvent`s from its own bounded queue, fed by `inject()` and by its cron and interval triggers. Runs on
asyncio and trio. Imports nothing of HTTP: `import promptise_asgi.runtime` loads no web stack.
"""

from __future__ import annotations

from .._errors import QueueFullError
from ._models import ProcessConfig, ProcessState, TriggerConfig, TriggerEvent
from ._process import AgentProcess
from ._runtime import AgentRuntime

__all__ = [
    "AgentProcess",
    "AgentRuntime",
    "ProcessConfig",
    "ProcessState",
    "QueueFullError",
    "TriggerConfig",
    "TriggerEvent",
]
