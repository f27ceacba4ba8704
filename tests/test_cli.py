"""The `promptise-asgi` command line (SPEC 9, 19), run in subprocesses as a user types it, plus its table.

Each test checks what the user sees: the message, that there is no traceback, and the exit status.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import anyio
import httpx
import pytest
from support import (
    ROOT,
    assert_one_line,
    black_hole,
    cli_process,
    dead_url,
    free_port,
    non_loopback_address,
    poll,
    run_cli,
)

import promptise_asgi
from promptise_asgi.cli import format_status, main

EXAMPLE = ROOT / "examples" / "promptise.toml"
COMMANDS = ("node", "coordinator", "status", "demo")

pytestmark = pytest.mark.slow


# -- the surface: version, help, global options, flag errors -------------------------------------------------


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"promptise-asgi {promptise_asgi.__version__}\n",
        "",
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_defaults_and_its_variables(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0 and result.stderr == ""
    usage, description = result.stdout.split("\n\n")[:2]
    assert usage.startswith(f"usage: promptise-asgi {command}") and len(description.split()) > 8
    assert "--log-level" in result.stdout  # global options are accepted after the command too
    expected = {
        "node": ["(default: [node] port, else 9100)", "PROMPTISE_AUTH_TOKEN", "PROMPTISE_COORDINATOR_URL"],
        "coordinator": ["(default: 9000)", "(default: 60.0)", "PROMPTISE_AUTH_TOKEN", "PROMPTISE_NODE_TOKEN"],
        "status": ["(default: 10.0)", "PROMPTISE_AUTH_TOKEN", "PROMPTISE_COORDINATOR_URL"],
        "demo": ["(default: 9000)", "(default: 5.0)", "(default: 0)"],
    }[command]
    for fragment in expected:
        assert fragment in result.stdout, fragment


def test_log_level_works_after_the_command_as_before_it() -> None:
    # Without a config the node warns that it serves the demo; the failing --host ends it right after.
    args = ["--host", "nonexistent.invalid"]
    default = run_cli("node", *args)
    assert "WARNING" in default.stderr and "serving the built-in demo runtime" in default.stderr
    for quiet in (["--log-level", "error", "node", *args], ["node", *args, "--log-level", "error"]):
        result = run_cli(*quiet)
        assert result.returncode == 1
        assert_one_line(result.stderr, "promptise-asgi node: cannot listen on --host 'nonexistent.invalid'")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--interval", "0"], "promptise-asgi demo: --interval must be a number of seconds > 0, not '0'"),
        (["demo", "--cycles", "-1"], "--cycles must be a whole number >= 0, not '-1'"),
        (["demo", "--port", "65535"], "--port must be a port number from 0 to 65533 (the nodes take the next two)"),
        (["coordinator", "--health-check-interval", "0"], "--health-check-interval must be a number of seconds > 0"),
        (["coordinator", "--ttl", "nan"], "--ttl must be a number of seconds > 0, not 'nan'"),
        (["status", "--timeout", "soon"], "--timeout must be a number of seconds > 0, not 'soon'"),
        (["coordinator", "--node-network", "10.0.0.0/33"], "--node-network must be a network such as 10.0.0.0/8"),
        (["coordinator", "--etcd", "ftp://x"], "--etcd must be etcd URL(s), comma-separated, not 'ftp://x'"),
        (["node", "--port", "70000"], "--port must be a port number from 0 to 65535"),
        (["node", "--node-id", "bad id"], "--node-id must be up to 128 letters, digits"),
        (["node", "--server", "gunicorn"], "--server: invalid choice: 'gunicorn'"),
        (["status", "--timeout", "0"], "--timeout must be a number of seconds > 0, not '0'"),
        (["status", "--coordinator", "http://"], "--coordinator must be an http(s) URL such as http://10.0.0.5:9000"),
        (["node", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_a_bad_flag_is_one_line_naming_the_flag(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    line = assert_one_line(result.stderr, message, "(see promptise-asgi")
    assert not re.search(r"[a-z]+_[a-z]+", line)  # never an internal name such as health_check_interval


# -- node and coordinator: refusals in CLI words, hosts, "stopped", Ctrl-C ------------------------------------


@pytest.mark.parametrize("command", ["node", "coordinator"])
def test_no_token_on_a_public_host_is_refused_in_cli_words(command: str) -> None:
    result = run_cli(command, "--host", "0.0.0.0", "--port", "0", "--log-level", "error")
    assert result.returncode == 1
    line = assert_one_line(
        result.stderr, "refusing to bind '0.0.0.0' without a token: set PROMPTISE_AUTH_TOKEN", "--allow-unauthenticated"
    )
    assert "auth_token=" not in line and "allow_unauthenticated=True" not in line


@pytest.mark.parametrize(
    ("host", "message"),
    [("nonexistent.invalid", "no such host"), ("203.0.113.77", "not an address of this machine")],
)
@pytest.mark.parametrize("command", ["node", "coordinator"])
def test_a_host_that_cannot_be_bound_says_so_not_the_token_message(command: str, host: str, message: str) -> None:
    result = run_cli(command, "--host", host, "--log-level", "error")
    assert result.returncode == 1
    line = assert_one_line(result.stderr, f"cannot listen on --host {host!r}: {message}")
    assert "token" not in line


def test_node_serves_its_config_prints_stopped_and_exits_0_on_ctrl_c() -> None:
    port = free_port()
    with cli_process("node", "--config", str(EXAMPLE), "--port", str(port), "--node-id", "cli-node") as node:
        health = node.wait_http(f"http://127.0.0.1:{port}/health").json()
        assert health == {"status": "healthy", "node_id": "cli-node", "process_count": 2}
        response = httpx.post(f"http://127.0.0.1:{port}/processes/echo/event", json={"payload": {"hi": 1}})
        assert response.status_code == 202
        node.wait_for_line("serving on")
        output = node.interrupt()
    assert node.process.returncode == 0 and "Traceback" not in output
    assert f"node cli-node serving on http://127.0.0.1:{port}; processes: watcher, echo\n" in output
    assert output.endswith("node cli-node stopped\n")


def test_node_token_comes_from_the_environment() -> None:
    port = free_port()
    with cli_process(
        "node", "--config", str(EXAMPLE), "--port", str(port), env={"PROMPTISE_AUTH_TOKEN": "envtok"}
    ) as p:
        p.wait_http(f"http://127.0.0.1:{port}/health")
        assert httpx.get(f"http://127.0.0.1:{port}/status").status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port}/status", headers={"Authorization": "Bearer envtok"})
        assert ok.status_code == 200 and "registration" not in ok.json()  # it registers nowhere
        p.interrupt()


SLOW_START = """\
import sys, time
print("slow_start: importing", file=sys.stderr, flush=True)
time.sleep(5)


async def handle(event):
    pass
"""


def test_ctrl_c_while_starting_is_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The handler module takes 5 s to import: Ctrl-C lands in the middle of the node's start."""
    (tmp_path / "slow_start.py").write_text(SLOW_START)
    config = tmp_path / "node.toml"
    config.write_text("[node]\nid = 'slow'\n[[processes]]\nname = 'w'\nhandler = 'slow_start:handle'\n")
    with cli_process("node", "--config", str(config), "--port", "0") as node:
        node.wait_for_line("slow_start: importing")
        started = time.monotonic()
        output = node.interrupt()
    assert time.monotonic() - started < 3  # it did not wait for the import to finish
    assert node.process.returncode == 130
    assert output.splitlines() == ["slow_start: importing", "promptise-asgi node: interrupted while starting"]


def test_ctrl_c_in_the_middle_of_a_servers_start_stops_what_started(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deterministically past the config: the signal arrives while the server is starting (in process, since
    only the main thread may own signals)."""
    from promptise_asgi._server import _runner as _server

    async def slow_start(self: _server.AppServer) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does, now that the command owns SIGINT
        await anyio.sleep(10)

    monkeypatch.setattr(_server.AppServer, "start", slow_start)
    for command in (["node", "--config", str(EXAMPLE), "--port", "0"], ["coordinator", "--port", "0"]):
        assert main(command) == 130
        assert capsys.readouterr().err == f"promptise-asgi {command[0]}: interrupted while starting\n"


SLOW_STOP = """\
import sys
import anyio


async def handle(event):
    print("slow_stop: handling", file=sys.stderr, flush=True)
    await anyio.sleep(60)
"""


def ready(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def test_a_second_ctrl_c_while_stopping_exits_at_once(tmp_path: Path) -> None:
    """The first Ctrl-C drains the queues (up to drain_timeout, 30 s here); the second does not wait."""
    (tmp_path / "slow_stop.py").write_text(SLOW_STOP)
    config = tmp_path / "node.toml"
    config.write_text("[[processes]]\nname = 'w'\nhandler = 'slow_stop:handle'\ndrain_timeout = 30\n")
    port = free_port()
    with cli_process("node", "--config", str(config), "--port", str(port)) as node:
        node.wait_http(f"http://127.0.0.1:{port}/health")
        assert httpx.post(f"http://127.0.0.1:{port}/processes/w/event", json={}).status_code == 202
        node.wait_for_line("slow_stop: handling")
        node.process.send_signal(signal.SIGINT)
        # Two signals sent at once may reach the process as one: wait until the first one has begun the stop.
        poll(lambda: not ready(f"http://127.0.0.1:{port}/readyz"), what="the node to start stopping")
        started = time.monotonic()
        output = node.interrupt()
    assert time.monotonic() - started < 5
    assert node.process.returncode == 130 and "Traceback" not in output
    assert output.splitlines()[-1] == "promptise-asgi node: stopped at once"


def test_coordinator_prints_stopped_and_exits_0_on_ctrl_c() -> None:
    port = free_port()
    with cli_process("coordinator", "--port", str(port)) as coordinator:
        coordinator.wait_for_line("coordinator serving on")
        output = coordinator.interrupt()
    assert coordinator.process.returncode == 0 and "Traceback" not in output
    assert output.splitlines() == [
        f"coordinator serving on http://127.0.0.1:{port}, nodes kept in an in-process registry (ttl 60s)",
        "coordinator stopped",
    ]


def test_a_handler_is_found_beside_its_config_and_a_missing_one_names_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "beside.py").write_text("async def handle(event):\n    pass\n")
    config = tmp_path / "node.toml"
    config.write_text("[[processes]]\nname = 'w'\nhandler = 'beside:handle'\n")
    port = free_port()
    with cli_process("node", "--config", str(config), "--port", str(port)) as node:  # run from the repository
        assert node.wait_http(f"http://127.0.0.1:{port}/health").json()["process_count"] == 1
        node.interrupt()
    config.write_text("[[processes]]\nname = 'w'\nhandler = 'elsewhere:handle'\n")
    result = run_cli("node", "--config", str(config))
    assert result.returncode == 1
    assert_one_line(
        result.stderr,
        f"no module 'elsewhere' in the working directory ({ROOT}) or the config file's directory ({tmp_path})",
        "PYTHONPATH",
    )


# -- registration trouble, as the node's operator sees it ------------------------------------------------------


def test_a_black_holed_coordinator_never_delays_the_nodes_start() -> None:
    port = free_port()
    with black_hole() as coordinator:
        with cli_process("node", "--config", str(EXAMPLE), "--port", str(port), "--coordinator", coordinator) as node:
            node.wait_http(f"http://127.0.0.1:{port}/health")
            status = httpx.get(f"http://127.0.0.1:{port}/status").json()
            output = node.interrupt()
    # The node serves while its first registration is still waiting on the black hole (it used to hold the
    # start until that attempt timed out): no error yet, still registering.
    assert status["registration"] == {
        "coordinator": coordinator,
        "url": f"http://127.0.0.1:{port}",
        "state": "registering",
        "last_error": None,
    }
    assert output.rstrip().endswith("node node-1 stopped") and "Traceback" not in output


def test_a_refused_token_is_an_error_saying_what_to_set_and_shows_in_status() -> None:
    coordinator_port, node_port = free_port(), free_port()
    coordinator_url = f"http://127.0.0.1:{coordinator_port}"
    with cli_process("coordinator", "--port", str(coordinator_port), env={"PROMPTISE_NODE_TOKEN": "right"}) as c:
        c.wait_for_line("coordinator serving on")
        args = ("node", "--config", str(EXAMPLE), "--port", str(node_port), "--coordinator", coordinator_url)
        with cli_process(*args, env={"PROMPTISE_AUTH_TOKEN": "wrong"}) as node:
            line = node.wait_for_line(" ERROR ")
            status = httpx.get(f"http://127.0.0.1:{node_port}/status", headers={"Authorization": "Bearer wrong"})
            node.interrupt()
        c.interrupt()
    assert "the coordinator refused this node's token; set PROMPTISE_AUTH_TOKEN to the coordinator's node token" in line
    assert f"coordinator at {coordinator_url} answered 401" in line and "node unreachable" not in line
    registration = status.json()["registration"]
    assert registration["state"] == "refused" and registration["coordinator"] == coordinator_url


def test_a_wildcard_node_registers_a_url_other_machines_can_use() -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    coordinator_port, node_port = free_port(), free_port()
    env = {"PROMPTISE_AUTH_TOKEN": "shared"}
    with cli_process("coordinator", "--host", "0.0.0.0", "--port", str(coordinator_port), env=env) as c:
        c.wait_for_line("coordinator serving on every interface")
        remote = f"http://{address}:{coordinator_port}"
        args = (
            "node",
            "--config",
            str(EXAMPLE),
            "--host",
            "0.0.0.0",
            "--port",
            str(node_port),
            "--coordinator",
            remote,
        )
        with cli_process(*args, env=env) as node:
            line = node.wait_for_line("registering with")
            headers = {"Authorization": "Bearer shared"}
            listed = poll(lambda: httpx.get(f"{remote}/cluster/nodes", headers=headers).json()["nodes"], what="a node")
            node.interrupt()
        c.interrupt()
    registered = listed[0]["url"]
    assert not registered.startswith("http://127.") and registered.endswith(f":{node_port}")
    assert line.strip() == (
        f"registering with {remote} as {registered} "
        "(derived from this machine's name or address; --advertise-url to choose)"
    )


# -- status ---------------------------------------------------------------------------------------------------


def test_coordinator_node_registration_and_status_table_from_host_and_port() -> None:
    coordinator_port, node_port = free_port(), free_port()
    coordinator_url = f"http://127.0.0.1:{coordinator_port}"
    # Checks every second: the node's heartbeat digests (SPEC 16) go stale a second after it dies, and it is polled.
    with cli_process("coordinator", "--port", str(coordinator_port), "--health-check-interval", "1") as coordinator:
        coordinator.wait_for_line("coordinator serving on")
        args = ("node", "--config", str(EXAMPLE), "--port", str(node_port), "--node-id", "worker-1")
        with cli_process(*args, "--coordinator", f"127.0.0.1:{coordinator_port}") as node:
            line = node.wait_for_line("registering with")
            assert line.strip() == f"registering with {coordinator_url} as http://127.0.0.1:{node_port}"
            result = poll(
                lambda: (
                    (r := run_cli("status", "--coordinator", f"127.0.0.1:{coordinator_port}")).returncode == 0
                    and "worker-1" in r.stdout
                    and r
                ),
                what="worker-1 in the table",
            )  # a bare host:port
            header, row, summary = result.stdout.strip().splitlines()
            assert header.split() == ["NODE", "URL", "HEALTH", "PROCESSES"]
            assert row.split() == ["worker-1", f"http://127.0.0.1:{node_port}", "healthy", "2"]
            assert header.index("URL") == row.index("http://")
            assert summary == "1 node, 1 healthy, 2 processes"
            node.process.kill()  # as if the machine died: the coordinator keeps it healthy for a while
            node.process.wait()
            missed = r"^worker-1 .* healthy \(missed check, last seen \d+s ago\) +2$"
            result = poll(
                lambda: (
                    (r := run_cli("status", "--coordinator", coordinator_url)) and re.search(missed, r.stdout, re.M)
                ),
                what="worker-1 flagged with a missed check",
            )
        output = coordinator.interrupt()
    assert coordinator.process.returncode == 0 and "Traceback" not in output


def test_status_with_the_wrong_token_says_which_variable_to_set() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with cli_process("coordinator", "--port", str(port), env={"PROMPTISE_AUTH_TOKEN": "ops"}) as coordinator:
        coordinator.wait_for_line("coordinator serving on")
        missing = run_cli("status", "--coordinator", url)
        wrong = run_cli("status", "--coordinator", url, env={"PROMPTISE_AUTH_TOKEN": "nope"})
        right = run_cli("status", "--coordinator", url, env={"PROMPTISE_AUTH_TOKEN": "ops"})
        coordinator.interrupt()
    assert missing.returncode == wrong.returncode == 1 and right.returncode == 0
    assert_one_line(missing.stderr, f"the coordinator at {url} needs a token: set PROMPTISE_AUTH_TOKEN")
    assert_one_line(wrong.stderr, "refused the token in PROMPTISE_AUTH_TOKEN (401: Unauthorized)")


@pytest.mark.parametrize("token", [None, "node-token"])
def test_status_pointed_at_a_node_says_so(token: str | None) -> None:
    port = free_port()
    env = {"PROMPTISE_AUTH_TOKEN": token} if token else {}
    with cli_process("node", "--config", str(EXAMPLE), "--port", str(port), "--node-id", "n7", env=env) as node:
        node.wait_http(f"http://127.0.0.1:{port}/health")
        result = run_cli("status", "--coordinator", f"127.0.0.1:{port}")
        node.interrupt()
    assert result.returncode == 1
    assert_one_line(result.stderr, f"http://127.0.0.1:{port} is a node ('n7'), not a coordinator")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "pass --coordinator URL (or host:port), or set PROMPTISE_COORDINATOR_URL"),
        ([], {"PROMPTISE_COORDINATOR_URL": "ftp://x"}, "PROMPTISE_COORDINATOR_URL must be an http(s) URL"),
        (["--coordinator", "ftp://x"], {}, "--coordinator must be an http(s) URL such as http://10.0.0.5:9000, not"),
        (["--coordinator", "127.0.0.1:1"], {"PROMPTISE_AUTH_TOKEN": "a b"}, "PROMPTISE_AUTH_TOKEN must be printable"),
    ],
)
def test_status_reports_a_bad_address_or_token_with_what_was_given(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli("status", *args, env=env)
    assert result.returncode in (1, 2)
    line = assert_one_line(result.stderr, message)
    assert "'ftp://x'" in line or "ftp" not in message
    assert "a b" not in line  # a token is never shown


def test_status_names_an_unreachable_coordinator() -> None:
    url = dead_url()
    result = run_cli("status", "--coordinator", url)
    assert result.returncode == 1
    assert_one_line(result.stderr, f"promptise-asgi status: coordinator unreachable at {url} (")


def test_ctrl_c_during_status_is_one_line_and_130() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(20)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with cli_process("status", "--coordinator", url, "--timeout", "30") as status:
            connection, _ = listener.accept()  # the request is on its way, and will never be answered
            with connection:
                output = status.interrupt()
    assert status.process.returncode == 130
    assert_one_line(output, "promptise-asgi status: interrupted")


# -- demo -----------------------------------------------------------------------------------------------------


def test_demo_prints_where_everything_is_and_what_to_try() -> None:
    with cli_process("demo", "--port", "0", "--interval", "0.2") as demo:
        demo.wait_for_line("2 nodes, 2 healthy, 4 processes")
        output = demo.output
        coordinator = re.search(r"^  coordinator  (http://127\.0\.0\.1:\d+)$", output, re.M)
        assert coordinator is not None, output
        url = coordinator.group(1)
        for index in (1, 2):
            assert re.search(
                rf"^  demo-node-{index}  http://127\.0\.0\.1:\d+  processes: heartbeat, echo$", output, re.M
            )
        assert f" status --watch --coordinator {url}\n" in output
        assert "promptise_asgi.audit" not in output and "promptise_asgi.store" not in output
        curl = re.search(r"^  (curl -s -X POST (\S+) .*)$", output, re.M)
        assert curl is not None and curl.group(2) == f"{url}/cluster/nodes/demo-node-1/processes/echo/event"
        # The suggested injection works, and the echo process logs its payload.
        answer = httpx.post(curl.group(2), json={"payload": {"hello": "world"}})
        assert answer.status_code == 202
        demo.wait_for_line("demo echo: remote {'hello': 'world'}")
        output = demo.interrupt()
    assert demo.process.returncode == 0 and "Traceback" not in output
    assert output.endswith("demo cluster stopped\n")


def test_python_dash_m_is_the_same_program() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


# -- in process: the table, and main() itself ------------------------------------------------------------------


def test_format_status_marks_missed_checks_with_their_age_and_unhealthy_nodes() -> None:
    table = format_status(
        {
            "total_nodes": 3,
            "healthy_nodes": 2,
            "total_processes": 4,
            "nodes": {
                "b": {"url": "http://b:1", "status": "unhealthy", "process_count": 9},
                "a": {
                    "url": "http://a:1",
                    "status": "healthy",
                    "missed_check": True,
                    "process_count": 3,
                    "last_seen": 88,
                },
                "c": {"url": "http://c:1", "status": "healthy", "missed_check": True, "process_count": 1},
                "d": {"url": "http://d:1", "status": "unhealthy", "last_seen": 100 - 7300},
            },
        },
        now=100,
    )
    lines = table.splitlines()
    assert lines[1].split("  ")[0] == "a" and "healthy (missed check, last seen 12s ago)" in lines[1]
    assert lines[2].split() == ["b", "http://b:1", "unhealthy", "-"]
    assert "healthy (missed check)" in lines[3]
    assert "unhealthy (last seen 2h ago)" in lines[4]
    assert lines[5] == "3 nodes, 2 healthy, 4 processes"
    assert "last seen 3m ago" in format_status({"nodes": {"x": {"status": "unhealthy", "last_seen": 0}}}, now=190)


def test_the_version_comes_from_the_package_when_it_is_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"promptise-asgi {promptise_asgi.__version__}\n"


def test_ctrl_c_before_the_command_is_known_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from promptise_asgi import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["node"]) == 130
    assert capsys.readouterr().err == "promptise-asgi: interrupted\n"


def test_main_in_process_reports_errors_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--coordinator", dead_url(), "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert (
        captured.err.startswith("promptise-asgi status: coordinator unreachable at ")
        and "Traceback" not in captured.err
    )


def test_coordinator_node_token_and_node_networks() -> None:
    """The operator token steers, the node token registers, and nodes outside --node-network are refused."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"PROMPTISE_AUTH_TOKEN": "operator", "PROMPTISE_NODE_TOKEN": "for-nodes"}
    args = ("coordinator", "--port", str(port), "--node-network", "10.0.0.0/8", "--node-network", "127.0.0.0/8")
    with cli_process(*args, env=env) as process:
        process.wait_http(f"{base}/health")
        as_node = {"Authorization": "Bearer for-nodes"}
        inside = httpx.post(
            f"{base}/cluster/nodes", json={"node_id": "a", "url": "http://127.0.0.2:9"}, headers=as_node
        )
        outside = httpx.post(
            f"{base}/cluster/nodes", json={"node_id": "b", "url": "http://192.168.0.2:9"}, headers=as_node
        )
        operator = httpx.post(
            f"{base}/cluster/nodes",
            json={"node_id": "c", "url": "http://10.0.0.3:9"},
            headers={"Authorization": "Bearer operator"},
        )
        status = httpx.get(f"{base}/cluster/status", headers={"Authorization": "Bearer operator"}, timeout=15)
        with_node_token = run_cli("status", "--coordinator", base, env={"PROMPTISE_AUTH_TOKEN": "for-nodes"})
        process.interrupt()
    assert inside.status_code == 200
    assert outside.status_code == 422 and "outside the allowed node networks" in outside.json()["error"]
    assert operator.status_code == 403
    assert list(status.json()["nodes"]) == ["a"]
    assert_one_line(with_node_token.stderr, "(403: Forbidden: the node token only registers nodes)", "operator token")


def test_a_bad_config_and_a_port_in_use_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[processes]]\nname = 'watcher'\nconcurrency = 0\n")
    result = run_cli("node", "--config", str(bad))
    assert result.returncode == 1
    assert_one_line(result.stderr, str(bad), "'watcher'", "concurrency")
    missing = run_cli("node", "--config", "missing.toml")
    assert_one_line(missing.stderr, "missing.toml", "not found")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("node", "--config", str(EXAMPLE), "--port", str(port))
    assert result.returncode == 1
    assert_one_line(result.stderr, f"127.0.0.1:{port}")


def test_status_watch_redraws_the_table_on_each_change_and_stops_cleanly() -> None:
    coordinator_port, node_port = free_port(), free_port()
    with cli_process("coordinator", "--port", str(coordinator_port), "--health-check-interval", "0.5") as coordinator:
        coordinator.wait_for_line("coordinator serving on")
        with cli_process("status", "--watch", "--coordinator", f"127.0.0.1:{coordinator_port}") as watch:
            first = watch.wait_for_line("0 nodes, 0 healthy")
            assert "Traceback" not in first
            args = ("node", "--config", str(EXAMPLE), "--port", str(node_port), "--node-id", "watched")
            with cli_process(*args, "--coordinator", f"127.0.0.1:{coordinator_port}") as node:
                watch.wait_for_line("node.joined at")  # drawn from the stream: nobody asked again
                watch.wait_for_line("1 node, 1 healthy, 2 processes")
                node.interrupt()
            watch.wait_for_line("node.left at")
            output = watch.interrupt()
        coordinator.interrupt()
    assert watch.process.returncode == 0, output
    assert "Traceback" not in output and output.rstrip().endswith("stopped watching")
    assert re.search(r"^watched +http://127\.0\.0\.1:\d+ +healthy +2$", output, re.M), output


class TestStore:
    """SPEC 12: `node` keeps its events in ./promptise-data/<node-id>.sqlite3, or where --store says."""

    def test_the_default_file_and_one_live_node_per_file(self, tmp_path: Path) -> None:
        config = tmp_path / "node.toml"
        config.write_text('[node]\nid = "keeper"\n[[processes]]\nname = "worker"\n')
        port = free_port()
        env = {"PROMPTISE_STORE": ""}  # unset: the default
        with cli_process("node", "--config", str(config), "--port", str(port), env=env, cwd=tmp_path) as first:
            first.wait_http(f"http://127.0.0.1:{port}/health")
            store = tmp_path / "promptise-data" / "keeper.sqlite3"
            assert store.is_file()
            second = run_cli("node", "--config", str(config), "--port", str(free_port()), env=env, cwd=tmp_path)
            assert second.returncode == 1
            assert_one_line(second.stderr, str(store), "in use by another live runtime", f"pid {first.process.pid}")
            output = first.interrupt()
        assert f"event store: SQLite file {store}" in output

    def test_the_store_flag_and_the_environment(self, tmp_path: Path) -> None:
        port = free_port()
        path = tmp_path / "elsewhere" / "events.sqlite3"
        command = ("node", "--config", str(EXAMPLE), "--port")
        with cli_process(*command, str(port), "--store", str(path)) as node:
            status = node.wait_http(f"http://127.0.0.1:{port}/processes/echo/status").json()
            assert status["store"] == "sqlite" and path.is_file()
        port = free_port()
        with cli_process(*command, str(port), "--store", "memory", env={"PROMPTISE_STORE": str(path)}) as node:
            status = node.wait_http(f"http://127.0.0.1:{port}/processes/echo/status").json()
            assert status["store"] == "memory"
        port = free_port()
        with cli_process(*command, str(port), env={"PROMPTISE_STORE": str(path)}) as node:
            status = node.wait_http(f"http://127.0.0.1:{port}/processes/echo/status").json()
            assert status["store"] == "sqlite"
