"""Whitelist host patterns: what is refused, and that matching is re.search's, in linear
time."""

from __future__ import annotations

import ipaddress
import itertools
import re
import time
from pathlib import Path

import pytest

from policyd.ctl.main import EXIT_USAGE, main
from policyd.host_patterns import MAX_REPEAT, HostPatterns, PatternError, check_host_pattern
from policyd.model import Query, Stage
from policyd.whitelist import ListEntry, ListError, Whitelist, normalise_entry

#: Patterns as operators and postgrey's whitelist write them, and the classic catastrophic
#: ones, which match in linear time here.
PATTERNS = [
    r"^mail[0-9]+\.example\.com$",
    r"^ms-smtp.*\.rr\.com$",
    r"^sc\d+pub\.verizon\.net$",
    r"\.google\.com$",
    r"^(mx|smtp)[0-9]{1,3}\.",
    r"(?i)^OUT-\w+\.Example\.ORG$",
    r"[^.]+\.mail\.[a-z]{2,3}$",
    r"^\d{1,3}-\d{1,3}\.dyn\.",
    r"(a|aa)+$",
    r"(a+)+b",
    r"^(\w+\.)*example\.net$",
    r"^$",
    r"\Amx\d?\Z",
    r"a.c",
    r"a{2,4}?b",
]
HOSTS = [
    "mail12.example.com",
    "mail.example.com",
    "ms-smtp-01.socal.rr.com",
    "sc1pub.verizon.net",
    "mail-ob.google.com",
    "google.com.evil.example",
    "mx7.example.org",
    "smtp1234.x",
    "out-relay.example.org",
    "OUT-relay.example.org",
    "x.mail.de",
    "10-2.dyn.example",
    "aaaa",
    "aaab",
    "a.b.example.net",
    "",
    "mx",
    "mx1",
    "abc",
    "a\nc",
    "aab",
    "aaaaab",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_as_re_search_does(pattern: str) -> None:
    patterns = HostPatterns([pattern])
    for host in HOSTS:
        expected = re.search(pattern, host, re.IGNORECASE) is not None
        assert (patterns.search(host.lower()) == {0}) is expected, host


def test_all_patterns_are_matched_together() -> None:
    patterns = HostPatterns(PATTERNS)
    for host in HOSTS:
        expected = {i for i, p in enumerate(PATTERNS) if re.search(p, host, re.IGNORECASE)}
        assert patterns.search(host.lower()) == expected, host


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"^(a)\1$", "backreferences"),
        (r"^(?P<x>a)(?P=x)", "backreferences"),
        (r"mail(?=\.)", "lookahead and lookbehind"),
        (r"(?<!x)mail", "lookahead and lookbehind"),
        (r"(a)?(?(1)b|c)", "conditional groups"),
        (r"(?>a+)b", "atomic groups"),
        (r"a++b", "possessive quantifiers"),
        (r"\bmail\b", "word boundaries"),
        (r"(?m)^mail$", "inline flags"),
        (r"(?a)\w", "inline flags"),
        (r"(?-i:Mail)", "scoped inline flags"),
        (f"a{{{MAX_REPEAT + 1}}}", "repeat counts"),
        (r"(.{0,99}){0,99}", "too complex"),
        (r"(unclosed", "invalid regular expression"),
    ],
)
def test_patterns_that_need_backtracking_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(PatternError, match=re.escape(why)):
        check_host_pattern(pattern)
    with pytest.raises(ListError, match=re.escape(why)):
        normalise_entry("client_host_re", pattern)


def test_a_pathological_name_against_an_accepted_pattern_completes() -> None:
    """``(a|aa)+$`` took re half a second on 31 characters; here 10,000 take one pass."""
    patterns = HostPatterns([r"(a|aa)+$", r"^(a+)+b", r"^(\w+\.)*example\.net$"])
    started = time.monotonic()
    for host in ("a" * 10_000 + "!", "a" * 10_000 + "c", "a." * 5_000 + "example.nex"):
        assert patterns.search(host) == set()
    assert patterns.search("a" * 10_000) == {0}
    assert time.monotonic() - started < 10.0  # generous: a backtracking engine never ends


def test_the_cache_of_states_stays_bounded() -> None:
    patterns = HostPatterns([r"a.{8}$"])  # 2^8 states as a DFA
    for letters in itertools.product("ab", repeat=12):
        assert patterns.search("".join(letters)) == ({0} if letters[-9] == "a" else set())
    assert len(patterns._states) <= 1_000


def test_whitelist_matches_host_patterns_and_skips_refused_stored_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pattern stored by an older release that is refused now is left out, with a
    warning, instead of stopping the whitelist (and every question) from loading."""
    entries = [
        ListEntry("client_host_re", r"^(a)\1"),
        ListEntry("client_host_re", r"^mail[0-9]+\.example\.com$", expires=50.0),
        ListEntry("client_host_re", r"\.example\.com$"),
    ]
    whitelist = Whitelist(entries)
    assert "not used" in caplog.text
    query = Query(Stage.RCPT, ipaddress.ip_address("192.0.2.1"), host="Mail1.Example.com")
    assert whitelist.match(query, now=10.0) is entries[1]
    assert whitelist.match(query, now=100.0) is entries[2]  # the first one expired
    assert whitelist.match(Query(Stage.RCPT, query.client, host="aa"), now=10.0) is None


def test_policyctl_refuses_a_pattern_that_needs_backtracking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--socket", str(tmp_path / "absent.sock"), "whitelist", "add", "host_re", r"(a)\1"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "backreferences" in err
    assert "Traceback" not in err
