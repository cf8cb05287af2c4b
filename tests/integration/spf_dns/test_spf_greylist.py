"""SPF deferrals start the greylist clock (docs/greylisting.md "SPF deferrals start the
clock"): the dispatcher over the real embedded store and real DNS (tests/support/dns_server.py),
with injected clocks for the dispatcher and the DNS cache."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from support.dns_server import DnsServer

from policyd.config import from_mapping
from policyd.dispatch import Dispatcher
from policyd.dns import FAILURE_TTL, Resolver
from policyd.stores import open_store

from .spf_support import BUDGET, QUERY_TIMEOUT, FakeClock

DELAY = 300.0
START = 1_700_000_000.0
POOL = {"pool.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 -all")]}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(txn: str, sender: str, to: str, ip: str) -> bytes:
    return (
        f"rcpt v=1 ip={ip} helo_b64={b64('mta.example.net')} from_b64={b64(sender)} "
        f"rcpt_b64={b64(to)} txn={txn} conn={txn}\n"
    ).encode()


Make = Callable[..., "tuple[Dispatcher, FakeClock, FakeClock]"]


@pytest.fixture
async def make(tmp_path: Path, dns: DnsServer) -> AsyncIterator[Make]:
    """A dispatcher with greylisting (delay 5 min) and SPF on; returns it, its clock (wall
    seconds) and the DNS cache's clock."""
    opened: list[tuple[object, Resolver]] = []

    async def factory(**spf: object) -> tuple[Dispatcher, FakeClock, FakeClock]:
        config = from_mapping(
            {
                "store": {"url": f"sqlite://{tmp_path / 'state.sqlite3'}"},
                "greylist": {"enabled": True, "delay": DELAY, "whitelist_clients": []},
                "spf": {
                    "enabled": True,
                    "nameservers": [dns.address],
                    "skip_clients": [],
                    "timeout": BUDGET,
                    "query_timeout": QUERY_TIMEOUT,
                    **spf,
                },
            }
        )
        store = await open_store(config.store)
        dns_clock = FakeClock()
        resolver = Resolver(
            config.spf.nameservers, query_timeout=config.spf.query_timeout, clock=dns_clock
        )
        opened.append((store, resolver))
        clock = FakeClock()
        clock.now = START
        dispatcher = Dispatcher(config, store, clock=clock, hostname="mx.test", resolver=resolver)
        return dispatcher, clock, dns_clock

    yield factory
    for store, resolver in opened:
        await resolver.close()
        await store.aclose()  # type: ignore[attr-defined]


async def test_spf_pass_after_temperrors_counts_the_delay_from_the_first_deferral(
    dns: DnsServer, make: Make
) -> None:
    """Deferred twice for SPF (SERVFAIL), then DNS is fixed: the retry that passes SPF is
    keyed on the SPF domain, from another host of the pool, and waits only for the rest of
    the delay counted from the first deferral, for every recipient."""
    dns.set_zone(POOL)
    dns.servfail("pool.example")
    disp, clock, dns_clock = await make()
    sender, rcpts = "news@pool.example", ["a@local.example", "b@local.example"]

    for n, (ip, offset) in enumerate((("192.0.2.10", 0.0), ("192.0.2.10", 60.0))):
        clock.now = START + offset
        dns_clock.advance(FAILURE_TTL + 1)  # each attempt asks DNS again
        for to in rcpts:
            answer = await disp.answer(rcpt(f"t{n}", sender, to, ip))
            assert answer.startswith(b"defer 451 4.4.3 "), answer

    dns.heal("pool.example")
    dns_clock.advance(FAILURE_TTL + 1)
    clock.now = START + 120
    early = await disp.answer(rcpt("t2", sender, rcpts[0], "198.51.100.7"))
    assert early.startswith(b"defer 451 4.7.1 "), early
    assert b"3 minutes" in early, early  # the rest of the delay, not a new one

    clock.now = START + DELAY
    for to in rcpts:
        answer = await disp.answer(rcpt("t3", sender, to, "198.51.100.7"))
        assert answer == b"ok passed", answer


async def test_given_up_temperror_counts_the_delay_from_the_first_deferral(
    dns: DnsServer, make: Make
) -> None:
    """The give-up rule accepts a temperror: greylisting keys on the client network, whose
    clock started at the first deferral."""
    dns.set_zone({"down.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]})
    dns.servfail("down.example")
    disp, clock, _ = await make(temperror_max_defers=2)
    sender, to, ip = "x@down.example", "a@local.example", "192.0.2.10"
    for n, offset in enumerate((0.0, 60.0)):
        clock.now = START + offset
        answer = await disp.answer(rcpt(f"t{n}", sender, to, ip))
        assert answer.startswith(b"defer 451 4.4.3 "), answer
    clock.now = START + 120
    given_up = await disp.answer(rcpt("t2", sender, to, ip))
    assert given_up.startswith(b"defer 451 4.7.1 ") and b"3 minutes" in given_up, given_up
    clock.now = START + DELAY
    assert await disp.answer(rcpt("t3", sender, to, ip)) == b"ok passed"


async def test_without_spf_deferrals_a_pass_is_greylisted_as_new(
    dns: DnsServer, make: Make
) -> None:
    """The control: no deferral before, the full delay from the first SPF pass."""
    dns.set_zone(POOL)
    disp, _, _ = await make()
    answer = await disp.answer(rcpt("t0", "news@pool.example", "a@local.example", "192.0.2.10"))
    assert answer.startswith(b"defer 451 4.7.1 ") and b"5 minutes" in answer, answer
