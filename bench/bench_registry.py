"""Benchmark of `RegistryDiscovery`: heartbeat and discover() cost against registry size, memory per node.

Run with `venv/bin/python bench/bench_registry.py [--backend asyncio|trio|both]`. Prints one table per anyio
backend and checks the SPEC section 10 targets (heartbeat at 100,000 nodes within 1.5x of that at 100 nodes;
discover() at 10,000 nodes under 20 ms). Never part of the test suite's pass/fail. Knows only the public API.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc

import anyio

from promptise_asgi.discovery import RegistryDiscovery

SIZES = (100, 10_000, 100_000)
HEARTBEAT_CALLS = 5_000
HEARTBEAT_ROUNDS = 20
DISCOVER_RUNS = {100: 200, 10_000: 30, 100_000: 7}
PRUNE_CASES = ((10, 100_000), (1_000, 2_000), (1_000, 100_000))


class ManualClock:
    """A monotonic clock the benchmark moves by hand, to expire entries without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def node_id(i: int) -> str:
    return f"node-{i:06d}"


def node_url(i: int) -> str:
    return f"http://10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:9100"


async def build(size: int, clock: ManualClock | None = None) -> RegistryDiscovery:
    registry = RegistryDiscovery(ttl=60.0, clock=clock or ManualClock())
    for i in range(size):
        await registry.register(node_id(i), node_url(i), {"zone": f"z{i % 3}", "version": "1.0"})
    return registry


async def heartbeat_median_us(registry: RegistryDiscovery, size: int) -> float:
    ids = [node_id(random.randrange(size)) for _ in range(HEARTBEAT_CALLS)]
    timer = time.perf_counter_ns
    samples: list[int] = []
    append = samples.append
    for target in ids:
        start = timer()
        await registry.heartbeat(target)
        append(timer() - start)
    return statistics.median(samples) / 1000


async def discover_median_ms(registry: RegistryDiscovery, size: int) -> float:
    samples = []
    for _ in range(DISCOVER_RUNS[size]):
        start = time.perf_counter()
        nodes = await registry.discover()
        samples.append(time.perf_counter() - start)
        assert len(nodes) == size
    return statistics.median(samples) * 1000


async def bytes_per_node(size: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    registry = await build(size)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(registry) == size
    return (after - before) / size


async def prune_ms(expired: int, size: int, repeats: int = 3) -> float:
    """Extra time of the discover() that drops the `expired` oldest of `size` nodes, over a plain discover().

    Median over `repeats` fresh registries: each case can be measured only once per registry.
    """
    extra = []
    for _ in range(repeats):
        clock = ManualClock()
        registry = RegistryDiscovery(ttl=60.0, clock=clock)
        # Register in shuffled id order so the expired nodes are spread across the node-id order.
        order = list(range(size))
        random.shuffle(order)
        for n, i in enumerate(order):
            if n == expired:
                clock.now = 30.0
            await registry.register(node_id(i), node_url(i))
        await registry.discover()
        clock.now = 61.0
        start = time.perf_counter()
        await registry.discover()
        with_prune = time.perf_counter() - start
        assert len(registry) == size - expired
        start = time.perf_counter()
        await registry.discover()
        extra.append(with_prune - (time.perf_counter() - start))
    return max(statistics.median(extra), 0.0) * 1000


async def run(backend: str) -> None:
    registries = {size: await build(size) for size in SIZES}
    heartbeat: dict[int, list[float]] = {size: [] for size in SIZES}
    # Interleave sizes round by round so drift on a shared machine hits every size alike.
    for _ in range(HEARTBEAT_ROUNDS):
        for size in SIZES:
            heartbeat[size].append(await heartbeat_median_us(registries[size], size))
    discover = {size: await discover_median_ms(registries[size], size) for size in SIZES}
    del registries
    memory = {size: await bytes_per_node(size) for size in SIZES}
    prune = {case: await prune_ms(*case) for case in PRUNE_CASES}

    hb = {size: statistics.median(values) for size, values in heartbeat.items()}
    calls = f"{HEARTBEAT_ROUNDS}x{HEARTBEAT_CALLS}"
    print(f"\nRegistryDiscovery on {backend} (ttl=60s; medians; heartbeat over {calls} calls at random nodes)")
    print(f"{'nodes':>9} | {'heartbeat (us/call)':>19} | {'discover() (ms)':>15} | {'memory (bytes/node)':>19}")
    print(f"{'-' * 9}-+-{'-' * 19}-+-{'-' * 15}-+-{'-' * 19}")
    for size in SIZES:
        print(f"{size:>9,} | {hb[size]:>19.2f} | {discover[size]:>15.3f} | {memory[size]:>19.0f}")
    ratio = hb[100_000] / hb[100]
    print(f"heartbeat@100k / heartbeat@100 = {ratio:.2f}x (target <= 1.5x): {'OK' if ratio <= 1.5 else 'MISSED'}")
    d10k = discover[10_000]
    print(f"discover()@10k = {d10k:.2f} ms (target < 20 ms): {'OK' if d10k < 20 else 'MISSED'}")
    for (expired, size), ms in prune.items():
        print(f"discover() dropping {expired:,} expired nodes out of {size:,}: +{ms:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    args = parser.parse_args()
    random.seed(1)
    for backend in ("asyncio", "trio") if args.backend == "both" else (args.backend,):
        anyio.run(run, backend)


if __name__ == "__main__":
    main()
