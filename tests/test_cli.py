"""The `promptise-asgi` command line (SPEC 9), run for real in subprocesses, plus its table rendering."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from support import serve, wait_healthy

from promptise_asgi.cli import format_status, main

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "promptise.toml"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "promptise_asgi", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def running(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "promptise_asgi", "--log-level", "warning", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until(url: str, process: subprocess.Popen[str], timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"exited early ({process.returncode}): {output}")
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def interrupt(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    return output


def assert_one_clean_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_node_serves_its_config_and_stops_on_ctrl_c() -> None:
    port = free_port()
    with running("node", "--config", str(EXAMPLE), "--port", str(port), "--node-id", "cli-node") as process:
        health = wait_until(f"http://127.0.0.1:{port}/health", process).json()
        assert health == {"status": "healthy", "node_id": "cli-node", "process_count": 2}
        response = httpx.post(f"http://127.0.0.1:{port}/processes/echo/event", json={"payload": {"hi": 1}})
        assert response.status_code == 202
        output = interrupt(process)
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert f"node cli-node serving 2 processes on http://127.0.0.1:{port}" in output


def test_node_token_comes_from_the_environment() -> None:
    port = free_port()
    with running("node", "--config", str(EXAMPLE), "--port", str(port), env={"PROMPTISE_AUTH_TOKEN": "envtok"}) as p:
        wait_until(f"http://127.0.0.1:{port}/health", p)
        assert httpx.get(f"http://127.0.0.1:{port}/status").status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port}/status", headers={"Authorization": "Bearer envtok"})
        assert ok.status_code == 200
        interrupt(p)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["node", "--config", "missing.toml"], ["missing.toml", "not found"]),
        (["node", "--config", str(EXAMPLE), "--host", "0.0.0.0", "--port", "0"], ["auth_token"]),
        (["status", "--coordinator", "http://127.0.0.1:1"], ["coordinator is unreachable at http://127.0.0.1:1"]),
        (["status"], ["--coordinator"]),
        (["coordinator", "--host", "0.0.0.0"], ["PROMPTISE_AUTH_TOKEN"]),
    ],
)
def test_failures_are_one_clear_line(args: list[str], fragments: list[str]) -> None:
    env = {"PROMPTISE_COORDINATOR_URL": "", "PROMPTISE_AUTH_TOKEN": ""}
    assert_one_clean_line(cli(*args, env=env), *fragments)


def test_bad_config_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[processes]]\nname = 'watcher'\nconcurrency = 0\n")
    assert_one_clean_line(cli("node", "--config", str(bad)), str(bad), "'watcher'", "concurrency")


def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_clean_line(cli("node", "--config", str(EXAMPLE), "--port", str(port)), f"127.0.0.1:{port}")


def test_coordinator_node_registration_and_status_table() -> None:
    coordinator_port, node_port = free_port(), free_port()
    coordinator_url = f"http://127.0.0.1:{coordinator_port}"
    with running("coordinator", "--port", str(coordinator_port)) as coordinator:
        wait_until(f"{coordinator_url}/health", coordinator)
        with running(
            "node",
            "--config",
            str(EXAMPLE),
            "--port",
            str(node_port),
            "--node-id",
            "worker-1",
            "--coordinator",
            coordinator_url,
            "--advertise-url",
            f"http://127.0.0.1:{node_port}",
        ) as node:
            wait_until(f"http://127.0.0.1:{node_port}/health", node)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                result = cli("status", "--coordinator", coordinator_url)
                if "worker-1" in result.stdout:
                    break
                time.sleep(0.2)
            assert result.returncode == 0, result.stderr
            header, row, summary = result.stdout.strip().splitlines()
            assert header.split() == ["NODE", "URL", "HEALTH", "PROCESSES"]
            assert row.split() == ["worker-1", f"http://127.0.0.1:{node_port}", "healthy", "2"]
            assert header.index("URL") == row.index("http://")
            assert summary == "1 node, 1 healthy, 2 processes"
            interrupt(node)
        listed = httpx.get(f"{coordinator_url}/cluster/nodes").json()
        assert listed["count"] == 0  # the node unregistered on its way out
        output = interrupt(coordinator)
    assert coordinator.returncode == 0 and "Traceback" not in output


def test_demo_prints_cluster_status_and_exits_cleanly_on_ctrl_c() -> None:
    with running("demo", "--port", "0", "--interval", "0.2") as demo:
        deadline = time.monotonic() + 30
        seen = ""
        assert demo.stdout is not None
        while time.monotonic() < deadline and "2 nodes, 2 healthy" not in seen:
            seen += demo.stdout.readline()
        assert "demo-node-1" in seen and "demo-node-2" in seen and "2 nodes, 2 healthy, 4 processes" in seen
        output = interrupt(demo)
    assert demo.returncode == 0, output
    assert "demo cluster stopped" in output and "Traceback" not in output


def test_python_dash_m_is_the_same_program() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("node", "coordinator", "status", "demo"):
        assert command in result.stdout


def test_format_status_marks_missed_checks_and_unhealthy_nodes() -> None:
    table = format_status(
        {
            "total_nodes": 2,
            "healthy_nodes": 1,
            "total_processes": 3,
            "nodes": {
                "b": {"url": "http://b:1", "status": "unhealthy", "process_count": 9},
                "a": {"url": "http://a:1", "status": "healthy", "missed_check": True, "process_count": 3},
            },
        }
    )
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["a", "http://a:1", "healthy"] and "(missed check)" in lines[1]
    assert lines[2].split() == ["b", "http://b:1", "unhealthy", "-"]
    assert lines[3] == "2 nodes, 1 healthy, 3 processes"


def test_main_in_process_reports_errors_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--coordinator", "http://127.0.0.1:1", "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("promptise-asgi status: ") and "Traceback" not in captured.err


def test_coordinator_node_token_and_node_networks() -> None:
    """The operator token steers, the node token registers, and nodes outside --node-network are refused."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"PROMPTISE_AUTH_TOKEN": "operator", "PROMPTISE_NODE_TOKEN": "for-nodes"}
    args = ("coordinator", "--port", str(port), "--node-network", "10.0.0.0/8", "--node-network", "127.0.0.0/8")
    with running(*args, env=env) as process:
        wait_until(f"{base}/health", process)
        as_node = {"Authorization": "Bearer for-nodes"}
        inside = httpx.post(
            f"{base}/cluster/nodes", json={"node_id": "a", "url": "http://127.0.0.2:9"}, headers=as_node
        )
        outside = httpx.post(
            f"{base}/cluster/nodes", json={"node_id": "b", "url": "http://192.168.0.2:9"}, headers=as_node
        )
        operator = httpx.post(
            f"{base}/cluster/nodes",
            json={"node_id": "c", "url": "http://10.0.0.3:9"},
            headers={"Authorization": "Bearer operator"},
        )
        status = httpx.get(f"{base}/cluster/status", headers={"Authorization": "Bearer operator"}, timeout=15)
        interrupt(process)
    assert inside.status_code == 200
    assert outside.status_code == 422 and "outside the allowed node networks" in outside.json()["error"]
    assert operator.status_code == 403
    assert list(status.json()["nodes"]) == ["a"]


class TestStore:
    """SPEC 12: `node` keeps its events in ./promptise-data/<node-id>.sqlite3, or where --store says."""

    def test_the_default_file_and_one_live_node_per_file(self, tmp_path: Path) -> None:
        config = tmp_path / "node.toml"
        config.write_text('[node]\nid = "keeper"\n[[processes]]\nname = "worker"\n')
        port = free_port()
        node = [sys.executable, "-m", "promptise_asgi", "node", "--config", str(config)]
        env = {"PROMPTISE_STORE": ""}  # unset: the default
        with serve([*node, "--port", str(port)], env, cwd=tmp_path) as first:
            wait_healthy(f"http://127.0.0.1:{port}/health", first)
            store = tmp_path / "promptise-data" / "keeper.sqlite3"
            assert store.is_file()
            second = subprocess.run(
                [*node, "--port", str(free_port())],
                cwd=tmp_path,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert_one_clean_line(second, str(store), "in use by another live runtime", f"pid {first.pid}")
            first.send_signal(signal.SIGINT)
            output, _ = first.communicate(timeout=30)
        assert f"event store: SQLite file {store}" in output

    def test_the_store_flag(self, tmp_path: Path) -> None:
        port = free_port()
        path = tmp_path / "elsewhere" / "events.sqlite3"
        command = [sys.executable, "-m", "promptise_asgi", "node", "--config", str(EXAMPLE), "--port", str(port)]
        with serve([*command, "--store", str(path)], {}) as process:
            status = wait_until(f"http://127.0.0.1:{port}/processes/echo/status", process).json()
            assert status["store"] == "sqlite" and path.is_file()
        port = free_port()
        with serve([*command[:-1], str(port), "--store", "memory"], {"PROMPTISE_STORE": str(path)}) as process:
            status = wait_until(f"http://127.0.0.1:{port}/processes/echo/status", process).json()
            assert status["store"] == "memory"
