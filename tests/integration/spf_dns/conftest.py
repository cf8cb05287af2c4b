"""SPF through the real async DNS path: a loopback DNS server (tests/support/dns_server.py), c-ares
pointed at it with a ``host:port`` nameserver, and SpfCheck on top.

No query leaves 127.0.0.1: every resolver here is built with the test server as its only
nameserver.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ holds the DNS server module shared by test packages (it is not a test file).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from support.dns_server import DnsServer

from policyd.checks.spf import SpfCheck
from policyd.config import SpfConfig
from policyd.dns import Resolver

from .spf_support import AUTHSERV_ID, BUDGET, QUERY_TIMEOUT, FakeClock


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:
    """The session's DNS server with an empty zone, no faults and an empty query log."""
    dns_server.set_zone({})
    return dns_server


@pytest.fixture
def spf_config(dns: DnsServer) -> Callable[..., SpfConfig]:
    """``[spf]`` pointing at the test server; keyword arguments override fields."""

    def make(**overrides: Any) -> SpfConfig:
        base = SpfConfig(
            enabled=True,
            nameservers=(dns.address,),
            timeout=BUDGET,
            query_timeout=QUERY_TIMEOUT,
            skip_clients=(),
            authserv_id=AUTHSERV_ID,
        )
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_check(
    spf_config: Callable[..., SpfConfig],
) -> AsyncIterator[Callable[..., SpfCheck]]:
    """SpfCheck factory: ``make_check(clock=None, **config_overrides)``; resolvers closed after."""
    resolvers: list[Resolver] = []

    def make(clock: Callable[[], float] | None = None, **overrides: Any) -> SpfCheck:
        config = spf_config(**overrides)
        resolver = Resolver(
            config.nameservers,
            cache_size=config.cache_size,
            query_timeout=config.query_timeout,
            negative_ttl=config.negative_ttl,
            **({"clock": clock} if clock is not None else {}),
        )
        resolvers.append(resolver)
        return SpfCheck(config, resolver)

    yield make
    for resolver in resolvers:
        await resolver.close()
