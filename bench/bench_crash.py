"""Crash benchmark (SPEC 12): `kill -9` a node under a sustained POST /event load, start it again on the same
store, and count what became of every event answered 202: handled, lost, handled twice.

The node is the HTTP benchmark's (`python -m bench.apps.serve`: uvicorn, uvloop, httptools, pinned to CPU 0),
with its worker's handler appending each event id it handles to a file (`BENCH_HANDLED_LOG`; an O_APPEND write
reaches the kernel at once, so it survives the kill). It runs on the SQLite store and, as the baseline, on the
memory store. wrk posts on 64 connections (CPU 1) and writes every 202 body it gets to a file; after a few
seconds the node is killed with requests in flight, started again on the same store, and left to drain.
Prints `BENCH_ROW {json}` lines (rows of the runner's table) and a summary. `BENCH_QUICK=1` shortens the load.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script (bench/bench_crash.py) by the runner: the package's CPU pinning comes from bench.http_load.
sys.path.insert(0, str(REPO))
from bench.http_load import pinned  # noqa: E402

CONNECTIONS = 64


@dataclass
class CrashRun:
    """What one kill -9 did to the events of one store."""

    store: str
    accepted: int
    handled_before_kill: int
    lost: int
    duplicates: int
    in_flight_at_kill: int
    recovered: int
    drain_seconds: float


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _start(kind: str, port: int, store: Path, log: Path) -> subprocess.Popen[bytes]:
    app = "durable" if kind == "sqlite" else "node"
    cmd = [sys.executable, "-m", "bench.apps.serve", app, "--port", str(port), "--store", str(store)]
    env = {**os.environ, "BENCH_HANDLED_LOG": str(log)}
    proc = subprocess.Popen(
        pinned("server", cmd), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}")
        try:
            _get(port, "/health")
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the node did not answer within 60 s")


_WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = '{"payload": {"n": 1}}'
wrk.headers["Content-Type"] = "application/json"
local answers = io.open(os.getenv("BENCH_ACCEPTED_LOG"), "a")
answers:setvbuf("line")
response = function(status, headers, body)
  if status == 202 then answers:write(body, "\n") end
end
"""


def _load_then_kill(port: int, proc: subprocess.Popen[bytes], seconds: float, accepted_log: Path) -> list[str]:
    """wrk posts on 64 connections; after `seconds` the node is killed with requests in flight. Returns the event
    ids wrk saw answered 202 (its Lua hook writes every 202 body, line-buffered, to `accepted_log`)."""
    script = accepted_log.with_suffix(".lua")
    script.write_text(_WRK_SCRIPT)
    url = f"http://127.0.0.1:{port}/processes/worker/event"
    cmd = pinned("load", ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{int(seconds) + 2}s", "-s", str(script), url])
    env = {**os.environ, "BENCH_ACCEPTED_LOG": str(accepted_log)}
    wrk = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)  # the load's length: the kill lands in the middle of it, whatever the machine does
    proc.send_signal(signal.SIGKILL)
    wrk.wait(timeout=seconds + 60)
    lines = accepted_log.read_text().splitlines() if accepted_log.exists() else []
    return [json.loads(line)["event_id"] for line in lines if line.strip()]


def _drain(port: int, timeout: float = 120.0) -> tuple[dict[str, Any], float]:
    start = time.monotonic()
    while True:
        worker = _get(port, "/processes/worker/status")
        if worker["queue_size"] == worker["in_flight"] == 0 or time.monotonic() - start > timeout:
            return worker, time.monotonic() - start
        time.sleep(0.1)


def crash_once(kind: str, seconds: float) -> CrashRun:
    """Load a node on `kind` ("sqlite" or "memory"), kill -9 it, restart it on the same store, count."""
    with tempfile.TemporaryDirectory(prefix="bench-crash-") as tmp:
        store, log = Path(tmp) / "events.sqlite3", Path(tmp) / "handled.log"
        port = _free_port()
        proc = _start(kind, port, store, log)
        accepted = _load_then_kill(port, proc, seconds, Path(tmp) / "accepted.log")
        proc.wait(timeout=30)
        before = len(log.read_text().splitlines()) if log.exists() else 0
        port = _free_port()
        proc = _start(kind, port, store, log)
        try:
            worker, waited = _drain(port)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        handled = Counter(log.read_text().split()) if log.exists() else Counter()
        return CrashRun(
            store=kind,
            accepted=len(accepted),
            handled_before_kill=before,
            lost=len(set(accepted) - set(handled)),
            duplicates=sum(count - 1 for count in handled.values()),
            in_flight_at_kill=int(worker.get("events_redelivered", 0)),
            recovered=int(worker.get("events_recovered", 0)),
            drain_seconds=waited,
        )


def main() -> int:
    """Run the crash on both stores and print the rows."""
    if shutil.which("wrk") is None:
        print("wrk is not installed: no crash benchmark")
        return 0
    seconds = 2.0 if os.environ.get("BENCH_QUICK") else 5.0
    durable = crash_once("sqlite", seconds)
    memory = crash_once("memory", seconds)
    for run in (durable, memory):
        print(
            f"{run.store:6} store: {run.accepted} answered 202, {run.handled_before_kill} handled before the kill; "
            f"after the restart {run.recovered} recovered, {run.lost} lost, {run.duplicates} handled twice "
            f"({run.in_flight_at_kill} in flight in the store); drained in {run.drain_seconds:.1f} s"
        )
    rows = [
        {
            "metric": "kill -9 under POST /event load: 202s lost",
            "ours": f"{durable.lost} of {durable.accepted:,} (SQLite store)",
            "baseline": f"memory store: {memory.lost:,} of {memory.accepted:,}",
            "target": "0",
            "met": durable.lost == 0,
        },
        {
            "metric": "kill -9: handled twice",
            "ours": f"{durable.duplicates} ({durable.in_flight_at_kill} in flight at the kill)",
            "baseline": "-",
            "target": "<= in flight at the kill",
            "met": durable.duplicates <= durable.in_flight_at_kill,
        },
        {
            "metric": "kill -9: recovered and delivered after the restart",
            "ours": f"{durable.recovered:,} in {durable.drain_seconds:.1f} s",
            "baseline": f"memory store: {memory.recovered}",
            "target": "-",
        },
    ]
    for row in rows:
        print("BENCH_ROW " + json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
