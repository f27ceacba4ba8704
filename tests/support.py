"""Helpers shared by the tests: free ports, waiting on a condition with a deadline, addresses to aim at, event
stores, and the command line run in subprocesses as a user runs it."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx

from promptise_asgi.store import EventStore, MemoryStore, SQLiteStore


def asgi_client(app: Any, base_url: str = "http://127.0.0.1", **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client that talks to `app` in process; app exceptions become 500 answers, as a server's do."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url=base_url, **kwargs)


def make_store(kind: str, directory: Path) -> EventStore:
    """A fresh event store: `"memory"`, or `"sqlite"` (a file in `directory`)."""
    return MemoryStore() if kind == "memory" else SQLiteStore(directory / "events.sqlite3")


def crash_copy(path: Path, to: Path) -> Path:
    """What a `kill -9` of the runtime using the SQLite store `path` would leave right now: its committed state.

    SQLite's backup API copies every committed transaction (the WAL's too) into a new file, which a new store
    opens as if the runtime holding `path` had died.
    """
    source, target = sqlite3.connect(path), sqlite3.connect(to)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    return to


T = TypeVar("T")


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (below the ephemeral range: see `free_port_run`)."""
    return free_port_run(1)


def free_port_run(count: int) -> int:
    """The first of `count` consecutive TCP ports that were all free on loopback a moment ago, taken below the
    kernel's ephemeral range, so that no client connection of a concurrent test can take one of them meanwhile
    (what `promptise-asgi demo --port N` needs: it listens on N, N+1 and N+2)."""
    low = 20000
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral = int(ranges.read().split()[0])
    for _ in range(200):
        base = random.randrange(low, max(low + 1000, ephemeral - count))
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports on loopback")


def dead_url() -> str:
    """An http URL on loopback where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def black_hole() -> Iterator[str]:
    """An http URL whose socket accepts connections (the kernel does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# Generous: "it eventually happens" must hold on a loaded 2-core machine where other suites run too.
WAIT = 20.0


async def wait_for(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "the condition") -> None:
    """Poll `predicate` (state that no event announces) until it holds; fail with `what` after `timeout` s."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def wait_for_async(check: Callable[[], Awaitable[bool]], timeout: float = WAIT, what: str = "it") -> None:
    """Poll an async `check` until it returns True; fail with `what` after `timeout` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def poll(check: Callable[[], T | None], timeout: float = 15.0, what: str = "the condition") -> T:
    """Call `check` (from synchronous code) until it returns something other than None or False; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (a peer connecting to it is not loopback), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only asks the kernel for a route
            address = str(sock.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serve(command: list[str], env: dict[str, str], cwd: Path = ROOT) -> Iterator[subprocess.Popen[str]]:
    """Run a server command in a subprocess (stdout and stderr merged), terminated when the block ends."""
    process = subprocess.Popen(
        command, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung server is the failure being reported
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def wait_for_line(process: subprocess.Popen[str], prefix: str, timeout: float = 30.0) -> str | None:
    """The first line of `process`'s output that starts with `prefix`; None if the process exits first.

    Raises:
        AssertionError: neither happened within `timeout` seconds.
    """
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if readable:
            line = process.stdout.readline()
            if not line:  # end of output: the process is gone
                process.wait(timeout=max(remaining, 1))
                return None
            if line.startswith(prefix):
                return line.strip()
    raise AssertionError(f"no line starting with {prefix!r} within {timeout}s")


def wait_healthy(url: str, process: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """Poll `url` (a `/health`) until it answers JSON; fail with the server's output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"server exited early ({process.returncode}):\n{process.stdout.read() if process.stdout else ''}"
            )
        try:
            return httpx.get(url, timeout=1.0).json()  # type: ignore[no-any-return]
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"no answer from {url} within {timeout}s")


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    """Drive an ASGI app's lifespan: yields the startup answer, then shuts it down."""
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    from_app, outbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    async with to_app, app_inbox, from_app, outbox, anyio.create_task_group() as tg:
        tg.start_soon(
            app, {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, app_inbox.receive, from_app.send
        )
        await to_app.send({"type": "lifespan.startup"})
        started = await outbox.receive()
        yield started
        if started["type"] == "lifespan.startup.complete":
            await to_app.send({"type": "lifespan.shutdown"})
            assert (await outbox.receive())["type"] == "lifespan.shutdown.complete"


# -- the command line, run as a user runs it ------------------------------------------------------------------

CLI = [sys.executable, "-m", "promptise_asgi"]
# Variables the command reads: a test sets the ones it means, never inherits one from the shell running pytest.
CLI_VARIABLES = (
    "PROMPTISE_CONFIG",
    "PROMPTISE_NODE_ID",
    "PROMPTISE_AUTH_TOKEN",
    "PROMPTISE_NODE_TOKEN",
    "PROMPTISE_COORDINATOR_URL",
    "PROMPTISE_ADVERTISE_URL",
    "PROMPTISE_ALLOW_UNAUTHENTICATED",
    "PROMPTISE_TRUSTED_HOSTS",
    "PROMPTISE_STORE",
)


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: this one without any PROMPTISE_* variable, plus `env`.

    Nodes keep their events in memory unless `env` says otherwise: the default SQLite file under the working
    directory would carry one test's events into the next.
    """
    clean = {key: value for key, value in os.environ.items() if key not in CLI_VARIABLES}
    return {**clean, "COLUMNS": "100", "PROMPTISE_STORE": "memory", **(env or {})}


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `python -m promptise_asgi ARGS` to completion, capturing stdout and stderr apart."""
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout, check=False
    )


class Running:
    """A CLI command running in a subprocess, its output (stdout and stderr merged) collected as it comes."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything printed so far."""
        with self._changed:
            return "".join(self._lines)

    def wait_for_line(self, fragment: str, timeout: float = 20.0) -> str:
        """Wait until a line holding `fragment` is printed; return that line."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if fragment in line:
                        return line
                if self._ended:
                    raise AssertionError(f"exited without printing {fragment!r}:\n{''.join(self._lines)}")
                if not self._changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no line with {fragment!r} within {timeout}s:\n{''.join(self._lines)}")

    def wait_http(self, url: str, timeout: float = 20.0) -> httpx.Response:
        """GET `url` until it answers at all; fail with the output if the command exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise AssertionError(f"exited early ({self.process.returncode}):\n{self.output}")
            try:
                return httpx.get(url, timeout=2)
            except httpx.TransportError:
                time.sleep(0.02)
        raise AssertionError(f"{url} did not answer within {timeout}s:\n{self.output}")

    def interrupt(self, timeout: float = 20.0) -> str:
        """Press Ctrl-C (SIGINT); return the whole output once the command has exited."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return self.output


@contextmanager
def cli_process(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Iterator[Running]:
    """Run a long-lived CLI command; it is killed when the block ends if still running."""
    process = subprocess.Popen(
        [*CLI, *args],
        cwd=cwd,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Running(process)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        running._reader.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


def assert_one_line(text: str, *fragments: str) -> str:
    """The text is one non-empty line, without a traceback, holding every fragment; returns the line."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# -- counting what a component does on the network --------------------------------------------------------------


@contextmanager
def counting_black_hole() -> Iterator[tuple[str, Callable[[], int]]]:
    """A black-holed http URL (see `black_hole`) and a function telling how many connections were made to it:
    a test can prove that nothing was polled, where a poll would only have cost a timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        accepted: list[socket.socket] = []

        def connections() -> int:
            while True:
                try:
                    accepted.append(sock.accept()[0])  # kept open: the peer keeps waiting for an answer
                except BlockingIOError:
                    return len(accepted)

        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", connections
        finally:
            for conn in accepted:
                conn.close()


class CountingTransport(httpx.AsyncBaseTransport):
    """An httpx transport over the network that counts requests by path (say, etcd's `/v3/kv/range`)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.paths: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths[request.url.path] = self.paths.get(request.url.path, 0) + 1
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class ManualClock:
    """A monotonic clock a test moves by hand (`clock.now += 20`), to pass intervals and timeouts without waiting."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def changes_so_far(subscription: Any) -> list[Any]:
    """What a change subscription (`RuntimeCoordinator.changes()`) received so far, snapshot aside, without
    waiting for more than a moment."""
    changes = []
    while True:
        with anyio.move_on_after(0.05):
            changes.append(await subscription.receive())
            continue
        return [change for change in changes if change.type != "snapshot"]
