"""The rate-limit contract every store honours: one atomic all-or-nothing GCRA operation."""

from __future__ import annotations

import asyncio

from policyd.checks.ratelimit import Charge, Limit
from policyd.stores import Store

from .conftest import StoreFactory

LIMIT = Limit(count=3, period=60, burst=3)


def charge(key: str, cost: int = 1, limit: Limit = LIMIT, dry_run: bool = False) -> Charge:
    return Charge(key.split("|", maxsplit=1)[0], key, cost, limit, dry_run)


async def test_admits_exactly_the_burst_then_refuses(store: Store) -> None:
    results = [await store.ratelimit_step([charge("r|k")], 100.0) for _ in range(5)]
    assert [r[0].outcome.allowed for r in results] == [True, True, True, False, False]
    assert results[3][0].outcome.retry_after == 20.0
    later = await store.ratelimit_step([charge("r|k")], 120.0)
    assert later[0].outcome.allowed


async def test_all_or_nothing_across_rules(store: Store) -> None:
    tight = Limit(1, 60, 1)
    assert (await store.ratelimit_step([charge("a|k", limit=tight)], 0.0))[0].outcome.allowed
    both = await store.ratelimit_step([charge("a|k", limit=tight), charge("b|k")], 1.0)
    assert [d.outcome.allowed for d in both] == [False, True]
    # b was not charged because the question as a whole was refused: 3 still fit.
    for _ in range(3):
        assert (await store.ratelimit_step([charge("b|k")], 1.0))[0].outcome.allowed


async def test_dry_run_never_blocks(store: Store) -> None:
    tight = Limit(1, 60, 1)
    await store.ratelimit_step([charge("d|k", limit=tight, dry_run=True)], 0.0)
    out = await store.ratelimit_step([charge("d|k", limit=tight, dry_run=True), charge("e|k")], 0.0)
    assert [d.outcome.allowed for d in out] == [False, True]
    again = await store.ratelimit_step([charge("e|k")], 0.0)
    assert again[0].outcome.allowed  # e was charged once above, 2 of 3 used now


async def test_concurrent_questions_admit_exactly_the_limit(store: Store) -> None:
    limit = Limit(count=50, period=3600, burst=50)
    results = await asyncio.gather(
        *(store.ratelimit_step([charge("c|k", limit=limit)], 10.0) for _ in range(80))
    )
    assert sum(r[0].outcome.allowed for r in results) == 50


async def test_rate_state_survives_reopen(store_factory: StoreFactory) -> None:
    first = await store_factory()
    for _ in range(3):
        await first.ratelimit_step([charge("p|k")], 0.0)
    await first.aclose()
    second = await store_factory()
    assert not (await second.ratelimit_step([charge("p|k")], 1.0))[0].outcome.allowed
