"""HTTP load on the node API with wrk, and the event path end to end, for ours, the ceiling and the original.

Ours runs twice: on the memory store ("ours") and on a SQLite store ("durable", POST /event only, the route the
store changes). Each server runs in its own process pinned to CPU 0 (`taskset -c 0`); wrk runs pinned to CPU 1
with one thread. For every route (GET /health, GET /processes, GET /status, POST /processes/worker/event) it does
a short warm-up
with few connections, then the measured run, and reads requests/s, p50/p99 latency and status counts from a wrk
Lua `done()` hook (machine-readable lines, no parsing of wrk's human output). The event route runs last on each
server; afterwards the node's GET /status is polled until its queues drain (with a deadline) and the events the
node handled are set against the 202s wrk counted. This module only drives processes and sockets: it does not
import promptise_asgi or promptise, so it runs whatever is built.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EVENT_PATH",
    "GET_PATHS",
    "LoadSettings",
    "NotBuiltError",
    "RouteResult",
    "pinned",
    "run_http_benchmarks",
]

REPO = Path(__file__).resolve().parents[1]
GET_PATHS = ("/health", "/processes", "/status")
EVENT_PATH = "/processes/worker/event"
EVENT_BODY = '{"payload": {"n": 1}}'
NOT_BUILT_EXIT = 3

_DONE_HOOK = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_SUMMARY requests=%.0f duration_us=%.0f bytes=%.0f connect=%.0f read=%.0f write=%.0f" ..
    " status=%.0f timeout=%.0f p50_us=%.0f p99_us=%.0f mean_us=%.3f max_us=%.0f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
  for _, t in ipairs(threads) do
    local c = t:get("codes")
    if c then
      for code, n in pairs(c) do io.write(string.format("BENCH_STATUS %d %d\n", code, n)) end
    end
  end
end
"""

_GET_SCRIPT = (
    r"""
threads = {}
setup = function(thread) table.insert(threads, thread) end
wrk.method = "GET"
"""
    + _DONE_HOOK
)

# The response() hook makes wrk hand every response to Lua; it is only on the event route (where per-status counts
# are the point), and the ceiling's event route runs the same script, so the ratio stays fair.
_POST_SCRIPT = (
    r"""
threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) codes = {} end
response = function(status, headers, body) codes[status] = (codes[status] or 0) + 1 end
wrk.method = "POST"
wrk.body = '"""
    + EVENT_BODY
    + r"""'
wrk.headers["Content-Type"] = "application/json"
"""
    + _DONE_HOOK
)


def pinned(role: str, cmd: list[str]) -> list[str]:
    """`cmd` pinned to the CPU of its role ("server": CPU 0, "load": CPU 1) and, as root, at nice -20.

    The high priority keeps other work on a shared machine (someone's test suite) from taking the benchmark's
    CPUs in the middle of a run; `BENCH_NICE=0` turns it off, `BENCH_SERVER_CPU`/`BENCH_LOAD_CPU` move the pins.

    Args:
        role: "server" or "load".
        cmd: The command line.

    Returns:
        The command line wrapped in taskset (and nice).
    """
    cpu = os.environ.get("BENCH_SERVER_CPU", "0") if role == "server" else os.environ.get("BENCH_LOAD_CPU", "1")
    wrapped = ["taskset", "-c", cpu, *cmd]
    niceness = os.environ.get("BENCH_NICE", "-20" if os.geteuid() == 0 else "0")
    if niceness not in ("", "0"):
        wrapped = ["nice", "-n", niceness, *wrapped]
    return wrapped


class NotBuiltError(RuntimeError):
    """The server could not be built because the code it serves does not exist yet."""


@dataclass
class LoadSettings:
    """How long and how hard each route is loaded.

    Attributes:
        warmup_seconds: Duration of the warm-up run (its figures are discarded, its 202s are counted).
        quiet_wait: Before each measured run, wait up to this many seconds for both CPUs to be nearly idle
            (other work on a shared machine skews a ratio); 0 measures at once. The share of each CPU used by
            other processes during the run is recorded either way.
        warmup_connections: Connections during the warm-up.
        duration_seconds: Duration of the measured run.
        connections: Connections during the measured run.
        drain_timeout: Seconds to wait for a node's queues to drain after the event load.
        ready_timeout: Seconds to wait for a server to answer GET /health after it is launched.
    """

    warmup_seconds: int = 2
    quiet_wait: float = 0.0
    warmup_connections: int = 2
    duration_seconds: int = 10
    connections: int = 64
    drain_timeout: float = 30.0
    ready_timeout: float = 60.0


@dataclass
class RouteResult:
    """One measured wrk run.

    Attributes:
        route: "GET /health" and so on.
        requests_per_second: Completed requests divided by the run's duration.
        p50_ms: Median latency in milliseconds.
        p99_ms: 99th percentile latency in milliseconds.
        requests: Completed requests.
        non_2xx: Responses that were not 2xx/3xx, as wrk counts them.
        socket_errors: connect + read + write + timeout errors.
        statuses: Status code -> count (event route only).
    """

    route: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    statuses: dict[int, int] = field(default_factory=dict)
    foreign_cpu_server_pct: float = 0.0
    foreign_cpu_load_pct: float = 0.0


@dataclass
class _WrkRun:
    summary: dict[str, float]
    statuses: dict[int, int]
    wrk_cpu_seconds: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(port: int, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _get_json(port: int, path: str) -> Any:
    status, body = _http(port, "GET", path)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {body[:200]!r}")
    return json.loads(body)


@contextlib.contextmanager
def _server(
    cmd: list[str], port: int, ready_timeout: float, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server pinned to the server CPU until GET /health answers 200; stop it on exit."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below, after the server is gone
    proc = subprocess.Popen(
        pinned("server", cmd),
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            code = proc.poll()
            if code is not None:
                log.seek(0)
                output = log.read().decode(errors="replace").strip()
                if code == NOT_BUILT_EXIT:
                    raise NotBuiltError(output.splitlines()[-1] if output else "not built yet")
                raise RuntimeError(f"server exited with {code}: {output[-2000:]}")
            with contextlib.suppress(OSError):
                if _http(port, "GET", "/health", timeout=1.0)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout} s")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _wrk(port: int, path: str, script: str, connections: int, seconds: int) -> _WrkRun:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        script_path = f.name
    try:
        url = f"http://127.0.0.1:{port}{path}"
        cmd = pinned("load", ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script_path, url])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(script_path)
    summary: dict[str, float] = {}
    statuses: dict[int, int] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_SUMMARY "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                summary[key] = float(value)
        elif line.startswith("BENCH_STATUS "):
            _, code, count = line.split()
            statuses[int(code)] = statuses.get(int(code), 0) + int(count)
    if proc.returncode != 0 or not summary:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return _WrkRun(summary, statuses, wrk_cpu)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_busy() -> dict[str, float]:
    """Busy seconds per CPU since boot ("cpu0" -> ...), from /proc/stat."""
    busy: dict[str, float] = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                busy[name] = (user + nice + system + irq + softirq + steal) / _TICK
    return busy


def _process_cpu(pid: int) -> float:
    """CPU seconds a running process has used (user + system, all threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _server_cpu_name() -> str:
    return "cpu" + os.environ.get("BENCH_SERVER_CPU", "0")


def _load_cpu_name() -> str:
    return "cpu" + os.environ.get("BENCH_LOAD_CPU", "1")


def _wait_quiet(limit: float) -> None:
    """Wait (at most `limit` seconds) until neither benchmark CPU is more than 10% busy with other work."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = _cpu_busy()
        time.sleep(0.5)
        after = _cpu_busy()
        busiest = max(after[c] - before[c] for c in (_server_cpu_name(), _load_cpu_name())) / 0.5
        if busiest < 0.10:
            return


def _route_result(route: str, run: _WrkRun) -> RouteResult:
    s = run.summary
    return RouteResult(
        route=route,
        requests_per_second=s["requests"] / (s["duration_us"] / 1e6),
        p50_ms=s["p50_us"] / 1000.0,
        p99_ms=s["p99_us"] / 1000.0,
        requests=int(s["requests"]),
        non_2xx=int(s["status"]),
        socket_errors=int(s["connect"] + s["read"] + s["write"] + s["timeout"]),
        statuses=run.statuses,
    )


def _load_route(port: int, method: str, path: str, settings: LoadSettings) -> tuple[RouteResult, dict[int, int]]:
    """Warm up then measure one route; return the measured result and the warm-up's status counts."""
    script = _POST_SCRIPT if method == "POST" else _GET_SCRIPT
    warm = _wrk(port, path, script, settings.warmup_connections, settings.warmup_seconds)
    run = _wrk(port, path, script, settings.connections, settings.duration_seconds)
    return _route_result(f"{method} {path}", run), warm.statuses


def _event_counts(kind: str, status: dict[str, Any]) -> dict[str, int]:
    """Handled / queued / dead-lettered events on the worker process, from a node's GET /status body."""
    worker = status["processes"]["worker"]
    if kind == "original":
        return {
            "handled": int(worker.get("invocation_count", 0)),
            "queued": int(worker.get("queue_size", 0)),
            "dead_lettered": int(worker.get("dead_letter_count", 0)),
            "received": -1,
        }
    return {
        "handled": int(worker.get("events_handled", 0)) + int(worker.get("events_failed", 0)),
        "queued": int(worker.get("queue_size", 0)),
        "dead_lettered": 0,
        "received": int(worker.get("events_received", -1)),
    }


def _drain(kind: str, port: int, timeout: float) -> tuple[dict[str, int], float]:
    """Poll GET /status until the worker's queue is empty and its handled count stops moving, or the deadline."""
    start = time.monotonic()
    previous: dict[str, int] | None = None
    while True:
        counts = _event_counts(kind, _get_json(port, "/status"))
        settled = previous is not None and counts["handled"] == previous["handled"]
        if counts["queued"] == 0 and settled:
            return counts, time.monotonic() - start
        if time.monotonic() - start > timeout:
            return counts, time.monotonic() - start
        previous = counts
        time.sleep(0.25)


def _event_path(kind: str, port: int, statuses: dict[int, int], settings: LoadSettings) -> dict[str, Any]:
    """Set the node's handled events against every 202 wrk saw on it (warm-ups and measured runs together)."""
    accepted = statuses.get(202, 0)
    refused = statuses.get(429, 0)
    counts, waited = _drain(kind, port, settings.drain_timeout)
    total = sum(statuses.values())
    # wrk stops with up to `connections` requests in flight: the node may have accepted those too, so handled can
    # exceed the 202s wrk saw by that much. Loss is a 202 that wrk saw and the node neither handled, queued nor
    # dead-lettered: it is gone without a trace.
    lost = max(0, accepted - counts["handled"] - counts["queued"] - counts["dead_lettered"])
    return {
        "accepted_202": accepted,
        "refused_429": refused,
        "other_statuses": {str(c): n for c, n in statuses.items() if c not in (202, 429)},
        "responses": total,
        "share_429": refused / total if total else 0.0,
        "handled": counts["handled"],
        "still_queued": counts["queued"],
        "dead_lettered_visible": counts["dead_lettered"],
        "received_by_node": counts["received"],
        "lost": lost,
        "lost_share": lost / accepted if accepted else 0.0,
        "drain_seconds": waited,
        "drained": counts["queued"] == 0,
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class _Target:
    kind: str
    port: int
    pid: int
    only_events: bool = False  # measured on POST /event alone
    runs: dict[str, list[RouteResult]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    event_path: dict[str, Any] | None = None


def _measure(target: _Target, method: str, path: str, settings: LoadSettings, warm_up: bool) -> None:
    script = _POST_SCRIPT if method == "POST" else _GET_SCRIPT
    statuses: dict[int, int] = {}
    if warm_up:
        statuses = _wrk(target.port, path, script, settings.warmup_connections, settings.warmup_seconds).statuses
    if settings.quiet_wait > 0:
        _wait_quiet(settings.quiet_wait)
    cpu_before, server_before, started = _cpu_busy(), _process_cpu(target.pid), time.monotonic()
    run = _wrk(target.port, path, script, settings.connections, settings.duration_seconds)
    cpu_after, server_after, elapsed = _cpu_busy(), _process_cpu(target.pid), time.monotonic() - started
    result = _route_result(f"{method} {path}", run)
    # What other processes took from our two CPUs during the run: busy time not spent by the server or by wrk.
    server_cpu, load_cpu = _server_cpu_name(), _load_cpu_name()
    foreign_server = cpu_after[server_cpu] - cpu_before[server_cpu] - (server_after - server_before)
    foreign_load = cpu_after[load_cpu] - cpu_before[load_cpu] - run.wrk_cpu_seconds
    result.foreign_cpu_server_pct = max(0.0, 100 * foreign_server / elapsed)
    result.foreign_cpu_load_pct = max(0.0, 100 * foreign_load / elapsed)
    target.runs.setdefault(result.route, []).append(result)
    _progress(f"  {target.kind:9} {result.route:30} {result.requests_per_second:8.0f} req/s  "
              f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  other work on CPUs: "
              f"{result.foreign_cpu_server_pct:.0f}% / {result.foreign_cpu_load_pct:.0f}%")  # fmt: skip
    if method != "POST":
        return
    for code, count in [*statuses.items(), *result.statuses.items()]:
        target.statuses[code] = target.statuses.get(code, 0) + count
    if target.kind == "ceiling":
        return
    # Drain before anything else is measured: a node still working off its queue would steal the server CPU.
    target.event_path = _event_path(target.kind, target.port, target.statuses, settings)
    ep = target.event_path
    _progress(f"  {target.kind:9} event path: 202={ep['accepted_202']} handled={ep['handled']} "
              f"429={ep['refused_429']} lost={ep['lost']} (drained in {ep['drain_seconds']:.1f} s)")  # fmt: skip


def _summary(target: _Target, ceiling: _Target | None) -> dict[str, Any]:
    """Medians over the rounds per route, and the median of the per-round ratios to the ceiling.

    Throughput on a shared virtual machine moves by 10-20% from one run to the next even with nothing else on
    its CPUs; a ratio taken between two runs made back to back in the same round moves much less, so the ratio
    reported is the median of those paired ratios, not the ratio of two medians.
    """
    routes = {}
    for route, runs in target.runs.items():
        summary: dict[str, Any] = {
            "route": route,
            "requests_per_second": statistics.median(r.requests_per_second for r in runs),
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "non_2xx": sum(r.non_2xx for r in runs),
            "socket_errors": sum(r.socket_errors for r in runs),
            "foreign_cpu_server_pct": max(r.foreign_cpu_server_pct for r in runs),
            "foreign_cpu_load_pct": max(r.foreign_cpu_load_pct for r in runs),
            "rounds": [asdict(r) for r in runs],
        }
        base = ceiling.runs.get(route) if ceiling is not None and ceiling is not target else None
        if base:
            pairs = [r.requests_per_second / b.requests_per_second for r, b in zip(runs, base, strict=False)]
            summary["ratio_to_ceiling"] = statistics.median(pairs)
            summary["ratios_per_round"] = pairs
        routes[route] = summary
    out: dict[str, Any] = {"status": "ok", "routes": routes}
    if target.event_path is not None:
        out["event_path"] = target.event_path
    elif target.statuses:
        out["event_statuses"] = {str(c): n for c, n in target.statuses.items()}
    return out


def run_http_benchmarks(
    settings: LoadSettings, main_python: str, original_python: str | None, rounds: int = 1
) -> dict[str, Any]:
    """Measure ours, the ceiling and the original on the same machine, route by route, back to back.

    All servers run at once on the server CPU (an idle one costs nothing); for each route they are loaded one
    after the other, and with several rounds the order rotates and the best round counts, so a burst of other work
    on the machine does not decide a ratio.

    Args:
        settings: Durations and connection counts.
        main_python: The interpreter of the project's venv (has uvicorn, uvloop, httptools, promptise_asgi).
        original_python: The interpreter of the original's venv, or None when it could not be installed.
        rounds: How many times every route is measured on every server.

    Returns:
        `{"ours": ..., "durable": ..., "ceiling": ..., "original": ...}`, each `{"status": "ok", "routes",
        "event_path"}` or
        `{"status": "n/a" or "error", "reason": ...}`, plus `"ceiling_bodies"` saying where the ceiling's GET
        bodies came from.
    """
    if shutil.which("wrk") is None:
        reason = "wrk is not installed"
        return {k: {"status": "n/a", "reason": reason} for k in ("ours", "durable", "ceiling", "original")}
    results: dict[str, Any] = {}
    targets: list[_Target] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        bodies = Path(tmp) / "bodies.json"
        port = _free_port()
        try:
            cmd = [main_python, "-m", "bench.apps.serve", "node", "--port", str(port)]
            proc = stack.enter_context(_server(cmd, port, settings.ready_timeout))
            bodies.write_text(json.dumps({p: _http(port, "GET", p)[1].decode() for p in GET_PATHS}))
            targets.append(_Target("ours", port, proc.pid))
        except NotBuiltError as exc:
            results["ours"] = {"status": "n/a", "reason": f"not built yet ({exc})"}
        except RuntimeError as exc:
            results["ours"] = {"status": "error", "reason": str(exc)}
        port = _free_port()
        try:
            store = Path(tmp) / "durable.sqlite3"
            cmd = [main_python, "-m", "bench.apps.serve", "durable", "--port", str(port), "--store", str(store)]
            proc = stack.enter_context(_server(cmd, port, settings.ready_timeout))
            targets.append(_Target("durable", port, proc.pid, only_events=True))
        except NotBuiltError as exc:
            results["durable"] = {"status": "n/a", "reason": f"not built yet ({exc})"}
        except RuntimeError as exc:
            results["durable"] = {"status": "error", "reason": str(exc)}
        results["ceiling_bodies"] = "captured from ours" if bodies.exists() else "built-in (SPEC section 3 shapes)"
        port = _free_port()
        env = {"BENCH_BODIES": str(bodies)} if bodies.exists() else {}
        try:
            cmd = [main_python, "-m", "bench.apps.serve", "bare", "--port", str(port)]
            proc = stack.enter_context(_server(cmd, port, settings.ready_timeout, env))
            targets.insert(0, _Target("ceiling", port, proc.pid))
        except RuntimeError as exc:
            results["ceiling"] = {"status": "error", "reason": str(exc)}
        if original_python is None:
            results["original"] = {"status": "n/a", "reason": "the original's venv could not be installed"}
        else:
            port = _free_port()
            try:
                cmd = [original_python, "bench/apps/original.py", "--port", str(port)]
                proc = stack.enter_context(_server(cmd, port, settings.ready_timeout))
                targets.append(_Target("original", port, proc.pid))
            except RuntimeError as exc:
                results["original"] = {"status": "error", "reason": str(exc)}
        routes = [("GET", p) for p in GET_PATHS] + [("POST", EVENT_PATH)]
        for round_index in range(rounds):
            order = targets[round_index % len(targets) :] + targets[: round_index % len(targets)] if targets else []
            for method, path in routes:
                for target in order:
                    if target.only_events and method != "POST":
                        continue
                    try:
                        # A server is warm after the first round; later rounds skip the warm-up.
                        _measure(target, method, path, settings, warm_up=round_index == 0)
                    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                        results[target.kind] = {"status": "error", "reason": f"{method} {path}: {exc}"}
            targets = [t for t in targets if t.kind not in results]
        ceiling = next((t for t in targets if t.kind == "ceiling"), None)
        for target in targets:
            results[target.kind] = _summary(target, ceiling)
    return results
