"""The embedded default store: one SQLite file in WAL mode, durable across restarts.

Memory does not grow with the number of rows: the page cache is bounded (``cache_kib``),
memory-mapped I/O is off, and rows are found through their primary key. Expired rows are
removed in small batches by an index on the expiry time, never in one long sweep.

Questions never write to SQLite themselves. A question reads its rows (the pending ones
first, then the database) and leaves the rows it changed in ``_Pending``; every
``commit_interval`` (5 ms) one transaction writes all pending rows (``_write``), on the event
loop's thread: an upsert costs a few microseconds, less than handing it to a thread (which
would fight the loop for the GIL at every call). A question is answered before that commit:
a crash loses at most ``commit_interval`` of triplet and rate state, and its only effect is
that those senders are greylisted once more. Admin changes commit before they return.

The loop never waits for the disk or a lock: its connection has no busy timeout, and a write
that finds the database locked (a checkpoint, an offline backup taking the write lock) is
tried again at the next tick, its rows kept pending (at most ``MAX_PENDING_ROWS``). A write
that *fails* (disk full, read-only file system, corruption) puts the store in failure: every
question is then answered with the fallback (``StoreUnavailable``), one ERROR line is logged,
and the rows stay pending and are written by the retry that succeeds, after which questions
are decided again (docs/reliability.md).

WAL checkpoints run in a worker thread on their own connection (they fsync): a PASSIVE one
every ``checkpoint_interval``, and a TRUNCATE one (which holds the write lock while it copies
the rest and empties the file) as soon as the WAL passes ``WAL_TRUNCATE_BYTES``, so the WAL
and the WAL index stay bounded at any sustained write rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

from ..checks.greylist import Client, Step, Timing, Triplet, step
from ..checks.ratelimit import Charge, Decision, decide_all
from ..config import StoreConfig
from ..lograte import LogLimiter
from .base import StoreUnavailable
from .sqlite_admin import SQLiteAdmin

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS meta (
    k TEXT PRIMARY KEY,
    v
) WITHOUT ROWID;
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
#: a worker thread checkpoints instead.
WAL_AUTOCHECKPOINT_PAGES: Final = 0
#: Past this size the checkpointer empties the WAL (TRUNCATE) instead of copying what it can
#: (PASSIVE): under continuous writes a PASSIVE checkpoint never catches up, and the WAL and
#: its index (mapped into the daemon) would grow without bound. Also SQLite's
#: ``journal_size_limit``.
WAL_TRUNCATE_BYTES: Final = 16 * 1024 * 1024
#: Writes wait for the checkpoint when the WAL is this many times the threshold.
WAL_HOLD_FACTOR: Final = 2
#: Rows answered but not yet committed, at most: beyond it (writes locked out or failing for
#: long) questions get the fallback instead of growing memory. ~200 bytes a row.
MAX_PENDING_ROWS: Final = 20_000
#: While writes fail, how often one is tried again.
FAILED_RETRY_INTERVAL: Final = 1.0
#: How long an admin change waits for the write lock (a checkpoint holds it for milliseconds).
ADMIN_WRITE_TIMEOUT: Final = 5.0
#: How long the checkpointer's connection waits for the loop's short transactions.
CHECKPOINT_BUSY_TIMEOUT: Final = 1.0
#: The state directory and database file are private to the daemon's user and group,
#: whatever the umask (stored senders and recipients are personal data).
STATE_DIR_MODE: Final = 0o750
STATE_FILE_MODE: Final = 0o640

_TRIPLET_UPSERT: Final = "INSERT OR REPLACE INTO triplet VALUES (?, ?, ?, ?, ?, ?)"
_CLIENT_UPSERT: Final = "INSERT OR REPLACE INTO client VALUES (?, ?, ?, ?)"
_RATE_UPSERT: Final = "INSERT OR REPLACE INTO rate VALUES (?, ?, ?)"


def path_from_url(url: str) -> Path:
    """Everything after ``sqlite://`` is the file path: ``sqlite:///var/lib/policyd/state.db``
    is absolute, ``sqlite://var/policyd.sqlite3`` is relative to the working directory."""
    return Path(url.split("://", 1)[1])


def _private_file(path: Path) -> None:
    """Create the state directory (0750) and database file (0640) if missing; narrow an
    existing database file that other users could read. SQLite gives its -wal and -shm files
    the database file's mode."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, mode=STATE_DIR_MODE)
        os.chmod(path.parent, STATE_DIR_MODE)  # mkdir's mode is cut by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, STATE_FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & ~STATE_FILE_MODE:
            os.fchmod(fd, mode & STATE_FILE_MODE)
    finally:
        os.close(fd)


def connect(path: Path, cache_kib: int) -> sqlite3.Connection:
    """Open the database with the pragmas the daemon relies on and the schema in place."""
    _private_file(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # No busy timeout: the event loop never waits for a lock (see the module docstring).
        db.execute("PRAGMA busy_timeout = 0")
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a committed transaction survives a crash of the daemon; only
        # an OS crash or power loss can lose the last transactions (the mail is then retried).
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
        db.execute("PRAGMA mmap_size = 0")
        db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit = {WAL_TRUNCATE_BYTES}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"{path}: schema version {version}, expected {SCHEMA_VERSION}"
            )
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def _nothing(_db: sqlite3.Connection) -> None:
    """No change of its own: the transaction writes the pending rows only."""


def _probe(db: sqlite3.Connection) -> None:
    """While writes fail, each retry writes a row even when nothing is pending, so that
    recovery is proven by a real write."""
    db.execute("INSERT OR REPLACE INTO meta VALUES ('write_probe', ?)", (time.time(),))


def _locked(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock; try again later."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Pending:
    """Rows changed by answered questions, not yet committed; read before the database.
    Each row is kept as its full upsert tuple (key first)."""

    __slots__ = ("client", "rate", "triplet")

    def __init__(self) -> None:
        self.triplet: dict[str, tuple[str, float, float, int, int, float]] = {}
        self.client: dict[str, tuple[str, int, float, float]] = {}
        self.rate: dict[str, tuple[str, float, float]] = {}

    def __len__(self) -> int:
        return len(self.triplet) + len(self.client) + len(self.rate)

    def write(self, db: sqlite3.Connection) -> None:
        if self.triplet:
            db.executemany(_TRIPLET_UPSERT, self.triplet.values())
        if self.client:
            db.executemany(_CLIENT_UPSERT, self.client.values())
        if self.rate:
            db.executemany(_RATE_UPSERT, self.rate.values())

    def clear(self) -> None:
        self.triplet.clear()
        self.client.clear()
        self.rate.clear()


class SQLiteStore:
    """Greylist and rate state in SQLite; one connection used from the event loop only.
    Its administrative side is ``admin`` (policyd/stores/sqlite_admin.py)."""

    def __init__(
        self,
        path: Path,
        *,
        cache_kib: int = 4096,
        expire_batch: int = 500,
        expire_interval: float = 10.0,
        commit_interval: float = 0.005,
        checkpoint_interval: float = 1.0,
        wal_truncate_bytes: int = WAL_TRUNCATE_BYTES,
        max_pending_rows: int = MAX_PENDING_ROWS,
    ) -> None:
        self.path = path
        self.wal_path = Path(f"{path}-wal")
        self.cache_kib = cache_kib
        self.expire_batch = expire_batch
        self.expire_interval = expire_interval
        self.commit_interval = commit_interval
        self.checkpoint_interval = checkpoint_interval
        self.wal_truncate_bytes = wal_truncate_bytes
        self.max_pending_rows = max_pending_rows
        self._db: sqlite3.Connection | None = None
        self._pending = _Pending()
        self._write_timer: asyncio.TimerHandle | None = None
        #: Set when a write failed (the error text); questions get the fallback until a
        #: write succeeds.
        self._failure: str | None = None
        self._wal_full = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.expired_unretried = 0
        self.expired_total = 0
        self.checkpoints_truncated = 0
        #: Read errors (a corrupt page) are each counted as a store error and answered with
        #: the fallback; logged one line per interval with the count (policyd/lograte.py).
        self._warnings = LogLimiter()
        self.admin = SQLiteAdmin(self)

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
        self._tasks = [
            loop.create_task(self._expire_forever()),
            loop.create_task(self._checkpoint_forever()),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self._db is not None:
            with contextlib.suppress(StoreUnavailable):
                # The last pending rows, if the disk takes them (a checkpoint thread may
                # still hold the lock for a moment).
                await self.durable(_nothing)
            if self._pending:
                logger.error(
                    "%s: %d answered rows could not be written at shutdown",
                    self.path,
                    len(self._pending),
                )
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("store is not started")
        return self._db

    @property
    def pending_rows(self) -> int:
        """Rows answered questions changed that are not written yet."""
        return len(self._pending)

    @property
    def failure(self) -> str | None:
        """Why writes are failing now, or None (metrics and ``policyctl stats``)."""
        return self._failure

    # --- writing --------------------------------------------------------------------------

    def _write(self, extra: Callable[[sqlite3.Connection], T]) -> T:
        """One transaction: every pending row, then ``extra`` (an admin change or an expiry
        batch). Returns ``extra``'s result; raises StoreUnavailable if the database is locked
        (nothing written, rows kept) or the write failed (the store is then in failure)."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._not_written(exc) from exc
        try:
            self._pending.write(db)
            result = extra(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise self._not_written(exc) from exc
        self._pending.clear()
        if self._failure is not None:
            logger.warning("SQLite writes to %s succeed again; answering normally", self.path)
            self._failure = None
        return result

    def _not_written(self, exc: sqlite3.Error) -> StoreUnavailable:
        """A write did not happen: locked (try later) or failed (enter failure, log once)."""
        if _locked(exc):
            return StoreUnavailable(f"sqlite: {self.path} is locked")
        self._schedule(FAILED_RETRY_INTERVAL)
        if self._failure is None:
            logger.error(
                "SQLite writes to %s fail (%s); answering the fallback until a write "
                "succeeds, %d answered rows kept to write then",
                self.path,
                exc,
                len(self._pending),
            )
        self._failure = str(exc)
        return StoreUnavailable(f"sqlite: writes to {self.path} fail: {exc}")

    def _schedule(self, delay: float) -> None:
        """Make sure a commit tick comes within about ``delay``."""
        if self._write_timer is None:
            with contextlib.suppress(RuntimeError):  # no loop: closing
                self._write_timer = asyncio.get_running_loop().call_later(delay, self._flush)

    def _flush(self) -> None:
        """The commit tick: write what questions left pending (while writes fail: retry)."""
        self._write_timer = None
        if not self._pending and self._failure is None:
            return
        if self._wal_over_limit():
            self._schedule(self.commit_interval)  # the checkpoint empties it first
            return
        try:
            self._write(_nothing if self._failure is None else _probe)
        except StoreUnavailable:
            failing = self._failure is not None
            self._schedule(FAILED_RETRY_INTERVAL if failing else self.commit_interval)

    def _wal_over_limit(self) -> bool:
        """Past the threshold, wake the checkpointer; past twice the threshold (it could not
        keep up), hold the writes back until it has emptied the WAL: the rows wait pending,
        and the bound on them (the fallback) takes over if that lasts."""
        try:
            size = self.wal_path.stat().st_size
        except OSError:
            return False
        if size <= self.wal_truncate_bytes:
            return False
        self._wal_full.set()
        return size > WAL_HOLD_FACTOR * self.wal_truncate_bytes

    def _changed(self) -> None:
        """A question left rows pending: make sure a commit tick is scheduled."""
        if self._write_timer is None:
            self._schedule(self.commit_interval)

    def _check_writable(self) -> None:
        """Questions get the fallback while writes fail or too much is waiting to be written."""
        if self._failure is not None:
            raise StoreUnavailable(f"sqlite: writes to {self.path} fail: {self._failure}")
        if len(self._pending) >= self.max_pending_rows:
            raise StoreUnavailable(f"sqlite: {len(self._pending)} rows wait to be written")

    def _read_failed(self, exc: sqlite3.Error) -> StoreUnavailable:
        self._warnings.error(logger, "SQLite read from %s failed: %s", self.path, exc)
        return StoreUnavailable(f"sqlite: reading {self.path}: {exc}")

    async def durable(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run an admin change in a transaction of its own (after the pending rows, so the
        order of changes is kept) and commit it before returning."""
        deadline = time.monotonic() + ADMIN_WRITE_TIMEOUT
        while True:
            try:
                return self._write(change)
            except StoreUnavailable:
                if self._failure is not None or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(self.commit_interval)

    async def settled(self) -> None:
        """Write what is pending (admin listings then see every answered question)."""
        if self._pending:
            with contextlib.suppress(StoreUnavailable):
                await self.durable(_nothing)

    # --- the question path ----------------------------------------------------------------

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        self._check_writable()
        pending = self._pending
        row = pending.triplet.get(triplet_key)
        crow = pending.client.get(client_key)
        try:
            if row is None:
                row = self.db.execute(
                    "SELECT k, first_seen, last_seen, passed, attempts FROM triplet WHERE k = ?",
                    (triplet_key,),
                ).fetchone()
            if crow is None:
                crow = self.db.execute(
                    "SELECT k, passes, last_seen FROM client WHERE k = ?", (client_key,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise self._read_failed(exc) from exc
        triplet = Triplet(row[1], row[2], bool(row[3]), row[4]) if row else None
        client = Client(crow[1], crow[2]) if crow else None
        result = step(triplet, client, now, timing, force_pass=force_pass)
        if result.triplet is not None:
            t = result.triplet
            pending.triplet[triplet_key] = (
                triplet_key,
                t.first_seen,
                t.last_seen,
                int(t.passed),
                t.attempts,
                result.triplet_expires,
            )
            self._changed()
        if result.client is not None:
            c = result.client
            pending.client[client_key] = (client_key, c.passes, c.last_seen, result.client_expires)
            self._changed()
        return result

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        """All charges of one question decided together: admitted together or not at all."""
        self._check_writable()
        pending = self._pending.rate
        states: list[float | None] = []
        try:
            for charge in charges:
                row = pending.get(charge.key)
                if row is None:
                    row = self.db.execute(
                        "SELECT k, tat FROM rate WHERE k = ?", (charge.key,)
                    ).fetchone()
                states.append(row[1] if row else None)
        except sqlite3.Error as exc:
            raise self._read_failed(exc) from exc
        decisions, admitted = decide_all(states, charges, now)
        if admitted:
            for d in decisions:
                if d.outcome.allowed:
                    tat = d.outcome.tat
                    pending[d.charge.key] = (d.charge.key, tat, tat)
            self._changed()
        return decisions

    # --- upkeep ---------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Delete one batch of expired rows per table (with the pending rows, in one
        transaction); returns how many went.

        Greylisted triplets that expire unpassed were never retried (mostly spam): they are
        counted in ``expired_unretried`` for the never-retried ratio."""

        def delete(db: sqlite3.Connection) -> tuple[int, int, int]:
            removed = unretried = triplets = 0
            for table in EXPIRING_TABLES:
                returning = " RETURNING passed" if table == "triplet" else " RETURNING 1"
                rows = db.execute(
                    f"DELETE FROM {table} WHERE k IN "  # noqa: S608  # table names are constants
                    f"(SELECT k FROM {table} WHERE expires < ? LIMIT ?){returning}",
                    (now, self.expire_batch),
                ).fetchall()
                removed += len(rows)
                if table == "triplet":
                    unretried = sum(1 for (passed,) in rows if not passed)
                    triplets = len(rows)
            return removed, unretried, triplets

        removed, unretried, triplets = self._write(delete)
        self.expired_unretried += unretried
        self.expired_total += triplets
        return removed

    def _checkpoint(self, truncate: bool) -> None:
        """Copy committed WAL pages into the database (and fsync) on a connection of its
        own, in a worker thread: the event loop never waits for the disk. ``truncate``
        then also copies what was written meanwhile and empties the WAL: it holds the write
        lock for that long, and the loop's commits wait for their next tick meanwhile."""
        db = sqlite3.connect(self.path, timeout=CHECKPOINT_BUSY_TIMEOUT)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            if truncate:
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    self.checkpoints_truncated += 1
        finally:
            db.close()

    async def _checkpoint_forever(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the
            # cancellation that aclose() sends when the event fires at the same moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.checkpoint_interval):
                    await self._wal_full.wait()
            self._wal_full.clear()
            try:
                size = self.wal_path.stat().st_size
            except OSError:
                size = 0
            try:
                await asyncio.to_thread(self._checkpoint, size > self.wal_truncate_bytes)
            except sqlite3.Error as exc:
                logger.warning("WAL checkpoint of %s failed; will retry: %s", self.path, exc)

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(self.expire_interval)
            try:
                # Small batches, yielding between them, so questions are never held up.
                removed = self.expire(time.time())
                while removed >= self.expire_batch:
                    await asyncio.sleep(0)
                    removed = self.expire(time.time())
            except StoreUnavailable:
                pass  # locked: next round; failing: logged by _not_written
