"""Benchmark of `EtcdDiscovery` against a local etcd, next to the in-process `RegistryDiscovery`.

Run with `venv/bin/python bench/bench_etcd.py [--etcd URL] [--nodes N] [--rounds N] [--backend asyncio|trio]`.
Without `--etcd` it starts its own etcd (the `etcd` binary, Debian package `etcd-server`) on free loopback ports
with a temporary data dir, using the test suite's helper. Prints median and p99 latency of register, heartbeat
and discover (over `--nodes` registered nodes) for both backends of discovery, and one `BENCH_ROW` line per
figure for `python -m bench`. There is no target: etcd pays a network round trip and a disk write per change,
the in-process registry pays neither; the figures say how much that costs. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from etcd_server import EtcdServer

from promptise_asgi.discovery import RegistryDiscovery
from promptise_asgi.etcd import EtcdDiscovery


async def timed(calls: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    """Latency of each of `calls` awaited one after the other, in milliseconds."""
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def summary(samples: list[float]) -> tuple[float, float]:
    """(median, p99) in milliseconds."""
    return statistics.median(samples), statistics.quantiles(samples, n=100, method="inclusive")[98]


async def measure(discovery: Any, nodes: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Register `nodes` nodes, heartbeat them round-robin `rounds` times, discover `rounds // 5` times."""

    def node(i: int) -> str:
        return f"node-{i % nodes:05d}"

    register = await timed(nodes, lambda i: discovery.register(node(i), f"http://10.0.0.{i % 250}:9100", {"i": i}))
    await timed(min(nodes, 20), lambda i: discovery.heartbeat(node(i)))  # warm the pool and the caches
    heartbeat = await timed(rounds, lambda i: discovery.heartbeat(node(i)))
    discover = await timed(max(rounds // 5, 20), lambda i: discovery.discover())
    found = len(await discovery.discover())
    if found != nodes:
        raise RuntimeError(f"{type(discovery).__name__} found {found} nodes, expected {nodes}")
    for i in range(nodes):
        await discovery.unregister(node(i))
    return {"register": summary(register), "heartbeat": summary(heartbeat), "discover": summary(discover)}


async def run(etcd_url: str, nodes: int, rounds: int) -> dict[str, dict[str, tuple[float, float]]]:
    prefix = f"/bench/{os.getpid()}-{time.time_ns()}/"
    async with EtcdDiscovery(etcd_url, prefix=prefix, ttl=60) as etcd:
        etcd_figures = await measure(etcd, nodes, rounds)
    registry_figures = await measure(RegistryDiscovery(ttl=60.0), nodes, rounds)
    return {"etcd": etcd_figures, "registry": registry_figures}


def main() -> None:
    quick = bool(os.environ.get("BENCH_QUICK"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", help="an etcd client URL to use instead of starting one")
    parser.add_argument("--nodes", type=int, default=100, help="nodes registered (default 100)")
    parser.add_argument("--rounds", type=int, default=300 if quick else 1000, help="heartbeats measured")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()

    server: EtcdServer | None = None
    data = None
    if args.etcd is None:
        if shutil.which("etcd") is None:
            print("etcd is not installed (Debian package etcd-server): nothing to measure", file=sys.stderr)
            print("BENCH_ROW " + json.dumps({"metric": "etcd register/heartbeat/discover", "ours": "n/a"}))
            return
        data = tempfile.TemporaryDirectory(prefix="bench-etcd-")
        server = EtcdServer(Path(data.name) / "data", shutil.which("etcd"))
        server.start()
    try:
        url = args.etcd or (server.url if server else "")
        figures = anyio.run(run, url, args.nodes, args.rounds, backend=args.backend)
    finally:
        if server is not None:
            server.stop()
        if data is not None:
            data.cleanup()

    where = f"etcd at {args.etcd}" if args.etcd else "a local single-member etcd (own data dir)"
    print(f"EtcdDiscovery vs RegistryDiscovery on {args.backend}: {args.nodes} nodes, {where}")
    print(f"{'operation':<11} {'etcd median':>12} {'etcd p99':>10} {'registry median':>16} {'registry p99':>13}")
    for op in ("register", "heartbeat", "discover"):
        (em, ep), (rm, rp) = figures["etcd"][op], figures["registry"][op]
        print(f"{op:<11} {em:>9.3f} ms {ep:>7.3f} ms {rm:>13.4f} ms {rp:>10.4f} ms")
    for op in ("register", "heartbeat", "discover"):
        (em, ep), (rm, rp) = figures["etcd"][op], figures["registry"][op]
        row = {
            "metric": f"etcd {op} median/p99 ({args.nodes} nodes, {args.backend})",
            "ours": f"{em:.2f}/{ep:.2f} ms",
            "baseline": f"registry {rm:.3f}/{rp:.3f} ms",
        }
        print("BENCH_ROW " + json.dumps(row))


if __name__ == "__main__":
    main()
