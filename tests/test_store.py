"""The event stores on their own (SPEC 12): group commit, one writer per file, recovery, dead letters, keys."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from support import WAIT, wait_for

from promptise_asgi import store as store_module
from promptise_asgi.store import (
    DeadLetter,
    EventRecord,
    EventStore,
    EventStoreError,
    IdempotencyKey,
    IdempotencyKeyConflictError,
    MemoryStore,
    SQLiteStore,
    StoreLockedError,
)


def record(event_id: str, process: str = "p", **fields: Any) -> EventRecord:
    return EventRecord(process, event_id, {"trigger_id": "t", "payload": fields})


def letter(event_id: str, process: str = "p", dead_at: float = 1.0) -> DeadLetter:
    return DeadLetter(process, event_id, {"trigger_id": "t"}, 2, "error", "RuntimeError: boom", dead_at)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_public_names() -> None:
    assert store_module.__all__ == sorted(store_module.__all__)
    for name in store_module.__all__:
        assert getattr(store_module, name) is not None
    assert isinstance(MemoryStore(), EventStore) and isinstance(SQLiteStore("x.sqlite3"), EventStore)
    with pytest.raises(AttributeError):
        store_module.NoSuchStore  # noqa: B018
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore("x.sqlite3", synchronous="sometimes")  # type: ignore[arg-type]


class TestSQLite:
    async def test_concurrent_adds_share_transactions_and_each_returns_after_its_commit(self, tmp_path: Path) -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        await store.open()
        reader = sqlite3.connect(tmp_path / "s.sqlite3")
        seen_committed: list[bool] = []

        async def add(index: int) -> None:
            await store.add(record(f"e{index}"))
            row = reader.execute("SELECT COUNT(*) FROM events WHERE event_id = ?", (f"e{index}",)).fetchone()
            seen_committed.append(row[0] == 1)

        before = store.commits
        async with anyio.create_task_group() as tg:
            for index in range(200):
                tg.start_soon(add, index)
        assert seen_committed == [True] * 200
        # One flusher at a time: the first caller commits its own event, everyone who came meanwhile shares
        # the next transaction.
        assert store.commits - before <= 4
        reader.close()
        await store.close()

    async def test_a_second_live_store_on_the_file_is_refused_naming_it(self, tmp_path: Path) -> None:
        path = tmp_path / "one.sqlite3"
        first, second = SQLiteStore(path), SQLiteStore(path)
        await first.open()
        await first.open()  # opening twice is harmless
        with pytest.raises(StoreLockedError) as info:
            await second.open()
        assert str(path) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert info.value.path == str(path)
        await first.close()
        await second.open()  # free again once the first one is closed
        await second.close()
        await second.close()  # closing twice is harmless

    @pytest.mark.slow
    def test_the_lock_goes_with_a_process_killed_by_sigkill(self, tmp_path: Path) -> None:
        path = tmp_path / "killed.sqlite3"
        code = (
            "import anyio, sys, time\n"
            "from promptise_asgi.store import SQLiteStore\n"
            "anyio.run(SQLiteStore(sys.argv[1]).open)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "locked"
            with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
                anyio.run(SQLiteStore(path).open)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()

        async def reopen() -> None:
            store = SQLiteStore(path)
            await store.open()
            await store.close()

        anyio.run(reopen)

    async def test_recovery_in_acceptance_order_counts_crashes_and_buries_poison(self, tmp_path: Path) -> None:
        path = tmp_path / "r.sqlite3"
        store = SQLiteStore(path, clock=Clock(50.0))
        for index in range(4):
            await store.add(record(f"a{index}", "a"))
            await store.add(record(f"b{index}", "b"))
        await store.start_deliveries("a", [("a0", 1), ("a1", 1)])
        store.finish_delivery("a", "a0")
        # The runtime "dies" here: a1 is in flight; a new store on the file takes over.
        await store.flush()
        await store.close()
        for crash in (1, 2):
            store = SQLiteStore(path, clock=Clock(50.0))
            recovery = await store.recover("a", poison_after=3, max_dead_letters=10)
            assert [r.event_id for r in recovery.pending] == ["a1", "a2", "a3"]
            first = recovery.pending[0]
            assert (first.attempts, first.crashes, first.cut) == (crash, crash, True)
            assert recovery.pending[1].crashes == 0 and not recovery.pending[1].cut
            await store.start_deliveries("a", [("a1", crash + 1)])
            await store.close()
        store = SQLiteStore(path, clock=Clock(50.0))
        recovery = await store.recover("a", poison_after=3, max_dead_letters=10)
        assert [r.event_id for r in recovery.pending] == ["a2", "a3"]
        [dead] = recovery.dead
        assert (dead.event_id, dead.reason, dead.error, dead.attempts, dead.dead_at) == (
            "a1",
            "interrupted",
            None,
            3,
            50,
        )
        assert recovery.dead_letters == 1 and recovery.dropped == 0
        assert await store.pending_counts() == {"a": 2, "b": 4}
        other = await store.recover("b", poison_after=3, max_dead_letters=10)
        assert [r.event_id for r in other.pending] == ["b0", "b1", "b2", "b3"] and other.dead == []
        await store.close()

    async def test_release_and_failure_keep_the_counts_a_restart_needs(self, tmp_path: Path) -> None:
        path = tmp_path / "c.sqlite3"
        store = SQLiteStore(path)
        for event_id in ("x", "y", "z"):
            await store.add(record(event_id))
        await store.start_deliveries("p", [("x", 1), ("y", 1), ("z", 1)])
        store.release("p", [("x", 1, True), ("y", 0, False)])
        store.record_failure("p", "z", attempts=1, errors=1)
        await store.close()
        recovery = await store.recover("p", poison_after=3, max_dead_letters=10)
        counts = {r.event_id: (r.attempts, r.errors, r.crashes, r.cut) for r in recovery.pending}
        assert counts == {"x": (1, 0, 0, True), "y": (0, 0, 0, False), "z": (1, 1, 0, False)}
        await store.close()

    async def test_dead_letters_are_capped_listed_requeued_and_deleted(self, tmp_path: Path) -> None:
        store = SQLiteStore(tmp_path / "d.sqlite3")
        await store.add(record("held"))
        await store.add(record("e0"))
        assert await store.move_to_dead_letters(letter("e0", dead_at=1.0), max_dead_letters=3) == 0
        for index in range(1, 5):
            dropped = await store.move_to_dead_letters(letter(f"e{index}", dead_at=float(index)), max_dead_letters=3)
            assert dropped == (1 if index >= 3 else 0)
        assert [d.event_id for d in await store.dead_letters("p", 100)] == ["e2", "e3", "e4"]
        assert [d.event_id for d in await store.dead_letters("p", 2)] == ["e3", "e4"]
        assert await store.dead_letters("other", 5) == []
        assert (await store.dead_letters("p", 1))[0].to_dict() == {
            "event_id": "e4",
            "event": {"trigger_id": "t", "event_id": "e4"},
            "attempts": 2,
            "reason": "error",
            "error": "RuntimeError: boom",
            "dead_at": "1970-01-01T00:00:04+00:00",
        }
        requeued = await store.requeue_dead_letter("p", "e3")
        assert requeued is not None and (requeued.event_id, requeued.attempts, requeued.errors) == ("e3", 2, 0)
        assert await store.requeue_dead_letter("p", "e3") is None
        assert await store.delete_dead_letter("p", "e2") is True
        assert await store.delete_dead_letter("p", "e2") is False
        assert [d.event_id for d in await store.dead_letters("p", 100)] == ["e4"]
        # Queued again after every event held now, so a restart delivers it last.
        recovery = await store.recover("p", poison_after=3, max_dead_letters=3)
        assert [r.event_id for r in recovery.pending] == ["held", "e3"] and recovery.dead_letters == 1
        await store.close()

    async def test_a_failed_write_fails_every_caller_of_its_batch_and_the_store_goes_on(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = SQLiteStore(tmp_path / "f.sqlite3")
        await store.add(record("dup"))
        # Hold the first commit in its thread until the other two callers have joined the next batch.
        entered, release, write = threading.Event(), threading.Event(), SQLiteStore._write

        def held_write(self: SQLiteStore, ops: list[Any]) -> None:
            entered.set()
            release.wait(WAIT)
            write(self, ops)

        monkeypatch.setattr(SQLiteStore, "_write", held_write)
        outcome: dict[str, str] = {}

        async def add(event_id: str) -> None:
            try:
                await store.add(record(event_id))
            except EventStoreError as exc:
                outcome[event_id] = str(exc)
            else:
                outcome[event_id] = "ok"

        async with anyio.create_task_group() as tg:
            tg.start_soon(add, "first")
            await wait_for(entered.is_set, what="the first commit to start")
            tg.start_soon(add, "dup")
            tg.start_soon(add, "innocent")
            for _ in range(10):  # both run up to their wait on the first commit
                await anyio.lowlevel.checkpoint()
            release.set()
        assert outcome["first"] == "ok"
        assert "a write failed" in outcome["dup"] and "UNIQUE" in outcome["dup"]
        assert outcome["innocent"] == outcome["dup"]  # one transaction, one fate
        await store.add(record("later"))
        assert await store.pending_counts() == {"p": 3}
        await store.close()

    async def test_events_that_are_not_json_are_refused_before_anything_is_written(self, tmp_path: Path) -> None:
        store = SQLiteStore(tmp_path / "j.sqlite3")
        with pytest.raises(ValueError, match="JSON"):
            await store.add(EventRecord("p", "x", {"payload": {"when": object()}}))
        assert await store.pending_counts() == {}
        await store.close()

    async def test_a_store_that_cannot_be_created_or_read_says_which_file(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(EventStoreError, match="cannot create it"):
            await SQLiteStore(blocker / "sub" / "s.sqlite3").open()
        garbage = tmp_path / "garbage.sqlite3"
        garbage.write_bytes(b"not a database, " * 100)
        with pytest.raises(EventStoreError, match="not a usable store"):
            await SQLiteStore(garbage).open()
        with pytest.raises(EventStoreError, match="cannot open it"):
            await SQLiteStore(tmp_path).open()  # a directory
        newer = tmp_path / "newer.sqlite3"
        con = sqlite3.connect(newer)
        con.execute("PRAGMA user_version = 99")
        con.close()
        with pytest.raises(EventStoreError, match="newer promptise-asgi"):
            await SQLiteStore(newer).open()
        # A failed open leaves the lock free.
        store = SQLiteStore(tmp_path / "fine.sqlite3", synchronous="full")
        await store.open()
        assert store.synchronous == "full" and repr(store).startswith("SQLiteStore(")
        await store.close()


@pytest.fixture(params=["memory", "sqlite"])
async def keyed_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    clock = Clock()
    store: EventStore = (
        MemoryStore(clock=clock) if request.param == "memory" else SQLiteStore(tmp_path / "k", clock=clock)
    )
    yield store, clock
    await store.close()


class TestIdempotencyKeys:
    async def test_a_key_answers_its_first_event_until_it_expires(self, keyed_store: Any) -> None:
        store, clock = keyed_store
        key = IdempotencyKey("order-1", "fp", clock.now + 60)
        assert await store.add(record("first"), key) == "first"
        assert await store.add(record("second"), key) == "first"
        with pytest.raises(IdempotencyKeyConflictError) as info:
            await store.add(record("third"), IdempotencyKey("order-1", "other", clock.now + 60))
        assert info.value.event_id == "first" and info.value.key == "order-1" and "different body" in str(info.value)
        # Keys are per process.
        assert await store.add(record("elsewhere", "q"), key) == "elsewhere"
        clock.now += 61
        assert await store.add(record("fourth"), IdempotencyKey("order-1", "fp", clock.now + 60)) == "fourth"
        if store.durable:
            assert await store.pending_counts() == {"p": 2, "q": 1}  # "second" and "third" were never kept

    async def test_concurrent_requests_with_one_key_queue_one_event(self, keyed_store: Any) -> None:
        store, clock = keyed_store
        owners: list[str] = []

        async def add(event_id: str) -> None:
            owners.append(await store.add(record(event_id), IdempotencyKey("k", "fp", clock.now + 60)))

        async with anyio.create_task_group() as tg:
            for index in range(20):
                tg.start_soon(add, f"e{index}")
        assert len(set(owners)) == 1 and len(owners) == 20

    async def test_a_durable_key_survives_a_restart(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.sqlite3"
        store = SQLiteStore(path)
        await store.add(record("first"), IdempotencyKey("k", "fp", 4e9))
        await store.close()
        assert await SQLiteStore(path).add(record("again"), IdempotencyKey("k", "fp", 4e9)) == "first"


class TestMemoryStore:
    async def test_it_keeps_dead_letters_and_keys_but_no_events(self) -> None:
        store = MemoryStore()
        await store.open()
        assert (store.kind, store.durable, store.location) == ("memory", False, "memory")
        assert await store.add(record("e")) == "e"
        await store.start_deliveries("p", [("e", 1)])
        store.finish_delivery("p", "e")
        store.release("p", [("e", 1, True)])
        store.record_failure("p", "e", attempts=1, errors=1)
        await store.flush()
        assert await store.pending_counts() == {}
        for index in range(4):
            assert await store.move_to_dead_letters(letter(f"d{index}"), max_dead_letters=3) == (1 if index == 3 else 0)
        assert [d.event_id for d in await store.dead_letters("p", 2)] == ["d2", "d3"]
        assert await store.dead_letters("p", 0) == [] and await store.dead_letters("nobody", 5) == []
        recovery = await store.recover("p", poison_after=3, max_dead_letters=3)
        assert recovery.pending == [] and recovery.dead_letters == 3
        again = await store.requeue_dead_letter("p", "d1")
        assert again is not None and again.attempts == 2
        assert await store.requeue_dead_letter("p", "d1") is None
        assert await store.requeue_dead_letter("nobody", "d1") is None
        assert await store.delete_dead_letter("p", "d2") and not await store.delete_dead_letter("p", "d2")
        assert not await store.delete_dead_letter("nobody", "d2")
        await store.close()

    async def test_an_expired_key_left_behind_by_a_longer_ttl_is_not_honoured(self) -> None:
        clock = Clock()
        store = MemoryStore(clock=clock)
        await store.add(record("long"), IdempotencyKey("a", "fp", clock.now + 100))
        await store.add(record("short"), IdempotencyKey("b", "fp", clock.now + 10))
        clock.now += 50  # "b" expired, but sits behind "a", which did not
        assert await store.add(record("new"), IdempotencyKey("b", "fp", clock.now + 10)) == "new"
