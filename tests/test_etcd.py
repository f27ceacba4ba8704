from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from etcd_server import EtcdServer, TcpProxy, free_port
from support import wait_for_async

from promptise_asgi.discovery import DiscoveredNode, NodeChange, ProcessDiscovery
from promptise_asgi.etcd import EtcdDiscovery, EtcdError, EtcdUnavailableError

# Deadlines for "it eventually happens": generous, because several test runs share two cores.
EVENTUALLY = 20.0


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"/test/{uuid.uuid4().hex}/"


@pytest.fixture
async def disc(etcd: EtcdServer, prefix: str) -> AsyncIterator[EtcdDiscovery]:
    async with EtcdDiscovery(etcd.url, prefix=prefix, ttl=60) as discovery:
        yield discovery


# --- helpers ----------------------------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def etcd_post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Talk to etcd directly, behind EtcdDiscovery's back."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(url + path, json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


async def lease_of(url: str, key: str) -> int:
    result = await etcd_post(url, "/v3/kv/range", {"key": b64(key)})
    return int(result["kvs"][0].get("lease", 0))


async def ids(discovery: EtcdDiscovery) -> list[str]:
    return [node.node_id for node in await discovery.discover()]


READY = "zzzz-watch-ready"  # sorts after every other node id used here


class Watcher:
    """Collects a watch() stream in a background task so a test can wait for specific changes.

    `start` returns once the watch is certainly established: it registers a sentinel node, watches with
    `include_existing=True` (so the sentinel shows up whether it was put before or after the watch began) and
    waits for its join and leave. `changes` then holds only what happened after `start`. The sentinel goes
    through `registrar` (default: the watched instance), so a watch through a proxy can keep that proxy to itself.
    """

    def __init__(self, discovery: EtcdDiscovery, registrar: EtcdDiscovery | None = None) -> None:
        self.discovery = discovery
        self.registrar = registrar or discovery
        self.changes: list[NodeChange] = []
        self.ended = anyio.Event()
        self._arrived = anyio.Event()

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        await self.registrar.register(READY, "http://ready.test")
        tg.start_soon(self._run)
        await self.wait_for(("join", READY))
        await self.registrar.unregister(READY)
        await self.wait_for(("join", READY), ("leave", READY))
        del self.changes[: self.seen().index(("leave", READY)) + 1]

    async def _run(self) -> None:
        async with aclosing(self.discovery.watch(include_existing=True)) as changes:
            async for change in changes:
                self.changes.append(change)
                self._arrived.set()
                self._arrived = anyio.Event()
        self.ended.set()

    def seen(self) -> list[tuple[str, str]]:
        return [(c.kind, c.node_id) for c in self.changes]

    async def wait_for(self, *expected: tuple[str, str]) -> None:
        """Wait until `expected` appear, in this order, among the changes seen so far."""
        with anyio.move_on_after(EVENTUALLY):
            while not _in_order(self.seen(), list(expected)):
                await self._arrived.wait()
            return
        pytest.fail(f"watch did not see {expected} within {EVENTUALLY}s; it saw {self.seen()}")


def _in_order(seen: list[tuple[str, str]], expected: list[tuple[str, str]]) -> bool:
    remaining = iter(seen)
    return all(item in remaining for item in expected)


# --- without a server -------------------------------------------------------------------------------------


def refusing_transport() -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"nothing should be sent, got {request.url}")

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoints": []}, "at least one etcd endpoint"),
        ({"endpoints": ""}, "at least one etcd endpoint"),
        ({"endpoints": "ftp://h:1"}, "http(s) URL"),
        ({"endpoints": ["http://h:1", 7]}, "non-empty URL"),
        ({"endpoints": "h:1", "prefix": ""}, "prefix"),
        ({"endpoints": "h:1", "ttl": 0}, "ttl"),
        ({"endpoints": "h:1", "ttl": float("inf")}, "ttl"),
        ({"endpoints": "h:1", "ttl": True}, "ttl"),
        ({"endpoints": "h:1", "timeout": 0}, "timeout"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EtcdDiscovery(**kwargs)


async def test_settings_are_normalised_and_repr_hides_credentials() -> None:
    async with EtcdDiscovery(
        "user:secret@etcd-a:2379, https://etcd-b:2379/,http://u:pw@etcd-c",
        prefix="/p",
        ttl=1.5,
        transport=refusing_transport(),
    ) as discovery:
        assert discovery.endpoints == ("http://user:***@etcd-a:2379", "https://etcd-b:2379", "http://u:***@etcd-c")
        assert discovery.prefix == "/p/"
        assert discovery.ttl == 2
        assert "secret" not in repr(discovery)
        assert repr(discovery) == (
            "EtcdDiscovery(endpoints=['http://user:***@etcd-a:2379', 'https://etcd-b:2379', 'http://u:***@etcd-c'],"
            " prefix='/p/', ttl=2)"
        )
        assert isinstance(discovery, ProcessDiscovery)


@pytest.mark.parametrize(
    ("node_id", "url", "metadata", "message"),
    [
        ("bad id", "http://h:1", None, "node_id"),
        ("n1", "ftp://h:1", None, "url"),
        ("n1", "http://h:1", ["not", "a", "dict"], "metadata"),
        ("n1", "http://h:1", {"x": object()}, "metadata"),
    ],
)
async def test_register_validates_before_sending(node_id: str, url: str, metadata: Any, message: str) -> None:
    async with EtcdDiscovery("h:1", transport=refusing_transport()) as discovery:
        with pytest.raises(ValueError, match=message):
            await discovery.register(node_id, url, metadata)


async def test_heartbeat_of_a_node_never_registered_here_is_false() -> None:
    async with EtcdDiscovery("h:1", transport=refusing_transport()) as discovery:
        assert await discovery.heartbeat("stranger") is False


async def test_closed_instance_refuses_to_work() -> None:
    discovery = EtcdDiscovery("h:1", transport=refusing_transport())
    await discovery.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await discovery.discover()
    with pytest.raises(RuntimeError, match="closed"):
        await discovery.register("n1", "http://h:1")


def scripted_transport(answers: dict[str, list[httpx.Response]], calls: list[str]) -> httpx.MockTransport:
    """Answer each endpoint host with the next scripted response (or a refused connection when none is left)."""

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.url.host}{request.url.path}")
        queue = answers.get(request.url.host, [])
        if not queue:
            raise httpx.ConnectError("connection refused", request=request)
        return queue.pop(0)

    return httpx.MockTransport(handler)


async def test_http_4xx_is_an_error_and_is_not_retried_elsewhere() -> None:
    calls: list[str] = []
    answers = {"a": [httpx.Response(400, json={"error": "bad key", "message": "bad key", "code": 3})]}
    async with EtcdDiscovery(["a:1", "b:1"], transport=scripted_transport(answers, calls)) as discovery:
        with pytest.raises(EtcdError, match="bad key") as caught:
            await discovery.discover()
    assert caught.value.status_code == 400
    assert not isinstance(caught.value, EtcdUnavailableError)
    assert calls == ["a/v3/kv/range"]


async def test_503_and_refused_connections_fail_over_then_stick_to_the_live_endpoint() -> None:
    calls: list[str] = []
    empty = {"header": {"revision": "3"}, "count": "0"}
    answers = {
        "a": [httpx.Response(503, json={"error": "etcdserver: no leader", "message": "etcdserver: no leader"})],
        "c": [httpx.Response(200, json=empty), httpx.Response(200, json=empty)],
    }
    async with EtcdDiscovery("a:1,b:1,c:1", transport=scripted_transport(answers, calls)) as discovery:
        assert await discovery.discover() == []
        assert await discovery.discover() == []
    assert calls == ["a/v3/kv/range", "b/v3/kv/range", "c/v3/kv/range", "c/v3/kv/range"]


async def test_every_endpoint_down_names_them_all() -> None:
    calls: list[str] = []
    answers = {"b": [httpx.Response(503, text="unavailable")], "c": [httpx.Response(503, json=["odd"])]}
    async with EtcdDiscovery("a:1,user:pw@b:1,c:1", transport=scripted_transport(answers, calls)) as discovery:
        with pytest.raises(EtcdUnavailableError) as caught:
            await discovery.discover()
    assert caught.value.endpoints == ("http://a:1", "http://user:***@b:1", "http://c:1")
    assert "http://a:1" in str(caught.value)
    assert "HTTP 503: unavailable" in str(caught.value)
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(200, text="<html>"), "unreadable answer"),
        (httpx.Response(200, text="[1]"), "unreadable answer"),
        (httpx.Response(200, text='{"error": {"message": "stream broke"}}'), "stream broke"),
        (httpx.Response(500, text="boom"), "HTTP 500: boom"),
        (httpx.Response(500, json={"code": 2}), "HTTP 500"),
    ],
)
async def test_unreadable_or_failed_answers_raise_etcd_error(answer: httpx.Response, message: str) -> None:
    async with EtcdDiscovery("a:1", transport=scripted_transport({"a": [answer]}, [])) as discovery:
        with pytest.raises(EtcdError, match=message):
            await discovery.discover()


def etcd_answer(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


LEASE_GONE = {"error": "etcdserver: requested lease not found", "message": "etcdserver: requested lease not found"}


async def test_a_lease_lost_between_keep_alive_and_put_is_replaced_once() -> None:
    granted = iter(["11", "12", "13"])
    puts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v3/lease/grant":
            return etcd_answer({"ID": next(granted), "TTL": "60"})
        assert request.url.path == "/v3/kv/put"
        puts.append(body["lease"])
        if body["lease"] == "11":
            return etcd_answer(LEASE_GONE, 404)
        if len(puts) > 2:
            return etcd_answer({"error": "value too large", "message": "value too large"}, 400)
        return etcd_answer({"header": {}})

    async with EtcdDiscovery("a:1", transport=httpx.MockTransport(handler)) as discovery:
        await discovery.register("n1", "http://h:1")
        assert puts == ["11", "12"]
        with pytest.raises(EtcdError, match="value too large"):  # other refusals are not papered over
            await discovery.register("n2", "http://h:1")


async def test_unregister_tolerates_a_vanished_lease_but_reports_other_failures() -> None:
    revoke_answers = [etcd_answer(LEASE_GONE, 404), etcd_answer({"error": "boom", "message": "boom"}, 500)]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/kv/deleterange":
            return etcd_answer({"prev_kvs": [{"key": b64("/promptise/nodes/n1"), "lease": "7"}]})
        assert request.url.path == "/v3/lease/revoke"
        return revoke_answers.pop(0)

    async with EtcdDiscovery("a:1", transport=httpx.MockTransport(handler)) as discovery:
        await discovery.unregister("n1")
        with pytest.raises(EtcdError, match="boom"):
            await discovery.unregister("n1")
        await discovery.unregister("not a node id")  # cannot exist: nothing sent
    assert revoke_answers == []


async def test_a_heartbeat_queued_behind_unregister_does_not_bring_the_node_back() -> None:
    release_put = anyio.Event()
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v3/lease/grant":
            return etcd_answer({"ID": "5", "TTL": "60"})
        if request.url.path == "/v3/lease/keepalive":
            return etcd_answer({"result": {"ID": "5", "TTL": "60"}})
        if request.url.path == "/v3/kv/put" and paths.count("/v3/kv/put") == 2:
            await release_put.wait()
        return etcd_answer({"header": {}})

    async with EtcdDiscovery("a:1", transport=httpx.MockTransport(handler)) as discovery:
        await discovery.register("n1", "http://h:1")
        beats: list[bool] = []

        async def beat() -> None:
            beats.append(await discovery.heartbeat("n1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(discovery.register, "n1", "http://h:2")  # holds the node's lock, its put held back
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(discovery.unregister, "n1")  # first in line for the lock
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(beat)  # second in line
            await anyio.wait_all_tasks_blocked()
            release_put.set()
    assert beats == [False]
    assert paths[-2:] == ["/v3/kv/deleterange", "/v3/lease/revoke"]


def watch_line(result: dict[str, Any]) -> bytes:
    return json.dumps({"result": result}).encode() + b"\n"


def node_kv(node_id: str, revision: int, value: str | None = None) -> dict[str, Any]:
    record = {"node_id": node_id, "url": f"http://{node_id}:1", "metadata": {}, "registered_at": 1.0}
    return {
        "key": b64("/promptise/nodes/" + node_id),
        "mod_revision": str(revision),
        "value": b64(value if value is not None else json.dumps(record)),
    }


async def test_watch_survives_every_kind_of_trouble_the_gateway_can_cause() -> None:
    ranges = [
        None,  # connection refused while taking the first snapshot
        {"header": {"revision": "10"}, "kvs": [node_kv("a", 5)]},
        {"header": {"revision": "20"}, "kvs": [node_kv("c", 19)]},
    ]
    streams: list[tuple[int, bytes]] = [
        (400, json.dumps({"error": {"message": "bad watch"}}).encode()),
        (
            200,
            b"\n"
            + watch_line({"header": {"revision": "10"}, "created": True})
            + watch_line(
                {
                    "events": [
                        {"kv": node_kv("b", 11)},
                        {"kv": node_kv("a", 12, value="{garbage")},  # a known node overwritten: it left
                        {"type": "DELETE", "kv": {"key": b64("/elsewhere/x"), "mod_revision": "13"}},
                        {"type": "DELETE", "kv": {"key": "not base64!", "mod_revision": "13"}},
                        {"kv": node_kv("c", 14, value="[]")},  # garbage for an unknown node: ignored
                    ]
                }
            )
            + b'{"error": {"grpc_code": 14, "message": "stream broke"}}\n',
        ),
        (200, b"<html>proxy error</html>\n"),
        (200, watch_line({"canceled": True, "cancel_reason": "server going away"})),
        (
            200,
            watch_line(
                {"events": [{"type": "DELETE", "kv": {"key": b64("/promptise/nodes/b"), "mod_revision": "16"}}]}
            ),
        ),
        (200, watch_line({"canceled": True, "compact_revision": "18"})),
    ]
    start_revisions: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v3/kv/range":
            answer = ranges.pop(0)
            if answer is None:
                raise httpx.ConnectError("refused", request=request)
            return etcd_answer(answer)
        start_revisions.append(json.loads(request.content)["create_request"]["start_revision"])
        status, content = streams.pop(0) if streams else (200, b"")
        return httpx.Response(status, content=content)

    async with EtcdDiscovery("a:1", transport=httpx.MockTransport(handler)) as discovery:
        discovery.watch_backoff = (0.01, 0.02)
        seen: list[tuple[str, str]] = []
        async with aclosing(discovery.watch(include_existing=True)) as changes:
            with anyio.fail_after(EVENTUALLY):
                while len(seen) < 5:
                    change = await anext(changes)
                    seen.append((change.kind, change.node_id))
    assert seen == [("join", "a"), ("join", "b"), ("leave", "a"), ("leave", "b"), ("join", "c")]
    # Each reconnection resumed right after the last revision seen; the compaction forced a fresh read.
    assert start_revisions[:6] == ["11", "11", "15", "15", "15", "17"]


# --- against a real etcd ----------------------------------------------------------------------------------


@pytest.mark.etcd
async def test_register_discover_unregister(disc: EtcdDiscovery) -> None:
    assert await disc.discover() == []
    before = time.time()
    await disc.register("node-b", "http://10.0.0.2:9100/", {"zone": "b"})
    await disc.register("node-a", "http://10.0.0.1:9100", None)
    nodes = await disc.discover()
    assert [n.node_id for n in nodes] == ["node-a", "node-b"]
    assert nodes[1].url == "http://10.0.0.2:9100"
    assert nodes[1].metadata == {"zone": "b"}
    assert nodes[0].metadata == {}
    assert all(before - 1 <= n.discovered_at <= time.time() + 1 for n in nodes)

    await disc.unregister("node-a")
    assert await ids(disc) == ["node-b"]
    assert await disc.heartbeat("node-a") is False
    await disc.unregister("node-a")  # unknown: no-op
    await disc.unregister("never-there")
    assert await ids(disc) == ["node-b"]


@pytest.mark.etcd
async def test_reregister_replaces_url_and_metadata_and_keeps_one_lease(etcd: EtcdServer, disc: EtcdDiscovery) -> None:
    await disc.register("n1", "http://h:1", {"version": 1, "role": "old"})
    lease = await lease_of(etcd.url, disc.prefix + "n1")
    await disc.register("n1", "http://h:2", {"version": 2})
    nodes = await disc.discover()
    assert [(n.url, n.metadata) for n in nodes] == [("http://h:2", {"version": 2})]
    assert await lease_of(etcd.url, disc.prefix + "n1") == lease


@pytest.mark.etcd
async def test_undecodable_entries_are_skipped_with_a_warning(
    etcd: EtcdServer, disc: EtcdDiscovery, caplog: pytest.LogCaptureFixture
) -> None:
    await disc.register("good", "http://h:1")
    garbage = {
        "not-json": "{nope",
        "a-list": "[1, 2]",
        "bad id!": json.dumps({"node_id": "bad id!", "url": "http://h:1", "metadata": {}, "registered_at": 1}),
        "liar": json.dumps({"node_id": "other", "url": "http://h:1", "metadata": {}, "registered_at": 1}),
        "no-time": json.dumps({"node_id": "no-time", "url": "http://h:1", "metadata": {}}),
        "bad-url": json.dumps({"node_id": "bad-url", "url": "gopher://h", "metadata": {}, "registered_at": 1}),
        "bad-meta": json.dumps({"node_id": "bad-meta", "url": "http://h:1", "metadata": [1], "registered_at": 1}),
    }
    for name, value in garbage.items():
        await etcd_post(etcd.url, "/v3/kv/put", {"key": b64(disc.prefix + name), "value": b64(value)})
    with caplog.at_level(logging.WARNING, logger="promptise_asgi.etcd"):
        assert await ids(disc) == ["good"]
    assert len([r for r in caplog.records if "skipping undecodable" in r.getMessage()]) == len(garbage)


@pytest.mark.etcd
async def test_lease_expiry_heartbeat_and_regrant(etcd: EtcdServer, prefix: str) -> None:
    # etcd's minimum lease TTL with its default timing is 2 s (a 1 s lease is granted as 2 s).
    async with EtcdDiscovery(etcd.url, prefix=prefix, ttl=2) as disc, anyio.create_task_group() as tg:
        watcher = Watcher(disc)
        await watcher.start(tg)
        await disc.register("kept", "http://h:1")
        await disc.register("left", "http://h:2")
        started = time.monotonic()

        async def keep_beating() -> None:
            while True:
                assert await disc.heartbeat("kept")
                await anyio.sleep(0.4)

        tg.start_soon(keep_beating)

        async def left_is_gone() -> bool:
            return await ids(disc) == ["kept"]

        await wait_for_async(left_is_gone, EVENTUALLY, "the node without heartbeats expires")
        assert time.monotonic() - started >= 1.5  # it expired because of its TTL, not at once
        await watcher.wait_for(("leave", "left"))

        # The kept node has outlived its 2 s TTL by now only thanks to keep-alives; wait another TTL to be sure.
        await anyio.sleep(2.5)
        assert await ids(disc) == ["kept"]

        # The expired node's lease is dead: heartbeat grants a new one and writes the registration again.
        assert await disc.heartbeat("left") is True
        assert await ids(disc) == ["kept", "left"]
        await watcher.wait_for(("leave", "left"), ("join", "left"))
        tg.cancel_scope.cancel()


@pytest.mark.etcd
async def test_watch_join_and_leave(disc: EtcdDiscovery) -> None:
    async with anyio.create_task_group() as tg:
        watcher = Watcher(disc)
        await watcher.start(tg)
        await disc.register("n1", "http://h:1", {"v": 1})
        await disc.register("n1", "http://h:1", {"v": 2})
        await disc.unregister("n1")
        await watcher.wait_for(("join", "n1"), ("join", "n1"), ("leave", "n1"))
        assert watcher.seen() == [("join", "n1"), ("join", "n1"), ("leave", "n1")]
        joined = watcher.changes[1].node
        assert isinstance(joined, DiscoveredNode)
        assert (joined.url, joined.metadata) == ("http://h:1", {"v": 2})
        assert watcher.changes[2].node is None
        tg.cancel_scope.cancel()


@pytest.mark.etcd
async def test_watch_lists_existing_nodes_only_when_asked(disc: EtcdDiscovery) -> None:
    await disc.register("a", "http://h:1")
    await disc.register("b", "http://h:2")
    async with aclosing(disc.watch(include_existing=True)) as changes:
        with anyio.fail_after(EVENTUALLY):
            first = [await anext(changes), await anext(changes)]
            assert [(c.kind, c.node_id) for c in first] == [("join", "a"), ("join", "b")]
            await disc.register("c", "http://h:3")
            change = await anext(changes)
        assert (change.kind, change.node_id) == ("join", "c")

    # By default only what happens after the watch began: the first change is never a, b or c.
    got: list[NodeChange] = []
    arrived = anyio.Event()
    async with aclosing(disc.watch()) as changes, anyio.create_task_group() as tg:

        async def take_one() -> None:
            got.append(await anext(changes))
            arrived.set()

        tg.start_soon(take_one)
        with anyio.fail_after(EVENTUALLY):
            while not arrived.is_set():
                await disc.register("d", "http://h:4")  # until the watch is up and sees one
                with anyio.move_on_after(0.2):
                    await arrived.wait()
    assert (got[0].kind, got[0].node_id) == ("join", "d")


@pytest.mark.etcd
async def test_watch_ends_when_the_instance_is_closed(etcd: EtcdServer, prefix: str) -> None:
    disc = EtcdDiscovery(etcd.url, prefix=prefix)
    watcher = Watcher(disc)
    async with anyio.create_task_group() as tg:
        await watcher.start(tg)
        await disc.register("n1", "http://h:1")
        await watcher.wait_for(("join", "n1"))
        await disc.aclose()
        with anyio.fail_after(EVENTUALLY):
            await watcher.ended.wait()
    with pytest.raises(RuntimeError, match="closed"):
        await anext(disc.watch())


@pytest.mark.etcd
async def test_watch_resumes_after_a_dropped_stream_without_losing_changes(etcd: EtcdServer, prefix: str) -> None:
    proxy = TcpProxy(etcd.client_port)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        async with EtcdDiscovery(proxy.url, prefix=prefix) as watching, EtcdDiscovery(etcd.url, prefix=prefix) as d:
            watching.watch_backoff = (0.05, 0.2)
            # Only the watch stream goes through the proxy: an idle pooled connection cut by drop() would make
            # httpx leave a half-sent request body to trio's garbage collector (a ResourceWarning).
            watcher = Watcher(watching, registrar=d)
            await watcher.start(tg)
            await d.register("a", "http://h:1")
            await watcher.wait_for(("join", "a"))

            proxy.drop()  # the stream breaks and reconnecting is refused
            await d.register("b", "http://h:2")  # happens while the watcher cannot see etcd
            await d.unregister("a")
            proxy.allow()

            await watcher.wait_for(("join", "a"), ("join", "b"), ("leave", "a"))
            await d.register("c", "http://h:3")
            await watcher.wait_for(("join", "c"))
            assert watcher.seen() == [("join", "a"), ("join", "b"), ("leave", "a"), ("join", "c")]
        tg.cancel_scope.cancel()


@pytest.mark.etcd
async def test_watch_after_compaction_emits_the_differences(etcd: EtcdServer, prefix: str) -> None:
    proxy = TcpProxy(etcd.client_port)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        async with EtcdDiscovery(proxy.url, prefix=prefix) as watching, EtcdDiscovery(etcd.url, prefix=prefix) as d:
            watching.watch_backoff = (0.05, 0.2)
            await d.register("stays", "http://h:10")
            await d.register("goes", "http://h:1")
            # Only the watch stream goes through the proxy: an idle pooled connection cut by drop() would make
            # httpx leave a half-sent request body to trio's garbage collector (a ResourceWarning).
            watcher = Watcher(watching, registrar=d)
            await watcher.start(tg)
            await d.register("changes", "http://h:2", {"v": 1})
            await watcher.wait_for(("join", "changes"))

            proxy.drop()
            await d.unregister("goes")
            await d.register("changes", "http://h:2", {"v": 2})
            await d.register("new", "http://h:3")
            await d.register("brief", "http://h:4")
            await d.unregister("brief")
            revision = int((await etcd_post(etcd.url, "/v3/kv/range", {"key": b64("/")}))["header"]["revision"])
            await etcd_post(etcd.url, "/v3/kv/compaction", {"revision": str(revision), "physical": True})
            proxy.allow()

            await watcher.wait_for(("join", "new"))
            after = watcher.seen()[1:]  # the first is the join of "changes" (v1)
            assert sorted(after) == [("join", "changes"), ("join", "new"), ("leave", "goes")]
            changed = watcher.changes[1:][after.index(("join", "changes"))].node
            assert changed is not None
            assert changed.metadata == {"v": 2}
        tg.cancel_scope.cancel()


@pytest.mark.etcd
async def test_two_instances_share_one_registry(etcd: EtcdServer, prefix: str) -> None:
    async with (
        EtcdDiscovery(etcd.url, prefix=prefix) as first,
        EtcdDiscovery([etcd.url], prefix=prefix) as second,
    ):
        await first.register("n1", "http://h:1", {"by": "first"})
        await second.register("n2", "http://h:2", {"by": "second"})
        assert await first.discover() == await second.discover()
        assert await ids(first) == ["n1", "n2"]

        # A coordinator removing a node it did not register revokes its lease: the owner's next heartbeat
        # registers it again, as after a coordinator restart.
        await second.unregister("n1")
        assert await ids(first) == ["n2"]
        assert await first.heartbeat("n1") is True
        assert await ids(second) == ["n1", "n2"]

        # Registering again after losing the lease that way works too (a fresh lease, the new metadata).
        await second.unregister("n1")
        await first.register("n1", "http://h:1", {"by": "first", "again": True})
        nodes = await second.discover()
        assert [(n.node_id, n.metadata) for n in nodes] == [
            ("n1", {"by": "first", "again": True}),
            ("n2", {"by": "second"}),
        ]


@pytest.mark.etcd
async def test_fails_over_from_a_dead_endpoint(etcd: EtcdServer, prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with EtcdDiscovery([dead, etcd.url], prefix=prefix) as disc:
        await disc.register("n1", "http://h:1")
        assert await disc.heartbeat("n1") is True
        assert await ids(disc) == ["n1"]
        async with anyio.create_task_group() as tg:
            watcher = Watcher(disc)
            await watcher.start(tg)
            await disc.register("n2", "http://h:2")
            await watcher.wait_for(("join", "n2"))
            tg.cancel_scope.cancel()


@pytest.mark.etcd
async def test_etcd_restart_outage_and_lost_lease(own_etcd: EtcdServer, prefix: str) -> None:
    async with EtcdDiscovery(own_etcd.url, prefix=prefix, ttl=30) as disc, anyio.create_task_group() as tg:
        disc.watch_backoff = (0.05, 0.3)
        watcher = Watcher(disc)
        await watcher.start(tg)
        await disc.register("n1", "http://h:1")
        await watcher.wait_for(("join", "n1"))
        lease = await lease_of(own_etcd.url, prefix + "n1")

        # Restart on the same data dir: leases are persisted, so the node is still there and its lease renews.
        await anyio.to_thread.run_sync(own_etcd.restart)
        assert await disc.heartbeat("n1") is True
        assert await ids(disc) == ["n1"]
        assert await lease_of(own_etcd.url, prefix + "n1") == lease
        await disc.register("n2", "http://h:2")
        await watcher.wait_for(("join", "n1"), ("join", "n2"))  # the watch came back by itself

        # A lease etcd no longer has (expired or revoked) is not renewed but replaced.
        await etcd_post(own_etcd.url, "/v3/lease/revoke", {"ID": str(lease)})
        assert await ids(disc) == ["n2"]
        assert await disc.heartbeat("n1") is True
        assert await ids(disc) == ["n1", "n2"]
        assert await lease_of(own_etcd.url, prefix + "n1") != lease
        await watcher.wait_for(("leave", "n1"), ("join", "n1"))

        # Outage: a clear error, never an empty cluster.
        await anyio.to_thread.run_sync(own_etcd.stop)
        with pytest.raises(EtcdUnavailableError, match=own_etcd.url):
            await disc.discover()
        with pytest.raises(EtcdUnavailableError):
            await disc.heartbeat("n1")

        await anyio.to_thread.run_sync(own_etcd.start)
        assert await disc.heartbeat("n1") is True
        assert await ids(disc) == ["n1", "n2"]
        tg.cancel_scope.cancel()


@pytest.mark.etcd
async def test_heartbeat_after_etcd_lost_its_data(own_etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    async with EtcdDiscovery(own_etcd.url, prefix=prefix) as disc:
        await disc.register("n1", "http://h:1", {"keep": "me"})
        await anyio.to_thread.run_sync(own_etcd.stop)
        own_etcd.data_dir = tmp_path / "fresh"  # as if the cluster was rebuilt from nothing
        await anyio.to_thread.run_sync(own_etcd.start)
        assert await disc.discover() == []
        assert await disc.heartbeat("n1") is True
        nodes = await disc.discover()
        assert [(n.node_id, n.url, n.metadata) for n in nodes] == [("n1", "http://h:1", {"keep": "me"})]
