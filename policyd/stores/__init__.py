"""Stores: the narrow interfaces the checks use, and the backend chosen by URL scheme.

Backends are imported lazily so the embedded default needs nothing beyond the standard
library, and the Redis client is only loaded when a ``redis://`` URL asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..checks.greylist import Client, GreylistStore, Timing, Triplet
from ..checks.ratelimit import RateLimitStore
from ..config import StoreConfig
from ..lists import ListStore
from .redis_url import SCHEMES as REDIS_SCHEMES


class StoreUnavailable(Exception):
    """The store cannot answer now (down, timing out, circuit open); use the fallback."""


class QuestionStore(GreylistStore, RateLimitStore, Protocol):
    """What answering a question needs: the dispatcher sees nothing else."""


class AdminStore(ListStore, Protocol):
    """What ``policyctl`` and the daemon's housekeeping need: read state without changing
    it, list, pass and delete, and the backend's figures. Never on the question path.

    A scan names key segments (split on ``|``): a string matches that segment exactly, None
    matches anything; each backend turns that into its own pattern syntax and escaping."""

    async def stats(self, auto_whitelist_after: int) -> dict[str, float]:
        """Figures for metrics and ``policyctl stats`` (what the backend can count cheaply)."""

    async def greylist_peek(
        self, triplet_key: str, client_key: str
    ) -> tuple[Triplet | None, Client | None]: ...

    async def ratelimit_peek(self, keys: Sequence[str]) -> list[float | None]: ...

    async def greylist_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, Triplet, float]]: ...

    async def greylist_pass(self, keys: Sequence[str], now: float, timing: Timing) -> int: ...

    async def greylist_delete(self, keys: Sequence[str]) -> int: ...

    async def ratelimit_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, float]]: ...

    async def ratelimit_delete(self, keys: Sequence[str]) -> int: ...


class Store(QuestionStore, Protocol):
    """One backend as the composition root holds it: the question path, its lifecycle, and
    its administrative side as a separate object."""

    @property
    def admin(self) -> AdminStore:
        """The administrative side, sharing the backend's connections."""

    async def start(self) -> None:
        """Open connections and prove the store answers (READY waits for this)."""

    async def aclose(self) -> None:
        """Flush and close; the store must not be used afterwards."""


async def open_store(config: StoreConfig) -> Store:
    """Build and start the backend named by ``config.url``."""
    scheme = config.url.split("://", 1)[0]
    store: Store
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        store = SQLiteStore.from_config(config)
    elif scheme in REDIS_SCHEMES:
        try:
            from .redis_store import RedisStore
        except ImportError as exc:  # the optional extra: pip install policyd[redis]
            raise StoreUnavailable(f"store scheme {scheme!r} needs redis-py: {exc}") from None
        store = RedisStore.from_config(config)
    else:
        raise StoreUnavailable(f"store scheme {scheme!r} is not available in this build")
    from .keys import HashedStore, KeyHasher

    hasher = KeyHasher.from_config(config)
    if hasher is not None:
        store = HashedStore(store, hasher)
    await store.start()
    return store
