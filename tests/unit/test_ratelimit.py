"""GCRA and the rate-limit shell, with an injected clock."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.addresses import NetworkSet
from policyd.checks.ratelimit import (
    Charge,
    Counted,
    Decision,
    Limit,
    RateLimiter,
    cost_of,
    decide_all,
    gcra,
)
from policyd.config import ConfigError, from_mapping, parse_rate
from policyd.model import Action, Query, Stage

HOURLY_100 = Limit(count=100, period=3600, burst=100)


def test_burst_then_exact_refusal_with_retry_after() -> None:
    tat = None
    for _ in range(100):
        out = gcra(tat, 0.0, 1, HOURLY_100)
        assert out.allowed
        tat = out.tat
    refused = gcra(tat, 0.0, 1, HOURLY_100)
    assert not refused.allowed
    assert refused.tat == tat  # a refusal changes nothing
    assert refused.retry_after == pytest.approx(36.0)
    assert gcra(tat, 36.0, 1, HOURLY_100).allowed


def test_cost_larger_than_burst_is_never_admitted() -> None:
    out = gcra(None, 0.0, 101, HOURLY_100)
    assert not out.allowed
    assert math.isinf(out.retry_after)


def test_fill_reports_how_close_to_the_limit() -> None:
    out = gcra(None, 0.0, 50, HOURLY_100)
    assert out.fill == pytest.approx(0.5)


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 50),
    period=st.floats(1, 1000),
    burst=st.integers(1, 50),
    arrivals=st.lists(st.tuples(st.floats(0, 5000), st.integers(1, 5)), max_size=200),
)
def test_never_more_than_burst_plus_rate_times_t(
    count: int, period: float, burst: int, arrivals: list[tuple[float, int]]
) -> None:
    """Over every window [a, b] of the arrival sequence, admitted units ≤ burst + rate·(b−a)."""
    limit = Limit(count, period, burst)
    tat: float | None = None
    admitted: list[tuple[float, int]] = []
    for now, cost in sorted(arrivals):
        out = gcra(tat, now, cost, limit)
        if out.allowed:
            tat = out.tat
            admitted.append((now, cost))
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, cost in admitted[i:]:
            total += cost
            assert total <= burst + (end - start) / limit.interval + 1e-6


def test_all_or_nothing_and_dry_run() -> None:
    strict = Charge("a", "a|k", 1, Limit(1, 60, 1), dry_run=False)
    loose = Charge("b", "b|k", 1, Limit(10, 60, 10), dry_run=False)
    full = 30.0 + 60  # TAT one interval ahead: the strict rule refuses now
    decisions, admitted = decide_all([full, None], [strict, loose], 30.0)
    assert not admitted
    assert [d.outcome.allowed for d in decisions] == [False, True]
    dry = Charge("a", "a|k", 1, Limit(1, 60, 1), dry_run=True)
    _, admitted = decide_all([full, None], [dry, loose], 30.0)
    assert admitted


@pytest.mark.parametrize(
    ("text", "rate"), [("100/1h", (100, 3600.0)), ("100/h", (100, 3600.0)), ("5/90s", (5, 90.0))]
)
def test_parse_rate(text: str, rate: tuple[int, float]) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("rule", "named"),
    [
        ({"name": "x", "rate": "fast"}, "ratelimit.rule[0].rate"),
        ({"name": "x", "key": ["client", "ip"]}, "ratelimit.rule[0].key"),
        ({"rate": "1/m"}, "ratelimit.rule[0].name"),
        ({"name": "x", "count": "bytes"}, "ratelimit.rule[0].stage"),
        ({"name": "x", "action": "drop"}, "ratelimit.rule[0].action"),
        ({"name": "x", "stage": "data", "key": "recipient"}, "ratelimit.rule[0].key"),
    ],
)
def test_rule_errors_name_the_key(rule: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        from_mapping({"ratelimit": {"rule": [rule]}})


class MemoryRateStore:
    def __init__(self) -> None:
        self.tats: dict[str, float] = {}
        self.calls: list[list[Charge]] = []

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        self.calls.append(list(charges))
        decisions, admitted = decide_all([self.tats.get(c.key) for c in charges], charges, now)
        if admitted:
            for d in decisions:
                if d.outcome.allowed:
                    self.tats[d.charge.key] = d.outcome.tat
        return decisions


def limiter(rules: list[dict[str, object]], store: MemoryRateStore) -> RateLimiter:
    config = from_mapping({"ratelimit": {"rule": rules}}).ratelimit
    return RateLimiter(config.rule, NetworkSet(config.exempt_clients), store)


def rcpt(ip: str = "192.0.2.10", auth: str = "", rcpt: str = "b@example.org") -> Query:
    return Query(
        Stage.RCPT,
        ipaddress.ip_address(ip),
        sender="a@example.net",
        recipient=rcpt,
        auth=auth,
        txn="t1",
        conn="c1",
    )


async def test_defer_text_says_when_to_retry() -> None:
    store = MemoryRateStore()
    rl = limiter([{"name": "per-client", "rate": "2/1h"}], store)
    for _ in range(2):
        assert (await rl.check(rcpt(), 0.0, set())).verdict is None
    refused = (await rl.check(rcpt(), 0.0, set())).verdict
    assert refused is not None
    assert (refused.action, refused.code, refused.ecode) == (Action.DEFER, 451, "4.7.1")
    assert "in 1800 seconds" in refused.text
    assert rl.counters["per-client"].limited == 1
    assert (await rl.check(rcpt(ip="192.0.2.11"), 0.0, set())).verdict is None


async def test_defer_text_says_one_second_in_the_singular() -> None:
    rl = limiter([{"name": "per-client", "rate": "1/1s"}], MemoryRateStore())
    assert (await rl.check(rcpt(), 0.0, set())).verdict is None
    refused = (await rl.check(rcpt(), 0.5, set())).verdict
    assert refused is not None
    assert refused.text == "Too much mail (per-client); please try again in 1 second"
    assert refused.text.isascii()


async def test_reject_only_when_the_rule_says_so() -> None:
    rl = limiter([{"name": "hard", "rate": "1/1h", "action": "reject"}], MemoryRateStore())
    await rl.check(rcpt(), 0.0, set())
    refused = (await rl.check(rcpt(), 0.0, set())).verdict
    assert refused is not None and (refused.action, refused.code) == (Action.REJECT, 550)


async def test_key_parts_and_exemptions() -> None:
    store = MemoryRateStore()
    rl = limiter(
        [
            {"name": "auth", "key": "auth", "rate": "5/m", "exempt_users": ["Boss"]},
            {
                "name": "dom",
                "key": ["client", "recipient_domain"],
                "rate": "5/m",
                "ipv4_prefix": 24,
                "exempt_clients": ["198.51.100.0/24"],
            },
        ],
        store,
    )
    await rl.check(rcpt(auth="Alice", rcpt="x@Example.ORG"), 0.0, set())
    assert [c.key for c in store.calls[-1]] == ["auth|alice", "dom|192.0.2.0/24|example.org"]
    await rl.check(rcpt(), 0.0, set())  # not authenticated: the auth rule does not apply
    assert [c.rule for c in store.calls[-1]] == ["dom"]
    await rl.check(rcpt(ip="198.51.100.5", auth="boss"), 0.0, set())
    assert len(store.calls) == 2  # both rules exempt: no store call at all
    await rl.check(rcpt(ip="127.0.0.1"), 0.0, set())
    assert len(store.calls) == 2  # loopback exempt globally by default


def test_costs() -> None:
    data = Query(Stage.DATA, ipaddress.ip_address("192.0.2.1"), nrcpt=20, size=5000)
    assert cost_of(Counted.RECIPIENTS, data) == 20
    assert cost_of(Counted.RECIPIENTS, rcpt()) == 1
    assert cost_of(Counted.MESSAGES, data) == 1
    assert cost_of(Counted.BYTES, data) == 5000


async def test_exempt_senders() -> None:
    store = MemoryRateStore()
    rl = limiter([{"name": "r", "rate": "5/m", "exempt_senders": ["a@example.net"]}], store)
    assert (await rl.check(rcpt(), 0.0, set())).verdict is None
    assert store.calls == []  # the sender is exempt: no store call
    other = Query(
        Stage.RCPT,
        ipaddress.ip_address("192.0.2.10"),
        sender="b@example.net",
        recipient="b@example.org",
    )
    await rl.check(other, 0.0, set())
    assert [c.rule for c in store.calls[-1]] == ["r"]
