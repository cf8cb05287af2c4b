"""Greylisting at RCPT as a client sees it: real Exim (``-bh``), shipped fragments, real policyd.

All tests share one daemon (2 s delay); each keeps to its own senders so triplets never
collide. A test waits for the delay at most once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from .conftest import (
    GREYLIST_DELAY,
    NO_ANSWER_LOG,
    TEMP_LOCAL_PROBLEM,
    WHITELISTED_CLIENT,
    BhResult,
    Policyd,
    retry_until,
    sleep_until,
)

pytestmark = pytest.mark.exim

Bh = Callable[..., BhResult]
#: How long after the delay a retry may still be refused (clock granularity, slow CI).
SLACK = 3.0


def accepted(result: BhResult) -> bool:
    return all(line.startswith("250 ") for line in result.rcpt)


def assert_daemon_answered(result: BhResult, policyd: Policyd) -> None:
    """The daemon gave a verdict: the fragments did not have to fail open."""
    assert not [line for line in result.log_lines if NO_ANSWER_LOG in line], (
        result.describe() + "\npolicyd log:\n" + policyd.log_text()[-3000:]
    )


def retry_after_delay(first_seen: float, attempt: Callable[[], BhResult]) -> BhResult:
    sleep_until(first_seen + GREYLIST_DELAY)
    return retry_until(attempt, accepted, SLACK)


def test_new_triplet_is_deferred_then_passes_after_the_delay(bh: Bh, policyd: Policyd) -> None:
    sender, rcpt = "lifecycle@example.org", "user1@test.example"
    first_seen = time.monotonic()
    first = bh("198.51.100.10", sender, [rcpt])
    assert first.rcpt_codes == [451], first.describe()
    assert first.rcpt[0].startswith("451 4.7.1 "), first.describe()
    assert_daemon_answered(first, policyd)

    early = bh("198.51.100.10", sender, [rcpt])
    assert early.rcpt_codes == [451], early.describe()

    later = retry_after_delay(first_seen, lambda: bh("198.51.100.10", sender, [rcpt]))
    assert later.rcpt_codes == [250], later.describe()
    assert time.monotonic() - first_seen >= GREYLIST_DELAY - 1

    # The entry is keyed on the /24: another host of the same network shares it ...
    assert bh("198.51.100.77", sender, [rcpt]).rcpt_codes == [250]
    # ... while another network, or another recipient, starts over.
    assert bh("198.51.101.10", sender, [rcpt]).rcpt_codes == [451]
    other = bh("198.51.100.10", sender, ["user2@test.example"])
    assert other.rcpt_codes == [451], other.describe()
    assert_daemon_answered(other, policyd)


def test_ipv6_clients_share_the_entry_of_their_64(bh: Bh, policyd: Policyd) -> None:
    sender, rcpt = "v6@example.org", "user1@test.example"
    first_seen = time.monotonic()
    first = bh("2001:db8::25", sender, [rcpt])
    assert first.rcpt_codes == [451], first.describe()
    assert_daemon_answered(first, policyd)
    # Same /64, before the delay: the shared entry is still early.
    assert bh("2001:db8::26", sender, [rcpt]).rcpt_codes == [451]

    # First ever attempt from ::26 after the delay passes: the entry is per /64.
    later = retry_after_delay(first_seen, lambda: bh("2001:db8::26", sender, [rcpt]))
    assert later.rcpt_codes == [250], later.describe()
    assert bh("2001:db8::25", sender, [rcpt]).rcpt_codes == [250]
    assert bh("2001:db8:0:1::25", sender, [rcpt]).rcpt_codes == [451]


HOSTILE = {
    # name: (helo, sender, recipient) -- each a triplet of its own.
    "spaces": (b"client.example.net", b'"a b c"@example.org', b'"x y"@test.example'),
    "quotes": (b"client.example.net", b'"it\'s \\"q\\""@example.org', b"q@test.example"),
    "utf8": (b"client.example.net", "jörg@exämple.org".encode(), "müller@test.example".encode()),
    "cr": (b"client.example.net", b'"a\rb"@example.org', b'"cr\rlf"@test.example'),
    "tab": (b"client.example.net", b"tab@example.org", b'"t\tb"@test.example'),
    "words": (b"client.example.net", b'"ip=1.2.3.4 txn=x"@example.org', b"w@test.example"),
    "helo": (b'evil "helo" \xc3\xa9 from_b64=eA==', b"helo@example.org", b"h@test.example"),
    "null-sender": (b"client.example.net", b"", b"bounce@test.example"),
}


def test_hostile_values_get_a_wellformed_answer(bh: Bh, policyd: Policyd) -> None:
    client = "203.0.113.40"
    first_seen = time.monotonic()
    for name, (helo, sender, rcpt) in HOSTILE.items():
        result = bh(client, sender, [rcpt], helo=helo)
        assert result.rcpt_codes == [451], f"{name}: {result.describe()}"
        assert TEMP_LOCAL_PROBLEM not in result.describe(), name
        assert_daemon_answered(result, policyd)

    sleep_until(first_seen + GREYLIST_DELAY)
    for name, (helo, sender, rcpt) in HOSTILE.items():
        result = retry_until(
            lambda s=sender, r=rcpt, h=helo: bh(client, s, [r], helo=h), accepted, SLACK
        )
        assert result.rcpt_codes == [250], f"{name}: {result.describe()}"
        assert_daemon_answered(result, policyd)


def test_recipients_of_one_message_are_answered_alike(bh: Bh, policyd: Policyd) -> None:
    client, sender = "203.0.113.50", "multi@example.org"
    rcpts = ["m1@test.example", "m2@test.example"]
    first_seen = time.monotonic()
    first = bh(client, sender, rcpts)
    assert first.rcpt_codes == [451, 451], first.describe()

    # After the delay the whole message goes through, a Subject-only one included.
    body = "Subject: subscribe\n\n"
    later = retry_after_delay(first_seen, lambda: bh(client, sender, rcpts, body=body))
    assert later.rcpt_codes == [250, 250], later.describe()
    assert later.data.startswith("250 OK id="), later.describe()
    assert_daemon_answered(later, policyd)

    # The first greylist-decided recipient decides for the rest of the transaction.
    new_first = bh(client, sender, ["m3@test.example", rcpts[0]])
    assert new_first.rcpt_codes == [451, 451], new_first.describe()
    passed_first = bh(client, sender, [rcpts[0], "m4@test.example"], body=body)
    assert passed_first.rcpt_codes == [250, 250], passed_first.describe()
    assert passed_first.data.startswith("250 OK id="), passed_first.describe()


def test_subject_only_message_from_a_whitelisted_client_is_accepted(
    bh: Bh, policyd: Policyd
) -> None:
    result = bh(
        WHITELISTED_CLIENT,
        "list-request@example.org",
        ["lists@test.example"],
        body="Subject: unsubscribe\n\n",
    )
    assert result.rcpt_codes == [250], result.describe()
    assert result.data.startswith("250 OK id="), result.describe()
    assert_daemon_answered(result, policyd)


@pytest.mark.parametrize("rcpt", ["abuse@test.example", "vip@test.example"])
def test_whitelisted_recipient_is_not_greylisted(bh: Bh, policyd: Policyd, rcpt: str) -> None:
    result = bh("203.0.113.60", "someone@example.org", [rcpt])
    assert result.rcpt_codes == [250], result.describe()
    assert_daemon_answered(result, policyd)


def test_message_the_rcpt_hook_never_saw_is_accepted(bh: Bh, policyd: Policyd) -> None:
    # test.conf, like Debian, accepts postmaster@ before the hook: only DATA is asked.
    body = "Subject: hello\n\n"
    result = bh("203.0.113.61", "someone@example.org", ["postmaster@test.example"], body=body)
    assert result.rcpt_codes == [250], result.describe()
    assert result.data.startswith("250 OK id="), result.describe()
    assert_daemon_answered(result, policyd)
