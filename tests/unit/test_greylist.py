"""The greylist state machine and its shell, with an injected clock and an in-memory store."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.checks.greylist import (
    Client,
    Greylist,
    Status,
    Step,
    Timing,
    Triplet,
    human_duration,
    step,
)
from policyd.config import GreylistConfig
from policyd.model import Action, Query, Stage
from policyd.whitelist import ListEntry, Whitelist

T = Timing(delay=300, retry_window=2 * 86400, max_age=35 * 86400, auto_whitelist_after=3)
T0 = 1_700_000_000.0
NO_ENTRIES = Whitelist([])


def test_new_triplet_is_deferred_for_the_delay() -> None:
    s = step(None, None, T0, T)
    assert s.status is Status.NEW
    assert s.triplet == Triplet(T0, T0, False, 1)
    assert s.triplet_expires == T0 + T.retry_window
    assert s.retry_in == T.delay
    assert s.client is None


def test_early_retry_keeps_first_seen() -> None:
    first = step(None, None, T0, T).triplet
    s = step(first, None, T0 + 100, T)
    assert s.status is Status.EARLY
    assert s.triplet is not None and s.triplet.first_seen == T0
    assert s.retry_in == pytest.approx(200)
    assert s.triplet_expires == T0 + T.retry_window


def test_retry_after_delay_passes_and_counts_for_the_client() -> None:
    first = step(None, None, T0, T).triplet
    s = step(first, None, T0 + 301, T)
    assert s.status is Status.PASSED
    assert s.delayed == pytest.approx(301)
    assert s.client == Client(1, T0 + 301)
    assert s.triplet_expires == T0 + 301 + T.max_age


def test_retry_at_exactly_the_delay_passes() -> None:
    first = step(None, None, T0, T).triplet
    assert step(first, None, T0 + T.delay, T).status is Status.PASSED


def test_retry_after_the_window_starts_over() -> None:
    first = step(None, None, T0, T).triplet
    s = step(first, None, T0 + T.retry_window + 1, T)
    assert s.status is Status.NEW


def test_passed_triplet_is_known_until_max_age_of_silence() -> None:
    passed = Triplet(T0, T0 + 400, True, 2)
    known = step(passed, None, T0 + 400 + T.max_age - 1, T)
    assert known.status is Status.KNOWN
    assert known.client is None  # a known triplet does not count again
    assert step(passed, None, T0 + 400 + T.max_age + 1, T).status is Status.NEW


def test_auto_whitelist_after_n_distinct_passes() -> None:
    client = Client(T.auto_whitelist_after, T0)
    s = step(None, client, T0 + 10, T)
    assert s.status is Status.AUTO
    assert s.triplet is None
    assert s.client == Client(T.auto_whitelist_after, T0 + 10)
    assert s.client_expires == T0 + 10 + T.max_age


def test_auto_whitelist_lapses_and_can_be_disabled() -> None:
    client = Client(10, T0)
    assert step(None, client, T0 + T.max_age + 1, T).status is Status.NEW
    off = Timing(T.delay, T.retry_window, T.max_age, 0)
    assert step(None, client, T0 + 1, off).status is Status.NEW


def test_stale_client_passes_restart_from_zero() -> None:
    first = step(None, None, T0, T).triplet
    stale = Client(2, T0 - T.max_age - 10)
    s = step(first, stale, T0 + 400, T)
    assert s.client == Client(1, T0 + 400)


def test_force_pass_accepts_an_unknown_triplet() -> None:
    s = step(None, None, T0, T, force_pass=True)
    assert s.status is Status.PASSED
    assert s.triplet is not None and s.triplet.passed


def test_clock_going_backwards_does_not_pass_early() -> None:
    first = Triplet(T0 + 1000, T0 + 1000, False, 1)
    assert step(first, None, T0, T).status is Status.NEW


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=3 * 86400), min_size=1, max_size=30))
def test_never_passes_before_the_delay(offsets: list[float]) -> None:
    """Over any sequence of attempts, the first pass comes no sooner than `delay` after the
    attempt that started the current cycle."""
    now = T0
    state: Triplet | None = None
    client: Client | None = None
    for offset in sorted(offsets):
        now = T0 + offset
        s: Step = step(state, client, now, T)
        if s.status is Status.PASSED:
            assert state is not None
            assert now - state.first_seen >= T.delay
        state = s.triplet or state
        client = s.client or client


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(300, "5 minutes"), (90, "90 seconds"), (1, "1 second"), (7200, "2 hours"), (86400, "1 day")],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


class MemoryStore:
    """The pure machine over dicts: enough to test the shell without a database."""

    def __init__(self) -> None:
        self.triplets: dict[str, Triplet] = {}
        self.clients: dict[str, Client] = {}
        self.keys: list[tuple[str, str]] = []

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        self.keys.append((triplet_key, client_key))
        s = step(
            self.triplets.get(triplet_key),
            self.clients.get(client_key),
            now,
            timing,
            force_pass=force_pass,
        )
        if s.triplet:
            self.triplets[triplet_key] = s.triplet
        if s.client:
            self.clients[client_key] = s.client
        return s


def query(
    ip: str = "192.0.2.10",
    sender: str = "a@example.net",
    rcpt: str = "b@example.org",
    auth: str = "",
) -> Query:
    return Query(Stage.RCPT, ipaddress.ip_address(ip), sender=sender, recipient=rcpt, auth=auth)


async def test_shell_defers_with_451_471_and_a_human_text() -> None:
    grey = Greylist(GreylistConfig(), MemoryStore())
    result = await grey.check(query(), T0, NO_ENTRIES)
    assert result.verdict.action is Action.DEFER
    assert (result.verdict.code, result.verdict.ecode) == (451, "4.7.1")
    assert "5 minutes" in result.verdict.text
    again = await grey.check(query(), T0 + 301, NO_ENTRIES)
    assert again.verdict.action is Action.ACCEPT
    assert again.verdict.reason == "passed"


async def test_shell_keys_on_network_and_normalised_sender() -> None:
    store = MemoryStore()
    grey = Greylist(GreylistConfig(), store)
    await grey.check(
        query(ip="192.0.2.10", sender="prvs=1234abcd=Bob+x@Example.NET"), T0, NO_ENTRIES
    )
    await grey.check(query(ip="2001:db8::25", rcpt="B@Example.ORG"), T0, NO_ENTRIES)
    assert store.keys[0] == ("192.0.2.0/24|bob@example.net|b@example.org", "192.0.2.0/24")
    assert store.keys[1] == ("2001:db8::/64|a@example.net|b@example.org", "2001:db8::/64")


async def test_shell_skips() -> None:
    store = MemoryStore()
    config = GreylistConfig(
        whitelist_clients=(ipaddress.ip_network("198.51.100.0/24"),),
        whitelist_recipients=("postmaster@", "optout.example"),
    )
    grey = Greylist(config, store)
    cases = {
        "whitelisted-client": query(ip="198.51.100.9"),
        "whitelisted-recipient": query(rcpt="PostMaster@example.org"),
        "authenticated": query(auth="alice"),
    }
    for reason, q in cases.items():
        result = await grey.check(q, T0, NO_ENTRIES)
        assert (result.verdict.action, result.verdict.reason) == (Action.ACCEPT, reason)
    assert (
        await grey.check(query(rcpt="x@optout.example"), T0, NO_ENTRIES)
    ).verdict.action is Action.ACCEPT
    assert store.keys == []
    disabled = Greylist(GreylistConfig(enabled=False), store)
    assert (await disabled.check(query(), T0, NO_ENTRIES)).verdict.reason == "disabled"


async def test_skips_and_whitelists_are_decided_in_one_documented_order() -> None:
    """docs/greylisting.md "Skips and whitelists": disabled, then a runtime entry, then the
    static lists, then authenticated/relay; a runtime entry names itself in the result."""
    store = MemoryStore()
    config = GreylistConfig(
        whitelist_clients=(ipaddress.ip_network("198.51.100.0/24"),),
        whitelist_recipients=("postmaster@",),
        skip_relay=True,
    )
    grey = Greylist(config, store)
    entry = ListEntry("client", "198.51.100.9/32", comment="partner")
    runtime = Whitelist([entry, ListEntry("sender_domain", "example.net")])
    everything = query(ip="198.51.100.9", rcpt="postmaster@example.org", auth="alice")
    everything.relay = True
    listed = await grey.check(everything, T0, runtime)
    assert (listed.verdict.reason, listed.entry, listed.status) == ("whitelist-client", entry, None)
    in_config = await grey.check(everything, T0, NO_ENTRIES)
    assert in_config.verdict.reason == "whitelisted-client"
    assert in_config.entry is None
    other_client = query(rcpt="postmaster@example.org", auth="alice")
    assert (await grey.check(other_client, T0, NO_ENTRIES)).verdict.reason == (
        "whitelisted-recipient"
    )
    other_client.recipient = "b@example.org"
    assert (await grey.check(other_client, T0, NO_ENTRIES)).verdict.reason == "authenticated"
    other_client.auth, other_client.relay = "", True
    assert (await grey.check(other_client, T0, NO_ENTRIES)).verdict.reason == "relay-client"
    # A sender_domain entry counts only with the SPF-pass domain the caller gives.
    other_client.relay = False
    assert (await grey.check(other_client, T0, runtime)).status is Status.NEW
    passed = await grey.check(other_client, T0, runtime, spf_pass_domain="example.net")
    assert passed.verdict.reason == "whitelist-sender_domain"
    disabled = Greylist(GreylistConfig(enabled=False), store)
    assert (await disabled.check(everything, T0, runtime)).verdict.reason == "disabled"
    assert len(store.keys) == 1  # only the question that was greylisted reached the store


async def test_learn_mode_records_but_accepts() -> None:
    store = MemoryStore()
    grey = Greylist(GreylistConfig(learn=True), store)
    result = await grey.check(query(), T0, NO_ENTRIES)
    assert result.verdict.action is Action.ACCEPT
    assert result.verdict.reason == "learn-new"
    assert len(store.triplets) == 1
