"""The administrative contract every store honours: runtime whitelists, and reading,
listing, passing and deleting greylist and rate-limit state (what policyctl uses)."""

from __future__ import annotations

from policyd.checks.greylist import Status, Timing
from policyd.checks.ratelimit import Charge, Limit
from policyd.stores import Store
from policyd.whitelist import ListEntry

from .conftest import StoreFactory

T = Timing(delay=300, retry_window=2 * 86400, max_age=35 * 86400, auto_whitelist_after=3)
T0 = 1_700_000_000.0
NET, OTHER = "192.0.2.0/24", "198.51.100.0/24"


def key(sender: str, rcpt: str, net: str = NET) -> str:
    return f"{net}|{sender}|{rcpt}"


async def test_whitelist_entries_add_list_remove(store_factory: StoreFactory) -> None:
    store = await store_factory()
    await store.admin.list_add(ListEntry("sender", "a@example.net", 0.0, "vip", T0))
    await store.admin.list_add(ListEntry("client", "192.0.2.0/24", T0 + 60, "", T0))
    await store.admin.list_add(ListEntry("client_host_re", r"^mx\d+\.example\.|x", 0.0, "re", T0))
    await store.admin.list_add(ListEntry("sender", "a@example.net", 0.0, "replaced", T0 + 1))
    entries = await store.admin.list_entries()
    assert [(e.kind, e.value) for e in entries] == [
        ("client", "192.0.2.0/24"),
        ("client_host_re", r"^mx\d+\.example\.|x"),
        ("sender", "a@example.net"),
    ]
    assert entries[0].expires == T0 + 60
    assert entries[2] == ListEntry("sender", "a@example.net", 0.0, "replaced", T0 + 1)
    assert await store.admin.list_remove("sender", "a@example.net")
    assert not await store.admin.list_remove("sender", "a@example.net")
    await store.aclose()
    reopened = await store_factory()
    assert len(await reopened.admin.list_entries()) == 2


async def test_peek_reads_without_changing(store: Store) -> None:
    k = key("a@example.net", "b@example.org")
    assert await store.admin.greylist_peek(k, NET) == (None, None)
    await store.greylist_step(k, NET, T0, T, False)
    await store.greylist_step(k, NET, T0 + 301, T, False)
    triplet, client = await store.admin.greylist_peek(k, NET)
    assert triplet is not None and triplet.passed and triplet.attempts == 2
    assert triplet.first_seen == T0 and triplet.last_seen == T0 + 301
    assert client is not None and client.passes == 1
    assert await store.admin.greylist_peek(k, NET) == (triplet, client)


async def test_scan_by_segment_newest_first(store: Store) -> None:
    await store.greylist_step(key("a@example.net", "x@example.org"), NET, T0, T, False)
    await store.greylist_step(key("a@example.net", "y@example.org"), NET, T0 + 5, T, False)
    await store.greylist_step(key("b@example.net", "x@example.org"), NET, T0 + 9, T, False)
    await store.greylist_step(key("a@example.net", "x@example.org", OTHER), OTHER, T0, T, False)
    rows = await store.admin.greylist_scan([NET, "a@example.net", None], 10)
    assert [r[0] for r in rows] == [
        key("a@example.net", "y@example.org"),
        key("a@example.net", "x@example.org"),
    ]
    assert rows[0][2] == T0 + 5 + T.retry_window  # the expiry, in the caller's clock
    everything = await store.admin.greylist_scan([None, None, None], 10)
    assert len(everything) == 4
    assert len(await store.admin.greylist_scan([None, None, "x@example.org"], 10)) == 3
    assert len(await store.admin.greylist_scan([None, None, None], 2)) == 2
    # Glob characters in a segment are literal.
    assert await store.admin.greylist_scan([None, "*", None], 10) == []


async def test_pass_and_delete(store: Store) -> None:
    waiting = key("a@example.net", "x@example.org")
    await store.greylist_step(waiting, NET, T0, T, False)
    missing = key("new@example.net", "x@example.org")
    assert await store.admin.greylist_pass([waiting, missing], T0 + 10, T) == 2
    assert (await store.greylist_step(waiting, NET, T0 + 11, T, False)).status is Status.KNOWN
    assert (await store.greylist_step(missing, NET, T0 + 11, T, False)).status is Status.KNOWN
    assert await store.admin.greylist_delete([waiting, key("none@x", "y@z")]) == 1
    assert (await store.greylist_step(waiting, NET, T0 + 12, T, False)).status is Status.NEW


async def test_rate_peek_scan_delete(store: Store) -> None:
    limit = Limit(count=10, period=60, burst=10)
    for k, n in (("flood|192.0.2.1", 3), ("flood|192.0.2.2", 1), ("other|192.0.2.1", 2)):
        for _ in range(n):
            await store.ratelimit_step([Charge(k.split("|")[0], k, 1, limit, False)], 100.0)
    assert await store.admin.ratelimit_peek(["flood|192.0.2.1", "flood|none"]) == [118.0, None]
    rows = await store.admin.ratelimit_scan(["flood", None], 10)
    assert rows == [("flood|192.0.2.1", 118.0), ("flood|192.0.2.2", 106.0)]
    assert await store.admin.ratelimit_scan([None, "192.0.2.1"], 1) == [("flood|192.0.2.1", 118.0)]
    assert await store.admin.ratelimit_delete([k for k, _ in rows]) == 2
    assert await store.admin.ratelimit_scan(["flood", None], 10) == []
    assert await store.admin.ratelimit_peek([]) == []
