"""The embedded default store: one SQLite file in WAL mode, durable across restarts.

Memory does not grow with the number of rows: the page cache is bounded (``cache_kib``),
memory-mapped I/O is off, and rows are found through their primary key. Expired rows are
removed in small batches by an index on the expiry time, never in one long sweep.

Statements run on the event loop's thread: a point read and an upsert on a primary key cost
a few microseconds, less than handing the work to a thread would. The commit is what costs
(WAL frame writes and file locks, tens of microseconds), so questions share one write
transaction for ``commit_interval`` (5 ms by default): the first opens it and schedules the
commit. A question is answered as soon as its statements ran, before that commit; if the
daemon is killed inside the window, at most those few milliseconds of state changes are lost
(a sender is greylisted once more; nothing else). Admin changes commit at once. WAL
checkpoints (which fsync) run in a worker thread on their own connection, never in a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from ..checks.greylist import Client, Step, Timing, Triplet, step
from ..checks.ratelimit import Charge, Decision, decide_all
from ..config import StoreConfig
from . import StoreUnavailable
from .sqlite_admin import SQLiteAdmin

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS triplet (
    k TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passed INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS triplet_expires ON triplet(expires);
CREATE TABLE IF NOT EXISTS client (
    k TEXT PRIMARY KEY,
    passes INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_expires ON client(expires);
CREATE TABLE IF NOT EXISTS rate (
    k TEXT PRIMARY KEY,
    tat REAL NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_expires ON rate(expires);
CREATE TABLE IF NOT EXISTS list (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    expires REAL NOT NULL,
    comment TEXT NOT NULL,
    added REAL NOT NULL,
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;
"""
EXPIRING_TABLES: Final = ("triplet", "client", "rate")
#: 0: never checkpoint inside a commit on the event loop (each one fsyncs for milliseconds);
#: a worker thread checkpoints every ``checkpoint_interval`` instead.
WAL_AUTOCHECKPOINT_PAGES: Final = 0
#: How long a writer waits for a lock held by another process (e.g. an offline backup).
BUSY_TIMEOUT_MS: Final = 200


def path_from_url(url: str) -> Path:
    """Everything after ``sqlite://`` is the file path: ``sqlite:///var/lib/policyd/state.db``
    is absolute, ``sqlite://var/policyd.sqlite3`` is relative to the working directory."""
    return Path(url.split("://", 1)[1])


def connect(path: Path, cache_kib: int) -> sqlite3.Connection:
    """Open the database with the pragmas the daemon relies on and the schema in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a committed transaction survives a crash of the daemon; only an
    # OS crash or power loss can lose the last transactions (the mail is then retried).
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
    db.execute("PRAGMA mmap_size = 0")
    db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        db.close()
        raise sqlite3.DatabaseError(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
    db.executescript(SCHEMA)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return db


class SQLiteStore(SQLiteAdmin):
    """Greylist and rate state in SQLite; one connection used from the event loop only."""

    def __init__(
        self,
        path: Path,
        *,
        cache_kib: int = 4096,
        expire_batch: int = 500,
        expire_interval: float = 10.0,
        commit_interval: float = 0.005,
        checkpoint_interval: float = 1.0,
    ) -> None:
        self.path = path
        self.cache_kib = cache_kib
        self.expire_batch = expire_batch
        self.expire_interval = expire_interval
        self._db: sqlite3.Connection | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.commit_interval = commit_interval
        self.checkpoint_interval = checkpoint_interval
        self._in_transaction = False
        self._commit_timer: asyncio.TimerHandle | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._cursor: sqlite3.Cursor | None = None
        self.expired_unretried = 0
        self.expired_total = 0

    @classmethod
    def from_config(cls, config: StoreConfig) -> SQLiteStore:
        return cls(
            path_from_url(config.url),
            cache_kib=config.cache_kib,
            expire_batch=config.expire_batch,
            expire_interval=config.expire_interval,
            commit_interval=config.commit_interval,
        )

    async def start(self) -> None:
        self._db = connect(self.path, self.cache_kib)
        self._db.execute("SELECT count(*) FROM client").fetchone()
        loop = asyncio.get_running_loop()
        self._expiry = loop.create_task(self._expire_forever())
        self._checkpoints = loop.create_task(self._checkpoint_forever())

    async def aclose(self) -> None:
        for task in (self._expiry, self._checkpoints):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._expiry = self._checkpoints = None
        self._commit()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = self._cursor = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("store is not started")
        return self._db

    def _commit(self) -> None:
        """End the open write transaction (scheduled ``commit_interval`` after it began)."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        if not self._in_transaction:
            return
        self._in_transaction = False
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(exc)

    def _rollback(self, exc: sqlite3.Error) -> None:
        """Undo the open transaction: the questions answered in it lose their state change
        (a sender may be greylisted once more; nothing else is lost)."""
        logger.error("SQLite transaction failed, rolled back: %s", exc)
        self._in_transaction = False
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("ROLLBACK")

    def _open(self, *, schedule_commit: bool) -> None:
        """Open the write transaction (if none is open) and, unless the caller commits it
        itself, schedule its commit ``commit_interval`` later."""
        if self._in_transaction:
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        if schedule_commit:
            self._commit_timer = asyncio.get_running_loop().call_later(
                self.commit_interval, self._commit
            )

    def _failed(self, exc: sqlite3.Error) -> StoreUnavailable:
        """Roll back after a failed statement; the error to raise (the fallback answers)."""
        self._rollback(exc)
        return StoreUnavailable(f"sqlite: {exc}")

    @contextlib.contextmanager
    def _statements(self, *, durable: bool = False) -> Iterator[None]:
        """Run statements in the open write transaction (opened, and its commit scheduled,
        if there is none). ``durable`` commits before returning (admin changes)."""
        self._open(schedule_commit=not durable)
        try:
            yield
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        if durable:
            self._commit()

    def _begin(self) -> sqlite3.Cursor:
        """The cursor for the question path, in the open write transaction (opened, and
        its commit scheduled, if there is none)."""
        if not self._in_transaction:
            self._open(schedule_commit=True)
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = self.db.cursor()
        return cursor

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        # The question path: one reused cursor, no context manager (each costs more than a
        # point read); the statements are those of _statements() otherwise.
        cursor = self._begin()
        try:
            row = cursor.execute(
                "SELECT first_seen, last_seen, passed, attempts FROM triplet WHERE k = ?",
                (triplet_key,),
            ).fetchone()
            crow = cursor.execute(
                "SELECT passes, last_seen FROM client WHERE k = ?", (client_key,)
            ).fetchone()
            triplet = Triplet(row[0], row[1], bool(row[2]), row[3]) if row else None
            client = Client(crow[0], crow[1]) if crow else None
            result = step(triplet, client, now, timing, force_pass=force_pass)
            if result.triplet is not None:
                t = result.triplet
                cursor.execute(
                    "INSERT OR REPLACE INTO triplet VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        triplet_key,
                        t.first_seen,
                        t.last_seen,
                        int(t.passed),
                        t.attempts,
                        result.triplet_expires,
                    ),
                )
            if result.client is not None:
                c = result.client
                cursor.execute(
                    "INSERT OR REPLACE INTO client VALUES (?, ?, ?, ?)",
                    (client_key, c.passes, c.last_seen, result.client_expires),
                )
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        return result

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        """All charges of one question in one transaction: admitted together or not at all."""
        cursor = self._begin()
        try:
            states = []
            for charge in charges:
                row = cursor.execute("SELECT tat FROM rate WHERE k = ?", (charge.key,)).fetchone()
                states.append(row[0] if row else None)
            decisions, admitted = decide_all(states, charges, now)
            if admitted:
                cursor.executemany(
                    "INSERT OR REPLACE INTO rate VALUES (?, ?, ?)",
                    [
                        (d.charge.key, d.outcome.tat, d.outcome.tat)
                        for d in decisions
                        if d.outcome.allowed
                    ],
                )
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        return decisions

    def expire(self, now: float) -> int:
        """Delete one batch of expired rows per table; returns how many went.

        Greylisted triplets that expire unpassed were never retried (mostly spam): they are
        counted in ``expired_unretried`` for the never-retried ratio."""
        removed = 0
        with self._statements():
            for table in EXPIRING_TABLES:
                returning = " RETURNING passed" if table == "triplet" else " RETURNING 1"
                rows = self.db.execute(
                    f"DELETE FROM {table} WHERE k IN "  # noqa: S608  # table names are constants
                    f"(SELECT k FROM {table} WHERE expires < ? LIMIT ?){returning}",
                    (now, self.expire_batch),
                ).fetchall()
                removed += len(rows)
                if table == "triplet":
                    unretried = sum(1 for (passed,) in rows if not passed)
                    self.expired_unretried += unretried
                    self.expired_total += len(rows)
        return removed

    async def stats(self, auto_whitelist_after: int) -> dict[str, float]:
        """Figures for metrics and ``policyctl stats``, read on a second connection in a
        thread (WAL readers do not block the writer), so a scan never stalls questions."""

        def read() -> dict[str, float]:
            # as_uri() percent-encodes: a path with ?, # or % stays a path.
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
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
        figures["expired_unretried"] = self.expired_unretried
        figures["expired_triplets"] = self.expired_total
        return figures

    def _checkpoint(self) -> None:
        """Copy committed WAL pages into the database (and fsync) on a connection of its
        own, in a worker thread: the event loop never waits for the disk."""
        db = sqlite3.connect(self.path, timeout=1.0)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    async def _checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval)
            try:
                await asyncio.to_thread(self._checkpoint)
            except sqlite3.Error as exc:
                logger.warning("WAL checkpoint failed; will retry: %s", exc)

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(self.expire_interval)
            try:
                # Small batches, yielding between them, so questions are never held up.
                removed = self.expire(time.time())
                while removed >= self.expire_batch:
                    await asyncio.sleep(0)
                    removed = self.expire(time.time())
            except sqlite3.Error:
                logger.exception("expiry of old greylist rows failed; will retry")
