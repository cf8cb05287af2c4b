"""SpfCheck end to end over real DNS (loopback): policy, budget, give-up rule, greylist keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from support.dns_server import DnsServer

from policyd.checks.spf import (
    FAIL_CODE,
    FAIL_ECODE,
    PERMERROR_ECODE,
    TEMPERROR_CODE,
    TEMPERROR_ECODE,
    Identity,
    Result,
    SpfCheck,
)
from policyd.model import Action

from .spf_support import BUDGET, FakeClock, query

MakeCheck = Callable[..., SpfCheck]
#: Timing assertions leave this much room for a loaded CI machine.
SLACK = 0.3

ZONE = {
    "pool.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 -all", 60)],
    "soft.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 ~all")],
    "broken.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 moo -all")],
    "mail.pool.example": [("TXT", "v=spf1 -all")],
}


async def test_greylist_domain_for_the_whole_authorised_pool(
    dns: DnsServer, make_check: MakeCheck
) -> None:
    """First attempt from 192.0.2.10, retry from 198.51.100.7: one greylist key, the domain."""
    dns.set_zone(ZONE)
    check = make_check()
    first = await check.check(query("192.0.2.10", "news@pool.example"), 1000.0)
    retry = await check.check(query("198.51.100.7", "news@pool.example"), 1300.0)
    for outcome in (first, retry):
        assert outcome.result is Result.PASS
        assert outcome.verdict.action is Action.ACCEPT
        assert outcome.greylist_domain == "pool.example"
    assert (await check.check(query("203.0.113.1", "news@pool.example"), 0)).greylist_domain is None


@pytest.mark.parametrize(
    ("records", "key"),
    [
        ({"d.example": "v=spf1 +all"}, None),
        ({"d.example": "v=spf1 all"}, None),
        ({"d.example": "v=spf1 ip4:192.0.2.0/24 ?all"}, None),
        ({"d.example": "v=spf1 ip4:192.0.2.0/24"}, None),  # no all: an implicit ?all
        ({"d.example": "v=spf1 ip4:192.0.0.0/8 -all"}, None),  # wider than /12
        ({"d.example": "v=spf1 ip4:192.0.2.0/12 ~all"}, "d.example"),  # exactly /12
        ({"d.example": "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/31 -all"}, None),
        ({"d.example": "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"}, "d.example"),
        ({"d.example": "v=spf1 ip4:192.0.2.0/24 exists:%{i}.x.example -all"}, None),
        ({"d.example": "v=spf1 ip4:192.0.2.0/24 ptr -all"}, None),
        ({"d.example": "v=spf1 ip4:192.0.2.0/24 -ptr -exists:x.example -all"}, "d.example"),
        (
            {"d.example": "v=spf1 include:i.example -all", "i.example": "v=spf1 +all"},
            None,
        ),
        (
            {
                "d.example": "v=spf1 include:i.example -all",
                "i.example": "v=spf1 ip4:192.0.2.0/24 ?all",
            },
            "d.example",
        ),
        (
            {"d.example": "v=spf1 redirect=r.example", "r.example": "v=spf1 ip4:192.0.2.0/24 -all"},
            "d.example",
        ),
        (
            {"d.example": "v=spf1 redirect=r.example", "r.example": "v=spf1 ip4:192.0.2.0/24"},
            None,
        ),
        ({"d.example": "v=spf1 a:many.example/16 -all"}, "d.example"),  # exactly /12
        ({"d.example": "v=spf1 ip4:192.0.2.0/24 a:many.example/16 -all"}, None),  # the sum
    ],
)
async def test_wide_open_guard(
    dns: DnsServer, make_check: MakeCheck, records: dict[str, str], key: str | None
) -> None:
    zone: dict[str, list[object]] = {name: [("TXT", text)] for name, text in records.items()}
    # 16 addresses: as /16s, exactly one /12's worth.
    zone["many.example"] = [("A", f"192.0.2.{i}") for i in range(1, 17)]
    dns.set_zone(zone)
    outcome = await make_check().check(query("192.0.2.10", "x@d.example"), 0)
    assert outcome.result is Result.PASS
    assert outcome.greylist_domain == key


async def test_wide_open_guard_counts_a_and_mx(dns: DnsServer, make_check: MakeCheck) -> None:
    dns.set_zone(
        {
            "d.example": [
                ("TXT", "v=spf1 ip4:192.0.2.0/24 mx/16 -all"),
                ("MX", (10, "mx.d.example")),
            ],
            "mx.d.example": [("A", "203.0.113.1"), ("AAAA", "2001:db8::1")],
            "w.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 a:h.w.example/8 -all")],
            "h.w.example": [("A", "203.0.113.1")],
        }
    )
    check = make_check()
    assert (await check.check(query("192.0.2.1", "x@d.example"), 0)).greylist_domain == "d.example"
    assert (await check.check(query("192.0.2.1", "x@w.example"), 0)).greylist_domain is None


async def test_policy_mapping_end_to_end(dns: DnsServer, make_check: MakeCheck) -> None:
    dns.set_zone(ZONE)
    check = make_check(softfail_greylist_delay=600.0)
    fail = await check.check(query("203.0.113.9", "x@pool.example"), 0)
    assert (fail.result, fail.verdict.action) == (Result.FAIL, Action.REJECT)
    assert (fail.verdict.code, fail.verdict.ecode) == (FAIL_CODE, FAIL_ECODE)
    soft = await check.check(query("203.0.113.9", "x@soft.example"), 0)
    assert (soft.result, soft.verdict.action) == (Result.SOFTFAIL, Action.ACCEPT)
    assert soft.extra_greylist_delay == 600.0
    assert soft.headers[0].startswith("Received-SPF: softfail ")
    perm = await check.check(query("192.0.2.1", "x@broken.example"), 0)
    assert (perm.result, perm.verdict.action) == (Result.PERMERROR, Action.ACCEPT)
    none = await check.check(query("192.0.2.1", "x@nothing.example"), 0)
    assert (none.result, none.verdict.action) == (Result.NONE, Action.ACCEPT)

    strict = make_check(fail_action="tag", permerror_action="reject")
    tagged = await strict.check(query("203.0.113.9", "x@pool.example"), 0)
    assert (tagged.verdict.action, tagged.verdict.reason) == (Action.ACCEPT, "fail-tagged")
    assert "spf=fail" in tagged.headers[-1]
    rejected = await strict.check(query("192.0.2.1", "x@broken.example"), 0)
    assert (rejected.verdict.action, rejected.verdict.ecode) == (Action.REJECT, PERMERROR_ECODE)


async def test_helo_identity(dns: DnsServer, make_check: MakeCheck) -> None:
    dns.set_zone(ZONE)
    check = make_check()
    bounce = await check.check(query("203.0.113.9", "", helo="mail.pool.example"), 0)
    assert (bounce.identity, bounce.result) == (Identity.HELO, Result.FAIL)
    assert bounce.verdict.action is Action.REJECT
    assert (
        "identity=helo" in bounce.headers[0] and "smtp.helo=mail.pool.example" in bounce.headers[1]
    )
    for helo in ("localhost", "[192.0.2.1]", ""):
        outcome = await check.check(query("203.0.113.9", "<>", helo=helo), 0)
        assert (outcome.identity, outcome.result) == (Identity.HELO, Result.NONE)

    first = make_check(helo="first")
    decided_by_helo = await first.check(
        query("203.0.113.9", "x@soft.example", helo="mail.pool.example"), 0
    )
    assert [c.identity for c in decided_by_helo.checked] == [Identity.HELO]
    assert decided_by_helo.verdict.action is Action.REJECT
    both = await first.check(query("192.0.2.1", "x@pool.example", helo="other.example"), 0)
    assert [c.identity for c in both.checked] == [Identity.HELO, Identity.MAILFROM]
    assert both.result is Result.PASS
    assert len([h for h in both.headers if h.startswith("Received-SPF:")]) == 2


async def test_skips(dns: DnsServer, make_check: MakeCheck) -> None:
    import ipaddress

    dns.set_zone(ZONE)
    check = make_check(skip_clients=(ipaddress.ip_network("203.0.113.0/24"),))
    relay = await check.check(query("203.0.113.9", "x@pool.example"), 0)
    authed = await check.check(query("198.18.0.1", "x@pool.example", auth="alice"), 0)
    off = await make_check(enabled=False).check(query("198.18.0.1", "x@pool.example"), 0)
    assert [o.skipped for o in (relay, authed, off)] == [
        "skipped-client",
        "authenticated",
        "disabled",
    ]
    assert all(o.verdict.action is Action.ACCEPT and not o.headers for o in (relay, authed, off))
    assert not dns.log


async def test_warm_check_asks_no_dns_until_ttl(dns: DnsServer, make_check: MakeCheck) -> None:
    dns.set_zone(ZONE)
    clock = FakeClock()
    check = make_check(clock=clock)
    await check.check(query("192.0.2.10", "x@pool.example"), 0)
    asked = len(dns.log)
    assert asked
    clock.advance(59)
    again = await check.check(query("192.0.2.11", "y@pool.example"), 0)
    assert again.result is Result.PASS
    assert len(dns.log) == asked  # new client and sender: evaluated from the cache
    clock.advance(1)  # the record's TTL (60 s) is over
    await check.check(query("192.0.2.10", "x@pool.example"), 0)
    assert len(dns.queries("pool.example", "TXT")) == 2


async def test_temperror_defers_then_gives_up(dns: DnsServer, make_check: MakeCheck) -> None:
    dns.set_zone({"down.example": [("TXT", "v=spf1 -all")]})
    dns.drop("down.example")
    check = make_check(temperror_max_defers=2, temperror_max_time=3600.0)
    q = query("192.0.2.10", "x@down.example")
    for now in (1000.0, 1900.0):
        outcome = await check.check(q, now)
        assert outcome.result is Result.TEMPERROR
        assert outcome.verdict.action is Action.DEFER
        assert (outcome.verdict.code, outcome.verdict.ecode) == (TEMPERROR_CODE, TEMPERROR_ECODE)
    given_up = await check.check(q, 2800.0)
    assert given_up.result is Result.TEMPERROR
    assert (given_up.verdict.action, given_up.verdict.reason) == (
        Action.ACCEPT,
        "temperror-give-up",
    )
    assert given_up.headers[0].startswith("Received-SPF: temperror ")
    assert "spf=temperror" in given_up.headers[1]
    # Another sender from the same client is deferred: the rule is per (client IP, sender).
    other = await check.check(query("192.0.2.10", "y@down.example"), 2800.0)
    assert other.verdict.action is Action.DEFER
    # The time rule: a sender first deferred an hour ago is accepted.
    late = make_check(temperror_max_defers=100, temperror_max_time=3600.0)
    assert (await late.check(q, 0.0)).verdict.action is Action.DEFER
    assert (await late.check(q, 3600.0)).verdict.reason == "temperror-give-up"


async def test_budget_bounds_a_slow_check_and_spares_the_others(
    dns: DnsServer, make_check: MakeCheck
) -> None:
    """A domain whose answers take 5 s: its check ends at the budget as temperror, and
    checks for other domains made meanwhile answer in milliseconds."""
    zone = {"slow.example": [("TXT", "v=spf1 -all")]}
    zone |= {f"fast{i}.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")] for i in range(10)}
    dns.set_zone(zone)
    dns.delay("slow.example", 5.0)
    check = make_check(query_timeout=6.0)
    started = time.perf_counter()
    slow = asyncio.ensure_future(check.check(query("192.0.2.1", "x@slow.example"), 0))
    await asyncio.sleep(0.05)
    latencies = []
    for i in range(10):
        begun = time.perf_counter()
        outcome = await check.check(query("192.0.2.1", f"x@fast{i}.example"), 0)
        latencies.append(time.perf_counter() - begun)
        assert outcome.result is Result.PASS
    assert not slow.done()
    assert max(latencies) < 0.2, latencies
    slow_outcome = await slow
    elapsed = time.perf_counter() - started
    assert slow_outcome.result is Result.TEMPERROR
    assert slow_outcome.verdict.action is Action.DEFER
    assert BUDGET <= elapsed < BUDGET + SLACK


@pytest.mark.parametrize("sender", ["foo@localmx", "foo@LocalMX.", "foo@[192.0.2.1]", "localmx"])
@pytest.mark.parametrize("helo_mode", ["null-sender", "first"])
async def test_a_mail_from_domain_that_is_not_multi_label_gives_none(
    dns: DnsServer, make_check: MakeCheck, sender: str, helo_mode: str
) -> None:
    """RFC 7208 §4.3: none without DNS, even when the name publishes ``-all``."""
    dns.set_zone(
        {"localmx": [("TXT", "v=spf1 -all")], "fail-helo.example": [("TXT", "v=spf1 -all")]}
    )
    check = make_check(helo=helo_mode)
    outcome = await check.check(query("192.0.2.1", sender), 1000.0)
    assert (outcome.result, outcome.identity) == (Result.NONE, Identity.MAILFROM)
    assert outcome.verdict.action is Action.ACCEPT
    assert not dns.queries("localmx")
    if helo_mode == "first":  # the HELO identity is still checked, and its fail decides
        outcome = await make_check(helo=helo_mode).check(
            query("192.0.2.1", sender, helo="fail-helo.example"), 1000.0
        )
        assert (outcome.result, outcome.identity) == (Result.FAIL, Identity.HELO)
