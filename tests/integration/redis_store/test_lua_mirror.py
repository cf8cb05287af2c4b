"""The Lua scripts mirror the pure decision functions: for generated states, the state a
script stores (fields, expiry, TTL) is exactly what ``step()`` / ``decide_all()`` say.

The answer is computed in Python from the state the script found, so it always matches
``step()``; what could drift is the Lua transition that stores the next state. Boundaries
(waited == delay, age == retry window, ...) are generated on purpose.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.redis_server import RedisServer

from policyd.checks.greylist import Client, Timing, Triplet, step
from policyd.checks.ratelimit import Charge, Limit, decide_all
from policyd.stores.redis_admin import client_of, triplet_of
from policyd.stores.redis_store import RedisStore

from .conftest import store_config

pytestmark = pytest.mark.redis

NOW = 1_700_000_000.0
TRIPLET, CLIENT = "192.0.2.0/24|s@example.net|r@example.org", "192.0.2.0/24"
MIRROR = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class Harness:
    """One store on one loop for all examples (opening one per example would dominate)."""

    def __init__(self, server: RedisServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = RedisStore.from_config(store_config(server.url, timeout="900ms"))
        self.loop.run_until_complete(self.store.start())
        self.sync = server.client()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.store.aclose())
        self.loop.close()
        self.sync.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    server = RedisServer(tmp_path_factory.mktemp("mirror")).start()
    harness = Harness(server)
    yield harness
    harness.close()
    server.kill()


def timings() -> st.SearchStrategy[Timing]:
    return st.builds(
        lambda delay, extra, max_age, after: Timing(delay, delay + extra, max_age, after),
        st.sampled_from([0.0, 1.0, 300.0, 1234.5678]),
        # At least 5 s beyond the delay and a max age of 5 s or more: every TTL the script
        # sets is then long enough to read the key back before it expires.
        st.sampled_from([5.0, 60.0, 172800.0]),
        st.sampled_from([5.0, 600.0, 3024000.0]),
        st.integers(0, 3),
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[Triplet | None, Client | None, Timing, float, bool]:
    timing = draw(timings())
    marks = [0.0, timing.delay, timing.retry_window, timing.max_age]
    # Offsets into the past at the boundaries the machine compares against, and around them.
    offset = st.one_of(
        st.sampled_from(marks).flatmap(lambda m: st.sampled_from([m - 1e-6, m, m + 1e-6, m + 1])),
        st.floats(-10.0, 4e6, allow_nan=False),
    )
    triplet = draw(
        st.none()
        | st.builds(
            lambda f, l_, p, a: Triplet(NOW - f, NOW - min(f, l_), p, a),
            offset,
            offset,
            st.booleans(),
            st.integers(1, 9),
        )
    )
    client = draw(
        st.none() | st.builds(lambda n, l_: Client(n, NOW - l_), st.integers(0, 5), offset)
    )
    return (
        triplet,
        client,
        timing,
        NOW + draw(st.sampled_from([0.0, 0.123456789])),
        draw(st.booleans()),
    )


def _expected_ttl_ms(expires: float, now: float) -> int:
    return max(1, math.ceil((expires - now) * 1000))


def _check_ttl(sync: redis.Redis, key: str, expires: float, now: float) -> None:
    ttl = sync.pttl(key)
    expected = _expected_ttl_ms(expires, now)
    assert expected - 2000 < ttl <= expected, (key, ttl, expected)


@MIRROR
@given(cases())
def test_greylist_script_stores_what_step_says(
    harness: Harness, case: tuple[Triplet | None, Client | None, Timing, float, bool]
) -> None:
    triplet, client, timing, now, force = case
    layout, sync = harness.store.layout, harness.sync
    t_key, c_key = layout.triplet(TRIPLET), layout.client(CLIENT)
    sync.delete(t_key, c_key)
    if triplet is not None:
        sync.hset(
            t_key,
            mapping={
                "f": repr(triplet.first_seen),
                "l": repr(triplet.last_seen),
                "p": "1" if triplet.passed else "0",
                "a": str(triplet.attempts),
            },
        )
    if client is not None:
        sync.hset(c_key, mapping={"n": str(client.passes), "l": repr(client.last_seen)})
    result = harness.run(harness.store.greylist_step(TRIPLET, CLIENT, now, timing, force))
    expected = step(triplet, client, now, timing, force_pass=force)
    assert result == expected
    stored_triplet = triplet_of(sync.hmget(t_key, "f", "l", "p", "a"))
    stored_client = client_of(sync.hmget(c_key, "n", "l"))
    if expected.triplet is None:
        assert stored_triplet == triplet
    else:
        assert stored_triplet == expected.triplet
        assert float(sync.hget(t_key, "x") or 0) == expected.triplet_expires
        _check_ttl(sync, t_key, expected.triplet_expires, now)
    if expected.client is None:
        assert stored_client == client
    else:
        assert stored_client == expected.client
        assert float(sync.hget(c_key, "x") or 0) == expected.client_expires
        _check_ttl(sync, c_key, expected.client_expires, now)


limits = st.builds(
    lambda count, period, extra: Limit(count, period, count + extra),
    st.integers(1, 20),
    st.sampled_from([1.0, 60.0, 3600.0, 7.3]),
    st.integers(0, 5),
)


@MIRROR
@given(
    st.lists(
        st.tuples(
            limits,
            st.integers(1, 6),
            st.booleans(),
            st.none() | st.floats(NOW - 100, NOW + 5000, allow_nan=False),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_ratelimit_script_stores_what_decide_all_says(
    harness: Harness, rules: list[tuple[Limit, int, bool, float | None]]
) -> None:
    layout, sync = harness.store.layout, harness.sync
    charges = [
        Charge(f"r{i}", f"r{i}|192.0.2.1", cost, limit, dry)
        for i, (limit, cost, dry, _) in enumerate(rules)
    ]
    states = [state for *_, state in rules]
    keys = [layout.rate(c.key) for c in charges]
    sync.delete(*keys)
    for key, state in zip(keys, states, strict=True):
        if state is not None:
            sync.set(key, repr(state))
    decisions = harness.run(harness.store.ratelimit_step(charges, NOW))
    expected, admitted = decide_all(states, charges, NOW)
    assert decisions == expected
    for key, state, decision in zip(keys, states, expected, strict=True):
        raw = sync.get(key)
        stored = None if raw is None else float(raw)
        if admitted and decision.outcome.allowed:
            assert stored == decision.outcome.tat
            _check_ttl(sync, key, decision.outcome.tat, NOW)
        else:
            assert stored == state
