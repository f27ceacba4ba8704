"""Live change streams (SPEC 13): the hub's ids, history and backpressure, a node's `/changes` over real
sockets, resume by id, a slow reader, shutdown with open streams, and the client's reconnect."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from support import free_port, wait_for

from promptise_asgi._changes import Change, ChangeHub
from promptise_asgi.client import NodeClient, NodeError
from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerEvent
from promptise_asgi.transport import RuntimeTransport, create_transport_app, node_lifespan


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hub(clock: Callable[[], float] | None = None, **options: Any) -> ChangeHub:
    return ChangeHub(lambda: {"state": "now"}, clock=clock or Clock(), **options)


async def drain(subscription: Any, count: int) -> list[Change]:
    return [await subscription.receive() for _ in range(count)]


class TestHub:
    async def test_ids_only_grow_and_start_above_an_earlier_run(self) -> None:
        clock = Clock()
        first = hub(clock)
        ids = [first.publish("x", {"i": i}).id for i in range(5)]
        assert ids == sorted(set(ids)) and ids[0] > clock.now * 1_000_000 - 1
        clock.now += 0.5  # a later run of the app, half a second on
        assert hub(clock).publish("x", {}).id > ids[-1]

    async def test_a_fresh_subscription_starts_with_a_snapshot_at_the_newest_id(self) -> None:
        h = hub()
        last = h.publish("x", {"i": 1})
        async with h.subscribe() as subscription:
            snapshot = await subscription.receive()
            assert (snapshot.id, snapshot.type, snapshot.data) == (last.id, "snapshot", {"state": "now"})
            h.publish("x", {"i": 2})
            assert (await subscription.receive()).data == {"i": 2}

    async def test_resume_replays_what_came_after_and_too_old_or_unknown_ids_get_a_snapshot(self) -> None:
        h = hub(history=1024)
        changes = [h.publish("x", {"i": i}) for i in range(1500)]
        async with h.subscribe(changes[1200].id) as subscription:
            replayed = await drain(subscription, 299)
        assert [c.data["i"] for c in replayed] == list(range(1201, 1500))
        async with h.subscribe(changes[-1].id) as subscription:
            h.publish("x", {"i": "next"})
            assert (await subscription.receive()).data == {"i": "next"}  # nothing to replay, nothing skipped
        for stale in (changes[100].id, changes[-1].id + 10**9, 12):  # forgotten, from the future, another run
            async with h.subscribe(stale) as subscription:
                assert (await subscription.receive()).type == "snapshot"

    async def test_a_reader_that_falls_behind_is_cut_off_and_the_publisher_never_waits(self) -> None:
        h = hub(buffer=1024)
        async with h.subscribe() as slow, h.subscribe() as fast:
            await slow.receive(), await fast.receive()  # the snapshots
            with anyio.fail_after(1):  # publishing 1,100 changes never waits for anyone
                for i in range(1100):
                    h.publish("x", {"i": i})
                    if i < 1000:
                        await fast.receive()
            assert slow.lagged and not fast.lagged
            kept = await drain(slow, 1024)
            assert [c.data["i"] for c in kept] == list(range(1024))
            with pytest.raises(anyio.EndOfStream):
                await slow.receive()
            assert h.subscribers == 1
            # It resumes from the last id it holds: what it missed is still in the history.
            async with h.subscribe(kept[-1].id) as again:
                assert (await again.receive()).data == {"i": 1024}

    async def test_close_ends_streams_and_refuses_new_ones(self) -> None:
        h = hub()
        async with h.subscribe() as subscription:
            await subscription.receive()
            h.close()
            with pytest.raises(anyio.EndOfStream):
                await subscription.receive()
        with pytest.raises(anyio.ClosedResourceError):
            h.subscribe()

    def test_history_and_buffer_hold_at_least_1024(self) -> None:
        with pytest.raises(ValueError, match="1024"):
            hub(history=100)


# -- a node's /changes over real sockets ---------------------------------------------------------------------


async def handler(event: TriggerEvent) -> None:
    """Does nothing: the counters are what these tests watch."""


@asynccontextmanager
async def node(**options: Any) -> AsyncIterator[tuple[AgentRuntime, RuntimeTransport]]:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(handler=handler))
    async with RuntimeTransport(runtime, port=options.pop("port", 0), node_id="n1", **options) as transport:
        yield runtime, transport


class SSE:
    """A raw SSE reader over one streaming GET (comments kept as {'comment': ...}), for checking the wire."""

    def __init__(self, client: httpx.AsyncClient, path: str, **options: Any) -> None:
        self._context = client.stream("GET", path, **options)
        self.messages: list[dict[str, Any]] = []

    async def __aenter__(self) -> SSE:
        self.response = await self._context.__aenter__()
        self._lines = self.response.aiter_lines()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.response.aclose()
        with contextlib.suppress(Exception):  # let the line generator end on the closed stream (trio checks)
            async for _ in self._lines:
                pass
        await self._context.__aexit__(*exc_info)

    async def until(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """Read until `done(messages read by this call)` holds; return those messages."""
        messages: list[dict[str, Any]] = []
        current: dict[str, Any] = {}
        with anyio.fail_after(10):
            async for line in self._lines:
                if line.startswith(":"):
                    messages.append({"comment": line[1:].strip()})
                elif line == "" and current:
                    current["data"] = json.loads(current["data"])
                    messages.append(current)
                    current = {}
                elif ":" in line:
                    key, _, value = line.partition(":")
                    current[key] = int(value.strip()) if key == "id" else value.strip()
                if done(messages):
                    break
        self.messages += messages
        return messages


def types_of(messages: list[dict[str, Any]]) -> list[str]:
    return [m.get("event", "comment") for m in messages]


class TestNodeStream:
    async def test_snapshot_then_states_counters_and_processes(self) -> None:
        async with node() as (runtime, transport), httpx.AsyncClient(base_url=transport.url) as client:
            async with SSE(client, "/changes") as stream:
                assert stream.response.headers["content-type"].startswith("text/event-stream")
                assert stream.response.headers["cache-control"] == "no-cache"
                first = await stream.until(lambda m: len(m) >= 1)
                assert first[0]["event"] == "snapshot" and first[0]["data"]["node_id"] == "n1"
                assert first[0]["data"]["processes"]["worker"]["state"] == "running"
                await client.post("/processes/worker/stop")
                for _ in range(3):
                    await client.post("/processes/worker/event", json={})
                await runtime.add_process("extra", ProcessConfig())
                await runtime.remove_process("extra")
                seen = await stream.until(
                    lambda m: (
                        "process.removed" in types_of(m)
                        and any(
                            x.get("data", {}).get("queue_size") == 3 for x in m if x.get("event") == "process.counters"
                        )
                    ),
                )
        data = {(m["event"], json.dumps(m["data"], sort_keys=True)) for m in seen if "event" in m}
        assert (
            "process.state",
            json.dumps({"name": "worker", "previous": "running", "state": "stopping"}, sort_keys=True),
        ) in data
        assert (
            "process.state",
            json.dumps({"name": "worker", "previous": "stopping", "state": "stopped"}, sort_keys=True),
        ) in data
        assert ("process.added", '{"name": "extra"}') in data and ("process.removed", '{"name": "extra"}') in data
        counters = [m["data"] for m in seen if m.get("event") == "process.counters" and m["data"]["name"] == "worker"]
        assert counters[-1] == {
            "name": "worker", "queue_size": 3, "in_flight": 0,
            "events_received": 3, "events_handled": 0, "events_failed": 0,
        }  # fmt: skip
        assert len(counters) <= 3  # coalesced: one per second at most, not one per event
        ids = [m["id"] for m in first + seen if "id" in m]
        assert ids[1:] == sorted(ids[1:]) and len(set(ids[1:])) == len(ids[1:])

    async def test_resume_by_header_or_query_and_a_stale_id_gets_a_snapshot(self) -> None:
        async with node() as (_, transport), httpx.AsyncClient(base_url=transport.url) as client:
            async with SSE(client, "/changes") as stream:
                snapshot = (await stream.until(lambda m: len(m) >= 1))[0]
            await client.post("/processes/worker/stop")
            await client.post("/processes/worker/start")
            headers = {"Last-Event-ID": str(snapshot["id"])}
            for request in ({"headers": headers}, {"params": {"last_event_id": snapshot["id"]}}):
                async with SSE(client, "/changes", **request) as stream:
                    replayed = await stream.until(lambda m: len(m) >= 4)
                assert [(m["event"], m["data"]["state"]) for m in replayed] == [
                    ("process.state", "stopping"),
                    ("process.state", "stopped"),
                    ("process.state", "starting"),
                    ("process.state", "running"),
                ]
                assert all(m["id"] > snapshot["id"] for m in replayed)
            async with SSE(client, "/changes", headers={"Last-Event-ID": "12"}) as stream:
                assert (await stream.until(lambda m: len(m) >= 1))[0]["event"] == "snapshot"

    async def test_an_event_given_up_on_is_announced_as_a_dead_letter(self) -> None:
        async def failing(event: TriggerEvent) -> None:
            raise RuntimeError("always")

        runtime = AgentRuntime()
        await runtime.add_process("fragile", ProcessConfig(handler=failing, max_attempts=2, retry_backoff=0.01))
        async with RuntimeTransport(runtime, port=0) as transport, httpx.AsyncClient(base_url=transport.url) as client:
            async with SSE(client, "/changes") as stream:
                await stream.until(lambda m: len(m) >= 1)
                event_id = (await client.post("/processes/fragile/event", json={})).json()["event_id"]
                seen = await stream.until(lambda m: "process.dead_letter" in types_of(m))
            status = (await client.get("/processes/fragile/status")).json()
        dead = [m["data"] for m in seen if m.get("event") == "process.dead_letter"]
        assert dead == [{"name": "fragile", "event_id": event_id, "reason": "error"}]
        assert status["dead_letters"] == 1

    async def test_pings_keep_a_quiet_stream_open(self) -> None:
        async with node(ping_interval=0.1) as (_, transport), httpx.AsyncClient(base_url=transport.url) as client:
            async with SSE(client, "/changes") as stream:
                messages = await stream.until(lambda m: types_of(m).count("comment") >= 2)
        assert {"comment": "ping"} in messages

    async def test_the_stream_needs_a_token_like_any_read_route_and_a_read_only_one_will_do(self) -> None:
        options = {"auth_token": "s3cret", "read_token": "look-only"}
        async with node(**options) as (_, transport), httpx.AsyncClient(base_url=transport.url) as client:
            assert (await client.get("/changes")).status_code == 401
            for token in ("s3cret", "look-only"):
                async with SSE(client, "/changes", headers={"Authorization": f"Bearer {token}"}) as stream:
                    assert stream.response.status_code == 200
                    assert (await stream.until(lambda m: len(m) >= 1))[0]["event"] == "snapshot"

    @pytest.mark.parametrize(
        ("anyio_backend", "server"),
        [("asyncio", "uvicorn"), ("asyncio", "hypercorn"), ("trio", "hypercorn")],
    )
    async def test_stopping_a_node_with_100_open_streams_is_quick(self, server: str) -> None:
        graceful = 2.0
        runtime = AgentRuntime()
        await runtime.add_process("worker", ProcessConfig())
        transport = RuntimeTransport(runtime, port=0, graceful_timeout=graceful, server=server)  # type: ignore[arg-type]
        await transport.start()
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=transport.url, limits=limits, timeout=30) as client:
            ended = 0

            async def reader() -> None:
                nonlocal ended
                async with SSE(client, "/changes") as stream:
                    await stream.until(lambda m: False)  # to the end of the stream
                ended += 1

            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(reader)
                await wait_for(lambda: transport.app.state.node.changes.hub.subscribers == 100)
                started = anyio.current_time()
                await transport.stop()
                elapsed = anyio.current_time() - started
        assert ended == 100
        assert elapsed < graceful + 1.0
        phases = [c.data["phase"] for c in transport.app.state.node.changes.hub._history if c.type == "node.phase"]
        assert phases[-2:] == ["draining", "stopped"]

    async def test_a_reader_that_stops_reading_is_cut_off_and_the_node_keeps_answering(self) -> None:
        async with node() as (_, transport), httpx.AsyncClient(base_url=transport.url) as client:
            stalled = await anyio.connect_tcp("127.0.0.1", transport.port)
            await stalled.send(b"GET /changes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never reads
            hub = transport.app.state.node.changes.hub
            await wait_for(lambda: hub.subscribers == 1)
            published = 0
            with anyio.fail_after(60):
                while hub.subscribers:  # 1 KB changes: the socket's buffers fill, then the reader's 1,024
                    for _ in range(200):
                        hub.publish("test.blob", {"blob": "x" * 1000, "n": published})
                        published += 1
                    assert (await client.get("/health")).status_code == 200  # the stalled stream blocks nobody
            received = bytearray()
            with anyio.fail_after(20):  # what the reader holds, then the chunked body's end (or the close)
                with contextlib.suppress(anyio.EndOfStream):
                    while not received.endswith(b"\r\n0\r\n\r\n"):
                        received += await stalled.receive()
            await stalled.aclose()
            numbers = [int(n) for n in re.findall(rb'"n":(\d+)', bytes(received))]
            assert numbers == list(range(len(numbers)))  # in order, none skipped silently before the cut
            assert len(numbers) >= 1024 and published > len(numbers)  # it was cut off, not sent everything


class TestWithoutHooks:
    """A runtime with no observer hook (the promptise runtime): the node compares status once a second."""

    async def test_added_removed_and_states_are_derived(self) -> None:
        class Plain:
            def __init__(self, inner: AgentRuntime) -> None:
                self.inner = inner
                self.processes = inner.processes
                self.get_process = inner.get_process
                self.status = inner.status
                self.start_process = inner.start_process
                self.stop_process = inner.stop_process
                self.restart_process = inner.restart_process
                self.start_all = inner.start_all
                self.stop_all = inner.stop_all

        inner = AgentRuntime()
        await inner.add_process("a", ProcessConfig())
        app = create_transport_app(Plain(inner))  # type: ignore[arg-type]
        changes = app.state.node.changes
        async with node_lifespan(app), changes.hub.subscribe() as subscription:
            await subscription.receive()  # snapshot
            await inner.add_process("b", ProcessConfig())
            await inner.stop_process("a")
            changes.tick()
            got = [(c.type, c.data) for c in [await subscription.receive() for _ in range(4)]]
        assert ("process.added", {"name": "b"}) in got
        assert ("process.state", {"name": "a", "state": "stopped", "previous": "running"}) in got
        assert sum(1 for kind, _ in got if kind == "process.counters") == 2  # a's changed, b's first reading


# -- the client ---------------------------------------------------------------------------------------------


class TestClient:
    async def test_it_reconnects_after_a_restart_and_resumes_by_id(self) -> None:
        port = free_port()
        runtime = AgentRuntime()
        await runtime.add_process("worker", ProcessConfig())
        async with NodeClient(f"http://127.0.0.1:{port}") as client:
            transport = RuntimeTransport(runtime, port=port)
            await transport.start()
            async with client.changes() as changes:
                first = await anext(changes)
                assert first.type == "snapshot"
                await client.stop("worker")
                assert (await anext(changes)).type == "process.state"
                await transport.stop()
                transport = RuntimeTransport(runtime, port=port)
                await transport.start()
                try:
                    # A new run has no history before it: the resumed stream starts with a fresh snapshot.
                    kinds = [change.type async for change in _take(changes, 3)]
                finally:
                    await transport.stop()
            assert "snapshot" in kinds and changes.reconnects >= 1

    async def test_a_refused_stream_raises(self) -> None:
        async with node(auth_token="right") as (_, transport):
            async with NodeClient(transport.url, auth_token="wrong") as client, client.changes() as changes:
                with pytest.raises(NodeError) as caught:
                    await anext(changes)
        assert caught.value.status_code == 401


async def _take(changes: Any, count: int) -> AsyncIterator[Change]:
    for _ in range(count):
        with anyio.fail_after(20):
            yield await anext(changes)


# -- the coordinator's stream ------------------------------------------------------------------------------


class TestCoordinatorStream:
    async def test_joined_health_processes_and_left_in_process(self) -> None:
        from support import dead_url

        from promptise_asgi.coordinator import RuntimeCoordinator

        coordinator = RuntimeCoordinator(health_check_interval=0.2, request_timeout=1, node_timeout=0.3)
        async with coordinator, node() as (runtime, transport), coordinator.changes() as changes:
            snapshot = await changes.receive()
            assert (snapshot.type, snapshot.data["total_nodes"]) == ("snapshot", 0)
            coordinator.register_node("n1", transport.url, {"zone": "a"})
            coordinator.register_node("gone", dead_url())
            seen: dict[str, list[dict[str, Any]]] = {}

            async def until(kind: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
                with anyio.fail_after(10):
                    while True:
                        for data in seen.get(kind, []):
                            if check(data):
                                return data
                        change = await changes.receive()
                        seen.setdefault(change.type, []).append(change.data)

            assert await until("node.joined", lambda d: d["node_id"] == "n1") == {
                "node_id": "n1", "url": transport.url, "metadata": {"zone": "a"},
            }  # fmt: skip
            health = await until("node.health", lambda d: d["node_id"] == "n1")
            assert health == {"node_id": "n1", "healthy": True, "missed_check": False, "process_count": 1, "error": ""}
            await until("node.health", lambda d: d["node_id"] == "gone" and not d["healthy"] and d["error"])
            listed = await until("node.processes", lambda d: d["node_id"] == "n1")
            assert listed["processes"] == [{"name": "worker", "state": "running"}]
            await runtime.stop_process("worker")  # learned by the monitor's checks, within two intervals
            await until("node.processes", lambda d: d["processes"] == [{"name": "worker", "state": "stopped"}])
            coordinator.unregister_node("gone")
            assert await until("node.left", lambda d: d["node_id"] == "gone") == {
                "node_id": "gone",
                "reason": "unregistered",
            }

    async def test_an_expired_node_leaves_with_its_reason(self) -> None:
        from promptise_asgi.coordinator import RuntimeCoordinator
        from promptise_asgi.discovery import RegistryDiscovery

        clock = Clock(0.0)
        registry = RegistryDiscovery(ttl=5, clock=clock)
        coordinator = RuntimeCoordinator(discovery=registry)
        await registry.register("n1", "http://127.0.0.1:9")
        await coordinator.sync_discovery()
        async with coordinator.changes() as changes:
            assert [n for n in (await changes.receive()).data["nodes"]] == ["n1"]
            clock.now = 10.0
            await coordinator.sync_discovery()
            change = await changes.receive()
        assert (change.type, change.data) == ("node.left", {"node_id": "n1", "reason": "expired"})
        await coordinator.aclose()

    async def test_over_http_with_the_client_and_a_view_of_the_cluster(self) -> None:
        from promptise_asgi._client import ClusterView
        from promptise_asgi.client import CoordinatorClient
        from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
        from promptise_asgi.transport import AppServer

        coordinator = RuntimeCoordinator(health_check_interval=0.2, request_timeout=1)
        server = AppServer(create_coordinator_app(coordinator, auth_token="ops"), "127.0.0.1", 0)
        async with coordinator, node() as (_, transport):
            await server.start()
            try:
                view = ClusterView()
                async with CoordinatorClient(server.url, auth_token="ops") as client, client.changes() as changes:
                    view.apply(await anext(changes))
                    coordinator.register_node("n1", transport.url, {"zone": "a"})
                    with anyio.fail_after(10):
                        while view.status()["healthy_nodes"] != 1:
                            view.apply(await anext(changes))
                status = view.status()
                assert status["total_nodes"] == 1 and status["total_processes"] == 1
                assert status["nodes"]["n1"]["url"] == transport.url
                async with CoordinatorClient(server.url, auth_token="wrong") as client, client.changes() as changes:
                    with pytest.raises(NodeError) as caught:
                        await anext(changes)
                assert caught.value.status_code == 401 and "coordinator" in str(caught.value)
            finally:
                coordinator.change_hub.close()
                await server.stop()
