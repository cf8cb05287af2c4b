"""Stores: the narrow interfaces the checks use (``base``), and the backend chosen by URL
scheme.

Backends are imported lazily so the embedded default needs nothing beyond the standard
library, and the Redis client is only loaded when a ``redis://`` URL asks for it.
"""

from __future__ import annotations

from ..config import StoreConfig
from .base import AdminStore, QuestionStore, Store, StoreUnavailable
from .redis_url import SCHEMES as REDIS_SCHEMES

__all__ = ["AdminStore", "QuestionStore", "Store", "StoreUnavailable", "open_store"]


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
