from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_server import EtcdServer, require_etcd


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on asyncio and on trio; uvicorn-driven tests override this with asyncio."""
    return str(request.param)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the tests that neither stop nor restart it (each test uses its own prefix)."""
    with EtcdServer(tmp_path_factory.mktemp("etcd") / "data", require_etcd()) as server:
        yield server


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd this test may stop and restart."""
    with EtcdServer(tmp_path / "data", require_etcd()) as server:
        yield server
