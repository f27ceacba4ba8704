"""Tests for the runtime adapters in `_promptise_compat`, and for the transport over a real promptise runtime.

The first part runs everywhere with small fakes (no promptise import). `TestOverRealPromptise` needs
`promptise==1.10.*` (run `scripts/test-promptise`); it runs on asyncio only, because promptise's runtime
is built on asyncio primitives and tasks.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import re
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from support import wait_for_async

from promptise_asgi._errors import QueueFullError
from promptise_asgi.transport import _promptise as compat

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "promptise_mount.py"


class _State(str, enum.Enum):  # noqa: UP042 - promptise's ProcessState is this kind: str() is not the value
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class _Process:
    name: str
    state: Any = _State.CREATED
    injected: list[Any] = field(default_factory=list)

    async def inject(self, event: Any) -> None:
        self.injected.append(event)


@dataclass
class _Runtime:
    """A runtime whose lifecycle calls move states the way the test says and return `returns`."""

    process: _Process
    returns: Any = None
    start_to: Any = _State.RUNNING
    stop_to: Any = _State.STOPPED
    start_error: Exception | None = None
    calls: list[str] = field(default_factory=list)

    @property
    def processes(self) -> dict[str, _Process]:
        return {self.process.name: self.process}

    def get_process(self, name: str) -> _Process:
        return self.processes[name]

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    async def start_all(self) -> None:
        raise NotImplementedError

    async def stop_all(self) -> None:
        raise NotImplementedError

    async def start_process(self, name: str) -> Any:
        self.calls.append("start")
        self.process.state = self.start_to
        if self.start_error is not None:
            raise self.start_error
        return self.returns

    async def stop_process(self, name: str) -> Any:
        self.calls.append("stop")
        self.process.state = self.stop_to
        return self.returns

    async def restart_process(self, name: str) -> Any:
        self.calls.append("restart")
        return self.returns


def _foreign(cls: type, module: str) -> type:
    """A subclass of `cls` that claims to live in `module`, as promptise's own classes do."""
    return type(cls.__name__, (cls,), {"__module__": module})


@pytest.fixture
def fake_promptise(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make `promptise.runtime` importable with a stand-in `TriggerEvent`; return that class."""

    @dataclass
    class TriggerEvent:
        trigger_id: str
        trigger_type: str = ""
        payload: dict[str, Any] = field(default_factory=dict)
        metadata: dict[str, Any] = field(default_factory=dict)
        event_id: str = "promptise-event-1"

    module = types.ModuleType("promptise.runtime")
    module.TriggerEvent = TriggerEvent  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "promptise", types.ModuleType("promptise"))
    monkeypatch.setitem(sys.modules, "promptise.runtime", module)
    return TriggerEvent


class TestDetection:
    def test_promptise_classes_and_their_subclasses_are_recognised(self) -> None:
        promptise_process = _foreign(_Process, "promptise.runtime.process")
        user_subclass = _foreign(promptise_process, "myapp.workers")
        assert compat.is_promptise(promptise_process("w"))
        assert compat.is_promptise(user_subclass("w"))

    def test_promptise_asgi_is_not_mistaken_for_promptise(self) -> None:
        assert not compat.is_promptise(_foreign(_Process, "promptise_asgi.runtime")("w"))
        assert not compat.is_promptise(_Process("w"))


class TestEvents:
    def test_promptise_process_gets_promptise_event(self, fake_promptise: Any) -> None:
        process = _foreign(_Process, "promptise.runtime.process")("w")
        event = compat.make_event(process, trigger_id="t", trigger_type="custom", payload={"a": 1}, metadata={"m": 2})
        assert isinstance(event, fake_promptise)
        assert (event.trigger_id, event.trigger_type, event.payload, event.metadata) == (
            "t",
            "custom",
            {"a": 1},
            {"m": 2},
        )
        assert compat.event_id_of(event) == "promptise-event-1"

    def test_other_process_gets_our_event(self) -> None:
        from promptise_asgi.runtime import TriggerEvent

        event = compat.make_event(_Process("w"), trigger_id="remote", trigger_type="remote", payload={}, metadata={})
        assert isinstance(event, TriggerEvent)
        assert event.trigger_id == "remote"
        assert compat.event_id_of(event) == str(event.event_id) != ""


class TestStateName:
    @pytest.mark.parametrize("state", [_State.RUNNING, "running"])
    def test_enum_or_string_reads_as_plain_text(self, state: Any) -> None:
        name = compat.state_name(_Process("w", state=state))
        assert name == "running"
        assert type(name) is str


class TestStart:
    async def test_start_of_created_process_changes_it(self) -> None:
        runtime = _Runtime(_Process("w"))
        assert await compat.start_process(runtime, "w") is True
        assert runtime.calls == ["start"]

    @pytest.mark.parametrize("state", ["running", "starting", "suspended", _State.RUNNING])
    async def test_start_of_process_already_up_is_unchanged_and_not_called(self, state: Any) -> None:
        runtime = _Runtime(_Process("w", state=state))
        assert await compat.start_process(runtime, "w") is False
        assert runtime.calls == []

    @pytest.mark.parametrize("answer", [True, False])
    async def test_runtime_bool_answer_wins(self, answer: bool) -> None:
        runtime = _Runtime(_Process("w", state=_State.STOPPED), returns=answer)
        assert await compat.start_process(runtime, "w") is answer

    async def test_state_that_did_not_move_is_unchanged(self) -> None:
        runtime = _Runtime(_Process("w", state=_State.STOPPED), start_to=_State.STOPPED)
        assert await compat.start_process(runtime, "w") is False

    async def test_state_error_from_a_concurrent_start_is_unchanged(self) -> None:
        runtime = _Runtime(_Process("w"), start_to=_State.RUNNING, start_error=ValueError("Cannot transition"))
        assert await compat.start_process(runtime, "w") is False

    async def test_failed_start_propagates(self) -> None:
        runtime = _Runtime(_Process("w"), start_to=_State.FAILED, start_error=ValueError("bad model"))
        with pytest.raises(ValueError, match="bad model"):
            await compat.start_process(runtime, "w")

    async def test_unknown_process_is_key_error(self) -> None:
        with pytest.raises(KeyError):
            await compat.start_process(_Runtime(_Process("w")), "nope")


class TestStop:
    async def test_stop_of_running_process_changes_it(self) -> None:
        runtime = _Runtime(_Process("w", state=_State.RUNNING))
        assert await compat.stop_process(runtime, "w") is True

    async def test_stop_of_failed_process_changes_it(self) -> None:
        assert await compat.stop_process(_Runtime(_Process("w", state=_State.FAILED)), "w") is True

    @pytest.mark.parametrize("state", [_State.STOPPED, _State.CREATED, "stopping"])
    async def test_stop_of_process_not_up_is_called_but_unchanged(self, state: Any) -> None:
        runtime = _Runtime(_Process("w", state=state))
        assert await compat.stop_process(runtime, "w") is False
        assert runtime.calls == ["stop"]

    async def test_running_process_whose_state_did_not_move_is_unchanged(self) -> None:
        runtime = _Runtime(_Process("w", state=_State.RUNNING), stop_to=_State.RUNNING)
        assert await compat.stop_process(runtime, "w") is False

    @pytest.mark.parametrize("answer", [True, False])
    async def test_runtime_bool_answer_wins(self, answer: bool) -> None:
        runtime = _Runtime(_Process("w", state=_State.STOPPED), returns=answer)
        assert await compat.stop_process(runtime, "w") is answer


async def test_restart_calls_the_runtime() -> None:
    runtime = _Runtime(_Process("w"))
    await compat.restart_process(runtime, "w")
    assert runtime.calls == ["restart"]


@dataclass
class _PromptiseLikeProcess(_Process):
    """Dead-letters instead of raising when `full`, as promptise 1.10's `AgentProcess.inject` does."""

    full: bool = False
    reason: str = "queue full"
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    async def inject(self, event: Any) -> None:
        if self.full:
            self.dead_letters.append({"event": event, "reason": self.reason})
        else:
            self.injected.append(event)


class TestInject:
    async def test_our_process_receives_the_event(self) -> None:
        process = _Process("w")
        await compat.inject(process, "event")
        assert process.injected == ["event"]

    async def test_our_queue_full_error_propagates(self) -> None:
        class Full(_Process):
            async def inject(self, event: Any) -> None:
                raise QueueFullError("w", 3, retry_after=2.5)

        with pytest.raises(QueueFullError) as caught:
            await compat.inject(Full("w"), "event")
        assert compat.queue_full_retry_after(caught.value) == 2.5

    async def test_promptise_dead_letter_for_full_queue_becomes_queue_full_error(self) -> None:
        process = _foreign(_PromptiseLikeProcess, "promptise.runtime.process")("w", full=True)
        with pytest.raises(QueueFullError, match="'w' queue is full") as caught:
            await compat.inject(process, "event")
        assert compat.queue_full_retry_after(caught.value) == 1.0

    @pytest.mark.parametrize(("full", "reason"), [(False, "queue full"), (True, "process stopped")])
    async def test_promptise_accepted_or_otherwise_dead_lettered_event_is_not_refused(
        self, full: bool, reason: str
    ) -> None:
        process = _foreign(_PromptiseLikeProcess, "promptise.runtime.process")("w", full=full, reason=reason)
        process.dead_letters.append({"event": "older", "reason": "queue full"})
        await compat.inject(process, "event")
        assert process.injected == ([] if full else ["event"])

    def test_other_errors_are_not_queue_full(self) -> None:
        assert compat.queue_full_retry_after(ValueError("queue full")) is None


# --------------------------------------------------------------------------------------------------------
# Over the real promptise runtime (pytest -m promptise, in venv-promptise: scripts/test-promptise)
# --------------------------------------------------------------------------------------------------------

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
PROMPTISE_MISSING = "promptise==1.10.* is not installed here; scripts/test-promptise runs these in venv-promptise"


@pytest.mark.promptise
class TestOverRealPromptise:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture(autouse=True)
    def promptise(self) -> Any:
        return pytest.importorskip("promptise", reason=PROMPTISE_MISSING)

    @pytest.fixture
    async def runtime(self) -> AsyncIterator[Any]:
        from promptise.runtime import AgentRuntime, ProcessConfig
        from promptise.testing import ScriptedModel

        runtime = AgentRuntime()
        for name in ("worker", "fresh", "night shift"):
            model = ScriptedModel(["done"], on_exhausted="repeat_last")
            await runtime.add_process(name, ProcessConfig(model=model, instructions=f"You are {name}."))
        try:
            yield runtime
        finally:
            await runtime.shutdown()

    @pytest.fixture
    async def client(self, runtime: Any) -> AsyncIterator[httpx.AsyncClient]:
        from promptise_asgi.transport import create_transport_app

        host = Starlette(routes=[Mount("/runtime", app=create_transport_app(runtime, node_id="node-1"))])
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1/runtime") as client:
            yield client

    async def _status(self, client: httpx.AsyncClient, name: str) -> dict[str, Any]:
        response = await client.get(f"/processes/{name}/status")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def test_health(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "healthy", "node_id": "node-1", "process_count": 3}

    async def test_no_event_store_means_501_rather_than_a_promise(self, client: httpx.AsyncClient) -> None:
        # promptise owns its queue: no durable events, dead-letter routes or idempotency keys over it (SPEC 12).
        for response in (
            await client.get("/processes/worker/dead-letters"),
            await client.post("/processes/worker/dead-letters/x/retry"),
            await client.delete("/processes/worker/dead-letters/x"),
            await client.post("/processes/worker/event", json={}, headers={"Idempotency-Key": "k"}),
        ):
            assert response.status_code == 501 and "event store" in response.json()["error"]
        assert (await client.get("/processes/nope/dead-letters")).status_code == 404

    async def test_status_is_the_runtime_status_plus_node_id(self, client: httpx.AsyncClient, runtime: Any) -> None:
        response = await client.get("/status")
        assert response.status_code == 200
        body = response.json()
        assert body["node_id"] == "node-1"
        assert body["process_count"] == 3
        assert list(body["processes"]) == ["worker", "fresh", "night shift"]
        assert body["processes"]["worker"] == json.loads(json.dumps(runtime.get_process("worker").status()))

    async def test_processes_lists_name_state_and_id_in_order(self, client: httpx.AsyncClient, runtime: Any) -> None:
        await runtime.start_process("worker")
        response = await client.get("/processes")
        assert response.status_code == 200
        assert response.json() == {
            "node_id": "node-1",
            "processes": [
                {"name": name, "state": state, "process_id": runtime.get_process(name).process_id}
                for name, state in [("worker", "running"), ("fresh", "created"), ("night shift", "created")]
            ],
        }

    async def test_process_status_with_percent_encoded_name(self, client: httpx.AsyncClient, runtime: Any) -> None:
        status = await self._status(client, "night%20shift")
        assert status["name"] == "night shift"
        assert status["state"] == "created"
        assert status["process_id"] == runtime.get_process("night shift").process_id
        assert status["invocation_count"] == 0

    async def test_start_stop_restart_report_changes(self, client: httpx.AsyncClient) -> None:
        async def post(action: str, name: str = "worker") -> dict[str, Any]:
            response = await client.post(f"/processes/{name}/{action}")
            assert response.status_code == 200, response.text
            result: dict[str, Any] = response.json()
            return result

        assert await post("start") == {"status": "started", "name": "worker", "changed": True}
        assert (await self._status(client, "worker"))["state"] == "running"
        # The original answered 500 "Cannot transition from 'running' to 'starting'" here.
        assert await post("start") == {"status": "started", "name": "worker", "changed": False}
        assert await post("stop") == {"status": "stopped", "name": "worker", "changed": True}
        assert (await self._status(client, "worker"))["state"] == "stopped"
        assert await post("stop") == {"status": "stopped", "name": "worker", "changed": False}
        assert await post("stop", "fresh") == {"status": "stopped", "name": "fresh", "changed": False}
        assert await post("restart") == {"status": "restarted", "name": "worker"}
        assert (await self._status(client, "worker"))["state"] == "running"
        assert await post("restart") == {"status": "restarted", "name": "worker"}
        assert (await self._status(client, "worker"))["state"] == "running"

    async def test_concurrent_starts_start_once(self, client: httpx.AsyncClient) -> None:
        results: list[httpx.Response] = []

        async def start() -> None:
            results.append(await client.post("/processes/worker/start"))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(start)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert sorted(r.json()["changed"] for r in results) == [False, False, True]
        assert (await self._status(client, "worker"))["state"] == "running"

    async def test_injected_event_reaches_the_agent(self, client: httpx.AsyncClient, runtime: Any) -> None:
        await runtime.start_process("worker")
        response = await client.post("/processes/worker/event", json={"payload": {"ticket": 4711}})
        assert response.status_code == 202
        body = response.json()
        assert body["status"] == "injected"
        assert body["process"] == "worker"
        assert UUID.match(body["event_id"])

        async def handled() -> bool:
            return bool((await self._status(client, "worker"))["invocation_count"] >= 1)

        await wait_for_async(handled, 30.0, "the event to be handled")
        prompt = runtime.get_process("worker").config.model.calls[-1].messages[-1].content
        assert f"[Trigger: remote] trigger_id=remote event_id={body['event_id']}" in prompt
        assert "4711" in prompt

    async def test_event_fields_are_passed_through(self, client: httpx.AsyncClient, runtime: Any) -> None:
        await runtime.start_process("worker")
        event = {"trigger_id": "my-trig", "trigger_type": "custom", "payload": {"b": 2}, "metadata": {"m": "x"}}
        response = await client.post("/processes/worker/event", json=event)
        assert response.status_code == 202
        event_id = response.json()["event_id"]

        async def handled() -> bool:
            return bool((await self._status(client, "worker"))["invocation_count"] >= 1)

        await wait_for_async(handled, 30.0, "the event to be handled")
        prompt = runtime.get_process("worker").config.model.calls[-1].messages[-1].content
        assert f"[Trigger: custom] trigger_id=my-trig event_id={event_id}" in prompt

    async def test_event_to_stopped_process_is_handled_after_start(
        self, client: httpx.AsyncClient, runtime: Any
    ) -> None:
        response = await client.post("/processes/fresh/event", json={"payload": {"late": True}})
        assert response.status_code == 202
        assert (await self._status(client, "fresh"))["queue_size"] == 1
        assert (await client.post("/processes/fresh/start")).json()["changed"] is True

        async def handled() -> bool:
            return bool((await self._status(client, "fresh"))["invocation_count"] == 1)

        await wait_for_async(handled, 30.0, "the queued event to be handled")

    async def test_full_queue_is_refused_with_429(self, client: httpx.AsyncClient, runtime: Any) -> None:
        from promptise.runtime import TriggerEvent

        process = runtime.get_process("fresh")
        while process.status()["queue_size"] < 1000:  # promptise's fixed bound; the process is not running
            await process.inject(TriggerEvent(trigger_id="fill"))
        response = await client.post("/processes/fresh/event", json={"payload": {}})
        assert response.status_code == 429
        assert "queue is full" in response.json()["error"]
        assert int(response.headers["Retry-After"]) >= 1

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/processes/nope/status"),
            ("POST", "/processes/nope/start"),
            ("POST", "/processes/nope/stop"),
            ("POST", "/processes/nope/restart"),
            ("POST", "/processes/nope/event"),
        ],
    )
    async def test_unknown_process_is_404(self, client: httpx.AsyncClient, method: str, path: str) -> None:
        response = await client.request(method, path, content=b"{not json")
        assert response.status_code == 404
        assert response.json() == {"error": "Process 'nope' not found"}

    @pytest.mark.parametrize(
        ("body", "error"),
        [
            (b"{not json", "Invalid JSON body"),
            (b"", "Invalid JSON body"),
            (b"[1, 2]", "Body must be a JSON object"),
            (b'"str"', "Body must be a JSON object"),
            (b'{"payload": "hello"}', "payload must be a JSON object"),
            (b'{"payload": [1]}', "payload must be a JSON object"),
            (b'{"metadata": [1]}', "metadata must be a JSON object"),
        ],
    )
    async def test_bad_event_body_is_400(self, client: httpx.AsyncClient, body: bytes, error: str) -> None:
        response = await client.post(
            "/processes/worker/event", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json() == {"error": error}
        assert (await self._status(client, "worker"))["queue_size"] == 0

    async def test_probes_metrics_and_openapi(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/livez")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert 'promptise_process_state{process="worker",state="created"} 1.0' in metrics.text
        document = (await client.get("/openapi.json")).json()
        assert document["openapi"].startswith("3.1")

    async def test_node_lifespan_starts_and_stops_the_runtime(self, runtime: Any) -> None:
        from promptise_asgi.transport import create_transport_app, node_lifespan

        node = create_transport_app(runtime, node_id="node-1")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=node), base_url="http://127.0.0.1") as client:
            assert (await client.get("/readyz")).status_code == 503
            async with node_lifespan(node):
                assert (await client.get("/readyz")).status_code == 200
                states = {p["name"]: p["state"] for p in (await client.get("/processes")).json()["processes"]}
                assert states == {"worker": "running", "fresh": "running", "night shift": "running"}
            assert (await client.get("/readyz")).status_code == 503
            assert {compat.state_name(p) for p in runtime.processes.values()} == {"stopped"}

    async def test_its_changes_are_derived_once_a_second(self, runtime: Any) -> None:
        """promptise has no change hooks: the node compares status and sends the same messages (SPEC 13)."""
        from promptise_asgi.transport import create_transport_app, node_lifespan

        app = create_transport_app(runtime, node_id="node-1")
        changes = app.state.node.changes
        async with node_lifespan(app), changes.hub.subscribe() as subscription:
            snapshot = await subscription.receive()
            assert snapshot.type == "snapshot" and set(snapshot.data["processes"]) == {"worker", "fresh", "night shift"}
            await runtime.stop_process("worker")
            changes.tick()  # what the node does every second
            seen = []
            with anyio.fail_after(5):
                while not any(c.type == "process.state" for c in seen):
                    seen.append(await subscription.receive())
        state = next(c for c in seen if c.type == "process.state")
        assert state.data == {"name": "worker", "state": "stopped", "previous": "running"}

    async def test_example_runs(self, capsys: pytest.CaptureFixture[str]) -> None:
        spec = importlib.util.spec_from_file_location("promptise_mount_example", EXAMPLE)
        assert spec is not None and spec.loader is not None
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        try:
            await example.main()
        finally:
            await example.runtime.shutdown()
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].startswith("202 ")
        event_id = lines[1].split("'event_id': '")[1].split("'")[0]
        assert lines[2].startswith(f"handled by the agent: [Trigger: remote] trigger_id=remote event_id={event_id}")

    def test_the_docs_show_the_example_as_it_runs(self) -> None:
        page = (ROOT / "docs" / "promptise.md").read_text(encoding="utf-8")
        assert f"```python\n{EXAMPLE.read_text(encoding='utf-8')}```" in page, "the docs' example differs from the file"

    def test_compat_module_does_not_import_promptise(self) -> None:
        code = "import sys, promptise_asgi.transport._promptise; print('promptise' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "False"
