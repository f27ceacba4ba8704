"""RuntimeTransport start-to-ready and stop times, ours and the original's (median of N, port 0, loopback).

Run as a plain script by either virtual environment: `python bench/transport_startup.py --impl ours|original`;
it prints one `BENCH_RESULT {json}` line. Each round builds a fresh runtime with two processes (outside the
timing), then times `await start()` until it returns, then a first GET /health answered 200 (so "ready" means
served, not just listening), then `await stop()`. Ours starts its runtime inside `start()` (it owns it, SPEC
section 5); the original's transport never touches the runtime, so its figure is the HTTP server alone.
`run_startup()` is what the runner calls. Standard library at import time; the implementations only inside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["run_startup"]

REPO = Path(__file__).resolve().parents[1]
NOT_BUILT_EXIT = 3


async def _first_health(port: int) -> None:
    """One GET /health on a fresh connection; raise unless it answers 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        if b" 200 " not in line:
            raise RuntimeError(f"GET /health answered {line!r}")
        await reader.read()
    finally:
        writer.close()


async def _handler(event: Any) -> None:
    """Does nothing: the benchmark is about the transport."""


async def _ours_transport() -> Any:
    from promptise_asgi.runtime import AgentRuntime, ProcessConfig
    from promptise_asgi.transport import RuntimeTransport

    runtime = AgentRuntime()
    await runtime.add_process("worker", ProcessConfig(handler=_handler))
    await runtime.add_process("idle", ProcessConfig())
    return RuntimeTransport(runtime, port=0, node_id="bench")


async def _original_transport() -> Any:
    from promptise.runtime import AgentRuntime, ProcessConfig
    from promptise.runtime.distributed.transport import RuntimeTransport as OriginalTransport
    from promptise.testing import ScriptedModel

    runtime = AgentRuntime()
    for name in ("worker", "idle"):
        model = ScriptedModel(["ok"], on_exhausted="repeat_last")
        await runtime.add_process(name, ProcessConfig(model=model, instructions="Handle the event."))
    return OriginalTransport(runtime, port=0, node_id="bench")


async def _measure(impl: str, rounds: int) -> dict[str, Any]:
    build = _ours_transport if impl == "ours" else _original_transport
    start_s: list[float] = []
    ready_s: list[float] = []
    stop_s: list[float] = []
    for _ in range(rounds):
        transport = await build()
        t0 = time.perf_counter()
        await transport.start()
        t1 = time.perf_counter()
        await _first_health(transport.port)
        t2 = time.perf_counter()
        await transport.stop()
        t3 = time.perf_counter()
        start_s.append(t1 - t0)
        ready_s.append(t2 - t0)
        stop_s.append(t3 - t2)
    return {
        "rounds": rounds,
        "start_median_s": statistics.median(start_s),
        "ready_median_s": statistics.median(ready_s),
        "stop_median_s": statistics.median(stop_s),
        "start_all_s": start_s,
        "stop_all_s": stop_s,
    }


def _run_measure(impl: str, rounds: int) -> int:
    try:
        if impl == "ours":
            import promptise_asgi.runtime
            import promptise_asgi.transport  # noqa: F401
        else:
            import promptise.runtime.distributed.transport  # noqa: F401
    except ImportError as exc:
        print(f"not built yet: {exc}", file=sys.stderr)
        return NOT_BUILT_EXIT
    import logging

    logging.basicConfig(level=logging.ERROR)
    if impl == "ours":
        import anyio

        result = anyio.run(_measure, impl, rounds, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        import uvloop

        result = uvloop.run(_measure(impl, rounds))
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


def _run_impl(python: str, impl: str, rounds: int) -> dict[str, Any]:
    from bench.http_load import pinned

    cmd = pinned("server", [python, "bench/transport_startup.py", "--impl", impl, "--rounds", str(rounds)])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode == NOT_BUILT_EXIT:
        return {"status": "n/a", "reason": "not built yet"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return {"status": "ok", **json.loads(line.removeprefix("BENCH_RESULT "))}
    return {"status": "error", "reason": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


def run_startup(rounds: int, main_python: str, original_python: str | None) -> dict[str, Any]:
    """Measure both implementations, each in its own interpreter pinned to CPU 0.

    Args:
        rounds: Start/stop cycles per implementation (medians are reported).
        main_python: The project's venv interpreter.
        original_python: The original's venv interpreter, or None.

    Returns:
        `{"ours": ..., "original": ...}`, each `{"status": "ok", "start_median_s", "ready_median_s",
        "stop_median_s", ...}` or `{"status": "n/a" or "error", "reason": ...}`.
    """
    results = {"ours": _run_impl(main_python, "ours", rounds)}
    if original_python is None:
        results["original"] = {"status": "n/a", "reason": "the original's venv could not be installed"}
    else:
        results["original"] = _run_impl(original_python, "original", rounds)
    return results


def main(argv: list[str] | None = None) -> int:
    """Measure one implementation and print `BENCH_RESULT {json}`.

    Args:
        argv: Arguments (default: `sys.argv[1:]`).

    Returns:
        The process exit code (3: the implementation is not built yet).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--impl", choices=["ours", "original"], required=True)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    return _run_measure(args.impl, args.rounds)


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(REPO))
    sys.exit(main())
