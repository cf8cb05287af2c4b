"""Embedded store specifics: answered rows written in batches, the WAL kept bounded under
continuous writes, a locked database never blocking questions, and private file modes.

The disk-full and read-only cases, which need a mount, are in
tests/integration/test_sqlite_failures.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from policyd.checks.greylist import Status, Timing
from policyd.checks.ratelimit import Charge, Limit
from policyd.stores import StoreUnavailable
from policyd.stores.sqlite import STATE_DIR_MODE, STATE_FILE_MODE, WAL_HOLD_FACTOR, SQLiteStore

T = Timing(delay=300, retry_window=1000, max_age=5000, auto_whitelist_after=0)


def count(path: Path, table: str) -> int:
    """Rows committed, as another process would see them."""
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


async def test_answered_rows_are_committed_within_the_commit_interval(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, commit_interval=0.05)
    await store.start()
    try:
        step = await store.greylist_step("n|s|r", "n", 0.0, T, False)
        assert step.status is Status.NEW
        # Answered before the commit: the row is pending, and read back from there.
        assert count(path, "triplet") == 0
        again = await store.greylist_step("n|s|r", "n", 10.0, T, False)
        assert again.status is Status.EARLY
        await asyncio.sleep(0.2)
        assert count(path, "triplet") == 1
        assert count(path, "client") == 0  # no pass yet, no client row
    finally:
        await store.aclose()


async def test_rate_state_is_read_from_pending_rows(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", commit_interval=10.0)  # nothing committed meanwhile
    await store.start()
    try:
        charge = Charge("r", "r|k", 1, Limit(count=2, period=60, burst=2), False)
        first = await store.ratelimit_step([charge], 100.0)
        second = await store.ratelimit_step([charge], 100.0)
        third = await store.ratelimit_step([charge], 100.0)
        assert [d[0].outcome.allowed for d in (first, second, third)] == [True, True, False]
        tat = second[0].outcome.tat
    finally:
        await store.aclose()
    reopened = SQLiteStore(tmp_path / "s.db")
    await reopened.start()
    try:  # written at close
        assert await reopened.admin.ratelimit_peek(["r|k"]) == [tat]
    finally:
        await reopened.aclose()


async def test_wal_stays_bounded_under_continuous_writes(tmp_path: Path) -> None:
    """New triplets without a pause: a PASSIVE checkpoint alone never catches up; the
    TRUNCATE checkpoint past the threshold keeps the WAL near it."""
    path = tmp_path / "s.db"
    limit = 512 * 1024
    store = SQLiteStore(
        path, commit_interval=0.002, checkpoint_interval=0.2, wal_truncate_bytes=limit
    )
    await store.start()
    largest = 0
    try:
        for i in range(30_000):
            await store.greylist_step(f"n{i % 97}|s{i}|r{i * 7919}", f"n{i % 97}", 1.0, T, False)
            if i % 200 == 0:
                await asyncio.sleep(0.001)  # the loop turns: commit ticks and checkpoints
                largest = max(largest, store.wal_path.stat().st_size)
        assert store.checkpoints_truncated > 0
        # The threshold, plus what is written while a checkpoint runs (a few commits).
        # The hold bound (twice the threshold), plus one commit of the 200 new rows written
        # between two loop turns: a page of the table and one of its index each, at most.
        one_commit = 200 * 2 * 4096
        assert largest <= WAL_HOLD_FACTOR * limit + one_commit, largest
    finally:
        await store.aclose()
    assert count(path, "triplet") == 30_000


async def test_a_locked_database_never_blocks_questions(tmp_path: Path) -> None:
    """Another process holds the write lock (an offline tool, a long checkpoint): questions
    are answered from the pending rows, which are written once the lock is free."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, commit_interval=0.01)
    await store.start()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(50):
            await store.greylist_step(f"n|s|r{i}", "n", 0.0, T, False)
            await asyncio.sleep(0.002)
        assert loop.time() - started < 1.0  # no waiting on the lock
        assert store.failure is None
        other.execute("COMMIT")
        await asyncio.sleep(0.1)
        assert count(path, "triplet") == 50
    finally:
        other.close()
        await store.aclose()


async def test_pending_rows_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, commit_interval=0.01, max_pending_rows=10)
    await store.start()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        for i in range(10):
            await store.greylist_step(f"n|s|r{i}", "n", 0.0, T, False)
        with pytest.raises(StoreUnavailable, match="wait to be written"):
            await store.greylist_step("n|s|r10", "n", 0.0, T, False)
        other.execute("COMMIT")
        await asyncio.sleep(0.1)
        assert (await store.greylist_step("n|s|r10", "n", 0.0, T, False)).status is Status.NEW
    finally:
        other.close()
        await store.aclose()


async def test_admin_changes_are_committed_before_returning(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path, commit_interval=10.0)
    await store.start()
    try:
        await store.greylist_step("n|s|a", "n", 0.0, T, False)
        await store.admin.greylist_pass(["n|s|b"], 5.0, T)
        # The pass, and the answered row before it (order kept), are on disk now.
        assert count(path, "triplet") == 2
        assert (await store.admin.greylist_peek("n|s|b", "n"))[0] is not None
    finally:
        await store.aclose()


async def test_new_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "state" / "s.db"
    old = os.umask(0)
    try:
        store = SQLiteStore(path)
        await store.start()
        await store.greylist_step("n|s|r", "n", 0.0, T, False)
        await store.aclose()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == STATE_DIR_MODE
    assert stat.S_IMODE(path.stat().st_mode) == STATE_FILE_MODE


async def test_an_existing_world_readable_database_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.touch(mode=0o666)
    os.chmod(path, 0o666)
    store = SQLiteStore(path)
    await store.start()
    await store.aclose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
