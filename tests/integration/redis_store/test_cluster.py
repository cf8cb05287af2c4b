"""Redis Cluster: three masters on loopback ports. The contract suite's greylisting,
rate-limit and admin scenarios run against it unchanged, state spreads over the masters,
and a daemon greylists through it."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import contract.test_admin_store as admin_contract
import contract.test_greylist_store as greylist_contract
import contract.test_ratelimit_store as ratelimit_contract
import pytest
from support.exim_client import ask_blocking
from support.redis_server import RedisServer

from policyd.checks.greylist import Status, Timing
from policyd.stores import Store

from .conftest import DELAY, GREYLISTED, RedisLab, StoreOpener, daemon_policy, rcpt

pytestmark = pytest.mark.redis

SCENARIOS = {
    f"{module.__name__.rsplit('.', 1)[1]}::{name}": function
    for module in (greylist_contract, ratelimit_contract, admin_contract)
    for name, function in vars(module).items()
    if name.startswith("test_") and inspect.iscoroutinefunction(function)
}


@pytest.fixture(scope="module")
def cluster(module_redis_lab: RedisLab) -> list[RedisServer]:
    return module_redis_lab.cluster(3)


@pytest.fixture
def cluster_url(cluster: list[RedisServer]) -> Iterator[str]:
    """The cluster's URL, on an empty cluster."""
    for node in cluster:
        with node.client() as client:
            client.flushall()
    yield "redis+cluster://" + ",".join(node.address for node in cluster)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_contract_scenario_on_a_cluster(
    scenario: str, cluster_url: str, open_redis_store: StoreOpener
) -> None:
    function: Callable[..., Awaitable[None]] = SCENARIOS[scenario]

    async def factory() -> Store:
        return await open_redis_store(cluster_url)

    if "store_factory" in inspect.signature(function).parameters:
        await function(factory)
    else:
        await function(await factory())


async def test_state_spreads_over_every_master(
    cluster: list[RedisServer], cluster_url: str, open_redis_store: StoreOpener
) -> None:
    store = await open_redis_store(cluster_url)
    timing = Timing(delay=0, retry_window=3600, max_age=86400, auto_whitelist_after=0)
    for i in range(60):
        net = f"10.{i}.0.0/24"
        result = await store.greylist_step(f"{net}|a@x.org|b@y.org", net, 1e9, timing, True)
        assert result.status is Status.PASSED
    sizes = []
    for node in cluster:
        with node.client() as client:
            sizes.append(client.dbsize())
    assert sum(sizes) == 120 and all(size > 0 for size in sizes), sizes


def test_a_daemon_greylists_through_the_cluster(cluster_url: str, daemon_factory: Any) -> None:
    daemon = daemon_factory(**daemon_policy(cluster_url))
    daemon.start()
    question = rcpt("198.51.100.7", "bob@test.example")
    first_seen = time.monotonic()
    assert ask_blocking(daemon.socket, question).startswith(GREYLISTED)
    time.sleep(max(0.0, first_seen + DELAY + 0.05 - time.monotonic()))
    assert ask_blocking(daemon.socket, question) == b"ok passed"
    assert ask_blocking(daemon.socket, question) == b"ok known"
