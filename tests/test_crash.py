"""A 202 survives `kill -9` (SPEC 12), for real: node processes killed under load and started again on the
same store, on asyncio (uvicorn) and on trio (hypercorn). The node is tests/durable_node.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from support import WAIT, wait_for_line

from promptise_asgi.runtime._ledger import WORK_BATCH

pytestmark = pytest.mark.slow

NODE = Path(__file__).with_name("durable_node.py")
BACKENDS = ["asyncio", "trio"]


class Node:
    """tests/durable_node.py in a subprocess, on a store and a handler log in one directory."""

    def __init__(self, directory: Path, backend: str, *options: str) -> None:
        self.store = directory / "events.sqlite3"
        self.log = directory / "handled.log"
        self.command = [sys.executable, str(NODE), "--backend", backend, "--store", str(self.store)]
        self.command += ["--log", str(self.log), *options]

    @contextmanager
    def running(self, *, expect: str = "ready") -> Iterator[tuple[subprocess.Popen[str], str | None]]:
        """Start the node; yields it and its URL (None when it died before serving)."""
        process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = wait_for_line(process, "ready ", timeout=60)
            yield process, None if line is None else f"http://127.0.0.1:{line.split()[1]}"
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=WAIT)
            assert process.stdout is not None
            process.stdout.close()

    def handled(self) -> list[str]:
        """Every delivery the handler ran, in order (event ids; duplicates are redeliveries)."""
        if not self.log.exists():
            return []
        return [line.split()[0] for line in self.log.read_text().splitlines() if line.strip()]


def worker_status(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/processes/worker/status", timeout=5)
    status: dict[str, Any] = response.json()
    return status


def drained(url: str, timeout: float = 60.0) -> dict[str, Any]:
    """The worker's status once nothing is queued, in flight or waiting for a retry."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = worker_status(url)
        if status["queue_size"] == status["in_flight"] == status["retrying"] == 0:
            return status
        time.sleep(0.05)
    raise AssertionError(f"the worker did not drain within {timeout}s: {status}")


async def inject_until_killed(url: str, process: subprocess.Popen[str], kill_after: int) -> list[str]:
    """Post events on 16 connections; SIGKILL the node once `kill_after` were answered 202, requests still in
    flight. Returns the event ids answered 202."""
    accepted: list[str] = []
    killed = anyio.Event()
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:

        async def post(connection: int) -> None:
            count = 0
            while not killed.is_set():
                count += 1
                try:
                    response = await client.post(
                        "/processes/worker/event", json={"payload": {"c": connection, "n": count}}
                    )
                except httpx.TransportError:
                    return  # the node is gone: this request's fate is unknown to us, as to any client
                if response.status_code == 202:
                    accepted.append(response.json()["event_id"])
                    if len(accepted) >= kill_after and not killed.is_set():
                        process.send_signal(signal.SIGKILL)
                        killed.set()
                else:
                    assert response.status_code == 429, response.text
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            for connection in range(16):
                tg.start_soon(post, connection)
    return accepted


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_202_is_handled_after_a_kill_9_under_load(tmp_path: Path, backend: str) -> None:
    node = Node(tmp_path, backend, "--concurrency", "2", "--handler-delay", "0.01")
    with node.running() as (process, url):
        assert url is not None
        accepted = anyio.run(inject_until_killed, url, process, 400)
        process.wait(timeout=WAIT)
    assert process.returncode == -signal.SIGKILL
    before = Counter(node.handled())
    assert len(before) < len(accepted), "the kill should find accepted events not handled yet"

    with node.running() as (_, url):
        assert url is not None
        status = drained(url)
    after = node.handled()
    handled = Counter(after)
    lost = set(accepted) - set(handled)
    assert not lost, f"{len(lost)} of {len(accepted)} events answered 202 were never handled"
    duplicates = sum(count - 1 for count in handled.values())
    # A duplicate is an event the store had in flight when the node died: it comes back as a redelivery.
    # At most one window of marks per worker is in flight at a time.
    assert duplicates <= status["events_redelivered"] <= WORK_BATCH * 2
    assert status["events_recovered"] >= len(accepted) - len(before) > 0
    assert status["events_received"] == 0  # nothing was injected into the new node: it all came from the store


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_event_that_kills_the_node_ends_in_the_dead_letters(tmp_path: Path, backend: str) -> None:
    node = Node(tmp_path, backend, "--concurrency", "1", "--poison-after", "3")
    with node.running() as (process, url):
        assert url is not None
        innocent = [httpx.post(f"{url}/processes/worker/event", json={}).json()["event_id"] for _ in range(2)]
        # The handler kills the node as it takes the event: the answer may or may not get out first.
        with contextlib.suppress(httpx.TransportError):
            httpx.post(f"{url}/processes/worker/event", json={"payload": {"crash": True}})
        process.wait(timeout=WAIT)
        assert process.returncode == 3
    for _ in range(2):  # delivered again first on each restart: the node dies again
        with node.running() as (process, url):
            process.wait(timeout=WAIT)
            assert process.returncode == 3
    with node.running() as (process, url):
        assert url is not None, "the third crash should have made the event a dead letter"
        status = drained(url)
        letters = httpx.get(f"{url}/processes/worker/dead-letters").json()["dead_letters"]
        assert [(d["reason"], d["event"]["payload"]) for d in letters] == [("interrupted", {"crash": True})]
        assert letters[0]["attempts"] == 3 and status["dead_letters"] == 1
    assert set(innocent) <= set(node.handled())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_idempotency_key_is_recognised_after_a_kill_9(tmp_path: Path, backend: str) -> None:
    node = Node(tmp_path, backend)
    key = {"Idempotency-Key": "order-42"}
    with node.running() as (process, url):
        first = httpx.post(f"{url}/processes/worker/event", json={"payload": {"n": 1}}, headers=key)
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=WAIT)
    with node.running() as (_, url):
        again = httpx.post(f"{url}/processes/worker/event", json={"payload": {"n": 1}}, headers=key)
        assert again.status_code == 202 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        other = httpx.post(f"{url}/processes/worker/event", json={"payload": {"n": 2}}, headers=key)
        assert other.status_code == 422
        bad = httpx.post(f"{url}/processes/worker/event", json={}, headers={"Idempotency-Key": "k" * 256})
        assert bad.status_code == 400
        drained(url)
    assert node.handled().count(first.json()["event_id"]) >= 1
    assert os.path.getsize(node.store) > 0
