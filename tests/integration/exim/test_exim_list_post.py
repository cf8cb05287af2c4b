"""A list post: one message to 5,000 recipients, through real Exim and the shipped fragments.

The DATA question carries the recipient count, not the list (docs/protocol.md), so it gets
a real answer however many recipients there are: not the fallback that a 4 KiB request
limit gave the old fragment above ~125 recipients, which with ``[server] fallback = "defer"``
deferred every post to a big list on every retry. The DATA question is asked when a
DATA-stage rule is configured (otherwise the RCPT answers say ``skipdata``), so these
daemons have one. Asserted for a list server (a relay host, asked by outbound.acl) and for
an outside client whose triplets passed greylisting, with both fallbacks: every recipient
and the message accepted, the DATA question decided by the ``data`` check (the daemon's
decision log) with ``nrcpt=5000``, and the daemon's headers added (``exim -bh`` traces the
``add_header`` expansion). Without a DATA-stage rule, no DATA question at all. One more
run over real SMTP (``exim -bdf``, the default configuration: no DATA question) delivers
such a post to the aiosmtpd sink: all 5,000 recipients, once, with the ``X-Greylist``
header the RCPT answers carried.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from support.policyd_process import wait_until

from .conftest import (
    GREYLIST_DELAY,
    NO_ANSWER_LOG,
    BhResult,
    Exim,
    Lab,
    Mta,
    Policyd,
    sleep_until,
)
from .test_exim_delivery import make_message

pytestmark = pytest.mark.exim

#: A normal post for our users' lists.
LIST_SIZE = 5_000
SUBSCRIBERS = [f"member{n}@test.example" for n in range(LIST_SIZE)]
RELAY_CLIENT = "203.0.113.25"  # test.conf's RELAY_FROM_HOSTS
OUTSIDE_CLIENT = "198.51.100.60"
BODY = "Subject: monthly newsletter\nList-Id: <news.lists.example.org>\n\nHello, list.\n"
#: What `exim -bh` traces when the DATA fragment adds the daemon's X-Greylist header.
ADDED_GREYLIST_HEADER = re.compile(r"^>>>\s+= X-Greylist: delayed \d+ seconds by policyd", re.M)
#: Covers the time from our clock reading to the daemon's first RCPT question.
START_SLACK = 0.5
#: A DATA-stage rule that never limits here: with it, the fragments ask at DATA.
DATA_RULE = """
[ratelimit]
[[ratelimit.rule]]
name = "list-bytes"
count = "bytes"
stage = "data"
rate = "1000000000/1h"
"""


@pytest.fixture(params=["accept", "defer"])
def daemon(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Policyd]:
    """A private daemon (the lab's config: greylisting with a 2 s delay, and a DATA-stage
    rule) per fallback."""
    started = Policyd(lab.subdir(f"list-{request.param}"), fallback=request.param)
    started.write_config()
    started.config.write_text(started.config.read_text() + DATA_RULE)
    started.start()
    try:
        yield started
    finally:
        assert started.stop() == 0, started.log_text()


def data_decisions(daemon: Policyd, sender: str) -> list[str]:
    return [
        line
        for line in daemon.log_text().splitlines()
        if "decision stage=data " in line and f"sender={sender!r}" in line
    ]


def assert_post_decided(result: BhResult, daemon: Policyd, sender: str) -> None:
    """Every recipient and the message accepted, the DATA question answered by a decision."""
    assert result.rcpt_codes == [250] * LIST_SIZE, result.rcpt[:3]
    assert result.data.startswith("250 OK id="), result.data
    assert NO_ANSWER_LOG not in result.log, result.log_lines
    trouble = [
        line
        for line in daemon.log_text().splitlines()
        if "request over" in line or "fallback" in line
    ]
    assert not trouble, trouble[:5]
    (decision,) = data_decisions(daemon, sender)
    assert " nrcpt=5000 " in decision and " action=ok check=data " in decision, decision


def test_a_list_server_posts_to_5000(exim: Exim, daemon: Policyd) -> None:
    sender = f"news-bounces-{daemon.fallback}@lists.example.org"
    result = exim.bh(RELAY_CLIENT, sender, SUBSCRIBERS, body=BODY, socket_path=daemon.socket)
    assert_post_decided(result, daemon, sender)
    # Asked by outbound.acl (relay=1): never greylisted, so no greylist header to add.
    assert "reason=relay-client" in daemon.log_text()


def test_an_outside_client_posts_to_5000_after_greylisting(exim: Exim, daemon: Policyd) -> None:
    sender = f"news-{daemon.fallback}@example.org"
    started = time.monotonic()
    first = exim.bh(OUTSIDE_CLIENT, sender, SUBSCRIBERS, socket_path=daemon.socket)
    # New triplets: the whole post is deferred (multi_recipient = "first"), all recorded.
    assert first.rcpt_codes == [451] * LIST_SIZE, first.rcpt[:3]

    sleep_until(started + GREYLIST_DELAY + START_SLACK)
    retry = exim.bh(OUTSIDE_CLIENT, sender, SUBSCRIBERS, body=BODY, socket_path=daemon.socket)
    assert_post_decided(retry, daemon, sender)
    assert ADDED_GREYLIST_HEADER.search(retry.log), retry.describe()[-2000:]


def test_without_a_data_rule_a_post_asks_no_data_question(exim: Exim, policyd: Policyd) -> None:
    sender = "news-bounces@lists.example.org"
    result = exim.bh(RELAY_CLIENT, sender, SUBSCRIBERS, body=BODY, socket_path=policyd.socket)
    assert result.rcpt_codes == [250] * LIST_SIZE, result.rcpt[:3]
    assert result.data.startswith("250 OK id="), result.data
    assert NO_ANSWER_LOG not in result.log, result.log_lines
    assert data_decisions(policyd, sender) == []
    assert "reason=relay-client" in policyd.log_text()


def test_a_post_to_5000_is_delivered_with_its_header(mta: Mta, policyd: Policyd) -> None:
    client, sender = "127.0.13.1", "news@example.com"
    rcpts = [f"member{n}@sink.example" for n in range(LIST_SIZE)]
    message = make_message(5000, sender, rcpts[:1])
    started = time.monotonic()
    refused = mta.send(client, message, sender, rcpts)
    assert refused == dict.fromkeys(rcpts, 451)

    sleep_until(started + GREYLIST_DELAY + START_SLACK)
    assert mta.send(client, message, sender, rcpts) == {}
    wait_until(lambda: len(mta.sink.messages) > 0, "delivery to the sink", 30)
    wait_until(lambda: mta.queue_count() == 0, "Exim's queue to empty", 60)
    received = mta.sink.received()
    delivered = sorted(rcpt for _, to, _ in received for rcpt in to)
    assert delivered == sorted(rcpts)  # every subscriber, once
    assert {msg["X-Test-Id"] for _, _, msg in received} == {"m5000"}
    assert all(msg["X-Greylist"] for _, _, msg in received)
