"""DNS trouble under SPF never blocks mail: the daemon checks SPF against a loopback DNS
server (tests/support/dns_server.py) that stops answering, answers late, or answers SERVFAIL for the
senders' domain. Each question still gets its answer within the deadline (SPF's own budget,
800 ms, is below it): a temperror, deferred with ``451 4.4.3`` (RFC 7208 §8.6), never a
5xx; when DNS heals, SPF passes again without help."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from support.dns_server import DnsServer
from support.policyd_process import DaemonFactory

from .conftest import LoadFactory, policy
from .load import (
    GREYLISTED,
    PASSED,
    WHITELISTED_NET,
    Sample,
    assert_bounded,
    assert_every_question_answered,
    assert_no_traceback,
    running,
)

#: The senders' domain in the load (tests/faults/load.py).
DOMAIN = "example.net"
#: A short TTL, so the resolver's cache expires within the fault and the fault is seen.
TTL = 1
#: docs/spf.md: a temperror is deferred with RFC 7208 §8.6's 451 4.4.3.
TEMPERROR = b"defer 451 4.4.3 "
FAULT_SECONDS = 3.0
RECOVERY_BUDGET = 5.0

Fault = Callable[[DnsServer], None]
FAULTS: dict[str, Fault] = {
    "dropping": lambda dns: dns.drop(DOMAIN),
    "slow": lambda dns: dns.delay(DOMAIN, 1.5),
    "servfail": lambda dns: dns.servfail(DOMAIN),
}


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    # The load's clients (10/8) and the whitelisted network pass SPF for the senders' domain.
    record = f"v=spf1 ip4:10.0.0.0/8 ip4:{WHITELISTED_NET} -all"
    with DnsServer({DOMAIN: [("TXT", record, TTL)]}) as server:
        yield server


def spf_checked(sample: Sample) -> bool:
    """Answered after SPF passed (greylisting decided, with the SPF header on retries)."""
    return sample.answer.startswith(GREYLISTED) or sample.answer == PASSED


@pytest.mark.parametrize("fault", list(FAULTS))
def test_dns_fault(
    daemon_factory: DaemonFactory, dns: DnsServer, load_on: LoadFactory, fault: str
) -> None:
    daemon = daemon_factory(**policy(spf={"enabled": True, "nameservers": [dns.address]}))
    daemon.start()
    with running(load_on(daemon)) as load:
        load.wait_for(spf_checked, "after an SPF pass", RECOVERY_BUDGET)
        FAULTS[fault](dns)
        broken = time.monotonic()
        time.sleep(FAULT_SECONDS)
        dns.heal(DOMAIN)
        healed = time.monotonic()
        load.wait_for(spf_checked, "after DNS healed", RECOVERY_BUDGET + TTL)

    assert_every_question_answered(load.samples)
    assert_bounded(load)
    during = load.between(broken + TTL + 0.2, healed)
    assert any(s.answer.startswith(TEMPERROR) for s in during), "the fault was never seen"
    assert not any(s.answer.startswith(b"reject") for s in load.samples)
    assert_no_traceback(daemon.log_since_start())
