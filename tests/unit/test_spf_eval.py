"""pyspf over a cache: evaluation runs against answers already stored, no DNS, no loop."""

from __future__ import annotations

import pytest

from policyd.checks.spf_eval import (
    NeedRecords,
    View,
    authorised_breadth,
    evaluate_once,
    without_record,
)
from policyd.dns import Answer, Resolver, Status, Value

FAR = 1e12


def resolver_with(records: dict[tuple[str, str], tuple[Value, ...] | Status]) -> Resolver:
    resolver = Resolver(["127.0.0.1:9"], clock=lambda: 0.0)  # never asked: no loop here
    for (name, rtype), value in records.items():
        if isinstance(value, Status):
            answer = Answer(value, (), FAR, "test")
        else:
            answer = Answer(Status.OK, value, FAR)
        resolver.store(name, rtype, answer)
    return resolver


def run(resolver: Resolver, ip: str, sender: str, helo: str = "mail.example.net") -> str:
    view = View(resolver)
    return evaluate_once(view, ip, sender, helo, receiver="mx.test", now=0).result


def missing(resolver: Resolver, ip: str, sender: str) -> set[tuple[str, str]]:
    view = View(resolver)
    with pytest.raises(NeedRecords):
        evaluate_once(view, ip, sender, "mail.example.net", receiver="mx.test", now=0)
    return view.missing


def test_a_miss_names_the_record() -> None:
    assert missing(resolver_with({}), "192.0.2.1", "a@example.com") == {("example.com", "TXT")}


def test_mx_hosts_are_asked_for_together() -> None:
    resolver = resolver_with(
        {
            ("example.com", "TXT"): (b"v=spf1 mx -all",),
            ("example.com", "MX"): ((10, "mx1.example.com"), (20, "mx2.example.com")),
        }
    )
    assert missing(resolver, "192.0.2.1", "a@example.com") == {
        ("mx1.example.com", "A"),
        ("mx2.example.com", "A"),
    }
    resolver.store("mx1.example.com", "A", Answer(Status.OK, ("192.0.2.9",), FAR))
    resolver.store("mx2.example.com", "A", Answer(Status.OK, ("192.0.2.1",), FAR))
    assert run(resolver, "192.0.2.1", "a@example.com") == "pass"
    assert run(resolver, "192.0.2.2", "a@example.com") == "fail"


def test_a_miss_inside_exp_handling_is_not_lost() -> None:
    """pyspf swallows every exception while fetching exp=; the miss is still noticed."""
    resolver = resolver_with({("example.com", "TXT"): (b"v=spf1 -all exp=why.example.com",)})
    assert missing(resolver, "192.0.2.1", "a@example.com") == {("why.example.com", "TXT")}
    resolver.store("why.example.com", "TXT", Answer(Status.OK, (b"%{i} not allowed",), FAR))
    evaluation = evaluate_once(
        View(resolver), "192.0.2.1", "a@example.com", "h.example", receiver="mx.test", now=0
    )
    assert (evaluation.result, evaluation.explanation) == ("fail", "192.0.2.1 not allowed")


def test_temporary_failure_is_temperror_and_void_is_not() -> None:
    resolver = resolver_with(
        {
            ("down.example", "TXT"): Status.TEMPFAIL,
            ("none.example", "TXT"): Status.NXDOMAIN,
            ("voids.example", "TXT"): (b"v=spf1 a:v1.example a:v2.example a:v3.example -all",),
            ("v1.example", "A"): Status.NXDOMAIN,
            ("v2.example", "A"): Status.NODATA,
            ("v3.example", "A"): Status.NXDOMAIN,
        }
    )
    assert run(resolver, "192.0.2.1", "a@down.example") == "temperror"
    assert run(resolver, "192.0.2.1", "a@none.example") == "none"
    assert run(resolver, "192.0.2.1", "a@voids.example") == "permerror"  # RFC 7208 §4.6.4


def test_pinned_answers_outlive_the_cache() -> None:
    """A TTL-0 answer is never cached but must serve the rest of its evaluation."""
    resolver = resolver_with({})
    view = View(resolver)
    view.pin(("example.com", "TXT"), Answer(Status.OK, (b"v=spf1 +all",), 0.0))
    result = evaluate_once(view, "192.0.2.1", "a@example.com", "h", receiver="r", now=0)
    assert result.result == "pass"
    assert resolver.peek("example.com", "TXT") is None
    assert view.expires == 0.0


def test_ptr_dns_errors_follow_rfc_7208_section_5_5() -> None:
    resolver = resolver_with(
        {
            ("example.com", "TXT"): (b"v=spf1 ptr -all",),
            ("1.2.0.192.in-addr.arpa", "PTR"): ("bad.example.com", "good.example.com"),
            ("bad.example.com", "A"): Status.TEMPFAIL,
            ("good.example.com", "A"): ("192.0.2.1",),
            ("2.2.0.192.in-addr.arpa", "PTR"): Status.TEMPFAIL,
        }
    )
    assert run(resolver, "192.0.2.1", "a@example.com") == "pass"  # the failing name skipped
    assert run(resolver, "192.0.2.2", "a@example.com") == "fail"  # PTR error: no match


def test_breadth_follows_includes_and_redirects() -> None:
    resolver = resolver_with(
        {
            ("d.example", "TXT"): (b"v=spf1 ip4:192.0.2.0/24 include:i.example -all",),
            ("i.example", "TXT"): (b"v=spf1 ip6:2001:db8::/48 ip4:198.51.100.0/25 ~all",),
            ("r.example", "TXT"): (b"v=spf1 redirect=d.example",),
        }
    )
    breadth = authorised_breadth(View(resolver), "r.example")
    assert breadth.unbounded == ""
    assert (breadth.ipv4, breadth.ipv6) == (256 + 128, 1 << 80)
    view = View(resolver)
    resolver.store("x.example", "TXT", Answer(Status.OK, (b"v=spf1 include:gone -all",), FAR))
    with pytest.raises(NeedRecords):
        authorised_breadth(view, "x.example")
    assert view.missing == {("gone", "TXT")}


_SHORTCUT_ZONE: dict[tuple[str, str], tuple[Value, ...] | Status] = {
    ("nx.example", "TXT"): Status.NXDOMAIN,
    ("nodata.example", "TXT"): Status.NODATA,
    ("other-txt.example", "TXT"): (b"google-site-verification=abc", b"v=spf10 -all", b""),
    ("spf.example", "TXT"): (b"v=spf1 -all",),
    ("bare.example", "TXT"): (b"v=spf1",),
    ("upper.example", "TXT"): (b"V=SPF1 -all",),
    ("two.example", "TXT"): (b"v=spf1 -all", b"v=spf1 +all"),
    ("mixed.example", "TXT"): (b"hello", b"v=spf1 ?all"),
    ("down.example", "TXT"): Status.TEMPFAIL,
    ("nonascii.example", "TXT"): ("v=spf1 -all",),  # not bytes: never taken as "no record"
}


@pytest.mark.parametrize(
    ("sender", "helo"),
    [
        ("a@nx.example", "mail.example.net"),
        ("a@NoData.Example", "mail.example.net"),
        ("a@other-txt.example", "mail.example.net"),
        ("", "other-txt.example"),
        ("", "nx.example"),
        ("a@spf.example", "nx.example"),
        ("a@bare.example", "mail.example.net"),
        ("a@upper.example", "mail.example.net"),
        ("a@two.example", "mail.example.net"),
        ("a@mixed.example", "mail.example.net"),
        ("a@down.example", "mail.example.net"),
        ("a@nonascii.example", "mail.example.net"),
        ("a@unknown.example", "mail.example.net"),  # not cached: pyspf asks
        ("a@nx.example.", "mail.example.net"),  # empty label: malformed, no record
        ("a@" + "x" * 64 + ".example", "mail.example.net"),
        ("a@-bad_name!.example", "mail.example.net"),  # c-ares would refuse it
        ("nx.example", "mail.example.net"),  # no "@": the whole sender is the domain
        ("a@b@nx.example", "mail.example.net"),  # pyspf splits at the first "@"
        ("@nx.example", "mail.example.net"),
        ("a@", "mail.example.net"),
        ("", ""),
    ],
)
@pytest.mark.parametrize("ip", ["192.0.2.1", "2001:db8::1"])
def test_the_no_record_shortcut_is_exactly_pyspf(ip: str, sender: str, helo: str) -> None:
    """Whenever ``without_record`` answers, pyspf over the same cache says ``none`` for
    the same domain, with nothing else to report; when it declines, pyspf has work to do."""
    resolver = resolver_with(_SHORTCUT_ZONE)
    shortcut = without_record(resolver, sender, helo)
    view = View(resolver)
    try:
        evaluation = evaluate_once(view, ip, sender, helo, receiver="mx.test", now=0)
    except NeedRecords:
        assert shortcut is None
        return
    if shortcut is None:  # here: a record, a failure, or two records
        assert evaluation.result != "none", evaluation
        return
    domain, expires = shortcut
    assert (evaluation.result, evaluation.domain) == ("none", domain)
    assert (evaluation.explanation, evaluation.mechanism, evaluation.problem) == ("", "", "")
    assert expires == view.expires
