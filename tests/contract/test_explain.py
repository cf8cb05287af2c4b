"""``explain`` equals the decision (issue 19): for a table of questions, explain first, then
the real question through ``Dispatcher.answer``; both must give the same action, reason and
answer, and explain must change nothing in the store. On every store backend, with SPF over
the loopback DNS server (tests/support/dns_server.py) and the runtime whitelist edited through the
admin interface."""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from support.dns_server import DnsServer, running  # tests/support/dns_server.py

from policyd.admin.explain import explain
from policyd.admin.server import Admin
from policyd.config import Config, from_mapping
from policyd.dispatch import Dispatcher
from policyd.model import Query, Stage
from policyd.protocol import normalise_ip
from policyd.stores import Store

START = 1_700_000_000.0
DELAY = 300.0
QUERY_TIMEOUT = 0.3
#: SPF: 192.0.2.0/24 may send for pass.example and pool.example; nobody for fail.example;
#: neutral.example says nothing useful; flaky.example's server fails (temperror);
#: nospf.example has no record.
ZONE = {
    "pass.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "pool.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "fail.example": [("TXT", "v=spf1 -all")],
    "neutral.example": [("TXT", "v=spf1 ?all")],
    "flaky.example": [("TXT", "v=spf1 -all")],
}
DECISION_RE = re.compile(r"action=(\S+) check=(\S+) reason=(\S+)")


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with running(ZONE) as server:
        server.servfail("flaky.example")
        yield server


def policy(dns: DnsServer) -> Config:
    """Greylisting (auto-whitelisting after 2 passes), a rate rule for authenticated users
    (2 recipients an hour), SPF (fail rejects, a temperror is given up after 1 deferral)."""
    return from_mapping(
        {
            "greylist": {
                "delay": DELAY,
                "auto_whitelist_after": 2,
                "whitelist_clients": ["203.0.113.0/24"],
                "whitelist_recipients": ["postmaster@"],
            },
            "ratelimit": {
                "rule": [
                    {"name": "per-user", "count": "recipients", "rate": "2/1h", "key": ["auth"]}
                ]
            },
            "spf": {
                "enabled": True,
                "nameservers": [dns.address],
                "skip_clients": [],
                "query_timeout": QUERY_TIMEOUT,
                "fail_action": "reject",
                "temperror_max_defers": 1,
            },
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Case:
    """One question: ``before`` runs first (time passes, an admin edits the whitelist)."""

    name: str
    client: str
    sender: str
    recipient: str
    action: str
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)
    before: Callable[[Admin, Clock], Awaitable[object]] | None = None

    def query(self) -> Query:
        return Query(
            Stage.RCPT,
            normalise_ip(self.client),
            sender=self.sender,
            recipient=self.recipient,
            **self.fields,
        )


def later(seconds: float) -> Callable[[Admin, Clock], Awaitable[None]]:
    async def advance(_: Admin, clock: Clock) -> None:
        clock.now += seconds

    return advance


def listed(kind: str, value: str) -> Callable[[Admin, Clock], Awaitable[object]]:
    async def add(admin: Admin, _: Clock) -> object:
        answer = await admin.handle({"cmd": "whitelist.add", "kind": kind, "value": value})
        assert answer["ok"], answer
        return answer

    return add


async def learning(admin: Admin, _: Clock) -> None:
    config = admin.dispatcher.config
    learn = dataclasses.replace(config.greylist, learn=True)
    admin.dispatcher.reconfigure(dataclasses.replace(config, greylist=learn))


# No whitelist, no SPF authorisation; A's network becomes auto-whitelisted, B's does not.
A, B = "198.51.100.10", "198.18.0.11"
NOSPF, BOB, CAROL = "a@nospf.example", "bob@test.example", "carol@test.example"
CASES = [
    Case("new triplet", A, NOSPF, BOB, "defer", "new"),
    Case("early retry", A, NOSPF, BOB, "defer", "early-retry", before=later(60)),
    Case("retry after the delay", A, NOSPF, BOB, "ok", "passed", before=later(DELAY)),
    Case("known triplet", A, NOSPF, BOB, "ok", "known", before=later(10)),
    Case("second triplet, new", A, NOSPF, CAROL, "defer", "new"),
    Case("second triplet passes", A, NOSPF, CAROL, "ok", "passed", before=later(DELAY + 1)),
    Case("client auto-whitelisted", A, NOSPF, "dave@test.example", "ok", "auto-whitelisted"),
    Case("static client whitelist", "203.0.113.5", NOSPF, BOB, "ok", "whitelisted-client"),
    Case(
        "static recipient whitelist",
        B,
        NOSPF,
        "postmaster@test.example",
        "ok",
        "whitelisted-recipient",
    ),
    Case(
        "runtime ip entry",
        "192.0.2.77",
        NOSPF,
        BOB,
        "ok",
        "whitelist-client",
        before=listed("client", "192.0.2.77"),
    ),
    # The drift issue 19 found: a runtime entry and a skip reason both apply.
    Case(
        "runtime entry over authenticated",
        "192.0.2.77",
        NOSPF,
        BOB,
        "ok",
        "whitelist-client",
        {"auth": "alice"},
    ),
    Case(
        "runtime entry over static list",
        "203.0.113.6",
        NOSPF,
        BOB,
        "ok",
        "whitelist-client",
        before=listed("client", "203.0.113.6"),
    ),
    Case(
        "runtime host entry",
        B,
        NOSPF,
        BOB,
        "ok",
        "whitelist-client_host",
        {"host": "mx1.partner.example"},
        listed("client_host", "partner.example"),
    ),
    Case("host entry needs the host", B, NOSPF, BOB, "defer", "new"),
    Case(
        "sender domain with SPF pass",
        "192.0.2.20",
        "news@pass.example",
        BOB,
        "ok",
        "whitelist-sender_domain",
        before=listed("sender_domain", "pass.example"),
    ),
    Case(
        "sender domain without SPF pass",
        B,
        "news@neutral.example",
        BOB,
        "defer",
        "new",
        before=listed("sender_domain", "neutral.example"),
    ),
    Case(
        "runtime recipient entry",
        B,
        NOSPF,
        "optout@test.example",
        "ok",
        "whitelist-recipient",
        before=listed("recipient", "optout@test.example"),
    ),
    Case("authenticated", B, NOSPF, CAROL, "ok", "authenticated", {"auth": "alice"}),
    Case("relay client", B, NOSPF, CAROL, "ok", "relay-client", {"relay": True}),
    Case(
        "SPF pass keys greylisting on the domain",
        "192.0.2.21",
        "news@pool.example",
        CAROL,
        "defer",
        "new",
    ),
    Case("SPF fail", B, "x@fail.example", BOB, "reject", "fail"),
    Case("SPF temperror", B, "x@flaky.example", BOB, "defer", "temperror"),
    # temperror_max_defers = 1: given up now, and the clock the deferral started runs on.
    Case(
        "SPF temperror given up",
        B,
        "x@flaky.example",
        BOB,
        "defer",
        "early-retry",
        before=later(60),
    ),
    Case(
        "rate: first recipient",
        B,
        NOSPF,
        "r1@test.example",
        "ok",
        "authenticated",
        {"auth": "bulk"},
    ),
    Case(
        "rate: second recipient",
        B,
        NOSPF,
        "r2@test.example",
        "ok",
        "authenticated",
        {"auth": "bulk"},
    ),
    Case(
        "rate: third recipient is limited",
        B,
        NOSPF,
        "r3@test.example",
        "defer",
        "per-user",
        {"auth": "bulk"},
    ),
    Case(
        "learn: new triplet accepted",
        B,
        NOSPF,
        "erin@test.example",
        "ok",
        "learn-new",
        before=learning,
    ),
    Case(
        "learn: early retry accepted",
        B,
        NOSPF,
        "erin@test.example",
        "ok",
        "learn-early-retry",
        before=later(5),
    ),
]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def request(query: Query) -> bytes:
    """The question as the rcpt.acl snippet sends it."""
    parts = [f"rcpt v=1 ip={query.client}", f"from_b64={b64(query.sender)}"]
    parts.append(f"rcpt_b64={b64(query.recipient)}")
    for key, value in (("auth_b64", query.auth), ("host_b64", query.host)):
        if value:
            parts.append(f"{key}={b64(value)}")
    if query.relay:
        parts.append("relay=1")
    return (" ".join(parts) + "\n").encode()


async def state(store: Store, dispatcher: Dispatcher, query: Query) -> object:
    """Everything explain could have written: every triplet and rate key, the question's
    client records (auto-whitelisting), the SPF temperror give-up memory."""
    network_key = dispatcher.greylist.keys(query)
    domain = query.sender.rpartition("@")[2]
    domain_key = dispatcher.greylist.keys(query, domain)
    assert dispatcher.spf is not None
    return (
        sorted(await store.admin.greylist_scan([None, None, None], 1000), key=lambda row: row[0]),
        sorted(await store.admin.ratelimit_scan([None, None], 1000)),
        await store.admin.greylist_peek(*network_key),
        await store.admin.greylist_peek(*domain_key),
        [(k, e.first, e.count) for k, e in dispatcher.spf.temperrors._entries.items()],
    )


@pytest.fixture
async def live(
    store: Store, dns: DnsServer
) -> AsyncIterator[tuple[Dispatcher, Admin, Clock, Store]]:
    clock = Clock()
    dispatcher = Dispatcher(policy(dns), store, clock=clock, hostname="mx.test")
    yield dispatcher, Admin(dispatcher, store.admin, clock), clock, store
    await dispatcher.aclose()


async def test_explain_gives_the_real_decision_and_changes_nothing(
    live: tuple[Dispatcher, Admin, Clock, Store],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher, admin, clock, store = live
    caplog.set_level(logging.DEBUG, logger="policyd.decision")
    for case in CASES:
        if case.before is not None:
            await case.before(admin, clock)
        query = case.query()
        before = await state(store, dispatcher, query)
        explained = await explain(dispatcher, store.admin, query, clock())
        assert await state(store, dispatcher, query) == before, case.name

        caplog.clear()
        answer = await dispatcher.answer(request(query))
        logged = [r.getMessage() for r in caplog.records if r.name == "policyd.decision"]
        assert len(logged) == 1, (case.name, logged)
        found = DECISION_RE.search(logged[0])
        assert found is not None, logged
        action, _, reason = found.groups()

        decision = explained["decision"]
        assert (decision["action"], decision["reason"]) == (action, reason), case.name
        assert decision["answer"].encode() == answer, case.name
        assert (action, reason) == (case.action, case.reason), case.name


async def test_explain_lists_what_the_dispatcher_asked(
    live: tuple[Dispatcher, Admin, Clock, Store],
) -> None:
    """The findings are the dispatcher's: SPF, then greylisting with the stored state (or
    the runtime entry that matched), then the rate rules; nothing after a final verdict."""
    dispatcher, admin, clock, store = live
    query = Case("", A, NOSPF, BOB, "", "").query()
    await dispatcher.answer(request(query))
    clock.now += 60
    found = await explain(dispatcher, store.admin, query, clock())
    spf, grey = found["checks"]
    assert (spf["check"], spf["result"], spf["action"]) == ("spf", "none", "ok")
    assert grey["key"] == "198.51.100.0/24|a@nospf.example|bob@test.example"
    assert (grey["status"], grey["retry_in"], grey["attempts"]) == ("early-retry", DELAY - 60, 1)
    assert grey["first_seen"] == START

    await listed("client", A)(admin, clock)
    found = await explain(dispatcher, store.admin, query, clock())
    grey = found["checks"][1]
    assert grey["reason"] == "whitelist-client"
    assert grey["entry"] == {"kind": "client", "value": f"{A}/32", "comment": ""}
    assert "status" not in grey

    query.auth = "Bulk"
    found = await explain(dispatcher, store.admin, query, clock())
    spf, grey, rate = found["checks"]
    assert (spf["skipped"], grey["reason"]) == ("authenticated", "whitelist-client")
    assert (rate["rule"], rate["key"], rate["allowed"], rate["cost"]) == (
        "per-user",
        "per-user|bulk",
        True,
        1,
    )

    rejected = Case("", B, "x@fail.example", BOB, "", "").query()
    found = await explain(dispatcher, store.admin, rejected, clock())
    assert [c["check"] for c in found["checks"]] == ["spf"]
    assert found["decision"]["action"] == "reject"
