"""One store fixture, parametrised over every backend: each passes the same contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from policyd.config import StoreConfig
from policyd.stores import Store, open_store

StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["sqlite"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Opens a store on the same backing state each call (so reopening tests durability)."""
    opened: list[Store] = []
    url = f"sqlite://{tmp_path / 'state.sqlite3'}"

    async def factory() -> Store:
        store = await open_store(StoreConfig(url=url))
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.aclose()


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory()
