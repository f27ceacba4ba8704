"""Test helpers that run a real etcd server and cut connections to it.

`EtcdServer` starts the `etcd` binary (Debian package `etcd-server`) on free loopback ports with its own data dir,
waits until it answers `/health`, and stops it; it can be restarted on the same ports and data dir. `require_etcd()`
skips when the binary is absent, unless `CI` is set, when it fails loudly. `TcpProxy` forwards a loopback port to
etcd and can drop every connection on demand (a dropped watch stream). Knows nothing of promptise_asgi.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc
import httpx
import pytest
from support import free_port

__all__ = ["EtcdServer", "TcpProxy", "free_port", "require_etcd"]

START_DEADLINE = 30.0


def require_etcd() -> str:
    """Return the path of the `etcd` binary; skip the test without it, or fail when `CI` is set."""
    binary = shutil.which("etcd")
    if binary is None:
        reason = "etcd binary not found (install Debian's etcd-server, or run scripts/install --etcd)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: the etcd tests must run in CI", pytrace=False)
        pytest.skip(reason)
    return binary


class EtcdServer:
    """One single-member etcd on 127.0.0.1, with its data in `data_dir`.

    Args:
        data_dir: where etcd keeps its data (created by etcd); reused across restarts.
        binary: path of the etcd binary (default: found on PATH).
    """

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        self.binary = binary or require_etcd()
        self.data_dir = data_dir
        self.log_path = data_dir.with_name(data_dir.name + ".log")
        self.client_port = 0
        self.peer_port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL (`http://127.0.0.1:PORT`)."""
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        """Whether the etcd process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start etcd (on new free ports the first time, on the same ports after) and wait until it is healthy."""
        fresh_ports = self.client_port == 0
        for _attempt in range(3):
            if fresh_ports:
                self.client_port, self.peer_port = free_port(), free_port()
            if self._spawn_and_wait():
                return
            if not fresh_ports:
                break  # a restart must keep its ports: retrying elsewhere would hide the failure
        raise RuntimeError(f"etcd did not become healthy at {self.url}; log: {self.log_path.read_text()[-2000:]}")

    def _spawn_and_wait(self) -> bool:
        peer = f"http://127.0.0.1:{self.peer_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self.binary,
                    "--name=test",
                    f"--data-dir={self.data_dir}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=test={peer}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + START_DEADLINE
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    self._process = None
                    return False  # most likely a port taken between free_port() and bind
                try:
                    if client.get(self.url + "/health").json().get("health") == "true":
                        return True
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop etcd (terminate, then kill if it lingers) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports and data dir."""
        self.stop()
        self.start()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class TcpProxy:
    """A loopback TCP forwarder to `target_port` whose connections can be cut at will.

    Run `serve` in a task group (`await tg.start(proxy.serve)`), point a client at `proxy.url`, then `drop()` to
    close every open connection and stop listening (new connections are refused), and `allow()` to listen again
    on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._listening = anyio.CancelScope()
        self._allowed = anyio.Event()
        self._allowed.set()

    @property
    def url(self) -> str:
        """The proxy's http URL."""
        return f"http://127.0.0.1:{self.port}"

    def drop(self) -> None:
        """Close every forwarded connection and refuse new ones until `allow()`."""
        self._allowed = anyio.Event()
        self._listening.cancel()

    def allow(self) -> None:
        """Accept and forward connections again."""
        self._allowed.set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port (the same one after each `drop()`) and forward until cancelled."""
        started = False
        while True:
            await self._allowed.wait()
            # Refusing by not listening, rather than accepting and closing, means a client never half-sends.
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
            self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
            self._listening = anyio.CancelScope()
            with self._listening:
                async with listener:
                    if not started:
                        started = True
                        task_status.started()
                    await listener.serve(self._forward)

    async def _forward(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(_pipe, client, upstream, tg.cancel_scope)
                tg.start_soon(_pipe, upstream, client, tg.cancel_scope)


async def _pipe(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    scope.cancel()
