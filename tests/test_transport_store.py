"""The node API over an event store (SPEC 12): dead-letter routes and the Idempotency-Key header, in process
over both stores, through `NodeClient`, and over a runtime without a store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import asgi_client, wait_for

from promptise_asgi.client import NodeClient, NodeError
from promptise_asgi.runtime import AgentRuntime, ProcessConfig, TriggerEvent
from promptise_asgi.store import EventStore, EventStoreError, MemoryStore, SQLiteStore
from promptise_asgi.transport import create_transport_app, node_lifespan


class Flaky:
    """A handler that raises until healed; it records what it handled."""

    def __init__(self) -> None:
        self.healed = False
        self.handled: list[TriggerEvent] = []

    async def __call__(self, event: TriggerEvent) -> None:
        if not self.healed:
            raise RuntimeError("not yet")
        self.handled.append(event)


@asynccontextmanager
async def node(
    store: EventStore, handler: Any = None, **config: Any
) -> AsyncIterator[tuple[Any, httpx.AsyncClient, Any]]:
    runtime = AgentRuntime(store=store)
    await runtime.add_process("worker", ProcessConfig(handler=handler, **config))
    app = create_transport_app(runtime, node_id="n")
    async with node_lifespan(app), asgi_client(app) as client:
        yield runtime.get_process("worker"), client, app


class TestIdempotencyKey:
    async def test_the_same_key_and_body_answer_the_first_202_and_queue_nothing(self, event_store: EventStore) -> None:
        async with node(event_store) as (process, client, _):
            await process.stop()
            first = await client.post(
                "/processes/worker/event", json={"payload": {"a": 1, "b": 2}}, headers={"Idempotency-Key": "order-7"}
            )
            assert first.status_code == 202 and "idempotent-replayed" not in first.headers
            # The same body as parsed JSON: key order and spacing do not matter.
            again = await client.post(
                "/processes/worker/event",
                content=b'{ "payload": {"b": 2, "a": 1} }',
                headers={"Idempotency-Key": "order-7", "content-type": "application/json"},
            )
            assert again.status_code == 202 and again.json() == first.json()
            assert again.headers["idempotent-replayed"] == "true"
            other = await client.post(
                "/processes/worker/event", json={"payload": {"a": 2}}, headers={"Idempotency-Key": "order-7"}
            )
            assert other.status_code == 422
            assert "order-7" in other.json()["error"] and first.json()["event_id"] in other.json()["error"]
            assert process.status()["queue_size"] == 1

    @pytest.mark.parametrize("key", [b"", b"x" * 256, "é".encode(), b"tab\there", b"\x7f"])
    async def test_a_bad_key_is_400(self, key: bytes) -> None:
        async with node(MemoryStore()) as (process, client, _):
            response = await client.post("/processes/worker/event", json={}, headers=[(b"idempotency-key", key)])
            assert response.status_code == 400 and "Idempotency-Key" in response.json()["error"]
            assert process.status()["events_received"] == 0
            # An unknown process is still 404 first.
            missing = await client.post("/processes/nope/event", json={}, headers=[(b"idempotency-key", key)])
            assert missing.status_code == 404

    async def test_keys_are_committed_with_their_event_and_survive_a_restart(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.sqlite3"
        async with node(SQLiteStore(path)) as (process, client, _):
            await process.stop()
            first = await client.post("/processes/worker/event", json={}, headers={"Idempotency-Key": "k"})
        async with node(SQLiteStore(path)) as (process, client, _):
            await process.stop()
            again = await client.post("/processes/worker/event", json={}, headers={"Idempotency-Key": "k"})
            assert again.json()["event_id"] == first.json()["event_id"]
            assert again.headers["idempotent-replayed"] == "true"
            # Only the first one, recovered: nothing new was accepted.
            assert (process.status()["events_recovered"], process.status()["events_received"]) == (1, 0)

    async def test_a_store_that_cannot_commit_answers_503(self) -> None:
        class FullDisk(MemoryStore):
            durable = True  # type: ignore[assignment]

            async def add(self, record: Any, key: Any = None) -> str:
                raise EventStoreError("event store /data/x.sqlite3: a write failed (disk full)")

            async def requeue_dead_letter(self, process: str, event_id: str) -> Any:
                raise EventStoreError("event store /data/x.sqlite3: a write failed (disk full)")

        async with node(FullDisk()) as (process, client, _):
            response = await client.post("/processes/worker/event", json={})
            assert response.status_code == 503 and "disk full" in response.json()["error"]
            await wait_for(lambda: process.status()["queue_size"] == 0)
            assert process.status()["events_received"] == process.status()["events_handled"] == 0
            await process.stop()
            response = await client.post("/processes/worker/event", json={})  # no worker waiting this time
            assert response.status_code == 503 and process.status()["queue_size"] == 0
            retry = await client.post("/processes/worker/dead-letters/x/retry")
            assert retry.status_code == 503 and "disk full" in retry.json()["error"]


class TestDeadLetterRoutes:
    async def test_list_retry_and_delete(self, event_store: EventStore) -> None:
        handler = Flaky()
        async with node(event_store, handler) as (process, client, _):
            ids = [(await client.post("/processes/worker/event", json={"payload": {"i": i}})).json() for i in range(3)]
            event_ids = [answer["event_id"] for answer in ids]
            await wait_for(lambda: process.status()["dead_letters"] == 3)
            listed = (await client.get("/processes/worker/dead-letters")).json()
            assert listed["process"] == "worker"
            assert [d["event_id"] for d in listed["dead_letters"]] == event_ids
            assert listed["dead_letters"][0]["reason"] == "error"
            assert listed["dead_letters"][0]["error"] == "RuntimeError: not yet"
            assert listed["dead_letters"][0]["event"]["payload"] == {"i": 0}
            newest = (await client.get("/processes/worker/dead-letters?limit=2")).json()["dead_letters"]
            assert [d["event_id"] for d in newest] == event_ids[1:]

            handler.healed = True
            retried = await client.post(f"/processes/worker/dead-letters/{event_ids[0]}/retry")
            assert retried.status_code == 202
            assert retried.json() == {"status": "queued", "event_id": event_ids[0], "process": "worker"}
            await wait_for(lambda: [e.event_id for e in handler.handled] == event_ids[:1])
            assert handler.handled[0].attempt == 2
            deleted = await client.delete(f"/processes/worker/dead-letters/{event_ids[1]}")
            assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
            for response in (
                await client.delete(f"/processes/worker/dead-letters/{event_ids[1]}"),
                await client.post(f"/processes/worker/dead-letters/{event_ids[0]}/retry"),
            ):
                assert response.status_code == 404 and "not found in process 'worker'" in response.json()["error"]
            assert (await client.get("/processes/nope/dead-letters")).status_code == 404
            assert (await client.delete(f"/processes/nope/dead-letters/{event_ids[2]}")).status_code == 404
            remaining = (await client.get("/processes/worker/dead-letters")).json()["dead_letters"]
            assert [d["event_id"] for d in remaining] == event_ids[2:]

    @pytest.mark.parametrize("limit", ["0", "-1", "abc", "10001", "", "1.5", "9999999"])
    async def test_a_bad_limit_is_400(self, limit: str) -> None:
        async with node(MemoryStore()) as (_, client, _):
            response = await client.get(f"/processes/worker/dead-letters?limit={limit}")
            assert response.status_code == 400 and "limit" in response.json()["error"]

    async def test_a_retry_into_a_full_queue_is_429_and_into_a_held_id_409(self, tmp_path: Path) -> None:
        async with node(SQLiteStore(tmp_path / "s.sqlite3"), Flaky(), max_queue=1) as (process, client, _):
            event_id = (await client.post("/processes/worker/event", json={})).json()["event_id"]
            await wait_for(lambda: process.status()["dead_letters"] == 1)
            await process.stop()
            await process.inject(TriggerEvent("t"))
            full = await client.post(f"/processes/worker/dead-letters/{event_id}/retry")
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
        async with node(SQLiteStore(tmp_path / "t.sqlite3"), Flaky()) as (process, client, _):
            event_id = (await client.post("/processes/worker/event", json={})).json()["event_id"]
            await wait_for(lambda: process.status()["dead_letters"] == 1)
            await process.stop()
            await process.inject(TriggerEvent("t", event_id=event_id))
            held = await client.post(f"/processes/worker/dead-letters/{event_id}/retry")
            assert held.status_code == 409 and "already holds" in held.json()["error"]

    async def test_the_routes_work_on_the_full_starlette_path_too(self) -> None:
        class Passthrough:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                await self.app(scope, receive, send)

        runtime = AgentRuntime()
        await runtime.add_process("worker", ProcessConfig())
        app = create_transport_app(runtime)
        app.add_middleware(Passthrough)  # from now on every request takes Starlette's router
        async with asgi_client(app) as client:
            assert (await client.get("/processes/worker/dead-letters")).json() == {
                "process": "worker",
                "dead_letters": [],
            }
            assert (await client.delete("/processes/worker/dead-letters/x")).status_code == 404


class TestARuntimeWithoutAStore:
    """The promptise runtime owns its queue: the routes say so (501) instead of pretending."""

    async def test_dead_letters_and_keys_answer_501(self) -> None:
        class Plain:
            process_id = "p1"
            state = "running"

            def status(self) -> dict[str, Any]:
                return {"name": "worker"}

            async def inject(self, event: Any) -> None:
                pass

        class PlainRuntime:
            processes = {"worker": Plain()}

            def get_process(self, name: str) -> Any:
                return self.processes[name]

            def status(self) -> dict[str, Any]:
                return {"process_count": 1, "processes": {}}

            async def start_process(self, name: str) -> None: ...

            async def stop_process(self, name: str) -> None: ...

            async def restart_process(self, name: str) -> None: ...

            async def start_all(self) -> None: ...

            async def stop_all(self) -> None: ...

        app = create_transport_app(PlainRuntime())
        async with asgi_client(app) as client:
            assert (await client.post("/processes/worker/event", json={})).status_code == 202
            keyed = await client.post("/processes/worker/event", json={}, headers={"Idempotency-Key": "k"})
            assert keyed.status_code == 501 and "Idempotency-Key needs" in keyed.json()["error"]
            for response in (
                await client.get("/processes/worker/dead-letters"),
                await client.post("/processes/worker/dead-letters/x/retry"),
                await client.delete("/processes/worker/dead-letters/x"),
            ):
                assert response.status_code == 501 and "Dead letters need" in response.json()["error"]


class TestNodeClient:
    async def test_keys_and_dead_letters_through_the_client(self, event_store: EventStore) -> None:
        handler = Flaky()
        async with node(event_store, handler) as (process, _, app):
            client = NodeClient("http://127.0.0.1", transport=httpx.ASGITransport(app=app))
            first = await client.inject_event("worker", {"a": 1}, idempotency_key="once")
            assert (await client.inject_event("worker", {"a": 1}, idempotency_key="once")) == first
            with pytest.raises(NodeError) as conflict:
                await client.inject_event("worker", {"a": 2}, idempotency_key="once")
            assert conflict.value.status_code == 422
            with pytest.raises(ValueError, match="Idempotency-Key"):
                await client.inject_event("worker", idempotency_key="")
            await wait_for(lambda: process.status()["dead_letters"] == 1)
            listed = await client.dead_letters("worker", limit=5)
            assert [d["event_id"] for d in listed["dead_letters"]] == [first["event_id"]]
            handler.healed = True
            assert (await client.retry_dead_letter("worker", first["event_id"]))["status"] == "queued"
            await wait_for(lambda: len(handler.handled) == 1)
            with pytest.raises(NodeError) as gone:
                await client.delete_dead_letter("worker", first["event_id"])
            assert gone.value.status_code == 404
            await client.aclose()
