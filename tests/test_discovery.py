from __future__ import annotations

import random
import time
from typing import Any

import anyio
import pytest

from promptise_asgi.discovery import (
    DiscoveredNode,
    ProcessDiscovery,
    RegistryDiscovery,
    StaticDiscovery,
)


class FakeClock:
    """A monotonic clock the test moves by hand, so TTL expiry needs no sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ids(nodes: list[DiscoveredNode]) -> list[str]:
    return [n.node_id for n in nodes]


BAD_NODE_IDS: list[Any] = ["", "-a", ".a", "a b", "a/b", "a" * 129, "é", 7, None]
BAD_URLS: list[Any] = ["ftp://h", "h:1", "http://", "", "//h:1", 7, None]
BAD_METADATA: list[Any] = [[1], "x", {"f": object()}, {"s": {1, 2}}]


# --- both backends -------------------------------------------------------------------------------------------


@pytest.fixture(params=["static", "registry"])
def backend(request: pytest.FixtureRequest) -> StaticDiscovery | RegistryDiscovery:
    if request.param == "static":
        return StaticDiscovery()
    return RegistryDiscovery(ttl=30.0, clock=FakeClock())


def test_backends_satisfy_the_protocol() -> None:
    assert isinstance(StaticDiscovery(), ProcessDiscovery)
    assert isinstance(RegistryDiscovery(), ProcessDiscovery)


async def test_register_normalizes_url_and_keeps_metadata(backend: StaticDiscovery | RegistryDiscovery) -> None:
    await backend.register("n1", "http://h:1/runtime//", {"zone": "eu", "n": [1, 2]})
    [node] = await backend.discover()
    assert node.node_id == "n1"
    assert node.url == "http://h:1/runtime"
    assert node.metadata == {"zone": "eu", "n": [1, 2]}


async def test_register_again_replaces_url_and_metadata(backend: StaticDiscovery | RegistryDiscovery) -> None:
    await backend.register("n1", "http://old:1", {"a": 1, "b": 2})
    await backend.register("n1", "https://new:2/", {"c": 3})
    [node] = await backend.discover()
    assert (node.url, node.metadata) == ("https://new:2", {"c": 3})
    await backend.register("n1", "https://new:2")
    [node] = await backend.discover()
    assert node.metadata == {}


async def test_unregister_removes_and_unknown_is_a_noop(backend: StaticDiscovery | RegistryDiscovery) -> None:
    await backend.register("a", "http://a:1")
    await backend.register("b", "http://b:1")
    await backend.unregister("a")
    await backend.unregister("a")
    await backend.unregister("never-seen")
    assert ids(await backend.discover()) == ["b"]
    assert len(backend) == 1


async def test_register_copies_the_callers_metadata(backend: StaticDiscovery | RegistryDiscovery) -> None:
    metadata = {"zone": "eu"}
    await backend.register("a", "http://a:1", metadata)
    metadata["zone"] = "changed by caller after register"
    [node] = await backend.discover()
    assert node.metadata == {"zone": "eu"}


async def test_an_earlier_discover_result_never_changes(backend: StaticDiscovery | RegistryDiscovery) -> None:
    await backend.register("a", "http://a:1", {"v": 1})
    await backend.register("b", "http://b:1")
    earlier = await backend.discover()
    snapshot = [n.to_dict() for n in earlier]
    await backend.register("a", "http://a:2", {"v": 2})
    if isinstance(backend, RegistryDiscovery):
        assert await backend.heartbeat("b")
    await backend.unregister("b")
    await backend.register("c", "http://c:1")
    assert [n.to_dict() for n in earlier] == snapshot
    [a, c] = await backend.discover()
    assert (a.url, a.metadata, c.node_id) == ("http://a:2", {"v": 2}, "c")


async def test_discovered_at_is_wall_clock_of_registration(backend: StaticDiscovery | RegistryDiscovery) -> None:
    before = time.time()
    await backend.register("a", "http://a:1")
    after = time.time()
    [node] = await backend.discover()
    assert before <= node.discovered_at <= after


@pytest.mark.parametrize("node_id", BAD_NODE_IDS)
async def test_register_refuses_bad_node_id(backend: StaticDiscovery | RegistryDiscovery, node_id: Any) -> None:
    with pytest.raises(ValueError, match="node_id"):
        await backend.register(node_id, "http://h:1")
    assert await backend.discover() == []


@pytest.mark.parametrize("url", BAD_URLS)
async def test_register_refuses_bad_url(backend: StaticDiscovery | RegistryDiscovery, url: Any) -> None:
    with pytest.raises(ValueError, match="url"):
        await backend.register("n1", url)
    assert await backend.discover() == []


@pytest.mark.parametrize("metadata", BAD_METADATA)
async def test_register_refuses_bad_metadata(backend: StaticDiscovery | RegistryDiscovery, metadata: Any) -> None:
    await backend.register("n1", "http://h:1", {"kept": True})
    with pytest.raises(ValueError, match="metadata"):
        await backend.register("n1", "http://h:2", metadata)
    [node] = await backend.discover()
    assert (node.url, node.metadata) == ("http://h:1", {"kept": True})


@pytest.mark.parametrize("node_id", ["a", "A", "0", "node-1", "n.b_c:d-e", "a" * 128])
async def test_register_accepts_every_valid_node_id(backend: StaticDiscovery | RegistryDiscovery, node_id: str) -> None:
    await backend.register(node_id, "http://h:1")
    assert ids(await backend.discover()) == [node_id]


def test_discovered_node_to_dict_copies_metadata() -> None:
    node = DiscoveredNode("a", "http://a:1", 12.5, {"k": "v"})
    data = node.to_dict()
    assert data == {"node_id": "a", "url": "http://a:1", "discovered_at": 12.5, "metadata": {"k": "v"}}
    data["metadata"]["k"] = "other"
    assert node.metadata == {"k": "v"}


# --- StaticDiscovery -----------------------------------------------------------------------------------------


async def test_static_lists_initial_nodes_in_insertion_order() -> None:
    discovery = StaticDiscovery({"zeta": "http://z:1/", "alpha": "https://a:2", "mid": "http://m:3///"})
    nodes = await discovery.discover()
    assert ids(nodes) == ["zeta", "alpha", "mid"]
    assert [n.url for n in nodes] == ["http://z:1", "https://a:2", "http://m:3"]
    assert all(n.metadata == {} for n in nodes)
    assert repr(discovery) == "StaticDiscovery(nodes=3)"
    assert len(discovery) == 3


async def test_static_register_appends_and_replacing_keeps_place() -> None:
    discovery = StaticDiscovery({"x": "http://x:1", "y": "http://y:2"})
    await discovery.register("w", "http://w:1")
    await discovery.register("x", "http://x2:1", {"m": 1})
    nodes = await discovery.discover()
    assert [(n.node_id, n.url, n.metadata) for n in nodes] == [
        ("x", "http://x2:1", {"m": 1}),
        ("y", "http://y:2", {}),
        ("w", "http://w:1", {}),
    ]


def test_static_defaults_to_empty() -> None:
    assert len(StaticDiscovery()) == 0
    assert repr(StaticDiscovery(None)) == "StaticDiscovery(nodes=0)"


@pytest.mark.parametrize(
    ("nodes", "problem"),
    [({"bad id": "http://h:1"}, "node_id"), ({"ok": "ftp://h"}, "url"), ({"ok": "nothing"}, "url")],
)
def test_static_constructor_validates(nodes: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        StaticDiscovery(nodes)


# --- RegistryDiscovery ---------------------------------------------------------------------------------------


async def test_registry_orders_by_node_id_and_refresh_does_not_reorder() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=10, clock=clock)
    for node_id in ["b", "c", "a"]:
        await registry.register(node_id, f"http://{node_id}:1")
    assert ids(await registry.discover()) == ["a", "b", "c"]
    clock.advance(1)
    await registry.register("b", "http://b2:9", {"v": 2})
    assert await registry.heartbeat("a")
    nodes = await registry.discover()
    assert ids(nodes) == ["a", "b", "c"]
    assert nodes[1].url == "http://b2:9"


async def test_registry_heartbeat_unknown_returns_false() -> None:
    registry = RegistryDiscovery(clock=FakeClock())
    assert await registry.heartbeat("ghost") is False
    await registry.register("n1", "http://h:1")
    assert await registry.heartbeat("n1") is True
    await registry.unregister("n1")
    assert await registry.heartbeat("n1") is False


async def test_registry_prunes_nodes_not_refreshed_within_ttl() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=10, clock=clock)
    await registry.register("a", "http://a:1")
    await registry.register("b", "http://b:1")
    clock.advance(10)
    # Refreshed exactly `ttl` ago is still "within ttl".
    assert ids(await registry.discover()) == ["a", "b"]
    clock.advance(0.001)
    assert await registry.discover() == []
    assert len(registry) == 0


async def test_registry_heartbeat_keeps_a_node_alive() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=10, clock=clock)
    await registry.register("a", "http://a:1")
    await registry.register("b", "http://b:1")
    for _ in range(5):
        clock.advance(6)
        assert await registry.heartbeat("a")
    assert ids(await registry.discover()) == ["a"]


async def test_registry_prune_respects_refresh_order() -> None:
    # "a" registered first but refreshed last: pruning from the oldest refresh must drop "b" and keep "a".
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=60, clock=clock)
    await registry.register("a", "http://a:1")
    clock.advance(1)
    await registry.register("b", "http://b:1")
    clock.advance(49)
    await registry.register("a", "http://a:1", {"again": True})
    clock.advance(20)
    nodes = await registry.discover()
    assert ids(nodes) == ["a"]
    assert nodes[0].metadata == {"again": True}


async def test_registry_expiry_is_partial_across_many_nodes() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=100, clock=clock)
    for i in range(200):
        await registry.register(f"n{i:03d}", "http://h:1")
        clock.advance(0.5)
    for i in range(0, 200, 2):
        assert await registry.heartbeat(f"n{i:03d}")
    # At t0+160 an odd node n (registered at t0+n/2, never refreshed) is live only if n/2 > 60.
    clock.advance(60)
    expected = [f"n{i:03d}" for i in range(200) if i % 2 == 0 or i > 120]
    assert len(registry) == len(expected)
    assert ids(await registry.discover()) == expected


async def test_registry_heartbeat_after_expiry_says_register_again() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=5, clock=clock)
    await registry.register("a", "http://a:1", {"v": 1})
    clock.advance(6)
    # No discover() in between: the answer must not depend on whether someone pruned.
    assert await registry.heartbeat("a") is False
    assert await registry.discover() == []
    await registry.register("a", "http://a:1", {"v": 2})
    assert await registry.heartbeat("a") is True
    [node] = await registry.discover()
    assert node.metadata == {"v": 2}


async def test_registry_register_of_expired_node_brings_it_back() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=5, clock=clock)
    await registry.register("a", "http://a:1")
    await registry.register("b", "http://b:1")
    clock.advance(6)
    await registry.register("b", "http://b:2")
    assert ids(await registry.discover()) == ["b"]


async def test_registry_heartbeat_updates_discovered_at() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=5, clock=clock)
    await registry.register("a", "http://a:1", {"zone": "eu"})
    [first] = await registry.discover()
    before = time.time()
    assert await registry.heartbeat("a")
    [second] = await registry.discover()
    assert second.discovered_at >= before >= first.discovered_at
    assert (second.url, second.metadata) == ("http://a:1", {"zone": "eu"})


async def test_registry_len_and_repr_count_live_nodes() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=0.3, clock=clock)
    assert repr(registry) == "RegistryDiscovery(nodes=0, ttl=0.3s)"
    await registry.register("a", "http://a:1")
    clock.advance(0.2)
    await registry.register("b", "http://b:1")
    assert repr(registry) == "RegistryDiscovery(nodes=2, ttl=0.3s)"
    clock.advance(0.15)
    assert len(registry) == 1
    assert repr(registry) == "RegistryDiscovery(nodes=1, ttl=0.3s)"
    assert registry.ttl == 0.3


def test_registry_default_repr() -> None:
    assert repr(RegistryDiscovery()) == "RegistryDiscovery(nodes=0, ttl=60.0s)"


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan"), True, "60"])
def test_registry_refuses_bad_ttl(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        RegistryDiscovery(ttl=ttl)


async def test_registry_uses_the_real_monotonic_clock_by_default() -> None:
    registry = RegistryDiscovery(ttl=3600)
    await registry.register("a", "http://a:1")
    assert await registry.heartbeat("a")
    assert ids(await registry.discover()) == ["a"]


async def test_registry_stays_consistent_under_1000_concurrent_tasks() -> None:
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=60, clock=clock)
    refreshed: list[bool] = []

    async def node(i: int) -> None:
        node_id = f"node-{i:04d}"
        await registry.register(node_id, f"http://10.0.{i // 256}.{i % 256}:9100/", {"i": i})
        for _ in range(3):
            refreshed.append(await registry.heartbeat(node_id))
        await registry.register(node_id, f"http://10.0.{i // 256}.{i % 256}:9100", {"i": i, "final": True})

    async def churn(i: int) -> None:
        # Other tasks hammer a small shared set of ids with register/unregister at the same time.
        shared_id = f"shared-{i % 10}"
        await registry.register(shared_id, "http://s:1", {"writer": i})
        await registry.heartbeat(shared_id)
        if i % 2:
            await registry.unregister(f"shared-{(i + 1) % 10}")

    async with anyio.create_task_group() as tg:
        for i in range(1000):
            tg.start_soon(node, i)
            tg.start_soon(churn, i)

    assert refreshed == [True] * 3000
    nodes = await registry.discover()
    mine = [n for n in nodes if n.node_id.startswith("node-")]
    assert ids(mine) == [f"node-{i:04d}" for i in range(1000)]
    assert all(n.metadata == {"i": int(n.node_id[5:]), "final": True} for n in mine)
    assert all(n.url == f"http://10.0.{int(n.node_id[5:]) // 256}.{int(n.node_id[5:]) % 256}:9100" for n in mine)
    shared = [n for n in nodes if n.node_id.startswith("shared-")]
    assert ids(shared) == sorted(ids(shared))
    assert all(set(n.metadata) == {"writer"} for n in shared)
    assert len(registry) == len(nodes) == len({n.node_id for n in nodes})
    clock.advance(61)
    assert await registry.discover() == []


class RegistryModel:
    """The registry's contract written the slow, obvious way, to check the fast one against."""

    def __init__(self, ttl: float, clock: FakeClock) -> None:
        self.ttl = ttl
        self.clock = clock
        self.nodes: dict[str, tuple[str, dict[str, Any], float]] = {}

    def live(self, node_id: str) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and self.clock.now - node[2] <= self.ttl

    def register(self, node_id: str, url: str, metadata: dict[str, Any]) -> None:
        self.nodes[node_id] = (url, metadata, self.clock.now)

    def heartbeat(self, node_id: str) -> bool:
        if not self.live(node_id):
            self.nodes.pop(node_id, None)
            return False
        url, metadata, _ = self.nodes[node_id]
        self.nodes[node_id] = (url, metadata, self.clock.now)
        return True

    def unregister(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)

    def discover(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(i, self.nodes[i][0], self.nodes[i][1]) for i in sorted(self.nodes) if self.live(i)]


@pytest.mark.parametrize("seed", range(4))
async def test_registry_matches_the_obvious_model_under_random_churn(seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    registry = RegistryDiscovery(ttl=50, clock=clock)
    model = RegistryModel(50, clock)
    pool = [f"n{i:04d}" for i in range(1200)]
    for step in range(1500):
        roll = rng.random()
        if roll < 0.02:
            # Bulk joins and leaves, so both the one-by-one and the whole-pass paths get exercised.
            batch = rng.sample(pool, rng.choice([5, 400]))
            for node_id in batch:
                if rng.random() < 0.5:
                    await registry.register(node_id, f"http://{node_id}:1", {"step": step})
                    model.register(node_id, f"http://{node_id}:1", {"step": step})
                else:
                    await registry.unregister(node_id)
                    model.unregister(node_id)
        elif roll < 0.45:
            node_id = rng.choice(pool[:300])
            await registry.register(node_id, f"http://{node_id}:{step + 1}", {"step": step})
            model.register(node_id, f"http://{node_id}:{step + 1}", {"step": step})
        elif roll < 0.7:
            node_id = rng.choice(pool[:300])
            assert await registry.heartbeat(node_id) == model.heartbeat(node_id)
        elif roll < 0.85:
            node_id = rng.choice(pool[:300])
            await registry.unregister(node_id)
            model.unregister(node_id)
        elif roll < 0.95:
            clock.advance(rng.choice([0.5, 3, 20]))
        else:
            got = [(n.node_id, n.url, n.metadata) for n in await registry.discover()]
            assert got == model.discover()
        assert len(registry) == len(model.discover())
    assert [(n.node_id, n.url, n.metadata) for n in await registry.discover()] == model.discover()


async def test_registry_churn_without_discover_does_not_pile_up() -> None:
    registry = RegistryDiscovery(ttl=50, clock=FakeClock())
    await registry.register("steady", "http://s:1")
    for i in range(5000):
        await registry.register(f"flap-{i % 7}", "http://f:1")
        await registry.unregister(f"flap-{i % 7}")
    # Queued order changes are applied once they outnumber the live nodes; this is what bounds memory.
    assert registry._order.pending <= 2 * 256 + 2
    assert ids(await registry.discover()) == ["steady"]
