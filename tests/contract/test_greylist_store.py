"""The greylist contract every store honours: the transitions of checks.greylist.step, made
atomically and durably, with expiry."""

from __future__ import annotations

import pytest

from policyd.checks.greylist import Status, Timing
from policyd.stores import Store

from .conftest import StoreFactory

T = Timing(delay=300, retry_window=2 * 86400, max_age=35 * 86400, auto_whitelist_after=2)
T0 = 1_700_000_000.0
NET = "192.0.2.0/24"


def key(rcpt: str, net: str = NET) -> str:
    return f"{net}|a@example.net|{rcpt}"


async def test_new_early_passed_known(store: Store) -> None:
    k = key("b@example.org")
    assert (await store.greylist_step(k, NET, T0, T, False)).status is Status.NEW
    early = await store.greylist_step(k, NET, T0 + 60, T, False)
    assert early.status is Status.EARLY
    assert early.retry_in == pytest.approx(240)
    passed = await store.greylist_step(k, NET, T0 + 301, T, False)
    assert passed.status is Status.PASSED
    assert passed.delayed == pytest.approx(301)
    assert (await store.greylist_step(k, NET, T0 + 5000, T, False)).status is Status.KNOWN


async def test_triplets_are_independent(store: Store) -> None:
    await store.greylist_step(key("b@example.org"), NET, T0, T, False)
    other = await store.greylist_step(key("c@example.org"), NET, T0 + 400, T, False)
    assert other.status is Status.NEW


async def test_client_is_auto_whitelisted_after_distinct_passes(store: Store) -> None:
    for rcpt in ("b@example.org", "c@example.org"):
        await store.greylist_step(key(rcpt), NET, T0, T, False)
        assert (
            await store.greylist_step(key(rcpt), NET, T0 + 301, T, False)
        ).status is Status.PASSED
    fresh = await store.greylist_step(key("new@example.org"), NET, T0 + 400, T, False)
    assert fresh.status is Status.AUTO
    elsewhere = await store.greylist_step(
        key("x@example.org", "198.51.100.0/24"), "198.51.100.0/24", T0 + 400, T, False
    )
    assert elsewhere.status is Status.NEW


async def test_force_pass(store: Store) -> None:
    result = await store.greylist_step(key("b@example.org"), NET, T0, T, True)
    assert result.status is Status.PASSED
    assert (
        await store.greylist_step(key("b@example.org"), NET, T0 + 1, T, False)
    ).status is Status.KNOWN


async def test_state_survives_reopen(store_factory: StoreFactory) -> None:
    first = await store_factory()
    await first.greylist_step(key("b@example.org"), NET, T0, T, False)
    await first.greylist_step(key("p@example.org"), NET, T0, T, False)
    await first.greylist_step(key("p@example.org"), NET, T0 + 301, T, False)
    await first.aclose()
    second = await store_factory()
    assert (
        await second.greylist_step(key("b@example.org"), NET, T0 + 302, T, False)
    ).status is Status.PASSED
    # Two passed triplets (one before, one after the reopen): the client's count survived.
    assert (
        await second.greylist_step(key("p@example.org"), NET, T0 + 400, T, False)
    ).status is Status.AUTO


async def test_expired_unpassed_entry_starts_over(store: Store) -> None:
    k = key("b@example.org")
    await store.greylist_step(k, NET, T0, T, False)
    later = T0 + T.retry_window + 10
    assert (await store.greylist_step(k, NET, later, T, False)).status is Status.NEW
