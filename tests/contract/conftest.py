"""One store fixture, parametrised over every backend: each passes the same contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from support.redis_server import RedisServer  # tests/support/redis_server.py

from policyd.config import StoreConfig
from policyd.stores import Store, open_store

StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture(scope="session")
def contract_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session: Unix socket in a temp dir, no persistence
    (durability across restarts is tests/integration/redis_store's business)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(params=["sqlite", "redis"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Opens a store on the same backing state each call (so reopening tests durability)."""
    opened: list[Store] = []
    url = f"sqlite://{tmp_path / 'state.sqlite3'}"
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("contract_redis")
        with server.client() as client:
            client.flushall()
        url = server.url

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
