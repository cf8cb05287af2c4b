"""The pure parts of SPF: result → verdict, header text, the wide-open arithmetic, give-up."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.checks.spf import (
    FAIL_CODE,
    FAIL_ECODE,
    MAX_TEMPERROR_ENTRIES,
    PERMERROR_CODE,
    PERMERROR_ECODE,
    TEMPERROR_CODE,
    TEMPERROR_ECODE,
    TEMPERROR_FORGET_AFTER,
    Checked,
    Identity,
    Result,
    TempErrorMemory,
    authentication_results,
    decide,
    helo_is_checkable,
    quote_value,
    received_spf,
    reject_text,
    wide_open,
)
from policyd.checks.spf_headers import FOLD_AT, MAX_HEADER_VALUE
from policyd.config import SpfConfig
from policyd.model import Action

CONFIG = SpfConfig(enabled=True)


def checked(result: Result, **fields: object) -> Checked:
    base = Checked(
        Identity.MAILFROM,
        result,
        "example.com",
        "192.0.2.1",
        "myname@example.com",
        "foo.example.com",
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("result", "action", "code", "ecode", "reason"),
    [
        (Result.PASS, Action.ACCEPT, 0, "", "pass"),
        (Result.NONE, Action.ACCEPT, 0, "", "none"),
        (Result.NEUTRAL, Action.ACCEPT, 0, "", "neutral"),
        (Result.SOFTFAIL, Action.ACCEPT, 0, "", "softfail"),
        (Result.FAIL, Action.REJECT, FAIL_CODE, FAIL_ECODE, "fail"),
        (Result.PERMERROR, Action.ACCEPT, 0, "", "permerror"),
        (Result.TEMPERROR, Action.DEFER, TEMPERROR_CODE, TEMPERROR_ECODE, "temperror"),
    ],
)
def test_default_mapping(
    result: Result, action: Action, code: int, ecode: str, reason: str
) -> None:
    verdict = decide(checked(result), CONFIG)
    assert (verdict.action, verdict.code, verdict.ecode, verdict.reason) == (
        action,
        code,
        ecode,
        reason,
    )
    assert verdict.check == "spf"


def test_codes_are_the_rfc_ones() -> None:
    assert (FAIL_CODE, FAIL_ECODE) == (550, "5.7.23")  # RFC 7372 §3.2
    assert (PERMERROR_CODE, PERMERROR_ECODE) == (550, "5.7.24")
    assert (TEMPERROR_CODE, TEMPERROR_ECODE) == (451, "4.4.3")  # RFC 7208 §8.6


def test_configured_mapping() -> None:
    tag = dataclasses.replace(CONFIG, fail_action="tag", permerror_action="reject")
    assert decide(checked(Result.FAIL), tag).action is Action.ACCEPT
    assert decide(checked(Result.FAIL), tag).reason == "fail-tagged"
    perm = decide(checked(Result.PERMERROR, problem="Unknown mechanism found: moo"), tag)
    assert (perm.action, perm.code, perm.ecode) == (Action.REJECT, 550, "5.7.24")
    assert "moo" in perm.text
    accept = dataclasses.replace(CONFIG, temperror_action="accept")
    assert decide(checked(Result.TEMPERROR), accept).action is Action.ACCEPT
    given_up = decide(checked(Result.TEMPERROR), CONFIG, give_up=True)
    assert (given_up.action, given_up.reason) == (Action.ACCEPT, "temperror-give-up")


def test_reject_text_carries_the_explanation() -> None:
    plain = reject_text(checked(Result.FAIL))
    assert plain == "SPF fail: example.com does not authorise 192.0.2.1 to send its mail"
    explained = reject_text(checked(Result.FAIL, explanation="see https://example.com/spf"))
    assert explained.endswith(": see https://example.com/spf")


def test_received_spf_as_in_rfc_7208() -> None:
    header = received_spf(checked(Result.PASS, mechanism="ip4:192.0.2.0/24"), "mybox.example.org")
    assert header == (
        "Received-SPF: pass (mybox.example.org: domain of myname@example.com designates\n"
        "\t192.0.2.1 as permitted sender) client-ip=192.0.2.1;\n"
        '\tenvelope-from="myname@example.com"; helo=foo.example.com;\n'
        '\treceiver=mybox.example.org; mechanism="ip4:192.0.2.0/24"; identity=mailfrom'
    )


def test_received_spf_helo_identity_and_problem() -> None:
    helo = checked(
        Result.PERMERROR,
        identity=Identity.HELO,
        sender="",
        domain="foo.example.com",
        problem="Void lookup limit of 2 exceeded",
    )
    header = received_spf(helo, "mx.example.org")
    assert header.startswith("Received-SPF: permerror (mx.example.org: permanent error")
    assert "envelope-from" not in header
    assert 'problem="Void lookup limit of 2 exceeded";' in header.replace("\n\t", " ")
    assert header.endswith("identity=helo")


def test_authentication_results() -> None:
    one = authentication_results((checked(Result.PASS),), "mx.example.org")
    assert one.replace("\n\t", " ") == (
        "Authentication-Results: mx.example.org; spf=pass (domain of myname@example.com "
        "designates 192.0.2.1 as permitted sender) smtp.mailfrom=example.com"
    )
    helo = checked(Result.NONE, identity=Identity.HELO, sender="", domain="foo.example.com")
    two = authentication_results((helo, checked(Result.FAIL)), "mx.example.org").replace(
        "\n\t", " "
    )
    assert "spf=none" in two and "smtp.helo=foo.example.com;" in two
    assert two.endswith("smtp.mailfrom=example.com")
    assert two.index("spf=none") < two.index("spf=fail")


HOSTILE = 'evil(")\\\r\nX-Injected: yes\x00\xe9@example.com'


def structure_ok(header: str) -> bool:
    """Quoted-strings closed, comments balanced, escapes complete (RFC 5322 §3.2)."""
    depth, quoted, i = 0, False, 0
    while i < len(header):
        char = header[i]
        if char == "\\" and (quoted or depth):
            i += 2
            continue
        if quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0 and not quoted


@pytest.mark.parametrize("header_of", ["received", "authres"])
def test_hostile_values_cannot_break_the_header(header_of: str) -> None:
    bad = checked(Result.FAIL, sender=HOSTILE, helo=HOSTILE + " (x", domain=HOSTILE)
    if header_of == "received":
        header = received_spf(bad, "mx.example.org")
    else:
        header = authentication_results((bad,), "mx.example.org")
    lines = header.split("\n")
    assert all(line.startswith("\t") for line in lines[1:])  # only our own folds
    assert all(re.fullmatch(r"[\x20-\x7e]*", line.lstrip("\t")) for line in lines)
    assert structure_ok(header)


def test_folding_keeps_lines_short() -> None:
    header = received_spf(checked(Result.NEUTRAL, mechanism="?all"), "mx.example.org")
    assert all(len(line.expandtabs(1)) <= FOLD_AT for line in header.split("\n"))


@given(st.text(max_size=300))
def test_quote_value(text: str) -> None:
    quoted = quote_value(text)
    assert re.fullmatch(r"[\x20-\x7e]*", quoted)
    if quoted.startswith('"'):
        inner = quoted[1:-1]
        assert re.fullmatch(r'(?:[^"\\]|\\.)*', inner)
        assert (
            re.sub(r"\\(.)", r"\1", inner) == re.sub(r"[^\x20-\x7e]", "?", text)[:MAX_HEADER_VALUE]
        )
    else:
        assert quoted == re.sub(r"[^\x20-\x7e]", "?", text)[:MAX_HEADER_VALUE]


def test_wide_open_limits() -> None:
    config = SpfConfig(greylist_max_ipv4_prefix=16, greylist_max_ipv6_prefix=32)
    assert not wide_open(1 << 16, 1 << 96, config)
    assert wide_open((1 << 16) + 1, 0, config)
    assert wide_open(0, (1 << 96) + 1, config)


@pytest.mark.parametrize(
    ("helo", "ok"),
    [
        ("mail.example.com", True),
        ("mail.example.com.", True),
        ("localhost", False),
        ("[192.0.2.1]", False),
        ("", False),
        ("a..b", False),
    ],
)
def test_helo_is_checkable(helo: str, ok: bool) -> None:
    assert helo_is_checkable(helo) is ok


def test_give_up_after_n_defers() -> None:
    memory = TempErrorMemory(max_defers=2, max_time=3600.0)
    assert not memory.give_up("192.0.2.1", "a@example.com", 0.0)
    assert not memory.give_up("192.0.2.1", "A@Example.com", 60.0)  # same normalised sender
    assert memory.give_up("192.0.2.1", "a@example.com", 120.0)
    assert memory.give_up("192.0.2.1", "a@example.com", 180.0)
    assert not memory.give_up("192.0.2.2", "a@example.com", 180.0)


def test_give_up_after_time_and_forget() -> None:
    memory = TempErrorMemory(max_defers=100, max_time=600.0)
    assert not memory.give_up("192.0.2.1", "a@example.com", 0.0)
    assert not memory.give_up("192.0.2.1", "a@example.com", 599.0)
    assert memory.give_up("192.0.2.1", "a@example.com", 600.0)
    # Much later, a new outage starts the count again.
    later = 600.0 + TEMPERROR_FORGET_AFTER + 1
    assert not memory.give_up("192.0.2.1", "a@example.com", later)


def test_give_up_memory_is_bounded() -> None:
    memory = TempErrorMemory(max_defers=1, max_time=3600.0, max_entries=3)
    for i in range(10):
        memory.give_up(f"192.0.2.{i}", "a@example.com", 0.0)
    assert len(memory) == 3
    assert MAX_TEMPERROR_ENTRIES >= 1000


def test_spf_config_section() -> None:
    from policyd.config import ConfigError, from_mapping

    config = from_mapping(
        {"spf": {"enabled": True, "nameservers": ["127.0.0.1:5353", "[::1]:53", "192.0.2.53"]}}
    )
    assert config.spf.nameservers == ("127.0.0.1:5353", "[::1]:53", "192.0.2.53")
    assert config.spf.timeout < config.server.deadline
    for bad in (["localhost:53"], ["127.0.0.1:"], "127.0.0.1"):
        with pytest.raises(ConfigError, match=r"^spf\.nameservers"):
            from_mapping({"spf": {"nameservers": bad}})
    with pytest.raises(ConfigError, match=r"^spf\.timeout"):
        from_mapping({"spf": {"enabled": True, "timeout": "1s"}})
    with pytest.raises(ConfigError, match=r"^spf\.fail_action"):
        from_mapping({"spf": {"fail_action": "bounce"}})
