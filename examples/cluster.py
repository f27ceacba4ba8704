"""Putting it together: two nodes, a coordinator, and remote control, in one runnable script.

The original docs' scenario in the imperative style they use (no `async with` needed): build runtimes,
serve them, let them register with a coordinator, look at the cluster, and drive a process on another
node. Run it with `python examples/cluster.py` (add `trio` to run it on trio with hypercorn).
"""

from __future__ import annotations

import sys

import anyio

from promptise_asgi import (
    AgentRuntime,
    CoordinatorDiscovery,
    ProcessConfig,
    RegistryDiscovery,
    RuntimeCoordinator,
    RuntimeTransport,
    TriggerConfig,
    TriggerEvent,
    create_coordinator_app,
)
from promptise_asgi.transport import AppServer

handled: list[str] = []
first_event: anyio.Event


async def analyse(event: TriggerEvent) -> None:
    handled.append(f"analyst got {event.payload} via {event.trigger_type}")
    first_event.set()


async def main() -> None:
    global first_event
    first_event = anyio.Event()
    # 1. A coordinator with an in-process registry (TTL 30 s), served on a free loopback port.
    coordinator = RuntimeCoordinator(discovery=RegistryDiscovery(ttl=30), health_check_interval=5)
    coordinator_host = AppServer(create_coordinator_app(coordinator), port=0)
    await coordinator_host.start()
    discovery = CoordinatorDiscovery(coordinator_host.url)

    # 2. Two nodes, each with its own runtime, registering themselves with the coordinator.
    rt1 = AgentRuntime()
    await rt1.add_process(
        "watcher",
        ProcessConfig(instructions="Monitor data.", triggers=[TriggerConfig(type="interval", interval_seconds=1.0)]),
    )
    rt2 = AgentRuntime()
    await rt2.add_process("analyst", ProcessConfig(handler=analyse, triggers=[TriggerConfig(type="event")]))
    node1 = RuntimeTransport(rt1, port=0, node_id="node-1", discovery=discovery, heartbeat_interval=2)
    node2 = RuntimeTransport(rt2, port=0, node_id="node-2", discovery=discovery, heartbeat_interval=2)
    await node1.start()
    await node2.start()
    # Nodes register in the background (start() never waits on a coordinator): wait until both are in.
    with anyio.fail_after(10):
        while len(coordinator.nodes) < 2:  # noqa: ASYNC110 - polling the table is the point here
            await anyio.sleep(0.05)

    # 3. The cluster as the coordinator sees it.
    status = await coordinator.cluster_status()
    print(f"{status['healthy_nodes']}/{status['total_nodes']} nodes healthy, {status['total_processes']} processes")
    for node_id, runtime in (("node-1", rt1), ("node-2", rt2)):
        node = status["nodes"][node_id]
        print(f"  {node_id:8} {node['url']:24} {node['status']:8} processes: {', '.join(runtime.processes)}")

    # 4. Steer a process on another node, then broadcast to every node.
    await coordinator.inject_event_on_node("node-2", "analyst", {"ticker": "ACME"}, trigger_type="manual")
    await coordinator.restart_process_on_node("node-1", "watcher")
    print("broadcast to every node; each answers for itself (node-1 runs no 'analyst', so it says so):")
    results = await coordinator.broadcast_event("analyst", {"all": True})
    for node_id, result in results.items():
        print(f"  {node_id}: {result.get('status') or 'refused, ' + str(result.get('error'))}")
    with anyio.fail_after(10):
        await first_event.wait()
    print(handled[0])

    # 5. Shut everything down (nodes unregister themselves on the way out).
    await node1.stop()
    await node2.stop()
    await discovery.aclose()
    await coordinator.aclose()
    await coordinator_host.stop()
    print("cluster stopped")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
