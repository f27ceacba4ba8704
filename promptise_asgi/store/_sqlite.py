"""`SQLiteStore`: accepted events that survive a crash, in one SQLite file, with group commit.

The standard library's `sqlite3` in WAL mode, driven from a worker thread through `anyio.to_thread`, so it runs
under asyncio and trio alike (aiosqlite is asyncio-only). Writes from any number of tasks are queued into one
open batch; one caller at a time becomes the flusher and commits the whole batch as one transaction, and every
caller is answered once the transaction holding its write has committed. One live runtime per file: an
exclusive `flock` on `<file>.lock`, which the kernel releases when the process dies, even by `kill -9`.
Knows nothing of the runtime, its events or HTTP: it keeps plain records.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import orjson

from .._errors import EventStoreError, StoreLockedError
from ._base import DeadLetter, Delivery, EventRecord, IdempotencyKey, Recovery
from ._sql import SCHEMA, SCHEMA_VERSION, WRITERS, Out

__all__ = ["SQLiteStore"]

logger = logging.getLogger("promptise_asgi.store")

_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}
# Expired idempotency keys are deleted by a commit at most this often.
KEY_PURGE_INTERVAL = 60.0


class _Batch:
    """Writes that commit together, and the event their callers wait on."""

    __slots__ = ("done", "error", "ops")

    def __init__(self) -> None:
        self.ops: list[tuple[str, Any]] = []
        self.done = anyio.Event()
        self.error: BaseException | None = None


class SQLiteStore:
    """An event store in one SQLite file: accepted events survive a crash of the process that holds them.

    Args:
        path: the database file; its directory is created if missing. A relative path is relative to the
            working directory. `<path>.lock` is kept beside it, held while a runtime uses the store.
        synchronous: `"normal"` (the default) survives a crash of the process (`kill -9`, OOM); a power cut
            or an OS crash may lose the last commits. `"full"` flushes every commit to the disk, so it also
            survives a power cut, at the cost of one fsync per commit.
        clock: wall clock in epoch seconds, for dead letter times and idempotency key expiry.

    Raises:
        ValueError: `synchronous` is neither `"normal"` nor `"full"`.
    """

    kind = "sqlite"
    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["normal", "full"] = "normal",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self._path = Path(path)
        self._synchronous = synchronous
        self._clock = clock
        self._con: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._opening = anyio.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        self._open_batch: _Batch | None = None
        self._flushing: _Batch | None = None
        self._next_purge = 0.0
        self._commits = 0

    @property
    def location(self) -> str:
        """The database file, as an absolute path."""
        return str(self._path.absolute())

    @property
    def synchronous(self) -> str:
        """`"normal"` or `"full"`."""
        return self._synchronous

    @property
    def commits(self) -> int:
        """Transactions committed since this object was created (a group commit counts once)."""
        return self._commits

    # -- opening and closing -----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the file, open it and create its tables; opening an open store does nothing.

        Raises:
            StoreLockedError: another live runtime holds the file.
            EventStoreError: the file cannot be created or is not a store this version can use.
        """
        if self._con is not None:
            return
        async with self._opening:
            if self._con is not None:
                return
            self._limiter = anyio.CapacityLimiter(1)
            await anyio.to_thread.run_sync(self._open_file, limiter=self._limiter)
        logger.info("event store: SQLite file %s (WAL, synchronous=%s)", self.location, self._synchronous)

    def _open_file(self) -> None:
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EventStoreError(f"event store {self.location}: cannot create it ({exc})") from None
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(lock, 32, 0).decode(errors="replace").strip()
                raise StoreLockedError(self.location, f"pid {holder}" if holder.isdigit() else "") from None
            os.ftruncate(lock, 0)
            os.pwrite(lock, str(os.getpid()).encode(), 0)
            self._con = self._connect()
        except BaseException:
            os.close(lock)  # also releases the lock
            raise
        self._lock_fd = lock

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise EventStoreError(f"event store {self.location}: cannot open it ({exc})") from None
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise EventStoreError(
                    f"event store {self.location} was written by a newer promptise-asgi (schema {version})"
                )
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise EventStoreError(f"event store {self.location}: WAL journal mode unavailable ({mode})")
            con.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self._synchronous]}")
            con.executescript(SCHEMA)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            con.close()
            raise EventStoreError(f"event store {self.location}: not a usable store ({exc})") from None
        except BaseException:
            con.close()
            raise
        return con

    async def close(self) -> None:
        """Commit what is queued, close the file and release its lock; the store opens again on next use."""
        if self._con is None:
            return
        await self.flush()
        async with self._opening:
            con, lock = self._con, self._lock_fd
            if con is None:  # pragma: no cover - closed by a concurrent close()
                return
            self._con = self._lock_fd = None
            await anyio.to_thread.run_sync(con.close, limiter=self._limiter)
            if lock is not None:
                os.close(lock)

    # -- group commit ------------------------------------------------------------------------------------------

    def _submit(self, op: tuple[str, Any]) -> _Batch:
        batch = self._open_batch
        if batch is None:
            batch = self._open_batch = _Batch()
        batch.ops.append(op)
        return batch

    async def _commit(self, batch: _Batch) -> None:
        """Return once `batch` is committed, committing it (and whatever joined it) if no one else is."""
        while not batch.done.is_set():
            flushing = self._flushing
            if flushing is not None:
                await flushing.done.wait()
                continue
            if self._con is None:
                await self.open()
                continue
            # Nothing is being written and `batch` is not done, so it is the open batch: take it, and let
            # writes made meanwhile gather in a new one for the next flusher.
            current = self._open_batch
            assert current is batch
            self._open_batch = None
            self._flushing = current
            try:
                # Shielded: a flusher cancelled mid-write must still tell its batch how the write ended.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._write, current.ops, limiter=self._limiter)
            except BaseException as exc:
                current.error = exc
                if not isinstance(exc, Exception):
                    raise
                logger.error("event store %s: a commit of %d write(s) failed: %s", self.location, len(current.ops), exc)
            finally:
                self._flushing = None
                current.done.set()
        if batch.error is not None:
            raise EventStoreError(f"event store {self.location}: a write failed ({batch.error})") from batch.error

    async def flush(self) -> None:
        """Commit every write queued so far (and wait for the commit under way)."""
        batch = self._open_batch or self._flushing
        if batch is not None:
            await self._commit(batch)

    def _write(self, ops: list[tuple[str, Any]]) -> None:
        con = self._con
        assert con is not None
        con.execute("BEGIN IMMEDIATE")
        now = self._clock()
        try:
            start, count = 0, len(ops)
            while start < count:
                kind = ops[start][0]
                end = start + 1
                while end < count and ops[end][0] == kind:
                    end += 1
                WRITERS[kind](con, [op[1] for op in ops[start:end]], now)
                start = end
            if now >= self._next_purge:
                con.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
                self._next_purge = now + KEY_PURGE_INTERVAL
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        self._commits += 1

    async def _read(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._con is None:
            await self.open()

        def run() -> Any:
            con = self._con
            assert con is not None
            return query(con)

        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    # -- the EventStore protocol ---------------------------------------------------------------------------------

    async def recover(self, process: str, *, poison_after: int, max_dead_letters: int) -> Recovery:
        """Load the events kept for `process`; those in flight when a runtime died count one more crash.

        An event that reaches `poison_after` crashes in a row moves to the dead letters (reason
        `"interrupted"`); the others wait again, in acceptance order.
        """
        out = Out()
        await self._commit(self._submit(("recover", (process, poison_after, max_dead_letters, out))))
        recovery: Recovery = out.value
        return recovery

    async def add(self, record: EventRecord, key: IdempotencyKey | None = None) -> str:
        """Keep an accepted event (with its key); returns once committed.

        Raises:
            ValueError: the event's fields cannot be written as JSON.
            IdempotencyKeyConflictError: the key is known with another fingerprint.
            EventStoreError: the commit failed.
        """
        blob = _encode(record.fields)
        if key is None:
            await self._commit(self._submit(("add", (record.process, record.event_id, blob))))
            return record.event_id
        out = Out()
        await self._commit(self._submit(("add_keyed", (record, key, blob, out))))
        if out.error is not None:
            raise out.error
        owner: str = out.value
        return owner

    async def start_deliveries(self, process: str, deliveries: Sequence[Delivery]) -> None:
        """Mark events in flight (with the number of their delivery); returns once committed."""
        batch: _Batch | None = None
        for event_id, attempts in deliveries:
            batch = self._submit(("start", (attempts, process, event_id)))
        if batch is not None:
            await self._commit(batch)

    def finish_delivery(self, process: str, event_id: str) -> None:
        """Forget a delivered event, with the next commit."""
        self._submit(("finish", (process, event_id)))

    def release(self, process: str, deliveries: Sequence[tuple[str, int, bool]]) -> None:
        """Put events marked in flight back to waiting, with the next commit."""
        for event_id, attempts, cut in deliveries:
            self._submit(("release", (attempts, int(cut), process, event_id)))

    def record_failure(self, process: str, event_id: str, *, attempts: int, errors: int) -> None:
        """Record a failed delivery that will be retried, with the next commit."""
        self._submit(("failure", (attempts, errors, process, event_id)))

    async def move_to_dead_letters(self, letter: DeadLetter, *, max_dead_letters: int) -> int:
        """Move an event to the dead letters; returns how many of the oldest were dropped."""
        out = Out()
        await self._commit(self._submit(("dead", (letter, _encode(letter.fields), max_dead_letters, out))))
        dropped: int = out.value
        return dropped

    async def dead_letters(self, process: str, limit: int) -> list[DeadLetter]:
        """The newest `limit` dead letters of `process`, oldest first."""

        def query(con: sqlite3.Connection) -> list[DeadLetter]:
            rows = con.execute(
                "SELECT event_id, fields, attempts, reason, error, dead_at FROM dead_letters WHERE process = ? "
                "ORDER BY seq DESC LIMIT ?",
                (process, max(limit, 0)),
            ).fetchall()
            return [DeadLetter(process, row[0], orjson.loads(row[1]), *row[2:]) for row in reversed(rows)]

        letters: list[DeadLetter] = await self._read(query)
        return letters

    async def requeue_dead_letter(self, process: str, event_id: str) -> EventRecord | None:
        """Move a dead letter back to the events, after every event kept now; None if unknown."""
        out = Out()
        await self._commit(self._submit(("requeue", (process, event_id, out))))
        record: EventRecord | None = out.value
        return record

    async def delete_dead_letter(self, process: str, event_id: str) -> bool:
        """Delete a dead letter; False if unknown."""
        out = Out()
        await self._commit(self._submit(("delete_dead", (process, event_id, out))))
        return bool(out.value)

    async def pending_counts(self) -> dict[str, int]:
        """How many events are kept per process name."""
        await self.flush()
        rows = await self._read(
            lambda con: con.execute("SELECT process, COUNT(*) FROM events GROUP BY process").fetchall()
        )
        return {str(name): int(count) for name, count in rows}

    def __repr__(self) -> str:
        return f"SQLiteStore({self.location!r}, synchronous={self._synchronous!r})"


def _encode(fields: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(fields)
    except TypeError as exc:
        raise ValueError(f"the SQLite store keeps events as JSON, and this one is not: {exc}") from None
