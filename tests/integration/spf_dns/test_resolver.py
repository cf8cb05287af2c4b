"""policyd.dns against the loopback DNS server: caching, bounds, failures, TCP, isolation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support.dns_server import DnsServer

from policyd.config import SpfConfig
from policyd.dns import DEFAULT_NEGATIVE_TTL, FAILURE_TTL, Resolver, Status

from .spf_support import QUERY_TIMEOUT, FakeClock


@pytest.fixture
async def make_resolver(dns: DnsServer) -> AsyncIterator[Callable[..., Resolver]]:
    made: list[Resolver] = []

    def make(**kwargs: Any) -> Resolver:
        kwargs.setdefault("query_timeout", QUERY_TIMEOUT)
        resolver = Resolver([dns.address], **kwargs)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


async def test_record_types(dns: DnsServer, make_resolver: Callable[..., Resolver]) -> None:
    dns.set_zone(
        {
            "example.com": [
                ("TXT", ["v=spf1 ", "ip4:192.0.2.0/24 -all"]),
                ("TXT", "other"),
                ("A", "192.0.2.1"),
                ("AAAA", "2001:db8::1"),
                ("MX", (20, "MX2.example.com.")),
                ("MX", (10, "mx1.example.com")),
            ],
            "1.2.0.192.in-addr.arpa": [("PTR", "Host.Example.com.")],
        }
    )
    resolver = make_resolver()
    txt = await resolver.lookup("example.com", "TXT")
    assert txt.status is Status.OK
    assert sorted(txt.values) == [
        b"other",
        b"v=spf1 ip4:192.0.2.0/24 -all",
    ]  # joined, RFC 7208 §3.3
    assert (await resolver.lookup("Example.COM.", "A")).values == ("192.0.2.1",)
    assert (await resolver.lookup("example.com", "AAAA")).values == ("2001:db8::1",)
    mx = await resolver.lookup("example.com", "MX")
    assert sorted(mx.values) == [(10, "mx1.example.com"), (20, "mx2.example.com")]
    ptr = await resolver.lookup("1.2.0.192.in-addr.arpa", "PTR")
    assert ptr.values == ("host.example.com",)


async def test_void_and_temporary_are_distinct(
    dns: DnsServer, make_resolver: Callable[..., Resolver]
) -> None:
    dns.set_zone({"example.com": [("A", "192.0.2.1")], "dead.example": [("TXT", "x")]})
    dns.servfail("broken.example")
    dns.drop("dead.example")
    resolver = make_resolver()
    nxdomain = await resolver.lookup("missing.example.com", "TXT")
    nodata = await resolver.lookup("example.com", "TXT")
    servfail = await resolver.lookup("broken.example", "TXT")
    timeout = await resolver.lookup("dead.example", "TXT")
    assert (nxdomain.status, nxdomain.void, nxdomain.temporary) == (Status.NXDOMAIN, True, False)
    assert (nodata.status, nodata.void, nodata.temporary) == (Status.NODATA, True, False)
    assert servfail.status is Status.TEMPFAIL and not servfail.void
    assert timeout.status is Status.TEMPFAIL and not timeout.void


async def test_ttl_is_respected(dns: DnsServer, make_resolver: Callable[..., Resolver]) -> None:
    dns.set_zone({"example.com": [("TXT", "v=spf1 -all", 60)]})
    clock = FakeClock()
    resolver = make_resolver(clock=clock)
    await resolver.lookup("example.com", "TXT")
    clock.advance(59)
    await resolver.lookup("example.com", "TXT")
    assert len(dns.queries("example.com")) == 1
    clock.advance(1)
    await resolver.lookup("example.com", "TXT")
    assert len(dns.queries("example.com")) == 2


async def test_negative_answers_cached_within_bound(
    dns: DnsServer, make_resolver: Callable[..., Resolver]
) -> None:
    clock = FakeClock()
    resolver = make_resolver(clock=clock)
    await resolver.lookup("nx.example", "TXT")
    clock.advance(DEFAULT_NEGATIVE_TTL - 1)
    await resolver.lookup("nx.example", "TXT")
    assert len(dns.queries("nx.example")) == 1
    clock.advance(1)
    await resolver.lookup("nx.example", "TXT")
    assert len(dns.queries("nx.example")) == 2


async def test_failures_are_remembered_briefly(
    dns: DnsServer, make_resolver: Callable[..., Resolver]
) -> None:
    dns.servfail("broken.example")
    clock = FakeClock()
    resolver = make_resolver(clock=clock)
    await resolver.lookup("broken.example", "TXT")
    asked = len(dns.queries("broken.example"))
    await resolver.lookup("broken.example", "TXT")
    assert len(dns.queries("broken.example")) == asked
    clock.advance(FAILURE_TTL)
    dns.heal("broken.example")
    assert (await resolver.lookup("broken.example", "TXT")).status is Status.NXDOMAIN


async def test_cache_is_bounded_lru(dns: DnsServer, make_resolver: Callable[..., Resolver]) -> None:
    dns.set_zone({f"d{i}.example": [("TXT", f"v=spf1 ip4:192.0.2.{i} -all")] for i in range(20)})
    resolver = make_resolver(cache_size=5)
    for i in range(5):
        await resolver.lookup(f"d{i}.example", "TXT")
    assert resolver.peek("d0.example", "TXT") is not None  # d0 is now the most recent
    for i in range(5, 20):
        await resolver.lookup(f"d{i}.example", "TXT")
        assert len(resolver) <= 5
    assert len(resolver) == 5
    assert resolver.peek("d1.example", "TXT") is None
    assert resolver.peek("d19.example", "TXT") is not None


async def test_concurrent_askers_share_one_query(
    dns: DnsServer, make_resolver: Callable[..., Resolver]
) -> None:
    dns.set_zone({"example.com": [("TXT", "v=spf1 -all")]})
    dns.delay("example.com", 0.1)
    resolver = make_resolver()
    answers = await asyncio.gather(*(resolver.lookup("example.com", "TXT") for _ in range(10)))
    assert {a.values for a in answers} == {(b"v=spf1 -all",)}
    assert len(dns.queries("example.com")) == 1


async def test_truncated_answer_retried_over_tcp(
    dns: DnsServer, make_resolver: Callable[..., Resolver]
) -> None:
    big = [f"v=spf1 include:_spf{i}.example.com" + " ip4:192.0.2.0/24" * 10 for i in range(12)]
    dns.set_zone(
        {"big.example": [("TXT", text) for text in big], "tc.example": [("TXT", "v=spf1 -all")]}
    )
    dns.truncate("tc.example")
    resolver = make_resolver()
    answer = await resolver.lookup("big.example", "TXT")  # ~2.5 KB: over any UDP limit
    assert sorted(answer.values) == sorted(text.encode() for text in big)
    assert [q.proto for q in dns.queries("big.example")] == ["udp", "tcp"]
    assert (await resolver.lookup("tc.example", "TXT")).values == (b"v=spf1 -all",)
    assert [q.proto for q in dns.queries("tc.example")] == ["udp", "tcp"]


async def test_cname_chain_followed(dns: DnsServer, make_resolver: Callable[..., Resolver]) -> None:
    dns.set_zone(
        {
            "alias.example": [("CNAME", "target.example", 30)],
            "target.example": [("TXT", "v=spf1 -all", 600)],
        }
    )
    clock = FakeClock()
    resolver = make_resolver(clock=clock)
    assert (await resolver.lookup("alias.example", "TXT")).values == (b"v=spf1 -all",)
    clock.advance(30)  # the chain's shortest TTL
    await resolver.lookup("alias.example", "TXT")
    assert len(dns.queries("alias.example")) == 2


async def test_cares_query_cache_is_off(
    dns: DnsServer, make_resolver: Callable[..., Resolver]
) -> None:
    """c-ares ≥ 1.23 caches by itself, unbounded; with it off, every miss here reaches DNS."""
    dns.set_zone({"example.com": [("TXT", "v=spf1 -all", 3600)]})
    resolver = make_resolver()
    for _ in range(3):
        resolver.clear()
        await resolver.lookup("example.com", "TXT")
    assert len(dns.queries("example.com")) == 3


async def test_nameserver_from_config(dns: DnsServer) -> None:
    from policyd.checks.spf import resolver_from_config

    dns.set_zone({"example.com": [("A", "192.0.2.1")]})
    resolver = resolver_from_config(SpfConfig(nameservers=(dns.address,)))
    try:
        assert (await resolver.lookup("example.com", "A")).values == ("192.0.2.1",)
    finally:
        await resolver.close()
    assert dns.queries("example.com", "A")


async def test_slow_name_does_not_slow_others(
    dns: DnsServer, make_resolver: Callable[..., Resolver]
) -> None:
    dns.set_zone(
        {"slow.example": [("TXT", "v=spf1 -all")]}
        | {f"fast{i}.example": [("TXT", "v=spf1 -all")] for i in range(20)}
    )
    dns.delay("slow.example", 5.0)
    resolver = make_resolver(query_timeout=6.0)
    slow = asyncio.ensure_future(resolver.lookup("slow.example", "TXT"))
    await asyncio.sleep(0.05)  # the slow query is on the wire
    latencies = []
    for i in range(20):
        started = time.perf_counter()
        answer = await resolver.lookup(f"fast{i}.example", "TXT")
        latencies.append(time.perf_counter() - started)
        assert answer.status is Status.OK
    assert not slow.done()
    assert max(latencies) < 0.2, latencies
    slow.cancel()
