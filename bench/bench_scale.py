"""The coordinator at 1,000, 10,000 and 50,000 nodes (SPEC 16): heartbeats with digests instead of polls.

For each size, our coordinator runs as `promptise-asgi coordinator` (in-process registry, health checks every
15 s, so it asks nodes to heartbeat every 10 s) in its own process pinned to the server CPU; a load process
pinned to the other CPU registers the nodes, then heartbeats each one with a digest every 10 s, spread evenly
(N/10 heartbeats a second), over 64 raw HTTP/1.1 keep-alive connections (asyncio protocols, no HTTP library,
so the load is not the bottleneck); it also answers `/health` for any node the coordinator polls. After one
full heartbeat period, this script measures, while the heartbeats go on:
- the coordinator's CPU share over a window (user + system time from /proc/<pid>/stat, over wall time);
- `GET /cluster/status?limit=100` at random cursors, one after another: median and p99;
- a full `GET /cluster/status` (`cluster_status()` over every node): median time;
- memory per node: the coordinator's resident memory after the nodes joined, minus before, over N.
The original (`promptise==1.10.*` in bench/.venv-original) has no registry over HTTP, no heartbeats and no
paging: its coordinator polls every node in each round. It runs over the same N nodes (the load process's
`/health`, one port, the node id in the path) from its own process: the time and CPU of one `cluster_status()`
(its round), its CPU share (one round's CPU every 15 s) and its memory per node.
Prints `BENCH_ROW {json}` lines for `python -m bench`, then the curve. `BENCH_QUICK=1`: 1k and 10k, shorter;
`BENCH_SCALE_SIZES=2000,20000` picks the sizes.
Roles, all in this file so either venv can run it (standard library only at import time): `load`, `original`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
QUICK = bool(os.environ.get("BENCH_QUICK"))
SIZES = tuple(
    int(n) for n in (os.environ.get("BENCH_SCALE_SIZES") or ("1000,10000" if QUICK else "1000,10000,50000")).split(",")
)
PERIOD = 10.0  # seconds between two heartbeats of a node
CONNECTIONS = 64
WINDOW = 8.0 if QUICK else 20.0  # seconds of steady heartbeats over which the CPU share is taken
PAGES = 60 if QUICK else 200  # GET /cluster/status?limit=100 requests timed
ORIGINAL_TIMEOUT = 150.0
# A coordinator that cannot keep up never reaches a steady state: measure it as it is after this long.
READY_WITHIN = 100.0
TARGET_SIZE = 10_000
DIGEST = json.dumps(
    {"process_count": 2, "processes": [{"name": "worker", "state": "running", "queue_size": 0},
                                       {"name": "cron", "state": "running", "queue_size": 1}]},
    separators=(",", ":"),
).encode()  # fmt: skip
_TICK = os.sysconf("SC_CLK_TCK")


def node_id(i: int) -> str:
    return f"node-{i:06d}"


# --------------------------------------------------------------------------------------------------------------
# load: the nodes (registrations, heartbeats) and their /health
# --------------------------------------------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, answers framed by Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self._buffer) < end + 4 + length:
            return
        del self._buffer[: end + 4 + length]
        waiter, self._waiter = self._waiter, None
        if not waiter.done():  # a worker cancelled at the end of the run leaves its future cancelled
            waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the coordinator closed the connection"))

    async def send(self, request: bytes) -> int:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter


class _FakeNodes(asyncio.Protocol):
    """GET /n/<node id>/health (or /processes): what a node answers, for the nodes the coordinator polls."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer and self._transport is not None:
            head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            nid = path.split("/")[2] if path.count("/") >= 3 else "?"
            if path.endswith("/processes"):
                body: dict[str, Any] = {"node_id": nid, "processes": [{"name": "worker", "state": "running"}]}
            else:
                body = {"status": "healthy", "node_id": nid, "process_count": 2}
            raw = json.dumps(body).encode()
            self._transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(raw), raw)
            )


def _post(port: int, path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
    return head.encode() + b"content-length: %d\r\n\r\n%s" % (len(body), body)


def _percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] if ordered else float("nan")


async def _load(nodes: int, coordinator_port: int) -> None:
    loop = asyncio.get_running_loop()
    fake = await loop.create_server(_FakeNodes, "127.0.0.1", 0, backlog=1024)
    fake_port = fake.sockets[0].getsockname()[1]
    print(f"FAKE {fake_port}", flush=True)
    if not nodes:  # nodes for the original only: serve until the runner closes stdin
        await loop.run_in_executor(None, sys.stdin.read)
        return
    clients = []
    for _ in range(CONNECTIONS):
        _, client = await loop.create_connection(_Client, "127.0.0.1", coordinator_port)
        clients.append(client)
    registrations = [
        _post(coordinator_port, "/cluster/nodes", json.dumps(
            {"node_id": node_id(i), "url": f"http://127.0.0.1:{fake_port}/n/{node_id(i)}",
             "metadata": {"zone": f"zone-{i % 8}"}}).encode())
        for i in range(nodes)
    ]  # fmt: skip
    beats = [_post(coordinator_port, f"/cluster/nodes/{node_id(i)}/heartbeat", DIGEST) for i in range(nodes)]
    # Node i heartbeats at t0 + (i/N + k) * PERIOD from the moment it registered: N/PERIOD heartbeats a second,
    # evenly spread, also while the others still register. Heartbeats go before registrations, as on a
    # cluster where most nodes are up and a few join.
    t0 = time.monotonic()
    rate = nodes / PERIOD
    schedule: list[tuple[float, int]] = []
    due_beats: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    pending = iter(range(nodes))
    stats: dict[str, Any] = {"sent": 0, "non_2xx": 0, "latency": [], "lag": [], "failures": 0}
    measuring = False
    registered = asyncio.Event()
    left = nodes

    async def worker(client: _Client) -> None:
        nonlocal left
        while True:
            if due_beats.empty() and not registered.is_set():
                i = next(pending, None)
                if i is not None:  # as self-registration does: register, then a first digest at once
                    stats["failures"] += await client.send(registrations[i]) != 200
                    stats["failures"] += await client.send(beats[i]) != 200
                    now = time.monotonic()
                    first = t0 + i / rate + PERIOD * (1 + int((now - t0 - i / rate) // PERIOD))
                    heapq.heappush(schedule, (first, i))
                    left -= 1
                    if not left:
                        registered.set()
                    continue
            i, due = await due_beats.get()
            start = time.monotonic()
            status = await client.send(beats[i])
            if measuring:
                stats["sent"] += 1
                stats["non_2xx"] += not 200 <= status < 300
                stats["latency"].append(time.monotonic() - start)
                stats["lag"].append(start - due)

    workers = [asyncio.ensure_future(worker(c)) for c in clients]
    # The runner's commands: END (the CPU window is over: report on it), then STOP.
    command = loop.run_in_executor(None, sys.stdin.readline)
    steady = deadline = time.monotonic() + READY_WITHIN
    registered_after = None
    while True:
        now = time.monotonic()
        while schedule and schedule[0][0] <= now:
            due, i = heapq.heappop(schedule)
            due_beats.put_nowait((i, due))
            heapq.heappush(schedule, (due + PERIOD, i))
        if registered_after is None and registered.is_set():
            registered_after = now - t0
            deadline = min(deadline, now + PERIOD)  # one full period of heartbeats before measuring
        if not measuring and now >= deadline:
            measuring, steady = True, now
            print("READY " + json.dumps({
                "register_s": registered_after, "registered": nodes - left, "failures": stats["failures"],
            }), flush=True)  # fmt: skip
        if command.done():
            if command.result().strip() != "END":
                break
            measuring = False
            latency, lag = stats["latency"], stats["lag"]
            print("STATS " + json.dumps({
                "rate": stats["sent"] / (now - steady), "target_rate": rate, "non_2xx": stats["non_2xx"],
                "p50_ms": _percentile(latency, 0.5) * 1000, "p99_ms": _percentile(latency, 0.99) * 1000,
                "lag_p99_ms": _percentile(lag, 0.99) * 1000, "backlog": due_beats.qsize(),
            }), flush=True)  # fmt: skip
            command = loop.run_in_executor(None, sys.stdin.readline)
        await asyncio.sleep(0.005)
    for w in workers:
        w.cancel()


# --------------------------------------------------------------------------------------------------------------
# original: promptise 1.10's coordinator over the same nodes
# --------------------------------------------------------------------------------------------------------------


def _rss_kb(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _original(nodes: int, fake_port: int, runs: int) -> dict[str, Any]:
    from promptise.runtime.distributed.coordinator import RuntimeCoordinator

    coordinator = RuntimeCoordinator(health_check_interval=15.0)
    before = _rss_kb()
    for i in range(nodes):
        coordinator.register_node(node_id(i), f"http://127.0.0.1:{fake_port}/n/{node_id(i)}", {"zone": f"z{i % 8}"})
    times, cpu = [], []
    for _ in range(runs):
        wall, used = time.perf_counter(), time.process_time()
        status = await coordinator.cluster_status()
        cpu.append(time.process_time() - used)
        times.append(time.perf_counter() - wall)
    return {
        "status_s": statistics.median(times),
        "cpu_s": statistics.median(cpu),
        "healthy": status["healthy_nodes"],
        "kb_per_node": (_rss_kb() - before) / nodes,
    }


# --------------------------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _others_cpu(ours: set[int]) -> dict[int, float]:
    """CPU seconds used so far by every other process on the machine (someone's test suite, say), by pid."""
    used = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in ours:
            with contextlib.suppress(OSError, IndexError, ValueError):
                used[int(entry.name)] = _cpu_seconds(int(entry.name))
    return used


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _process(cmd: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(cmd, cwd=REPO, text=True, **kwargs)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _line(process: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the process exited before printing {prefix}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"no {prefix} line within {timeout:.0f} s")


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[float, int]:
    start = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
    return time.perf_counter() - start, len(body)


def _wait_up(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the coordinator exited at start")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the coordinator did not answer /health within 30 s")


def measure_ours(nodes: int) -> dict[str, Any]:
    """Our coordinator under N nodes heartbeating: CPU share, page and full status times, memory per node."""
    from bench.http_load import pinned

    port = _free_port()
    env = {**os.environ, "PROMPTISE_AUTH_TOKEN": "", "PROMPTISE_NODE_TOKEN": ""}
    serve = [sys.executable, "-m", "promptise_asgi", "--log-level", "warning", "coordinator", "--port", str(port)]
    load = [sys.executable, "bench/bench_scale.py", "load", "--nodes", str(nodes), "--port", str(port)]
    with _process(pinned("server", serve), env=env, stdout=subprocess.DEVNULL) as coordinator:
        _wait_up(port, coordinator)
        rss_before = _rss_kb(coordinator.pid)
        with _process(pinned("load", load), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as loader:
            ready = json.loads(_line(loader, "READY ", READY_WITHIN + 60))
            rss_after = _rss_kb(coordinator.pid)
            ours = {coordinator.pid, loader.pid, os.getpid()}
            cpu, others, wall = _cpu_seconds(coordinator.pid), _others_cpu(ours), time.monotonic()
            time.sleep(WINDOW)
            wall = time.monotonic() - wall
            share = (_cpu_seconds(coordinator.pid) - cpu) / wall
            after = _others_cpu(ours)
            other = sum(after[pid] - others.get(pid, 0.0) for pid in after) / wall
            assert loader.stdin is not None
            loader.stdin.write("END\n")  # the heartbeats over the same window
            loader.stdin.flush()
            beats = json.loads(_line(loader, "STATS ", 60))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            rng = random.Random(nodes)
            pages = [_get(conn, f"/cluster/status?limit=100&after={node_id(rng.randrange(nodes))}")[0]
                     for _ in range(PAGES)]  # fmt: skip
            full = [_get(conn, "/cluster/status") for _ in range(3 if nodes >= 50_000 else 5)]
            conn.close()
            loader.stdin.write("STOP\n")
            loader.stdin.flush()
    return {
        "cpu_share": share,
        "other_busy": other,
        "page_p50_ms": statistics.median(pages) * 1000,
        "page_p99_ms": _percentile(pages, 0.99) * 1000,
        "full_ms": statistics.median(t for t, _ in full) * 1000,
        "full_mb": full[-1][1] / 1e6,
        "kb_per_node": (rss_after - rss_before) / max(1, ready["registered"]),
        "register_s": ready["register_s"],
        "registered": ready["registered"],
        "heartbeats": beats,
    }


def measure_original(nodes: int, python: str) -> dict[str, Any]:
    """The original's coordinator over N nodes (served by a load process): one round's time, CPU and memory."""
    from bench.http_load import pinned

    load = [sys.executable, "bench/bench_scale.py", "load", "--nodes", "0"]
    with _process(pinned("load", load), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as fake:
        fake_port = int(_line(fake, "FAKE ", 30))
        runs = 1 if nodes >= 50_000 else 2
        cmd = [python, "bench/bench_scale.py", "original", "--nodes", str(nodes), "--fake-port", str(fake_port),
               "--runs", str(runs)]  # fmt: skip
        try:
            proc = subprocess.run(
                pinned("server", cmd), cwd=REPO, capture_output=True, text=True, timeout=ORIGINAL_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            return {"error": f"no answer within {ORIGINAL_TIMEOUT:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("ORIGINAL "):
            return dict(json.loads(line.removeprefix("ORIGINAL ")))
    return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"}


def _rows(size: int, ours: dict[str, Any], original: dict[str, Any] | None) -> list[dict[str, Any]]:
    at_target = size == TARGET_SIZE
    beats = ours["heartbeats"]
    g = original or {}
    missing = g.get("error") or ("not installed" if original is None else None)
    orig_share = g["cpu_s"] / 15.0 if not missing else None
    orig_cpu = (
        f"n/a ({missing})"
        if missing
        else (
            f"{g['cpu_s'] / 15.0 * 100:.0f}% of a core (a round of {size:,} polls, {g['cpu_s']:.2f} s CPU, every 15 s)"
        )
    )
    orig_full = (
        f"n/a ({missing})"
        if missing
        else (f"{g['status_s'] * 1000:,.0f} ms (cluster_status(), {g['healthy']:,} healthy)")
    )
    kept_up = beats["rate"] >= 0.95 * beats["target_rate"] and beats["lag_p99_ms"] < PERIOD * 500
    kept_up = kept_up and ours["registered"] == size
    behind = beats["lag_p99_ms"] / 1000
    saturated = "" if kept_up else f"; SATURATED: {ours['registered']:,} registered, {behind:.0f} s behind (p99)"
    return [
        {
            "metric": f"coordinator CPU, {size:,} nodes heartbeating every 10 s",
            "ours": f"{ours['cpu_share'] * 100:.1f}% of a core ({beats['rate']:,.0f} of {beats['target_rate']:,.0f} "
            f"hb/s, p50/p99 {beats['p50_ms']:.1f}/{beats['p99_ms']:.1f} ms{saturated})",
            "original": orig_cpu,
            "ratio": f"{ours['cpu_share'] / orig_share:.2f}x of orig" if orig_share else "-",
            "target": "< 50% of one core" if at_target else "-",
            "met": ours["cpu_share"] < 0.5 and kept_up if at_target else None,
        },
        {
            "metric": f"GET /cluster/status?limit=100, {size:,} nodes, p50 / p99",
            "ours": f"{ours['page_p50_ms']:.2f} / {ours['page_p99_ms']:.2f} ms",
            "original": "n/a (no paging, no HTTP status: cluster_status() polls every node)",
            "target": "median < 20 ms" if at_target else "-",
            "met": ours["page_p50_ms"] < 20 if at_target else None,
        },
        {
            "metric": f"full cluster status, {size:,} nodes",
            "ours": f"{ours['full_ms']:.0f} ms (GET /cluster/status, {ours['full_mb']:.1f} MB)",
            "original": orig_full,
            "ratio": f"{ours['full_ms'] / (g['status_s'] * 1000):.3f}x of orig" if not missing else "-",
            "target": "< 100 ms" if at_target else "-",
            "met": ours["full_ms"] < 100 if at_target else None,
        },
        {
            "metric": f"coordinator memory per node, {size:,} nodes",
            "ours": f"{ours['kb_per_node']:.1f} KB",
            "original": f"n/a ({missing})" if missing else f"{g['kb_per_node']:.1f} KB",
            "target": "-",
        },
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="role")
    load = sub.add_parser("load")
    load.add_argument("--nodes", type=int, required=True)
    load.add_argument("--port", type=int, default=0)
    original = sub.add_parser("original")
    original.add_argument("--nodes", type=int, required=True)
    original.add_argument("--fake-port", type=int, required=True)
    original.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    if args.role in ("load", "original"):
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        if args.role == "load":
            asyncio.run(_load(args.nodes, args.port))
        else:
            result = asyncio.run(_original(args.nodes, args.fake_port, args.runs))
            print("ORIGINAL " + json.dumps(result), flush=True)
        return 0

    sys.path.insert(0, os.fspath(REPO))
    from bench.__main__ import _original_python

    original_python = _original_python()
    load_before = os.getloadavg()[0]
    curve = []
    for size in SIZES:
        _progress(f"bench_scale: our coordinator, {size:,} nodes ...")
        ours = measure_ours(size)
        original = None
        if original_python is not None:
            _progress(f"bench_scale: the original's coordinator, {size:,} nodes ...")
            original = measure_original(size, original_python)
        for row in _rows(size, ours, original):
            print("BENCH_ROW " + json.dumps(row), flush=True)
        curve.append((size, ours, original))
    others = max(ours["other_busy"] for _, ours, _ in curve)
    print("BENCH_ROW " + json.dumps({
        "metric": "scale benchmark: other processes on the machine",
        "ours": f"up to {others * 100:.0f}% of a CPU during the CPU windows; load average {load_before:.2f} at start",
        "target": "< 10% (quiet machine)", "met": others < 0.1,
    }), flush=True)  # fmt: skip
    print("\ncurve (ours; the original where it ran):")
    print(f"{'nodes':>7} | {'CPU':>6} | {'hb/s':>7} | {'page p50/p99 ms':>16} | {'full status':>11} | {'KB/node':>7} | "
          "original round (CPU)")  # fmt: skip
    for size, o, g in curve:
        orig = "-" if not g else g.get("error") or f"{g['status_s']:.2f} s ({g['cpu_s']:.2f} s CPU)"
        print(f"{size:>7,} | {o['cpu_share'] * 100:5.1f}% | {o['heartbeats']['rate']:7,.0f} | "
              f"{o['page_p50_ms']:7.2f} / {o['page_p99_ms']:6.2f} | {o['full_ms']:8.0f} ms | {o['kb_per_node']:7.1f} | "
              f"{orig}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
