"""Memory under floods (SPEC 18): a node's and a coordinator's RSS before and after hostile traffic.

Runs `promptise-asgi node` and `promptise-asgi coordinator` as subprocesses (the servers this project drives,
with their limits) and reads their resident memory from /proc before and after each flood:
- Host flood: 1,000 requests to a node, each with a distinct 48 KB `Host` (the guard refuses them; the
  first stage kept every value in its verdict cache), then 200 with 1 MiB headers (refused by the server);
- header flood: 3 connections at once each sending a 16 MiB header while a client times `GET /health`;
- registration flood: 2,000 registrations with 20 KiB metadata (413), 2,000 attempts to displace a live node
  (409) and 2,000 registrations without the node token (403), at a coordinator holding 1,000 nodes.
Prints `BENCH_ROW {json}` lines for the runner's table and a short report. Needs only the project's venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUICK = bool(os.environ.get("BENCH_QUICK"))
FLAT_MB = 25.0  # what "flat" allows: allocator slack and warm caches, not a per-request leak


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def command(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "promptise_asgi", "--log-level", "error", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def raw_request(port: int, head: bytes, timeout: float = 10.0) -> bytes:
    """Send `head` (a request head, possibly huge) and return the status line, or b'' if the server hung up."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server closed on us mid-send: that is the refusal
            sock.sendall(head)
        try:
            return sock.recv(4096).split(b"\r\n", 1)[0]
        except OSError:
            return b""


def row(metric: str, before: float, after: float, extra: str = "") -> dict[str, object]:
    grew = after - before
    return {
        "metric": metric,
        "ours": f"{before:.0f} -> {after:.0f} MB ({grew:+.1f}){extra}",
        "baseline": f"{before:.0f} MB before",
        "target": f"flat (< +{FLAT_MB:.0f} MB)",
        "met": grew < FLAT_MB,
    }


def node_floods() -> list[dict[str, object]]:
    port = free_port()
    rows = []
    with command("node", "--port", str(port)) as node:
        wait_up(f"http://127.0.0.1:{port}/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(200):
                client.get("/status")
            before = rss_mb(node.pid)
            codes: dict[int, int] = {}
            for i in range(1000):
                host = f"{i}-" + "h" * 48_000 + ".example"
                status = client.get("/status", headers={"Host": host}).status_code
                codes[status] = codes.get(status, 0) + 1
        refused_big = 0
        for i in range(40 if QUICK else 200):
            head = b"GET /status HTTP/1.1\r\nHost: " + str(i).encode() + b"x" * (1 << 20) + b"\r\n\r\n"
            refused_big += raw_request(port, head).split(b" ")[1:2] != [b"200"]
        after = rss_mb(node.pid)
        rows.append(row("node RSS, 1,000 distinct 48 KB Hosts + 1 MiB headers", before, after,
                        f"; {codes} / {refused_big} refused"))  # fmt: skip

        before = rss_mb(node.pid)
        latencies: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client() as probe_client:
                while not stop.is_set():
                    started = time.perf_counter()
                    probe_client.get(f"http://127.0.0.1:{port}/health", timeout=10)
                    latencies.append((time.perf_counter() - started) * 1000)
                    time.sleep(0.01)

        def probes_after(count: int) -> None:  # wait for the probe to have answered more than `count` times
            deadline = time.monotonic() + 30
            while len(latencies) <= count and time.monotonic() < deadline:
                time.sleep(0.005)

        watcher = threading.Thread(target=probe)
        watcher.start()
        probes_after(0)
        first = len(latencies)  # the flood starts now: only what the probe saw from here on counts
        size = 4 << 20 if QUICK else 16 << 20
        senders = [
            threading.Thread(target=raw_request, args=(port, b"GET / HTTP/1.1\r\nX-Big: " + b"y" * size))
            for _ in range(3)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        probes_after(first)
        stop.set()
        watcher.join()
        after = rss_mb(node.pid)
        during = latencies[first:] or [float("nan")]
        rows.append(row(f"node RSS, 3 x {size >> 20} MiB headers at once", before, after,
                        f"; /health p50 {statistics.median(during):.1f} ms, max {max(during):.0f} ms"))  # fmt: skip
    return rows


def registration_flood() -> list[dict[str, object]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"PROMPTISE_AUTH_TOKEN": "operator", "PROMPTISE_NODE_TOKEN": "nodes"}
    count = 500 if QUICK else 2000
    with command("coordinator", "--port", str(port), "--health-check-interval", "3600", env=env) as coordinator:
        wait_up(f"{base}/health")
        as_node = {"Authorization": "Bearer nodes"}
        with httpx.Client(base_url=base, headers=as_node, timeout=30) as client:
            for i in range(1000):
                url = f"http://127.0.{i // 250}.{i % 250 + 1}:9100"
                client.post("/cluster/nodes", json={"node_id": f"n{i}", "url": url, "metadata": {"i": i}})
            # n0 is alive: a real listener answering /health as n0, so displacing it is refused.
            live = free_port()
            with command("node", "--port", str(live), "--node-id", "n0", env={"PROMPTISE_AUTH_TOKEN": "nodes"}):
                wait_up(f"http://127.0.0.1:{live}/health")
                client.post("/cluster/nodes", json={"node_id": "n0", "url": f"http://127.0.0.1:{live}"})
                before = rss_mb(coordinator.pid)
                codes: dict[int, int] = {}
                started = time.perf_counter()
                for i in range(count):
                    for body, headers in (
                        ({"node_id": f"big{i}", "url": "http://127.0.0.9:1", "metadata": {"x": "z" * 20_000}}, None),
                        ({"node_id": "n0", "url": f"http://127.0.0.{i % 200 + 2}:9"}, None),
                        ({"node_id": f"evil{i}", "url": "http://127.0.0.9:1"}, {"Authorization": "Bearer operator"}),
                    ):
                        status = client.post("/cluster/nodes", json=body, headers=headers).status_code
                        codes[status] = codes.get(status, 0) + 1
                per_call = (time.perf_counter() - started) * 1000 / (3 * count)
                after = rss_mb(coordinator.pid)
    return [
        row(
            f"coordinator RSS, {3 * count:,} hostile registrations at 1,000 nodes",
            before,
            after,
            f"; {codes}, {per_call:.2f} ms each",
        ),
    ]


def main() -> int:
    rows = node_floods() + registration_flood()
    for entry in rows:
        print("BENCH_ROW " + json.dumps(entry))
    for entry in rows:
        print(f"{entry['metric']}: {entry['ours']} ({'OK' if entry['met'] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
