"""Coordinator fan-out: `cluster_status()` over 1, 10 and 100 fake loopback nodes, ours and the original's.

Three roles in one file, so both virtual environments can run it as a plain script (standard library at import
time; promptise_asgi or promptise only inside `measure`):
- `serve`: the fake nodes, in their own process pinned to CPU 0, so the coordinator's event loop is measured alone.
  Raw asyncio protocols on uvloop (no framework): each port answers GET /health with the SPEC section 3 body
  (keep-alive, Content-Length), at once or after a timer (20 ms by default); one "black-holed" port accepts the
  connection and reads but never answers.
- `measure --impl ours|original`: pinned to CPU 1; registers the nodes, warms up, then times `cluster_status()`
  (median of N) per scenario and prints one JSON line.
- `run_fanout()`: what the runner calls; starts the fake nodes once and measures both implementations over them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

__all__ = ["FanoutSettings", "run_fanout"]

REPO = Path(__file__).resolve().parents[1]
SIZES = (1, 10, 100)
DELAY = 0.020
NOT_BUILT_EXIT = 3


# --------------------------------------------------------------------------------------------------------------
# serve: the fake nodes
# --------------------------------------------------------------------------------------------------------------


class _FakeNode(asyncio.Protocol):
    """Answers every request on the connection with one fixed response, after `delay` seconds if set."""

    def __init__(self, response: bytes, delay: float) -> None:
        self._response = response
        self._delay = delay
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        # GET requests only: a request ends at the blank line after its headers.
        while b"\r\n\r\n" in self._buffer:
            _, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
            if self._delay:
                asyncio.get_running_loop().call_later(self._delay, self._answer)
            else:
                self._answer()

    def _answer(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._response)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


class _BlackHole(asyncio.Protocol):
    """Accepts the connection and reads whatever comes, never answering."""

    def data_received(self, data: bytes) -> None:
        pass


def _health_response(node_id: str) -> bytes:
    body = json.dumps({"status": "healthy", "node_id": node_id, "process_count": 2}, separators=(",", ":")).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _serve(count: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    ports: dict[str, list[int]] = {"instant": [], "delayed": [], "blackhole": []}
    servers = []
    for group, wait in (("instant", 0.0), ("delayed", delay)):
        for i in range(count):
            response = _health_response(f"{group}-{i}")
            server = await loop.create_server(
                functools.partial(_FakeNode, response, wait), "127.0.0.1", 0, backlog=1024
            )
            servers.append(server)
            ports[group].append(server.sockets[0].getsockname()[1])
    server = await loop.create_server(_BlackHole, "127.0.0.1", 0, backlog=1024)
    servers.append(server)
    ports["blackhole"].append(server.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    # Serve until the runner closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)


# --------------------------------------------------------------------------------------------------------------
# measure: one implementation's coordinator
# --------------------------------------------------------------------------------------------------------------


def _scenarios(ports: dict[str, list[int]]) -> list[tuple[str, list[int], bool]]:
    """(name, ports, black-holed?) for every scenario, in the order they run."""
    out: list[tuple[str, list[int], bool]] = []
    for size in SIZES:
        out.append((f"instant_{size}", ports["instant"][:size], False))
    for size in SIZES:
        out.append((f"delayed_{size}", ports["delayed"][:size], False))
    out.append(("blackhole_100", ports["instant"][:99] + ports["blackhole"], True))
    return out


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _make_coordinator(impl: str, request_timeout: float) -> Any:
    if impl == "ours":
        from promptise_asgi.coordinator import RuntimeCoordinator

        return RuntimeCoordinator(health_check_interval=3600.0, request_timeout=request_timeout)
    from promptise.runtime.distributed.coordinator import RuntimeCoordinator as OriginalCoordinator

    # The original has no request_timeout: its health checks use a fixed 10 s total timeout.
    return OriginalCoordinator(health_check_interval=3600.0)


async def _time_scenario(
    impl: str, node_ports: list[int], repeats: int, warmups: int, request_timeout: float
) -> dict[str, Any]:
    coordinator = _make_coordinator(impl, request_timeout)
    for i, port in enumerate(node_ports):
        await _maybe_await(coordinator.register_node(f"node-{i}", f"http://127.0.0.1:{port}"))
    times: list[float] = []
    healthy: list[int] = []
    async with coordinator:
        for i in range(warmups + repeats):
            start = time.perf_counter()
            status = await coordinator.cluster_status()
            elapsed = time.perf_counter() - start
            if i >= warmups:
                times.append(elapsed)
                healthy.append(int(status["healthy_nodes"]))
    return {
        "nodes": len(node_ports),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
        "healthy_nodes": healthy[-1],
        "total_nodes": int(status["total_nodes"]),
    }


async def _measure(impl: str, ports: dict[str, list[int]], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, node_ports, black_holed in _scenarios(ports):
        if black_holed:
            # A black-holed round costs a whole timeout (10 s fixed for the original): no warm-up, few runs.
            repeats = args.blackhole_repeats if impl == "ours" else args.original_blackhole_repeats
            if repeats <= 0:
                continue
            results[name] = await _time_scenario(impl, node_ports, repeats, 0, args.request_timeout)
        else:
            results[name] = await _time_scenario(impl, node_ports, args.repeats, args.warmups, args.request_timeout)
        print(f"  {impl:9} {name:14} {results[name]['median_s'] * 1000:9.2f} ms", file=sys.stderr, flush=True)
    return results


def _run_measure(args: argparse.Namespace) -> int:
    ports = json.loads(args.ports)
    try:
        if args.impl == "ours":
            import promptise_asgi.coordinator  # noqa: F401
        else:
            import promptise.runtime.distributed.coordinator  # noqa: F401
    except ImportError as exc:
        print(f"not built yet: {exc}", file=sys.stderr)
        return NOT_BUILT_EXIT
    import uvloop

    if args.impl == "ours":
        import anyio

        result = anyio.run(_measure, args.impl, ports, args, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        result = uvloop.run(_measure(args.impl, ports, args))
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# run_fanout: what the runner calls
# --------------------------------------------------------------------------------------------------------------


class FanoutSettings:
    """Repetitions and timeouts for the fan-out benchmark.

    Args:
        repeats: Timed `cluster_status()` calls per scenario (the median is reported).
        warmups: Untimed calls first (they open the connections a pooled client keeps).
        blackhole_repeats: Timed calls with the black-holed node, for ours.
        original_blackhole_repeats: The same for the original (each one costs its fixed 10 s timeout).
        request_timeout: Our coordinator's `request_timeout` in seconds.
    """

    def __init__(
        self,
        repeats: int = 20,
        warmups: int = 2,
        blackhole_repeats: int = 3,
        original_blackhole_repeats: int = 1,
        request_timeout: float = 1.0,
    ) -> None:
        self.repeats = repeats
        self.warmups = warmups
        self.blackhole_repeats = blackhole_repeats
        self.original_blackhole_repeats = original_blackhole_repeats
        self.request_timeout = request_timeout


def _derive(raw: dict[str, Any], request_timeout: float | None) -> dict[str, Any]:
    """The figures SPEC section 10 talks about, from one implementation's raw scenario timings."""
    out: dict[str, Any] = {}
    for size in SIZES:
        key = f"instant_{size}"
        if key in raw:
            out[f"per_node_ms_instant_{size}"] = raw[key]["median_s"] * 1000 / size
    if "delayed_100" in raw and "delayed_1" in raw:
        out["delayed_100_over_delayed_1"] = raw["delayed_100"]["median_s"] / raw["delayed_1"]["median_s"]
        out["delayed_100_over_20ms"] = raw["delayed_100"]["median_s"] / DELAY
    if "blackhole_100" in raw:
        out["blackhole_100_s"] = raw["blackhole_100"]["median_s"]
        if request_timeout is not None:
            out["blackhole_over_timeout_s"] = raw["blackhole_100"]["median_s"] - request_timeout
    return out


def _measure_impl(python: str, impl: str, ports: dict[str, list[int]], settings: FanoutSettings) -> dict[str, Any]:
    from bench.http_load import pinned

    cmd = [
        python, "bench/coordinator_fanout.py", "measure", "--impl", impl,
        "--ports", json.dumps(ports), "--repeats", str(settings.repeats), "--warmups", str(settings.warmups),
        "--blackhole-repeats", str(settings.blackhole_repeats),
        "--original-blackhole-repeats", str(settings.original_blackhole_repeats),
        "--request-timeout", str(settings.request_timeout),
    ]  # fmt: skip
    proc = subprocess.run(
        pinned("load", cmd), cwd=REPO, stdout=subprocess.PIPE, stderr=None, text=True, timeout=900, check=False
    )
    if proc.returncode == NOT_BUILT_EXIT:
        return {"status": "n/a", "reason": "not built yet"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            raw = json.loads(line.removeprefix("BENCH_RESULT "))
            timeout = settings.request_timeout if impl == "ours" else 10.0
            return {"status": "ok", "scenarios": raw, **_derive(raw, timeout)}
    return {"status": "error", "reason": f"exit {proc.returncode}: {proc.stdout[-1000:]}"}


@contextlib.contextmanager
def _fake_nodes(main_python: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, list[int]]]]:
    """The fake-node process (server CPU) and the ports it listens on; it exits when its stdin closes."""
    from bench.http_load import pinned

    cmd = pinned("server", [main_python, "bench/coordinator_fanout.py", "serve", "--count", str(max(SIZES))])
    with subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as server:
        assert server.stdout is not None and server.stdin is not None
        try:
            yield server, json.loads(server.stdout.readline())
        finally:
            with contextlib.suppress(OSError):
                server.stdin.close()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _valid(result: dict[str, Any]) -> bool:
    """Every node that should answer did: otherwise the fake nodes, not the coordinator, were measured."""
    if result.get("status") != "ok":
        return True  # n/a or a real error: nothing to retry
    return all(
        s["healthy_nodes"] == s["nodes"] for name, s in result["scenarios"].items() if not name.startswith("blackhole")
    )


def run_fanout(settings: FanoutSettings, main_python: str, original_python: str | None) -> dict[str, Any]:
    """Start the fake nodes (server CPU), then measure our coordinator and the original's over them (load CPU).

    A measurement in which the fake nodes died or some of them did not answer is taken again once, over a fresh
    set of fake nodes; if it fails again it is kept, and the table flags the unhealthy counts.

    Args:
        settings: Repetitions and timeouts.
        main_python: The project's venv interpreter (serves the fake nodes, runs ours).
        original_python: The original's venv interpreter, or None.

    Returns:
        `{"ours": ..., "original": ..., "request_timeout": ...}`; each implementation `{"status": "ok",
        "scenarios": {...}, <derived figures>}` or `{"status": "n/a" or "error", "reason": ...}`.
    """
    results: dict[str, Any] = {"request_timeout": settings.request_timeout, "delay_s": DELAY, "retried": []}
    impls = [("ours", main_python)]
    if original_python is None:
        results["original"] = {"status": "n/a", "reason": "the original's venv could not be installed"}
    else:
        impls.append(("original", original_python))
    for impl, python in impls:
        for attempt in range(2):
            with _fake_nodes(main_python) as (server, ports):
                result = _measure_impl(python, impl, ports, settings)
                died = server.poll() is not None
            if not died and _valid(result):
                break
            results["retried"].append(impl)
            print(f"  {impl}: fake nodes died or did not all answer (attempt {attempt + 1})", file=sys.stderr)
        results[impl] = result
    return results


def main(argv: list[str] | None = None) -> int:
    """`serve` the fake nodes or `measure` one implementation (see the module docstring).

    Args:
        argv: Arguments (default: `sys.argv[1:]`).

    Returns:
        The process exit code (3: the implementation is not built yet).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--count", type=int, default=max(SIZES))
    serve.add_argument("--delay", type=float, default=DELAY)
    measure = sub.add_parser("measure")
    measure.add_argument("--impl", choices=["ours", "original"], required=True)
    measure.add_argument("--ports", required=True, help="the JSON line `serve` printed")
    measure.add_argument("--repeats", type=int, default=20)
    measure.add_argument("--warmups", type=int, default=2)
    measure.add_argument("--blackhole-repeats", type=int, default=3)
    measure.add_argument("--original-blackhole-repeats", type=int, default=1)
    measure.add_argument("--request-timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        import uvloop

        uvloop.run(_serve(args.count, args.delay))
        return 0
    return _run_measure(args)


if __name__ == "__main__":
    # Run as a script: make `python bench/coordinator_fanout.py` find the repo's packages like `-m` would.
    sys.path.insert(0, os.fspath(REPO))
    sys.exit(main())
