"""Sender normalisation and client networks: one place, every rewriting scheme."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from policyd.addresses import (
    NULL_SENDER,
    AddressPatterns,
    client_network,
    ip_text,
    normalise_recipient,
    normalise_sender,
)


@pytest.mark.parametrize(
    ("sender", "normal"),
    [
        ("Alice@Example.NET", "alice@example.net"),
        ("<alice@example.net>", "alice@example.net"),
        ("", NULL_SENDER),
        ("<>", NULL_SENDER),
        ("alice+lists@example.net", "alice@example.net"),
        # BATV: the tag changes every message
        ("prvs=0123abcdef=alice@example.net", "alice@example.net"),
        ("msprvs1=19386ofAbc=alice@example.net", "alice@example.net"),
        ("btv1==1ab2cd3==alice@example.net", "alice@example.net"),
        # SRS: the original sender is inside
        ("SRS0=HHH=TT=orig.example=bob@fwd.example", "bob@orig.example"),
        ("SRS0+x7Yq=2Q=orig.example=bob@fwd.example", "bob@orig.example"),
        ("SRS1=HHH=fwd1.example==HHH=TT=orig.example=bob@fwd2.example", "bob@orig.example"),
        # VERP-style bounce addresses: per-message digits and hex runs
        ("bounces-12345@lists.example", "bounces-#@lists.example"),
        ("bounce-mc.us5_99.1234-deadbeefcafe@mcsv.example", "bounce-mc.us#_#.#-#@mcsv.example"),
        ("list-bounces+user=example.com@list.example", "list-bounces@list.example"),
        ("no-at-sign", "no-at-sign"),
    ],
)
def test_normalise_sender(sender: str, normal: str) -> None:
    assert normalise_sender(sender) == normal


def test_retries_with_new_tags_share_a_key() -> None:
    tagged = ["prvs=1111aaaa=news@shop.example", "prvs=2222bbbb=news@shop.example"]
    assert len({normalise_sender(s) for s in tagged}) == 1


def test_normalise_recipient_keeps_tags() -> None:
    assert normalise_recipient("<Bob+Lists@Example.ORG>") == "bob+lists@example.org"


@pytest.mark.parametrize(
    ("ip", "net"),
    [
        ("192.0.2.10", "192.0.2.0/24"),
        ("2001:db8::25", "2001:db8::/64"),
        ("2001:0db8:0000:0000:0000:0000:0000:0026", "2001:db8::/64"),
    ],
)
def test_client_network(ip: str, net: str) -> None:
    assert client_network(ipaddress.ip_address(ip), 24, 64) == net


def test_recipient_patterns() -> None:
    patterns = AddressPatterns(
        ("postmaster@", "abuse@example.org", "@optout.example", "other.example")
    )
    assert patterns.match("postmaster@any.example")
    assert patterns.match("abuse@example.org")
    assert not patterns.match("abuse@example.net")
    assert patterns.match("x@optout.example")
    assert patterns.match("y@other.example")
    assert not patterns.match("y@sub.other.example")


@given(st.integers(min_value=0, max_value=2**128 - 1))
@example(0)
@example(1)
@example(0xFFFF_C000_0280)  # IPv4-mapped
@example(0xC000_0280)  # IPv4-compatible
@example(0x2001_0DB8_0000_0000_0001_0000_0000_0001)  # two zero runs: the first is kept
def test_ip_text_is_str_for_every_ipv6_address(value: int) -> None:
    address = ipaddress.IPv6Address(value)
    assert ip_text(address) == str(address)


@given(st.integers(min_value=0, max_value=2**32 - 1))
@example(0)
@example(0x0A00_0001)  # 10.0.0.1: no leading zeros
@example(2**32 - 1)
def test_ip_text_is_str_for_every_ipv4_address(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    assert ip_text(address) == str(address)
