"""The node's SQLite store: raw signed messages and local state that must survive a crash.

Why stdlib sqlite3 and not aiosqlite: aiosqlite needs an asyncio event loop and fails under trio
("no current event loop"). It is itself one thread running sqlite3, so we do the same directly:
one connection, every call run by ``trio.to_thread.run_sync`` under a ``CapacityLimiter(1)``, so
exactly one store operation runs at a time and the trio loop never blocks on disk. Calls are not
abandoned on cancellation: a write that started finishes (and commits) before the caller unwinds.

Durability: WAL journal with ``synchronous=FULL``. Each write method is its own transaction and
commits before it returns, and under FULL the commit fsyncs the WAL, so a record we acknowledged to
a peer survives a process crash *and* an OS crash or power loss. ``NORMAL`` in WAL mode survives a
process crash too, but may lose the last commits on power loss; a heartbeat or receipt we already
acknowledged must not vanish, and the write rate is a few per second per agreement, so the fsync is
worth its cost (measured in tests/benchmarks/bench_store.py). ``synchronous`` is a parameter for
benchmarks and tests on tmpfs.

What is stored: raw canonical message bytes as BLOBs (offers, heartbeats, receipts, evidence) plus
the few fields we index or look up by. Decoding and verifying is the protocol layer's job; this
module imports nothing from ``protocol/``. Times are unix seconds passed in by the caller.

Schema changes: append a migration to :data:`MIGRATIONS`; ``PRAGMA user_version`` records how many
have been applied, each in its own transaction. A database newer than this code is refused.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

T = TypeVar("T")

MIGRATIONS: list[list[str]] = [
    # 1: initial schema
    [
        """CREATE TABLE offers_seen (
            provider_key BLOB NOT NULL,
            seq INTEGER NOT NULL,
            digest BLOB NOT NULL,
            raw BLOB NOT NULL,
            received_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (provider_key, seq)
        ) WITHOUT ROWID""",
        "CREATE INDEX offers_seen_expires ON offers_seen (expires_at)",
        """CREATE TABLE peers (
            peer_id TEXT PRIMARY KEY,
            addrs TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL
        )""",
        """CREATE TABLE agreements (
            id BLOB PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('renter', 'provider')),
            state TEXT NOT NULL,
            terms BLOB NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX agreements_state ON agreements (state)",
        """CREATE TABLE heartbeats (
            agreement_id BLOB NOT NULL REFERENCES agreements (id),
            seq INTEGER NOT NULL,
            raw BLOB NOT NULL,
            hash BLOB NOT NULL,
            received_at REAL NOT NULL,
            PRIMARY KEY (agreement_id, seq)
        ) WITHOUT ROWID""",
        """CREATE TABLE receipts (
            agreement_id BLOB NOT NULL REFERENCES agreements (id),
            acked_seconds INTEGER NOT NULL,
            raw BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (agreement_id, acked_seconds)
        ) WITHOUT ROWID""",
        """CREATE TABLE evidence (
            id INTEGER PRIMARY KEY,
            subject_key BLOB NOT NULL,
            kind TEXT NOT NULL,
            raw BLOB NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX evidence_subject ON evidence (subject_key)",
        """CREATE TABLE reputation (
            subject_key BLOB PRIMARY KEY,
            score REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        )""",
    ],
    # 2: every receipt of a rental by the heartbeat it answers. `receipts` keeps one row per
    # acked_seconds (the first), which is enough to claim but loses the later receipts' nonces;
    # restarting a rental needs them (node.node, specs/node.md "Restart and resume").
    [
        """CREATE TABLE rental_receipts (
            agreement_id BLOB NOT NULL REFERENCES agreements (id),
            heartbeat_seq INTEGER NOT NULL,
            acked_seconds INTEGER NOT NULL,
            raw BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (agreement_id, heartbeat_seq)
        ) WITHOUT ROWID""",
    ],
]


class StoreError(Exception):
    """The database cannot be used by this version of the code."""


@dataclass(frozen=True)
class OfferRow:
    provider_key: bytes
    seq: int
    digest: bytes
    raw: bytes
    received_at: float
    expires_at: float


@dataclass(frozen=True)
class AgreementRow:
    id: bytes
    role: str
    state: str
    terms: bytes
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class HeartbeatRow:
    agreement_id: bytes
    seq: int
    raw: bytes
    hash: bytes
    received_at: float


@dataclass(frozen=True)
class ReceiptRow:
    agreement_id: bytes
    acked_seconds: int
    raw: bytes
    created_at: float


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing is left uncommitted.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal" and path != ":memory:":
            raise StoreError(f"could not enable WAL on {path} (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One BEGIN IMMEDIATE transaction around the block: committed at its end, rolled back on
    any exception (cancellation included) or a failed commit, which is then re-raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database schema version {version} is newer than this code ({len(MIGRATIONS)});"
            " upgrade gpumarket"
        )
    for number in range(version + 1, len(MIGRATIONS) + 1):
        with _transaction(conn):
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")


class Store:
    """Async facade over one sqlite3 connection; open with ``await Store.open(path)``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> Store:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"unsupported synchronous mode {synchronous!r}")
        conn = await trio.to_thread.run_sync(_connect, os.fspath(path), synchronous.upper())
        return cls(conn)

    async def close(self) -> None:
        await self._run(self._conn.close)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        """One statement in one committed transaction; returns the number of rows changed."""
        with _transaction(self._conn) as conn:
            return conn.execute(sql, params).rowcount

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        return self._conn.execute(sql, params).fetchone()

    # ---- maintenance ----
    async def schema_version(self) -> int:
        return (await self._run(self._one, "PRAGMA user_version"))[0]

    async def integrity_check(self) -> str:
        return (await self._run(self._one, "PRAGMA integrity_check"))[0]

    # ---- offers ----
    async def put_offer(
        self, provider_key: bytes, seq: int, digest: bytes, raw: bytes, received_at: float, expires_at: float
    ) -> bool:
        """Record an offer; False if (provider_key, seq) is already stored (kept unchanged)."""
        return 1 == await self._run(
            self._write,
            "INSERT OR IGNORE INTO offers_seen VALUES (?, ?, ?, ?, ?, ?)",
            (provider_key, seq, digest, raw, received_at, expires_at),
        )

    async def get_offer(self, provider_key: bytes, seq: int) -> OfferRow | None:
        row = await self._run(
            self._one, "SELECT * FROM offers_seen WHERE provider_key = ? AND seq = ?", (provider_key, seq)
        )
        return OfferRow(*row) if row else None

    async def live_offers(self, now: float) -> list[OfferRow]:
        """The newest unexpired offer per provider."""
        rows = await self._run(
            self._all,
            """SELECT o.* FROM offers_seen o
               JOIN (SELECT provider_key, MAX(seq) AS seq FROM offers_seen
                     WHERE expires_at > ? GROUP BY provider_key) m
               USING (provider_key, seq) ORDER BY o.provider_key""",
            (now,),
        )
        return [OfferRow(*r) for r in rows]

    async def put_offers(self, rows: list[tuple[bytes, int, bytes, bytes, float, float]]) -> int:
        """Record many offers (provider_key, seq, digest, raw, received_at, expires_at) in one
        transaction; rows whose (provider_key, seq) is already stored are skipped. Each row
        replaces its provider's offers of lower seq (superseded: the book holds one offer per
        provider, and so does the table). Returns how many were inserted."""

        def go() -> int:
            with _transaction(self._conn) as conn:
                before = conn.total_changes
                conn.executemany("INSERT OR IGNORE INTO offers_seen VALUES (?, ?, ?, ?, ?, ?)", rows)
                inserted = conn.total_changes - before
                conn.executemany("DELETE FROM offers_seen WHERE provider_key = ? AND seq < ?",
                                 [(r[0], r[1]) for r in rows])
            return inserted

        return await self._run(go) if rows else 0

    async def offers_of(self, provider_key: bytes) -> list[OfferRow]:
        rows = await self._run(
            self._all, "SELECT * FROM offers_seen WHERE provider_key = ? ORDER BY seq", (provider_key,)
        )
        return [OfferRow(*r) for r in rows]

    async def prune_expired_offers(self, now: float) -> int:
        return await self._run(self._write, "DELETE FROM offers_seen WHERE expires_at <= ?", (now,))

    async def delete_offers_upto(self, rows: list[tuple[bytes, int]]) -> int:
        """Delete each provider's offers with seq <= the given one (offers the book evicted or
        saw withdrawn), in one transaction; returns how many rows went. With put_offers (one row
        per provider) and prune_expired_offers (on a schedule), ``offers_seen`` holds about the
        offers the book holds (specs/node.md, "Offer store bound")."""

        def go() -> int:
            with _transaction(self._conn) as conn:
                before = conn.total_changes
                conn.executemany("DELETE FROM offers_seen WHERE provider_key = ? AND seq <= ?", rows)
                deleted = conn.total_changes - before
            return deleted

        return await self._run(go) if rows else 0

    async def offer_rows(self) -> tuple[int, int]:
        """(rows, bytes of raw offers) in offers_seen."""
        return await self._run(self._one, "SELECT COUNT(*), COALESCE(SUM(LENGTH(raw)), 0) FROM offers_seen")

    # ---- peers ----
    async def upsert_peer(self, peer_id: str, addrs: list[str], now: float) -> None:
        await self._run(
            self._write,
            """INSERT INTO peers VALUES (?, ?, ?, ?)
               ON CONFLICT (peer_id) DO UPDATE SET addrs = excluded.addrs, last_seen = excluded.last_seen""",
            (peer_id, "\n".join(addrs), now, now),
        )

    async def prune_peers(self, limit: int) -> int:
        """Keep the `limit` most recently seen peers; returns how many rows went."""
        return await self._run(
            self._write,
            "DELETE FROM peers WHERE peer_id NOT IN "
            "(SELECT peer_id FROM peers ORDER BY last_seen DESC LIMIT ?)", (limit,))

    async def peers(self) -> list[tuple[str, list[str], float, float]]:
        rows = await self._run(self._all, "SELECT * FROM peers ORDER BY last_seen DESC")
        return [(p, a.split("\n") if a else [], f, l) for p, a, f, l in rows]

    # ---- agreements ----
    async def put_agreement(self, id: bytes, role: str, state: str, terms: bytes, now: float) -> None:
        await self._run(
            self._write, "INSERT INTO agreements VALUES (?, ?, ?, ?, ?, ?)", (id, role, state, terms, now, now)
        )

    async def set_agreement_state(self, id: bytes, state: str, now: float) -> None:
        changed = await self._run(
            self._write, "UPDATE agreements SET state = ?, updated_at = ? WHERE id = ?", (state, now, id)
        )
        if changed != 1:
            raise KeyError(id)

    async def get_agreement(self, id: bytes) -> AgreementRow | None:
        row = await self._run(self._one, "SELECT * FROM agreements WHERE id = ?", (id,))
        return AgreementRow(*row) if row else None

    async def all_agreements(self, limit: int = 1000) -> list[AgreementRow]:
        """Every agreement this node recorded, newest first (its history)."""
        rows = await self._run(self._all, "SELECT * FROM agreements ORDER BY created_at DESC LIMIT ?",
                               (limit,))
        return [AgreementRow(*r) for r in rows]

    async def agreements_in_state(self, state: str) -> list[AgreementRow]:
        rows = await self._run(self._all, "SELECT * FROM agreements WHERE state = ? ORDER BY created_at", (state,))
        return [AgreementRow(*r) for r in rows]

    # ---- heartbeats and receipts ----
    async def put_heartbeat(self, agreement_id: bytes, seq: int, raw: bytes, hash: bytes, received_at: float) -> bool:
        """False if this (agreement, seq) is already stored (the first one is kept)."""
        return 1 == await self._run(
            self._write,
            "INSERT OR IGNORE INTO heartbeats VALUES (?, ?, ?, ?, ?)",
            (agreement_id, seq, raw, hash, received_at),
        )

    async def heartbeats(self, agreement_id: bytes) -> list[HeartbeatRow]:
        rows = await self._run(
            self._all, "SELECT * FROM heartbeats WHERE agreement_id = ? ORDER BY seq", (agreement_id,)
        )
        return [HeartbeatRow(*r) for r in rows]

    async def last_heartbeat(self, agreement_id: bytes) -> HeartbeatRow | None:
        row = await self._run(
            self._one,
            "SELECT * FROM heartbeats WHERE agreement_id = ? ORDER BY seq DESC LIMIT 1",
            (agreement_id,),
        )
        return HeartbeatRow(*row) if row else None

    async def put_receipt(self, agreement_id: bytes, acked_seconds: int, raw: bytes, now: float) -> bool:
        return 1 == await self._run(
            self._write,
            "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?)",
            (agreement_id, acked_seconds, raw, now),
        )

    async def receipts(self, agreement_id: bytes) -> list[ReceiptRow]:
        rows = await self._run(
            self._all, "SELECT * FROM receipts WHERE agreement_id = ? ORDER BY acked_seconds", (agreement_id,)
        )
        return [ReceiptRow(*r) for r in rows]

    async def latest_receipt(self, agreement_id: bytes) -> ReceiptRow | None:
        row = await self._run(
            self._one,
            "SELECT * FROM receipts WHERE agreement_id = ? ORDER BY acked_seconds DESC LIMIT 1",
            (agreement_id,),
        )
        return ReceiptRow(*row) if row else None

    async def put_rental_receipt(self, agreement_id: bytes, heartbeat_seq: int, acked_seconds: int,
                                 raw: bytes, now: float) -> bool:
        """Record a rental receipt by the heartbeat it answers (and in `receipts`, first per
        acked_seconds, as put_receipt does), in one transaction. False if a receipt for this
        heartbeat is already stored (the first one is kept)."""

        def go() -> bool:
            with _transaction(self._conn) as conn:
                conn.execute("INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?)",
                             (agreement_id, acked_seconds, raw, now))
                added = conn.execute(
                    "INSERT OR IGNORE INTO rental_receipts VALUES (?, ?, ?, ?, ?)",
                    (agreement_id, heartbeat_seq, acked_seconds, raw, now)).rowcount
            return added == 1

        return await self._run(go)

    async def rental_receipts(self, agreement_id: bytes) -> list[tuple[int, int, bytes, float]]:
        """(heartbeat_seq, acked_seconds, raw, created_at) of every rental receipt, by seq."""
        return await self._run(
            self._all,
            "SELECT heartbeat_seq, acked_seconds, raw, created_at FROM rental_receipts"
            " WHERE agreement_id = ? ORDER BY heartbeat_seq", (agreement_id,))

    # ---- evidence, reputation, counters ----
    async def add_evidence(self, subject_key: bytes, kind: str, raw: bytes, now: float) -> None:
        await self._run(
            self._write,
            "INSERT INTO evidence (subject_key, kind, raw, created_at) VALUES (?, ?, ?, ?)",
            (subject_key, kind, raw, now),
        )

    async def evidence(self, subject_key: bytes) -> list[tuple[str, bytes, float]]:
        return await self._run(
            self._all, "SELECT kind, raw, created_at FROM evidence WHERE subject_key = ? ORDER BY id", (subject_key,)
        )

    async def evidence_of_kind(self, kind: str) -> list[bytes]:
        rows = await self._run(self._all, "SELECT raw FROM evidence WHERE kind = ? ORDER BY id", (kind,))
        return [r[0] for r in rows]

    async def adjust_reputation(self, subject_key: bytes, delta: float, now: float) -> None:
        await self._run(
            self._write,
            """INSERT INTO reputation VALUES (?, ?, ?)
               ON CONFLICT (subject_key) DO UPDATE SET score = score + excluded.score, updated_at = excluded.updated_at""",
            (subject_key, delta, now),
        )

    async def reputation(self, subject_key: bytes) -> float:
        row = await self._run(self._one, "SELECT score FROM reputation WHERE subject_key = ?", (subject_key,))
        return row[0] if row else 0.0

    async def increment_counter(self, name: str, by: int = 1) -> int:
        def go() -> int:
            with _transaction(self._conn) as conn:
                value = conn.execute(
                    """INSERT INTO counters VALUES (?, ?)
                       ON CONFLICT (name) DO UPDATE SET value = value + excluded.value RETURNING value""",
                    (name, by),
                ).fetchone()[0]
            return value

        return await self._run(go)

    async def add_counters(self, deltas: dict[str, int]) -> None:
        """Add every ``name -> delta`` in one transaction (a flush of in-memory counters)."""

        def go() -> None:
            with _transaction(self._conn) as conn:
                conn.executemany(
                    """INSERT INTO counters VALUES (?, ?)
                       ON CONFLICT (name) DO UPDATE SET value = value + excluded.value""",
                    list(deltas.items()),
                )

        if deltas:
            await self._run(go)

    async def counters(self, prefix: str = "") -> dict[str, int]:
        rows = await self._run(
            self._all, "SELECT name, value FROM counters WHERE substr(name, 1, ?) = ? ORDER BY name",
            (len(prefix), prefix),
        )
        return dict(rows)

    async def next_sequence(self, name: str, first: int) -> int:
        """Reserve the next value of a persistent sequence: stored value + 1, or ``first`` if
        none is stored. Committed (and fsynced under FULL) before it returns, so a value handed
        out is never handed out again, even after a crash."""

        def go() -> int:
            with _transaction(self._conn) as conn:
                row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
                value = first if row is None else row[0] + 1
                conn.execute(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, value),
                )
            return value

        return await self._run(go)

    async def counter(self, name: str) -> int:
        row = await self._run(self._one, "SELECT value FROM counters WHERE name = ?", (name,))
        return row[0] if row else 0
