from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from etcd_server import EtcdServer, require_etcd
from support import make_store

from promptise_asgi.store import EventStore

# Nodes the tests start (the CLI, the module app) keep events in memory unless a test gives them a store: the
# default SQLite file under the repository would carry one test's leftover events into another test or run.
os.environ.setdefault("PROMPTISE_STORE", "memory")


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


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Run a test over the memory store and over a SQLite store."""
    return str(request.param)


@pytest.fixture
async def event_store(store_kind: str, tmp_path: Path) -> AsyncIterator[EventStore]:
    """A fresh store of each kind (SQLite: a file in the test's tmp_path), closed after the test."""
    store = make_store(store_kind, tmp_path)
    yield store
    await store.close()
