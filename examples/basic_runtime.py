"""A runnable tour of the built-in runtime: one interval-triggered process and one event-driven process.

Runs for about three seconds, printing each process's counters twice a second, then stops everything and exits.
Run it with `python examples/basic_runtime.py` (add `trio` as an argument to run on trio).
"""

from __future__ import annotations

import sys

import anyio

from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerConfig, TriggerEvent


async def tick(event: TriggerEvent) -> None:
    print(f"  tick     {event.trigger_id} at {event.timestamp:%H:%M:%S.%f}")


async def on_order(event: TriggerEvent) -> None:
    await anyio.sleep(0.05)  # pretend to do some work
    print(f"  order    #{event.payload['order']} handled")


async def main() -> None:
    async with AgentRuntime() as runtime:
        await runtime.add_process(
            "heartbeat",
            ProcessConfig(handler=tick, triggers=[TriggerConfig(type="interval", interval_seconds=0.7)]),
        )
        orders = await runtime.add_process(
            "orders",
            ProcessConfig(handler=on_order, triggers=[TriggerConfig(type="event")], max_queue=100),
        )
        await runtime.start_all()

        for step in range(6):
            await orders.inject(TriggerEvent("shop", "remote", payload={"order": step}))
            await anyio.sleep(0.5)
            for name, status in runtime.status()["processes"].items():
                print(
                    f"{name:<10} {status['state']:<8} received={status['events_received']} "
                    f"handled={status['events_handled']} queued={status['queue_size']}"
                )
    # Leaving `async with` stopped both processes, letting queued events finish first.
    print("stopped:", {name: p.state.value for name, p in runtime.processes.items()})


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
