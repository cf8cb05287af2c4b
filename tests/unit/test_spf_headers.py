"""The SPF header text against strict readings of its grammar: ``Received-SPF`` (RFC 7208
§9.1, tests/support/header_grammar.py) and ``Authentication-Results`` (RFC 8601, the same module as
the judge and the ``authres`` package as a second reader), for IPv4 and IPv6 clients, the
HELO identity and hostile senders, and every line at most 78 characters where a fold is
possible (RFC 5322 §2.1.1, the tab counted)."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import authres
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.checks.spf_headers import (
    FOLD_AT,
    MAX_HEADER_VALUE,
    Checked,
    Identity,
    Result,
    authentication_results,
    received_spf,
)
from policyd.protocol import header_lines

# tests/ holds the grammar module shared by test packages (it is not a test file).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.header_grammar import (
    GrammarError,
    parse_authentication_results,
    parse_received_spf,
    physical_lines,
)

RECEIVER = "mx.example.org"
LONG_LOCAL = "l" * 200
LONG_DOMAIN = ".".join(["sub" + "d" * 56] * 4) + ".example"  # 251 characters, labels of 59


def printable(text: str) -> str:
    """What a client-controlled value becomes in the header (spf_headers._printable)."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:MAX_HEADER_VALUE]


def checked(**fields: object) -> Checked:
    base = Checked(
        Identity.MAILFROM,
        Result.PASS,
        "example.com",
        "192.0.2.1",
        "myname@example.com",
        "foo.example.com",
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def unquoted_spaces(line: str) -> int:
    """Spaces outside quoted-strings: the places a line could have been folded."""
    count, quoted, escaped = 0, False, False
    for char in line:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == " " and not quoted:
            count += 1
    return count


def assert_well_folded(header: str) -> None:
    """Folds are newline + one tab, no empty or padded line, each line within FOLD_AT
    (tab counted) unless it is one item that cannot be folded; and the wire carries the
    lines unchanged (protocol.header_lines)."""
    lines = physical_lines(header)
    assert lines[0] and not lines[0][0].isspace()
    for line in lines[1:]:
        assert re.fullmatch(r"\t[\x21-\x7e][\x20-\x7e]*", line), repr(line)
    for line in lines:
        assert line == line.rstrip(), repr(line)
        assert re.fullmatch(r"[\x20-\x7e\t]*", line), repr(line)
        if len(line) > FOLD_AT:
            assert line.startswith("\t") and unquoted_spaces(line) == 0, (len(line), line)
    assert header_lines((header,)) == lines


def check_received_spf(one: Checked, receiver: str = RECEIVER) -> None:
    header = received_spf(one, receiver)
    assert_well_folded(header)
    parsed = parse_received_spf(header)
    assert parsed.result == one.result.value
    assert parsed.get("client-ip") == printable(one.client_ip)
    assert parsed.get("helo") == printable(one.helo)
    assert parsed.get("receiver") == printable(receiver)
    assert parsed.get("identity") == one.identity.value
    if one.identity is Identity.MAILFROM:
        assert parsed.get("envelope-from") == printable(one.sender)
    else:
        assert parsed.get("envelope-from") is None
    assert parsed.get("mechanism") == (printable(one.mechanism) if one.mechanism else None)
    assert parsed.comment is not None
    # A comment's spaces may be folds; compare words.
    assert " ".join(parsed.comment.split()).startswith(f"{printable(receiver)}: ")


def check_authentication_results(many: tuple[Checked, ...], receiver: str = RECEIVER) -> None:
    header = authentication_results(many, receiver)
    assert_well_folded(header)
    parsed = parse_authentication_results(header)
    assert parsed.authserv_id == printable(receiver)
    expected = [
        (
            "spf",
            one.result.value,
            "smtp.mailfrom" if one.identity is Identity.MAILFROM else "smtp.helo",
            printable(one.domain if one.identity is Identity.MAILFROM else one.helo),
        )
        for one in many
    ]
    got = [(r.method, r.result, *r.properties[0]) for r in parsed.results]
    assert got == expected
    assert all(len(r.properties) == 1 and len(r.comments) == 1 for r in parsed.results)
    # The second reader: the same methods, results and properties (authres keeps a
    # quoted-string's escapes, hence the comparison with them undone).
    lenient = authres.core_features().parse(header.replace("\n\t", " "))
    assert [
        (r.method, r.result, f"{p.type}.{p.name}", re.sub(r"\\(.)", r"\1", p.value))
        for r in lenient.results
        for p in r.properties
    ] == expected


@pytest.mark.parametrize(
    "client_ip",
    ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "2001:db8:0:0:1:0:0:1", "::1", "fe80::1"],
)
def test_client_ip_v4_v6_and_mapped(client_ip: str) -> None:
    one = checked(client_ip=client_ip, mechanism="ip6:2001:db8::/32")
    check_received_spf(one)
    check_authentication_results((one,))
    if ":" in client_ip:  # not atext: quoted (RFC 7208 §9.1 dot-atom / quoted-string)
        assert f'client-ip="{client_ip}";' in received_spf(one, RECEIVER)


@pytest.mark.parametrize(
    ("sender", "domain"),
    [
        ('"john smith"@example.com', "example.com"),
        ('a"b@example.com', "example.com"),
        ("x@foo=bar/baz.example", "foo=bar/baz.example"),
        ("x=y/z@example.com", "example.com"),
        ("spaced out @ some where.example", " some where.example"),
        ("jösé@exämple.com", "exämple.com"),
        ("back\\slash(paren)@example.com", "example.com"),
        (f"{LONG_LOCAL}@example.com", "example.com"),
        (f"news@{LONG_DOMAIN}", LONG_DOMAIN),
        (f"{LONG_LOCAL}@{LONG_DOMAIN}", LONG_DOMAIN),
        ('evil(")\\\r\nX-Injected: yes\x00\xe9@example.com', "example.com"),
    ],
)
@pytest.mark.parametrize("result", [Result.PASS, Result.FAIL, Result.TEMPERROR])
def test_hostile_senders(sender: str, domain: str, result: Result) -> None:
    one = checked(sender=sender, domain=domain, result=result, problem="DNS (timeout)")
    check_received_spf(one)
    check_authentication_results((one,))


def test_a_domain_that_is_not_a_token_is_quoted_in_authentication_results() -> None:
    header = authentication_results((checked(domain="foo=bar/baz.example"),), RECEIVER)
    assert header.endswith('smtp.mailfrom="foo=bar/baz.example"')


@pytest.mark.parametrize(
    "helo", ["mail.example.net", "[192.0.2.1]", "localhost", 'we"ird (helo)', "h" * 300]
)
def test_helo_identity(helo: str) -> None:
    one = checked(identity=Identity.HELO, sender="", helo=helo, domain=helo.lower())
    check_received_spf(one)
    check_authentication_results((one,))
    both = (one, checked(helo=helo))
    check_authentication_results(both)
    for header in map(lambda c: received_spf(c, RECEIVER), both):
        assert parse_received_spf(header).get("identity") in ("helo", "mailfrom")


def test_long_values_fold_before_78_characters_with_the_tab_counted() -> None:
    """The conformance run's case: a continuation line of 78 characters plus the tab."""
    for n in range(1, 90):
        one = checked(sender=f"{'s' * n}@example.com", helo=f"{'h' * (n % 40)}.example.net")
        for header in (received_spf(one, RECEIVER), authentication_results((one,), RECEIVER)):
            assert_well_folded(header)


def test_the_grammar_is_strict() -> None:
    """The judge refuses what the conformance run found."""
    bad_received = [
        "Received-SPF: pass (c) client-ip=2001:db8::1; identity=mailfrom",
        "Received-SPF: pass (c) envelope-from=a b@example.com; identity=mailfrom",
        "Received-SPF: pass (c)\n\n\tidentity=mailfrom",
        "Received-SPF: pass (c (unbalanced) identity=mailfrom",
        "Received-SPF: maybe (c) identity=mailfrom",
    ]
    for header in bad_received:
        with pytest.raises(GrammarError):
            parse_received_spf(header)
    bad_authres = [
        "Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=foo=bar/baz.example",
        "Authentication-Results: mx/example; spf=pass smtp.mailfrom=example.com",
        "Authentication-Results: mx.example.org spf=pass smtp.mailfrom=example.com",
        "Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=a b",
    ]
    for header in bad_authres:
        with pytest.raises(GrammarError):
            parse_authentication_results(header)


texts = st.text(max_size=300)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).map(lambda ip: f"::ffff:{ip}"),
)


@given(
    result=st.sampled_from(list(Result)),
    client_ip=addresses,
    local=texts,
    domain=texts,
    helo=texts,
    mechanism=st.one_of(st.just(""), texts),
    problem=texts,
    receiver=st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True),
)
def test_any_values_give_headers_that_parse(
    result: Result,
    client_ip: str,
    local: str,
    domain: str,
    helo: str,
    mechanism: str,
    problem: str,
    receiver: str,
) -> None:
    mailfrom = checked(
        result=result,
        client_ip=client_ip,
        sender=f"{local}@{domain}",
        domain=domain,
        helo=helo,
        mechanism=mechanism,
        problem=problem,
    )
    helo_one = dataclasses.replace(mailfrom, identity=Identity.HELO, sender="", domain=helo)
    check_received_spf(mailfrom, receiver)
    check_received_spf(helo_one, receiver)
    check_authentication_results((helo_one, mailfrom), receiver)


def test_a_long_authserv_id_is_folded_before() -> None:
    receiver = "r" * 30 + "." + "e" * 30 + ".example"
    one = checked()
    header = authentication_results((one,), receiver)
    assert header.startswith(f"Authentication-Results:\n\t{receiver};")
    check_authentication_results((one,), receiver)
    check_received_spf(one, receiver)
