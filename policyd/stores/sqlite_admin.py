"""The embedded store's administrative side: runtime whitelists, and reading, passing and
deleting greylist and rate-limit state for ``policyctl`` (never on the question path)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ..checks.greylist import Client, Timing, Triplet
from ..whitelist import ListEntry

if TYPE_CHECKING:
    from .sqlite import SQLiteStore

#: Bound on rows one admin listing returns.
MAX_SCAN: int = 10_000


class SQLiteAdmin:
    """``SQLiteStore.admin``: changes go through the store's ``durable()`` (written, after
    the answered rows, before it returns), listings first wait for ``settled()`` (answered
    rows written), reads use the store's connection."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    @property
    def db(self) -> sqlite3.Connection:
        return self.store.db

    async def list_add(self, entry: ListEntry) -> None:
        await self.store.durable(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO list VALUES (?, ?, ?, ?, ?)",
                (entry.kind, entry.value, entry.expires, entry.comment, entry.added),
            )
        )

    async def list_remove(self, kind: str, value: str) -> bool:
        removed = await self.store.durable(
            lambda db: (
                db.execute("DELETE FROM list WHERE kind = ? AND value = ?", (kind, value)).rowcount
            )
        )
        return bool(removed)

    async def list_version(self) -> str:
        """SQLite's data_version changes when another connection (e.g. a second daemon on
        the same file, or an offline edit) commits; this daemon's own changes reload at once."""
        return str(self.db.execute("PRAGMA data_version").fetchone()[0])

    async def list_entries(self) -> list[ListEntry]:
        rows = self.db.execute(
            "SELECT kind, value, expires, comment, added FROM list ORDER BY kind, value"
        ).fetchall()
        return [ListEntry(*row) for row in rows]

    async def greylist_peek(
        self, triplet_key: str, client_key: str
    ) -> tuple[Triplet | None, Client | None]:
        await self.store.settled()
        row = self.db.execute(
            "SELECT first_seen, last_seen, passed, attempts FROM triplet WHERE k = ?",
            (triplet_key,),
        ).fetchone()
        crow = self.db.execute(
            "SELECT passes, last_seen FROM client WHERE k = ?", (client_key,)
        ).fetchone()
        return (
            Triplet(row[0], row[1], bool(row[2]), row[3]) if row else None,
            Client(crow[0], crow[1]) if crow else None,
        )

    async def ratelimit_peek(self, keys: Sequence[str]) -> list[float | None]:
        await self.store.settled()
        out: list[float | None] = []
        for key in keys:
            row = self.db.execute("SELECT tat FROM rate WHERE k = ?", (key,)).fetchone()
            out.append(row[0] if row else None)
        return out

    async def greylist_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, Triplet, float]]:
        await self.store.settled()
        glob = sqlite_glob(parts)
        rows = self.db.execute(
            "SELECT k, first_seen, last_seen, passed, attempts, expires FROM triplet "
            "WHERE k GLOB ? ORDER BY last_seen DESC LIMIT ?",
            (glob, min(limit, MAX_SCAN)),
        ).fetchall()
        return [(r[0], Triplet(r[1], r[2], bool(r[3]), r[4]), r[5]) for r in rows]

    async def greylist_pass(self, keys: Sequence[str], now: float, timing: Timing) -> int:
        """Mark triplets passed now (``policyctl greylist pass``); creates missing ones."""

        def mark(db: sqlite3.Connection) -> None:
            for key in keys:
                row = db.execute(
                    "SELECT first_seen, attempts FROM triplet WHERE k = ?", (key,)
                ).fetchone()
                first, attempts = row if row else (now, 0)
                db.execute(
                    "INSERT OR REPLACE INTO triplet VALUES (?, ?, ?, 1, ?, ?)",
                    (key, first, now, attempts, now + timing.max_age),
                )

        await self.store.durable(mark)
        return len(keys)

    async def greylist_delete(self, keys: Sequence[str]) -> int:
        return await self._delete("triplet", keys)

    async def ratelimit_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, float]]:
        await self.store.settled()
        glob = sqlite_glob(parts)
        rows = self.db.execute(
            "SELECT k, tat FROM rate WHERE k GLOB ? ORDER BY tat DESC LIMIT ?",
            (glob, min(limit, MAX_SCAN)),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    async def ratelimit_delete(self, keys: Sequence[str]) -> int:
        return await self._delete("rate", keys)

    async def _delete(self, table: str, keys: Sequence[str]) -> int:
        def delete(db: sqlite3.Connection) -> int:
            removed = 0
            for chunk in _chunks(keys, 500):
                marks = ",".join("?" * len(chunk))
                removed += db.execute(
                    f"DELETE FROM {table} WHERE k IN ({marks})",  # noqa: S608  # constant table
                    chunk,
                ).rowcount
            return removed

        return await self.store.durable(delete)

    async def stats(self, auto_whitelist_after: int) -> dict[str, float]:
        """Figures for metrics and ``policyctl stats``, read on a second connection in a
        thread (WAL readers do not block the writer), so a scan never stalls questions."""
        store = self.store

        def read() -> dict[str, float]:
            # as_uri() percent-encodes: a path with ?, # or % stays a path.
            db = sqlite3.connect(f"{store.path.resolve().as_uri()}?mode=ro", uri=True)
            try:

                def one(sql: str, *args: object) -> float:
                    return float(db.execute(sql, args).fetchone()[0])

                return {
                    "auto_whitelisted": one(
                        "SELECT count(*) FROM client WHERE passes >= ? AND expires >= ?",
                        max(1, auto_whitelist_after),
                        time.time(),
                    ),
                    "clients": one("SELECT count(*) FROM client"),
                    "rate_keys": one("SELECT count(*) FROM rate"),
                }
            finally:
                db.close()

        figures = await asyncio.to_thread(read)
        figures["expired_unretried"] = store.expired_unretried
        figures["expired_triplets"] = store.expired_total
        figures["pending_rows"] = store.pending_rows
        figures["write_failing"] = float(store.failure is not None)
        with contextlib.suppress(OSError):
            figures["wal_bytes"] = float(store.wal_path.stat().st_size)
        return figures


def sqlite_glob(parts: Sequence[str | None]) -> str:
    """SQLite GLOB for key segments: literal segments escaped, None as ``*``."""
    escaped = (
        "*" if p is None else "".join(f"[{c}]" if c in "*?[" else c for c in p) for p in parts
    )
    return "|".join(escaped)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
