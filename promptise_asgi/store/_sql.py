"""The SQL of the SQLite event store: its schema, and one writer per kind of write.

Writers run on the store's worker thread, inside the one transaction of a group commit: plain functions of a
connection, the rows of consecutive writes of one kind, and the commit's wall-clock time. No threads, locks or
event loops here (`_sqlite` has those), and nothing of the runtime or HTTP.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import orjson

from .._errors import IdempotencyKeyConflictError
from ._base import DeadLetter, EventRecord, Recovery, key_owner

__all__ = ["SCHEMA", "SCHEMA_VERSION", "WRITERS", "Out"]

SCHEMA_VERSION = 1
# seq orders events as they were accepted: a new row's rowid is above every row the table holds.
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    process TEXT NOT NULL,
    event_id TEXT NOT NULL,
    fields BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    cut INTEGER NOT NULL DEFAULT 0,
    in_flight INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_id ON events (process, event_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    process TEXT NOT NULL,
    event_id TEXT NOT NULL,
    fields BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    error TEXT,
    dead_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_by_id ON dead_letters (process, event_id);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    process TEXT NOT NULL,
    key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (process, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_by_expiry ON idempotency_keys (expires_at);
"""


class Out:
    """Where a write that answers something (a key's owner, a dead letter found or not) puts its answer."""

    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: Exception | None = None


def _write_add(con: sqlite3.Connection, rows: list[Any], now: float) -> None:
    con.executemany("INSERT INTO events (process, event_id, fields) VALUES (?, ?, ?)", rows)


def _write_add_keyed(con: sqlite3.Connection, ops: list[Any], now: float) -> None:
    for record, key, blob, out in ops:
        row = con.execute(
            "SELECT event_id, fingerprint FROM idempotency_keys WHERE process = ? AND key = ? AND expires_at > ?",
            (record.process, key.key, now),
        ).fetchone()
        try:
            out.value = key_owner(record.process, key, row, record.event_id)
        except IdempotencyKeyConflictError as exc:
            out.error = exc
            continue
        if row is None:
            con.execute(
                "INSERT INTO events (process, event_id, fields) VALUES (?, ?, ?)",
                (record.process, record.event_id, blob),
            )
            con.execute(
                "INSERT OR REPLACE INTO idempotency_keys (process, key, event_id, fingerprint, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.process, key.key, record.event_id, key.fingerprint, key.expires_at),
            )


def _write_start(con: sqlite3.Connection, rows: list[Any], now: float) -> None:
    con.executemany("UPDATE events SET in_flight = 1, attempts = ? WHERE process = ? AND event_id = ?", rows)


def _write_finish(con: sqlite3.Connection, rows: list[Any], now: float) -> None:
    con.executemany("DELETE FROM events WHERE process = ? AND event_id = ?", rows)


def _write_release(con: sqlite3.Connection, rows: list[Any], now: float) -> None:
    con.executemany("UPDATE events SET in_flight = 0, attempts = ?, cut = ? WHERE process = ? AND event_id = ?", rows)


def _write_failure(con: sqlite3.Connection, rows: list[Any], now: float) -> None:
    con.executemany(
        "UPDATE events SET in_flight = 0, attempts = ?, errors = ?, crashes = 0, cut = 0 "
        "WHERE process = ? AND event_id = ?",
        rows,
    )


def _write_dead(con: sqlite3.Connection, ops: list[Any], now: float) -> None:
    for letter, blob, max_dead_letters, out in ops:
        _bury(con, letter, blob)
        out.value = _trim_dead_letters(con, letter.process, max_dead_letters)


def _bury(con: sqlite3.Connection, letter: DeadLetter, blob: bytes) -> None:
    con.execute("DELETE FROM events WHERE process = ? AND event_id = ?", (letter.process, letter.event_id))
    con.execute("DELETE FROM dead_letters WHERE process = ? AND event_id = ?", (letter.process, letter.event_id))
    con.execute(
        "INSERT INTO dead_letters (process, event_id, fields, attempts, reason, error, dead_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (letter.process, letter.event_id, blob, letter.attempts, letter.reason, letter.error, letter.dead_at),
    )


def _trim_dead_letters(con: sqlite3.Connection, process: str, keep: int) -> int:
    count = con.execute("SELECT COUNT(*) FROM dead_letters WHERE process = ?", (process,)).fetchone()[0]
    if count <= keep:
        return 0
    con.execute(
        "DELETE FROM dead_letters WHERE seq IN (SELECT seq FROM dead_letters WHERE process = ? ORDER BY seq LIMIT ?)",
        (process, count - keep),
    )
    return int(count - keep)


def _write_requeue(con: sqlite3.Connection, ops: list[Any], now: float) -> None:
    for process, event_id, out in ops:
        row = con.execute(
            "SELECT fields, attempts FROM dead_letters WHERE process = ? AND event_id = ?", (process, event_id)
        ).fetchone()
        if row is None:
            continue
        con.execute("DELETE FROM dead_letters WHERE process = ? AND event_id = ?", (process, event_id))
        con.execute(
            "INSERT INTO events (process, event_id, fields, attempts) VALUES (?, ?, ?, ?)",
            (process, event_id, row[0], row[1]),
        )
        out.value = EventRecord(process, event_id, orjson.loads(row[0]), attempts=row[1])


def _write_delete_dead(con: sqlite3.Connection, ops: list[Any], now: float) -> None:
    for process, event_id, out in ops:
        cursor = con.execute("DELETE FROM dead_letters WHERE process = ? AND event_id = ?", (process, event_id))
        out.value = cursor.rowcount > 0


def _write_recover(con: sqlite3.Connection, ops: list[Any], now: float) -> None:
    for process, poison_after, max_dead_letters, out in ops:
        recovery = Recovery()
        rows = con.execute(
            "SELECT event_id, fields, attempts, errors, crashes, cut, in_flight FROM events "
            "WHERE process = ? ORDER BY seq",
            (process,),
        ).fetchall()
        for event_id, blob, attempts, errors, crashes, cut, in_flight in rows:
            fields = orjson.loads(blob)
            if not in_flight:
                recovery.pending.append(EventRecord(process, event_id, fields, attempts, errors, crashes, bool(cut)))
                continue
            crashes += 1
            if crashes >= poison_after:
                letter = DeadLetter(process, event_id, fields, attempts, "interrupted", None, now)
                _bury(con, letter, blob)
                recovery.dead.append(letter)
                continue
            con.execute(
                "UPDATE events SET in_flight = 0, crashes = ?, cut = 1 WHERE process = ? AND event_id = ?",
                (crashes, process, event_id),
            )
            recovery.pending.append(EventRecord(process, event_id, fields, attempts, errors, crashes, True))
        recovery.dropped = _trim_dead_letters(con, process, max_dead_letters)
        recovery.dead_letters = con.execute(
            "SELECT COUNT(*) FROM dead_letters WHERE process = ?", (process,)
        ).fetchone()[0]
        out.value = recovery


WRITERS: dict[str, Callable[[sqlite3.Connection, list[Any], float], None]] = {
    "add": _write_add,
    "add_keyed": _write_add_keyed,
    "start": _write_start,
    "finish": _write_finish,
    "release": _write_release,
    "failure": _write_failure,
    "dead": _write_dead,
    "requeue": _write_requeue,
    "delete_dead": _write_delete_dead,
    "recover": _write_recover,
}
