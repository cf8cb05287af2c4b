"""Stores: the narrow interfaces the checks use, and the backend chosen by URL scheme.

Backends are imported lazily so the embedded default needs nothing beyond the standard
library, and the Redis client is only loaded when a ``redis://`` URL asks for it.
"""

from __future__ import annotations

from typing import Protocol

from ..checks.greylist import GreylistStore
from ..checks.ratelimit import RateLimitStore
from ..config import StoreConfig


class StoreUnavailable(Exception):
    """The store cannot answer now (down, timing out, circuit open); use the fallback."""


class Store(GreylistStore, RateLimitStore, Protocol):
    """Everything the daemon needs from one backend, plus its lifecycle."""

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
    else:
        raise StoreUnavailable(f"store scheme {scheme!r} is not available in this build")
    await store.start()
    return store
