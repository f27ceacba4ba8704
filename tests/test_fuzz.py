"""Hostile input never breaks a node: a property-based sweep of bodies and paths against the event route,
and schemathesis driving every operation of the node's own `/openapi.json` against a real server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from promptise_asgi.runtime import AgentRuntime, ProcessConfig
from promptise_asgi.transport import RuntimeTransport, create_transport_app

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
EVENT_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "trigger_id": JSON_VALUES,
        "trigger_type": JSON_VALUES,
        "payload": JSON_VALUES,
        "metadata": JSON_VALUES,
    },
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    EVENT_LIKE.map(lambda value: json.dumps(value).encode()),
)
NAMES = st.one_of(st.just("worker"), st.text(min_size=1, max_size=20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES, body=BODIES, content_type=st.sampled_from(["application/json", "text/plain", ""]))
async def test_hostile_event_requests_never_get_a_5xx(name: str, body: bytes, content_type: str) -> None:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(max_queue=5))
    app = create_transport_app(runtime, max_body_bytes=256)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {"content-type": content_type} if content_type else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        response = await client.post(f"/processes/{quote(name, safe='')}/event", content=body, headers=headers)
        assert response.status_code in {202, 400, 404, 413, 429}, response.text
        assert isinstance(response.json(), dict)
        if response.status_code >= 400:
            assert isinstance(response.json()["error"], str)
        assert (await client.get("/health")).status_code == 200


@settings(max_examples=200, deadline=None)
@given(path=st.text(max_size=40), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
async def test_hostile_paths_and_methods_never_get_a_5xx(path: str, method: str) -> None:
    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig())
    transport = httpx.ASGITransport(app=create_transport_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        response = await client.request(method, "/" + quote(path, safe="/"))
        assert response.status_code < 500, (method, path, response.text)
        if method != "HEAD" and response.status_code >= 400:
            assert "error" in response.json()


@pytest.fixture(scope="module")
def live_node() -> Iterator[str]:
    """A node on a real socket, in its own thread and event loop, for schemathesis (a sync client)."""
    ready = threading.Event()
    stop = threading.Event()
    url: list[str] = []

    async def serve() -> None:
        runtime = AgentRuntime()
        await runtime.add_process("worker", ProcessConfig(max_queue=50))
        await runtime.add_process("a b", ProcessConfig())
        async with RuntimeTransport(runtime, port=0, node_id="fuzzed") as transport:
            url.append(transport.url)
            ready.set()
            while not stop.is_set():
                await anyio.sleep(0.05)

    thread = threading.Thread(target=anyio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(30), "node did not start"
    yield url[0]
    stop.set()
    thread.join(30)


@pytest.mark.slow
def test_the_node_honours_its_own_openapi_document(live_node: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_node}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15
    # The change stream never ends on its own: its own tests read it (tests/test_changes.py).
    operations = [op for op in operations if op.path != "/changes"]
    calls: list[int] = []
    for operation in operations:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def exercise(case: Any) -> None:
            calls.append(case.call_and_validate(base_url=live_node, checks=checks).status_code)

        exercise()
    # Generated cases reached the API: its answers and its refusals (404 for the random process names).
    assert len(calls) > 100
    assert {200, 404} <= set(calls)
