"""The RFC 7208 test suite (tests/data/rfc7208, BSD licence beside it) through the real path.

Each scenario's zone data is served by the loopback DNS server; SpfCheck asks it through
c-ares with an empty cache, exactly as the daemon would. A case passes when the result is
one the suite accepts and, for a fail with an expected explanation, the explanation matches.

Zone conventions follow the suite's reference driver (pyspf's test/testspf.py): a name's
``SPF`` (type 99) records are also served as TXT unless the name has a TXT entry
(``TXT: NONE`` is such an entry that publishes nothing); ``TIMEOUT`` makes questions for a
type the name has no record of go unanswered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.dns_server import DnsServer

from policyd.checks.spf import SpfCheck

from .spf_support import query

SUITE = Path(__file__).resolve().parents[2] / "data" / "rfc7208" / "rfc7208-tests.yml"

_CARES_NAMES = (
    "c-ares refuses to put a name with characters other than letters, digits, '-', '_' and "
    "'.' into a query (ARES_EBADNAME, even escaped), though DNS allows any octet (RFC 2181 "
    "§11); such a name is treated as nonexistent, so the directive does not match"
)
#: Cases that cannot pass, with the reason; each must fail (strict xfail).
EXPECTED_FAILURES: dict[str, str] = {
    "a-colon-domain": _CARES_NAMES,  # a:foo:bar/baz.example.com
    "a-colon-domain-ip4mapped": _CARES_NAMES,
    "mx-colon-domain": _CARES_NAMES,  # mx:foo:bar/baz.example.com
    "mx-colon-domain-ip4mapped": _CARES_NAMES,
    "macro-mania-in-domain": _CARES_NAMES,  # a:macro%percent  space%20url-space.example.com
}


def _load() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    with SUITE.open("rb") as handle:
        documents = list(yaml.safe_load_all(handle))
    cases = []
    for document in documents:
        zone = suite_zone(document["zonedata"])
        for name, case in document["tests"].items():
            cases.append((name, case, zone))
    return cases


def suite_zone(zonedata: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The suite's zone data in dns_server's form, SPF records duplicated as TXT."""
    zone: dict[str, list[Any]] = {}
    for name, entries in zonedata.items():
        records: list[Any] = []
        spf_values: list[Any] = []
        has_txt = False
        for entry in entries:
            if entry == "TIMEOUT":
                records.append("TIMEOUT")
                continue
            ((rtype, value),) = entry.items()
            has_txt = has_txt or rtype == "TXT"
            if value == "NONE":
                continue
            if rtype in ("SPF", "TXT") and value == []:
                # null-text: a TXT with no strings cannot cross c-ares (it rejects the whole
                # answer as malformed, EBADRESP → temperror); serve the nearest legal
                # record, one empty string, which is what the case is about.
                value = [""]
            if rtype == "SPF":
                spf_values.append(value)
            records.append((rtype, value))
        if not has_txt:
            records.extend(("TXT", value) for value in spf_values)
        zone[name] = records
    return zone


CASES = _load()


def test_suite_is_complete() -> None:
    assert len(CASES) == 203


@pytest.mark.parametrize(
    ("name", "case", "zone"),
    [
        pytest.param(
            name,
            case,
            zone,
            id=name,
            marks=[pytest.mark.xfail(reason=EXPECTED_FAILURES[name], strict=True)]
            if name in EXPECTED_FAILURES
            else [],
        )
        for name, case, zone in CASES
    ],
)
async def test_rfc7208(
    name: str,
    case: dict[str, Any],
    zone: dict[str, list[Any]],
    dns: DnsServer,
    make_check: Callable[..., SpfCheck],
) -> None:
    dns.set_zone(zone)
    check = make_check(fail_action="tag", permerror_action="accept", temperror_action="accept")
    outcome = await check.check(query(case["host"], case["mailfrom"], case["helo"]), 0.0)
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert outcome.result is not None
    checked = outcome.checked[-1]
    assert outcome.result.value in expected, (
        f"{name}: got {outcome.result.value} ({checked.problem or checked.mechanism}), "
        f"want {expected}; spec {case['spec']}"
    )
    if "explanation" in case and outcome.result.value == "fail":
        explanation = outcome.explanation or "DEFAULT"
        assert explanation == case["explanation"]
    # Again from the now warm DNS cache (no result cache): the same outcome, whether pyspf
    # runs again or a domain without a record is answered from the cache alone.
    warm = SpfCheck(check.config, check.resolver, hostname=check.receiver)
    again = await warm.check(query(case["host"], case["mailfrom"], case["helo"]), 0.0)
    assert (again.checked, again.greylist_domain) == (outcome.checked, outcome.greylist_domain)
