"""The project's benchmarks (SPEC section 10): `scripts/bench` installs what they need and runs `python -m bench`.

Every figure is printed next to its baselines measured in the same run on the same machine: a bare ASGI app on
the same server (the ceiling) and the original implementation (`promptise==1.10.*`, in its own venv
`bench/.venv-original`). Modules: `http_load` (wrk against the node API and the event path), `coordinator_fanout`,
`transport_startup`, and the runner in `__main__`. Other `bench/bench_*.py` scripts (registry, etcd) are run as
subprocesses; a line they print as `BENCH_ROW {json}` (keys: metric, ours, baseline, original, ratio, target, met)
becomes a table row, as does a line of the form `<metric> = <value> (target <target>): OK|MISSED`.
Nothing here is part of the test suite, and nothing here is imported by the package.
"""
