"""The trainer's durable, append-only event log: one SQLite database in WAL mode.

Tables::

    events(seq PK, event_id UNIQUE, partition, offset, ts_ms, kind,
           user_id, item_id, action, value, payload)      the log
    offsets(topic, partition, next_offset)                where consumption resumes
    forgotten(user_id PK, forgotten_at_ms, reregistered)  tombstones of erased users
    meta(key PK, value)                                   running counters

Every poll batch is applied in ONE transaction: the new events (``INSERT OR
IGNORE`` on the unique event id, so a replay or a producer retry is a no-op),
the erasures, the counters and the next offset of every partition in the
batch. The database is therefore the source of truth for where consumption
resumes: data and offsets can only be durable together. Kafka's committed
offsets are written afterwards as an optimisation and for lag monitoring.

A "user forgotten" event deletes the user's rows and leaves a tombstone:
events of that user that arrive later are dropped when they are older than
the erasure, or newer but before the user registers again (a re-registration
is a new consent). Erasure runs with ``secure_delete`` on, so the deleted rows' bytes are
overwritten, not only unlinked.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from coldstart.v1 import events_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT,
    item_id TEXT,
    action TEXT,
    value REAL,
    -- Raw event bytes of registrations and item upserts (profile, text,
    -- attributes). NULL for interactions: the columns hold all of one but the
    -- producer name, and skipping ~100 bytes per row is ~30% of the insert rate.
    payload BLOB
);
CREATE INDEX IF NOT EXISTS events_user ON events(user_id) WHERE user_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS forgotten (
    user_id TEXT PRIMARY KEY,
    forgotten_at_ms INTEGER NOT NULL,
    reregistered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

CACHE_KIB = 64 * 1024
# Page size of a NEW log (an existing one keeps its own): 16 KiB pages cost
# ~10% less per inserted row than SQLite's default 4 KiB (fewer, shallower
# B-tree pages to search and split for the random-key dedupe index).
PAGE_SIZE = 16 * 1024
# The writer checkpoints the WAL into the database once it holds this much.
# SQLite's default (1000 pages) checkpoints after nearly every 20k-row group
# commit, and each checkpoint fsyncs twice: ~1.7 us per event on the writer
# thread against ~1 us with this (see docs/TRAINER.md, "Ingest rate").
WAL_CHECKPOINT_BYTES = 32 * 1024 * 1024
FORGOTTEN = "user_forgotten"
COUNTERS = ("applied", "duplicates", "dropped_forgotten", "forgotten_users", "dead_lettered")

INTERACTION = "interaction"
_INSERT = (
    "INSERT OR IGNORE INTO events "
    "(event_id, partition, offset, ts_ms, user_id, item_id, action, value, kind, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Interactions (nearly every event) bind 8 values, not 10: ~0.5 us less per row.
_INSERT_INTERACTION = (
    "INSERT OR IGNORE INTO events "
    "(event_id, partition, offset, ts_ms, user_id, item_id, action, value, kind, payload) "
    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, '{INTERACTION}', NULL)"
)

# A log row: (event_id, partition, offset, ts_ms, user_id, item_id, action,
# value) for an interaction (``_INSERT_INTERACTION``'s values), the same plus
# (kind, payload) for any other event (``_INSERT``'s).
InteractionRow = tuple[str, int, int, int, str, str, str, float]
OtherRow = tuple[
    str, int, int, int, str | None, str | None, str | None, float | None, str, bytes | None
]
Row = InteractionRow | OtherRow
# One poll batch: its rows, the next offset of every partition it touched, its dead letters.
Batch = tuple[Sequence[Row], Mapping[int, int], int]


class EventLogError(RuntimeError):
    """The log could not be written (disk full, read-only, corrupt); nothing was applied."""


class Incoming(NamedTuple):
    """One decoded event with where it came from and its raw bytes.

    A NamedTuple, not a dataclass: one is built per consumed event, and the
    ingest rate target leaves about a microsecond for it.
    """

    partition: int
    offset: int
    event: events_pb2.Event
    raw: bytes


@dataclass
class ApplyResult:
    applied: int = 0
    duplicates: int = 0
    dropped_forgotten: int = 0
    forgotten_users: int = 0
    dead_lettered: int = 0
    # user ids erased in this batch (the caller may tell other components)
    erased: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Tombstone:
    forgotten_at_ms: int
    reregistered: bool


def kind_of(row: Row) -> str:
    return row[8] if len(row) > 8 else INTERACTION


def row_of(item: Incoming) -> Row:
    """The row of a decoded event (see ``Row``).

    A ``user_forgotten`` event gives a row too (kind, user id and timestamp
    set, the rest empty): ``apply_rows`` erases the user at that point of the
    batch and never inserts it. ``services.trainer.ingest.split_batch`` builds
    the same rows straight from the wire bytes.
    """
    event = item.event
    kind = event.WhichOneof("payload")
    if kind == INTERACTION:
        it = event.interaction
        return (
            event.event_id, item.partition, item.offset, event.timestamp_ms,
            it.user_id, it.item_id, it.kind, it.value,
        )  # fmt: skip
    if kind == "user_registered":
        return (
            event.event_id, item.partition, item.offset, event.timestamp_ms,
            event.user_registered.user_id, None, None, None, kind, item.raw,
        )  # fmt: skip
    if kind == FORGOTTEN:
        return (
            event.event_id, item.partition, item.offset, event.timestamp_ms,
            event.user_forgotten.user_id, None, None, None, kind, None,
        )  # fmt: skip
    assert kind == "item_upserted"  # decode_event refuses events without a payload
    return (
        event.event_id, item.partition, item.offset, event.timestamp_ms,
        None, event.item_upserted.item_id, None, None, kind, item.raw,
    )  # fmt: skip


def connect(
    path: Path, *, synchronous: str = "NORMAL", timeout_s: float = 30.0, page_size: int = 0
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit BEGIN/COMMIT).

    ``page_size`` applies only when this creates the database (SQLite ignores
    it for an existing one in WAL mode).
    """
    conn = sqlite3.connect(
        str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False
    )
    if page_size:
        conn.execute(f"PRAGMA page_size = {int(page_size)}")  # before WAL mode: it fixes the size
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    # The dedupe index takes random UUID keys: a batch touches pages all over
    # it, and a 2 MB default cache halves the insert rate once it outgrows it.
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    return conn


class EventLog:
    """The writer side (one per process) plus read helpers on separate connections."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = connect(self.path, synchronous=synchronous, page_size=PAGE_SIZE)
            self._conn.executescript(SCHEMA)
            (page,) = self._conn.execute("PRAGMA page_size").fetchone()
            pages = max(1000, WAL_CHECKPOINT_BYTES // int(page))
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
        except sqlite3.Error as exc:
            raise EventLogError(f"cannot open the event log {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._tombstones = self._load_tombstones(self._conn)

    # -- writing ----------------------------------------------------------
    def apply(
        self,
        topic: str,
        events: Sequence[Incoming],
        next_offsets: Mapping[int, int],
        *,
        dead_lettered: int = 0,
    ) -> ApplyResult:
        """``apply_rows`` for decoded events (``Incoming``)."""
        rows = [row_of(item) for item in events]
        return self.apply_rows(topic, rows, next_offsets, dead_lettered=dead_lettered)

    def apply_rows(
        self,
        topic: str,
        rows: Sequence[Row],
        next_offsets: Mapping[int, int],
        *,
        dead_lettered: int = 0,
    ) -> ApplyResult:
        """Apply one batch atomically: events, erasures, counters and offsets.

        ``rows`` (see ``row_of``) must be in offset order per partition; a
        ``user_forgotten`` row erases its user at that point of the batch.
        ``next_offsets`` holds, for every partition the batch touched
        (dead-lettered records included), the offset after the last record.
        Raises EventLogError with nothing applied when the database cannot be
        written.
        """
        return self.apply_batches(topic, [(rows, next_offsets, dead_lettered)])

    def apply_batches(self, topic: str, batches: Sequence[Batch]) -> ApplyResult:
        """Apply several batches (``apply_rows``'s arguments each, in the order
        they were read) in ONE transaction: all of them with their offsets, or
        none. The log writer groups what its consumers sent while it was busy."""
        result = ApplyResult(dead_lettered=sum(batch[2] for batch in batches))
        tombstones = dict(self._tombstones)
        offsets: dict[int, int] = {}
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                for rows, next_offsets, _dead in batches:
                    if self._plain(rows, tombstones):
                        # No erasure in the batch and no erased user in it: one
                        # executemany over the batch, no per-row Python work.
                        self._flush(conn, rows, result)
                    else:
                        self._apply_slow(conn, rows, tombstones, result)
                    offsets.update(next_offsets)
                conn.executemany(
                    "INSERT INTO offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
                    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                    [(topic, p, o) for p, o in offsets.items()],
                )
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                    [
                        ("applied", result.applied),
                        ("duplicates", result.duplicates),
                        ("dropped_forgotten", result.dropped_forgotten),
                        ("forgotten_users", result.forgotten_users),
                        ("dead_lettered", result.dead_lettered),
                    ],
                )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise EventLogError(f"writing the event log {self.path} failed: {exc}") from exc
            self._tombstones = tombstones
        return result

    @staticmethod
    def _plain(rows: Sequence[Row], tombstones: Mapping[str, _Tombstone]) -> bool:
        """True when no row of the batch is an erasure or belongs to an erased user."""
        if tombstones:
            return not any(
                row[4] in tombstones or (len(row) > 8 and row[8] == FORGOTTEN) for row in rows
            )
        return not any(len(row) > 8 and row[8] == FORGOTTEN for row in rows)

    def _apply_slow(
        self,
        conn: sqlite3.Connection,
        rows: Sequence[Row],
        tombstones: dict[str, _Tombstone],
        result: ApplyResult,
    ) -> None:
        pending: list[Row] = []
        for row in rows:
            kind, user = kind_of(row), row[4]
            if kind == FORGOTTEN:
                assert user is not None
                self._flush(conn, pending, result)
                pending.clear()
                self._forget(conn, user, row[3], tombstones, result)
                continue
            if user is not None and user in tombstones:
                stone = tombstones[user]
                if row[3] <= stone.forgotten_at_ms:
                    result.dropped_forgotten += 1
                    continue
                if kind == "user_registered":
                    tombstones[user] = _Tombstone(stone.forgotten_at_ms, True)
                    self._flush(conn, pending, result)
                    pending.clear()
                    conn.execute("UPDATE forgotten SET reregistered = 1 WHERE user_id = ?", (user,))
                elif not stone.reregistered:
                    result.dropped_forgotten += 1
                    continue
            pending.append(row)
        self._flush(conn, pending, result)

    @staticmethod
    def _flush(conn: sqlite3.Connection, rows: Sequence[Row], result: ApplyResult) -> None:
        if not rows:
            return
        before = conn.total_changes
        if len(rows[0]) == 8 and len(rows[-1]) == 8 and all(len(row) == 8 for row in rows):
            conn.executemany(_INSERT_INTERACTION, rows)
        else:
            # In order: the first of two rows with one event id is the one kept.
            for arity, run in itertools.groupby(rows, len):
                conn.executemany(_INSERT_INTERACTION if arity == 8 else _INSERT, run)
        inserted = conn.total_changes - before
        result.applied += inserted
        result.duplicates += len(rows) - inserted

    @staticmethod
    def _forget(
        conn: sqlite3.Connection,
        user: str,
        ts: int,
        tombstones: dict[str, _Tombstone],
        result: ApplyResult,
    ) -> None:
        previous = tombstones.get(user)
        if previous is not None and ts <= previous.forgotten_at_ms:
            # A replay (or an older duplicate) of an erasure already done: doing
            # it again would also erase what the user did after re-registering.
            result.duplicates += 1
            return
        # Overwrite the deleted rows' bytes, not just unlink them. Only here:
        # secure_delete on every insert (page splits) costs about 30% of the rate.
        conn.execute("PRAGMA secure_delete = ON")
        try:
            conn.execute("DELETE FROM events WHERE user_id = ?", (user,))
        finally:
            conn.execute("PRAGMA secure_delete = OFF")
        forgotten_at = ts
        conn.execute(
            "INSERT INTO forgotten (user_id, forgotten_at_ms, reregistered) VALUES (?, ?, 0) "
            "ON CONFLICT (user_id) DO UPDATE SET forgotten_at_ms = excluded.forgotten_at_ms, "
            "reregistered = 0",
            (user, forgotten_at),
        )
        tombstones[user] = _Tombstone(forgotten_at, False)
        result.forgotten_users += 1
        result.erased.append(user)

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()

    # -- reading ----------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A separate connection inside one read transaction (a consistent snapshot)."""
        conn = connect(self.path, synchronous=self.synchronous)
        try:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")
        finally:
            conn.close()

    def stored_offsets(self, topic: str) -> dict[int, int]:
        with self.reader() as conn:
            rows = conn.execute(
                "SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)
            ).fetchall()
        return {int(p): int(o) for p, o in rows}

    def counters(self) -> dict[str, int]:
        with self.reader() as conn:
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return {name: int(rows.get(name, 0)) for name in COUNTERS}

    def event_count(self) -> int:
        with self.reader() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
        return int(count)

    def forgotten_users(self) -> set[str]:
        return set(self._tombstones)

    @staticmethod
    def _load_tombstones(conn: sqlite3.Connection) -> dict[str, _Tombstone]:
        rows = conn.execute(
            "SELECT user_id, forgotten_at_ms, reregistered FROM forgotten"
        ).fetchall()
        return {str(u): _Tombstone(int(t), bool(r)) for u, t, r in rows}
