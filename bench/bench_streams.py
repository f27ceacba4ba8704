"""Change streams under load (SPEC 13): what 100 open `/changes` streams cost the node's API, and how fast one
change reaches 100 readers.

Our node runs pinned to CPU 0 as in the HTTP benchmark (`bench.apps.serve node`), wrk on CPU 1. Throughput of
GET /health is measured in alternating rounds with no stream open and with 100 idle streams open (held by this
process on raw sockets), and the median of the per-pair ratios is reported (target: within 10%). Then each of
20 changes (a process stopped or started over HTTP) is timed from the request until all 100 readers have its
message; the median of those times is reported (target: 50 ms). Prints `BENCH_ROW {json}` lines for the runner.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.http_load import _GET_SCRIPT, _free_port, _server, _wait_quiet, _wrk

QUICK = bool(os.environ.get("BENCH_QUICK"))
STREAMS = 100
ROUNDS = 2 if QUICK else 4
SECONDS = 2 if QUICK else 5
CHANGES = 10 if QUICK else 20


class Reader:
    """One open `/changes` stream on a raw socket, noting when each message id arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer = writer
        writer.write(b"GET /changes HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        await writer.drain()
        asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            if line.startswith(b"data: ") and b'"state"' in line:
                self.arrived.setdefault(line.decode().strip(), time.perf_counter())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _fan_out(port: int, readers: list[Reader]) -> list[float]:
    loop = asyncio.get_running_loop()
    times = []
    for i in range(CHANGES):
        action = "stop" if i % 2 == 0 else "start"
        target_state = "stopped" if action == "stop" else "running"
        message = f'"state":"{target_state}"'
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /processes/worker/{action} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()
        )
        await writer.drain()
        await reader.readline()
        writer.close()
        deadline = loop.time() + 5
        while loop.time() < deadline:
            got = [
                min((t for line, t in r.arrived.items() if message in line and t >= started), default=None)
                for r in readers
            ]
            if all(t is not None for t in got):
                times.append((max(t for t in got if t is not None) - started) * 1000)
                break
            await asyncio.sleep(0.001)
        for r in readers:
            r.arrived.clear()
        await asyncio.sleep(0.05)
    return times


async def _with_streams(port: int, work: list[str]) -> dict[str, object]:
    readers = [Reader() for _ in range(STREAMS)]
    for r in readers:
        await r.open(port)
    await asyncio.sleep(0.5)  # every stream has its snapshot; now they are idle
    result: dict[str, object] = {}
    if "load" in work:
        result["rps"] = await asyncio.to_thread(_health_rps, port)
    if "fanout" in work:
        result["fanout_ms"] = await _fan_out(port, readers)
    for r in readers:
        r.close()
    return result


def _health_rps(port: int) -> float:
    _wait_quiet(2.0)
    run = _wrk(port, "/health", _GET_SCRIPT, 64, SECONDS)
    return run.summary["requests"] / (run.summary["duration_us"] / 1e6)


def main() -> int:
    port = _free_port()
    cmd = [sys.executable, "-m", "bench.apps.serve", "node", "--port", str(port)]
    ratios, without, with_streams = [], [], []
    with _server(cmd, port, 30):
        _wrk(port, "/health", _GET_SCRIPT, 2, 1)  # warm-up
        for _ in range(ROUNDS):
            none = _health_rps(port)
            some = asyncio.run(_with_streams(port, ["load"]))["rps"]
            assert isinstance(some, float)
            without.append(none)
            with_streams.append(some)
            ratios.append(some / none)
        fanout = asyncio.run(_with_streams(port, ["fanout"]))["fanout_ms"]
    assert isinstance(fanout, list)
    ratio = statistics.median(ratios)
    median_ms = statistics.median(fanout) if fanout else float("nan")
    rows = [
        {
            "metric": f"GET /health req/s with {STREAMS} idle /changes streams",
            "ours": f"{statistics.median(with_streams):,.0f}",
            "baseline": f"{statistics.median(without):,.0f} with none",
            "ratio": f"{ratio:.2f}x",
            "target": ">= 0.90x of none",
            "met": ratio >= 0.9,
        },
        {
            "metric": f"one change reaches {STREAMS} stream readers (median of {len(fanout)})",
            "ours": f"{median_ms:.1f} ms (max {max(fanout, default=float('nan')):.1f})",
            "target": "<= 50 ms",
            "met": len(fanout) == CHANGES and median_ms <= 50,
        },
    ]
    for row in rows:
        print("BENCH_ROW " + json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
