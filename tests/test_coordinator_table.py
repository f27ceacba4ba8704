"""The coordinator's table at 10,000 nodes (SPEC 16): pages that hold under concurrent joins and leaves,
filters, and a table kept from a backend's watch (etcd's) instead of a listing per round."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from etcd_server import EtcdServer, TcpProxy
from support import (
    CountingTransport,
    ManualClock,
    counting_black_hole,
    dead_url,
    wait_for,
    wait_for_async,
)

from promptise_asgi.client import CoordinatorClient
from promptise_asgi.coordinator import RuntimeCoordinator, create_coordinator_app
from promptise_asgi.coordinator._digest import Digest
from promptise_asgi.discovery import CoordinatorDiscovery, DiscoveredNode, NodeChange, RegistryDiscovery
from promptise_asgi.etcd import EtcdDiscovery

BASE = "http://127.0.0.1"
DIGEST = {"process_count": 2, "processes": [{"name": "a", "state": "running", "queue_size": 3},
                                             {"name": "b", "state": "stopped"}]}  # fmt: skip


def app_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=BASE)


# -- pages ----------------------------------------------------------------------------------------------------


async def all_pages(client: httpx.AsyncClient, path: str, limit: int, **params: str) -> list[str]:
    seen: list[str] = []
    after = ""
    while True:
        answer = (await client.get(path, params={"limit": limit, "after": after, **params})).json()
        listed = answer["nodes"]
        seen += [n["node_id"] for n in listed] if isinstance(listed, list) else list(listed)
        if answer["next"] is None:
            return seen
        after = answer["next"]


class TestPages:
    async def test_pages_list_every_node_once_in_id_order(self) -> None:
        coordinator = RuntimeCoordinator()
        ids = [f"n{i:04d}" for i in range(250)]
        for node_id in random.Random(7).sample(ids, len(ids)):
            coordinator.register_node(node_id, "http://127.0.0.1:9", {"zone": "Eu-West" if node_id < "n0100" else "us"})
        async with app_client(create_coordinator_app(coordinator)) as client:
            assert await all_pages(client, "/cluster/nodes", 100) == ids
            assert await all_pages(client, "/cluster/nodes", 7) == ids
            first = (await client.get("/cluster/nodes")).json()
            assert (first["count"], first["total"], first["next"]) == (100, 250, "n0099")
            last = (await client.get("/cluster/nodes", params={"limit": 50, "after": "n0199"})).json()
            assert last["count"] == 50 and last["next"] is None
            # Filters: a metadata value or an id, case-insensitive.
            assert await all_pages(client, "/cluster/nodes", 30, q="eu-WEST") == ids[:100]
            assert await all_pages(client, "/cluster/nodes", 30, q="N012") == ids[120:130]
            assert await all_pages(client, "/cluster/nodes", 30, health="healthy") == []
            assert len(await all_pages(client, "/cluster/nodes", 1000, health="unknown")) == 250

    async def test_status_pages_count_every_node_and_check_only_their_own(self) -> None:
        coordinator = RuntimeCoordinator(request_timeout=0.2)
        with counting_black_hole() as (silent, connections):
            for i in range(20):
                coordinator.register_node(f"n{i:02d}", silent)
            for i in range(10, 20):
                await coordinator.accept_heartbeat(f"n{i:02d}", Digest(1))
            async with app_client(create_coordinator_app(coordinator)) as client:
                page = (await client.get("/cluster/status", params={"limit": 5, "after": "n12"})).json()
                assert list(page["nodes"]) == ["n13", "n14", "n15", "n16", "n17"] and page["next"] == "n17"
                assert connections() == 0  # every node of that page has a fresh digest
                assert (page["total_nodes"], page["healthy_nodes"], page["total_processes"]) == (20, 10, 10)
                page = (await client.get("/cluster/status", params={"limit": 3})).json()
                assert list(page["nodes"]) == ["n00", "n01", "n02"] and connections() == 3
                assert await all_pages(client, "/cluster/status", 6) == [f"n{i:02d}" for i in range(20)]
                whole = (await client.get("/cluster/status")).json()
                assert "next" not in whole and len(whole["nodes"]) == 20
        await coordinator.aclose()

    @pytest.mark.parametrize(
        ("path", "params", "error"),
        [
            ("/cluster/nodes", {"limit": "0"}, "limit must be an integer from 1 to 1000"),
            ("/cluster/nodes", {"limit": "1001"}, "limit must be an integer from 1 to 1000"),
            ("/cluster/nodes", {"limit": "ten"}, "limit must be an integer from 1 to 1000"),
            ("/cluster/nodes", {"limit": "-5"}, "limit must be an integer from 1 to 1000"),
            ("/cluster/nodes", {"after": "-bad"}, "after must be a node id"),
            ("/cluster/nodes", {"health": "sick"}, "health must be one of healthy, unhealthy, unknown, missed_check"),
            ("/cluster/nodes", {"q": "x" * 300}, "q must be text of at most 256 characters"),
            ("/cluster/status", {"limit": "5000"}, "limit must be an integer from 1 to 1000"),
            ("/cluster/status", {"limit": "2", "after": "a b"}, "after must be a node id"),
        ],
    )
    async def test_bad_page_parameters_are_400(self, path: str, params: dict[str, str], error: str) -> None:
        async with app_client(create_coordinator_app(RuntimeCoordinator())) as client:
            response = await client.get(path, params=params)
        assert response.status_code == 400 and response.json()["error"].startswith(error)

    async def test_page_arguments_are_checked_in_process_too(self) -> None:
        coordinator = RuntimeCoordinator()
        with pytest.raises(ValueError, match="limit"):
            await coordinator.cluster_status(limit=0)
        with pytest.raises(ValueError, match="health"):
            await coordinator.node_page(health="bad")

    async def test_every_node_exactly_once_while_nodes_join_and_leave(self) -> None:
        rng = random.Random(16)
        coordinator = RuntimeCoordinator()
        # Nodes that stay the whole time, and nodes that come and go, spread over the same id space.
        stable = {f"node-{i:05d}" for i in range(0, 3000, 2)}
        churn = [f"node-{i:05d}" for i in range(1, 3000, 2)]
        for node_id in sorted(stable) + churn[:500]:
            coordinator.register_node(node_id, "http://127.0.0.1:9")
        ever_present = set(coordinator.nodes)
        app = create_coordinator_app(coordinator)

        async def come_and_go(client: httpx.AsyncClient) -> None:
            for _ in range(20):
                node_id = rng.choice(churn)
                if node_id in coordinator.nodes:
                    assert (await client.delete(f"/cluster/nodes/{node_id}")).status_code == 200
                else:
                    ever_present.add(node_id)
                    body = {"node_id": node_id, "url": "http://127.0.0.1:9"}
                    assert (await client.post("/cluster/nodes", json=body)).status_code == 200

        for path, limit in (("/cluster/nodes", 37), ("/cluster/status", 101), ("/cluster/nodes", 1000)):
            seen: list[str] = []
            after = ""
            async with app_client(app) as client:
                while True:
                    page = client.get(path, params={"limit": limit, "after": after})
                    # Joins and leaves through the API, between and during page reads.
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(come_and_go, client)
                        answer = (await page).json()
                    seen += (
                        list(answer["nodes"]) if path == "/cluster/status" else [n["node_id"] for n in answer["nodes"]]
                    )
                    if answer["next"] is None:
                        break
                    after = answer["next"]
            assert len(seen) == len(set(seen)), "a node was listed twice"
            assert seen == sorted(seen)
            assert stable <= set(seen), "a node present throughout was missed"
            assert set(seen) <= ever_present


# -- the table kept from etcd's watch ---------------------------------------------------------------------------


@pytest.mark.etcd
@pytest.mark.slow
async def test_an_etcd_coordinator_keeps_its_table_from_the_watch_not_from_listings(etcd: EtcdServer) -> None:
    prefix = f"/test/{uuid.uuid4().hex}/"
    proxy = TcpProxy(etcd.client_port)
    counted = CountingTransport()

    def listings() -> int:
        return counted.paths.get("/v3/kv/range", 0)

    async def table_is(expected: set[str]) -> None:
        await wait_for(lambda: set(coordinator.nodes) == expected, what=f"the table to be {sorted(expected)}")

    url = dead_url()  # the nodes are polled; what matters here is the table
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        async with (
            EtcdDiscovery(etcd.url, prefix=prefix) as registrar,
            EtcdDiscovery(proxy.url, prefix=prefix, transport=counted) as watched,
        ):
            watched.watch_backoff = (0.05, 0.2)
            await registrar.register("n1", url)
            await registrar.register("n2", url, {"v": 1})
            coordinator = RuntimeCoordinator(discovery=watched, health_check_interval=0.05, request_timeout=1)
            async with coordinator:
                await table_is({"n1", "n2"})
                assert listings() == 1  # one reading of the registry at the start
                for _ in range(5):  # rounds and on-demand status list nothing while the watch runs
                    await coordinator.check_health()
                    await coordinator.sync_discovery()
                    await coordinator.cluster_status()
                await registrar.register("n3", url)
                await registrar.register("n2", url, {"v": 2})
                await registrar.unregister("n1")
                await table_is({"n2", "n3"})
                await wait_for(lambda: coordinator.get_node("n2").metadata == {"v": 2})
                assert listings() == 1

                # The stream is lost: the watch resumes at the next revision, with no listing at all.
                proxy.drop()
                await wait_for_async(lambda: _discovery_down(coordinator), what="status to show etcd out of reach")
                await registrar.register("n4", url)
                await registrar.unregister("n2")
                proxy.allow()
                await table_is({"n3", "n4"})
                await wait_for_async(lambda: _discovery_up(coordinator), what="status to show etcd back")
                assert listings() == 1

                # A gap the watch cannot bridge (the revisions it needs were compacted): one listing.
                proxy.drop()
                await registrar.register("n5", url)
                await registrar.unregister("n3")
                async with httpx.AsyncClient(base_url=etcd.url) as etcd_client:
                    read = await etcd_client.post("/v3/kv/range", json={"key": "Lw=="})  # any key: for the revision
                    revision = read.json()["header"]["revision"]
                    compaction = {"revision": revision, "physical": True}
                    assert (await etcd_client.post("/v3/kv/compaction", json=compaction)).status_code == 200
                proxy.allow()
                await table_is({"n4", "n5"})
                assert listings() == 2
            await coordinator.aclose()
        tg.cancel_scope.cancel()


async def _discovery_down(coordinator: RuntimeCoordinator) -> bool:
    return (await coordinator.cluster_status())["discovery"]["ok"] is False


async def _discovery_up(coordinator: RuntimeCoordinator) -> bool:
    return (await coordinator.cluster_status())["discovery"]["ok"] is True


# -- following a watch: what happens when it cannot ----------------------------------------------------------


class Watchable(RegistryDiscovery):
    """An in-process registry with a watch the test feeds by hand, which can fail, end, or predate `known`."""

    def __init__(self, mode: str = "ok") -> None:
        super().__init__(ttl=60)
        self.mode = mode
        self.discovers = 0
        self.watches: list[list[DiscoveredNode] | None] = []
        self.send, self.receive = anyio.create_memory_object_stream[NodeChange](100)
        self.watch_error: str | None = None

    async def discover(self) -> list[DiscoveredNode]:
        self.discovers += 1
        return await super().discover()

    def close(self) -> None:
        self.send.close()
        self.receive.close()

    def watch(  # type: ignore[override]
        self, *, include_existing: bool = False, known: Any = None
    ) -> AsyncIterator[NodeChange]:
        if self.mode == "old":
            raise TypeError("watch() got an unexpected keyword argument 'known'")
        self.watches.append(None if known is None else list(known))
        return self._changes()

    async def _changes(self) -> AsyncIterator[NodeChange]:
        if self.mode == "fails":
            self.mode = "ok"  # once
            raise OSError("watch refused")
        while True:
            change = await self.receive.receive()
            if change.kind == "leave" and change.node_id == "end-of-watch":
                return
            yield change


class TestFollowingAWatch:
    async def test_joins_and_leaves_reach_the_table_and_rounds_list_nothing(self) -> None:
        backend = Watchable()
        coordinator = RuntimeCoordinator(discovery=backend, health_check_interval=0.05, request_timeout=0.5)
        coordinator.register_node("pinned", dead_url())
        async with coordinator:
            await backend.send.send(NodeChange("join", "w1", DiscoveredNode("w1", dead_url())))
            await backend.send.send(NodeChange("join", "bad", DiscoveredNode("bad", "http://169.254.169.254")))
            await wait_for(lambda: "w1" in coordinator.nodes)
            await backend.send.send(NodeChange("leave", "pinned"))  # registered in process: it stays
            await backend.send.send(NodeChange("leave", "w1"))
            await wait_for(lambda: "w1" not in coordinator.nodes)
            for _ in range(3):
                await coordinator.check_health()
            assert backend.discovers == 0 and set(coordinator.nodes) == {"pinned"}
            # The backend says its watch cannot reach the registry: status says so, and when it can again.
            backend.watch_error = "etcd unavailable"
            assert (await coordinator.cluster_status())["discovery"]["ok"] is False
            backend.watch_error = None
            assert (await coordinator.cluster_status())["discovery"]["ok"] is True
            # The watch ends: rounds list the backend until the watch runs again, from the table's picture.
            await backend.send.send(NodeChange("leave", "end-of-watch"))
            await wait_for(lambda: backend.discovers > 0, what="a round to list the backend")
            await wait_for(lambda: len(backend.watches) == 2, what="the watch to start again")
        backend.close()
        assert backend.watches[0] == []

    @pytest.mark.parametrize("mode", ["fails", "old"])
    async def test_a_watch_that_fails_or_predates_known_falls_back_to_listing(self, mode: str) -> None:
        backend = Watchable(mode)
        await backend.register("d1", dead_url())
        coordinator = RuntimeCoordinator(discovery=backend, health_check_interval=0.05, request_timeout=0.5)
        async with coordinator:
            await wait_for(lambda: "d1" in coordinator.nodes, what="a listing to bring the node")
            assert backend.discovers >= 1
            if mode == "fails":
                await wait_for(lambda: len(backend.watches) == 2, what="the watch to be tried again")
        backend.close()


# -- the client side of pages -----------------------------------------------------------------------------------


class TestClientPages:
    async def test_the_client_reads_every_page_and_one_page(self) -> None:
        coordinator = RuntimeCoordinator()
        for i in range(1500):
            coordinator.register_node(f"n{i:04d}", "http://127.0.0.1:9", {"rack": "R7" if i % 100 == 0 else "r1"})
        transport = httpx.ASGITransport(app=create_coordinator_app(coordinator))
        async with CoordinatorDiscovery(BASE, transport=transport) as discovery:
            listed = await discovery.discover()
            assert [n.node_id for n in listed] == [f"n{i:04d}" for i in range(1500)]
        async with CoordinatorClient(BASE, transport=transport) as client:
            page = await client.node_page(limit=3, q="r7", after="n0100")
            assert [n["node_id"] for n in page["nodes"]] == ["n0200", "n0300", "n0400"] and page["next"] == "n0400"
            # A filtered page that ends on the last match gives no cursor: Next never leads to an empty page.
            last = await client.node_page(limit=4, q="r7", after="n1000")
            assert [n["node_id"] for n in last["nodes"]] == ["n1100", "n1200", "n1300", "n1400"]
            assert last["next"] is None
            status = await client.cluster_status(limit=2)
            assert list(status["nodes"]) == ["n0000", "n0001"] and status["total_nodes"] == 1500
        await coordinator.aclose()

    async def test_filters_by_health(self) -> None:
        clock = ManualClock()
        coordinator = RuntimeCoordinator(request_timeout=0.2, clock=clock)
        for node_id in ("a", "b", "c", "d"):
            coordinator.register_node(node_id, dead_url())
        for node_id in ("a", "b", "c"):
            await coordinator.accept_heartbeat(node_id, Digest(1))
        clock.now += 20  # stale digests: the next check of "b" fails, inside node_timeout
        await coordinator._health.check([coordinator.get_node("b")])
        page = await coordinator.node_page(health="missed_check")
        assert [n["node_id"] for n in page["nodes"]] == ["b"]
        assert [n["node_id"] for n in (await coordinator.node_page(health="healthy", q=""))["nodes"]] == ["a", "b", "c"]
        assert [n["node_id"] for n in (await coordinator.node_page(health="unknown"))["nodes"]] == ["d"]
        await coordinator.aclose()
