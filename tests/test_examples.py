"""The runnable examples run as their docstrings say (subprocesses, as a user would run them)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cluster_example(backend: str) -> None:
    result = run("examples/cluster.py", backend)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2/2 nodes healthy, 2 processes"
    assert lines[1].split()[0] == "node-1" and lines[1].endswith("processes: watcher")
    assert lines[2].split()[0] == "node-2" and lines[2].endswith("processes: analyst")
    # The broadcast's one refusal is announced and explained, not printed bare.
    assert "node-1 runs no 'analyst', so it says so" in lines[3]
    assert lines[4:6] == ["  node-1: refused, Process 'analyst' not found", "  node-2: injected"]
    assert "analyst got {'ticker': 'ACME'} via manual" in lines
    assert lines[-1] == "cluster stopped"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_basic_runtime_example(backend: str) -> None:
    result = run("examples/basic_runtime.py", *([backend] if backend == "trio" else []))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_fastapi_mount_example_serves_as_documented() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_mount:app", "--port", str(port)],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                hello = httpx.get(f"{base}/hello")
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert hello.json() == {"hello": "world"}
        processes = httpx.get(f"{base}/runtime/processes").json()
        assert processes["processes"][0]["name"] == "greeter"
        assert processes["processes"][0]["state"] == "running"
        injected = httpx.post(f"{base}/runtime/processes/greeter/event", json={"payload": {"name": "Ada"}})
        assert injected.status_code == 202
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/runtime/processes/greeter/status").json()["events_handled"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=15)
    assert "hello, Ada" in output
