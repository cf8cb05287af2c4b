"""The Redis store's administrative side: runtime whitelists, and reading, passing and
deleting greylist and rate-limit state for ``policyctl`` (never on the question path).

Listings walk the keyspace with SCAN (every master of a Cluster) and keep only the best
``limit`` rows while they go, so memory stays bounded whatever the number of keys.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..checks.greylist import Client, Timing, Triplet
from ..whitelist import ListEntry
from .redis_scripts import GREYLIST_PASS, KeyLayout, Script
from .sqlite_admin import MAX_SCAN

if TYPE_CHECKING:
    from .redis_store import RedisStore

#: Budget of one admin operation (a scan of a large keyspace takes a while).
ADMIN_TIMEOUT: Final = 30.0
#: Keys asked per SCAN call, and values read per pipeline.
SCAN_COUNT: Final = 1000
#: Separates kind and value in a whitelist hash field (kinds never contain it).
FIELD_SEPARATOR: Final = "|"
_T = TypeVar("_T")


def triplet_of(found: Sequence[bytes | None]) -> Triplet | None:
    """A Triplet from HMGET f l p a (None when the record is missing or incomplete)."""
    first, last, passed, attempts = found
    if first is None or last is None or attempts is None:
        return None
    return Triplet(float(first), float(last), passed == b"1", int(attempts))


def client_of(found: Sequence[bytes | None]) -> Client | None:
    """A Client from HMGET n l."""
    passes, last = found
    if passes is None or last is None:
        return None
    return Client(int(passes), float(last))


class RedisAdmin:
    """``RedisStore.admin``: the same client, key layout and circuit breaker as the question
    path (``guard``: budget and breaker; ``eval_script``: queued with the questions' calls)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.layout: KeyLayout = store.layout

    @property
    def client(self) -> Any:
        """redis-py's client (made when the store starts)."""
        return self.store.client

    async def _guard(self, operation: Awaitable[_T], budget: float | None = None) -> _T:
        return await self.store.guard(operation, budget)

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        return await self.store.eval_script(script, keys, args)

    async def stats(self, auto_whitelist_after: int) -> dict[str, float]:
        """Cheap figures only: counting clients would need a scan of the whole keyspace."""
        store = self.store
        breaker = store.breaker
        return {
            "unavailable": float(store.unavailable),
            "breaker_open": float(not breaker.is_closed),
            "breaker_opened": float(breaker.opened),
            "breaker_rejected": float(breaker.rejected),
        }

    # --- runtime whitelists -----------------------------------------------------------

    async def list_add(self, entry: ListEntry) -> None:
        field = f"{entry.kind}{FIELD_SEPARATOR}{entry.value}"
        value = json.dumps([entry.expires, entry.comment, entry.added])
        await self._list_change("HSET", field, value)

    async def list_remove(self, kind: str, value: str) -> bool:
        field = f"{kind}{FIELD_SEPARATOR}{value}"
        return bool(await self._list_change("HDEL", field))

    async def _list_change(self, command: str, *args: str) -> Any:
        """The change, then a version bump, in one round trip: every daemon sharing this
        Redis sees the new version on its next poll (``list_version``) and reloads. (No
        MULTI: a restricted ACL user needs nothing beyond the documented commands.)"""
        layout = self.layout

        async def change() -> Any:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command(command, layout.whitelist, *args)
                pipe.incr(layout.whitelist_version)
                result, _ = await pipe.execute()
                return result

        return await self._guard(change())

    async def list_version(self) -> str:
        version = await self._guard(self.client.get(self.layout.whitelist_version))
        return version.decode() if isinstance(version, bytes) else str(version or "0")

    async def list_entries(self) -> list[ListEntry]:
        raw: dict[bytes, bytes] = await self._guard(
            self.client.hgetall(self.layout.whitelist), ADMIN_TIMEOUT
        )
        entries = []
        for field, value in raw.items():
            kind, _, text = field.decode().partition(FIELD_SEPARATOR)
            expires, comment, added = json.loads(value)
            entries.append(ListEntry(kind, text, float(expires), str(comment), float(added)))
        entries.sort(key=lambda e: (e.kind, e.value))
        return entries

    # --- reading state ----------------------------------------------------------------

    async def greylist_peek(
        self, triplet_key: str, client_key: str
    ) -> tuple[Triplet | None, Client | None]:
        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.layout.triplet(triplet_key), "f", "l", "p", "a")
            pipe.hmget(self.layout.client(client_key), "n", "l")
            replies: list[Any] = await pipe.execute()
            return replies

        found_triplet, found_client = await self._guard(read())
        return triplet_of(found_triplet), client_of(found_client)

    async def ratelimit_peek(self, keys: Sequence[str]) -> list[float | None]:
        if not keys:
            return []
        # All rate keys share one hash tag: one MGET, even on a Cluster.
        found = await self._guard(self.client.mget([self.layout.rate(k) for k in keys]))
        return [None if v is None else float(v) for v in found]

    async def greylist_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, Triplet, float]]:
        """Matching triplets, most recently seen first (``limit`` at most)."""
        layout, size = self.layout, max(0, min(limit, MAX_SCAN))

        async def scan() -> list[tuple[str, Triplet, float]]:
            best: list[tuple[float, str, Triplet, float]] = []
            async for chunk in self._matching(layout.triplet_pattern(parts)):
                pipe = self.client.pipeline(transaction=False)
                for key in chunk:
                    pipe.hmget(key, "f", "l", "p", "a", "x")
                for key, found in zip(chunk, await pipe.execute(), strict=True):
                    triplet = triplet_of(found[:4])
                    if triplet is None:
                        continue
                    expires = float(found[4]) if found[4] is not None else 0.0
                    item = (triplet.last_seen, layout.triplet_key(key.decode()), triplet, expires)
                    _keep_best(best, item, size)
            best.sort(key=lambda row: row[0], reverse=True)
            return [(key, triplet, expires) for _, key, triplet, expires in best]

        return await self._guard(scan(), ADMIN_TIMEOUT)

    async def ratelimit_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, float]]:
        """Matching rate keys, highest TAT (fullest) first (``limit`` at most)."""
        layout, size = self.layout, max(0, min(limit, MAX_SCAN))

        async def scan() -> list[tuple[str, float]]:
            best: list[tuple[float, str]] = []
            async for chunk in self._matching(layout.rate_pattern(parts)):
                found = await self.client.mget(chunk)
                for key, tat in zip(chunk, found, strict=True):
                    if tat is not None:
                        _keep_best(best, (float(tat), layout.rate_key(key.decode())), size)
            best.sort(key=lambda row: row[0], reverse=True)
            return [(key, tat) for tat, key in best]

        return await self._guard(scan(), ADMIN_TIMEOUT)

    async def _matching(self, pattern: str) -> AsyncIterator[list[bytes]]:
        """Keys matching ``pattern``, in chunks of at most SCAN_COUNT."""
        chunk: list[bytes] = []
        async for key in self.client.scan_iter(match=pattern, count=SCAN_COUNT):
            chunk.append(key)
            if len(chunk) >= SCAN_COUNT:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    # --- changing state ---------------------------------------------------------------

    async def greylist_pass(self, keys: Sequence[str], now: float, timing: Timing) -> int:
        """Mark triplets passed now (``policyctl greylist pass``); creates missing ones."""
        args = (repr(float(now)), repr(float(timing.max_age)))
        # Queued together: the store sends them in as few pipelines as it can.
        await asyncio.gather(
            *(self._eval(GREYLIST_PASS, (self.layout.triplet(key),), args) for key in keys)
        )
        return len(keys)

    async def greylist_delete(self, keys: Sequence[str]) -> int:
        return await self._delete([self.layout.triplet(k) for k in keys])

    async def ratelimit_delete(self, keys: Sequence[str]) -> int:
        return await self._delete([self.layout.rate(k) for k in keys])

    async def _delete(self, redis_keys: list[str]) -> int:
        async def delete() -> int:
            removed = 0
            for start in range(0, len(redis_keys), SCAN_COUNT):
                pipe = self.client.pipeline(transaction=False)
                for key in redis_keys[start : start + SCAN_COUNT]:
                    pipe.delete(key)  # one key per command: keys may be in any slot
                removed += sum(await pipe.execute())
            return removed

        return await self._guard(delete(), ADMIN_TIMEOUT)


def _keep_best(heap: list[Any], item: tuple[Any, ...], size: int) -> None:
    """Keep the ``size`` largest items (by their first element) in a min-heap."""
    if size <= 0:
        return
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item[0] > heap[0][0]:
        heapq.heapreplace(heap, item)
