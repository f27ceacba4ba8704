"""The benchmark runner: `python -m bench [--quick] [--only http,fanout,startup,registry]`, one table at the end.

Runs each benchmark (HTTP load and event path on the memory and the SQLite store, coordinator fan-out,
transport start/stop, and any other `bench/bench_*.py` script as a subprocess, such as the kill -9 one in
`bench_crash.py`), prints one table of figures next to their baselines and SPEC section
10 targets, and writes the raw results to `bench/results/latest.json`. A part whose code is not built yet shows
"n/a (not built yet)" instead of failing the run. Progress goes to stderr, the table to stdout.
Durations: `--quick` for a short run; `BENCH_DURATION`, `BENCH_WARMUP`, `BENCH_CONNECTIONS`, `BENCH_ROUNDS`,
`BENCH_REPEATS`, `BENCH_STARTUP_ROUNDS`, `BENCH_REQUEST_TIMEOUT` (or the matching flags) override either preset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.coordinator_fanout import FanoutSettings, run_fanout
from bench.http_load import EVENT_PATH, LoadSettings, run_http_benchmarks
from bench.transport_startup import run_startup

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "latest.json"
ORIGINAL_PYTHON = REPO / "bench" / ".venv-original" / "bin" / "python"
PARTS = ("http", "fanout", "startup", "registry")
NA = "n/a"


@dataclass
class Settings:
    """Everything the run is parametrised by (both presets, then environment, then flags)."""

    quick: bool
    warmup: int
    duration: int
    connections: int
    rounds: int
    repeats: int
    blackhole_repeats: int
    startup_rounds: int
    request_timeout: float
    quiet_wait: float


def _settings(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    preset = (
        {"warmup": 1, "duration": 2, "connections": 64, "rounds": 2, "repeats": 7, "blackhole": 1, "startup": 5}
        if quick
        else {"warmup": 2, "duration": 5, "connections": 64, "rounds": 4, "repeats": 20, "blackhole": 3, "startup": 10}
    )

    def pick(flag: Any, env: str, default: Any, kind: type) -> Any:
        if flag is not None:
            return kind(flag)
        if os.environ.get(env):
            return kind(os.environ[env])
        return default

    return Settings(
        quick=quick,
        warmup=pick(args.warmup, "BENCH_WARMUP", preset["warmup"], int),
        duration=pick(args.duration, "BENCH_DURATION", preset["duration"], int),
        connections=pick(args.connections, "BENCH_CONNECTIONS", preset["connections"], int),
        rounds=pick(args.rounds, "BENCH_ROUNDS", preset["rounds"], int),
        repeats=pick(args.repeats, "BENCH_REPEATS", preset["repeats"], int),
        blackhole_repeats=preset["blackhole"],
        startup_rounds=pick(args.startup_rounds, "BENCH_STARTUP_ROUNDS", preset["startup"], int),
        request_timeout=pick(args.request_timeout, "BENCH_REQUEST_TIMEOUT", 1.0, float),
        quiet_wait=pick(args.quiet_wait, "BENCH_QUIET_WAIT", 0.0 if quick else 2.0, float),
    )


# --------------------------------------------------------------------------------------------------------------
# other bench/bench_*.py scripts
# --------------------------------------------------------------------------------------------------------------

_TARGET_LINE = re.compile(r"^(?P<metric>.+?) = (?P<value>.+?) \(target (?P<target>.+?)\): (?P<verdict>OK|MISSED)\s*$")
_SECTION = re.compile(r"\bon (asyncio|trio)\b")


def _rows_from_output(script: str, output: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    section = ""
    for line in output.splitlines():
        if line.startswith("BENCH_ROW "):
            rows.append(json.loads(line.removeprefix("BENCH_ROW ")))
            continue
        found = _SECTION.search(line)
        if found:
            section = f" ({found.group(1)})"
        match = _TARGET_LINE.match(line.strip())
        if match:
            rows.append(
                {
                    "metric": f"{match['metric']}{section}",
                    "ours": match["value"],
                    "target": match["target"],
                    "met": match["verdict"] == "OK",
                }
            )
    return rows


def run_other_scripts(quick: bool) -> dict[str, Any]:
    """Run every other `bench/bench_*.py` with the project's interpreter and collect its output and rows."""
    results: dict[str, Any] = {}
    for path in sorted((REPO / "bench").glob("bench_*.py")):
        cmd = [sys.executable, str(path.relative_to(REPO))]
        # The registry benchmark runs on both anyio backends by default; one is enough for a quick look.
        if quick and "--backend" in path.read_text(encoding="utf-8"):
            cmd += ["--backend", "asyncio"]
        _progress(f"running {' '.join(cmd[1:])} ...")
        start = time.monotonic()
        env = {**os.environ, "BENCH_QUICK": "1" if quick else ""}
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, check=False)
        except subprocess.TimeoutExpired:
            results[path.name] = {"status": "error", "reason": "timed out after 600 s", "rows": []}
            continue
        entry: dict[str, Any] = {
            "status": "ok" if proc.returncode == 0 else "error",
            "seconds": time.monotonic() - start,
            "output": proc.stdout,
            "rows": _rows_from_output(path.name, proc.stdout),
        }
        if proc.returncode != 0:
            entry["reason"] = f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}"
        results[path.name] = entry
    return results


# --------------------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------------------


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _met(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def _na(part: dict[str, Any] | None) -> str:
    if not part:
        return "-"
    reason = str(part.get("reason", ""))
    if "not built" in reason:
        return "n/a (not built yet)"
    if part.get("status") == "error":
        return "error (see json)"
    return NA


def _ok(part: dict[str, Any] | None) -> bool:
    return bool(part) and part.get("status") == "ok"  # type: ignore[union-attr]


_TARGETS = {"GET /health": 0.8, f"POST {EVENT_PATH}": 0.5}
DURABLE_TARGET = 0.4  # SPEC 12: POST /event on the SQLite store, against the same ceiling


def _http_rows(http: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    ours, ceiling, original = http.get("ours"), http.get("ceiling"), http.get("original")
    routes = ["GET /health", "GET /processes", "GET /status", f"POST {EVENT_PATH}"]

    def route_of(part: dict[str, Any] | None, route: str) -> dict[str, Any] | None:
        return part["routes"].get(route) if part is not None and _ok(part) else None

    for route in routes:
        o, c, g = route_of(ours, route), route_of(ceiling, route), route_of(original, route)
        o_rps = o["requests_per_second"] if o else None
        c_rps = c["requests_per_second"] if c else None
        g_rps = g["requests_per_second"] if g else None
        o_ratio = o.get("ratio_to_ceiling") if o else None
        g_ratio = g.get("ratio_to_ceiling") if g else None
        target = _TARGETS.get(route)
        met = None if target is None or o_ratio is None else o_ratio >= target
        name = route.replace(EVENT_PATH, "/event")
        rows.append(
            [
                f"{name} req/s",
                _num(o_rps) if o_rps is not None else _na(ours),
                _num(c_rps) if c_rps is not None else _na(ceiling),
                f"{_num(g_rps)} ({g_ratio:.2f}x)" if g_rps is not None and g_ratio else _na(original),
                f"{o_ratio:.2f}x" if o_ratio else "-",
                f">= {target}x ceiling" if target else "-",
                _met(met),
            ]
        )

        def lat(r: dict[str, Any] | None, part: dict[str, Any] | None) -> str:
            return f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}" if r else _na(part)

        rows.append([f"{name} p50 / p99 ms", lat(o, ours), lat(c, ceiling), lat(g, original), "-", "-", "-"])
        noise = [r for r in (o, c, g) if r]
        if noise:
            worst = max(max(r["foreign_cpu_server_pct"], r["foreign_cpu_load_pct"]) for r in noise)
            if worst >= 10:
                cells = [f"{r['foreign_cpu_server_pct']:.0f}% / {r['foreign_cpu_load_pct']:.0f}%" if r else "-"
                         for r in (o, c, g)]  # fmt: skip
                rows.append([f"{name} other work on CPU0/CPU1", *cells, "-", "< 10% (quiet machine)", "NO"])
        errors = [f"{k}: {r['non_2xx']} non-2xx" for k, r in (("ours", o), ("ceiling", c), ("original", g))
                  if r and r["non_2xx"] and route != f"POST {EVENT_PATH}"]  # fmt: skip
        if errors:
            rows.append([f"{name} errors", "; ".join(errors), "", "", "", "none", "NO"])
    return rows + _durable_rows(http)


def _durable_rows(http: dict[str, Any]) -> list[list[str]]:
    """POST /event on the SQLite store, beside the same ceiling (the memory store's row is above)."""
    durable, ceiling = http.get("durable"), http.get("ceiling")
    route = f"POST {EVENT_PATH}"
    d = durable["routes"].get(route) if durable is not None and _ok(durable) else None
    c = ceiling["routes"].get(route) if ceiling is not None and _ok(ceiling) else None
    ratio = d.get("ratio_to_ceiling") if d else None
    return [
        [
            "POST /event, SQLite store req/s",
            _num(d["requests_per_second"]) if d else _na(durable),
            _num(c["requests_per_second"]) if c else _na(ceiling),
            "-",
            f"{ratio:.2f}x" if ratio else "-",
            f">= {DURABLE_TARGET}x ceiling",
            _met(None if ratio is None else ratio >= DURABLE_TARGET),
        ],
        [
            "POST /event, SQLite store p50 / p99 ms",
            f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}" if d else _na(durable),
            f"{c['p50_ms']:.2f} / {c['p99_ms']:.2f}" if c else _na(ceiling),
            "-",
            "-",
            "-",
            "-",
        ],
    ]


def _event_rows(http: dict[str, Any]) -> list[list[str]]:
    ours, original = http.get("ours"), http.get("original")
    o = ours.get("event_path") if _ok(ours) else None  # type: ignore[union-attr]
    g = original.get("event_path") if _ok(original) else None  # type: ignore[union-attr]

    def accepted(e: dict[str, Any] | None, part: dict[str, Any] | None) -> str:
        if not e:
            return _na(part)
        pending = f", {e['still_queued']} still queued" if e["still_queued"] else ""
        return f"{_num(e['accepted_202'])} / {_num(e['handled'])}{pending}"

    def share(e: dict[str, Any] | None, part: dict[str, Any] | None) -> str:
        return f"{e['share_429'] * 100:.1f}% of {_num(e['responses'])}" if e else _na(part)

    def lost(e: dict[str, Any] | None, part: dict[str, Any] | None) -> str:
        if not e:
            return _na(part)
        visible = f", {e['dead_lettered_visible']} dead-lettered" if e["dead_lettered_visible"] else ""
        return f"{_num(e['lost'])} ({e['lost_share'] * 100:.1f}%){visible}"

    equal = None if not o else (o["handled"] >= o["accepted_202"] and o["drained"])
    none_lost = None if not o else o["lost"] == 0
    durable = http.get("durable")
    d = durable.get("event_path") if _ok(durable) else None  # type: ignore[union-attr]
    d_equal = None if not d else (d["handled"] >= d["accepted_202"] and d["drained"])
    return [
        ["events 202 / handled", accepted(o, ours), "-", accepted(g, original), "-", "every 202 handled", _met(equal)],
        ["events refused 429", share(o, ours), "-", share(g, original), "-", "overload -> 429", "-"],
        ["events lost (202, then gone)", lost(o, ours), "-", lost(g, original), "-", "0", _met(none_lost)],
        ["SQLite store: events 202 / handled", accepted(d, durable), "-", "-", "-", "every 202 handled", _met(d_equal)],
        ["SQLite store: events refused 429", share(d, durable), "-", "-", "-", "overload -> 429", "-"],
        ["SQLite store: events lost", lost(d, durable), "-", "-", "-", "0", _met(None if not d else d["lost"] == 0)],
    ]  # fmt: skip


def _fanout_rows(fan: dict[str, Any]) -> list[list[str]]:
    ours, original = fan.get("ours"), fan.get("original")
    o = ours if _ok(ours) else None
    g = original if _ok(original) else None

    def scen(part: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
        return part["scenarios"].get(key) if part else None

    def ms(s: dict[str, Any] | None, whole: dict[str, Any] | None, expect: int | None = None) -> str:
        if not s:
            return _na(whole)
        text = f"{s['median_s'] * 1000:.2f} ms"
        if expect is not None and s["healthy_nodes"] != expect:
            text += f" (only {s['healthy_nodes']}/{expect} healthy!)"
        return text

    rows: list[list[str]] = []
    for size in (1, 10, 100):
        so, sg = scen(o, f"instant_{size}"), scen(g, f"instant_{size}")
        per_o = so["median_s"] * 1000 / size if so else None
        per_g = sg["median_s"] * 1000 / size if sg else None
        target = "per node <= original" if size == 100 else "-"
        met = None if size != 100 or per_o is None or per_g is None else per_o <= per_g
        rows.append(
            [
                f"cluster_status {size} instant node(s)",
                ms(so, ours, size) + (f" = {per_o:.3f} ms/node" if per_o else ""),
                "-",
                ms(sg, original, size) + (f" = {per_g:.3f} ms/node" if per_g else ""),
                _ratio(per_o, per_g) + " of orig" if per_o and per_g else "-",
                target,
                _met(met),
            ]
        )
    delay_ms = fan.get("delay_s", 0.02) * 1000
    for size in (1, 10, 100):
        so, sg = scen(o, f"delayed_{size}"), scen(g, f"delayed_{size}")
        ro = so["median_s"] * 1000 / delay_ms if so else None
        rg = sg["median_s"] * 1000 / delay_ms if sg else None
        rows.append(
            [
                f"cluster_status {size} x {delay_ms:.0f} ms node(s)",
                ms(so, ours, size),
                f"{delay_ms:.0f} ms",
                ms(sg, original, size) + (f" ({rg:.2f}x)" if rg else ""),
                f"{ro:.2f}x" if ro else "-",
                "<= 1.5x (one node)" if size == 100 else "-",
                _met(None if size != 100 or ro is None else ro <= 1.5),
            ]
        )
    so, sg = scen(o, "blackhole_100"), scen(g, "blackhole_100")
    timeout = fan.get("request_timeout", 1.0)
    over = so["median_s"] - timeout if so else None
    rows.append(
        [
            "cluster_status 99 + 1 black-holed",
            f"{so['median_s']:.3f} s" if so else _na(ours),
            f"timeout {timeout:.1f} s",
            f"{sg['median_s']:.3f} s (fixed 10 s)" if sg else _na(original),
            f"+{over:.3f} s" if over is not None else "-",
            "<= timeout + 0.2 s",
            _met(None if over is None else over <= 0.2),
        ]
    )
    return rows


def _startup_rows(st: dict[str, Any]) -> list[list[str]]:
    ours, original = st.get("ours"), st.get("original")
    o = ours if _ok(ours) else None
    g = original if _ok(original) else None
    rows = []
    for key, label in (("start_median_s", "start()"), ("ready_median_s", "start() to first /health 200"),
                       ("stop_median_s", "stop()")):  # fmt: skip
        vo = o[key] * 1000 if o else None
        vg = g[key] * 1000 if g else None
        rows.append(
            [
                f"RuntimeTransport {label}",
                f"{vo:.2f} ms" if vo is not None else _na(ours),
                "-",
                f"{vg:.2f} ms" if vg is not None else _na(original),
                _ratio(vo, vg) + " of orig" if vo is not None and vg is not None else "-",
                "-",
                "-",
            ]
        )
    return rows


def _other_rows(others: dict[str, Any]) -> list[list[str]]:
    rows = []
    for script, entry in others.items():
        if entry.get("status") != "ok" and not entry.get("rows"):
            rows.append([script, f"error: {entry.get('reason', '')[:60]}", "-", "-", "-", "-", "-"])
        for row in entry.get("rows", []):
            met = row.get("met")
            rows.append(
                [
                    str(row.get("metric", "?")),
                    str(row.get("ours", "-")),
                    str(row.get("baseline", "-")),
                    str(row.get("original", "-")),
                    str(row.get("ratio", "-")),
                    str(row.get("target", "-")),
                    _met(met if isinstance(met, bool) else None),
                ]
            )
    return rows


def render(results: dict[str, Any]) -> str:
    """The one table, with a section header per benchmark.

    Args:
        results: What `run` collected.

    Returns:
        The table as text.
    """
    header = list(HEADER)
    sections = table_sections(results)
    all_rows = [header] + [row for _, rows in sections for row in rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()

    out = [line(header), "-+-".join("-" * w for w in widths)]
    for title, rows in sections:
        out.append(f"[{title}]")
        out.extend(line(row) for row in rows)
    return "\n".join(out)


HEADER = ("metric", "ours", "ceiling / baseline", "original", "ratio", "SPEC target", "met?")


def table_sections(results: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """The table's sections: a title and its rows (cells in `HEADER` order)."""
    sections: list[tuple[str, list[list[str]]]] = []
    if "http" in results:
        title = "node API under HTTP load (wrk; medians of rounds; ratio = median of per-round ours / ceiling)"
        sections.append((title, _http_rows(results["http"])))
        sections.append(("event path end to end (all POST /event runs)", _event_rows(results["http"])))
    if "fanout" in results:
        sections.append(("coordinator fan-out (median)", _fanout_rows(results["fanout"])))
    if "startup" in results:
        sections.append(("transport start/stop (median)", _startup_rows(results["startup"])))
    if results.get("others"):
        sections.append(("other benchmark scripts", _other_rows(results["others"])))
    return sections


# --------------------------------------------------------------------------------------------------------------
# the figures the README and the performance page show (written from a full run, never copied by hand)
# --------------------------------------------------------------------------------------------------------------

SUMMARY = REPO / "bench" / "results" / "summary.md"
CURVE = REPO / "bench" / "results" / "curve.md"
README = REPO / "README.md"
README_START = "<!-- latest figures: written by scripts/bench from a full run -->"
README_END = "<!-- end of latest figures -->"
# The rows the README shows, by metric: one per SPEC target a reader asks about first.
SUMMARY_METRICS = (
    "GET /health req/s",
    "POST /event req/s",
    "POST /event, SQLite store req/s",
    "events lost (202, then gone)",
    "kill -9 under POST /event load: 202s lost",
    "coordinator CPU, 10,000 nodes heartbeating every 10 s",
    "GET /cluster/status?limit=100, 10,000 nodes, p50 / p99",
    "full cluster status, 10,000 nodes",
    "one change reaches 100 stream readers (median of 20)",
    "node RSS, 1,000 distinct 48 KB Hosts + 1 MiB headers",
)
_SIZED = re.compile(r"^(?P<what>.*?),? (?P<size>[\d,]+) nodes(?P<rest>.*)$")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def summary_markdown(results: dict[str, Any]) -> str:
    """The README's table: the headline rows of the run, ours beside the ratio, target and verdict."""
    rows = {row[0]: row for _, section in table_sections(results) for row in section}
    lines = ["| measured | ours | ratio | target | met? |", "|---|---|---|---|---|"]
    for metric in SUMMARY_METRICS:
        row = rows.get(metric)
        if row is not None:
            lines.append(f"| {_cell(metric)} | {_cell(row[1])} | {_cell(row[4])} | {_cell(row[5])} | {row[6]} |")
    return "\n".join(lines) + "\n"


def curve_markdown(results: dict[str, Any]) -> str:
    """The coordinator at 1k/10k/50k nodes (bench_scale's rows), one line per size."""
    columns = {
        "coordinator CPU": "coordinator CPU",
        "GET /cluster/status?limit=100": "`GET /cluster/status?limit=100` p50 / p99",
        "full cluster status": "full status",
        "coordinator memory per node": "memory per node",
    }
    sizes: dict[str, dict[str, str]] = {}
    original: dict[str, str] = {}
    for _, section in table_sections(results):
        for row in section:
            match = _SIZED.match(row[0])
            if match is None or match["what"] not in columns:
                continue
            sizes.setdefault(match["size"], {})[columns[match["what"]]] = row[1]
            if match["what"] == "full cluster status":
                original[match["size"]] = row[3]
    if not sizes:
        return ""
    names = list(columns.values())
    lines = [
        "| nodes | " + " | ".join(names) + " | original: one `cluster_status()` |",
        "|---" * (len(names) + 2) + "|",
    ]
    for size, cells in sizes.items():
        values = " | ".join(_cell(cells.get(name, "-")) for name in names)
        lines.append(f"| {size} | {values} | {_cell(original.get(size, '-'))} |")
    return "\n".join(lines) + "\n"


def write_docs_figures(results: dict[str, Any]) -> None:
    """Write the summary and the curve next to latest.md, and the summary into the README between its markers."""
    summary = summary_markdown(results)
    SUMMARY.write_text(summary, encoding="utf-8")
    CURVE.write_text(curve_markdown(results), encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    start, end = readme.find(README_START), readme.find(README_END)
    if start == -1 or end < start:
        _progress(f"README.md has no {README_START!r} ... {README_END!r} block: its figures were not updated")
        return
    README.write_text(readme[: start + len(README_START)] + "\n" + summary + readme[end:], encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk = shutil.which("wrk")
    wrk_version = ""
    if wrk:
        proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        wrk_version = (proc.stdout or proc.stderr).splitlines()[0] if (proc.stdout or proc.stderr) else ""
    versions = {}
    for module in ("uvicorn", "starlette", "uvloop", "httptools", "anyio", "httpx"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = "?"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk_version,
        **versions,
    }


def _original_python() -> str | None:
    path = os.environ.get("BENCH_ORIGINAL_PYTHON") or str(ORIGINAL_PYTHON)
    if not Path(path).exists():
        return None
    proc = subprocess.run(
        [path, "-c", "import importlib.metadata as m; print(m.version('promptise'))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    version = proc.stdout.strip()
    return path if proc.returncode == 0 and version.startswith("1.10.") else None


def run(settings: Settings, parts: list[str]) -> dict[str, Any]:
    """Run the selected benchmarks and collect everything.

    Args:
        settings: Durations and repetitions.
        parts: Which of `PARTS` to run.

    Returns:
        The raw results, as written to `bench/results/latest.json`.
    """
    started = time.monotonic()
    original = _original_python()
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": vars(settings),
        "original_python": original,
    }
    main_python = sys.executable
    timings: dict[str, float] = {}
    results["part_seconds"] = timings
    mark = time.monotonic()

    def done(part: str) -> None:
        nonlocal mark
        timings[part] = time.monotonic() - mark
        mark = time.monotonic()
        _progress(f"{part}: {timings[part]:.0f} s")

    if "http" in parts:
        _progress(f"HTTP load: {settings.rounds} round(s), {settings.warmup} s warm-up + {settings.duration} s "
                  f"x {settings.connections} connections per route and server ...")  # fmt: skip
        load = LoadSettings(
            warmup_seconds=settings.warmup,
            duration_seconds=settings.duration,
            connections=settings.connections,
            quiet_wait=settings.quiet_wait,
        )
        results["http"] = run_http_benchmarks(load, main_python, original, rounds=settings.rounds)
        done("http")
    if "fanout" in parts:
        _progress("coordinator fan-out ...")
        fan = FanoutSettings(
            repeats=settings.repeats,
            blackhole_repeats=settings.blackhole_repeats,
            request_timeout=settings.request_timeout,
        )
        results["fanout"] = run_fanout(fan, main_python, original)
        done("fanout")
    if "startup" in parts:
        _progress("transport start/stop ...")
        results["startup"] = run_startup(settings.startup_rounds, main_python, original)
        done("startup")
    if "registry" in parts:
        results["others"] = run_other_scripts(settings.quick)
        done("registry")
    results["seconds"] = time.monotonic() - started
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table, write the JSON.

    Args:
        argv: Arguments (default: `sys.argv[1:]`).

    Returns:
        The process exit code: 0 even when a target is missed (the table says so), 1 on a broken run.
    """
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (under 3 minutes in all)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per route (BENCH_WARMUP)")
    parser.add_argument("--duration", type=int, help="seconds of measured load per route (BENCH_DURATION)")
    parser.add_argument("--connections", type=int, help="wrk connections (BENCH_CONNECTIONS)")
    parser.add_argument("--rounds", type=int, help="HTTP rounds; medians are reported (BENCH_ROUNDS)")
    parser.add_argument("--repeats", type=int, help="timed cluster_status() calls per scenario (BENCH_REPEATS)")
    parser.add_argument("--startup-rounds", type=int, help="transport start/stop cycles (BENCH_STARTUP_ROUNDS)")
    parser.add_argument("--request-timeout", type=float, help="our coordinator's request_timeout, s")
    parser.add_argument(
        "--quiet-wait", type=float, help="wait up to this many s for idle CPUs before each HTTP run (BENCH_QUIET_WAIT)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write raw results (default {RESULTS})")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if (os.cpu_count() or 1) < 2:
        _progress("warning: fewer than 2 CPUs; the server and the load generator share one, figures will be low")
        os.environ.setdefault("BENCH_LOAD_CPU", "0")
    settings = _settings(args)
    results = run(settings, parts)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = report_text(results)
    print()
    print(report)
    for script, entry in results.get("others", {}).items():
        if entry.get("output"):
            print(f"\n[{script}]\n{entry['output'].rstrip()}")
    # The docs' performance page shows the table of the last full run from this file: no figure is copied by hand.
    complete = not settings.quick and set(parts) == set(PARTS) and args.json == RESULTS
    table = RESULTS.with_name("latest.md" if complete else "partial.md")
    table.write_text(f"```text\n{report}\n```\n", encoding="utf-8")
    if complete:
        write_docs_figures(results)
    print(f"\nraw results: {args.json}; table: {table}; whole run {results['seconds']:.0f} s")
    return 0


def report_text(results: dict[str, Any]) -> str:
    """The run's header lines and its table, as printed and as the docs show them."""
    m = results["machine"]
    header = [
        f"promptise-asgi benchmarks, {results['when']}: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, "
        f"uvicorn {m['uvicorn']} (uvloop, httptools), {m['wrk']}",
        f"server pinned to CPU 0, load generator to CPU 1; ceiling GET bodies: "
        f"{results.get('http', {}).get('ceiling_bodies', '-')}; original: "
        f"{'promptise 1.10 in bench/.venv-original' if results['original_python'] else 'not installed'}",
    ]
    return "\n".join([*header, render(results)])


if __name__ == "__main__":
    sys.exit(main())
