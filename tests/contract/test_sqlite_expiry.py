"""Embedded store specifics: expiry in bounded batches through the index."""

from __future__ import annotations

from pathlib import Path

from policyd.checks.greylist import Status, Timing
from policyd.stores.sqlite import SQLiteStore

T = Timing(delay=300, retry_window=1000, max_age=5000, auto_whitelist_after=0)


async def test_expiry_removes_only_expired_rows_in_batches(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", expire_batch=10, expire_interval=3600)
    await store.start()
    try:
        for i in range(25):
            await store.greylist_step(f"n|s|r{i}", "n", 0.0, T, False)
        await store.greylist_step("n|s|keep", "n", 900.0, T, False)
        assert store.expire(1500.0) == 10  # one bounded batch
        assert store.expire(1500.0) == 10
        assert store.expire(1500.0) == 5
        assert store.expire(1500.0) == 0
        count = store.db.execute("SELECT count(*) FROM triplet").fetchone()[0]
        assert count == 1
        assert (
            await store.greylist_step("n|s|keep", "n", 1500.0, T, False)
        ).status is Status.PASSED
    finally:
        await store.aclose()
